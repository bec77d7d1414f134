"""The installed omnimerge version (recorded in manifests, model cards and evaluation results)."""

from __future__ import annotations

__all__ = ["omnimerge_version"]


def omnimerge_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("omnimerge")
    except PackageNotFoundError:  # running from a source tree without install
        return "0+unknown"
