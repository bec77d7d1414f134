"""Running ShardJobs: read → task vectors in float32 → method → cast → write, one shard per job.

``run_shard_job`` is the one function every executor runs (local threads here, Ray actors in
``omnimerge.cluster``): it reads its inputs straight from storage (mmap), writes its shard under a temporary
name in the staging directory, renames it into place and records its size and sha256, so a rerun can skip
it. Only the job spec and a small :class:`ShardResult` cross process boundaries.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from omnimerge.algorithms.base import Delta, LowRank, MergeContext
from omnimerge.algorithms.registry import get_method

from .errors import NonFiniteError, ShardJobError
from .plan import Plan, ShardJob, TensorTask
from .safetensors_io import DTYPES, ShardWriter, TensorReader
from .sources import ResolvedSource

__all__ = ["JobContext", "ShardResult", "run_shard_job", "LocalExecutor", "run_prepasses", "choose_device",
           "record_path", "ProgressFn"]

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, int], None]  # (event, bytes): "tensor" after each tensor, "job" after each job


@dataclass
class JobContext:
    """Everything a worker needs besides the job: picklable (paths and parsed headers, no open files)."""

    base: ResolvedSource
    experts: list[ResolvedSource]
    weights: list[float]
    seed: int
    staging: Path
    recipe_label: str
    model_stats: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    max_batch_bytes: int = 1 << 30  # inputs of one batched call of a method (same-shape tensors stacked)
    # Fault injection for recovery tests: "<tensor>:<marker file>" makes the process that reaches <tensor>
    # die (os._exit) if the marker does not exist yet, creating it first — so exactly one attempt dies.
    fault: str | None = None

    @property
    def expert_ids(self) -> tuple[str, ...]:
        return tuple(f"{e.label}@{e.fingerprint()[:16]}" for e in self.experts)


@dataclass
class ShardResult:
    """What a finished job reports back (small: crosses the object store)."""

    filename: str
    size: int
    sha256: str
    tensors: list[str]
    bytes_read: int
    seconds: float
    worker: str = ""
    device: str = "cpu"
    skipped: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def record_path(staging: Path, filename: str) -> Path:
    return staging / ".records" / f"{filename}.json"


def choose_device(requested: str = "auto") -> str:
    """``auto`` → ``cuda`` when a GPU is visible to this process, else ``cpu``."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        log.warning("device %s requested but CUDA is not available here; using cpu", requested)
        return "cpu"
    return requested


class _Inputs:
    """Lazily opened readers for one job (opened in the process that runs it)."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self.base = TensorReader(ctx.base.index)
        self._experts: dict[int, TensorReader] = {}
        self.bytes_read = 0

    def reader(self, i: int) -> TensorReader:
        if i not in self._experts:
            self._experts[i] = TensorReader(self.ctx.experts[i].index)
        return self._experts[i]

    def base_tensor(self, name: str) -> torch.Tensor:
        t = self.base.read(name)
        self.bytes_read += t.numel() * t.element_size()
        return t

    def deltas(self, task: TensorTask, base32: torch.Tensor, want_lowrank: bool) -> list[Delta]:
        out: list[Delta] = []
        for i, expert in enumerate(self.ctx.experts):
            if expert.kind == "model":
                t = self.reader(i).read(task.name)
                self.bytes_read += t.numel() * t.element_size()
                t32 = t.to(self.ctx.device, torch.float32)
                _check_finite(t32, task.name, f"expert '{expert.label}' ({expert.spec.source})")
                out.append(t32 - base32)
                continue
            adapter = expert.lora
            if task.name in adapter.replacements:
                t = self.reader(i).read(adapter.replacements[task.name])
                self.bytes_read += t.numel() * t.element_size()
                t32 = t.to(self.ctx.device, torch.float32)
                _check_finite(t32, task.name, f"expert '{expert.label}' ({expert.spec.source}, modules_to_save)")
                out.append(t32 - base32)
            elif task.name in adapter.targets:
                lr = adapter.delta(task.name, self.reader(i)).to(self.ctx.device)
                self.bytes_read += (lr.A.numel() + lr.B.numel()) * lr.A.element_size()
                _check_finite(lr.A, task.name, f"LoRA expert '{expert.label}' (lora_A)")
                _check_finite(lr.B, task.name, f"LoRA expert '{expert.label}' (lora_B)")
                out.append(lr if want_lowrank else lr.dense())
            else:
                out.append(torch.zeros_like(base32))
        return out

    def close(self) -> None:
        self.base.close()
        for r in self._experts.values():
            r.close()


def _maybe_die(fault: str, tensor: str) -> None:
    target, _, marker = fault.partition(":")
    if target == tensor and marker and not os.path.exists(marker):
        Path(marker).write_text(f"killed pid {os.getpid()} at {tensor}\n")
        os._exit(17)  # real process death mid-shard, for the recovery tests


def _check_finite(t: torch.Tensor, name: str, where: str) -> None:
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise NonFiniteError(
            f"Tensor '{name}' of {where} holds {bad} non-finite value(s) (NaN/Inf). A merge of it would be "
            f"meaningless; repair or drop that checkpoint, or keep '{name}' at base with a rule.")


def _cast(t: torch.Tensor, dtype: str) -> torch.Tensor:
    return t.to(DTYPES[dtype].torch).contiguous().cpu() if t.dtype != DTYPES[dtype].torch or t.device.type != "cpu" \
        else t.contiguous()


def _merge_one(task: TensorTask, inputs: _Inputs, ctx: JobContext) -> torch.Tensor:
    spec = get_method(task.method)
    base32 = inputs.base_tensor(task.name).to(ctx.device, torch.float32)
    _check_finite(base32, task.name, f"base ({ctx.base.spec.source})")
    deltas = inputs.deltas(task, base32, spec.accepts_lowrank)
    mctx = MergeContext(tensor_name=task.name, seed=ctx.seed, expert_ids=ctx.expert_ids,
                        model_stats=ctx.model_stats)
    out = spec.fn(base32, deltas, ctx=mctx, weights=ctx.weights, **task.param_dict())
    if tuple(out.shape) != task.shape:
        raise ShardJobError(f"method '{task.method}' returned shape {list(out.shape)} for tensor '{task.name}' "
                            f"of shape {list(task.shape)} (a bug in the method)")
    return out


def _merge_batch(tasks: list[TensorTask], inputs: _Inputs, ctx: JobContext) -> list[torch.Tensor]:
    spec = get_method(tasks[0].method)
    bases, per_task = [], []
    for task in tasks:
        b = inputs.base_tensor(task.name).to(ctx.device, torch.float32)
        _check_finite(b, task.name, f"base ({ctx.base.spec.source})")
        bases.append(b)
        per_task.append(inputs.deltas(task, b, False))
    stacked_deltas = [torch.stack([d[i] for d in per_task]) for i in range(len(ctx.experts))]
    ctxs = [MergeContext(tensor_name=t.name, seed=ctx.seed, expert_ids=ctx.expert_ids,
                         model_stats=ctx.model_stats) for t in tasks]
    out = spec.batched(torch.stack(bases), stacked_deltas, ctxs=ctxs, weights=ctx.weights, **tasks[0].param_dict())
    return list(out.unbind(0))


def _batches(job: ShardJob, ctx: JobContext) -> dict[str, list[TensorTask]]:
    """Same-method, same-parameter, same-shape merges of a job that a method can run stacked, keyed by the
    name of their first member (whose turn triggers the batch). Deterministic: depends on the job only."""
    groups: dict[tuple, list[TensorTask]] = {}
    for task in job.tensors:
        if task.action != "merge" or get_method(task.method).batched is None:
            continue
        groups.setdefault((task.method, task.params, task.shape), []).append(task)
    out: dict[str, list[TensorTask]] = {}
    per_input = len(ctx.experts) + 1
    for members in groups.values():
        step = max(1, ctx.max_batch_bytes // max(1, members[0].numel * 4 * per_input))
        for i in range(0, len(members), step):
            chunk = members[i:i + step]
            if len(chunk) > 1:
                out[chunk[0].name] = chunk
    return out


def run_shard_job(job: ShardJob, ctx: JobContext, progress: ProgressFn | None = None) -> ShardResult:
    """Merge one ShardJob into ``ctx.staging/job.filename`` and record it. Idempotent: a rerun rewrites the
    same bytes under a fresh temporary name, then renames."""
    start = time.perf_counter()
    ctx.staging.mkdir(parents=True, exist_ok=True)
    final = ctx.staging / job.filename
    tmp = ctx.staging / f".{job.filename}.{uuid.uuid4().hex[:8]}.tmp"
    entries = [(t.name, t.out_dtype, t.shape) for t in job.tensors]
    inputs = _Inputs(ctx)
    batches = _batches(job, ctx)
    ready: dict[str, torch.Tensor] = {}
    current = ""
    try:
        writer = ShardWriter(tmp, entries, metadata={"format": "pt"})
        with torch.no_grad():
            for task in job.tensors:
                current = task.name
                if ctx.fault:
                    _maybe_die(ctx.fault, task.name)
                if task.name in ready:
                    out = ready.pop(task.name)
                elif task.action == "keep":
                    out = _cast(inputs.base_tensor(task.name), task.out_dtype)
                elif task.name in batches:
                    members = batches[task.name]
                    results = _merge_batch(members, inputs, ctx)
                    for member, res in zip(members[1:], results[1:]):
                        ready[member.name] = _cast(res, member.out_dtype)
                    out = _cast(results[0], task.out_dtype)
                else:
                    out = _cast(_merge_one(task, inputs, ctx), task.out_dtype)
                writer.write(task.name, out)
                if progress:
                    progress("tensor", task.out_bytes)
        size, sha = writer.close()
        os.replace(tmp, final)
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, (NonFiniteError, ShardJobError)):
            raise
        raise ShardJobError(
            f"Shard '{job.filename}' failed at tensor '{current}' (recipe {ctx.recipe_label}): "
            f"{type(exc).__name__}: {exc}") from exc
    finally:
        inputs.close()
    result = ShardResult(job.filename, size, sha, [t.name for t in job.tensors], inputs.bytes_read,
                         time.perf_counter() - start, worker=f"pid{os.getpid()}", device=ctx.device)
    rec = record_path(ctx.staging, job.filename)
    rec.parent.mkdir(parents=True, exist_ok=True)
    rec_tmp = rec.with_suffix(f".{uuid.uuid4().hex[:8]}.tmp")
    rec_tmp.write_text(json.dumps(result.to_json()))
    os.replace(rec_tmp, rec)
    if progress:
        progress("job", size)
    return result


def run_prepasses(plan: Plan, ctx: JobContext, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Compute every model-wide statistic the plan needs (streaming, one tensor and one expert at a time).

    Returns ``model_stats`` for :class:`MergeContext`: ``{stat_key: {expert_id: value}}``. With several
    prepasses of the same statistic (different parameters) the later rule's values are keyed by
    ``(expert_id, params)`` as well.
    """
    stats: dict[str, Any] = {}
    if not plan.prepasses:
        return stats
    inputs = _Inputs(ctx)
    try:
        for need in plan.prepasses:
            spec = get_method(need.method)
            prepass = spec.prepass(dict(need.params))
            states = [prepass.new_state(dict(need.params)) for _ in ctx.experts]
            for p in range(prepass.passes):
                for name in need.tensors:
                    task = next(t for t in plan.tensors if t.name == name)
                    base32 = inputs.base_tensor(name).to(ctx.device, torch.float32)
                    for i, delta in enumerate(inputs.deltas(task, base32, False)):
                        prepass.update(states[i], p, delta)
                    if progress:
                        progress("prepass", task.numel * 4)
                for state in states:
                    prepass.end_pass(state, p)
            values = stats.setdefault(prepass.stat_key, {})
            for eid, state in zip(ctx.expert_ids, states):
                values[eid] = prepass.result(state)
                values[(eid, need.params)] = values[eid]
    finally:
        inputs.close()
    return stats


class LocalExecutor:
    """Runs ShardJobs on a thread pool in this process (torch releases the GIL in its kernels)."""

    name = "local"

    def __init__(self, workers: int = 1) -> None:
        self.workers = max(1, int(workers))

    def run(self, jobs: Sequence[ShardJob], ctx: JobContext, progress: ProgressFn | None = None,
            on_result: Callable[[ShardResult], None] | None = None) -> list[ShardResult]:
        results: list[ShardResult] = []
        if self.workers == 1:
            for job in jobs:
                res = run_shard_job(job, ctx, progress)
                results.append(res)
                if on_result:
                    on_result(res)
            return results
        with ThreadPoolExecutor(self.workers, thread_name_prefix="omnimerge-shard") as pool:
            pending: set[Future] = set()
            queue = list(jobs)
            while queue or pending:
                while queue and len(pending) < self.workers:
                    pending.add(pool.submit(run_shard_job, queue.pop(0), ctx, progress))
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    res = fut.result()  # re-raises the job's error (others still finish, then the pool closes)
                    results.append(res)
                    if on_result:
                        on_result(res)
        return results
