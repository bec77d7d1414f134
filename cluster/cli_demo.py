"""``omnimerge demo`` (the README's main job) and ``omnimerge bench NAME``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

__all__ = ["register"]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", default=None, help="where merges, results and the report go")
    p.add_argument("--executor", choices=("ray", "local"), default="ray",
                   help="ray (default: a local instance for merges and evaluation) or local (no Ray)")
    p.add_argument("--address", default=None, help="Ray cluster to join ('auto' or 'ray://…')")
    p.add_argument("--workers", type=int, default=None, help="merge workers (default: one per GPU or CPU)")
    p.add_argument("--max-samples", type=int, default=None, help="evaluate at most this many items per task")
    p.add_argument("--batch-size", type=int, default=16, help="evaluation batch size")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="tiny zoo → every paper method → evaluation → report",
                       description="Build the tiny expert zoo if missing, merge its five experts with every method "
                                   "of the paper in one sweep, evaluate base, experts and merges on the zoo's five "
                                   "tasks, print the paper-style table and write report.md / report.png.")
    _common(p)
    p.add_argument("--zoo", default=None, help="zoo directory (default ~/.cache/omnimerge/zoo)")
    p.add_argument("--zoo-size", choices=("full", "test"), default="full", help="test: the reduced zoo (faster)")
    p.set_defaults(func=_demo)

    p = sub.add_parser("bench", help="run a named benchmark suite: zoo, paper_qwen2vl_lora, paper_internvl_full",
                       description="Merge a suite's experts with every paper method and evaluate them. The paper "
                                   "suites need their checkpoints (hub cache) and evaluation data (--data-root).")
    p.add_argument("bench", help="built-in bench name or a bench YAML file")
    _common(p)
    p.add_argument("--data-root", default=None, help="folder holding the suite's evaluation data")
    p.add_argument("--zoo", default=None, help="zoo directory for the zoo bench")
    p.set_defaults(func=_bench)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _run(bench: str, args: argparse.Namespace, out: str, **kw) -> int:
    from omnimerge.benchmarks.pipeline import run_bench

    start = time.perf_counter()
    outcome = run_bench(bench, out, executor=args.executor, address=args.address, workers=args.workers,
                        max_samples=args.max_samples, batch_size=args.batch_size, say=_say, **kw)
    print(outcome.table)
    _say(f"report: {outcome.report_md} and {outcome.report_png}")
    _say("timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in outcome.timings.items())
         + f" (wall {time.perf_counter() - start:.0f} s)")
    if outcome.failed_runs:
        _say(f"failed merges: {', '.join(outcome.failed_runs)} (see {outcome.out_dir / 'merges'})")
        return 1
    return 0


def _demo(args: argparse.Namespace) -> int:
    out = args.output or str(Path("omnimerge-demo").resolve())
    return _run("zoo", args, out, zoo_dir=args.zoo, zoo_size=args.zoo_size)


def _bench(args: argparse.Namespace) -> int:
    out = args.output or str(Path(f"omnimerge-bench-{Path(args.bench).stem}").resolve())
    return _run(args.bench, args, out, zoo_dir=args.zoo, data_root=args.data_root)
