"""Chunked element-wise passes, optionally on several threads.

TIES and its helpers walk a tensor in chunks that stay in the CPU caches (a pass over a chunk is one short torch
kernel). The chunks can be dealt into contiguous parts worked on by a thread each: torch kernels release the GIL,
and with one intra-op thread (as the engine sets for element-wise methods) each kernel runs on the thread that
calls it. Every element is computed by the same operations whatever the chunking or the number of threads, so
the bits do not depend on either (tests cut tensors into odd chunks and compare).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable, TypeVar

if TYPE_CHECKING:
    import torch

__all__ = ["in_parts", "run_parts", "scaled_add", "cast_chunked"]

T = TypeVar("T")


def in_parts(n: int, chunk: int, parts: int) -> list[list[tuple[int, int]]]:
    """Chunks ``[s, e)`` of ``range(n)`` (``chunk`` values each), dealt into at most ``parts`` contiguous runs
    of whole chunks (one empty-free run when ``n`` is 0 … ``chunk``)."""
    chunks = [(s, min(n, s + chunk)) for s in range(0, n, max(1, chunk))]
    parts = max(1, min(parts, len(chunks)))
    per = -(-len(chunks) // parts) if chunks else 1
    return [chunks[i:i + per] for i in range(0, len(chunks), per)]


def run_parts(fn: Callable[[int], T], count: int) -> list[T]:
    """``fn(k)`` for every part ``k < count``, in order; on a thread each when there are several."""
    if count <= 1:
        return [fn(k) for k in range(count)]
    with ThreadPoolExecutor(count, thread_name_prefix="omnimerge-chunk") as pool:
        return list(pool.map(fn, range(count)))


SCALE_CHUNK = 1 << 18  # values per chunk of scaled_add / cast_chunked (float32: 1 MiB)


def scaled_add(x: "torch.Tensor", scale: float, base: "torch.Tensor", *, threads: int = 1,
               out_dtype: "torch.dtype | None" = None) -> "torch.Tensor":
    """A new tensor ``x·scale + base``, multiplied then added element by element — the bits of
    ``base + scale * x`` — chunk by chunk on ``threads`` threads (one pass over memory instead of two).

    With ``out_dtype`` (e.g. the engine's storage dtype, ``MergeContext.out_dtype``) the result comes back in
    that dtype: each chunk is computed in ``x``'s dtype in a small scratch buffer and then converted, so the
    bits are those of ``(base + scale * x).to(out_dtype)`` without the full-size float32 intermediate (one
    allocation and one pass over memory fewer per output tensor)."""
    import torch

    narrow = out_dtype is not None and out_dtype != x.dtype
    n = x.numel()
    if x.device.type != "cpu" or n <= SCALE_CHUNK or x.shape != base.shape:
        out = torch.mul(x, scale).add_(base)
        return out.to(out_dtype) if narrow else out
    out = torch.empty(x.shape, dtype=out_dtype if narrow else x.dtype, device=x.device)
    xf, bf, of = x.reshape(-1), base.reshape(-1), out.view(-1)
    parts = in_parts(n, SCALE_CHUNK, threads)

    def work(k: int) -> None:
        scratch = torch.empty(SCALE_CHUNK, dtype=x.dtype) if narrow else None
        for s, e in parts[k]:
            dst = scratch[:e - s] if scratch is not None else of[s:e]
            torch.mul(xf[s:e], scale, out=dst).add_(bf[s:e])
            if scratch is not None:
                of[s:e].copy_(dst)

    run_parts(work, len(parts))
    return out


def cast_chunked(t: "torch.Tensor", dtype: "torch.dtype", *, threads: int = 1) -> "torch.Tensor":
    """``t.to(dtype)`` (contiguous, CPU) converted chunk by chunk on ``threads`` threads (the same rounding per
    element)."""
    import torch

    if t.device.type != "cpu" or threads <= 1 or t.numel() <= SCALE_CHUNK:
        return t.to(dtype).contiguous()
    out = torch.empty(t.shape, dtype=dtype)
    src, dst = t.contiguous().reshape(-1), out.view(-1)
    parts = in_parts(src.numel(), SCALE_CHUNK, threads)

    def work(k: int) -> None:
        for s, e in parts[k]:
            dst[s:e].copy_(src[s:e])

    run_parts(work, len(parts))
    return out
