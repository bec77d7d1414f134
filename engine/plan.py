"""Plans: a pure function of the recipe and the checkpoint headers.

``plan_merge`` decides, before a byte of weights is read, what happens to every tensor (merge with which
method and parameters, keep at base, drop), which output shard it lands in, and what it costs: bytes read and
written, FLOPs of the optimising methods, and a peak-memory estimate per ShardJob. Problems (missing or
mismatched tensors, unmergeable dtypes, tensors no rule accounts for) are collected and raised together.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from omnimerge.algorithms.registry import get_method

from .errors import PlanError, TensorMismatchError
from .recipe import Recipe
from .safetensors_io import DTYPES, SUPPORTED_FLOAT
from .sources import ResolvedSource, resolve_source

__all__ = ["TensorTask", "ShardJob", "Plan", "PrepassNeed", "plan_merge", "resolve_recipe_sources",
           "layer_key", "natural_key"]

_MAX_LISTED = 8  # problems of one kind listed before "and N more"


@dataclass(frozen=True)
class TensorTask:
    """What happens to one output tensor."""

    name: str
    action: str  # "merge" | "keep"
    shape: tuple[int, ...]
    in_dtype: str  # the base's safetensors dtype
    out_dtype: str
    method: str | None = None  # the method actually applied (a 2-D-only method's fallback for other ranks)
    params: tuple[tuple[str, Any], ...] = ()  # resolved, defaults filled in
    rule: str = ""  # which rule decided it (for `plan` output)
    requested: str | None = None  # the method the rule asked for, when a fallback is applied

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def out_bytes(self) -> int:
        return self.numel * DTYPES[self.out_dtype].itemsize

    def param_dict(self) -> dict[str, Any]:
        return dict(self.params)


@dataclass(frozen=True)
class ShardJob:
    """The unit of distribution: a group of whole layers whose outputs fill one output shard."""

    index: int
    filename: str
    tensors: tuple[TensorTask, ...]
    read_bytes: int  # base + every expert's inputs of these tensors
    write_bytes: int
    peak_bytes: int  # estimated working memory (float32 inputs, outputs, method workspace)
    flops: float  # estimated FLOPs of the merge math

    @property
    def job_id(self) -> str:
        return self.filename


@dataclass(frozen=True)
class PrepassNeed:
    """A streaming statistic over the whole model that a method needs before merging (e.g. TIES scope: model)."""

    method: str
    params: tuple[tuple[str, Any], ...]
    tensors: tuple[str, ...]
    read_bytes: int


@dataclass
class Plan:
    recipe: Recipe
    base: ResolvedSource
    experts: list[ResolvedSource]
    jobs: list[ShardJob]
    dropped: list[tuple[str, str]]  # (tensor name, rule)
    prepasses: list[PrepassNeed] = field(default_factory=list)

    @property
    def tensors(self) -> list[TensorTask]:
        return [t for job in self.jobs for t in job.tensors]

    @property
    def read_bytes(self) -> int:
        return sum(j.read_bytes for j in self.jobs) + sum(p.read_bytes for p in self.prepasses)

    @property
    def write_bytes(self) -> int:
        return sum(j.write_bytes for j in self.jobs)

    @property
    def peak_bytes(self) -> int:
        return max((j.peak_bytes for j in self.jobs), default=0)

    @property
    def flops(self) -> float:
        return sum(j.flops for j in self.jobs)

    def digest(self) -> str:
        """Identity of the plan's output: recipe + input fingerprints + layout (resume refuses a different one)."""
        doc = {
            "recipe": self.recipe.digest(),
            "inputs": [self.base.fingerprint()] + [e.fingerprint() for e in self.experts],
            "jobs": [[j.filename, [(t.name, t.action, t.method, t.params, t.out_dtype) for t in j.tensors]]
                     for j in self.jobs],
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


_NUM_RE = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple:
    """Sort key that orders ``layers.2`` before ``layers.10``."""
    return tuple(int(p) if p.isdigit() else p for p in _NUM_RE.split(name))


_LAYER_RE = re.compile(r"^(.*?\.\d+)\.")


def layer_key(name: str) -> str:
    """The layer a tensor belongs to: its name up to the first numeric component (``model.layers.3``), or its
    first component for tensors outside numbered layers (``lm_head``, ``model``)."""
    m = _LAYER_RE.match(name)
    if m:
        return m.group(1)
    return name.split(".", 1)[0] if "." in name else name


def resolve_recipe_sources(recipe: Recipe, *, cache_dir: str | None = None) -> tuple[ResolvedSource, list[ResolvedSource]]:
    """Resolve the base and every expert (headers only; hub sources are fetched into the local cache)."""
    base = resolve_source(recipe.base, label="base", allow_pickle=recipe.allow_pickle, cache_dir=cache_dir)
    experts = [resolve_source(e.source, label=e.name, allow_pickle=recipe.allow_pickle, base=base,
                              cache_dir=cache_dir) for e in recipe.experts]
    return base, experts


def plan_merge(recipe: Recipe, base: ResolvedSource | None = None,
               experts: list[ResolvedSource] | None = None) -> Plan:
    """Make the plan. Raises ``TensorMismatchError``/``PlanError`` listing every problem found."""
    if base is None or experts is None:
        base, experts = resolve_recipe_sources(recipe)
    n = len(experts)
    problems: list[str] = []
    tasks: list[TensorTask] = []
    dropped: list[tuple[str, str]] = []
    missing: dict[str, list[str]] = {}
    mismatched: list[str] = []
    bad_dtype: list[str] = []
    prepass_tensors: dict[tuple, list[str]] = {}

    base_names = sorted(base.index.names(), key=natural_key)
    for name in base_names:
        info = base.index[name]
        rule = recipe.rule_for(name, len(info.shape))
        if rule.action == "drop":
            dropped.append((name, rule.describe()))
            continue
        float_in = info.dtype in SUPPORTED_FLOAT
        out_dtype = recipe.dtype if (recipe.dtype and float_in) else info.dtype
        if rule.action == "keep":
            tasks.append(TensorTask(name, "keep", info.shape, info.dtype, out_dtype, rule=rule.describe()))
            continue
        # merge
        if not float_in:
            bad_dtype.append(f"'{name}' is {info.dtype} in base '{base.spec.source}'")
            continue
        for expert in experts:
            problem = _expert_tensor_problem(expert, name, info.shape, base)
            if problem == "missing":
                missing.setdefault(expert.label, []).append(name)
            elif problem:
                mismatched.append(problem)
        requested, params = recipe.method_of(rule)
        spec = get_method(requested)
        method = requested
        if not spec.handles_shape(info.shape):
            method = spec.fallback or "weight_average"
            resolved = get_method(method).resolve({})
        else:
            resolved = spec.resolve(params)
            pre = spec.prepass(resolved) if spec.prepass else None
            if pre is not None:
                key = (method, tuple(sorted(resolved.items())))
                prepass_tensors.setdefault(key, []).append(name)
        tasks.append(TensorTask(name, "merge", info.shape, info.dtype, out_dtype, method,
                                tuple(sorted(resolved.items())), rule.describe(),
                                requested if method != requested else None))

    # Tensors an expert has that the base lacks: an error unless a rule drops them on purpose.
    base_set = set(base_names)
    for expert in experts:
        if expert.kind != "model":
            continue
        extra = [nm for nm in expert.index.names() if nm not in base_set]
        extra = [nm for nm in extra if recipe.rule_for(nm, len(expert.index[nm].shape)).action != "drop"]
        if extra:
            problems.append(_listing(
                f"expert '{expert.label}' has {len(extra)} tensor(s) the base '{base.spec.source}' lacks", extra,
                "Experts must share the base's tensor names; drop these with a rule (action: drop) or use the "
                "right base."))
    for label, names in missing.items():
        problems.append(_listing(
            f"expert '{label}' lacks {len(names)} tensor(s) that a rule merges", names,
            "Keep these tensors at base with a rule (action: keep) or drop the expert."))
    problems += mismatched[:_MAX_LISTED] + ([f"... and {len(mismatched) - _MAX_LISTED} more shape mismatches"]
                                            if len(mismatched) > _MAX_LISTED else [])
    if bad_dtype:
        problems.append(_listing("only float tensors can be merged, but a merge rule matches", bad_dtype,
                                 "Keep them at base with a rule (action: keep)."))
    if problems:
        raise TensorMismatchError(_join(problems))

    jobs = _pack_jobs(tasks, recipe, n, base, experts)
    prepasses = [PrepassNeed(m, p, tuple(names), _read_bytes(names, base, experts, base_too=True))
                 for (m, p), names in prepass_tensors.items()]
    if not jobs:
        raise PlanError(f"Nothing to write: every tensor of base '{base.spec.source}' was dropped by a rule.")
    return Plan(recipe, base, experts, jobs, dropped, prepasses)


def _expert_tensor_problem(expert: ResolvedSource, name: str, shape: tuple[int, ...],
                           base: ResolvedSource) -> str | None:
    if expert.kind != "model":
        return None  # LoRA adapters were checked against the base when resolved
    if name not in expert.index:
        return "missing"
    eshape = expert.index[name].shape
    if tuple(eshape) != tuple(shape):
        return (f"Tensor '{name}' is {list(eshape)} in expert '{expert.label}' but {list(shape)} in base "
                f"'{base.spec.source}'. Experts must share the base's shapes; keep this tensor at base with a "
                f"rule, or drop the expert.")
    if expert.index[name].dtype not in SUPPORTED_FLOAT:
        return (f"Tensor '{name}' is {expert.index[name].dtype} in expert '{expert.label}'; only float tensors "
                f"can be merged. Keep it at base with a rule.")
    return None


def _listing(head: str, names: list[str], fix: str) -> str:
    shown = ", ".join(f"'{x}'" if not x.startswith("'") else x for x in names[:_MAX_LISTED])
    more = f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return f"{head}: {shown}{more}. {fix}"


def _join(problems: list[str]) -> str:
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems with the inputs:\n" + "\n".join(f"  - {p}" for p in problems)


def _read_bytes(names: Iterable[str], base: ResolvedSource, experts: list[ResolvedSource], *,
                base_too: bool) -> int:
    total = 0
    for name in names:
        if base_too:
            total += base.index[name].nbytes
        for expert in experts:
            total += _expert_bytes(expert, name)
    return total


def _expert_bytes(expert: ResolvedSource, name: str) -> int:
    """Bytes read from ``expert`` for tensor ``name``: the tensor, a LoRA pair of factors, or nothing."""
    if expert.kind == "model":
        return expert.index[name].nbytes if name in expert.index else 0
    adapter = expert.lora
    if name in adapter.replacements:
        return expert.index[adapter.replacements[name]].nbytes
    if name in adapter.targets:
        target = adapter.targets[name]
        return expert.index[target.a_name].nbytes + expert.index[target.b_name].nbytes
    return 0


def _task_cost(task: TensorTask, n: int, *, streamed: bool = False) -> tuple[int, float]:
    """(peak working bytes, FLOPs) of one tensor's merge, float32 (an estimate for plans and scheduling).
    ``streamed``: the engine runs it in row blocks (engine.row_stream), so it needs at most a block's memory."""
    if streamed:
        from .row_stream import block_peak_bytes

        peak, flops = _task_cost(task, n)
        return min(peak, block_peak_bytes(n)), flops
    if task.action == "keep":
        return task.numel * 4 + task.out_bytes, 0.0
    numel = task.numel
    extra = 0  # float32 elements beyond base + N deltas + output
    flops = float(numel * n * 4)
    method = task.method or ""
    if method in ("wudi", "optmerge") and len(task.shape) == 2:
        rows, cols = task.shape
        params = dict(task.params)
        steps = int(params.get("steps") or 300)
        k = max(1, min(rows, cols) // max(n, 1)) if method == "optmerge" else min(rows, cols)
        # Each step is one product with the Gram S (cols×cols) or the factored W (cols × N·k), whichever is
        # cheaper (ALGORITHMS.md); the SVDs of optmerge's projectors come first.
        per_step = min(2.0 * rows * cols * cols, 4.0 * rows * cols * n * k)
        flops += steps * per_step + (n * 4.0 * rows * cols * min(rows, cols) if method == "optmerge" else 0.0)
        # T, Adam moments, R; optmerge also holds each expert's truncated target and SVD factors.
        extra = 4 * numel + 2 * cols * cols + (2 * n * numel if method == "optmerge" else 0)
    elif method in ("tsv", "iso_c", "iso_cts") and len(task.shape) == 2:
        rows, cols = task.shape
        extra = (n + 3) * numel  # per-expert SVD factors, concatenations, orthogonalisation
        flops += n * 4.0 * rows * cols * min(rows, cols)
    return (n + 3) * numel * 4 + extra * 4 + task.out_bytes, flops


def _streams(task: TensorTask, experts: list[ResolvedSource]) -> bool:
    """Whether a lone merge runs ``task`` in row blocks: it is kept, or merged by a streaming method and no
    expert holds it as LoRA factors (see engine.row_stream)."""
    from .row_stream import stream_mode

    if stream_mode([task]) is None:
        return False
    return task.action == "keep" or not any(
        e.kind != "model" and task.name in e.lora.targets and task.name not in e.lora.replacements for e in experts)


def _pack_jobs(tasks: list[TensorTask], recipe: Recipe, n: int, base: ResolvedSource,
               experts: list[ResolvedSource]) -> list[ShardJob]:
    # Group by layer (in natural order), then fill shards with whole groups up to shard_size.
    groups: list[list[TensorTask]] = []
    keys: list[str] = []
    for task in tasks:
        key = layer_key(task.name)
        if keys and keys[-1] == key:
            groups[-1].append(task)
        else:
            keys.append(key)
            groups.append([task])
    shards: list[list[TensorTask]] = []
    size = 0
    for group in groups:
        gbytes = sum(t.out_bytes for t in group)
        if shards and size + gbytes <= recipe.shard_size:
            shards[-1].extend(group)
            size += gbytes
        else:
            shards.append(list(group))
            size = gbytes
    total = len(shards)
    jobs = []
    for i, shard in enumerate(shards):
        filename = "model.safetensors" if total == 1 else f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        costs = [_task_cost(t, n, streamed=_streams(t, experts)) for t in shard]
        merged = [t.name for t in shard if t.action == "merge"]
        read = sum(base.index[t.name].nbytes for t in shard) + _read_bytes(merged, base, experts, base_too=False)
        jobs.append(ShardJob(i, filename, tuple(shard), read, sum(t.out_bytes for t in shard),
                             max(c[0] for c in costs), sum(c[1] for c in costs)))
    return jobs
