"""Types every merging method shares: factored (LoRA) task vectors and the per-tensor merge context.

Methods are pure functions ``fn(base, deltas, *, ctx, weights, **params) -> Tensor``:

- ``base``: the base tensor θ₀ in float32, on the device the engine chose.
- ``deltas``: the experts' task vectors τᵢ = θᵢ − θ₀, each a float32 ``Tensor`` of the base's shape, or a
  :class:`LowRank` (only for methods registered with ``accepts_lowrank=True``; the engine densifies for
  the others).
- ``weights``: one float per expert from the recipe (1.0 when not given). Methods say in their docstring
  whether they use them.
- ``ctx``: :class:`MergeContext` — tensor name, seeded generators, a memo shared across runs of a sweep,
  and model-wide statistics from pre-passes.
- returns the merged tensor θ in float32 with the base's shape (the engine casts once to storage dtype).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence, Union

import torch

__all__ = ["LowRank", "Delta", "MergeContext", "dense", "seed_for", "remember_batched"]


@dataclass(frozen=True)
class LowRank:
    """A task vector in factored form: ΔW = scale · B · A (B: m×r, A: r×n).

    PEFT LoRA gives scale = α/r (or α/√r with rsLoRA). Keep the factors until a method needs the dense
    matrix; SVD-based methods decompose this form directly (QR of B and Aᵀ, then an r×r SVD).
    """

    B: torch.Tensor
    A: torch.Tensor
    scale: float = 1.0

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.B.shape[0], self.A.shape[1]))

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def dense(self) -> torch.Tensor:
        return (self.B.float() @ self.A.float()) * self.scale

    def to(self, device: torch.device | str) -> "LowRank":
        return LowRank(self.B.to(device), self.A.to(device), self.scale)


Delta = Union[torch.Tensor, LowRank]


def dense(delta: Delta) -> torch.Tensor:
    """The dense float32 task vector of either form."""
    return delta.dense() if isinstance(delta, LowRank) else delta


def seed_for(seed: int, *parts: str) -> int:
    """A 63-bit seed from the recipe seed and names (tensor, expert, salt): stable across processes,
    workers and completion order (Python's ``hash`` is salted per process, so it is not used)."""
    h = hashlib.sha256(str(int(seed)).encode())
    for p in parts:
        h.update(b"\x00" + p.encode())
    return int.from_bytes(h.digest()[:8], "little") & ((1 << 63) - 1)


@dataclass
class MergeContext:
    """What a method may know about the tensor besides its values.

    Attributes:
        tensor_name: the output tensor's name (seeds random methods, appears in messages).
        seed: the recipe seed.
        expert_ids: a stable identity per delta (expert name + source hash), used as memo keys so a sweep
            computes an expert's SVD of this tensor once for every run that needs it.
        memo: a dict shared by every run of a ShardJob (``None`` → no sharing).
        model_stats: model-wide statistics from streaming pre-passes, e.g.
            ``{"ties_threshold": {expert_id: float}}`` (``ties`` also accepts ``(expert_id, density)`` keys,
            for a sweep that needs several densities at once).
        generators: when set (the engine streaming a tensor in row blocks, each block a call of the
            method), :meth:`generator` hands out one generator per salt from this dict instead of a fresh
            one, so consecutive blocks draw consecutive parts of the stream a whole-tensor call would draw.
        threads: how many threads the method may run its chunked element-wise passes on at once
            (:mod:`~omnimerge.algorithms.chunks`; the engine sets it from the cores the job may use). The
            result does not depend on it.
        out_dtype: the dtype the engine stores the result in, when it takes the result as it is (None: the
            caller wants float32). A method whose last step is θ₀ + λ·τ_m may return it already converted
            (:func:`~omnimerge.algorithms.chunks.scaled_add`): the bits of its float32 result cast, without
            the full-size float32 copy. Everything before that last step stays float32.
    """

    tensor_name: str = ""
    seed: int = 0
    expert_ids: tuple[str, ...] = ()
    memo: dict | None = None
    model_stats: Mapping[str, Any] = field(default_factory=dict)
    generators: dict | None = None
    threads: int = 1
    out_dtype: torch.dtype | None = None

    def generator(self, *salt: str, device: torch.device | str = "cpu") -> torch.Generator:
        """A generator seeded from (seed, tensor name, *salt); CPU by default so bytes do not depend on
        the device (draw on CPU, then move). Call it once per salt per tensor (see ``generators``)."""
        key = (salt, str(device))
        if self.generators is not None and key in self.generators:
            return self.generators[key]
        g = torch.Generator(device=device)
        g.manual_seed(seed_for(self.seed, self.tensor_name, *salt))
        if self.generators is not None:
            self.generators[key] = g
        return g

    def remember(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """Memoise ``compute()`` under ``key`` (include expert ids and every parameter it depends on)."""
        if self.memo is None:
            return compute()
        full = (self.tensor_name, *key)
        once = getattr(self.memo, "remember_once", None)
        if once is not None:  # the engine's memo view (compute-once when runs share it on several threads)
            return once(full, compute)
        if full not in self.memo:
            self.memo[full] = compute()
        return self.memo[full]

    def expert_id(self, i: int) -> str:
        return self.expert_ids[i] if i < len(self.expert_ids) else f"#{i}"


def remember_batched(ctxs: Sequence[MergeContext], key_for: Callable[[MergeContext], tuple],
                     compute: Callable[[], Any]) -> Any:
    """:meth:`MergeContext.remember` for batched work over ``[B, ...]`` stacks, one context per item.

    If every context already holds its key (``key_for(ctx)``), the stored items are stacked; otherwise
    ``compute()`` (a tensor or a tuple of tensors, batch first) runs once and item b is stored in
    ``ctxs[b]``. So a batched run and a per-tensor run of a sweep share the same memo entries.
    """
    keys = [key_for(c) for c in ctxs]
    if ctxs and all(c.memo is not None and (c.tensor_name, *k) in c.memo for c, k in zip(ctxs, keys)):
        items = [c.memo[(c.tensor_name, *k)] for c, k in zip(ctxs, keys)]  # type: ignore[index]
        if isinstance(items[0], tuple):
            return tuple(torch.stack(parts) for parts in zip(*items))
        return torch.stack(items)
    out = compute()
    for b, (c, k) in enumerate(zip(ctxs, keys)):
        item = tuple(x[b] for x in out) if isinstance(out, tuple) else out[b]
        c.remember(k, lambda item=item: item)
    return out


def as_sequence(x: Sequence[float] | None, n: int) -> list[float]:
    return [1.0] * n if x is None else [float(v) for v in x]
