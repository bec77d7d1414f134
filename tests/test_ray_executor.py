"""The Ray executor on real Ray: byte-identical to the local executor, a killed worker retried elsewhere, a
node lost mid-run, the driver killed and resumed (only the remaining shards recomputed), resume refused after
the recipe changed, worker errors naming tensor/shard/recipe, and the no-shared-storage mode.

Tiny Qwen2-VL checkpoints (conftest ``zoo_dir``) forced into 9 shards. Ray session folders go into short
temporary directories that are removed afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from safetensors.torch import load_file, save_file

from omnimerge.cluster.cluster_plan import dispatch_order
from omnimerge.cluster.ray_executor import RayExecutor, ray_session
from omnimerge.engine.commit import prepare_staging, staging_dir_for
from omnimerge.engine.errors import NonFiniteError, ResumeError
from omnimerge.engine.execute import LocalExecutor
from omnimerge.engine.merge import run_merge
from omnimerge.engine.plan import plan_merge
from omnimerge.engine.recipe import parse_recipe

pytestmark = pytest.mark.ray

RAY_ARGS = {"include_dashboard": False, "object_store_memory": 200 * 1024**2}
EXPERTS = ("qwen_e0", "qwen_e1")


def _doc(zoo: Path, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"base": str(zoo / "qwen_base"), "experts": {e: str(zoo / e) for e in EXPERTS}, "method": method,
            "parameters": params or {}, "shard_size": "60KB", "seed": 3}


def _weights(out: Path) -> dict[str, bytes]:
    """Every file that carries the model: shards, index, config."""
    files = sorted(out.glob("*.safetensors")) + [out / "model.safetensors.index.json", out / "config.json"]
    return {f.name: f.read_bytes() for f in files}


_REFERENCES: dict[str, dict[str, bytes]] = {}


def _reference(zoo: Path, tmp: Path, method: str, params: dict[str, Any] | None = None) -> dict[str, bytes]:
    """The local executor's output for this recipe (computed once per module)."""
    key = json.dumps([method, params], sort_keys=True)
    if key not in _REFERENCES:
        out = tmp / f"local-{method}-{len(_REFERENCES)}"
        run_merge(parse_recipe(_doc(zoo, method, params)), out, executor=LocalExecutor(1), progress=False)
        _REFERENCES[key] = _weights(out)
    return _REFERENCES[key]


@pytest.fixture(scope="module")
def ref_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("reference")


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory for Ray's session files (Unix socket paths are limited to ~107 characters)."""
    path = Path(tempfile.mkdtemp(prefix="omr-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class TestOnLocalRay:
    """One local Ray instance (2 CPUs and 2 fake GPUs, so workers are placed as GPU actors and fall back to
    CPU math, as on a GPU node whose CUDA is unusable)."""

    @pytest.fixture(scope="class", autouse=True)
    @classmethod
    def ray_instance(cls) -> Iterator[None]:
        import ray

        temp = Path(tempfile.mkdtemp(prefix="omr-", dir="/tmp"))
        ray.init(address="local", num_cpus=2, num_gpus=2, _temp_dir=str(temp), **RAY_ARGS)
        yield
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)

    @pytest.mark.parametrize("method,params", [
        ("task_arithmetic", {"scale": 0.7}),
        ("iso_c", {}),  # SVD: bit-identical only with the same torch thread count (RayExecutor threads)
        ("optmerge", {"steps": 3}),
    ])
    def test_byte_identical_to_local_executor(self, zoo_dir: Path, ref_dir: Path, tmp_path: Path, method: str,
                                              params: dict[str, Any]) -> None:
        executor, report = _merge_on_both_workers(parse_recipe(_doc(zoo_dir, method, params)), tmp_path / "ray",
                                                  tmp_path / "hold")
        assert len(report.results) == 9
        assert _weights(tmp_path / "ray") == _reference(zoo_dir, ref_dir, method, params)
        stats = executor.worker_stats()
        # Two GPU actors, one fake GPU each (each sees only its own: CUDA_VISIBLE_DEVICES set by Ray per actor);
        # CUDA is not usable here, so both computed on CPU.
        assert sorted(g for w in stats.values() for g in w["gpu_ids"]) == ["0", "1"]
        assert all(w["cuda_visible_devices"] == w["gpu_ids"][0] for w in stats.values())
        # OpenMP threads of the workers sleep when idle unless the driver's environment chose otherwise.
        assert {w["omp_wait_policy"] for w in stats.values()} == {os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
        assert {w["device"] for w in stats.values()} == {"cpu"}
        assert sum(w["jobs"] for w in stats.values()) == 9
        assert sum(w["bytes_written"] for w in stats.values()) == report.bytes_written
        manifest = json.loads((tmp_path / "ray" / "omnimerge_manifest.json").read_text())
        assert manifest["executor"] == "ray" and manifest["executor_stats"]["retries"] == 0
        assert {s["worker"].split("@")[0] for s in manifest["shards"].values()} <= {"w0", "w1"}

    def test_killed_worker_is_retried_on_another_worker(self, zoo_dir: Path, ref_dir: Path, tmp_path: Path) -> None:
        recipe = parse_recipe(_doc(zoo_dir, "task_arithmetic", {"scale": 0.7}))
        job = plan_merge(recipe).jobs[4]
        marker = tmp_path / "killed-once"
        executor = RayExecutor(workers=2)
        report = run_merge(recipe, tmp_path / "ray", executor=executor, progress=False,
                           fault=f"{job.tensors[0].name}:{marker}")
        assert marker.is_file() and "killed pid" in marker.read_text()  # a worker process really died there
        assert _weights(tmp_path / "ray") == _reference(zoo_dir, ref_dir, "task_arithmetic", {"scale": 0.7})
        stats = executor.stats()
        # The killed worker's running job, and any job queued behind it, were resubmitted to the other one.
        (dead,) = stats["retried_shards"][job.filename]
        assert stats["retries"] == len(stats["retried_shards"]) >= 1
        for shard, lost_on in stats["retried_shards"].items():
            assert lost_on == [dead] and not report.results[shard].worker.startswith(dead + "@")
        assert [w["worker_deaths"] for w in stats["workers"].values()].count(1) == 1
        assert f"retries: {stats['retries']}" in report.summary()

    def test_worker_error_names_tensor_shard_and_recipe_and_staging_stays(self, zoo_dir: Path, tmp_path: Path) -> None:
        bad = tmp_path / "nan_expert"
        shutil.copytree(zoo_dir / "qwen_e1", bad)
        target = "model.layers.1.self_attn.o_proj.weight"
        index = json.loads((bad / "model.safetensors.index.json").read_text())
        shard = bad / index["weight_map"][target]
        tensors = load_file(shard)
        tensors[target][2, 3] = float("nan")
        save_file(tensors, shard, metadata={"format": "pt"})
        doc = _doc(zoo_dir, "task_arithmetic")
        doc["experts"]["nanny"] = str(bad)
        doc["name"] = "nan-recipe"
        recipe = parse_recipe(doc)
        plan = plan_merge(recipe)
        (job,) = [j for j in plan.jobs if target in [t.name for t in j.tensors]]
        out = tmp_path / "out"
        with pytest.raises(NonFiniteError) as info:
            run_merge(recipe, out, executor=RayExecutor(workers=2), progress=False)
        text = str(info.value)
        assert f"Shard '{job.filename}'" in text and "nan-recipe" in text
        assert f"Tensor '{target}' of expert 'nanny'" in text and "non-finite" in text
        staging = staging_dir_for(out)
        assert not out.exists() and (staging / "staging.json").is_file()  # kept for a resume, never complete
        assert not (staging / ".records" / f"{job.filename}.json").exists()
        assert not (staging / job.filename).exists()
        assert not (staging / "omnimerge_manifest.json").exists()
        assert not list(staging.glob(".*.tmp"))  # the failed shard's partial file is gone too
        # The shards that finished are recorded for this plan, so a rerun resumes them (same records, same
        # files: not recomputed) and stops at the same tensor with the same message.
        records = {p.name: p.read_text() for p in (staging / ".records").glob("*.json")}
        assert records and all(json.loads(r)["plan_digest"] == plan.digest() for r in records.values())
        mtimes = {name: (staging / name[:-5]).stat().st_mtime_ns for name in records}
        with pytest.raises(NonFiniteError) as again:
            run_merge(recipe, out, executor=RayExecutor(workers=2), progress=False)
        assert str(again.value) == text
        assert {name: (staging / name[:-5]).stat().st_mtime_ns for name in records} == mtimes
        assert not out.exists() and not (staging / "omnimerge_manifest.json").exists()

    def test_held_worker_of_a_replaced_plan_writes_nothing_into_the_new_staging(self, zoo_dir: Path, ref_dir: Path,
                                                                                tmp_path: Path) -> None:
        # The orphaned-worker race, on real Ray actors: a worker is about to start a shard of recipe A when the
        # user deletes A's staging and starts recipe B at the same output path. (Here A's driver is still alive
        # and gets the worker's error; an orphan's would go nowhere, but it writes nothing either way.)
        recipe_a = parse_recipe(_doc(zoo_dir, "task_arithmetic", {"scale": 0.7}))
        recipe_b = parse_recipe(_doc(zoo_dir, "task_arithmetic", {"scale": 0.8}))
        plan_a, plan_b = plan_merge(recipe_a), plan_merge(recipe_b)
        jobs = dispatch_order(plan_a.jobs)
        hold = tmp_path / "hold"
        hold.write_text("held")
        out = tmp_path / "out"
        box: dict[str, Any] = {}

        def merge_a() -> None:
            try:
                run_merge(recipe_a, out, executor=RayExecutor(workers=1, hold=f"{jobs[2].filename}:{hold}"),
                          progress=False)
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                box["error"] = exc

        thread = threading.Thread(target=merge_a, daemon=True)
        thread.start()
        _wait_for(lambda: bool(_held(hold)) or not thread.is_alive(), 120, "the worker to reach the 3rd shard")
        staging = staging_dir_for(out)
        shutil.rmtree(staging)
        prepare_staging(plan_b, out)
        hold.unlink()
        thread.join(timeout=120)
        assert not thread.is_alive()
        error = box.get("error")
        assert isinstance(error, ResumeError), error
        assert str(error).startswith(f"Shard '{jobs[2].filename}' was computed for plan {plan_a.digest()[:12]}… "
                                     f"(recipe recipe {recipe_a.digest()[:12]}), but staging '{staging}' now "
                                     f"belongs to another plan ({plan_b.digest()[:12]}…); the shard was discarded")
        assert sorted(p.name for p in staging.iterdir()) == ["staging.json"]  # nothing of A: no shard, record, tmp
        report = run_merge(recipe_b, out, executor=RayExecutor(workers=2), progress=False)
        assert report.resumed == [] and len(report.results) == 9
        assert _weights(out) == _reference(zoo_dir, ref_dir, "task_arithmetic", {"scale": 0.8})

    def test_no_shared_storage_workers_return_bytes_coordinator_writes(self, zoo_dir: Path, ref_dir: Path,
                                                                       tmp_path: Path) -> None:
        # dare_ties is random (seeded by the recipe seed and the tensor name): the same bits on every worker.
        scratch = tmp_path / "node-scratch"
        recipe = parse_recipe(_doc(zoo_dir, "dare_ties", {"p": 0.3, "density": 0.5}))
        sizes = sorted(j.write_bytes for j in plan_merge(recipe).jobs)
        budget = sizes[-1] + sizes[-2]  # bytes in flight bounded, yet any two shards fit: one per worker
        executor, report = _merge_on_both_workers(recipe, tmp_path / "ray", tmp_path / "hold", storage="none",
                                                  scratch_dir=scratch, max_inflight_bytes=budget)
        assert _weights(tmp_path / "ray") == _reference(zoo_dir, ref_dir, "dare_ties", {"p": 0.3, "density": 0.5})
        stats = executor.stats()
        # Every shard's bytes crossed the object store and were written by the coordinator.
        assert stats["transferred_bytes"] == report.bytes_written
        dirs = [Path(w["scratch"]) for w in stats["workers"].values()]
        assert len(set(dirs)) == 2 and all(d.parent == scratch for d in dirs)  # one private directory per worker
        assert not any(d.exists() for d in dirs)  # cleaned when the workers stopped
        staging = staging_dir_for(tmp_path / "ray")
        assert all(str(staging) not in str(d) for d in dirs)


def _held(hold: Path) -> list[Path]:
    return sorted(hold.parent.glob(f"{hold.name}.*.held"))


def _merge_on_both_workers(recipe: Any, out: Path, hold: Path, **executor_kwargs: Any) -> tuple[RayExecutor, Any]:
    """Merge on 2 workers, holding each worker's first job until both hold one, so both take part: on the tiny
    models the worker that starts first could otherwise finish all 9 jobs before the other one is up."""
    hold.write_text("held")
    executor = RayExecutor(workers=2, hold=f"*:{hold}", **executor_kwargs)
    box: dict[str, Any] = {}

    def merge() -> None:
        try:
            box["report"] = run_merge(recipe, out, executor=executor, progress=False)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            box["error"] = exc

    thread = threading.Thread(target=merge, daemon=True)
    thread.start()
    try:
        _wait_for(lambda: len(_held(hold)) == 2 or not thread.is_alive(), 120, "both workers to hold a job")
    finally:
        hold.unlink()
    thread.join(timeout=240)
    assert not thread.is_alive(), "merge did not finish"
    if "error" in box:
        raise box["error"]
    return executor, box["report"]


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.mark.slow
def test_node_lost_mid_run_its_shards_are_redone_elsewhere(zoo_dir: Path, ref_dir: Path, tmp_path: Path,
                                                            short_tmp: Path) -> None:
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "temp_dir": str(short_tmp),
                                                            "object_store_memory": 100 * 1024**2})
    try:
        nodes = [cluster.add_node(num_cpus=1, object_store_memory=100 * 1024**2) for _ in range(2)]
        cluster.wait_for_nodes()
        with ray_session(cluster.address) as info:  # joins; leaves the cluster running on exit
            assert not info.started_here and info.nodes == 3 and info.cpus == 2
            hold = tmp_path / "hold"
            hold.write_text("held")
            # Every worker waits before its first shard, so both nodes hold work in flight when one goes.
            executor = RayExecutor(workers=2, hold=f"*:{hold}")
            recipe = parse_recipe(_doc(zoo_dir, "task_arithmetic", {"scale": 0.7}))
            box: dict[str, Any] = {}

            def merge() -> None:
                try:
                    box["report"] = run_merge(recipe, tmp_path / "out", executor=executor, progress=False)
                except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                    box["error"] = exc

            thread = threading.Thread(target=merge, daemon=True)
            thread.start()
            _wait_for(lambda: len(_held(hold)) == 2, 120, "both workers to hold")
            cluster.remove_node(nodes[1])
            hold.unlink()
            thread.join(timeout=240)
            assert not thread.is_alive(), "merge did not finish after the node was lost"
            assert "error" not in box, box.get("error")
            report = box["report"]
            assert _weights(tmp_path / "out") == _reference(zoo_dir, ref_dir, "task_arithmetic", {"scale": 0.7})
            stats = executor.stats()
            lost = [slot for slot, w in stats["workers"].items() if w["worker_deaths"]]
            assert stats["retries"] >= 1 and len(lost) == 1
            for shard in stats["retried_shards"]:
                assert not report.results[shard].worker.startswith(lost[0] + "@")  # redone on the surviving node
        # The session only disconnected: the cluster (someone else's, from the merge's point of view) still runs.
        assert not ray.is_initialized()
        ray.init(address=cluster.address)
        assert sum(1 for n in ray.nodes() if n["Alive"]) == 2  # head + the surviving worker node
    finally:
        ray.shutdown()
        cluster.shutdown()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.is_file() and stat.read_text().split(")")[-1].split()[0] == "Z")  # a zombie is gone


def _cli(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "omnimerge.cluster.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, err


@pytest.mark.slow
def test_driver_killed_then_resumed_only_remaining_shards_computed(zoo_dir: Path, ref_dir: Path, tmp_path: Path,
                                                                    short_tmp: Path) -> None:
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(_doc(zoo_dir, "task_arithmetic", {"scale": 0.7})))
    # The order the executor hands jobs out (longest first, as `plan --cluster` schedules them).
    jobs = dispatch_order(plan_merge(parse_recipe(_doc(zoo_dir, "task_arithmetic", {"scale": 0.7}))).jobs)
    out = tmp_path / "out"
    staging = staging_dir_for(out)
    hold = tmp_path / "hold"
    hold.write_text("held")
    env = {**os.environ, "RAY_TMPDIR": str(short_tmp), "OMNIMERGE_HOLD": f"{jobs[4].filename}:{hold}"}
    args = ["merge", str(recipe_file), "-o", str(out), "--workers", "1", "--no-progress"]

    # 1. The driver runs 4 shards and holds before the 5th; then it is SIGKILLed (no cleanup of any kind).
    proc = _cli(args, env)
    try:
        _wait_for(lambda: bool(_held(hold)) or proc.poll() is not None, 180, "the worker to reach the 5th shard")
        assert proc.poll() is None, proc.communicate()[1]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # The local Ray instance the driver started goes down with it; its worker (in a process group of its own)
    # follows once its raylet is gone. Wait for that before releasing the hold, or it would carry on.
    (held,) = _held(hold)
    worker_pid = int(held.read_text().split("pid")[1])
    _wait_for(lambda: not _alive(worker_pid), 60, f"the orphaned Ray worker {worker_pid} to exit")
    records = sorted(p.name for p in (staging / ".records").glob("*.json"))
    assert records == sorted(f"{j.filename}.json" for j in jobs[:4])
    assert not out.exists()
    hold.unlink()
    env.pop("OMNIMERGE_HOLD")

    # 2. A changed recipe refuses to resume into that staging, and leaves it alone.
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(_doc(zoo_dir, "task_arithmetic", {"scale": 0.8})))
    code, err = _finish(_cli(["merge", str(changed), "-o", str(out), "--workers", "1", "--no-progress"], env))
    assert code == 1, err
    assert f"Cannot resume into '{staging}': the recipe changed since that staging was written" in err
    assert sorted(p.name for p in (staging / ".records").glob("*.json")) == records

    # 3. The same command again: resumes, computes only the other 5 shards, and the output matches a local run.
    code, err = _finish(_cli(args, env))
    assert code == 0, err
    manifest = json.loads((out / "omnimerge_manifest.json").read_text())
    resumed = sorted(name for name, s in manifest["shards"].items() if s["resumed"])
    computed = sorted(name for name, s in manifest["shards"].items() if not s["resumed"])
    assert resumed == sorted(j.filename for j in jobs[:4])
    assert computed == sorted(j.filename for j in jobs[4:]) and len(computed) == 5
    assert "5 shard(s) computed, 4 resumed from staging" in err
    assert _weights(out) == _reference(zoo_dir, ref_dir, "task_arithmetic", {"scale": 0.7})
    assert not staging.exists()


@pytest.mark.ray
def test_cpu_workers_that_oversubscribe_the_node_are_warned_about(zoo_dir: Path, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    import torch

    recipe = parse_recipe(_doc(zoo_dir, "task_arithmetic", {"scale": 0.7}))
    temp = Path(tempfile.mkdtemp(prefix="omr-", dir="/tmp"))
    try:
        with ray_session(None, num_cpus=2, _temp_dir=str(temp), **RAY_ARGS), \
                caplog.at_level("WARNING", logger="omnimerge.cluster.ray_executor"):
            run_merge(recipe, tmp_path / "two", executor=RayExecutor(workers=2), progress=False)
            warned = [r.getMessage() for r in caplog.records if "oversubscribed" in r.getMessage()]
            caplog.clear()
            run_merge(recipe, tmp_path / "one", executor=RayExecutor(workers=2, threads=1), progress=False)
            quiet = [r.getMessage() for r in caplog.records if "oversubscribed" in r.getMessage()]
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    threads = torch.get_num_threads()
    if threads > 1:  # 2 workers × N threads on a 2-CPU node
        assert warned == [f"2 CPU worker(s) per node × {threads} torch threads each on nodes with 2 CPUs: "
                          "oversubscribed: the workers' threads compete for the same cores. Pass --worker-threads 1 "
                          "for speed; SVD-based methods (iso_c, tsv, iso_cts, optmerge) then differ from "
                          "--executor local in the last bits, element-wise ones do not."]
    assert quiet == []  # 2 workers × 1 thread fit 2 CPUs
