"""Throughput of the Ray executor with 1 and 2 workers against the local executor (1 and 2 threads).

Two methods on the Qwen2-0.5B-layout synthetic set (``benchmarks/make_synthetic.py``): ``task_arithmetic``
(I/O-bound) and ``optmerge`` (compute-bound, ``--optmerge-steps``). Every configuration merges the same recipe
once, side by side, inside this process: the local executor directly, the Ray executor on one local Ray
instance started once (its start-up is timed separately and not charged to the runs). Each output's shard
bytes are hashed, so the table also says whether all executors agreed bit for bit.

Configurations: ``local-N`` (the local executor, N threads) and ``ray-N`` (N Ray workers, the executor's
defaults). Diagnostic variants of ``ray-N`` add ``+``-separated switches that undo one default each:
``q2`` (two jobs in flight per worker, the earlier default), ``spin`` (no ``OMP_WAIT_POLICY=PASSIVE`` in the
workers: libgomp's spin-waiting), ``t1`` (one torch thread per worker instead of the driver's count; SVD-based
methods then differ in the last bits), e.g. ``--configs local-1,local-2,ray-1,ray-2,ray-2+q2+spin``.

Usage (the runs reported in docs/cluster.md)::

    python benchmarks/bench_ray_scaling.py --layers 24 --methods task_arithmetic --repeat 3 \
        --omp-wait-policy PASSIVE --out ta.json
    python benchmarks/bench_ray_scaling.py --layers 4 --methods optmerge --shard-size 30MB \
        --omp-wait-policy PASSIVE --configs local-1,local-2,ray-1,ray-2,ray-2+t1 --out optmerge.json

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
import statistics
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


SWITCHES = ("q2", "spin", "t1")


def _machine_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat; 0 where there is none)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    busy = sum(fields[:8]) - fields[3] - fields[4]  # all but idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


def _parse_config(config: str) -> tuple[str, int, set[str]]:
    head, *switches = config.split("+")
    kind, _, n = head.partition("-")
    if kind not in ("local", "ray") or not n.isdigit() or (switches and kind != "ray") or \
            not set(switches) <= set(SWITCHES):
        raise SystemExit(f"bad config {config!r}: local-N, ray-N or ray-N+{'+'.join(SWITCHES)} (any subset)")
    return kind, int(n), set(switches)


def _run(config: str, recipe: Any, out: Path, ray_threads: int | None) -> dict[str, Any]:
    from omnimerge.engine.execute import LocalExecutor
    from omnimerge.engine.merge import run_merge

    kind, n, switches = _parse_config(config)
    if kind == "local":
        executor: Any = LocalExecutor(n)
    else:
        from omnimerge.cluster.ray_executor import RayExecutor

        executor = RayExecutor(workers=n, threads=1 if "t1" in switches else ray_threads,
                               max_in_flight=2 * n if "q2" in switches else None,
                               worker_env={} if "spin" in switches else None)
    load = os.getloadavg()[0]
    cpu0 = _machine_cpu_s()
    t0 = time.perf_counter()
    report = run_merge(recipe, out, executor=executor, progress=False)
    wall = time.perf_counter() - t0
    cpu = _machine_cpu_s() - cpu0
    row: dict[str, Any] = {
        "config": config, "wall_s": wall, "shards_s": report.timings.get("shards"), "jobs": len(report.results),
        "read_bytes": report.bytes_read, "written_bytes": report.bytes_written, "load_before": load,
        "MBps_read": report.bytes_read / wall / 1e6, "digest": _shard_digest(out),
        "busy_s": sum(r.seconds for r in report.results.values()), "machine_cpu_s": cpu,
    }
    if kind == "ray":
        stats = executor.stats()
        row.update(retries=stats.get("retries", 0), workers=stats.get("workers", {}),
                   workers_ready_s=stats.get("workers_ready_s"))
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
    parser.add_argument("--omp-wait-policy", default=None, choices=("PASSIVE", "ACTIVE"),
                        help="set OMP_WAIT_POLICY for this process (the local executor) before torch loads; Ray "
                             "workers get it too (their default without it: PASSIVE)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per configuration, interleaved; the table shows the median (and the minimum)")
    parser.add_argument("--out", default=None, help="JSON results file")
    args = parser.parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in configs:
        _parse_config(c)
    if args.omp_wait_policy:
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from make_synthetic import make_qwen2_05b_set

    import ray
    import torch

    from omnimerge.cluster.ray_executor import ray_session

    data_dir = Path(args.cache_dir) / f"qwen2-05b-L{args.layers}-E{args.experts}"
    data = make_qwen2_05b_set(data_dir, n_experts=args.experts, layers=args.layers)
    work = Path(tempfile.mkdtemp(prefix="omb-ray-"))
    ray_tmp = Path(tempfile.mkdtemp(prefix="omr-", dir="/tmp"))
    rows: list[dict[str, Any]] = []
    doc: dict[str, Any] = {
        "benchmark": "ray_scaling", "rows": rows, "repeat": args.repeat,
        "set": {"layers": args.layers, "experts": args.experts, "bytes_per_model": data["bytes_per_model"],
                "n_params": data["n_params"]},
        "optmerge_steps": args.optmerge_steps, "shard_size": args.shard_size,
        "driver_omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "ray": ray.__version__, "torch_threads": torch.get_num_threads()},
    }
    t0 = time.perf_counter()
    with ray_session(None, include_dashboard=False, _temp_dir=str(ray_tmp),
                     object_store_memory=256 * 1024**2) as info:
        doc["ray_startup_s"] = time.perf_counter() - t0
        doc["session"] = info.describe()
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            recipe = _recipe(data, method, args.optmerge_steps, args.shard_size)
            for rep in range(args.repeat):  # configurations interleaved, so slow drifts of load hit all alike
                for config in configs:
                    out = work / f"{method}-{config}"
                    row = _run(config, recipe, out, args.ray_threads)
                    row.update(method=method, rep=rep)
                    rows.append(row)
                    shutil.rmtree(out, ignore_errors=True)
                    print(f"  {method:<16s} {config:<14s} rep {rep}: {row['wall_s']:7.2f} s, machine CPU "
                          f"{row['machine_cpu_s']:7.1f} s, load {row['load_before']:.1f}", file=sys.stderr, flush=True)
                    if args.out:  # after every run, so a run cut short still leaves its numbers
                        Path(args.out).write_text(json.dumps(doc, indent=2, default=str))
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(ray_tmp, ignore_errors=True)

    doc["summary"] = summary = _summarise(rows)
    print("\n".join(_table(summary, args.repeat)))
    print(f"\nRay start-up (once, not in the runs): {doc['ray_startup_s']:.1f} s; {doc['session']}")
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=2, default=str))
        print(f"wrote {args.out}")
    return 0


def _summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median (and min) per method and configuration; speed-ups and Ray's overhead from the medians."""
    out: list[dict[str, Any]] = []
    keys = list(dict.fromkeys((r["method"], r["config"]) for r in rows))
    for method, config in keys:
        mine = [r for r in rows if (r["method"], r["config"]) == (method, config)]
        ref = next((r for r in rows if (r["method"], r["config"]) == (method, "local-1")), None)
        ready = [r["workers_ready_s"] for r in mine if r.get("workers_ready_s") is not None]
        out.append({
            "method": method, "config": config, "runs": len(mine),
            "wall_s": statistics.median(r["wall_s"] for r in mine), "wall_min_s": min(r["wall_s"] for r in mine),
            "shards_s": statistics.median(r["shards_s"] for r in mine),
            "machine_cpu_s": statistics.median(r["machine_cpu_s"] for r in mine),
            "workers_ready_s": statistics.median(ready) if ready else None, "jobs": mine[0]["jobs"],
            "read_bytes": mine[0]["read_bytes"],
            "identical_to_local_1": None if ref is None else all(r["digest"] == ref["digest"] for r in mine),
        })
    by = {(s["method"], s["config"]): s for s in out}
    for s in out:
        kind, n, _ = _parse_config(s["config"])
        one, local = by.get((s["method"], f"{kind}-1")), by.get((s["method"], f"local-{n}"))
        s["speedup_vs_1"] = one["wall_s"] / s["wall_s"] if one else None
        s["ray_overhead_s"] = s["wall_s"] - local["wall_s"] if kind == "ray" and local else None
    return out


def _table(summary: list[dict[str, Any]], repeat: int) -> list[str]:
    what = f"median of {repeat}" if repeat > 1 else "one run"
    lines = [f"| method | executor | wall s ({what}) | min s | machine CPU s | jobs | read MB/s | speed-up vs 1 "
             "worker | Ray overhead vs local, same workers | of which worker start-up | identical to local-1 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        speed = f"{s['speedup_vs_1']:.2f}×" if s["speedup_vs_1"] else "–"
        over = f"{s['ray_overhead_s']:+.2f} s" if s["ray_overhead_s"] is not None else "–"
        ready = f"{s['workers_ready_s']:.2f} s" if s["workers_ready_s"] is not None else "–"
        ident = {None: "–", True: "yes", False: "NO"}[s["identical_to_local_1"]]
        lines.append(f"| {s['method']} | {s['config']} | {s['wall_s']:.2f} | {s['wall_min_s']:.2f} | "
                     f"{s['machine_cpu_s']:.1f} | {s['jobs']} | {s['read_bytes'] / s['wall_s'] / 1e6:.0f} | {speed} | "
                     f"{over} | {ready} | {ident} |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
