"""Runs of a sweep job computed two at a time (engine.shard_runs._whole_tensor_lanes): the same bytes as each
run alone, shared values computed once, and a bad input fails only the runs that use it."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from omnimerge.engine.errors import NonFiniteError
from omnimerge.engine.plan import plan_merge
from omnimerge.engine.recipe import parse_recipe
from omnimerge.engine.shard_runs import RunSlot, _Busy, _OnceMemo, run_slots


@pytest.fixture
def two_cores():
    """The job may use two cores whatever this machine has (lanes need at least two)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


def test_once_memo_computes_each_value_once_and_tells_other_lanes_it_is_busy() -> None:
    memo = _OnceMemo()
    started, release = threading.Event(), threading.Event()
    calls: list[str] = []

    def slow() -> int:
        calls.append("slow")
        started.set()
        release.wait(5)
        return 42

    got: list[int] = []
    lane = threading.Thread(target=lambda: got.append(memo.remember_once("k", slow)))
    lane.start()
    assert started.wait(5)
    with pytest.raises(_Busy) as busy:  # another lane asking meanwhile does not wait and does not compute
        memo.remember_once("k", lambda: calls.append("again") or 0)
    assert not busy.value.event.is_set()
    release.set()
    lane.join(5)
    assert busy.value.event.is_set() and got == [42]
    assert memo.remember_once("k", lambda: calls.append("again") or 0) == 42
    assert calls == ["slow"]
    assert not isinstance(busy.value, Exception)  # a method's `except Exception` cannot swallow it

    def failing() -> int:
        raise ValueError("boom")

    with pytest.raises(ValueError):
        memo.remember_once("f", failing)
    assert "f" not in memo  # a failed value is not kept: the next run computes it again
    assert memo.remember_once("f", lambda: 7) == 7


def _recipe(zoo: Path, experts: dict, method: str, params: dict):
    return parse_recipe({"base": str(zoo / "qwen_base"),
                         "experts": {n: {"source": str(p), "weight": w} for n, (p, w) in experts.items()},
                         "method": method, "parameters": params, "shard_size": "60KB", "seed": 5})


def _slots(zoo: Path, pool: dict, runs: list[tuple[str, tuple[str, ...], str, dict]], tmp: Path):
    """Per job: the slots of every run (run id, its experts from ``pool``, method, parameters)."""
    names = list(pool)
    full = plan_merge(_recipe(zoo, pool, "task_arithmetic", {}))
    ids = {e.label: f"{e.label}@{e.fingerprint()[:16]}" for e in full.experts}
    per_job: list[list[RunSlot]] = [[] for _ in full.jobs]
    for run_id, experts, method, params in runs:
        recipe = _recipe(zoo, {e: pool[e] for e in experts}, method, params)
        plan = plan_merge(recipe)
        assert [j.filename for j in plan.jobs] == [j.filename for j in full.jobs]
        for k, job in enumerate(plan.jobs):
            per_job[k].append(RunSlot(run_id=run_id, job=job, experts=tuple(names.index(e) for e in experts),
                                      weights=tuple(recipe.weights), expert_ids=tuple(ids[e] for e in experts),
                                      seed=recipe.seed, staging=tmp / run_id, label=run_id))
    return full, per_job


RUNS = [("ties-a", ("e0", "e1", "e2"), "ties", {"density": 0.2, "scale": 0.5}),
        ("ties-b", ("e0", "e1", "e2"), "ties", {"density": 0.2, "scale": 1.0}),
        ("ties-c", ("e0", "e1", "e2"), "ties", {"density": 0.5, "scale": 0.5}),
        ("ties-d", ("e1", "e0"), "ties", {"density": 0.5, "scale": 0.7}),
        ("ta", ("e0", "e1", "e2"), "task_arithmetic", {"scale": 0.3}),
        ("dare", ("e0", "e2"), "dare_ties", {"p": 0.3, "density": 0.6}),
        ("crumbs", ("e0", "e1", "e2"), "breadcrumbs", {"density": 0.8, "gamma": 0.05})]


def test_runs_on_lanes_write_the_bytes_of_each_run_alone(zoo_dir: Path, tmp_path: Path, two_cores) -> None:
    pool = {"e0": (zoo_dir / "qwen_e0", 1.0), "e1": (zoo_dir / "qwen_e1", 0.5), "e2": (zoo_dir / "qwen_e2", 1.0)}
    full, per_job = _slots(zoo_dir, pool, RUNS, tmp_path / "together")
    _, alone = _slots(zoo_dir, pool, RUNS, tmp_path / "alone")
    lanes = 0
    for slots, lone in zip(per_job, alone):
        stats: dict = {}
        outcomes = run_slots(slots, full.base, full.experts, stats=stats)
        assert all(o.ok for o in outcomes), [o.error for o in outcomes]
        lanes += stats["lane_tensors"]
        for slot in lone:
            (o,) = run_slots([slot], full.base, full.experts)
            assert o.ok, o.error
    assert lanes >= len(full.tensors) // 2  # the TIES family merges whole tensors: most went on lanes
    for run_id, *_ in RUNS:
        for job in full.jobs:
            got = (tmp_path / "together" / run_id / job.filename).read_bytes()
            assert got == (tmp_path / "alone" / run_id / job.filename).read_bytes(), (run_id, job.filename)


def test_a_bad_expert_read_ahead_fails_only_the_runs_that_use_it(zoo_dir: Path, tmp_path: Path,
                                                                two_cores) -> None:
    full0 = plan_merge(_recipe(zoo_dir, {"e0": (zoo_dir / "qwen_e0", 1.0)}, "ties", {}))
    job = next(j for j in full0.jobs if len(j.tensors) > 2)
    target = job.tensors[2].name  # not the first tensor of its shard: read ahead while the one before merges
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in (zoo_dir / "qwen_e2").iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    shard = bad / index["weight_map"][target]
    tensors = load_file(shard)
    tensors[target].view(-1)[0] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})

    pool = {"e0": (zoo_dir / "qwen_e0", 1.0), "e1": (zoo_dir / "qwen_e1", 1.0), "bad": (bad, 1.0)}
    runs = [("good", ("e0", "e1"), "ties", {"density": 0.3}),
            ("bad-ties", ("e0", "bad"), "ties", {"density": 0.3}),
            ("bad-ta", ("e1", "bad"), "task_arithmetic", {"scale": 0.5}),
            ("good-2", ("e1", "e0"), "ties", {"density": 0.6})]
    full, per_job = _slots(zoo_dir, pool, runs, tmp_path / "together")
    k = [j.filename for j in full.jobs].index(job.filename)
    stats: dict = {}
    outcomes = {o.run_id: o for o in run_slots(per_job[k], full.base, full.experts, stats=stats)}
    assert stats["lane_tensors"] >= 2
    for run_id in ("bad-ties", "bad-ta"):
        o = outcomes[run_id]
        assert not o.ok and o.tensor == target and isinstance(o.error, NonFiniteError)
        assert f"Tensor '{target}' of expert 'bad' ({bad}) holds 1 non-finite value(s)" in str(o.error)
        assert not (tmp_path / "together" / run_id / job.filename).exists()  # nothing half-written
    _, alone = _slots(zoo_dir, pool, runs, tmp_path / "alone")
    for slot in alone[k]:
        if slot.run_id.startswith("good"):
            assert outcomes[slot.run_id].ok
            (o,) = run_slots([slot], full.base, full.experts)
            assert o.ok
            assert (tmp_path / "together" / slot.run_id / job.filename).read_bytes() == \
                (tmp_path / "alone" / slot.run_id / job.filename).read_bytes()
