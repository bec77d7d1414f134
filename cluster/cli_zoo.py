"""``omnimerge zoo build``: make the tiny expert zoo (base, five experts, held-out data) on CPU in minutes."""

from __future__ import annotations

import argparse
import sys
import time

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``zoo`` command family (``zoo build``)."""
    zoo = sub.add_parser(
        "zoo",
        help="the tiny expert zoo: a miniature of the paper's benchmark that runs on CPU",
        description="A tiny Qwen2-VL base, five experts (VQA, Geometry, Chart, OCR, Grounding) as full fine-tunes "
        "and LoRA adapters, and held-out test sets, built deterministically on CPU.",
    )
    zoo_sub = zoo.add_subparsers(dest="zoo_command", metavar="ZOO_COMMAND")
    build = zoo_sub.add_parser(
        "build",
        help="build (or finish building) a zoo",
        description="Build the zoo into DIR: data/<task>/test.parquet, base/, experts/<task>/, lora/<task>/ and "
        "zoo.json. Parts already built and verified (sha256) are skipped, so an interrupted build resumes. "
        "The default DIR is $OMNIMERGE_ZOO, else ~/.cache/omnimerge/zoo.",
    )
    build.add_argument("--family", choices=("full", "lora", "both"), default="both",
                       help="expert family: full fine-tunes, LoRA adapters, or both (default)")  # fmt: skip
    build.add_argument("-o", "--output", default=None, metavar="DIR", help="zoo directory (default ~/.cache/omnimerge/zoo)")
    build.add_argument("--size", choices=("full", "test"), default="full",
                       help="full (default; a few minutes on 2 cores) or test (the reduced zoo of the test suite)")  # fmt: skip
    build.add_argument("--seed", type=int, default=0, help="zoo seed (default 0); same seed, same checkpoints")
    build.set_defaults(func=_build)
    zoo.set_defaults(func=lambda args: (zoo.print_help(), 2)[1])


def _build(args: argparse.Namespace) -> int:
    from omnimerge.benchmarks.zoo.build import build_zoo, default_zoo_dir

    started = time.perf_counter()
    target = args.output or default_zoo_dir()

    def progress(line: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {line}", file=sys.stderr, flush=True)

    progress(f"building the {args.size} zoo ({args.family}) in {target}")
    root = build_zoo(args.output, family=args.family, size=args.size, seed=args.seed, progress=progress)
    print(root)
    return 0
