"""Chunked element-wise passes, optionally on several threads.

TIES and its helpers walk a tensor in chunks that stay in the CPU caches (a pass over a chunk is one short torch
kernel). The chunks can be dealt into contiguous parts worked on by a thread each: torch kernels release the GIL,
and with one intra-op thread (as the engine sets for element-wise methods) each kernel runs on the thread that
calls it. Every element is computed by the same operations whatever the chunking or the number of threads, so
the bits do not depend on either (tests cut tensors into odd chunks and compare).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

__all__ = ["in_parts", "run_parts"]

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
