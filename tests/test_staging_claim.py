"""Shards carry the plan they were computed for: a writer of another plan never lands in a staging directory,
and resume and commit accept only records of their own plan.

The race this guards against: the driver of recipe A is SIGKILLed while a worker is mid-shard; the user deletes
A's staging directory and starts recipe B at the same output path; the orphaned worker finishes its shard of A.
Played here deterministically with the engine's real job function, no Ray (the Ray version is in
test_ray_executor.py): the swap happens inside the job, from its progress callback, after the shard was opened.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest

from omnimerge.engine.commit import prepare_staging, staging_dir_for
from omnimerge.engine.errors import ResumeError
from omnimerge.engine.execute import LocalExecutor, record_path, run_shard_job
from omnimerge.engine.merge import make_job_context, run_merge
from omnimerge.engine.plan import plan_merge
from omnimerge.engine.recipe import parse_recipe


def _recipe(zoo: Path, scale: float) -> Any:
    return parse_recipe({"base": str(zoo / "qwen_base"),
                         "experts": {e: str(zoo / e) for e in ("qwen_e0", "qwen_e1")},
                         "method": "task_arithmetic", "parameters": {"scale": scale}, "shard_size": "60KB",
                         "name": f"ta-{scale}"})


def _shards(out: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(out.glob("*.safetensors"))}


@pytest.fixture
def plans(zoo_dir: Path) -> tuple[Any, Any]:
    a, b = plan_merge(_recipe(zoo_dir, 0.7)), plan_merge(_recipe(zoo_dir, 0.8))
    # Same layout, different recipe: exactly the case where a stale shard would fit unnoticed.
    assert [j.filename for j in a.jobs] == [j.filename for j in b.jobs] and len(a.jobs) >= 4
    assert a.digest() != b.digest()
    return a, b


def _plant_foreign_shard(plan_b: Any, filename: str, staging: Path, scratch: Path) -> None:
    """Compute plan B's shard for real (in its own staging) and put shard + record into ``staging``: what an
    orphaned worker of B would have left there without the plan check."""
    other = prepare_staging(plan_b, scratch)
    run_shard_job(next(j for j in plan_b.jobs if j.filename == filename),
                  make_job_context(plan_b, other.path, "cpu"))
    shutil.copyfile(other.path / filename, staging / filename)
    record_path(staging, filename).parent.mkdir(exist_ok=True)
    shutil.copyfile(record_path(other.path, filename), record_path(staging, filename))


def test_worker_of_old_plan_discards_its_shard_when_staging_was_recreated(plans, tmp_path: Path) -> None:
    plan_a, plan_b = plans
    out = tmp_path / "out"
    staging_a = prepare_staging(plan_a, out)
    ctx = make_job_context(plan_a, staging_a.path, "cpu")
    job = plan_a.jobs[1]
    swapped: list[Any] = []

    def user_restarts_with_recipe_b(event: str, nbytes: int) -> None:  # first tensor done, shard file open
        if not swapped:
            shutil.rmtree(staging_a.path)
            swapped.append(prepare_staging(plan_b, out))

    with pytest.raises(ResumeError) as info:
        run_shard_job(job, ctx, user_restarts_with_recipe_b)
    staging = staging_dir_for(out)
    assert swapped and str(info.value) == (
        f"Shard '{job.filename}' was computed for plan {plan_a.digest()[:12]}… (recipe ta-0.7), but staging "
        f"'{staging}' now belongs to another plan ({plan_b.digest()[:12]}…); the shard was discarded, not "
        "written. This happens when a worker of an interrupted run outlives its driver; the current run computes "
        "its own shards, so nothing needs doing.")
    # B's staging holds nothing of A: no shard, no record, no temporary file.
    assert sorted(p.name for p in staging.iterdir()) == ["staging.json"]

    # B then runs (resuming nothing) and equals a clean run of B.
    report = run_merge(plan_b.recipe, out, executor=LocalExecutor(1), progress=False)
    assert report.resumed == []
    run_merge(plan_b.recipe, tmp_path / "clean-b", executor=LocalExecutor(1), progress=False)
    assert _shards(out) == _shards(tmp_path / "clean-b")


def test_queued_job_of_old_plan_does_not_start_in_a_recreated_staging(plans, tmp_path: Path) -> None:
    # The likelier race: an orphaned Ray actor starts a job queued before its driver died, after the swap.
    plan_a, plan_b = plans
    out = tmp_path / "out"
    staging_a = prepare_staging(plan_a, out)
    ctx = make_job_context(plan_a, staging_a.path, "cpu")
    shutil.rmtree(staging_a.path)
    prepare_staging(plan_b, out)
    with pytest.raises(ResumeError, match=rf"now belongs to another plan \({plan_b.digest()[:12]}…\); the shard "
                                          "was discarded, not written"):
        run_shard_job(plan_a.jobs[0], ctx)
    assert sorted(p.name for p in staging_dir_for(out).iterdir()) == ["staging.json"]


def test_worker_of_old_plan_never_recreates_a_deleted_staging(plans, tmp_path: Path) -> None:
    plan_a, _ = plans
    out = tmp_path / "out"
    staging_a = prepare_staging(plan_a, out)
    ctx = make_job_context(plan_a, staging_a.path, "cpu")
    shutil.rmtree(staging_a.path)  # the user deleted it; a queued job of the dead driver starts now
    with pytest.raises(ResumeError, match=r"no longer exists or holds no omnimerge staging state \(deleted, or "
                                          r"already committed\); the shard was discarded"):
        run_shard_job(plan_a.jobs[0], ctx)
    assert not staging_a.path.exists()  # a later `omnimerge merge` would otherwise refuse a stateless staging


def test_temp_name_and_record_carry_the_plan_digest(plans, tmp_path: Path) -> None:
    plan_a, _ = plans
    staging = prepare_staging(plan_a, tmp_path / "out")
    seen: list[str] = []

    def look(event: str, nbytes: int) -> None:
        seen.extend(p.name for p in staging.path.glob(".*.tmp"))

    job = plan_a.jobs[0]
    result = run_shard_job(job, make_job_context(plan_a, staging.path, "cpu"), look)
    assert seen and all(n.startswith(f".{job.filename}.{plan_a.digest()[:12]}.") for n in seen)
    record = json.loads(record_path(staging.path, job.filename).read_text())
    assert record["plan_digest"] == result.plan_digest == plan_a.digest()


def test_resume_redoes_shards_recorded_for_another_plan(plans, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    plan_a, plan_b = plans
    out = tmp_path / "out"
    staging = prepare_staging(plan_a, out)
    ctx = make_job_context(plan_a, staging.path, "cpu")
    for job in plan_a.jobs[:3]:
        run_shard_job(job, ctx)
    foreign, kept, legacy = (j.filename for j in plan_a.jobs[:3])
    _plant_foreign_shard(plan_b, foreign, staging.path, tmp_path / "b")
    # A record from before records carried a digest: not trusted either.
    rec = json.loads(record_path(staging.path, legacy).read_text())
    del rec["plan_digest"]
    record_path(staging.path, legacy).write_text(json.dumps(rec))

    with caplog.at_level(logging.WARNING, logger="omnimerge.engine.commit"):
        report = run_merge(plan_a.recipe, out, executor=LocalExecutor(1), progress=False)
    assert report.resumed == [kept]  # the foreign and the digest-less shard were recomputed
    assert (f"shard {foreign} in staging was recorded for plan {plan_b.digest()[:12]}, not this one "
            f"({plan_a.digest()[:12]}); it will be redone") in caplog.text
    assert f"shard {legacy} in staging was recorded for plan (none)" in caplog.text
    run_merge(plan_a.recipe, tmp_path / "clean-a", executor=LocalExecutor(1), progress=False)
    assert _shards(out) == _shards(tmp_path / "clean-a")


class _StaleWriterAfterRun:
    """The local executor, after which a stale writer of plan B overwrites one finished shard and its record
    (what a worker of an earlier run could do between this run's write and its commit)."""

    name = "local"

    def __init__(self, plan_b: Any, filename: str, scratch: Path) -> None:
        self.plan_b, self.filename, self.scratch = plan_b, filename, scratch

    def run(self, jobs: Any, ctx: Any, progress: Any = None, on_result: Any = None) -> list[Any]:
        results = LocalExecutor(1).run(jobs, ctx, progress, on_result)
        _plant_foreign_shard(self.plan_b, self.filename, Path(ctx.staging), self.scratch)
        return results


def test_commit_refuses_a_shard_recorded_for_another_plan_and_rerun_repairs(plans, tmp_path: Path) -> None:
    plan_a, plan_b = plans
    out = tmp_path / "out"
    victim = plan_a.jobs[2].filename
    with pytest.raises(ResumeError) as info:
        run_merge(plan_a.recipe, out, executor=_StaleWriterAfterRun(plan_b, victim, tmp_path / "b"),
                  progress=False)
    staging = staging_dir_for(out)
    assert str(info.value) == (
        f"Cannot commit '{staging}' (plan {plan_a.digest()[:12]}…): '{victim}': recorded for plan "
        f"{plan_b.digest()[:12]}…. Another run (e.g. a worker outliving a killed driver) wrote into this staging. "
        "Nothing was committed; rerun the same command: it verifies every shard against its record and redoes "
        "the others.")
    assert not out.exists() and (staging / "staging.json").is_file()
    assert not (staging / "omnimerge_manifest.json").exists()

    report = run_merge(plan_a.recipe, out, executor=LocalExecutor(1), progress=False)
    assert sorted(set(j.filename for j in plan_a.jobs) - set(report.resumed)) == [victim]
    run_merge(plan_a.recipe, tmp_path / "clean-a", executor=LocalExecutor(1), progress=False)
    assert _shards(out) == _shards(tmp_path / "clean-a")
