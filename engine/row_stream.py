"""Row-block streaming of element-wise merges: working memory grows with a block, not with the tensor.

For a tensor whose every run either keeps it at base or merges it with a method that streams
(:attr:`MethodSpec.streaming <omnimerge.algorithms.registry.MethodSpec.streaming>`: ``weight_average``,
``task_arithmetic``, ``linear``, ``dare_linear``, ``della`` without consensus), the engine walks the tensor in
blocks of whole rows (first dimension) of about ``block_elements`` values. Per block:

1. :class:`BlockInputs` holds the rows of the base and of each expert a run uses (``pread`` of just those
   bytes), converts the base's to float32 and forms τᵢ = θᵢ − θ₀ into reused float32 buffers, checked
   finite — the same float32 value, element by element, as the whole-tensor path.
2. Every run calls its method on the block (a :class:`MergeContext` per block; random methods get one
   generator per salt for the whole tensor, so the blocks draw consecutive parts of the one stream a
   whole-tensor call draws), casts, and appends the rows to its shard (:meth:`ShardWriter.write_rows`).
3. A reader thread fetches the next block's bytes while the current one is computed, and each run's writer
   writes and hashes on a thread of its own; the block's kernels run on one torch thread
   (:func:`one_intra_op_thread`).

Element-wise float32 operations round each element on its own, so the same operations in the same order per
element give the same bits however the tensor is cut (tests compare against whole-tensor computations).
Memory: the block's stored rows (two blocks: the one merged and the one prefetched), its float32 base and task
vectors, the method's temporaries and the cast rows queued for the writers — bounded by
:func:`block_peak_bytes` (about 150 MB for 4 experts at the default block size), whatever the tensor's size.

Tensors a LoRA expert targets (its ΔW = B·A is a matrix product, whose rows are not computed independently
of the blocking) and methods that need whole tensors (TIES' thresholds and sign election, SVDs, solvers)
take the whole-tensor path in :mod:`~omnimerge.engine.shard_runs`.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch

from omnimerge.algorithms.base import MergeContext
from omnimerge.algorithms.registry import get_method

from .errors import NonFiniteError, ShardJobError
from .safetensors_io import TensorReader

if TYPE_CHECKING:
    from .plan import TensorTask
    from .shard_runs import SharedInputs

__all__ = ["BLOCK_ELEMENTS", "stream_mode", "row_blocks", "block_peak_bytes", "BlockInputs", "BlockReader", "merge_block",
           "non_finite_message", "one_intra_op_thread", "compute_threads", "keep_freed_memory"]

#: Values per block (float32: 4 MiB per input). Small enough to stay near the CPU caches, large enough that
#: the per-block Python overhead (a few dozen torch calls) is a few percent. ``OMNIMERGE_BLOCK_ELEMENTS``
#: overrides it (tests use tiny blocks to cut tensors in odd places).
BLOCK_ELEMENTS = int(os.environ.get("OMNIMERGE_BLOCK_ELEMENTS", 1 << 20))


def stream_mode(tasks: Sequence[TensorTask]) -> str | None:
    """How every run's task for one tensor lets it stream: ``"elements"``, ``"rows"`` (a 1-D tensor is then
    one block) or None (some run needs the whole tensor). Keeping at base streams in any mode."""
    mode = "elements"
    for task in tasks:
        if task.action == "keep":
            continue
        m = get_method(task.method).stream_mode(task.param_dict()) if task.method else None
        if m is None:
            return None
        if m == "rows":
            mode = "rows"
    return mode


def block_peak_bytes(n_experts: int, block_elements: int | None = None) -> int:
    """Working memory of streaming one tensor with ``n_experts`` experts (an estimate for plans, ≥ the real
    need): two blocks computed at once, each with its stored rows (≤ 4 bytes a value), float32 base and task
    vectors, the method's temporaries and the cast rows (≈ 4 float32 blocks); the prefetched stored block;
    four cast blocks queued per writer."""
    b = block_elements or BLOCK_ELEMENTS
    per_block = 4 * (n_experts + 1) * 2 + 4 * 4
    return b * (2 * per_block + 4 * (n_experts + 1) + 4 * 4)


def row_blocks(shape: Sequence[int], mode: str, block_elements: int = BLOCK_ELEMENTS) -> list[tuple[int, int]]:
    """Row ranges ``[start, stop)`` along the first dimension that cover the tensor, each about
    ``block_elements`` values (at least one row). A 0-d tensor is one block ``(0, 1)``; in ``"rows"`` mode
    a 1-D tensor is one row, hence one block."""
    if len(shape) == 0:
        return [(0, 1)]
    rows = int(shape[0])
    if rows == 0:
        return [(0, 0)]
    if mode == "rows" and len(shape) == 1:
        return [(0, rows)]
    per_row = max(1, math.prod(shape[1:]))
    step = max(1, block_elements // per_row)
    return [(r, min(rows, r + step)) for r in range(0, rows, step)]


_malloc_tuned = False


def keep_freed_memory() -> None:
    """Let glibc's malloc keep freed memory for reuse instead of returning it to the kernel (once per process;
    no-op elsewhere). Merging allocates and frees same-sized tensors over and over — block-sized ones when
    streaming, whole float32 tensors on the whole-tensor path (up to the embedding's 0.5 GB for Qwen2-0.5B).
    By default glibc maps every allocation above 32 MiB afresh and unmaps it when freed, and trims freed heap
    memory, so each new tensor page-faults all its memory in again. Measured on the 2-core box: the streamed
    Qwen2-0.5B × 4 merge 14.7 s → 11.9 s; ``x.mul(0.5).add_(x)`` on a 136 M-value tensor 0.55–0.69 s →
    0.21 s. The cost: up to 2 GiB of freed memory stays with the process for reuse."""
    global _malloc_tuned
    if _malloc_tuned:
        return
    _malloc_tuned = True
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, (1 << 31) - 1)
    mallopt(m_trim_threshold, (1 << 31) - 1)


_threads_lock = threading.Lock()
_threads_users = 0
_threads_saved = 1


@contextlib.contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """Run torch's kernels on one thread inside this block (process-wide, reference-counted for concurrent
    jobs). A block's element-wise kernels are short: splitting each over OpenMP threads buys little and,
    on a machine whose cores are busy, every kernel waits for its slowest thread (measured on the 2-core
    box under load: 26.5 s → 3.8 s for the Qwen2-0.5B embedding with 4 experts). The streamed path gets its
    parallelism from the reader thread and the writers' threads instead."""
    global _threads_users, _threads_saved
    with _threads_lock:
        if _threads_users == 0:
            _threads_saved = torch.get_num_threads()
            if _threads_saved != 1:
                torch.set_num_threads(1)
        _threads_users += 1
    try:
        yield
    finally:
        with _threads_lock:
            _threads_users -= 1
            if _threads_users == 0 and _threads_saved != 1:
                torch.set_num_threads(_threads_saved)


def compute_threads() -> int:
    """Threads one job's chunked kernels may use at once (``MergeContext.threads``) inside
    :func:`one_intra_op_thread`: the intra-op threads torch had before it took them (all cores of the process
    locally; the task's CPUs in a Ray worker, where Ray sets ``OMP_NUM_THREADS``), shared among the jobs inside
    it now. 1 outside it."""
    with _threads_lock:
        return max(1, _threads_saved // _threads_users) if _threads_users else 1


def non_finite_message(name: str, where: str, bad: int) -> str:
    return (f"Tensor '{name}' of {where} holds {bad} non-finite value(s) (NaN/Inf). A merge of it would be "
            f"meaningless; repair or drop that checkpoint, or keep '{name}' at base with a rule.")


def _count_non_finite(reader: TensorReader, name: str) -> int:
    """Non-finite values of a whole stored tensor, read block by block (only on the error path)."""
    info = reader.index[name]
    bad = 0
    for start, stop in row_blocks(info.shape, "elements"):
        bad += int((~torch.isfinite(reader.read_rows(name, start, stop).float())).sum())
    return bad


class _Buffers:
    """Reused buffers, one per key, grown when a larger block needs it."""

    def __init__(self) -> None:
        self._bufs: dict[Any, torch.Tensor] = {}

    def get(self, key: Any, numel: int, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device.type != torch.device(device).type:
            buf = torch.empty(max(numel, 1), dtype=dtype, device=device)
            self._bufs[key] = buf
        return buf[:numel]


class BlockReader:
    """Reads the raw rows of a tensor's blocks for the base and a set of experts, one block ahead on a
    thread (``pread`` releases the GIL). Raw rows land in fresh memory: a kept tensor's rows go to the
    writers as they are. Each source is a ``(reader, stored tensor name)``, or None for an expert whose
    task vector is zero on this tensor (a LoRA adapter that does not target it)."""

    def __init__(self, sources: dict[Any, tuple[TensorReader, str] | None], blocks: list[tuple[int, int]],
                 pool: ThreadPoolExecutor | None) -> None:
        self.sources = sources
        self.blocks = blocks
        self.pool = pool
        self._next: Future | None = None
        self._index = 0

    def _read(self, k: int) -> dict[Any, torch.Tensor | None]:
        start, stop = self.blocks[k]
        return {key: (None if src is None else src[0].read_rows(src[1], start, stop))
                for key, src in self.sources.items()}

    def __iter__(self) -> BlockReader:
        return self

    def __next__(self) -> tuple[int, int, dict[Any, torch.Tensor | None]]:
        k = self._index
        if k >= len(self.blocks):
            raise StopIteration
        if self._next is not None:
            raw = self._next.result()
        else:
            raw = self._read(k)
        self._next = None
        if self.pool is not None and k + 1 < len(self.blocks):
            self._next = self.pool.submit(self._read, k + 1)
        self._index += 1
        start, stop = self.blocks[k]
        return start, stop, raw

    def close(self) -> None:
        if self._next is not None:
            self._next.cancel()
            try:
                self._next.result()
            except Exception:  # noqa: BLE001 - the block is not needed any more
                pass
            self._next = None


class BlockInputs:
    """One block of one tensor: base and task vectors in float32, built on demand, shared by every run.

    ``raw`` maps ``"base"`` and expert pool indices to the block's stored rows (None: a zero task vector).
    Float32 values live in ``buffers`` (reused from block to block): valid until the next block. A failed
    expert's error is remembered, so every run that uses that expert fails the same way and the others go on.
    """

    def __init__(self, inputs: SharedInputs, name: str, raw: dict[Any, torch.Tensor | None],
                 buffers: _Buffers, wheres: dict[Any, str]) -> None:
        self.inputs = inputs
        self.name = name
        self.raw = raw
        self.buffers = buffers
        self.wheres = wheres
        self._base32: torch.Tensor | None = None
        self._base_checked = False
        self.seconds = 0.0  # spent converting the base and forming task vectors (shared by the block's runs)
        self._deltas: dict[int, torch.Tensor | BaseException] = {}

    def _raise_if_non_finite(self, key: Any, raw: torch.Tensor) -> None:
        """Raise :class:`NonFiniteError` when the stored rows ``raw`` hold NaN/Inf, counting the whole tensor."""
        if bool(torch.isfinite(raw).all()):
            return
        reader, stored = self.inputs.source_of(self.name, key)  # type: ignore[misc]
        raise NonFiniteError(non_finite_message(self.name, self.wheres[key], _count_non_finite(reader, stored)))

    def raw_base(self) -> torch.Tensor:
        raw = self.raw["base"]
        if raw is None:
            raise ShardJobError(f"block of tensor '{self.name}' has no base rows (a bug)")
        return raw

    def base32(self) -> torch.Tensor:
        """θ₀ on this block in float32 (checked finite through the task vectors, see :meth:`check_base`)."""
        if self._base32 is None:
            t0 = time.perf_counter()
            raw = self.raw_base()
            b = self.buffers.get("base", raw.numel(), torch.float32, self.inputs.device).view(raw.shape)
            b.copy_(raw)
            self._base32 = b
            self.seconds += time.perf_counter() - t0
        return self._base32

    def check_base(self) -> None:
        """Check θ₀ finite (a run whose task vectors are all zero on this tensor needs it done explicitly)."""
        if not self._base_checked:
            b = self.base32()
            if not (math.isfinite(b.sum().item()) or bool(torch.isfinite(b).all())):
                self._raise_if_non_finite("base", self.raw_base())
            self._base_checked = True

    def delta(self, i: int) -> torch.Tensor:
        """τᵢ of pool expert ``i`` on this block (float32): θᵢ − θ₀, or zeros for an untargeted LoRA expert.

        One sum checks it: a NaN/Inf in θᵢ or θ₀ makes τᵢ non-finite, so only a non-finite sum (or a
        float32 overflow of finite values) looks at the stored inputs.
        """
        if i not in self._deltas:
            base32 = self.base32()
            t0 = time.perf_counter()
            try:
                raw = self.raw[i]
                d = self.buffers.get(("delta", i), base32.numel(), torch.float32, self.inputs.device)
                d = d.view(base32.shape)
                if raw is None:
                    d.zero_()
                else:
                    d.copy_(raw).sub_(base32)  # exact conversion, then one rounding: θᵢ − θ₀ as in float32
                    if not (math.isfinite(d.sum().item()) or bool(torch.isfinite(d).all())):
                        self._raise_if_non_finite("base", self.raw_base())
                        self._raise_if_non_finite(i, raw)  # else: finite inputs whose difference overflowed
                    self._base_checked = True
                self._deltas[i] = d
            except Exception as exc:  # noqa: BLE001 - remembered: every run using expert i fails alike
                self._deltas[i] = exc
            self.seconds += time.perf_counter() - t0
        d = self._deltas[i]
        if isinstance(d, BaseException):
            raise d
        return d

    def owns(self, t: torch.Tensor) -> bool:
        """Whether ``t`` shares memory with a reused buffer (then it must be copied before it is kept)."""
        ptrs = {b.untyped_storage().data_ptr() for b in self.buffers._bufs.values()}
        return t.untyped_storage().data_ptr() in ptrs


def merge_block(spec_fn: Callable[..., torch.Tensor], block: BlockInputs, experts: Sequence[int],
                ctx: MergeContext, weights: Sequence[float], params: dict[str, Any],
                expect_shape: tuple[int, ...], method: str) -> torch.Tensor:
    """One run's method on one block → float32 rows (never a reused buffer)."""
    base32 = block.base32()
    deltas = [block.delta(i) for i in experts]
    block.check_base()
    out = spec_fn(base32, deltas, ctx=ctx, weights=list(weights), **params)
    if tuple(out.shape) != expect_shape:
        raise ShardJobError(f"method '{method}' returned shape {list(out.shape)} for a block of tensor "
                            f"'{block.name}' of shape {list(expect_shape)} (a bug in the method)")
    return out.clone() if block.owns(out) else out
