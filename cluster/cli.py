"""The ``omnimerge`` command line: the top layer, the only one that sees engine, algorithms and Ray.

Each subcommand family lives in its own ``cli_*`` module exposing ``register(subparsers)``; handlers take the
parsed args and return an exit code. Heavy imports (torch, ray, transformers) happen inside handlers so that
``omnimerge --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

__all__ = ["main", "build_parser"]

# Subcommand modules, in help order. A module that is missing is skipped (features land one by one).
SUBCOMMAND_MODULES = (
    "omnimerge.cluster.cli_merge",
    "omnimerge.cluster.cli_sweep",
    "omnimerge.cluster.cli_modality",
    "omnimerge.cluster.cli_eval",
    "omnimerge.cluster.cli_zoo",
    "omnimerge.cluster.cli_demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="omnimerge",
        description="Merge multimodal LLM checkpoints: streaming, layer-sharded over Ray, evaluated.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from omnimerge.engine.errors import OmnimergeError

    try:
        return int(args.func(args) or 0)
    except OmnimergeError as exc:
        print(f"omnimerge: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("omnimerge: interrupted; staging kept, rerun the same command to resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
