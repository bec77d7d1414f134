"""Pure per-tensor merging math and its registry. Imports neither the engine nor Ray."""

from .base import Delta, LowRank, MergeContext, dense, seed_for
from .registry import MethodSpec, all_methods, get_method, method_names, register, validate_params

__all__ = [
    "Delta", "LowRank", "MergeContext", "dense", "seed_for",
    "MethodSpec", "all_methods", "get_method", "method_names", "register", "validate_params",
]
