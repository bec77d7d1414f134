"""One pass over a shard's tensors for one or many runs: read once, build task vectors once, merge per run.

This is the inner loop every ShardJob runs. A single merge is the one-run case (``run_shard_job``); a sweep
job (:mod:`omnimerge.engine.sweep_job`) hands it every run of a sweep that shares the shard layout. Per
tensor, in the shard's order:

1. :class:`SharedInputs` reads the base tensor and, on first demand, each pool expert's input, and builds
   the float32 task vector τᵢ = θᵢ − θ₀ once (a LoRA expert's factors stay a :class:`LowRank`; its dense
   product is built once too). Every run that merges the tensor gets the same objects.
2. Each run (a :class:`RunSlot`) applies its own rule: keep at base, or its method on the deltas of *its*
   experts in *its* order, with exactly the calls a lone merge makes (same batching of same-shape tensors
   for methods with a batched form), then casts and appends to its own shard file.
3. Methods share work through one memo per tensor (``MergeContext.memo``): per-expert SVDs, Gram matrices,
   the interference solution T. Keys carry the expert ids (expert name + source hash), never positions.
   Each run sees the memo through a namespace naming how its deltas arrive (single tensor or which batch;
   dense or LoRA factors), so a value is reused only where the lone merge would have computed the very
   same float32 operations on the very same inputs — outputs stay byte-identical to separate merges.
4. A tensor whose every run keeps it or merges it with a streaming method (task arithmetic, weight average,
   linear, …) goes through the same steps in row blocks instead (:mod:`~omnimerge.engine.row_stream`):
   the shared inputs, the memo and each run's output are then a block's, never the whole tensor's.
5. A whole tensor whose every run is element-wise (one-thread or streaming methods, or kept) has its runs
   computed two at a time (:data:`RUN_LANES`, :func:`_whole_tensor_lanes`), each on half the cores, with the
   memo computing each shared value once (:class:`_OnceMemo`), while this thread reads the next tensor's
   inputs. Each run still makes the calls it makes alone: same bytes.
6. A run that fails (a non-finite input of one of its experts, a method error) loses only its own shard
   file; the other runs go on. Inputs of a tensor are dropped after its turn; inputs a batched run read
   ahead for later members stay until those members' turn.

Memory of one pass (whole-tensor path; a streamed tensor holds a block's worth instead): the shared inputs
of one tensor (base + the deltas of the experts the runs use, i.e. bounded by the pool, not by the number of
runs; with lanes, the next tensor's too) + one method's workspace at a time (two with lanes) + the memo of one
tensor + the cast outputs batched runs hold for later members of their batch (grows with batched runs).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import MutableMapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from omnimerge.algorithms.base import Delta, LowRank, MergeContext
from omnimerge.algorithms.chunks import cast_chunked
from omnimerge.algorithms.registry import get_method

from .errors import NonFiniteError, ShardJobError
from .plan import ShardJob, TensorTask
from . import row_stream
from .row_stream import BlockInputs, BlockReader, _Buffers, merge_block, one_intra_op_thread, row_blocks, stream_mode
from .safetensors_io import DTYPES, ShardWriter, TensorReader
from .sources import ResolvedSource
from .staging_claim import check_staging_claim, temp_shard_name

__all__ = ["SharedInputs", "RunSlot", "SlotOutcome", "ShardResult", "run_slots", "plan_batches", "record_path",
           "write_record", "ProgressFn"]

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, int], None]  # (event, bytes): "tensor" after each tensor, "job" after each job


@dataclass
class ShardResult:
    """What a finished job reports back for one output shard (small: crosses the object store)."""

    filename: str
    size: int
    sha256: str
    tensors: list[str]
    bytes_read: int
    seconds: float
    worker: str = ""
    device: str = "cpu"
    skipped: bool = False
    plan_digest: str = ""  # the plan it was computed for (engine.staging_claim); resume/commit accept only their own

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def record_path(staging: Path, filename: str) -> Path:
    """Where the verified record of shard ``filename`` lives in a staging directory."""
    return staging / ".records" / f"{filename}.json"


def write_record(staging: Path, result: ShardResult) -> None:
    """Record a finished shard (atomically), so a rerun can verify and skip it."""
    rec = record_path(staging, result.filename)
    rec.parent.mkdir(parents=True, exist_ok=True)
    tmp = rec.with_suffix(f".{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(result.to_json()))
    os.replace(tmp, rec)


def check_finite(t: torch.Tensor, name: str, where: str) -> None:
    """Raise :class:`NonFiniteError` naming the tensor and its origin when ``t`` holds NaN or Inf."""
    # One reduction first: a NaN or Inf anywhere makes the sum non-finite, so a finite sum proves the tensor
    # clean at a tenth of the cost of an element-wise mask. Only a non-finite sum (a real NaN/Inf, or a float32
    # overflow of finite values) pays for the exact check.
    if bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all()):
        return
    bad = int((~torch.isfinite(t)).sum())
    raise NonFiniteError(
        f"Tensor '{name}' of {where} holds {bad} non-finite value(s) (NaN/Inf). A merge of it would be "
        f"meaningless; repair or drop that checkpoint, or keep '{name}' at base with a rule.")


def cast(t: torch.Tensor, dtype: str, threads: int = 1) -> torch.Tensor:
    """``t`` in the storage dtype, contiguous, on the CPU (no copy when it already is); a large CPU tensor is
    converted chunk by chunk on ``threads`` threads."""
    want = DTYPES[dtype].torch
    if t.dtype != want and t.device.type == "cpu":
        return cast_chunked(t, want, threads=threads)
    if t.dtype != want or t.device.type != "cpu":
        return t.to(want).contiguous().cpu()
    return t.contiguous()


class SharedInputs:
    """Readers over the base and a pool of experts, with a per-tensor cache of base and task vectors.

    Opened lazily in the process that runs the job. ``bytes_read`` counts bytes actually read from storage.
    """

    def __init__(self, base: ResolvedSource, pool: Sequence[ResolvedSource], device: str = "cpu") -> None:
        self.base_source = base
        self.pool = list(pool)
        self.device = device
        self.bytes_read = 0
        self.seconds = 0.0  # spent reading and building task vectors
        self._base_reader: TensorReader | None = None
        self._readers: dict[int, TensorReader] = {}
        self._raw: dict[str, torch.Tensor] = {}
        self._base32: dict[str, torch.Tensor] = {}
        self._deltas: dict[tuple[str, int], Delta] = {}
        self._dense: dict[tuple[str, int], torch.Tensor] = {}
        self.reader_pool: ThreadPoolExecutor | None = None  # reads the next block while this one converts
        self._lane_buffers: list[_Buffers] = []  # reused float32 buffers of the streamed path, one set per lane

    def buffers(self, lane: int) -> _Buffers:
        """The streamed path's reused buffers of compute lane ``lane`` (blocks computed at once need their own)."""
        while len(self._lane_buffers) <= lane:
            self._lane_buffers.append(_Buffers())
        return self._lane_buffers[lane]

    def _reader(self, i: int) -> TensorReader:
        if i not in self._readers:
            self._readers[i] = TensorReader(self.pool[i].index)
        return self._readers[i]

    def _count(self, t: torch.Tensor) -> None:
        self.bytes_read += t.numel() * t.element_size()

    def base_raw(self, name: str) -> torch.Tensor:
        """The base tensor as stored (kept tensors are cast from this)."""
        if name not in self._raw:
            t0 = time.perf_counter()
            if self._base_reader is None:
                self._base_reader = TensorReader(self.base_source.index)
            t = self._base_reader.read(name)
            self._count(t)
            self._raw[name] = t
            self.seconds += time.perf_counter() - t0
        return self._raw[name]

    def base32(self, name: str) -> torch.Tensor:
        """θ₀ in float32 on the device, checked finite."""
        if name not in self._base32:
            t0 = time.perf_counter()
            where = f"base ({self.base_source.spec.source})"
            if name in self._raw or self.device != "cpu":
                b = self.base_raw(name).to(self.device, torch.float32)
                check_finite(b, name, where)
            else:
                reader, stored = self.source_of(name, "base")  # type: ignore[misc]
                b, finite = self._read32(reader, stored)
                if not finite:
                    self._raise_non_finite(reader, stored, name, where)
            self._base32[name] = b
            self.seconds += time.perf_counter() - t0
        return self._base32[name]

    def _read32(self, reader: TensorReader, stored: str, minus: torch.Tensor | None = None) -> tuple[torch.Tensor, bool]:
        """A stored tensor in float32 (minus ``minus``, same shape, when given) and whether its sum is finite,
        read and converted block of rows by block (the next block read on the reader thread): each value
        converted, then subtracted, exactly as a whole-tensor ``to(float32).sub_`` does, without holding the
        stored copy or a second pass over memory."""
        info = reader.index[stored]
        shape = tuple(info.shape)
        blocks = row_blocks(shape, "elements", row_stream.BLOCK_ELEMENTS)
        if len(shape) == 0 or len(blocks) == 1:
            t = reader.read(stored)
            self._count(t)
            out = t.to(torch.float32)
            if minus is not None:
                out.sub_(minus)
            return out, math.isfinite(out.sum().item())
        out = torch.empty(shape, dtype=torch.float32)
        finite = True
        block_reader = BlockReader({"x": (reader, stored)}, blocks, self.reader_pool)
        try:
            for start, stop, raw in block_reader:
                rows = raw["x"]
                self._count(rows)  # type: ignore[arg-type]
                o = out[start:stop]
                o.copy_(rows)  # type: ignore[arg-type]
                if minus is not None:
                    o.sub_(minus[start:stop])
                finite = finite and math.isfinite(o.sum().item())
        finally:
            block_reader.close()
        return out, finite

    def _raise_non_finite(self, reader: TensorReader, stored: str, name: str, where: str) -> None:
        """Raise :class:`NonFiniteError` when the stored tensor holds NaN/Inf (counted over the whole tensor)."""
        bad = row_stream._count_non_finite(reader, stored)
        if bad:
            raise NonFiniteError(row_stream.non_finite_message(name, where, bad))

    def delta(self, name: str, i: int, *, lowrank: bool) -> Delta:
        """Task vector of pool expert ``i`` for tensor ``name``: a LoRA expert's factors when ``lowrank``
        (and the expert targets the tensor), else the dense float32 τᵢ."""
        key = (name, i)
        if key not in self._deltas:
            base32 = self.base32(name)
            t0 = time.perf_counter()
            self._deltas[key] = self._build(name, i, base32)
            self.seconds += time.perf_counter() - t0
        d = self._deltas[key]
        if not isinstance(d, LowRank) or lowrank:
            return d
        if key not in self._dense:
            t0 = time.perf_counter()
            self._dense[key] = d.dense()
            self.seconds += time.perf_counter() - t0
        return self._dense[key]

    def _build(self, name: str, i: int, base32: torch.Tensor) -> Delta:
        expert = self.pool[i]
        source = self.source_of(name, i)
        if source is not None:
            # θ₀ is finite (checked), so a non-finite τᵢ means a NaN/Inf in θᵢ or an overflow of finite values;
            # one sum tells, and only then is θᵢ itself checked.
            if self.device == "cpu":
                d, finite = self._read32(source[0], source[1], base32)
                if not (finite or bool(torch.isfinite(d).all())):
                    self._raise_non_finite(source[0], source[1], name, self.where(name, i))
                return d
            t = source[0].read(source[1])
            self._count(t)
            d = t.to(self.device, torch.float32).sub_(base32)
            if not (bool(torch.isfinite(d.sum())) or bool(torch.isfinite(d).all())):
                check_finite(t, name, self.where(name, i))
            return d
        adapter = expert.lora
        if name in adapter.targets:
            lr = adapter.delta(name, self._reader(i)).to(self.device)
            self.bytes_read += (lr.A.numel() + lr.B.numel()) * lr.A.element_size()
            check_finite(lr.A, name, f"LoRA expert '{expert.label}' (lora_A)")
            check_finite(lr.B, name, f"LoRA expert '{expert.label}' (lora_B)")
            return lr
        return torch.zeros_like(base32)

    # -- row-block streaming (engine.row_stream) -------------------------------------------------------

    def is_factored(self, name: str, i: int) -> bool:
        """Whether pool expert ``i``'s task vector of ``name`` is a LoRA product B·A (it cannot stream)."""
        expert = self.pool[i]
        return expert.kind != "model" and name not in expert.lora.replacements and name in expert.lora.targets

    def source_of(self, name: str, key: int | str) -> tuple[TensorReader, str] | None:
        """``(reader, stored tensor name)`` of the base (``key == "base"``) or pool expert ``key`` for tensor
        ``name``; None for an expert whose task vector is zero there (a LoRA adapter not targeting it)."""
        if key == "base":
            if self._base_reader is None:
                self._base_reader = TensorReader(self.base_source.index)
            return self._base_reader, name
        expert = self.pool[key]  # type: ignore[index]
        if expert.kind == "model":
            return self._reader(key), name  # type: ignore[arg-type]
        if name in expert.lora.replacements:
            return self._reader(key), expert.lora.replacements[name]  # type: ignore[arg-type]
        return None

    def where(self, name: str, key: int | str) -> str:
        """How messages name the base or pool expert ``key`` as the origin of tensor ``name``."""
        if key == "base":
            return f"base ({self.base_source.spec.source})"
        expert = self.pool[key]  # type: ignore[index]
        if expert.kind != "model" and name in expert.lora.replacements:
            return f"expert '{expert.label}' ({expert.spec.source}, modules_to_save)"
        return f"expert '{expert.label}' ({expert.spec.source})"

    def release(self, name: str) -> None:
        """Forget every cached input of tensor ``name`` (after its turn)."""
        self._raw.pop(name, None)
        self._base32.pop(name, None)
        for i in range(len(self.pool)):
            self._deltas.pop((name, i), None)
            self._dense.pop((name, i), None)

    def close(self) -> None:
        if self._base_reader is not None:
            self._base_reader.close()
        for r in self._readers.values():
            r.close()
        self._raw.clear(), self._base32.clear(), self._deltas.clear(), self._dense.clear()


class _MemoView(MutableMapping):
    """A run's view of the shared per-tensor memo: its keys live under ``namespace`` (see module doc)."""

    def __init__(self, shared: dict, namespace: tuple) -> None:
        self.shared = shared
        self.namespace = namespace

    def __getitem__(self, key: Any) -> Any:
        return self.shared[(self.namespace, key)]

    def __setitem__(self, key: Any, value: Any) -> None:
        self.shared[(self.namespace, key)] = value

    def __delitem__(self, key: Any) -> None:
        del self.shared[(self.namespace, key)]

    def __contains__(self, key: object) -> bool:
        return (self.namespace, key) in self.shared

    def __iter__(self) -> Iterator[Any]:
        return (k for ns, k in self.shared if ns == self.namespace)

    def __len__(self) -> int:
        return sum(1 for ns, _ in self.shared if ns == self.namespace)

    def remember_once(self, key: Any, compute: Callable[[], Any]) -> Any:
        """``MergeContext.remember`` through the view: compute-once when the shared memo is a :class:`_OnceMemo`
        (runs on several lanes), else the plain look-up-or-compute."""
        full = (self.namespace, key)
        if isinstance(self.shared, _OnceMemo):
            return self.shared.remember_once(full, compute)
        if full not in self.shared:
            self.shared[full] = compute()
        return self.shared[full]


class _Busy(BaseException):
    """Raised inside a run on a lane when a value it needs is being computed by another lane (a
    BaseException, so a method's ``except Exception`` cannot swallow it). The run is put aside and tried
    again once ``event`` is set; methods are pure functions of their inputs and the memo, so a retry
    computes exactly what the first try would have."""

    def __init__(self, event: threading.Event) -> None:
        super().__init__("memo value in progress on another lane")
        self.event = event


class _OnceMemo(dict):
    """The per-tensor memo when a tensor's runs go on several lanes: each value is computed once, by the
    first lane that asks. Another lane asking meanwhile gets :class:`_Busy` when it asks from the top of its
    run (nothing computed yet: it can take another run instead), and waits when it asks from inside a value
    it is computing (a TIES direction needing an expert's histogram), so that work is not thrown away. The
    wait cannot deadlock: the lane computing the awaited value never needs the waiter's value, since values
    depend on each other without cycles (a cycle would recurse forever on one thread too).
    ``changed`` (the memo's lock) is notified whenever a value is finished or given up."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = threading.Condition()
        self._pending: dict[Any, threading.Event] = {}
        self._depth = threading.local()  # values this thread is computing, nested

    def remember_once(self, key: Any, compute: Callable[[], Any]) -> Any:
        while True:
            with self.changed:
                if key in self:
                    return self[key]
                event = self._pending.get(key)
                if event is None:
                    event = self._pending[key] = threading.Event()
                    break
            if not getattr(self._depth, "n", 0):
                raise _Busy(event)
            event.wait()  # inside a value of our own: wait for this one, then look again
        self._depth.n = getattr(self._depth, "n", 0) + 1
        try:
            value = compute()
            with self.changed:
                self[key] = value
            return value
        finally:
            self._depth.n -= 1
            with self.changed:
                del self._pending[key]
                event.set()
                self.changed.notify_all()


@dataclass
class RunSlot:
    """One run's share of a shard: its tasks, its experts (indices into the pool, in the run's order), and
    the staging directory its shard goes to. Picklable (no open files)."""

    run_id: str
    job: ShardJob
    experts: tuple[int, ...]
    weights: tuple[float, ...]
    expert_ids: tuple[str, ...]
    seed: int
    staging: Path
    label: str  # the recipe, for messages
    model_stats: dict[str, Any] = field(default_factory=dict)
    max_batch_bytes: int = 1 << 30
    plan_digest: str = ""  # set: the staging must claim this plan before the shard is opened and renamed


@dataclass
class SlotOutcome:
    """How one run's shard ended: a :class:`ShardResult`, or the error that lost it (with the tensor)."""

    run_id: str
    result: ShardResult | None = None
    error: BaseException | None = None
    tensor: str = ""

    @property
    def ok(self) -> bool:
        return self.result is not None


def plan_batches(job: ShardJob, n_experts: int, max_batch_bytes: int) -> dict[str, list[TensorTask]]:
    """Same-method, same-parameter, same-shape merges of a job that a method can run stacked, keyed by the
    name of their first member (whose turn triggers the batch). Deterministic: depends on the job, the
    number of experts and the byte cap only, so a sweep run batches exactly as its lone merge does."""
    groups: dict[tuple, list[TensorTask]] = {}
    for task in job.tensors:
        if task.action != "merge" or get_method(task.method).batched is None:
            continue
        groups.setdefault((task.method, task.params, task.shape), []).append(task)
    out: dict[str, list[TensorTask]] = {}
    per_input = n_experts + 1
    for members in groups.values():
        step = max(1, max_batch_bytes // max(1, members[0].numel * 4 * per_input))
        for i in range(0, len(members), step):
            chunk = members[i:i + step]
            if len(chunk) > 1:
                out[chunk[0].name] = chunk
    return out


class _Run:
    """Mutable state of one slot while the job runs."""

    def __init__(self, slot: RunSlot, device: str) -> None:
        self.slot = slot
        self.device = device
        self.tasks = {t.name: t for t in slot.job.tensors}
        self.batches = plan_batches(slot.job, len(slot.experts), slot.max_batch_bytes)
        self.lora = False  # any LoRA expert among the run's (set by run_slots, which knows the pool)
        self.ready: dict[str, torch.Tensor] = {}
        self.writer: ShardWriter | None = None
        self.tmp: Path | None = None
        self.error: BaseException | None = None
        self.failed_at = ""
        self.seconds = 0.0

    def open(self) -> None:
        s = self.slot
        if s.plan_digest:  # never (re)create a staging directory that is not this plan's
            check_staging_claim(s.staging, s.plan_digest, s.job.filename, s.label)
        else:
            s.staging.mkdir(parents=True, exist_ok=True)
        self.tmp = s.staging / temp_shard_name(s.job.filename, s.plan_digest, uuid.uuid4().hex[:8])
        entries = [(t.name, t.out_dtype, t.shape) for t in s.job.tensors]
        self.writer = ShardWriter(self.tmp, entries, metadata={"format": "pt"}, background=True)

    def fail(self, exc: BaseException, tensor: str) -> None:
        self.error, self.failed_at = exc, tensor
        self.ready.clear()
        if self.writer is not None:
            self.writer.abort()
        elif self.tmp is not None:
            self.tmp.unlink(missing_ok=True)

    def contexts(self, names: Sequence[str], memo: dict, namespace: tuple,
                 threads: int | None = None) -> list[MergeContext]:
        view = _MemoView(memo, namespace)
        threads = threads or row_stream.compute_threads()
        return [MergeContext(tensor_name=n, seed=self.slot.seed, expert_ids=self.slot.expert_ids, memo=view,
                             model_stats=self.slot.model_stats, threads=threads) for n in names]


def _merge_one(run: _Run, task: TensorTask, inputs: SharedInputs, memo: dict,
               threads: int | None = None) -> torch.Tensor:
    spec = get_method(task.method)
    base32 = inputs.base32(task.name)
    lowrank = spec.accepts_lowrank
    deltas = [inputs.delta(task.name, i, lowrank=lowrank) for i in run.slot.experts]
    (mctx,) = run.contexts([task.name], memo, ("single", lowrank and run.lora), threads)
    mctx.out_dtype = DTYPES[task.out_dtype].torch  # e.g. θ₀ + λ·τ_m comes back in bf16 (same bits as cast)
    out = spec.fn(base32, deltas, ctx=mctx, weights=list(run.slot.weights), **task.param_dict())
    if tuple(out.shape) != task.shape:
        raise ShardJobError(f"method '{task.method}' returned shape {list(out.shape)} for tensor '{task.name}' "
                            f"of shape {list(task.shape)} (a bug in the method)")
    return out


def _merge_batch(run: _Run, tasks: list[TensorTask], inputs: SharedInputs, memo: dict) -> list[torch.Tensor]:
    spec = get_method(tasks[0].method)
    bases = [inputs.base32(t.name) for t in tasks]
    per_task = [[inputs.delta(t.name, i, lowrank=False) for i in run.slot.experts] for t in tasks]
    stacked = [torch.stack([d[j] for d in per_task]) for j in range(len(run.slot.experts))]
    names = [t.name for t in tasks]
    ctxs = run.contexts(names, memo, ("batch", tuple(names)))
    out = spec.batched(torch.stack(bases), stacked, ctxs=ctxs, weights=list(run.slot.weights),
                       **tasks[0].param_dict())
    return list(out.unbind(0))


def _output(run: _Run, task: TensorTask, inputs: SharedInputs, memo: dict,
            threads: int | None = None) -> torch.Tensor:
    if task.name in run.ready:
        return run.ready.pop(task.name)
    threads = threads or row_stream.compute_threads()
    if task.action == "keep":
        return cast(inputs.base_raw(task.name), task.out_dtype, threads)
    if task.name in run.batches:
        members = run.batches[task.name]
        results = _merge_batch(run, members, inputs, memo)
        for member, res in zip(members[1:], results[1:]):
            run.ready[member.name] = cast(res, member.out_dtype)
        return cast(results[0], task.out_dtype)
    return cast(_merge_one(run, task, inputs, memo, threads), task.out_dtype, threads)


#: Runs of one tensor computed at once on the whole-tensor path (when its every task is element-wise).
RUN_LANES = 2


def _whole_tensor(name: str, runs: Sequence[_Run], inputs: SharedInputs, pool: ThreadPoolExecutor | None = None,
                  ahead: Callable[[], None] | None = None,
                  early: dict[tuple[str, str], BaseException] | None = None) -> tuple[int, float, bool]:
    """Every run's output of tensor ``name`` from whole-tensor inputs; (bytes written, runs' own seconds,
    whether the runs went on lanes).
    On one torch thread when every task is element-wise (:func:`_element_wise`); then, given a ``pool`` and
    several runs, up to :data:`RUN_LANES` runs at once (:func:`_whole_tensor_lanes`), while this thread runs
    ``ahead`` (reads the next tensor's inputs)."""
    tasks = [run.tasks[name] for run in runs]
    if tasks and all(_element_wise(t) for t in tasks):
        with one_intra_op_thread():
            lanes = min(RUN_LANES, row_stream.compute_threads(), len(runs))
            if (pool is not None and lanes > 1 and inputs.device == "cpu"
                    and not any(name in run.ready or name in run.batches for run in runs)):
                return (*_whole_tensor_lanes(name, runs, inputs, pool, lanes, ahead, early or {}), True)
            return (*_whole_tensor_runs(name, runs, inputs), False)
    return (*_whole_tensor_runs(name, runs, inputs), False)


def _read_ahead(name: str, runs: Sequence[_Run], inputs: SharedInputs,
                early: dict[tuple[str, str], BaseException]) -> Callable[[], None] | None:
    """A function reading tensor ``name``'s inputs for ``runs`` (run while the tensor before it is computed),
    or None when that tensor's turn reads in another order (a batch of same-shape tensors). An input that fails
    is recorded in ``early`` and fails its run at ``name``'s turn, as reading it then would."""
    if any(name in run.ready or name in run.batches for run in runs):
        return None

    def read() -> None:
        for run in runs:
            try:
                _prefetch(run, run.tasks[name], inputs)
            except Exception as exc:  # noqa: BLE001 - reported at the tensor's turn
                early[(name, run.slot.run_id)] = exc

    return read


def _prefetch(run: _Run, task: TensorTask, inputs: SharedInputs) -> None:
    """Read (into ``inputs``' cache) what the run's task needs, with the calls :func:`_output` makes."""
    if task.action == "keep":
        inputs.base_raw(task.name)
        return
    lowrank = get_method(task.method).accepts_lowrank
    inputs.base32(task.name)
    for i in run.slot.experts:
        inputs.delta(task.name, i, lowrank=lowrank)


def _whole_tensor_lanes(name: str, runs: Sequence[_Run], inputs: SharedInputs, pool: ThreadPoolExecutor,
                        lanes: int, ahead: Callable[[], None] | None,
                        early: dict[tuple[str, str], BaseException]) -> tuple[int, float]:
    """:func:`_whole_tensor_runs` with ``lanes`` runs computed at once, each on ``cores // lanes`` threads.

    The inputs are read first, on this thread, in the order the one-by-one pass reads them (a run whose input
    fails loses its shard, as there; usually they were read already, by the previous tensor's ``ahead``).
    Then each lane takes the next run, computes and hands its output to the run's writer, while this thread
    runs ``ahead``. Values runs share (a TIES direction, a sum over experts) are computed once through a
    :class:`_OnceMemo`; a run that needs one another lane is computing is put aside and taken up again when it
    is ready, so a lane only waits when nothing else is left. Every run makes the same calls as one by one,
    so its bytes are the same; what changes is that two element-wise methods run side by side instead of each
    splitting its passes over the cores (measured: 30 % less wall time for two TIES densities)."""
    start = time.perf_counter()
    ready: list[_Run] = []
    for run in runs:
        try:
            failed = early.pop((name, run.slot.run_id), None)
            if failed is not None:
                raise failed
            _prefetch(run, run.tasks[name], inputs)
            ready.append(run)
        except Exception as exc:  # noqa: BLE001 - one run's failure loses no other
            _log_failure(run, name, exc)
    read_seconds = time.perf_counter() - start
    memo = _OnceMemo()
    todo: deque[_Run] = deque(ready)
    aside: list[tuple[_Run, threading.Event]] = []
    spent = {id(run): 0.0 for run in ready}
    written = [0]
    threads = max(1, row_stream.compute_threads() // lanes)

    def take() -> _Run | None:
        with memo.changed:
            while True:
                for k, (run, event) in enumerate(aside):
                    if event.is_set():
                        return aside.pop(k)[0]
                if todo:
                    return todo.popleft()
                if not aside:
                    return None
                memo.changed.wait()

    def lane() -> None:
        while (run := take()) is not None:
            t0 = time.perf_counter()
            try:
                task = run.tasks[name]
                out = _output(run, task, inputs, memo, threads)
                run.writer.write(name, out)  # type: ignore[union-attr]
                with memo.changed:
                    written[0] += task.out_bytes
            except _Busy as busy:
                with memo.changed:
                    aside.append((run, busy.event))
            except Exception as exc:  # noqa: BLE001 - one run's failure loses no other
                _log_failure(run, name, exc)
            finally:
                spent[id(run)] += time.perf_counter() - t0
                with memo.changed:
                    memo.changed.notify_all()

    futures = [pool.submit(lane) for _ in range(lanes)]
    t0, shared0 = time.perf_counter(), inputs.seconds
    try:
        if ahead is not None:
            ahead()
    finally:  # the lanes use this tensor's inputs: they finish before anything propagates
        ahead_seconds = min(time.perf_counter() - t0, inputs.seconds - shared0)
        for fut in futures:
            fut.result()
    # The runs' own seconds add up to the wall time after the reads (shared out by each run's lane time).
    own = max(0.0, time.perf_counter() - start - read_seconds - ahead_seconds)
    total = sum(spent.values()) or 1.0
    for run in ready:
        run.seconds += own * spent[id(run)] / total
    return written[0], own


def _element_wise(task: TensorTask) -> bool:
    """Whether the task keeps its tensor or merges it with short element-wise passes (``MethodSpec.one_thread``,
    or a method that streams with these parameters): such work runs on one torch thread."""
    if task.action == "keep":
        return True
    spec = get_method(task.method)
    return spec.one_thread or spec.stream_mode(task.param_dict()) is not None


def _whole_tensor_runs(name: str, runs: Sequence[_Run], inputs: SharedInputs) -> tuple[int, float]:
    memo: dict = {}
    written = 0
    own = 0.0
    for run in runs:
        t0 = time.perf_counter()
        shared0 = inputs.seconds
        try:
            task = run.tasks[name]
            out = _output(run, task, inputs, memo)
            run.writer.write(name, out)  # type: ignore[union-attr]
            written += task.out_bytes
        except Exception as exc:  # noqa: BLE001 - one run's failure loses no other
            _log_failure(run, name, exc)
        mine = (time.perf_counter() - t0) - (inputs.seconds - shared0)  # reads are shared
        run.seconds += mine
        own += mine
    return written, own


def _log_failure(run: _Run, name: str, exc: BaseException) -> None:
    log.warning("run %s: shard %s failed at tensor %s: %s", run.slot.run_id, run.slot.job.filename, name, exc)
    run.fail(exc, name)


def _can_stream(name: str, runs: Sequence[_Run], inputs: SharedInputs) -> bool:
    """Whether every run's task for ``name`` streams in row blocks (see :mod:`.row_stream`) and no expert
    a merging run uses holds it as LoRA factors."""
    if not runs or any(name in run.ready or name in run.batches for run in runs):
        return False
    tasks = [run.tasks[name] for run in runs]
    if stream_mode(tasks) is None:
        return False
    used = {i for run, t in zip(runs, tasks) if t.action == "merge" for i in run.slot.experts}
    return not any(inputs.is_factored(name, i) for i in used)


def _stream_tensor(name: str, runs: Sequence[_Run], inputs: SharedInputs, reader_pool: ThreadPoolExecutor | None,
                   compute_pool: ThreadPoolExecutor | None, block_elements: int,
                   max_lanes: int = 1) -> tuple[int, float, int]:
    """Every run's output of tensor ``name``, block of rows by block; (bytes written, runs' own seconds,
    blocks). With ``compute_pool`` (of ``max_lanes`` threads) up to :func:`~.row_stream.compute_threads` blocks
    are computed at once, each on one torch thread with its own buffers, and written in block order; random
    methods draw one stream per tensor, so their blocks go in turn."""
    tasks = [run.tasks[name] for run in runs]
    used = sorted({i for run, t in zip(runs, tasks) if t.action == "merge" for i in run.slot.experts})
    sources: dict[Any, Any] = {"base": inputs.source_of(name, "base")}
    sources.update({i: inputs.source_of(name, i) for i in used})
    wheres = {key: inputs.where(name, key) for key in sources}
    shape = tasks[0].shape
    blocks = row_blocks(shape, stream_mode(tasks) or "elements", block_elements)
    generators: dict[str, dict] = {run.slot.run_id: {} for run in runs}  # one stream per salt, tensor and run
    pending: deque[Future] = deque()
    own = 0.0
    reader = BlockReader(sources, blocks, reader_pool)
    try:
        with one_intra_op_thread():
            lanes = 1
            if compute_pool is not None and len(blocks) > 1 and not any(
                    t.action == "merge" and get_method(t.method).random for t in tasks):
                lanes = max(1, min(max_lanes, row_stream.compute_threads()))
            for k, (start, stop, raw) in enumerate(reader):
                inputs.bytes_read += sum(r.numel() * r.element_size() for r in raw.values() if r is not None)
                block = BlockInputs(inputs, name, raw, inputs.buffers(k % lanes), wheres)
                block_shape = (stop - start, *shape[1:]) if shape else ()
                if lanes == 1:
                    own += _write_block(block, _compute_block(block, block_shape, runs, tasks, generators), runs)
                    continue
                if len(pending) == lanes:  # block k reuses block (k − lanes)'s buffers: write that one first
                    own += _write_block(*pending.popleft().result(), runs=runs)
                pending.append(compute_pool.submit(_compute_block_for, block, block_shape, runs, tasks,  # type: ignore[union-attr]
                                                   generators))
            while pending:
                own += _write_block(*pending.popleft().result(), runs=runs)
    finally:
        for fut in pending:
            fut.cancel()
        for fut in pending:
            with contextlib.suppress(Exception):
                fut.result()
        reader.close()
    return sum(t.out_bytes for run, t in zip(runs, tasks) if run.error is None), own, len(blocks)


_Result = tuple["torch.Tensor | BaseException", float]  # one run's rows of a block (or its error), its seconds


def _compute_block(block: BlockInputs, block_shape: tuple[int, ...], runs: Sequence[_Run],
                   tasks: Sequence[TensorTask], generators: dict[str, dict]) -> list[_Result | None]:
    """Every live run's cast rows of one block (None for runs that had already failed)."""
    memo: dict = {}  # shared by the runs of this block (e.g. task arithmetic's Σwᵢτᵢ across scales)
    results: list[_Result | None] = []
    for run, task in zip(runs, tasks):
        if run.error is not None:
            results.append(None)
            continue
        t0 = time.perf_counter()
        shared0 = block.seconds
        try:
            if task.action == "keep":
                out: torch.Tensor | BaseException = cast(block.raw_base(), task.out_dtype)
            else:
                s = run.slot
                mctx = MergeContext(tensor_name=block.name, seed=s.seed, expert_ids=s.expert_ids,
                                    memo=_MemoView(memo, ("block",)), model_stats=s.model_stats,
                                    generators=generators[s.run_id])
                out = cast(merge_block(get_method(task.method).fn, block, s.experts, mctx, s.weights,
                                       task.param_dict(), block_shape, task.method), task.out_dtype)
        except Exception as exc:  # noqa: BLE001 - one run's failure loses no other
            out = exc
        results.append((out, (time.perf_counter() - t0) - (block.seconds - shared0)))  # task vectors are shared
    return results


def _compute_block_for(block: BlockInputs, block_shape: tuple[int, ...], runs: Sequence[_Run],
                       tasks: Sequence[TensorTask], generators: dict[str, dict]) -> tuple[BlockInputs, list]:
    return block, _compute_block(block, block_shape, runs, tasks, generators)


def _write_block(block: BlockInputs, results: list[_Result | None], runs: Sequence[_Run]) -> float:
    """Append each run's rows of a computed block to its shard (in block order); returns the runs' seconds."""
    block.inputs.seconds += block.seconds
    own = 0.0
    for run, result in zip(runs, results):
        if result is None or run.error is not None:
            continue
        out, seconds = result
        t0 = time.perf_counter()
        try:
            if isinstance(out, BaseException):
                raise out
            run.writer.write_rows(block.name, out)  # type: ignore[union-attr]
        except Exception as exc:  # noqa: BLE001 - one run's failure loses no other
            _log_failure(run, block.name, exc)
        mine = seconds + time.perf_counter() - t0
        run.seconds += mine
        own += mine
    return own


def _maybe_die(fault: str, tensor: str) -> None:
    target, _, marker = fault.partition(":")
    if target == tensor and marker and not os.path.exists(marker):
        Path(marker).write_text(f"killed pid {os.getpid()} at {tensor}\n")
        os._exit(17)  # real process death mid-shard, for the recovery tests


def run_slots(slots: Sequence[RunSlot], base: ResolvedSource, pool: Sequence[ResolvedSource], *,
              device: str = "cpu", progress: ProgressFn | None = None, fault: str | None = None,
              stats: dict[str, Any] | None = None, block_elements: int | None = None,
              prefetch: bool = True, stream: bool = True, parallel_blocks: bool = True) -> list[SlotOutcome]:
    """Write every slot's shard in one pass over the tensors; one outcome per slot, in order.

    All slots must list the same tensor names in the same order (the same shard layout). Errors of one slot
    are caught and reported in its outcome; finished shards are renamed into place and recorded. ``stats``,
    when given, receives ``bytes_read``, ``shared_seconds`` (reading, task vectors) and ``seconds``.
    Tensors whose every run streams (:mod:`~omnimerge.engine.row_stream`) go through in row blocks of about
    ``block_elements`` values (default ``row_stream.BLOCK_ELEMENTS``), the next block read on a thread while
    this one is merged (``prefetch``), as many blocks computed at once as the job has cores
    (``parallel_blocks``, :func:`~.row_stream.compute_threads`); ``stream=False`` takes the whole-tensor path
    for every tensor.
    ``stats`` also receives ``streamed_tensors``, ``blocks`` and ``lane_tensors`` (whole tensors whose runs
    were computed :data:`RUN_LANES` at a time, :func:`_whole_tensor_lanes`).
    """
    start = time.perf_counter()
    if not slots:
        return []
    order = [t.name for t in slots[0].job.tensors]
    for s in slots[1:]:
        if [t.name for t in s.job.tensors] != order:
            raise ShardJobError(f"run '{s.run_id}' has a different layout for shard '{s.job.filename}' than run "
                                f"'{slots[0].run_id}'; only runs with the same shard layout share a job (a bug).")
    runs = [_Run(s, device) for s in slots]
    for run in runs:
        run.lora = any(pool[i].kind != "model" for i in run.slot.experts)
        try:
            run.open()
        except Exception as exc:  # noqa: BLE001 - reported per run
            run.fail(exc, "")
    row_stream.keep_freed_memory()
    inputs = SharedInputs(base, pool, device)
    own = 0.0
    block_elements = block_elements or row_stream.BLOCK_ELEMENTS
    streamed = blocks = lane_tensors = 0
    reader_pool = ThreadPoolExecutor(1, thread_name_prefix="omnimerge-read") if prefetch else None
    inputs.reader_pool = reader_pool
    cores = torch.get_num_threads()
    compute_pool = (ThreadPoolExecutor(cores, thread_name_prefix="omnimerge-block")
                    if stream and parallel_blocks and cores > 1 else None)
    try:
        with torch.no_grad():
            early: dict[tuple[str, str], BaseException] = {}  # input errors met reading ahead
            for k, name in enumerate(order):
                if fault:
                    _maybe_die(fault, name)
                live = [run for run in runs if run.error is None]
                if stream and _can_stream(name, live, inputs):
                    written, mine, n_blocks = _stream_tensor(name, live, inputs, reader_pool, compute_pool,
                                                             block_elements, cores)
                    streamed, blocks = streamed + 1, blocks + n_blocks
                else:
                    ahead = None
                    if k + 1 < len(order) and not (stream and _can_stream(order[k + 1], live, inputs)):
                        ahead = _read_ahead(order[k + 1], live, inputs, early)
                    written, mine, on_lanes = _whole_tensor(name, live, inputs, compute_pool, ahead, early)
                    lane_tensors += on_lanes
                own += mine
                inputs.release(name)
                if progress and written:
                    progress("tensor", written)
    finally:
        for pool in (reader_pool, compute_pool):
            if pool is not None:
                pool.shutdown(wait=True)
        inputs.close()
    # Shared time (reading, task vectors, bookkeeping) and bytes read are split evenly over the runs served,
    # so a lone merge reports its whole time and reads, and a sweep's per-run figures add up to the job's.
    total = time.perf_counter() - start
    shared = max(0.0, total - own)
    outcomes = [_finish(run, shared / len(runs), inputs.bytes_read // len(runs)) for run in runs]
    if stats is not None:
        stats.update(bytes_read=inputs.bytes_read, seconds=time.perf_counter() - start, shared_seconds=shared,
                     streamed_tensors=streamed, blocks=blocks, lane_tensors=lane_tensors)
    return outcomes


def _finish(run: _Run, shared_seconds: float, shared_bytes: int) -> SlotOutcome:
    s = run.slot
    if run.error is None:
        try:
            size, sha = run.writer.close()  # type: ignore[union-attr]
            if s.plan_digest:
                check_staging_claim(s.staging, s.plan_digest, s.job.filename, s.label)
            os.replace(run.tmp, s.staging / s.job.filename)  # type: ignore[arg-type]
            result = ShardResult(s.job.filename, size, sha, [t.name for t in s.job.tensors], shared_bytes,
                                 run.seconds + shared_seconds, worker=f"pid{os.getpid()}", device=run.device,
                                 plan_digest=s.plan_digest)
            write_record(s.staging, result)
            return SlotOutcome(s.run_id, result=result)
        except Exception as exc:  # noqa: BLE001 - reported per run
            run.fail(exc, "")
    return SlotOutcome(s.run_id, error=run.error, tensor=run.failed_at)
