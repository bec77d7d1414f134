"""Sweeps: expansion of subsets × methods × grids, byte-identity of every run with its lone merge (local and Ray),
per-run failure isolation, resume after a killed process, passes under a memory budget, CLI dry run, evaluation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

from omnimerge.engine.errors import RecipeError
from omnimerge.engine.execute import LocalExecutor
from omnimerge.engine.merge import run_merge
from omnimerge.engine.recipe import load_recipe
from omnimerge.engine.sweep import plan_sweep, read_results, run_sweep
from omnimerge.engine.sweep_spec import parse_sweep

MERGED = "model.layers.1.mlp.down_proj.weight"  # merged by the qwen2_vl preset, in a later shard


def _doc(zoo: Path, **over) -> dict:
    doc = {"name": "t", "base": str(zoo / "qwen_base"),
           "experts": {"e0": str(zoo / "qwen_e0"), "e1": {"source": str(zoo / "qwen_e1"), "weight": 0.5},
                       "e2": str(zoo / "qwen_e2"), "lora": str(zoo / "qwen_lora")},
           "preset": "qwen2_vl", "shard_size": "60KB",
           "methods": [{"method": "ties", "grid": {"density": [0.2, 0.5], "scale": [0.5, 1.0]}},
                       {"method": "task_arithmetic", "grid": {"scale": [0.3]}}],
           "subsets": ["all"]}
    doc.update(over)
    return doc


def _files(out: Path) -> dict[str, bytes]:
    """Weights, index and config of a merged model (the manifest holds timings, so it is compared apart)."""
    names = [p for p in out.iterdir() if p.suffix == ".safetensors" or p.name in
             ("model.safetensors.index.json", "config.json")]
    return {p.name: p.read_bytes() for p in sorted(names)}


def _single(recipe_path: Path, out: Path):
    return run_merge(load_recipe(recipe_path), out, executor=LocalExecutor(), progress=False)


def _assert_equals_single(sweep_out: Path, run_id: str, tmp: Path) -> int:
    """The run's output equals ``omnimerge merge recipes/RUN.yaml`` byte for byte; returns the single's reads."""
    single = tmp / "single" / run_id
    report = _single(sweep_out / "recipes" / f"{run_id}.yaml", single)
    got, want = _files(sweep_out / "runs" / run_id), _files(single)
    assert got.keys() == want.keys() and len(got) > 3, run_id
    for name in want:
        assert got[name] == want[name], f"{run_id}: {name} differs from the lone merge"
    m_got = json.loads((sweep_out / "runs" / run_id / "omnimerge_manifest.json").read_text())
    m_want = json.loads((single / "omnimerge_manifest.json").read_text())
    for key in ("recipe", "recipe_digest", "plan_digest", "inputs", "tensors"):
        assert m_got[key] == m_want[key], (run_id, key)
    return report.bytes_read


# ---- expansion and validation (no weights) --------------------------------------------------------------

def test_subset_expansion_names_and_order() -> None:
    doc = {"base": "/m/base", "experts": {"a": "/m/a", "b": "/m/b", "c": "/m/c"},
           "methods": [{"method": "ties", "parameters": {"scale": 0.5}, "grid": {"density": [0.2, 0.4]}},
                       "task_arithmetic"],
           "subsets": ["all", "leave_one_out", "pairs", {"combinations": 1}, ["c", "a"],
                       {"experts": ["b", "c"], "name": "bc"}]}
    spec = parse_sweep(doc)
    subsets = []
    for r in spec.runs:
        if (r.subset, r.experts) not in subsets:
            subsets.append((r.subset, r.experts))
    # pairs and [c, a] repeat leave_one_out's subsets: kept once, first label wins; experts in pool order.
    assert subsets == [("all", ("a", "b", "c")), ("no-a", ("b", "c")), ("no-b", ("a", "c")), ("no-c", ("a", "b")),
                       ("a", ("a",)), ("b", ("b",)), ("c", ("c",))]
    assert len(spec.runs) == 7 * 3  # 7 subsets × (2 ties densities + 1 task_arithmetic)
    assert [r.run_id for r in spec.runs[:3]] == ["ties-density0.2-all", "ties-density0.4-all", "task_arithmetic-all"]
    first = spec.runs[0]
    assert first.params == {"scale": 0.5, "density": 0.2} and first.grid == {"density": 0.2}
    assert first.recipe.method == "ties" and [e.name for e in first.recipe.experts] == ["a", "b", "c"]
    assert first.document["experts"] == {"a": {"source": "/m/a"}, "b": {"source": "/m/b"}, "c": {"source": "/m/c"}}

    named = parse_sweep({**doc, "subsets": ["pairs"], "name_template": "{index:02d}_{method}_{experts}_{density}",
                         "methods": [{"method": "ties", "grid": {"density": [0.2]}}]})
    assert [r.run_id for r in named.runs] == ["00_ties_a+b_0.2", "01_ties_a+c_0.2", "02_ties_b+c_0.2"]


def test_sweep_file_problems_are_reported_together() -> None:
    doc = {"base": "/m/base", "experts": {"a": "/m/a", "b": "/m/b"},
           "methods": [{"method": "tie"}, {"method": "ties", "grid": {"densty": [0.1]}},
                       {"method": "task_arithmetic", "grid": {"scale": 0.5}}],
           "subsets": ["al", ["a", "zz"], {"combinations": 3}], "memory_budget": "lots", "colour": 1}
    with pytest.raises(RecipeError) as info:
        parse_sweep(doc)
    assert info.value.problems == [
        "unknown top-level key 'colour'. Allowed: allow_pickle, base, description, dtype, evaluation, experts, "
        "memory_budget, methods, name, name_template, preset, rules, seed, shard_size, subsets.",
        "methods[2]: grid 'scale' must be a non-empty list of values, got 0.5.",
        "subsets[0]: unknown subset 'al'; use one of all, leave_one_out, pairs, {combinations: k}, [explicit, list].",
        "subsets[1]: expert 'zz' is not in the pool. Pool: a, b.",
        "subsets[2]: combinations must be an integer from 1 to 2 (the pool size), got 3.",
        "memory_budget: expected a size like '5GB' or '512MiB', got 'lots'",
        "methods: Unknown merge method 'tie'. Did you mean 'ties'? Known methods: breadcrumbs, dare_linear, "
        "dare_ties, della, iso_c, iso_cts, linear, model_stock, optmerge, slerp, task_arithmetic, ties, tsv, "
        "weight_average, wudi.",
        "methods: method 'ties' has no parameter 'densty'. Did you mean 'density'? Its parameters: density, scope, "
        "normalize, scale.",
    ]
    clean = {"base": "/m/base", "experts": {"a": "/m/a", "b": "/m/b"}, "name_template": "{method}",
             "methods": [{"method": "ties", "grid": {"density": [0.2, 0.3]}}]}
    with pytest.raises(RecipeError, match=r"name_template '\{method\}' gives 1 name\(s\) to several runs: ties\. "
                                          r"Include \{params\} and \{subset\} \(or \{index\}\) in it\."):
        parse_sweep(clean)


# ---- one pass for many runs: byte-identical to lone merges ----------------------------------------------

@pytest.fixture(scope="module")
def mixed_sweep(zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """Element-wise, SVD, batched-solver, random and prepass methods over full and LoRA experts, local."""
    doc = _doc(zoo_dir, methods=[
        {"method": "ties", "grid": {"density": [0.2, 0.5], "scale": [0.5]}},
        {"method": "ties", "parameters": {"scope": "model"}, "grid": {"density": [0.3]}},
        {"method": "task_arithmetic", "grid": {"scale": [0.3]}},
        "tsv",
        {"method": "optmerge", "parameters": {"steps": 3}},
        {"method": "wudi", "grid": {"steps": [2, 3]}},
        "dare_ties"],
        subsets=[["e0", "e1", "lora"], ["e1", "lora"]],
        name_template="{method}-{index}-{subset}")
    out = tmp_path_factory.mktemp("mixed") / "sweep"
    report = run_sweep(parse_sweep(doc), out, executor=LocalExecutor(), progress=False)
    return out, report


@pytest.mark.slow
def test_every_run_of_a_sweep_equals_its_single_merge(mixed_sweep, tmp_path: Path) -> None:
    out, report = mixed_sweep
    assert not report.failed and len(report.rows) == 18
    single_reads = sum(_assert_equals_single(out, row["run_id"], tmp_path) for row in report.rows)
    # Each input was read once per pass, not once per run.
    assert report.bytes_read * 8 < single_reads
    rows = {r["run_id"]: r for r in read_results(out)}
    assert set(rows) == {r.run_id for r in report.plan.runs}
    row = rows["tsv-13-e1+lora"]
    assert (row["method"], json.loads(row["parameters"]), row["experts"], row["status"], row["error"]) == \
        ("tsv", {}, ["e1", "lora"], "done", "")
    assert row["output"] == str(out / "runs" / "tsv-13-e1+lora")
    assert row["bytes"] == sum(p.stat().st_size for p in Path(row["output"]).glob("*.safetensors")) > 0
    assert row["seconds"] > 0 and row["pass"] == 1
    assert not list((out / "runs").glob("*.omnimerge-staging"))


@pytest.mark.ray
@pytest.mark.slow
def test_ray_sweep_equals_the_local_sweep(mixed_sweep, zoo_dir: Path, tmp_path: Path) -> None:
    import ray

    from omnimerge.cluster.ray_executor import RayExecutor

    local_out, local_report = mixed_sweep
    keep = {"ties-1-e0+e1+lora", "ties-2-e0+e1+lora", "optmerge-5-e0+e1+lora", "wudi-6-e0+e1+lora",
            "dare_ties-8-e0+e1+lora", "ties-11-e1+lora"}
    spec = local_report.plan.spec
    spec.runs = [r for r in spec.runs if r.run_id in keep]
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2)
    try:
        report = run_sweep(spec, tmp_path / "ray", executor=RayExecutor(workers=2, device="cpu"), progress=False)
    finally:
        ray.shutdown()
    assert report.executor == "ray" and not report.failed and len(report.rows) == len(keep)
    for run_id in keep:
        assert _files(tmp_path / "ray" / "runs" / run_id) == _files(local_out / "runs" / run_id), run_id


def test_runs_share_per_expert_svds(zoo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three tsv runs (scales) over the same experts decompose each expert's tensor once, not three times."""
    import omnimerge.algorithms.lowrank as lowrank

    calls: list[tuple[int, ...]] = []
    real_svd = lowrank.svd

    def counting_svd(delta):
        calls.append(tuple(delta.shape))
        return real_svd(delta)

    monkeypatch.setattr(lowrank, "svd", counting_svd)
    experts = {"e0": str(zoo_dir / "qwen_e0"), "e1": str(zoo_dir / "qwen_e1")}
    alone = run_sweep(parse_sweep(_doc(zoo_dir, experts=experts, methods=["tsv"])), tmp_path / "one",
                      progress=False)
    per_run = len(calls)
    assert per_run > 0 and not alone.failed
    calls.clear()
    doc = _doc(zoo_dir, experts=experts, methods=[{"method": "tsv", "grid": {"scale": [0.5, 1.0, 2.0]}}])
    report = run_sweep(parse_sweep(doc), tmp_path / "three", progress=False)
    assert not report.failed and len(report.rows) == 3
    assert len(calls) == per_run  # not 3 × per_run
    assert _files(tmp_path / "three" / "runs" / "tsv-scale1-all") == _files(tmp_path / "one" / "runs" / "tsv-all")


# ---- failure isolation, resume, passes -------------------------------------------------------------------

def test_one_failing_run_leaves_the_others_committed(zoo_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in (zoo_dir / "qwen_e2").iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    shard = bad / index["weight_map"][MERGED]
    tensors = load_file(shard)
    tensors[MERGED][0, 0] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    doc = _doc(zoo_dir, experts={"e0": str(zoo_dir / "qwen_e0"), "e1": str(zoo_dir / "qwen_e1"), "bad": str(bad)},
               subsets=[["e0", "e1"], ["e0", "bad"], ["e1", "bad"]],
               methods=[{"method": "task_arithmetic", "grid": {"scale": [0.5]}}])
    out = tmp_path / "sweep"
    report = run_sweep(parse_sweep(doc), out, progress=False)
    status = {r["run_id"]: (r["status"], r["error"]) for r in read_results(out)}
    assert status["task_arithmetic-scale0.5-e0+e1"] == ("done", "")
    for run_id in ("task_arithmetic-scale0.5-e0+bad", "task_arithmetic-scale0.5-e1+bad"):
        state, error = status[run_id]
        assert state == "failed"
        assert error.startswith(f"shard 'model-0000") and f"failed at tensor '{MERGED}': NonFiniteError: Tensor " \
            f"'{MERGED}' of expert 'bad' ({bad}) holds 1 non-finite value(s) (NaN/Inf)." in error
        assert not (out / "runs" / run_id).exists()
        # Its shards finished before the bad tensor stay verified in staging for a later resume.
        assert list((out / "runs" / f"{run_id}.omnimerge-staging" / ".records").glob("*.json"))
    assert len(report.failed) == 2
    _assert_equals_single(out, "task_arithmetic-scale0.5-e0+e1", tmp_path)


def test_resume_after_the_process_is_killed(zoo_dir: Path, tmp_path: Path) -> None:
    doc = _doc(zoo_dir, subsets=["all", ["e0", "lora"]],
               methods=[{"method": "ties", "grid": {"density": [0.3]}}, "task_arithmetic"])
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    marker = tmp_path / "killed"
    env = {**os.environ, "OMNIMERGE_FAULT": f"{MERGED}:{marker}", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "omnimerge.cluster.cli", "sweep", str(sweep), "-o", str(out), "--executor", "local",
           "--no-progress"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 17 and marker.is_file(), first.stderr[-2000:]  # died mid-sweep, nothing committed
    assert not [p for p in (out / "runs").iterdir() if not p.name.endswith(".omnimerge-staging")]
    before = {p.name: len(list((p / ".records").glob("*.json"))) for p in (out / "runs").iterdir()}
    assert len(before) == 4 and all(n >= 1 for n in before.values())

    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    rows = read_results(out)
    assert [r["status"] for r in rows] == ["done"] * 4
    for row in rows:
        manifest = json.loads((Path(row["output"]) / "omnimerge_manifest.json").read_text())
        resumed = [name for name, s in manifest["shards"].items() if s["resumed"]]
        assert len(resumed) == before[f"{row['run_id']}.omnimerge-staging"]  # verified shards were not redone
        _assert_equals_single(out, row["run_id"], tmp_path)

    third = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0 and [r["status"] for r in read_results(out)] == ["resumed"] * 4


def test_memory_budget_splits_runs_into_passes(zoo_dir: Path, tmp_path: Path) -> None:
    # Runs over different experts share the base but not the deltas: a job's memory grows with the experts used.
    doc = _doc(zoo_dir, subsets=[{"combinations": 1}], preset=None,
               methods=[{"method": "ties", "grid": {"density": [0.3]}}, "task_arithmetic"])
    spec = parse_sweep(doc)
    one = plan_sweep(spec)
    alone = plan_sweep(spec, memory_budget=1)  # under any run's need: a pass per run
    assert len(one.passes) == 1 and len(alone.passes) == len(spec.runs) == 8
    # Twice one run's need: two runs side by side (two workspaces and the next tensor read ahead) fit, and
    # further runs add only their own experts' deltas, so some runs share a pass, not all eight.
    budget = 2 * max(p.peak_bytes for p in alone.passes)
    assert one.peak_bytes > budget
    split = plan_sweep(spec, memory_budget=budget)
    assert 1 < len(split.passes) < 8 and all(p.peak_bytes <= budget for p in split.passes)
    assert [r for p in split.passes for r in p.run_ids] == [r.run_id for r in spec.runs]
    assert one.read_bytes < split.read_bytes < one.separate_read_bytes  # each pass reads the base again
    a = run_sweep(one, tmp_path / "one", progress=False)
    b = run_sweep(split, tmp_path / "split", progress=False)
    assert not a.failed and not b.failed
    assert {r["pass"] for r in b.rows} == set(range(1, len(split.passes) + 1))
    for r in spec.runs:
        assert _files(tmp_path / "split" / "runs" / r.run_id) == _files(tmp_path / "one" / "runs" / r.run_id)


# ---- command line ---------------------------------------------------------------------------------------

def test_cli_dry_run_lists_runs_and_costs(zoo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from omnimerge.cluster.cli import main

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump(_doc(zoo_dir, subsets=["all", "leave_one_out"])))
    assert main(["sweep", str(sweep), "-o", str(tmp_path / "out"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "Sweep 't': 25 runs" in text and "ties-density0.5_scale1-no-lora" in text
    assert "pass 1: 25 runs" in text and "separate merges:" in text
    assert not (tmp_path / "out").exists()
    assert main(["sweep", str(sweep), "-o", str(tmp_path / "out"), "--dry-run", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    # Element-wise methods share everything: one job of 25 runs needs what two runs side by side need (two
    # workspaces, the next tensor read ahead), and more than one run alone.
    one_run = max(r["write_bytes"] for r in doc["runs"])
    two = {**_doc(zoo_dir), "methods": [{"method": "ties", "grid": {"scale": [0.5, 1.0]}}]}
    assert len(doc["runs"]) == 25 and doc["peak_bytes"] == plan_sweep(parse_sweep(two)).peak_bytes and one_run > 0
    assert doc["peak_bytes"] > plan_sweep(parse_sweep({**_doc(zoo_dir), "methods": ["ties"]})).peak_bytes
    assert doc["read_bytes"] * 10 < doc["separate_read_bytes"]
    # Under a budget smaller than one run's job, every run gets a pass of its own.
    assert main(["sweep", str(sweep), "-o", str(tmp_path / "out"), "--dry-run", "--json",
                 "--memory-budget", "200KB"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["passes"]) == 25 and doc["memory_budget"] == 200_000


def test_cli_sweep_evaluates_the_runs_and_writes_a_leaderboard(tmp_path: Path) -> None:
    from test_evaluator_support import build_model, make_task_data, tiny_suite
    from tiny_models import make_expert

    from omnimerge.cluster.cli import main

    base = build_model(tmp_path / "base", seed=0)
    for i in range(2):
        make_expert(base, tmp_path / f"x{i}", seed=i + 1, noise=0.02)
    data = make_task_data(tmp_path / "data", n=2)
    suite = tiny_suite()
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump({"name": suite.name, "tasks": [
        {"name": t.name, "capability": t.capability, "path": t.path, "metric": t.metric, "prompt": t.prompt,
         "max_new_tokens": t.max_new_tokens} for t in suite.tasks]}))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({
        "base": "./base", "experts": {"x0": "./x0", "x1": "./x1"}, "methods": [
            {"method": "task_arithmetic", "grid": {"scale": [0.5, 1.0]}}],
        "evaluation": {"suite": "suite.yaml", "data_root": "data", "executor": "local", "device": "cpu",
                       "batch_size": 2, "include_base": True}}))
    out = tmp_path / "out"
    assert main(["sweep", str(tmp_path / "sweep.yaml"), "-o", str(out), "--executor", "local", "--no-progress"]) == 0
    import pyarrow.parquet as pq

    scores = pq.read_table(out / "eval" / "results.parquet").to_pylist()
    assert sorted({(r["model"], r["task"]) for r in scores}) == [
        (m, t) for m in ("base", "task_arithmetic-scale0.5-all", "task_arithmetic-scale1-all")
        for t in ("ground", "vqa")]
    board = (out / "leaderboard.md").read_text()
    assert "task_arithmetic-scale0.5-all" in board and "task_arithmetic-scale1-all" in board
    assert (out / "leaderboard.png").is_file()
