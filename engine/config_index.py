"""Tensor indexes built from a ``config.json`` alone, for planning before any weights are downloaded.

The architecture named by the config is instantiated on PyTorch's ``meta`` device (shapes, no storage, no
weights read, no initialisation), and the names it would save under are taken the way ``save_pretrained``
takes them: tied weights removed, then ``transformers``' weight-name conversions reverted to the checkpoint
layout. Only classes shipped with ``transformers`` are used; a config that names custom code (``auto_map``)
is refused rather than run.

The result is a real :class:`~omnimerge.engine.safetensors_io.TensorIndex` (so plans, LoRA mapping and
fingerprints work unchanged) whose one "file" is the config itself: byte ranges are laid out as if every
tensor sat in one file. Reading tensor data from it fails with a clear message.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from .errors import SourceError, SourceNotFoundError
from .safetensors_io import TensorIndex, TensorInfo, dtype_name

__all__ = ["ConfigTensorIndex", "config_tensor_index", "CONFIG_ONLY_FILE"]

log = logging.getLogger(__name__)

CONFIG_ONLY_FILE = "config.json"  # the pseudo weight file of a config-only index


class ConfigTensorIndex(TensorIndex):
    """A :class:`TensorIndex` derived from a config: names, shapes and dtypes, but no weights on disk."""

    config_only = True

    def __repr__(self) -> str:
        return f"ConfigTensorIndex({str(self.root)!r}, {len(self)} tensors from config.json, no weights)"


def _architecture_class(config: Any, where: str) -> Any:
    import transformers

    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    if names:
        raise SourceError(
            f"'{where}' names architecture {names[0]!r}, which this transformers ({transformers.__version__}) "
            "does not ship. omnimerge never runs remote code; plan with a config of a built-in architecture, "
            "or download the weights so their headers can be read.")
    from transformers import AutoModel

    log.info("'%s' names no architecture; using AutoModel for %s", where, config.model_type)
    return AutoModel


def config_tensor_index(path: str | Path, *, dtype: str | None = None) -> ConfigTensorIndex:
    """Index the tensors a checkpoint of ``path/config.json`` would hold, without any weights.

    Args:
        path: a directory holding ``config.json`` (or the file itself).
        dtype: safetensors dtype of the floating tensors (``BF16``, ``F16``, ``F32``); default: the config's
            ``dtype``/``torch_dtype``, else ``F32``.

    Raises:
        SourceNotFoundError: no ``config.json`` there.
        UnsafeCheckpointError: the config asks for custom code (``auto_map``).
        SourceError: a config ``transformers`` cannot build.
    """
    import torch
    from transformers import AutoConfig

    from .errors import UnsafeCheckpointError

    path = Path(path)
    root = path.parent if path.is_file() else path
    file = root / CONFIG_ONLY_FILE
    if not file.is_file():
        raise SourceNotFoundError(f"'{root}' has no config.json to plan from (and no weights).")
    raw = file.read_bytes()
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"'{file}' is not valid JSON ({e}).") from None
    if isinstance(doc, dict) and doc.get("auto_map"):
        raise UnsafeCheckpointError(
            f"'{file}' declares custom code (auto_map); omnimerge does not run remote code, so it cannot derive "
            "tensor shapes from this config. Download the weights (their headers are enough) to plan it.")
    try:
        config = AutoConfig.from_pretrained(root, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as e:
        raise SourceError(f"'{file}' is not a config transformers can build: {e}") from None
    cls = _architecture_class(config, str(file))
    names_shapes = _saved_shapes(cls, config, str(file))
    want = dtype or _config_dtype(doc)
    tensors: list[TensorInfo] = []
    offset = 0
    for name, (shape, tdtype) in names_shapes.items():
        sdtype = want if tdtype.is_floating_point else dtype_name(tdtype)
        info = TensorInfo(name, sdtype, shape, file, offset, offset)
        info = TensorInfo(name, sdtype, shape, file, offset, offset + info.nbytes)
        offset = info.end
        tensors.append(info)
    digest = hashlib.sha256(b"config-only\0" + raw).hexdigest()
    log.info("indexed %d tensors (%.1f GB) of %s from its config alone", len(tensors), offset / 1e9, root)
    return ConfigTensorIndex(root, tensors, metadata={file: {"format": "config-only"}}, digests={file: digest},
                             sizes={file: offset}, mtimes={file: 0})


_CONFIG_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float": "F32", "half": "F16"}


def _config_dtype(doc: dict[str, Any]) -> str:
    for holder in (doc, doc.get("text_config") or {}):
        value = holder.get("dtype") or holder.get("torch_dtype")
        if isinstance(value, str) and value in _CONFIG_DTYPES:
            return _CONFIG_DTYPES[value]
    return "F32"


_SHAPES_CACHE: dict[str, dict[str, tuple[tuple[int, ...], Any]]] = {}  # experts often share the base's config


def _saved_shapes(cls: Any, config: Any, where: str) -> dict[str, tuple[tuple[int, ...], Any]]:
    """``{saved tensor name: (shape, torch dtype)}`` of ``cls(config)``, built on the meta device (memoised by
    class and config contents)."""
    key = hashlib.sha256(f"{cls.__module__}.{cls.__name__}\0{config.to_json_string()}".encode()).hexdigest()
    if key not in _SHAPES_CACHE:
        _SHAPES_CACHE[key] = _build_saved_shapes(cls, config, where)
    return _SHAPES_CACHE[key]


def _build_saved_shapes(cls: Any, config: Any, where: str) -> dict[str, tuple[tuple[int, ...], Any]]:
    import torch
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    try:
        with torch.device("meta"):
            model = cls._from_config(config)
    except Exception as e:  # noqa: BLE001 - any construction failure is the config's problem, reported as such
        raise SourceError(f"Cannot build {cls.__name__} from '{where}' on the meta device: "
                          f"{type(e).__name__}: {e}") from None
    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    try:
        from transformers.core_model_loading import revert_weight_conversion

        state = revert_weight_conversion(model, state)
    except ImportError:  # transformers 4.x: in-memory names are the saved names (or reverted on save elsewhere)
        pass
    return {name: (tuple(int(s) for s in t.shape), t.dtype) for name, t in state.items()}
