"""Planning a modality merge: which tensors are shared (merged or kept), which belong to one model (carried).

A pure function of the recipe and the checkpoints' headers: every model's tensors are split by its key map into
LLM tensors (renamed into the shared namespace) and its own tensors (encoders, connectors, and LLM tensors a rule
marks ``own``). Shared tensors must exist in the LLM base and have one shape everywhere; every problem is
collected and raised together before a byte of weights is read.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from omnimerge.algorithms.registry import get_method

from .errors import PlanError, RecipeError, TensorMismatchError
from .modality_keymap import KeyMap, keymap_for_architecture, known_architectures
from .modality_recipe import ModalityModel, ModalityRecipe
from .plan import layer_key, natural_key
from .safetensors_io import DTYPES, SUPPORTED_FLOAT, plan_shards
from .sources import ResolvedSource, resolve_source

__all__ = ["ModelInputs", "SharedTensor", "OutputEntry", "OutputShard", "ModalityPlan", "plan_modality",
           "resolve_modality_sources", "shard_filenames"]

log = logging.getLogger(__name__)
_MAX_LISTED = 8


@dataclass
class ModelInputs:
    """One model of the recipe, resolved.

    Attributes:
        spec: the recipe's entry.
        source: the model checkpoint.
        adapter: its LoRA adapter (``adapter.lora`` maps it onto ``source``'s tensor names), or None.
        key_map: the key map used (given, or found from ``config.json``).
        llm: shared-namespace name → this model's tensor name, for its shared LLM tensors.
        own: this model's tensor name → where its bytes come from: ``("model", name)``, ``("adapter",
            adapter tensor)`` (``modules_to_save``) or ``("lora", name)`` (source tensor plus its LoRA ΔW).
        architecture: ``config.json`` ``architectures[0]``.
    """

    spec: ModalityModel
    source: ResolvedSource
    adapter: ResolvedSource | None
    key_map: KeyMap
    llm: dict[str, str] = field(default_factory=dict)
    own: dict[str, tuple[str, str]] = field(default_factory=dict)
    architecture: str | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def own_info(self, name: str) -> tuple[str, tuple[int, ...]]:
        """(safetensors dtype, shape) of an own tensor as it is carried."""
        kind, key = self.own[name]
        info = self.adapter.index[key] if kind == "adapter" and self.adapter else self.source.index[key]
        return info.dtype, info.shape


@dataclass(frozen=True)
class SharedTensor:
    """One tensor of the merged LLM (shared namespace).

    ``action`` is ``merge`` (the method over the models' task vectors), ``keep`` (the LLM base's value) or
    ``factors`` (LoRA factor-wise merge: the method over the A factors and over the B factors, ΔW = B̄·Ā).
    """

    name: str
    action: str
    shape: tuple[int, ...]
    base_name: str
    out_dtype: str
    method: str | None = None
    params: tuple[tuple[str, Any], ...] = ()
    rule: str = ""
    requested: str | None = None

    @property
    def out_bytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * DTYPES[self.out_dtype].itemsize

    def param_dict(self) -> dict[str, Any]:
        return dict(self.params)


@dataclass(frozen=True)
class OutputEntry:
    """One tensor of an output file: its name there, where it comes from (``llm`` or ``own``), the name it has
    in that place (shared-namespace name, or the model's own name), dtype and shape."""

    name: str
    origin: str
    key: str
    dtype: str
    shape: tuple[int, ...]

    def to_json(self) -> list[Any]:
        return [self.name, self.origin, self.key, self.dtype, list(self.shape)]

    @classmethod
    def from_json(cls, raw: list[Any]) -> "OutputEntry":
        return cls(str(raw[0]), str(raw[1]), str(raw[2]), str(raw[3]), tuple(int(s) for s in raw[4]))


@dataclass(frozen=True)
class OutputShard:
    """One ``.safetensors`` file of an output, its tensors in write order."""

    filename: str
    entries: tuple[OutputEntry, ...]


@dataclass
class ModalityPlan:
    """Everything a modality merge will do, decided before a byte of weights is read."""

    recipe: ModalityRecipe
    base: ResolvedSource
    base_key_map: KeyMap
    models: list[ModelInputs]
    shared: list[SharedTensor]
    llm_shards: list[OutputShard]
    own_shards: dict[str, list[OutputShard]]
    model_shards: dict[str, list[OutputShard]]
    unused_base: list[str] = field(default_factory=list)

    def shared_by_name(self) -> dict[str, SharedTensor]:
        return {t.name: t for t in self.shared}

    def digest(self) -> str:
        doc = {"recipe": self.recipe.digest(),
               "inputs": [self.base.fingerprint()] + [m.source.fingerprint() for m in self.models]
               + [m.adapter.fingerprint() for m in self.models if m.adapter],
               "shared": [(t.name, t.action, t.method, t.params, t.out_dtype) for t in self.shared]}
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()

    def summary(self) -> str:
        """A human-readable account of the plan (``omnimerge modality --dry-run``)."""
        counts: dict[str, int] = {}
        for t in self.shared:
            key = f"{t.action}:{t.method}" if t.action != "keep" else "keep"
            counts[key] = counts.get(key, 0) + 1
        lines = [f"LLM base: {self.base.spec.source} (key map {self.base_key_map.name})",
                 f"shared LLM: {len(self.shared)} tensors in {len(self.llm_shards)} shard(s): "
                 + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))]
        for m in self.models:
            lora = f", LoRA adapter {m.adapter.spec.source}" if m.adapter else ""
            lines.append(f"model '{m.name}': {m.architecture or '?'} from {m.source.spec.source}{lora} (key map "
                         f"{m.key_map.name}): {len(m.llm)} shared LLM tensors, {len(m.own)} own tensors carried")
        if self.unused_base:
            lines.append(f"LLM base tensors no model uses (not written): {len(self.unused_base)}")
        return "\n".join(lines)


def shard_filenames(n: int, stem: str = "model") -> list[str]:
    """transformers' names for ``n`` shards: ``model.safetensors`` or ``model-0000i-of-0000n.safetensors``."""
    if n == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def resolve_modality_sources(recipe: ModalityRecipe, *, cache_dir: str | None = None
                             ) -> tuple[ResolvedSource, list[tuple[ModalityModel, ResolvedSource, ResolvedSource | None]]]:
    """Resolve the LLM base, every model and every adapter (headers only)."""
    base = resolve_source(recipe.llm_base, label="llm_base", allow_pickle=recipe.allow_pickle, cache_dir=cache_dir)
    out = []
    for spec in recipe.models:
        source = resolve_source(spec.source, label=spec.name, allow_pickle=recipe.allow_pickle, cache_dir=cache_dir)
        adapter = None
        if spec.adapter is not None:
            adapter = resolve_source(spec.adapter, label=f"{spec.name} adapter", allow_pickle=recipe.allow_pickle,
                                     base=source, cache_dir=cache_dir)
        out.append((spec, source, adapter))
    return base, out


def _architecture(source: ResolvedSource) -> str | None:
    config = source.config() or {}
    archs = config.get("architectures") or []
    return str(archs[0]) if archs else None


def _choose_keymap(given: KeyMap | None, source: ResolvedSource, what: str, problems: list[str]) -> KeyMap | None:
    if given is not None:
        return given
    arch = _architecture(source)
    found = keymap_for_architecture(arch)
    if found is None:
        problems.append(
            f"{what} ('{source.spec.source}', architecture {arch or 'unknown: no config.json architectures'}) has no "
            f"built-in key map; give key_map: NAME or an inline {{regex: replacement}} map. Built-in maps cover "
            f"{', '.join(known_architectures())}.")
    return found


def _llm_map(names: list[str], key_map: KeyMap, what: str, problems: list[str]) -> dict[str, str]:
    """Shared-namespace name → tensor name; two tensors landing on one name is a problem."""
    out: dict[str, str] = {}
    for name in sorted(names, key=natural_key):
        canon = key_map.canonical(name)
        if canon is None:
            continue
        if canon in out:
            problems.append(f"{what}: tensors '{out[canon]}' and '{name}' both map to '{canon}' with key map "
                            f"'{key_map.name}'. A key map must be one-to-one; fix its patterns.")
            continue
        out[canon] = name
    return out


def plan_modality(recipe: ModalityRecipe, base: ResolvedSource | None = None,
                  models: list[tuple[ModalityModel, ResolvedSource, ResolvedSource | None]] | None = None
                  ) -> ModalityPlan:
    """Make the plan (headers and configs only).

    Raises:
        RecipeError: key maps that are missing (no built-in one for an architecture), not one-to-one, or match
            nothing — every such problem at once.
        TensorMismatchError: shared tensors the LLM base lacks, shapes that differ between models, models lacking
            a merged tensor, non-float merges, LoRA factor-wise merges without matching pairs — every one at once.
        PlanError: nothing is shared at all.
    """
    if base is None or models is None:
        base, models = resolve_modality_sources(recipe)
    problems: list[str] = []
    base_map = _choose_keymap(recipe.llm_base_key_map, base, "llm_base", problems)
    base_llm = _llm_map(base.index.names(), base_map, "llm_base", problems) if base_map else {}
    if base_map and not base_llm:
        problems.append(f"llm_base '{base.spec.source}': key map '{base_map.name}' matches none of its tensors; it "
                        "is not the LLM these models share, or the key map is wrong.")
    inputs: list[ModelInputs] = []
    for spec, source, adapter in models:
        key_map = _choose_keymap(spec.key_map, source, f"model '{spec.name}'", problems)
        if key_map is None:
            continue
        m = ModelInputs(spec, source, adapter, key_map, architecture=_architecture(source))
        m.llm = _llm_map(source.index.names(), key_map, f"model '{spec.name}'", problems)
        if not m.llm:
            problems.append(f"model '{spec.name}' ('{source.spec.source}'): key map '{key_map.name}' matches none of "
                            "its tensors, so it shares no LLM; check the key map.")
        inputs.append(m)
    if problems:  # key maps are the recipe's to fix
        raise RecipeError(problems, path=str(recipe.path) if recipe.path else None)

    shared = _plan_shared(recipe, base, base_llm, inputs, problems)
    if problems:
        raise TensorMismatchError(_join(problems))
    shared_names = {t.name for t in shared}
    for m in inputs:
        lora = m.adapter.lora if m.adapter else None
        for canon, src in list(m.llm.items()):
            if canon not in shared_names:  # action: own
                del m.llm[canon]
                m.own[src] = _own_origin(src, lora)
        mapped = set(m.llm.values())
        for name in m.source.index.names():
            if name not in mapped and name not in m.own:
                m.own[name] = _own_origin(name, lora)
    used = {c for m in inputs for c in m.llm}
    unused = sorted((base_llm[c] for c in base_llm if c not in used), key=natural_key)
    shared = [t for t in shared if t.name in used]
    if not shared:
        raise PlanError("Nothing is shared: no LLM tensor is common to the models and the LLM base; check the key maps.")
    llm_shards = _pack_llm(shared, recipe.shard_size)
    own_shards = {m.name: _pack_own(m, recipe.shard_size) for m in inputs}
    by_name = {t.name: t for t in shared}
    model_shards = {m.name: _pack_model(m, by_name, recipe.shard_size) for m in inputs}
    return ModalityPlan(recipe, base, base_map, inputs, shared, llm_shards, own_shards, model_shards, unused)


def _own_origin(name: str, lora: Any) -> tuple[str, str]:
    if lora is not None and name in lora.replacements:
        return ("adapter", lora.replacements[name])
    if lora is not None and name in lora.targets:
        return ("lora", name)
    return ("model", name)


def _plan_shared(recipe: ModalityRecipe, base: ResolvedSource, base_llm: dict[str, str], inputs: list[ModelInputs],
                 problems: list[str]) -> list[SharedTensor]:
    names = sorted({c for m in inputs for c in m.llm} | set(base_llm), key=natural_key)
    not_in_base: list[str] = []
    missing: dict[str, list[str]] = {}
    shapes: list[str] = []
    bad_dtype: list[str] = []
    factor_problems: list[str] = []
    shared: list[SharedTensor] = []
    for canon in names:
        holders = [m for m in inputs if canon in m.llm]
        ref = base.index[base_llm[canon]] if canon in base_llm else holders[0].source.index[holders[0].llm[canon]]
        rule = recipe.rule_for(canon, len(ref.shape))
        if rule.action == "own":
            continue
        if canon not in base_llm:
            not_in_base += [f"'{canon}' (model '{m.name}': '{m.llm[canon]}')" for m in holders[:1]]
            continue
        if not holders:
            continue  # base tensor no model uses: reported as unused
        seen = [(f"model '{m.name}' ('{m.llm[canon]}')", tuple(m.source.index[m.llm[canon]].shape)) for m in holders]
        seen.append((f"the LLM base '{base.spec.source}' ('{base_llm[canon]}')", tuple(ref.shape)))
        if len({s for _, s in seen}) > 1:
            parts = [f"{list(s)} in {who}" for who, s in seen]
            shapes.append(f"Tensor '{canon}' of the shared LLM has different shapes: {'; '.join(parts)}. A shared LLM "
                          f"tensor must have one shape in every model; give it action: own with a rule (each model "
                          f"keeps its own), or fix the key map.")
            continue
        out_dtype = recipe.dtype if (recipe.dtype and ref.dtype in SUPPORTED_FLOAT) else ref.dtype
        if rule.action == "keep":
            shared.append(SharedTensor(canon, "keep", tuple(ref.shape), base_llm[canon], out_dtype, rule=rule.describe()))
            continue
        lacking = [m.name for m in inputs if canon not in m.llm]
        for name in lacking:
            missing.setdefault(name, []).append(canon)
        if lacking:
            continue
        if ref.dtype not in SUPPORTED_FLOAT or any(m.source.index[m.llm[canon]].dtype not in SUPPORTED_FLOAT
                                                   for m in holders):
            bad_dtype.append(f"'{canon}'")
            continue
        requested, params = recipe.method_of(rule)
        spec = get_method(requested)
        method, resolved = requested, spec.resolve(params)
        if not spec.handles_shape(ref.shape):
            method = spec.fallback or "weight_average"
            resolved = get_method(method).resolve({})
        action = "merge"
        if recipe.lora_merge == "factors":
            action = _factor_action(canon, holders, ref.shape, factor_problems)
            if action == "factors" and method != requested:  # factors are 2-D: the requested method applies
                method, resolved = requested, spec.resolve(params)
        shared.append(SharedTensor(canon, action, tuple(ref.shape), base_llm[canon], out_dtype, method,
                                   tuple(sorted(resolved.items())), rule.describe(),
                                   requested if method != requested else None))
    if not_in_base:
        problems.append(_listing(f"{len(not_in_base)} tensor(s) map into the shared LLM namespace but the LLM base "
                                 f"'{base.spec.source}' has no such tensor", not_in_base,
                                 "Fix the key map, or give them action: own with a rule (each model keeps its own)."))
    for name, canons in missing.items():
        problems.append(_listing(f"model '{name}' lacks {len(canons)} shared LLM tensor(s) that a rule merges", canons,
                                 "Keep them at base with a rule (action: keep), or give them action: own."))
    problems.extend(shapes[:_MAX_LISTED])
    if len(shapes) > _MAX_LISTED:
        problems.append(f"... and {len(shapes) - _MAX_LISTED} more shape mismatches")
    if bad_dtype:
        problems.append(_listing("only float tensors can be merged, but a merge rule matches", bad_dtype,
                                 "Keep them at base with a rule (action: keep)."))
    problems.extend(factor_problems[:_MAX_LISTED])
    return shared


def _factor_action(canon: str, holders: list[ModelInputs], shape: tuple[int, ...], problems: list[str]) -> str:
    """``factors`` when every model has a LoRA pair of one rank on ``canon``; ``merge`` when none has one."""
    targets = [(m, m.adapter.lora.targets.get(m.llm[canon]) if m.adapter and m.adapter.lora else None)
               for m in holders]
    present = [(m, t) for m, t in targets if t is not None]
    if not present:
        return "merge"
    ranks = {t.rank for _, t in present}
    if len(present) != len(targets) or len(ranks) != 1:
        have = ", ".join(f"'{m.name}': {'rank ' + str(t.rank) if t else 'no LoRA pair'}" for m, t in targets)
        problems.append(f"Tensor '{canon}': lora.merge: factors needs a LoRA pair of one rank in every model ({have}). "
                        "Use lora.merge: delta, or adapters that target the same modules with the same rank.")
        return "merge"
    return "factors"


def _pack_llm(shared: list[SharedTensor], shard_size: int) -> list[OutputShard]:
    """Whole layers per shard, up to ``shard_size`` (the unit a worker computes)."""
    groups: list[list[SharedTensor]] = []
    last = None
    for t in shared:
        key = layer_key(t.name)
        if groups and key == last:
            groups[-1].append(t)
        else:
            groups.append([t])
        last = key
    shards: list[list[SharedTensor]] = []
    size = 0
    for group in groups:
        nbytes = sum(t.out_bytes for t in group)
        if shards and size + nbytes <= shard_size:
            shards[-1].extend(group)
            size += nbytes
        else:
            shards.append(list(group))
            size = nbytes
    names = shard_filenames(len(shards))
    return [OutputShard(fn, tuple(OutputEntry(t.name, "llm", t.name, t.out_dtype, t.shape) for t in shard))
            for fn, shard in zip(names, shards)]


def _pack(entries: list[OutputEntry], shard_size: int) -> list[OutputShard]:
    by_name = {e.name: e for e in entries}
    sizes = [(e.name, _nbytes(e)) for e in entries]
    groups = plan_shards(sizes, shard_size)
    return [OutputShard(fn, tuple(by_name[n] for n in group)) for fn, group in zip(shard_filenames(len(groups)), groups)]


def _nbytes(e: OutputEntry) -> int:
    n = 1
    for s in e.shape:
        n *= s
    return n * DTYPES[e.dtype].itemsize


def _pack_own(m: ModelInputs, shard_size: int) -> list[OutputShard]:
    entries = []
    for name in sorted(m.own, key=natural_key):
        dtype, shape = m.own_info(name)
        entries.append(OutputEntry(name, "own", name, dtype, tuple(shape)))
    return _pack(entries, shard_size) if entries else []


def _pack_model(m: ModelInputs, shared: dict[str, SharedTensor], shard_size: int) -> list[OutputShard]:
    """The model's own checkpoint layout: every tensor under its own name, in natural order."""
    entries = []
    canon_of = {src: canon for canon, src in m.llm.items()}
    for name in sorted([*m.llm.values(), *m.own], key=natural_key):
        if name in canon_of:
            t = shared[canon_of[name]]
            entries.append(OutputEntry(name, "llm", t.name, t.out_dtype, t.shape))
        else:
            dtype, shape = m.own_info(name)
            entries.append(OutputEntry(name, "own", name, dtype, tuple(shape)))
    return _pack(entries, shard_size)


def _listing(head: str, names: list[str], fix: str) -> str:
    shown = ", ".join(n if n.startswith("'") else f"'{n}'" for n in names[:_MAX_LISTED])
    more = f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return f"{head}: {shown}{more}. {fix}"


def _join(problems: list[str]) -> str:
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems with the modality merge inputs:\n" + "\n".join(f"  - {p}" for p in problems)
