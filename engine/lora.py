"""PEFT LoRA adapters as factored task vectors on the base's tensor names.

A LoRA adapter on a linear layer with base weight W (m×n) stores ``lora_A`` (r×n) and ``lora_B`` (m×r);
PEFT's merged weight is ``W + s · B · A`` with ``s = α / r`` (``α / √r`` with rsLoRA), where r and α may
be overridden per module by ``rank_pattern`` / ``alpha_pattern``. Each target becomes a
:class:`~omnimerge.algorithms.base.LowRank` task vector. ``modules_to_save`` tensors are full
replacements of the base tensor.

PEFT names tensors by the module path of the model object in memory
(``base_model.model.<module>.lora_A[.default].weight``). transformers ≥ 5 saves some architectures under
older checkpoint names than its in-memory module paths (Qwen2-VL: module ``model.language_model.layers.0``
is saved as ``model.layers.0``; LLaVA: ``model.language_model.*`` is saved as ``language_model.model.*``),
so module paths are mapped onto the base's tensor names with the prefix table :data:`MODULE_RENAMES`.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from omnimerge.algorithms.base import LowRank

from .errors import SourceError, SourceNotFoundError, TensorMismatchError
from .safetensors_io import TensorIndex

__all__ = ["LoraAdapter", "LoraTarget", "MODULE_RENAMES", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS"]

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

# (in-memory module prefix, checkpoint prefix): how transformers 5 renames on save. Data, not branches:
# add a pair for a new architecture. A module path is tried as is, then with each prefix rewritten; the
# candidate the base holds is used (more than one is an error).
MODULE_RENAMES: tuple[tuple[str, str], ...] = (
    ("model.language_model.", "model."),  # Qwen2-VL, Qwen2.5-VL text stack
    ("model.visual.", "visual."),  # Qwen2-VL, Qwen2.5-VL vision tower
    ("model.language_model.", "language_model.model."),  # LLaVA family text stack
    ("lm_head.", "language_model.lm_head."),  # LLaVA family head
    ("model.vision_tower.", "vision_tower."),  # LLaVA family vision tower
    ("model.multi_modal_projector.", "multi_modal_projector."),  # LLaVA family projector
)

_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight$")
_UNSUPPORTED_KEYS = {
    "lora_magnitude_vector": "DoRA (weight-decomposed LoRA)",
    "lora_embedding_A": "LoRA on embedding layers",
    "lora_embedding_B": "LoRA on embedding layers",
}


@dataclass(frozen=True)
class LoraTarget:
    """One base tensor an adapter changes by ``scale · B · A``.

    Attributes:
        base_name: the base checkpoint's tensor (``<module>.weight`` after renaming).
        module: the PEFT module path the adapter names.
        a_name / b_name: the adapter file's tensor names of A (r×n) and B (m×r).
        rank / alpha / scale: r, α and the resulting scale.
    """

    base_name: str
    module: str
    a_name: str
    b_name: str
    rank: int
    alpha: float
    scale: float


class LoraAdapter:
    """A PEFT LoRA adapter resolved against a base checkpoint's :class:`TensorIndex`.

    Attributes:
        path: the adapter directory.
        index: the adapter weights' index.
        config: the parsed ``adapter_config.json``.
        targets: base tensor name → :class:`LoraTarget`.
        replacements: base tensor name → adapter tensor name, for ``modules_to_save``.
    """

    def __init__(
        self,
        path: Path,
        index: TensorIndex,
        config: dict[str, Any],
        targets: Mapping[str, LoraTarget],
        replacements: Mapping[str, str],
    ) -> None:
        self.path = path
        self.index = index
        self.config = config
        self.targets = dict(targets)
        self.replacements = dict(replacements)

    @classmethod
    def from_dir(
        cls,
        path: Path | str,
        base_index: TensorIndex,
        *,
        allow_pickle: bool = False,
        renames: Sequence[tuple[str, str]] = MODULE_RENAMES,
    ) -> "LoraAdapter":
        """Read ``adapter_config.json`` and the adapter weights, and map every tensor onto the base.

        Raises:
            SourceNotFoundError: no adapter config or weights.
            SourceError: unsupported adapter kinds (DoRA, embedding or conv LoRA, fan_in_fan_out, LoRA bias,
                non-LoRA PEFT types), tensors that match no base tensor, or a factor without its pair.
            TensorMismatchError: factor shapes that disagree with the base tensor or the configured rank.
        """
        path = Path(path)
        config = _read_config(path)
        weights = path / ADAPTER_WEIGHTS
        if weights.is_file():
            index = TensorIndex.from_files([weights], root=path)
        elif (path / ADAPTER_PICKLE).is_file():
            index = TensorIndex.from_dir(path, allow_pickle=allow_pickle)
            weights = path / ADAPTER_PICKLE
        else:
            raise SourceNotFoundError(
                f"LoRA adapter '{path}' has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}. Save the adapter with "
                "peft's save_pretrained, or point the recipe at the directory that holds its weights."
            )
        mapper = _NameMapper(base_index, renames, weights)
        factors: dict[str, dict[str, str]] = {}
        replacements: dict[str, str] = {}
        for name in index.names():
            for key, what in _UNSUPPORTED_KEYS.items():
                if f".{key}" in name:
                    raise SourceError(
                        f"LoRA adapter '{weights}' uses {what} (tensor '{name}'), which omnimerge does not merge. "
                        "Merge it into a full checkpoint with peft's merge_and_unload() and use that as an expert."
                    )
        for name in index.names():
            stripped = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
            m = _LORA_KEY.match(stripped)
            if m:
                factors.setdefault(m["module"], {})[m["kind"]] = name
                continue
            if ".lora_" in stripped:
                raise SourceError(
                    f"LoRA adapter '{weights}' holds tensor '{name}', which is not a LoRA A/B weight (LoRA bias "
                    "and other variants are unsupported). Merge it with peft's merge_and_unload() instead."
                )
            # modules_to_save (``<module>[.modules_to_save.<adapter>].weight``) and saved embedding layers
            # (``<module>.base_layer.weight``) replace the base tensor whole.
            module_name = re.sub(r"\.(modules_to_save\.[^.]+|base_layer)\.", ".", stripped)
            replacements[mapper.base_name(module_name, name)] = name
        targets: dict[str, LoraTarget] = {}
        for module, pair in factors.items():
            if set(pair) != {"lora_A", "lora_B"}:
                missing = ({"lora_A", "lora_B"} - set(pair)).pop()
                raise SourceError(
                    f"LoRA adapter '{weights}' has {next(iter(pair.values()))!r} but no {missing} for module "
                    f"'{module}'. The adapter file is incomplete; save it again."
                )
            target = _make_target(module, pair, index, base_index, mapper, config, weights)
            if target.base_name in targets or target.base_name in replacements:
                raise SourceError(f"LoRA adapter '{weights}' changes base tensor '{target.base_name}' twice.")
            targets[target.base_name] = target
        if not targets and not replacements:
            raise SourceError(f"LoRA adapter '{weights}' holds no LoRA tensors.")
        logger.info("LoRA adapter %s: %d low-rank targets, %d replaced tensors", path, len(targets), len(replacements))
        return cls(path, index, config, targets, replacements)

    def names(self) -> list[str]:
        """The base tensors this adapter changes (low-rank targets and replacements), sorted."""
        return sorted({*self.targets, *self.replacements})

    def delta(self, name: str, reader: Any) -> LowRank:
        """The task vector of base tensor ``name`` as float32 factors with their scale.

        Args:
            name: a base tensor name in :attr:`targets`.
            reader: a :class:`~omnimerge.engine.safetensors_io.TensorReader` over :attr:`index`.
        """
        target = self.targets.get(name)
        if target is None:
            raise KeyError(f"LoRA adapter '{self.path}' has no low-rank factors for base tensor '{name}'.")
        return LowRank(
            B=reader.read(target.b_name).float(), A=reader.read(target.a_name).float(), scale=target.scale
        )

    def __repr__(self) -> str:
        return f"LoraAdapter({str(self.path)!r}, {len(self.targets)} targets, {len(self.replacements)} replacements)"


def _read_config(path: Path) -> dict[str, Any]:
    file = path / ADAPTER_CONFIG
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise SourceNotFoundError(
            f"'{path}' has no {ADAPTER_CONFIG}; it is not a PEFT adapter directory."
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"'{file}' is not valid JSON ({e}).") from None
    if not isinstance(config, dict):
        raise SourceError(f"'{file}' is not a JSON object.")
    peft_type = config.get("peft_type", "LORA")
    problems = []
    if str(peft_type).upper() != "LORA":
        problems.append(f"peft_type is {peft_type!r}; only LORA adapters are supported")
    if config.get("use_dora"):
        problems.append("use_dora is true; DoRA adapters are not supported")
    if config.get("fan_in_fan_out"):
        problems.append("fan_in_fan_out is true (Conv1D/GPT-2 style layers); not supported")
    if config.get("lora_bias"):
        problems.append("lora_bias is true; LoRA with a trained bias is not supported")
    if config.get("target_parameters"):
        problems.append("target_parameters is set (LoRA on raw parameters); not supported")
    if problems:
        raise SourceError(
            f"LoRA adapter '{file}' is unsupported: {'; '.join(problems)}. Merge it into a full checkpoint with "
            "peft's merge_and_unload() and use that as an expert."
        )
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key, 8), (int, float)) or config.get(key, 8) <= 0:
            raise SourceError(f"'{file}': {key} must be a positive number, got {config.get(key)!r}.")
    return config


def _pattern_value(patterns: Mapping[str, Any] | None, module: str, default: Any) -> Any:
    """PEFT's rule: the first pattern key ``k`` with ``re.match(rf"(.*\\.)?({k})$", module)`` wins."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class _NameMapper:
    """Maps PEFT module paths onto base tensor names through the rename table."""

    def __init__(self, base: TensorIndex, renames: Sequence[tuple[str, str]], weights: Path) -> None:
        self.base = base
        self.renames = renames
        self.weights = weights

    def base_name(self, tensor_path: str, adapter_name: str) -> str:
        """``tensor_path`` is ``<module>.<param>`` with the PEFT prefix removed."""
        candidates = [tensor_path]
        for memory, saved in self.renames:
            if tensor_path.startswith(memory):
                candidates.append(saved + tensor_path[len(memory):])
        found = list(dict.fromkeys(c for c in candidates if c in self.base))
        if len(found) == 1:
            return found[0]
        if not found:
            raise SourceError(
                f"LoRA adapter '{self.weights}': tensor '{adapter_name}' targets '{tensor_path}', which base "
                f"'{self.base.root}' does not have (tried: {', '.join(dict.fromkeys(candidates))}). Check that "
                "the adapter was trained on this base; for a new architecture add its module renames."
            )
        raise SourceError(
            f"LoRA adapter '{self.weights}': tensor '{adapter_name}' matches several base tensors "
            f"({', '.join(found)}); the rename table is ambiguous for this base."
        )


def _make_target(
    module: str,
    pair: dict[str, str],
    index: TensorIndex,
    base_index: TensorIndex,
    mapper: _NameMapper,
    config: dict[str, Any],
    weights: Path,
) -> LoraTarget:
    a_info, b_info = index[pair["lora_A"]], index[pair["lora_B"]]
    if len(a_info.shape) != 2 or len(b_info.shape) != 2:
        raise SourceError(
            f"LoRA adapter '{weights}': module '{module}' has factors of shapes {list(a_info.shape)} and "
            f"{list(b_info.shape)}; only LoRA on linear layers (2-D factors) is supported, not conv LoRA. "
            "Merge it with peft's merge_and_unload() instead."
        )
    base_name = mapper.base_name(module + ".weight", pair["lora_A"])
    base_shape = base_index[base_name].shape
    rank = int(_pattern_value(config.get("rank_pattern"), module, config.get("r", 8)))
    alpha = float(_pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8)))
    (r_a, n), (m, r_b) = a_info.shape, b_info.shape
    if len(base_shape) != 2 or (m, n) != tuple(base_shape) or r_a != r_b:
        raise TensorMismatchError(
            f"LoRA adapter '{weights}': module '{module}' has B {list(b_info.shape)} and A {list(a_info.shape)}, "
            f"but base tensor '{base_name}' is {list(base_shape)} (B must be m×r and A r×n for a base of m×n). "
            "The adapter was trained on a different base; use the base it was trained on."
        )
    if r_a != rank:
        raise TensorMismatchError(
            f"LoRA adapter '{weights}': module '{module}' has rank {r_a} in its weights but {rank} in "
            f"{ADAPTER_CONFIG} (r / rank_pattern). The config and weights come from different saves."
        )
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return LoraTarget(base_name, module, pair["lora_A"], pair["lora_B"], rank, alpha, scale)
