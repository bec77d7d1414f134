"""Throughput of the per-tensor merge methods, in MB of float32 task vectors merged per second.

For each method and shape, N random task vectors are merged ``--repeat`` times (best time kept);
throughput = N·m·n·4 bytes / time. Excludes I/O: this is the compute the engine adds on top of reading
N + 1 checkpoints. Run::

    python benchmarks/bench_methods.py --out bench_methods.json

Prints a table and writes JSON. Timings are wall-clock on whatever this machine is; nothing asserts them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

# Spinning OpenMP workers stall badly when the cores are shared with other processes (measured here:
# a 1024² SVD took 7.6 s with 2 spinning threads, 0.8 s with passive ones). Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from omnimerge.algorithms import MergeContext, get_method

METHODS = ["task_arithmetic", "ties", "dare_ties", "tsv", "iso_c"]
SHAPES = [(1024, 1024), (4096, 1024)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--shapes", default=",".join(f"{m}x{n}" for m, n in SHAPES))
    parser.add_argument("--out", default="bench_methods.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    rows = []
    header = f"{'method':16s} {'shape':>10s} {'MB in':>8s} {'best s':>8s} {'MB/s':>8s}"
    print(header)
    print("-" * len(header))
    for m, n in shapes:
        g = torch.Generator().manual_seed(m + n)
        base = torch.randn(m, n, generator=g)
        deltas = [torch.randn(m, n, generator=g) * 1e-3 for _ in range(args.experts)]
        megabytes = args.experts * m * n * 4 / 1e6
        ids = tuple(f"expert{i}" for i in range(args.experts))
        for name in args.methods.split(","):
            spec = get_method(name)
            best = float("inf")
            for _ in range(args.repeat):
                ctx = MergeContext(tensor_name=f"bench.{m}x{n}", seed=0, expert_ids=ids)  # fresh: no memo reuse
                start = time.perf_counter()
                spec.fn(base, deltas, ctx=ctx)
                best = min(best, time.perf_counter() - start)
            rows.append(dict(method=name, m=m, n=n, experts=args.experts, megabytes=megabytes, best_s=best,
                             mb_per_s=megabytes / best))
            print(f"{name:16s} {f'{m}x{n}':>10s} {megabytes:8.1f} {best:8.3f} {megabytes / best:8.1f}", flush=True)
    meta = dict(torch=torch.__version__, threads=args.threads, omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
                load_average=os.getloadavg(), machine=platform.machine(), device="cpu")
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
