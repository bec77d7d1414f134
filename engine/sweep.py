"""Sweeps: many merges (expert subsets × methods × parameter grids) in one pass over the layers.

``plan_sweep`` resolves the base and the expert pool once, plans every run (each run *is* a Recipe, planned
by ``plan_merge`` exactly as a lone merge), groups runs that share a shard layout and, under a memory
budget, splits a group into several passes. ``run_sweep`` turns each (pass, shard) into a
:class:`~omnimerge.engine.sweep_job.SweepJob` — shard i of every run of the pass — and runs the jobs through
any executor. Each run keeps its own staging directory and is committed on its own as soon as its last
shard lands, so one failing run loses no other, and a rerun resumes every run from its verified shards
(committed runs are left alone). Outputs are byte-identical to the same merges run one by one.

Output folder::

    OUT/sweep.json                 the runs and what each one is
    OUT/recipes/RUN.yaml           each run's recipe (``omnimerge merge recipes/RUN.yaml`` reproduces it)
    OUT/runs/RUN/                  each committed merge (with its manifest and model card)
    OUT/results.parquet            run id, method, parameters, experts, output, bytes, time, status, ...
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from .commit import Staging, commit_output, prepare_staging
from .errors import OmnimergeError, PlanError
from .execute import LocalExecutor, choose_device, run_prepasses
from .merge import Executor, _Progress, make_job_context
from .plan import Plan, plan_merge
from .shard_runs import ProgressFn, RunSlot, ShardResult
from .sources import ResolvedSource, resolve_source
from .sweep_job import SweepContext, SweepJob, SweepJobResult, estimate_job_bytes, job_read_bytes
from .sweep_spec import SweepRun, SweepSpec

__all__ = ["SweepPass", "SweepPlan", "SweepReport", "plan_sweep", "run_sweep", "RESULTS_FILE", "read_results"]

log = logging.getLogger(__name__)

RESULTS_FILE = "results.parquet"
MANIFEST = "omnimerge_manifest.json"


@dataclass
class SweepPass:
    """Runs that go over the layers together (same shard layout; fits the memory budget)."""

    index: int
    run_ids: list[str]
    peak_bytes: int
    read_bytes: int


@dataclass
class SweepPlan:
    """Every run's plan, the pool, and the passes. Costs are estimates from headers only."""

    spec: SweepSpec
    base: ResolvedSource
    pool: list[ResolvedSource]  # experts some run uses, in pool order
    pool_index: dict[str, int]
    plans: dict[str, Plan]
    passes: list[SweepPass]
    memory_budget: int | None = None
    max_batch_bytes: int = 1 << 30

    @property
    def runs(self) -> list[SweepRun]:
        return self.spec.runs

    @property
    def read_bytes(self) -> int:
        """Bytes the sweep reads: each pass reads every input it needs once (+ per-run prepasses)."""
        return sum(p.read_bytes for p in self.passes) + sum(
            sum(n.read_bytes for n in plan.prepasses) for plan in self.plans.values())

    @property
    def separate_read_bytes(self) -> int:
        """Bytes the same runs would read as separate merges."""
        return sum(p.read_bytes for p in self.plans.values())

    @property
    def write_bytes(self) -> int:
        return sum(p.write_bytes for p in self.plans.values())

    @property
    def peak_bytes(self) -> int:
        return max((p.peak_bytes for p in self.passes), default=0)

    def experts_of(self, run: SweepRun) -> tuple[int, ...]:
        return tuple(self.pool_index[e] for e in run.experts)


def plan_sweep(spec: SweepSpec, *, memory_budget: int | None = None, max_batch_bytes: int = 1 << 30,
               cache_dir: str | None = None) -> SweepPlan:
    """Resolve the inputs once, plan every run, group by shard layout and split into passes.

    Raises ``PlanError`` listing the runs that cannot be planned (e.g. an expert that lacks tensors), before
    any weight is read.
    """
    budget = memory_budget if memory_budget is not None else spec.memory_budget
    first = spec.runs[0].recipe
    base = resolve_source(first.base, label="base", allow_pickle=first.allow_pickle, cache_dir=cache_dir)
    sources: dict[str, Any] = {}
    for run in spec.runs:
        for e in run.recipe.experts:
            sources.setdefault(e.name, e.source)
    names = [n for n in spec.pool if n in sources]
    pool = [resolve_source(sources[n], label=n, allow_pickle=first.allow_pickle, base=base, cache_dir=cache_dir)
            for n in names]
    pool_index = {n: i for i, n in enumerate(names)}
    plans: dict[str, Plan] = {}
    problems: list[str] = []
    for run in spec.runs:
        try:
            plans[run.run_id] = plan_merge(run.recipe, base, [pool[pool_index[e]] for e in run.experts])
        except OmnimergeError as exc:
            problems.append(f"run '{run.run_id}': {exc}")
    if problems:
        head = f"{len(problems)} of {len(spec.runs)} runs of sweep '{spec.name}' cannot be planned"
        raise PlanError(head + ":\n" + "\n".join(f"  - {p}" for p in problems[:20])
                        + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
                        + "\nFix the inputs or the sweep's rules, or leave those experts out of the subsets.")
    plan = SweepPlan(spec, base, pool, pool_index, plans, [], budget, max_batch_bytes)
    plan.passes = _make_passes(plan, [r.run_id for r in spec.runs])
    return plan


def _layout(plan: Plan) -> tuple:
    return tuple((j.filename, tuple(t.name for t in j.tensors)) for j in plan.jobs)


def _pass_cost(sp: SweepPlan, run_ids: Sequence[str]) -> tuple[int, int]:
    """(peak bytes, read bytes) of one pass over these runs."""
    plans = [sp.plans[r] for r in run_ids]
    experts = [sp.experts_of(sp.spec.run(r)) for r in run_ids]
    peak = read = 0
    for k in range(len(plans[0].jobs)):
        jobs = [p.jobs[k] for p in plans]
        peak = max(peak, estimate_job_bytes(jobs, experts, sp.max_batch_bytes))
        read += job_read_bytes(jobs, experts, sp.base, sp.pool)
    return peak, read


def _make_passes(sp: SweepPlan, run_ids: list[str]) -> list[SweepPass]:
    groups: dict[tuple, list[str]] = {}
    for rid in run_ids:
        groups.setdefault(_layout(sp.plans[rid]), []).append(rid)
    chunks: list[list[str]] = []
    over: list[str] = []
    budget = sp.memory_budget
    for members in groups.values():
        current: list[str] = []
        for rid in members:
            if current and budget is not None and _pass_cost(sp, current + [rid])[0] > budget:
                chunks.append(current)
                current = []
            current.append(rid)
            if len(current) == 1 and budget is not None and _pass_cost(sp, current)[0] > budget:
                over.append(rid)
        if current:
            chunks.append(current)
    if over:
        log.warning("%d run(s) need more than the memory budget of %.1f MB per job on their own (e.g. %s) and get "
                    "passes of their own; raise the budget or lower shard_size", len(over), budget / 1e6, over[0])
    passes = []
    for i, chunk in enumerate(chunks):
        peak, read = _pass_cost(sp, chunk)
        passes.append(SweepPass(i, chunk, peak, read))
    return passes


# ---- running ------------------------------------------------------------------------------------------

@dataclass
class _RunState:
    run: SweepRun
    plan: Plan
    out: Path
    pass_index: int
    staging: Staging | None = None
    results: dict[str, ShardResult] = field(default_factory=dict)
    model_stats: dict[str, Any] = field(default_factory=dict)
    status: str = "pending"  # pending | done | resumed | failed
    error: str = ""
    seconds: float = 0.0
    read_share: int = 0

    @property
    def active(self) -> bool:
        return self.status == "pending"

    def fail(self, message: str) -> None:
        if self.status == "pending":
            self.status, self.error = "failed", message
            log.warning("run %s failed: %s", self.run.run_id, message)


@dataclass
class SweepReport:
    """What ``run_sweep`` did: one row per run (the Parquet table's rows) and totals."""

    out_dir: Path
    plan: SweepPlan
    rows: list[dict[str, Any]]
    timings: dict[str, float]
    bytes_read: int
    executor: str = "local"

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] == "failed"]

    @property
    def bytes_written(self) -> int:
        return sum(r["bytes"] for r in self.rows if r["status"] == "done")

    def summary(self) -> str:
        by: dict[str, int] = {}
        for r in self.rows:
            by[r["status"]] = by.get(r["status"], 0) + 1
        t = self.timings.get("total", 0.0)
        lines = [f"Sweep '{self.plan.spec.name}': {len(self.rows)} runs in {len(self.plan.passes)} pass(es) at "
                 f"{self.out_dir} ({', '.join(f'{v} {k}' for k, v in sorted(by.items()))})",
                 f"  executor {self.executor}; read {self.bytes_read / 1e6:.1f} MB (separate merges would read "
                 f"{self.plan.separate_read_bytes / 1e6:.1f} MB), wrote {self.bytes_written / 1e6:.1f} MB in "
                 f"{t:.1f} s"]
        for r in self.failed:
            lines.append(f"  FAILED {r['run_id']}: {r['error']}")
        lines.append(f"  results: {self.out_dir / RESULTS_FILE}")
        return "\n".join(lines)


def run_sweep(spec: SweepSpec | SweepPlan, out_dir: str | Path, *, executor: Executor | None = None,
              device: str = "auto", progress: bool | ProgressFn = True, overwrite: bool = False,
              memory_budget: int | None = None, fault: str | None = None) -> SweepReport:
    """Run every merge of a sweep into ``out_dir/runs/RUN``; resumable; never raises for a failing run.

    Args:
        spec: the sweep (or its plan from :func:`plan_sweep`).
        out_dir: the sweep's output folder (created; reused on resume).
        executor: ``LocalExecutor`` by default; any executor whose jobs go through ``execute_job``.
        device: ``auto``, ``cpu`` or ``cuda``.
        progress: a tqdm bar (True), none (False), or a ``ProgressFn`` receiving ("tensor"/"job", bytes).
        overwrite: replace a run's output that exists from a *different* merge (otherwise that run fails).
        memory_budget: bytes per job; overrides the sweep file's ``memory_budget``.
        fault: fault injection for recovery tests (see ``JobContext.fault``).
    """
    t0 = time.perf_counter()
    sp = spec if isinstance(spec, SweepPlan) else plan_sweep(spec, memory_budget=memory_budget)
    out_dir = Path(out_dir)
    executor = executor or LocalExecutor()
    dev = choose_device(device)
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    _write_description(sp, out_dir)
    states = _prepare_runs(sp, out_dir, overwrite, dev, fault)
    t_prep = time.perf_counter()
    todo = sum(s.plan.write_bytes - sum(r.size for r in s.results.values()) for s in states.values() if s.active)
    bar = _Progress(todo, progress is True, "sweep") if not callable(progress) else None
    ctx = SweepContext(sp.base, sp.pool, device, fault)
    bytes_read = 0
    try:
        for p in sp.passes:
            jobs = _jobs_for_pass(sp, p, states)
            if not jobs:
                continue
            log.info("pass %d/%d: %d runs, %d jobs", p.index + 1, len(sp.passes), len(p.run_ids), len(jobs))
            seen: set[str] = set()

            def fold(res: SweepJobResult) -> None:
                nonlocal bytes_read
                if res.filename in seen:
                    return
                seen.add(res.filename)
                bytes_read += res.bytes_read
                _fold(res, states, out_dir, overwrite, executor.name)

            try:
                for res in executor.run(jobs, ctx, progress if callable(progress) else bar, fold):
                    fold(res)
            except Exception as exc:  # noqa: BLE001 - an executor failure loses this pass's unfinished runs only
                log.error("pass %d failed: %s", p.index + 1, exc)
                for rid in p.run_ids:
                    states[rid].fail(f"the executor failed during pass {p.index + 1}: {type(exc).__name__}: {exc}. "
                                     "Rerun the sweep to resume from the shards already verified.")
            for rid in p.run_ids:
                if states[rid].active:
                    states[rid].fail("incomplete: not every shard was produced. Rerun the sweep to resume.")
    finally:
        if bar is not None:
            bar.close()
        rows = [_row(s) for s in states.values()]
        _write_results(out_dir, rows)
    timings = {"prepare": t_prep - t0, "total": time.perf_counter() - t0}
    return SweepReport(out_dir, sp, rows, timings, bytes_read, executor.name)


def _write_description(sp: SweepPlan, out_dir: Path) -> None:
    (out_dir / "recipes").mkdir(exist_ok=True)
    doc = {"name": sp.spec.name, "digest": sp.spec.digest(), "source": str(sp.spec.path) if sp.spec.path else None,
           "passes": [{"runs": p.run_ids, "peak_bytes": p.peak_bytes, "read_bytes": p.read_bytes} for p in sp.passes],
           "runs": [{"run_id": r.run_id, "method": r.method, "parameters": r.params, "experts": list(r.experts),
                     "subset": r.subset, "recipe_digest": r.recipe.digest()} for r in sp.runs]}
    _atomic_text(out_dir / "sweep.json", json.dumps(doc, indent=1, default=str) + "\n")
    for r in sp.runs:
        _atomic_text(out_dir / "recipes" / f"{r.run_id}.yaml", yaml.safe_dump(r.document, sort_keys=False))


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _committed_digest(out: Path) -> str | None:
    try:
        return json.loads((out / MANIFEST).read_text()).get("plan_digest")
    except (OSError, ValueError):
        return None


def _prepare_runs(sp: SweepPlan, out_dir: Path, overwrite: bool, device: str,
                  fault: str | None) -> dict[str, _RunState]:
    states: dict[str, _RunState] = {}
    for p in sp.passes:
        for rid in p.run_ids:
            plan = sp.plans[rid]
            state = _RunState(sp.spec.run(rid), plan, out_dir / "runs" / rid, p.index)
            states[rid] = state
            if state.out.exists():
                if _committed_digest(state.out) == plan.digest():
                    state.status = "resumed"
                    state.results = {}
                    continue
                if not overwrite:
                    state.fail(f"output '{state.out}' exists but holds a different merge (or none). Delete it, or "
                               "pass overwrite (--overwrite) to replace it.")
                    continue
            try:
                state.staging = prepare_staging(plan, state.out, overwrite=overwrite)
                state.results = dict(state.staging.done)
                if plan.prepasses and len(state.results) < len(plan.jobs):
                    ctx = make_job_context(plan, state.staging.path, device, fault)
                    state.model_stats = run_prepasses(plan, ctx)
            except Exception as exc:  # noqa: BLE001 - this run only
                state.fail(f"{type(exc).__name__}: {exc}")
    return {r.run_id: states[r.run_id] for r in sp.runs}


def _jobs_for_pass(sp: SweepPlan, p: SweepPass, states: dict[str, _RunState]) -> list[SweepJob]:
    members = [states[r] for r in p.run_ids if states[r].active]
    if not members:
        return []
    jobs = []
    for k, shard in enumerate(members[0].plan.jobs):
        todo = [s for s in members if shard.filename not in s.results]
        if not todo:
            continue
        slots = []
        for s in todo:
            assert s.staging is not None  # active runs have staging
            recipe = s.run.recipe
            slots.append(RunSlot(run_id=s.run.run_id, job=s.plan.jobs[k], experts=sp.experts_of(s.run),
                                 weights=tuple(recipe.weights),
                                 expert_ids=tuple(f"{e.label}@{e.fingerprint()[:16]}" for e in s.plan.experts),
                                 seed=recipe.seed, staging=s.staging.path, label=s.run.run_id,
                                 model_stats=s.model_stats, max_batch_bytes=sp.max_batch_bytes,
                                 plan_digest=s.staging.plan_digest))
        sjobs = [sl.job for sl in slots]
        experts = [sl.experts for sl in slots]
        jobs.append(SweepJob(k, f"p{p.index + 1}/{shard.filename}", shard.filename, tuple(slots),
                             job_read_bytes(sjobs, experts, sp.base, sp.pool), sum(j.write_bytes for j in sjobs),
                             estimate_job_bytes(sjobs, experts, sp.max_batch_bytes), sum(j.flops for j in sjobs)))
    return jobs


def _fold(res: SweepJobResult, states: dict[str, _RunState], out_dir: Path, overwrite: bool, executor: str) -> None:
    for o in res.outcomes:
        state = states[o.run_id]
        if not state.active:
            continue
        if o.result is None:
            at = f" at tensor '{o.tensor}'" if o.tensor else ""
            state.fail(f"shard '{res.filename.split('/', 1)[-1]}' failed{at}: {o.error_type}: {o.error}")
            continue
        state.results[o.result.filename] = o.result
        state.seconds += o.result.seconds
        state.read_share += o.result.bytes_read
        if len(state.results) == len(state.plan.jobs):
            _commit(state, overwrite, executor)


def _commit(state: _RunState, overwrite: bool, executor: str) -> None:
    t0 = time.perf_counter()
    try:
        assert state.staging is not None
        commit_output(state.plan, state.staging, state.results, state.out, overwrite=overwrite,
                      timings={"shards": state.seconds},
                      extra_manifest={"executor": executor, "sweep_run": state.run.run_id})
    except Exception as exc:  # noqa: BLE001 - this run only
        state.fail(f"commit failed: {type(exc).__name__}: {exc}")
        return
    state.seconds += time.perf_counter() - t0
    state.status = "done"


def _row(s: _RunState) -> dict[str, Any]:
    done = s.status in ("done", "resumed")
    size = 0
    if done:
        size = sum(f.stat().st_size for f in s.out.glob("*.safetensors"))
    return {"run_id": s.run.run_id, "method": s.run.method, "parameters": json.dumps(s.run.params, sort_keys=True),
            "experts": list(s.run.experts), "subset": s.run.subset, "output": str(s.out) if done else "",
            "bytes": int(size), "seconds": round(float(s.seconds), 4), "status": s.status, "error": s.error,
            "read_bytes": int(s.read_share), "pass": s.pass_index + 1, "recipe_digest": s.run.recipe.digest()}


def _write_results(out_dir: Path, rows: list[dict[str, Any]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("run_id", pa.string()), ("method", pa.string()), ("parameters", pa.string()),
                        ("experts", pa.list_(pa.string())), ("subset", pa.string()), ("output", pa.string()),
                        ("bytes", pa.int64()), ("seconds", pa.float64()), ("status", pa.string()),
                        ("error", pa.string()), ("read_bytes", pa.int64()), ("pass", pa.int32()),
                        ("recipe_digest", pa.string())])
    table = pa.Table.from_pylist(rows, schema=schema)
    path = out_dir / RESULTS_FILE
    tmp = out_dir / f".{RESULTS_FILE}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def read_results(out_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a sweep's ``results.parquet``."""
    import pyarrow.parquet as pq

    return pq.read_table(Path(out_dir) / RESULTS_FILE).to_pylist()
