"""Per-matrix time of WUDI and OptMerge: closed-form fast path against the naive autograd reference.

Both paths start from the same N task vectors and include everything they need (the fast path's SVDs,
Grams and R; the naive path's SVDs and its per-step loss, backward and torch.optim step). The relative
difference of the two results is printed as a sanity check. Run::

    python benchmarks/bench_optimizers.py --steps 30 --out bench_optimizers.json

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
from typing import Callable

import torch

from omnimerge.algorithms import MergeContext
from omnimerge.algorithms.interference import InterferenceSettings, solve_interference
from omnimerge.algorithms.methods.optmerge import resolve_settings
from omnimerge.algorithms.quadratic import choose_form
from omnimerge.benchmarks.naive_reference import naive_optmerge, naive_wudi

SHAPES = [(1024, 1024), (4096, 1024), (1024, 4096)]


def _time(fn: Callable[[], torch.Tensor], repeat: int) -> tuple[float, torch.Tensor]:
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    assert out is not None
    return best, out


def _cases(steps: int) -> dict[str, tuple[InterferenceSettings, Callable[[list[torch.Tensor]], torch.Tensor]]]:
    wudi = InterferenceSettings(low_rank=False, demean=False, init="sum", optimizer="adam", lr=1e-5, steps=steps)
    full, _ = resolve_settings("full", None, None, None, None, steps, None, None)
    lora, _ = resolve_settings("lora", None, None, None, None, steps, None, None)
    return {
        "wudi": (wudi, lambda ds: naive_wudi(ds, lr=1e-5, steps=steps)),
        "optmerge/full": (full, lambda ds: naive_optmerge(ds, demean=True, init="sum", optimizer="adam", lr=1e-5,
                                                          steps=steps)),
        "optmerge/lora": (lora, lambda ds: naive_optmerge(ds, demean=False, init="mean", optimizer="sgd", lr=1e-4,
                                                          momentum=0.9, steps=steps)),
    }


def _write(path: str, args: argparse.Namespace, rows: list[dict]) -> None:
    meta = dict(torch=torch.__version__, threads=args.threads, omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
                load_average=os.getloadavg(), machine=platform.machine(), processor=platform.processor(),
                device="cpu")
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1, help="best of this many runs of each path")
    parser.add_argument("--shapes", default=",".join(f"{m}x{n}" for m, n in SHAPES), help="e.g. 1024x1024,4096x1024")
    parser.add_argument("--methods", default="wudi,optmerge/full,optmerge/lora")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time both paths with 0 steps (SVDs, Grams) and project both to --project-steps")
    parser.add_argument("--project-steps", type=int, default=300, help="the paper's step count")
    parser.add_argument("--out", default="bench_optimizers.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    cases = _cases(args.steps)
    # Warm-up: the first autograd backward and optimiser step of a process carry one-time costs.
    tiny = [torch.randn(8, 6) for _ in range(2)]
    for settings, naive in _cases(2).values():
        naive(tiny)
        solve_interference(tiny, ctxs=[MergeContext()], settings=settings, tag="warmup", batched=False)
    rows = []
    header = f"{'method':15s} {'shape':>10s} {'form':>8s} {'naive s':>9s} {'fast s':>8s} {'speedup':>8s} {'rel diff':>9s}"
    print(header)
    print("-" * len(header))
    for m, n in shapes:
        g = torch.Generator().manual_seed(m * 7 + n)
        deltas = [torch.randn(m, n, generator=g) * 1e-3 for _ in range(args.experts)]
        for name in args.methods.split(","):
            settings, naive = cases[name]
            fast = lambda: solve_interference(deltas, ctxs=[MergeContext()], settings=settings, tag=name,  # noqa: E731
                                              batched=False)
            t_fast, out_fast = _time(fast, args.repeat)
            t_naive, out_naive = _time(lambda: naive(deltas), args.repeat)
            k = min(m, n) // args.experts
            r = args.experts * (k if settings.low_rank else m)
            form = choose_form(m, n, r, args.steps)
            rel = float((out_fast - out_naive).norm() / out_naive.norm())
            row = dict(method=name, m=m, n=n, experts=args.experts, steps=args.steps, form=form,
                       naive_s=t_naive, fast_s=t_fast, speedup=t_naive / t_fast, rel_diff=rel)
            line = (f"{name:15s} {f'{m}x{n}':>10s} {form:>8s} {t_naive:9.2f} {t_fast:8.2f} {t_naive / t_fast:7.1f}x "
                    f"{rel:9.1e}")
            if args.breakdown:
                zero = InterferenceSettings(**{**settings.__dict__, "steps": 0})
                fast_setup, _ = _time(lambda: solve_interference(deltas, ctxs=[MergeContext()], settings=zero,
                                                                 tag=name, batched=False), args.repeat)
                naive_setup, _ = _time(lambda: _cases(0)[name][1](deltas), args.repeat)
                fast_step = max(t_fast - fast_setup, 0.0) / args.steps
                naive_step = max(t_naive - naive_setup, 0.0) / args.steps
                p = args.project_steps
                projected = (naive_setup + p * naive_step) / (fast_setup + p * fast_step)
                row.update(fast_setup_s=fast_setup, naive_setup_s=naive_setup, fast_step_s=fast_step,
                           naive_step_s=naive_step, step_speedup=naive_step / max(fast_step, 1e-12),
                           projected_steps=p, projected_speedup=projected)
                line += (f" | setup {naive_setup:6.2f}/{fast_setup:6.2f} s, step {naive_step * 1e3:7.1f}/"
                         f"{fast_step * 1e3:6.1f} ms ({naive_step / max(fast_step, 1e-12):5.1f}x), "
                         f"at {p} steps {projected:5.1f}x")
            rows.append(row)
            print(line, flush=True)
            _write(args.out, args, rows)  # after every row: a long run that is cut off keeps what it measured
    _write(args.out, args, rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
