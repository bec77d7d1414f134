"""Computing the merged LLM of a modality merge, one shard of whole layers at a time.

For each shared tensor: read the LLM base tensor and each model's tensor (under the model's own name), take
float32 task vectors against the base, call the method from the registry, cast once, stream it into the shard.

LoRA models (``ModalityModel.adapter``): a model's task vector on a LoRA target is ``(W_model − W_base) +
s·B·A``; when the model's tensor equals the base's it is passed as :class:`LowRank` to methods that take
factors (others get the product). With ``lora.merge: factors`` a tensor every model targets with a LoRA pair of
one rank is merged factor-wise instead (:func:`merge_factors`).
"""

from __future__ import annotations

import logging
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from omnimerge.algorithms.base import Delta, LowRank, MergeContext
from omnimerge.algorithms.registry import get_method

from .errors import NonFiniteError, ShardJobError, TensorMismatchError
from .modality_plan import ModalityPlan, ModelInputs, OutputShard, SharedTensor
from .safetensors_io import DTYPES, ShardWriter, TensorReader

__all__ = ["compute_llm_shards", "merge_factors", "own_tensor", "write_own_shards", "ShardRecord"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardRecord:
    """A written file: name, size in bytes and sha256."""

    filename: str
    size: int
    sha256: str


class _Readers:
    """Readers for one worker (opened lazily, in the thread that uses them)."""

    def __init__(self, plan: ModalityPlan) -> None:
        self.plan = plan
        self.base = TensorReader(plan.base.index)
        self._models: dict[str, TensorReader] = {}
        self._adapters: dict[str, TensorReader] = {}

    def model(self, m: ModelInputs) -> TensorReader:
        if m.name not in self._models:
            self._models[m.name] = TensorReader(m.source.index)
        return self._models[m.name]

    def adapter(self, m: ModelInputs) -> TensorReader:
        if m.name not in self._adapters:
            assert m.adapter is not None  # only called for LoRA models
            self._adapters[m.name] = TensorReader(m.adapter.index)
        return self._adapters[m.name]

    def close(self) -> None:
        self.base.close()
        for r in [*self._models.values(), *self._adapters.values()]:
            r.close()


def _finite(t: torch.Tensor, name: str, where: str) -> torch.Tensor:
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise NonFiniteError(f"Tensor '{name}' of {where} holds {bad} non-finite value(s) (NaN/Inf). A merge of it "
                             f"would be meaningless; repair that checkpoint, or keep '{name}' at base with a rule.")
    return t


def _model_delta(m: ModelInputs, t: SharedTensor, base32: torch.Tensor, readers: _Readers, device: str,
                 want_lowrank: bool) -> Delta:
    """Model ``m``'s task vector on shared tensor ``t`` against the LLM base (float32)."""
    src = m.llm[t.name]
    lora = m.adapter.lora if m.adapter else None
    where = f"model '{m.name}' ({m.source.spec.source}, '{src}')"
    if lora is not None and src in lora.replacements:
        full = readers.adapter(m).read(lora.replacements[src]).to(device, torch.float32)
        return _finite(full, t.name, f"{where}, modules_to_save of its adapter") - base32
    own = _finite(readers.model(m).read(src).to(device, torch.float32), t.name, where)
    if lora is None or src not in lora.targets:
        return own - base32
    lr = lora.delta(src, readers.adapter(m)).to(device)
    _finite(lr.A, t.name, f"{where}, lora_A")
    _finite(lr.B, t.name, f"{where}, lora_B")
    if torch.equal(own, base32):
        return lr if want_lowrank else lr.dense()
    return (own - base32) + lr.dense()


def _context(plan: ModalityPlan, name: str) -> MergeContext:
    ids = tuple(f"{m.name}@{m.source.fingerprint()[:16]}" for m in plan.models)
    return MergeContext(tensor_name=name, seed=plan.recipe.seed, expert_ids=ids)


def merge_factors(method: str, params: dict[str, Any], factors: Sequence[LowRank], *, ctx_a: MergeContext,
                  ctx_b: MergeContext, weights: Sequence[float]) -> torch.Tensor:
    """The paper's factor-wise LoRA merge; returns ΔW = B̄·Ā (not the merge of the products B·A).

    With sᵢ the PEFT scale (α/r) of model i and f the method run on a zero base (its parameters included)::

        Ā = f(0; A₁, …, A_N)          (r×n)
        B̄ = f(0; s₁B₁, …, s_N B_N)    (m×r)
        ΔW = B̄ · Ā

    Unlike the ΔW-level merge f(0; s₁B₁A₁, …), the cross terms BᵢAⱼ (i ≠ j) enter the result, and a method's
    scale applies to both factors (task arithmetic with scale λ gives λ²·(Σ sᵢBᵢ)(Σ Aᵢ)). This is what the
    paper's modality script does with the LoRA weights of its modality models (``lora_A``/``lora_B`` merged
    key by key); the scale sᵢ is folded into Bᵢ so that adapters of different α/r combine correctly.
    """
    spec = get_method(method)
    a_list = [f.A.float() for f in factors]
    b_list = [f.B.float() * f.scale for f in factors]
    a_bar = spec.fn(torch.zeros_like(a_list[0]), a_list, ctx=ctx_a, weights=list(weights), **params)
    b_bar = spec.fn(torch.zeros_like(b_list[0]), b_list, ctx=ctx_b, weights=list(weights), **params)
    return b_bar @ a_bar


def _shared_value(t: SharedTensor, plan: ModalityPlan, readers: _Readers, device: str) -> torch.Tensor:
    base = readers.base.read(t.base_name)
    if t.action == "keep":
        return base
    base32 = _finite(base.to(device, torch.float32), t.name, f"the LLM base ({plan.base.spec.source})")
    weights = plan.recipe.weights
    if t.action == "factors":
        factors = []
        for m in plan.models:
            src = m.llm[t.name]
            own = readers.model(m).read(src).to(device, torch.float32)
            if not torch.equal(own, base32):
                raise TensorMismatchError(
                    f"Tensor '{t.name}': model '{m.name}' ('{m.source.spec.source}', '{src}') differs from the LLM base "
                    f"'{plan.base.spec.source}' under its LoRA adapter, so a factor-wise merge would lose that "
                    "difference. Use lora.merge: delta, or the LLM base the adapters were trained on.")
            factors.append(m.adapter.lora.delta(src, readers.adapter(m)).to(device))  # type: ignore[union-attr]
        delta = merge_factors(t.method or plan.recipe.method, t.param_dict(), factors,
                              ctx_a=_context(plan, f"{t.name}#lora_A"), ctx_b=_context(plan, f"{t.name}#lora_B"),
                              weights=weights)
        return base32 + delta
    spec = get_method(t.method or plan.recipe.method)
    deltas = [_model_delta(m, t, base32, readers, device, spec.accepts_lowrank) for m in plan.models]
    out = spec.fn(base32, deltas, ctx=_context(plan, t.name), weights=weights, **t.param_dict())
    if tuple(out.shape) != t.shape:
        raise ShardJobError(f"method '{t.method}' returned shape {list(out.shape)} for tensor '{t.name}' of shape "
                            f"{list(t.shape)} (a bug in the method)")
    return out


def _cast(t: torch.Tensor, dtype: str) -> torch.Tensor:
    return t.to(DTYPES[dtype].torch).contiguous().cpu()


def _write_llm_shard(shard: OutputShard, plan: ModalityPlan, out_dir: Path, device: str) -> ShardRecord:
    by_name = plan.shared_by_name()
    tmp = out_dir / f".{shard.filename}.{uuid.uuid4().hex[:8]}.tmp"
    readers = _Readers(plan)
    current = ""
    try:
        writer = ShardWriter(tmp, [(e.name, e.dtype, e.shape) for e in shard.entries], metadata={"format": "pt"})
        with torch.no_grad():
            for e in shard.entries:
                current = e.name
                writer.write(e.name, _cast(_shared_value(by_name[e.key], plan, readers, device), e.dtype))
        size, sha = writer.close()
        os.replace(tmp, out_dir / shard.filename)
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, (NonFiniteError, ShardJobError, TensorMismatchError)):
            raise
        raise ShardJobError(f"Merged LLM shard '{shard.filename}' failed at tensor '{current}': "
                            f"{type(exc).__name__}: {exc}") from exc
    finally:
        readers.close()
    log.info("merged LLM shard %s: %d tensors", shard.filename, len(shard.entries))
    return ShardRecord(shard.filename, size, sha)


def compute_llm_shards(plan: ModalityPlan, out_dir: Path, *, workers: int = 1, device: str = "cpu") -> list[ShardRecord]:
    """Write every shard of the merged LLM into ``out_dir`` (threads over shards; torch releases the GIL)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if workers <= 1 or len(plan.llm_shards) == 1:
        return [_write_llm_shard(s, plan, out_dir, device) for s in plan.llm_shards]
    with ThreadPoolExecutor(min(workers, len(plan.llm_shards)), thread_name_prefix="omnimerge-modality") as pool:
        return list(pool.map(lambda s: _write_llm_shard(s, plan, out_dir, device), plan.llm_shards))


def own_tensor(m: ModelInputs, name: str, readers: _Readers) -> torch.Tensor:
    """A tensor model ``m`` carries: its stored bytes unchanged (or its adapter's ``modules_to_save`` bytes); for a
    LoRA target outside the shared LLM, the model's tensor plus s·B·A cast back to its dtype."""
    kind, key = m.own[name]
    if kind == "adapter":
        return readers.adapter(m).read(key)
    t = readers.model(m).read(key)
    if kind == "lora":
        lr = m.adapter.lora.delta(key, readers.adapter(m))  # type: ignore[union-attr]
        return (t.float() + lr.dense()).to(t.dtype)
    return t


def write_own_shards(plan: ModalityPlan, m: ModelInputs, out_dir: Path) -> list[ShardRecord]:
    """Write model ``m``'s own tensors (encoders, connectors, ``own`` LLM tensors) into ``out_dir``."""
    shards = plan.own_shards[m.name]
    if not shards:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    readers = _Readers(plan)
    records = []
    try:
        for shard in shards:
            tmp = out_dir / f".{shard.filename}.{uuid.uuid4().hex[:8]}.tmp"
            writer = ShardWriter(tmp, [(e.name, e.dtype, e.shape) for e in shard.entries], metadata={"format": "pt"})
            try:
                for e in shard.entries:
                    writer.write(e.name, own_tensor(m, e.key, readers))
                size, sha = writer.close()
            except BaseException:
                writer.abort()
                raise
            os.replace(tmp, out_dir / shard.filename)
            records.append(ShardRecord(shard.filename, size, sha))
    finally:
        readers.close()
    return records
