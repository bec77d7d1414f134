"""Model sources a recipe names — a local directory, a hub repo id or a PEFT LoRA adapter — resolved to a
local directory and a header index.

Hub ids go through ``huggingface_hub.snapshot_download`` (the local cache first; ``HF_HUB_OFFLINE=1`` never
touches the network) and fetch only weights and the config/tokenizer/processor/chat-template files: never
Python files, so remote code cannot even be downloaded. A ``config.json`` with ``auto_map`` is noted
(``ResolvedSource.remote_code``), never run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SourceError, SourceNotFoundError
from .lora import ADAPTER_CONFIG, LoraAdapter
from .safetensors_io import TensorIndex, TensorReader

__all__ = ["SourceSpec", "ResolvedSource", "resolve_source", "HUB_ALLOW_PATTERNS", "HUB_PICKLE_PATTERNS"]

logger = logging.getLogger(__name__)

KINDS = ("auto", "model", "lora")
# Weights, indexes and every config/tokenizer/processor/chat-template file; no *.py (remote code).
HUB_ALLOW_PATTERNS: tuple[str, ...] = (
    "*.safetensors",
    "*.safetensors.index.json",
    "*.json",
    "*.jinja",
    "*.txt",
    "*.model",
    "*.tiktoken",
    "tokenizer*",
)
HUB_PICKLE_PATTERNS: tuple[str, ...] = ("*.bin", "*.bin.index.json", "*.pt", "*.pth")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class SourceSpec:
    """What a recipe names as a base or expert.

    Attributes:
        source: a local directory, or a hub repo id ``org/name``.
        revision: a hub branch, tag or commit (hub ids only).
        kind: ``auto`` (an ``adapter_config.json`` makes it a LoRA), ``model`` or ``lora``.
    """

    source: str
    revision: str | None = None
    kind: str = "auto"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise SourceError(
                f"Source '{self.source}' has kind {self.kind!r}; it must be one of {', '.join(KINDS)}."
            )
        if not isinstance(self.source, str) or not self.source.strip():
            raise SourceError("A source must be a non-empty path or hub repo id.")


@dataclass
class ResolvedSource:
    """A source on local disk with its tensors indexed. Picklable: paths and parsed headers only.

    Attributes:
        label: the recipe's name for it (``base``, an expert's name), used in messages.
        spec: what the recipe said.
        kind: ``model`` or ``lora``.
        path: the local directory (a hub cache snapshot for hub ids).
        revision: the hub commit hash, when from the hub.
        index: the weights' index (for a LoRA source: the adapter file's index).
        lora: the adapter mapped onto the base (LoRA sources only).
        remote_code: ``config.json`` names custom code (``auto_map``); it is never run.
    """

    label: str
    spec: SourceSpec
    kind: str
    path: Path
    revision: str | None
    index: TensorIndex
    lora: LoraAdapter | None = None
    remote_code: bool = False
    _fingerprint: str | None = field(default=None, repr=False, compare=False)

    def fingerprint(self) -> str:
        """sha256 over the kind, the hub revision, each weight file's size, header and first 64 KiB of data,
        its modification time for local sources (a hub commit pins the content instead), and for LoRA the
        adapter config. Cheap (no full read); changes when an input is rewritten."""
        if self._fingerprint is None:
            files = self.index.fingerprint(with_mtime=self.revision is None)
            h = hashlib.sha256(f"{self.kind}\0{self.revision or ''}\0{files}".encode())
            if self.kind == "lora":
                h.update((self.path / ADAPTER_CONFIG).read_bytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def config(self) -> dict[str, Any] | None:
        """The directory's ``config.json`` (``None`` when absent, as for most LoRA adapters)."""
        return _read_json(self.path / "config.json")

    def reader(self) -> TensorReader:
        """A reader over :attr:`index` (for LoRA: the adapter's tensors). Build it in the process that reads."""
        return TensorReader(self.index)

    def __repr__(self) -> str:
        rev = f"@{self.revision[:12]}" if self.revision else ""
        return f"ResolvedSource({self.label!r}, {self.kind}, {str(self.path)!r}{rev}, {len(self.index)} tensors)"


def resolve_source(
    spec: SourceSpec,
    *,
    label: str,
    allow_pickle: bool = False,
    base: ResolvedSource | None = None,
    cache_dir: str | None = None,
    plan_only: bool = False,
) -> ResolvedSource:
    """Find a source on disk (downloading a hub id if needed and allowed) and index its tensors.

    Args:
        spec: the recipe's source.
        label: its name in the recipe, for messages.
        allow_pickle: accept pickle weights (loaded with ``weights_only=True``).
        base: the resolved base model; required for a LoRA source (its tensor names anchor the adapter).
        cache_dir: the hub cache (default: huggingface_hub's).
        plan_only: for planning before a download: a hub id fetches only its JSON files, and a model whose
            weights are absent is indexed from its ``config.json`` (:mod:`omnimerge.engine.config_index`;
            shapes only, nothing can be read from it).

    Raises:
        SourceNotFoundError: no such directory and not a repo id; a repo or revision not in the cache while
            offline; a repo that does not exist.
        UnsafeCheckpointError: pickle weights without ``allow_pickle``; an index escaping its directory.
        SourceError: malformed files, unsupported adapters, a LoRA without a base.
    """
    path, revision = _locate(spec, label=label, allow_pickle=allow_pickle, cache_dir=cache_dir, plan_only=plan_only)
    is_adapter = (path / ADAPTER_CONFIG).is_file()
    kind = spec.kind if spec.kind != "auto" else ("lora" if is_adapter else "model")
    remote_code = _note_remote_code(path, label)
    if kind == "model":
        if is_adapter and not any(path.glob("*.safetensors.index.json")) and not (path / "model.safetensors").is_file():
            raise SourceError(
                f"Source '{label}' ('{spec.source}') is a LoRA adapter ({ADAPTER_CONFIG}) but the recipe says "
                "kind: model. Set kind: lora (or auto) for it."
            )
        try:
            index = TensorIndex.from_dir(path, allow_pickle=allow_pickle)
        except SourceNotFoundError:
            if not (plan_only and (path / "config.json").is_file()):
                raise
            from .config_index import config_tensor_index

            logger.info("Source '%s' has no weights at %s; planning from its config.json", label, path)
            index = config_tensor_index(path)
        return ResolvedSource(label, spec, "model", path, revision, index, None, remote_code)
    if not is_adapter:
        raise SourceError(
            f"Source '{label}' ('{spec.source}') has kind: lora but '{path}' has no {ADAPTER_CONFIG}. Point it "
            "at a PEFT adapter directory (adapter_config.json + adapter_model.safetensors), or set kind: model."
        )
    if base is None:
        raise SourceError(
            f"LoRA source '{label}' ('{spec.source}') needs the resolved base model to map its tensors; resolve "
            "the base first and pass it as base=."
        )
    if base.kind != "model":
        raise SourceError(f"LoRA source '{label}' needs a full model as base, but '{base.label}' is a LoRA adapter.")
    adapter = LoraAdapter.from_dir(path, base.index, allow_pickle=allow_pickle)
    base_hint = (_read_json(path / ADAPTER_CONFIG) or {}).get("base_model_name_or_path")
    if base_hint and base_hint not in (base.spec.source, str(base.path)):
        logger.info("LoRA '%s' names base_model_name_or_path=%r; merging onto %r", label, base_hint, base.spec.source)
    return ResolvedSource(label, spec, "lora", path, revision, adapter.index, adapter, remote_code)


def _locate(spec: SourceSpec, *, label: str, allow_pickle: bool, cache_dir: str | None,
            plan_only: bool = False) -> tuple[Path, str | None]:
    local = Path(spec.source).expanduser()
    if local.is_dir():
        if spec.revision:
            logger.warning("Source '%s' is a local directory; its revision %r is ignored.", label, spec.revision)
        return local.resolve(), None
    if local.exists():
        raise SourceError(
            f"Source '{label}' ('{spec.source}') is a file; give the model directory that holds it."
        )
    if not _looks_like_repo_id(spec.source):
        raise SourceNotFoundError(
            f"Source '{label}': '{spec.source}' is neither an existing directory nor a hub repo id (org/name). "
            "Check the path."
        )
    return _download(spec, label=label, allow_pickle=allow_pickle, cache_dir=cache_dir, plan_only=plan_only)


def _looks_like_repo_id(source: str) -> bool:
    return bool(_REPO_ID.match(source)) and not source.startswith((".", "~")) and ".." not in source


def _download(spec: SourceSpec, *, label: str, allow_pickle: bool, cache_dir: str | None,
              plan_only: bool = False) -> tuple[Path, str]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE
    patterns = list(HUB_ALLOW_PATTERNS) + (list(HUB_PICKLE_PATTERNS) if allow_pickle else [])
    if plan_only:  # configs and indexes only; weights already in the cache are used where present
        patterns = ["*.json"]
    where = f"'{spec.source}'" + (f" at revision '{spec.revision}'" if spec.revision else "")
    try:
        path = snapshot_download(
            spec.source,
            revision=spec.revision,
            allow_patterns=patterns,
            cache_dir=cache_dir,
            local_files_only=offline,
        )
    except LocalEntryNotFoundError:
        hint = "HF_HUB_OFFLINE is set, so" if offline else "the hub could not be reached and"
        raise SourceNotFoundError(
            f"Source '{label}': hub repo {where} is not in the local cache{f' ({cache_dir})' if cache_dir else ''} "
            f"and {hint} nothing was downloaded. Download it first (`hf download {spec.source}`) or unset "
            "HF_HUB_OFFLINE."
        ) from None
    except (RepositoryNotFoundError, GatedRepoError):
        raise SourceNotFoundError(
            f"Source '{label}': hub repo '{spec.source}' does not exist or needs access you do not have "
            "(log in with `hf auth login` for gated or private repos)."
        ) from None
    except RevisionNotFoundError:
        raise SourceNotFoundError(
            f"Source '{label}': hub repo '{spec.source}' has no revision '{spec.revision}'."
        ) from None
    except HfHubHTTPError as e:
        raise SourceError(f"Source '{label}': downloading {where} failed: {e}") from None
    snapshot = Path(path)
    logger.info("Source '%s': %s resolved to %s", label, where, snapshot)
    return snapshot, snapshot.name


def _note_remote_code(path: Path, label: str) -> bool:
    config = _read_json(path / "config.json")
    if config and config.get("auto_map"):
        logger.warning(
            "Source '%s' declares custom code (auto_map in %s); omnimerge merges its tensors but never runs it.",
            label, path / "config.json",
        )
        return True
    return False


def _read_json(file: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(file.read_text())
    except FileNotFoundError:
        return None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"'{file}' is not valid JSON ({e}).") from None
    return doc if isinstance(doc, dict) else None
