"""One sweep against the same merges run one by one: wall time and bytes read side by side.

The set is a base and ``--experts`` experts in the Qwen2-0.5B layout (bf16, sharded; ``make_synthetic.py``),
generated into ``--cache-dir`` unless it is there already. The sweep has 8 runs over all experts:
``ties`` × density {0.2, 0.4} × scale {0.5, 1.0} and ``task_arithmetic`` × scale {0.3, 0.5, 0.7, 1.0}.

Each mode runs the ``omnimerge`` command as a separate process (start-up and imports included), with the
page cache warmed first so both read from memory alike:

- sweep:    ``omnimerge sweep SWEEP.yaml -o OUT --executor local``
- separate: ``omnimerge merge recipes/RUN.yaml -o OUT/RUN --executor local`` for each of the 8 runs
  (the recipes the sweep wrote, so both modes do the same merges).

Measured: wall time, CPU time (user + system of the child processes), bytes the engine read from storage (the
summary line each command prints) and bytes written. The outputs of both modes are compared shard by shard
(sha256 from the manifests). A table is printed and everything is written as JSON (``--out``). Target: the
sweep takes at most 0.35× the wall time of the separate runs.

    python benchmarks/bench_sweep.py --layers 24 --repeat 1 --out bench_sweep.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_merge import code_variants  # noqa: E402
from benchmarks.make_synthetic import make_qwen2_05b_set  # noqa: E402

__all__ = ["sweep_document", "run_timed", "main"]

TARGET_RATIO = 0.35
_READ_RE = re.compile(r"read ([0-9.]+) MB")


def sweep_document(base: str, experts: list[str], shard_size: str) -> dict[str, Any]:
    """The benchmark's 8-run sweep over every expert."""
    return {
        "name": "bench-sweep",
        "base": base,
        "experts": {f"expert_{i}": p for i, p in enumerate(experts)},
        "dtype": "bfloat16",
        "shard_size": shard_size,
        "methods": [
            {"method": "ties", "grid": {"density": [0.2, 0.4], "scale": [0.5, 1.0]}},
            {"method": "task_arithmetic", "grid": {"scale": [0.3, 0.5, 0.7, 1.0]}},
        ],
        "subsets": ["all"],
    }


def run_timed(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run ``cmd``; wall and CPU seconds, the engine's 'read N MB' and the tail of stderr."""
    load_before = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = (load_before, os.getloadavg()[0])
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    match = _READ_RE.search(proc.stderr)
    return {"wall_s": wall, "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "load_1min": load, "read_bytes": int(float(match.group(1)) * 1e6) if match else None,
            "stderr_tail": proc.stderr[-600:]}


def _warm(paths: list[Path]) -> int:
    """Read every weight file once so both modes start from the page cache; returns bytes read."""
    total = 0
    for p in paths:
        for f in sorted(p.glob("*.safetensors")):
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    total += len(chunk)
    return total


def _shard_hashes(model_dir: Path) -> dict[str, str]:
    manifest = json.loads((model_dir / "omnimerge_manifest.json").read_text())
    return {name: s["sha256"] for name, s in manifest["shards"].items()}


def _written(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))


def _measure_mode(mode: str, out: Path, omnimerge: list[str], sweep_file: Path, recipes_dir: Path,
                  env: dict[str, str]) -> dict[str, Any]:
    """One measurement: the sweep as one command, or each run's recipe as its own ``omnimerge merge``."""
    if mode == "sweep":
        m = run_timed([*omnimerge, "sweep", str(sweep_file), "-o", str(out), "--executor", "local", "--no-progress"],
                      env)
        runs = json.loads((out / "sweep.json").read_text())["runs"]
        m["runs"] = len(runs)
        m["written_bytes"] = sum(_written(out / "runs" / r["run_id"]) for r in runs)
        return m
    per_run = []
    for recipe in sorted(recipes_dir.glob("*.yaml")):
        r = run_timed([*omnimerge, "merge", str(recipe), "-o", str(out / recipe.stem), "--executor", "local",
                       "--no-progress"], env)
        r["run_id"] = recipe.stem
        r["written_bytes"] = _written(out / recipe.stem)
        per_run.append(r)
        print(f"    merge {recipe.stem}: {r['wall_s']:.1f} s", file=sys.stderr)
    return {"wall_s": sum(r["wall_s"] for r in per_run), "cpu_s": sum(r["cpu_s"] for r in per_run),
            "load_1min": (per_run[0]["load_1min"][0], per_run[-1]["load_1min"][1]),
            "read_bytes": sum(r["read_bytes"] or 0 for r in per_run), "runs": len(per_run),
            "written_bytes": sum(r["written_bytes"] for r in per_run),
            "per_run": [{k: v for k, v in r.items() if k != "stderr_tail"} for r in per_run]}


def _omnimerge_code() -> dict[str, str]:
    """Which omnimerge the timed commands import (a ``PYTHONPATH`` copy of another commit, or this checkout)
    and this checkout's commit."""
    import omnimerge.engine

    here = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = ""
    return {"engine_path": str(Path(omnimerge.engine.__file__).resolve().parent), "checkout_commit": commit,
            "pythonpath": os.environ.get("PYTHONPATH", "")}


def _fmt(n: float | None) -> str:
    return "?" if n is None else f"{n / 1e6:,.0f} MB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "omnimerge" / "bench"))
    p.add_argument("--layers", type=int, default=24, help="decoder layers (the real model: 24)")
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--shard-size", default="200MB", help="output shard size (a sweep job is one shard of every run)")
    p.add_argument("--repeat", type=int, default=1, help="measurements per mode (alternating order); medians reported")
    p.add_argument("--work-dir", default=None, help="where outputs go (default: a temporary folder, removed)")
    p.add_argument("--also-code", action="append", default=[], metavar="LABEL=DIR",
                   help="also time the omnimerge code importable from DIR (DIR/omnimerge/{engine,algorithms,cluster,"
                        "benchmarks}, e.g. another commit) with PYTHONPATH=DIR, interleaved (repeatable)")
    p.add_argument("--out", default="bench_sweep.json", help="JSON results")
    args = p.parse_args(argv)

    cache = Path(args.cache_dir).expanduser() / f"qwen2_05b-L{args.layers}-E{args.experts}-s0"
    t0 = time.perf_counter()
    info = make_qwen2_05b_set(cache, n_experts=args.experts, dtype="bfloat16", layers=args.layers)
    print(f"set: {cache} ({info['n_params'] / 1e6:.0f} M params, {info['bytes_per_model'] / 1e9:.2f} GB per model, "
          f"ready in {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-sweep-"))
    work.mkdir(parents=True, exist_ok=True)
    sweep_file = work / "sweep.yaml"
    import yaml

    sweep_file.write_text(yaml.safe_dump(sweep_document(info["base"], info["experts"], args.shard_size),
                                         sort_keys=False))
    from omnimerge.engine.sweep_spec import load_sweep

    recipes_dir = work / "recipes"  # what a lone merge of each run is (the sweep writes the same documents)
    recipes_dir.mkdir(exist_ok=True)
    for run in load_sweep(sweep_file).runs:
        (recipes_dir / f"{run.run_id}.yaml").write_text(yaml.safe_dump(run.document, sort_keys=False))
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}
    omnimerge = [sys.executable, "-m", "omnimerge.cluster.cli"]
    warm = _warm([Path(info["base"]), *map(Path, info["experts"])])
    print(f"page cache warmed: {warm / 1e9:.2f} GB of inputs", file=sys.stderr)

    try:
        codes = code_variants(args.also_code, env)
    except ValueError as error:
        p.error(str(error))
    measurements: dict[str, list[dict[str, Any]]] = {f"{mode}{label}": [] for label, _ in codes
                                                     for mode in ("sweep", "separate")}
    identical: dict[str, list[bool]] = {label: [] for label, _ in codes}  # each run: sweep == lone merge
    same_across_codes: list[bool] = []

    def out_dir(mode: str, label: str, rep: int) -> Path:
        return work / f"{mode}{label.replace('@', '-')}-{rep}"

    for rep in range(args.repeat):
        order = ("sweep", "separate") if rep % 2 == 0 else ("separate", "sweep")
        for label, code_env in (codes if rep % 2 == 0 else codes[::-1]):
            for mode in order:
                key = f"{mode}{label}"
                out = out_dir(mode, label, rep)
                m = _measure_mode(mode, out, omnimerge, sweep_file, recipes_dir, code_env)
                measurements[key].append(m)
                print(f"[{rep + 1}/{args.repeat}] {key}: {m['wall_s']:.1f} s (load {m['load_1min'][0]:.2f} → "
                      f"{m['load_1min'][1]:.2f})", file=sys.stderr)
            sweep_out = out_dir("sweep", label, rep)
            sep_out = out_dir("separate", label, rep)
            for run_dir in sorted((sweep_out / "runs").iterdir()):
                identical[label].append(_shard_hashes(run_dir) == _shard_hashes(sep_out / run_dir.name))
        first = out_dir("sweep", "", rep) / "runs"
        for label, _ in codes[1:]:
            other = out_dir("sweep", label, rep) / "runs"
            for run_dir in sorted(first.iterdir()):
                same_across_codes.append(_shard_hashes(run_dir) == _shard_hashes(other / run_dir.name))
        if not args.work_dir:  # outputs are large: keep only what the next repeat needs
            for label, _ in codes:
                shutil.rmtree(out_dir("separate", label, rep), ignore_errors=True)
                shutil.rmtree(out_dir("sweep", label, rep), ignore_errors=True)

    def median(key: str, field: str) -> float:
        values = sorted(m[field] for m in measurements[key])
        return values[len(values) // 2]

    ratios = {label or "current": median(f"sweep{label}", "wall_s") / median(f"separate{label}", "wall_s")
              for label, _ in codes}
    print()
    print(f"{'mode':<18} {'runs':>4} {'wall s':>8} {'cpu s':>8} {'read':>10} {'written':>10}")
    for key in measurements:
        print(f"{key:<18} {measurements[key][0]['runs']:>4} {median(key, 'wall_s'):>8.1f} "
              f"{median(key, 'cpu_s'):>8.1f} {_fmt(median(key, 'read_bytes')):>10} "
              f"{_fmt(median(key, 'written_bytes')):>10}")
    for label, _ in codes:
        print(f"sweep / separate{label}: wall {ratios[label or 'current']:.2f}× (target ≤ {TARGET_RATIO}×), read "
              f"{median(f'sweep{label}', 'read_bytes') / median(f'separate{label}', 'read_bytes'):.2f}×; outputs "
              f"identical to the lone merges: {sum(identical[label])}/{len(identical[label])}")
    if same_across_codes:
        print(f"sweep outputs identical across codes: {sum(same_across_codes)}/{len(same_across_codes)}")
    ratio = ratios["current"]
    result = {
        "benchmark": "bench_sweep", "set": {k: info[k] for k in ("base", "experts", "n_params", "bytes_per_model",
                                                                  "n_shards")},
        "layers": args.layers, "shard_size": args.shard_size, "repeat": args.repeat, "also_code": args.also_code,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "omnimerge": _omnimerge_code()},
        "measurements": measurements, "wall_ratio": ratio, "wall_ratios": ratios, "target_ratio": TARGET_RATIO,
        "meets_target": ratio <= TARGET_RATIO,
        "outputs_identical": all(all(v) and bool(v) for v in identical.values()),
        "outputs_identical_across_codes": all(same_across_codes),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
