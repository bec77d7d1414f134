"""Throughput of the Ray executor with 1 and 2 workers against the local executor (1 and 2 threads).

Two methods on the Qwen2-0.5B-layout synthetic set (``benchmarks/make_synthetic.py``): ``task_arithmetic``
(I/O-bound) and ``optmerge`` (compute-bound, ``--optmerge-steps``). Every configuration merges the same recipe
once, side by side, inside this process: the local executor directly, the Ray executor on one local Ray
instance started once (its start-up is timed separately and not charged to the runs). Each output's shard
bytes are hashed, so the table also says whether all executors agreed bit for bit.

Usage::

    python benchmarks/bench_ray_scaling.py --layers 4 --out /tmp/ray_scaling.json

Prints a table and writes JSON (machine, load average, versions, every run's timings and per-worker figures).
Numbers on a shared 2-core machine are noisy: the load average before each run is recorded with it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CONFIGS = ("local-1", "local-2", "ray-1", "ray-2")


def _shard_digest(out: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(out.glob("*.safetensors")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _recipe(data: dict[str, Any], method: str, steps: int, shard_size: str) -> Any:
    from omnimerge.engine.recipe import parse_recipe

    params = {"steps": steps} if method == "optmerge" else {"scale": 0.5}
    # OptMerge on the 151936×896 embedding took >13 GB here (OOM-killed on a 24 GB machine): keep it at base.
    rules = [{"match": "model.embed_tokens.weight", "action": "keep"}] if method == "optmerge" else []
    return parse_recipe({"base": data["base"], "experts": {f"e{i}": p for i, p in enumerate(data["experts"])},
                         "method": method, "parameters": params, "rules": rules, "shard_size": shard_size,
                         "seed": 0})


def _run(config: str, recipe: Any, out: Path, ray_threads: int | None) -> dict[str, Any]:
    from omnimerge.engine.execute import LocalExecutor
    from omnimerge.engine.merge import run_merge

    kind, n = config.split("-")
    if kind == "local":
        executor: Any = LocalExecutor(int(n))
    else:
        from omnimerge.cluster.ray_executor import RayExecutor

        executor = RayExecutor(workers=int(n), threads=ray_threads)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    report = run_merge(recipe, out, executor=executor, progress=False)
    wall = time.perf_counter() - t0
    row: dict[str, Any] = {
        "config": config, "wall_s": wall, "shards_s": report.timings.get("shards"), "jobs": len(report.results),
        "read_bytes": report.bytes_read, "written_bytes": report.bytes_written, "load_before": load,
        "MBps_read": report.bytes_read / wall / 1e6, "digest": _shard_digest(out),
        "busy_s": sum(r.seconds for r in report.results.values()),
    }
    if kind == "ray":
        stats = executor.stats()
        row.update(retries=stats.get("retries", 0), workers=stats.get("workers", {}))
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "omnimerge-bench-ray"),
                        help="where the synthetic set is written (reused when complete)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the set (the real model has 24)")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--methods", default="task_arithmetic,optmerge")
    parser.add_argument("--optmerge-steps", type=int, default=10)
    parser.add_argument("--shard-size", default="60MB", help="recipe shard_size: more shards, more parallelism")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {','.join(CONFIGS)}")
    parser.add_argument("--ray-threads", type=int, default=None,
                        help="torch threads per Ray worker (default: this process's, for bit-identical output)")
    parser.add_argument("--out", default=None, help="JSON results file")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from make_synthetic import make_qwen2_05b_set

    import ray
    import torch

    from omnimerge.cluster.ray_executor import ray_session

    data_dir = Path(args.cache_dir) / f"qwen2-05b-L{args.layers}-E{args.experts}"
    data = make_qwen2_05b_set(data_dir, n_experts=args.experts, layers=args.layers)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    work = Path(tempfile.mkdtemp(prefix="omb-ray-"))
    ray_tmp = Path(tempfile.mkdtemp(prefix="omr-", dir="/tmp"))
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with ray_session(None, include_dashboard=False, _temp_dir=str(ray_tmp),
                     object_store_memory=256 * 1024**2) as info:
        ray_start = time.perf_counter() - t0
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            recipe = _recipe(data, method, args.optmerge_steps, args.shard_size)
            for config in configs:
                out = work / f"{method}-{config}"
                row = _run(config, recipe, out, args.ray_threads)
                row["method"] = method
                rows.append(row)
                shutil.rmtree(out, ignore_errors=True)
                print(f"  {method:<16s} {config:<8s} {row['wall_s']:7.2f} s", file=sys.stderr, flush=True)
        session = info.describe()
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(ray_tmp, ignore_errors=True)

    table = ["| method | executor | wall s | shards s | jobs | read MB/s | speed-up vs 1 worker | Ray overhead vs "
             "local, same workers | identical to local-1 |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        same = {r["config"]: r for r in rows if r["method"] == row["method"]}
        kind, n = row["config"].split("-")
        one = same.get(f"{kind}-1")
        speed = f"{one['wall_s'] / row['wall_s']:.2f}×" if one else "–"
        local = same.get(f"local-{n}")
        over = f"{row['wall_s'] - local['wall_s']:+.2f} s" if kind == "ray" and local else "–"
        ref = same.get("local-1")
        ident = "yes" if ref and ref["digest"] == row["digest"] else ("–" if not ref else "NO")
        table.append(f"| {row['method']} | {row['config']} | {row['wall_s']:.2f} | {row['shards_s']:.2f} | "
                     f"{row['jobs']} | {row['MBps_read']:.0f} | {speed} | {over} | {ident} |")
    print("\n".join(table))
    print(f"\nRay start-up (not in the runs): {ray_start:.1f} s; {session}")
    doc = {
        "benchmark": "ray_scaling", "rows": rows, "ray_startup_s": ray_start, "session": session,
        "set": {"layers": args.layers, "experts": args.experts, "bytes_per_model": data["bytes_per_model"],
                "n_params": data["n_params"]},
        "optmerge_steps": args.optmerge_steps, "shard_size": args.shard_size,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "ray": ray.__version__, "torch_threads": torch.get_num_threads()},
    }
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=2, default=str))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
