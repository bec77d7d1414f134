"""``omnimerge eval`` and ``omnimerge report``."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``eval`` and ``report`` subcommands."""
    p = sub.add_parser(
        "eval",
        help="evaluate models on a task suite (Ray: one worker per model)",
        description="Evaluate each MODEL on every task of SUITE; scores go to RESULTS/results.parquet, per-sample "
        "predictions to RESULTS/predictions/. A rerun skips (model, task) pairs already scored.",
    )
    p.add_argument("models", nargs="*", metavar="MODEL",
                   help="checkpoint directory, or NAME=DIR; merged outputs are labelled by their manifest")  # fmt: skip
    p.add_argument("--base", action="append", default=[], metavar="MODEL", help="a model labelled 'base'")
    p.add_argument("--expert", action="append", default=[], metavar="MODEL", help="a model labelled 'expert'")
    p.add_argument("--suite", required=True,
                   help="built-in suite (paper_qwen2vl, paper_internvl, zoo, ...), a suite YAML, or a .jsonl/.parquet "
                        "data file (then --metric)")  # fmt: skip
    p.add_argument("--metric", default=None, help="metric for a data-file suite (e.g. vqa_accuracy)")
    p.add_argument("--data-root", default=".", help="folder the suite's relative data paths live under (default .)")
    p.add_argument("-o", "--results", default="eval_results", help="results directory (default eval_results)")
    p.add_argument("--executor", choices=("ray", "local"), default="ray",
                   help="ray (default): a local Ray instance unless --address; local: in this process")  # fmt: skip
    p.add_argument("--address", default="local", help="Ray cluster to join: 'auto' or 'ray://host:port'")
    p.add_argument("--backend", choices=("builtin", "lmms_eval"), default="builtin",
                   help="builtin transformers evaluator (default) or lmms-eval when installed")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda when a worker sees a GPU)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: the checkpoint's)")
    p.add_argument("--max-samples", type=int, default=None, help="evaluate only the first N samples of each task")
    p.add_argument("--skip-missing", action="store_true", help="run the tasks whose data exists, skip the others")
    p.add_argument("--max-retries", type=int, default=2, help="Ray retries of a model whose worker died")
    p.add_argument("--report", action="store_true", help="also write report.md and report.png into RESULTS")
    p.set_defaults(func=_eval)

    p = sub.add_parser(
        "report",
        help="render results as the paper's table (Markdown) and a chart (PNG)",
        description="Write report.md and report.png for RESULTS (a results directory or results.parquet).",
    )
    p.add_argument("results", help="results directory or results.parquet")
    p.add_argument("-o", "--output", default=None, help="output directory (default: beside the results)")
    p.add_argument("--role", action="append", default=[], metavar="NAME=ROLE",
                   help="label a model base, expert or merged (repeatable)")  # fmt: skip
    p.add_argument("--suite", default=None, help="order tasks as this suite lists them")
    p.add_argument("--title", default="Evaluation report")
    p.set_defaults(func=_report)


class _StderrProgress:
    """Progress on stderr: one rewritten line on a terminal, else a line every 10 s and at each change."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last_line = ""
        self.last_time = 0.0

    def __call__(self, state: Any) -> None:
        line = state.line()
        now = time.monotonic()
        if self.tty:
            print("\r" + line.ljust(len(self.last_line)), end="", file=sys.stderr, flush=True)
        elif line.split(", elapsed")[0] != self.last_line.split(", elapsed")[0] or now - self.last_time > 10:
            print(line, file=sys.stderr, flush=True)
        else:
            return
        self.last_line, self.last_time = line, now

    def close(self) -> None:
        if self.tty and self.last_line:
            print(file=sys.stderr)


def _eval(args: argparse.Namespace) -> int:
    from omnimerge.engine.errors import EvaluationError
    from omnimerge.engine.evaluation.evaluator import EvalOptions
    from omnimerge.engine.evaluation.report import write_report
    from omnimerge.engine.evaluation.results import model_entry
    from omnimerge.engine.evaluation.suites import load_suite

    from .evaluate import evaluate_models

    entries = ([model_entry(m, role="base") for m in args.base] + [model_entry(m, role="expert") for m in args.expert]
               + [model_entry(m) for m in args.models])  # fmt: skip
    if not entries:
        raise EvaluationError("No models to evaluate; give checkpoint directories as MODEL, --base or --expert.")
    suite = load_suite(args.suite, metric=args.metric)
    options = EvalOptions(batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                          max_samples=args.max_samples)  # fmt: skip
    progress = _StderrProgress()
    try:
        table = evaluate_models(entries, suite, data_root=args.data_root, results_dir=args.results,
                                address=args.address, executor=args.executor, options=options, backend=args.backend,
                                skip_missing=args.skip_missing, max_retries=args.max_retries,
                                progress=progress)  # fmt: skip
    finally:
        progress.close()
    names = {e.name for e in entries}
    for row in table.to_pylist():
        if row["model"] in names:
            print(f"{row['model']}\t{row['task']}\t{row['metric']}\t{row['value']:.4f}\t{row['samples']}")
    print(f"results: {args.results}/results.parquet", file=sys.stderr)
    if args.report:
        md, png = write_report(args.results, suite=suite)
        print(f"report: {md}, {png}", file=sys.stderr)
    return 0


def _report(args: argparse.Namespace) -> int:
    from omnimerge.engine.errors import EvaluationError
    from omnimerge.engine.evaluation.report import write_report
    from omnimerge.engine.evaluation.results import ROLES

    roles = {}
    for item in args.role:
        name, sep, role = item.partition("=")
        if not sep:
            raise EvaluationError(f"--role '{item}' must be NAME=ROLE, e.g. --role ta_merge=merged.")
        if role not in ROLES:
            raise EvaluationError(f"--role '{item}': role must be one of {', '.join(ROLES)}.")
        roles[name] = role
    md, png = write_report(args.results, args.output, roles=roles, suite=args.suite, title=args.title)
    print(md)
    print(png)
    return 0
