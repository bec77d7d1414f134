"""The method registry: a plain dict of frozen specs, filled by the ``@register`` decorator.

Registry name = function name = file stem. Parameters are read off the function's signature (keyword-only
arguments after ``ctx`` and ``weights``) so a recipe can be validated against them before any tensor is read.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Protocol, Sequence

__all__ = [
    "Param",
    "MethodSpec",
    "Prepass",
    "register",
    "get_method",
    "method_names",
    "all_methods",
    "validate_params",
    "REGISTRY",
    "STREAM_MODES",
]

# Arguments every method receives from the engine; they are not recipe parameters.
_ENGINE_ARGS = ("base", "deltas", "ctx", "weights")


@dataclass(frozen=True)
class Param:
    """One recipe parameter of a method, read from its signature."""

    name: str
    default: Any
    annotation: str
    check: Callable[[Any], str | None] | None = None


class Prepass(Protocol):
    """A streaming statistic a method needs over the whole model before merging (e.g. TIES ``scope: model``).

    The engine runs ``passes`` streaming passes over every tensor the rule covers, one expert task vector
    at a time, never holding the model: ``state = new_state(params)`` per expert; ``update(state, p, delta)``
    for each tensor in pass ``p``; ``end_pass(state, p)`` after each pass; ``result(state)`` at the end.
    The results reach the method as ``ctx.model_stats[stat_key][expert_id]``.
    """

    stat_key: str
    passes: int

    def new_state(self, params: Mapping[str, Any]) -> Any: ...
    def update(self, state: Any, pass_index: int, delta: Any) -> None: ...
    def end_pass(self, state: Any, pass_index: int) -> None: ...
    def result(self, state: Any) -> Any: ...


@dataclass(frozen=True)
class MethodSpec:
    """Everything the engine and the recipe validator need to know about one method."""

    name: str
    fn: Callable[..., Any]
    params: tuple[Param, ...]
    handles: Literal["any", "2d"] = "any"
    fallback: str | None = None  # method used for tensors this one does not handle (e.g. 1-D norms)
    accepts_lowrank: bool = False  # True: deltas may arrive as LowRank factors
    symmetric: bool = True  # output independent of expert order
    random: bool = False  # draws from ctx.generator(...)
    min_experts: int = 1
    max_experts: int | None = None
    batched: Callable[..., Any] | None = None  # same math on stacked same-shape tensors [B, m, n]
    prepass: Callable[[Mapping[str, Any]], Prepass | None] | None = None  # params -> Prepass or None
    reference: str = ""
    summary: str = ""
    uses_weights: bool = False
    # How the engine may run a tensor through the method in row blocks, so that its working memory is that of
    # a block (params -> mode): "elements" — every output element depends only on the same element of the
    # inputs; "rows" — every output row (last dimension) depends only on the same row of the inputs (a 1-D
    # tensor is one row); None — the method needs whole tensors. Random methods stream too: within one tensor
    # the engine hands every block the same generator per salt, so the blocks consume one stream in order.
    streaming: Callable[[Mapping[str, Any]], str | None] | None = None
    # Its kernels are short element-wise passes (and selections, sorts): the engine runs them on one torch
    # thread, as it does every streaming method — no OpenMP fork-join per pass, whose every kernel waits for
    # the slowest thread when the cores are shared. Methods dominated by matrix products or SVDs leave it off.
    one_thread: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)

    def stream_mode(self, params: Mapping[str, Any]) -> str | None:
        """``"elements"``, ``"rows"`` or None for these (resolved) parameters; see ``streaming``."""
        return None if self.streaming is None else self.streaming(params)

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}

    def resolve(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults overlaid with ``params`` (assumed valid)."""
        out = self.defaults()
        out.update(params)
        return out

    def handles_shape(self, shape: Sequence[int]) -> bool:
        return self.handles == "any" or len(shape) == 2


REGISTRY: dict[str, MethodSpec] = {}
STREAM_MODES = ("elements", "rows")


def register(
    *,
    handles: Literal["any", "2d"] = "any",
    fallback: str | None = None,
    accepts_lowrank: bool = False,
    symmetric: bool = True,
    random: bool = False,
    min_experts: int = 1,
    max_experts: int | None = None,
    batched: Callable[..., Any] | None = None,
    prepass: Callable[[Mapping[str, Any]], Prepass | None] | None = None,
    checks: Mapping[str, Callable[[Any], str | None]] | None = None,
    reference: str = "",
    uses_weights: bool = False,
    streaming: str | Callable[[Mapping[str, Any]], str | None] | None = None,
    one_thread: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn`` under its own name. ``checks`` maps a parameter to a function returning a problem
    string (or None) — e.g. ``{"density": in_range(0, 1, low_open=True)}``. ``streaming`` is a mode
    (``"elements"``, ``"rows"``) or a function of the parameters giving one (see ``MethodSpec.streaming``)."""
    if streaming is not None and not callable(streaming):
        if streaming not in STREAM_MODES:
            raise ValueError(f"streaming must be one of {STREAM_MODES} or a function, got {streaming!r}")
        mode = streaming
        streaming = lambda params: mode  # noqa: E731

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        name = fn.__name__
        if name in REGISTRY:
            raise ValueError(f"method '{name}' registered twice")
        sig = inspect.signature(fn)
        params = []
        for p in sig.parameters.values():
            if p.name in _ENGINE_ARGS:
                continue
            if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.default is inspect.Parameter.empty:
                raise TypeError(f"method '{name}': parameter '{p.name}' must be keyword-only with a default")
            ann = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", str(p.annotation))
            params.append(Param(p.name, p.default, ann, (checks or {}).get(p.name)))
        unknown = set(checks or {}) - {p.name for p in params}
        if unknown:
            raise TypeError(f"method '{name}': checks for unknown parameters {sorted(unknown)}")
        doc = inspect.getdoc(fn) or ""
        REGISTRY[name] = MethodSpec(
            name=name,
            fn=fn,
            params=tuple(params),
            handles=handles,
            fallback=fallback,
            accepts_lowrank=accepts_lowrank,
            symmetric=symmetric,
            random=random,
            min_experts=min_experts,
            max_experts=max_experts,
            batched=batched,
            prepass=prepass,
            reference=reference,
            summary=doc.splitlines()[0] if doc else "",
            uses_weights=uses_weights,
            streaming=streaming,
            one_thread=one_thread or streaming is not None,
        )
        return fn

    return deco


def _load_all() -> None:
    # Import every method module explicitly so the registry is complete (no import-time magic elsewhere).
    from . import methods  # noqa: F401


def method_names() -> list[str]:
    _load_all()
    return sorted(REGISTRY)


def all_methods() -> list[MethodSpec]:
    _load_all()
    return [REGISTRY[n] for n in sorted(REGISTRY)]


def get_method(name: str) -> MethodSpec:
    """The spec of ``name``; a ``KeyError`` with suggestions and the full list when unknown."""
    _load_all()
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(unknown_method_message(name)) from None


def unknown_method_message(name: str) -> str:
    _load_all()
    close = difflib.get_close_matches(name, REGISTRY, n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"Unknown merge method '{name}'.{hint} Known methods: {', '.join(sorted(REGISTRY))}."


def validate_params(name: str, params: Mapping[str, Any], n_experts: int | None = None) -> list[str]:
    """Every problem with using method ``name`` with ``params`` (and ``n_experts``), as sentences.

    An empty list means valid. Checks: the method exists, every parameter is known (with suggestions),
    each value passes its check and matches the default's type, the expert count is allowed.
    """
    _load_all()
    if name not in REGISTRY:
        return [unknown_method_message(name)]
    spec = REGISTRY[name]
    known = {p.name: p for p in spec.params}
    problems: list[str] = []
    for key, value in params.items():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=2)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            allowed = ", ".join(known) or "none"
            problems.append(f"method '{name}' has no parameter '{key}'.{hint} Its parameters: {allowed}.")
            continue
        p = known[key]
        type_problem = _type_problem(p, value)
        if type_problem:
            problems.append(f"method '{name}' parameter '{key}': {type_problem}")
            continue
        if p.check is not None and not (value is None and p.default is None):
            msg = p.check(value)
            if msg:
                problems.append(f"method '{name}' parameter '{key}' = {value!r}: {msg}")
    if n_experts is not None:
        if n_experts < spec.min_experts:
            problems.append(f"method '{name}' needs at least {spec.min_experts} experts, got {n_experts}.")
        if spec.max_experts is not None and n_experts > spec.max_experts:
            problems.append(f"method '{name}' takes at most {spec.max_experts} experts, got {n_experts}.")
    return problems


def _type_problem(p: Param, value: Any) -> str | None:
    d = p.default
    if d is None:
        # "unset" default (the method picks one, e.g. per variant): check against the annotation.
        if value is None:
            return None
        ann = p.annotation.replace(" ", "")
        if "bool" in ann:
            d = False
        elif "float" in ann:
            d = 0.0
        elif "int" in ann:
            d = 0
        elif "str" in ann:
            d = ""
        else:
            return None
    if isinstance(d, bool):
        return None if isinstance(value, bool) else f"expected true/false, got {value!r}"
    if isinstance(d, (int, float)) and not isinstance(d, bool):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"expected a number, got {value!r}"
        if isinstance(d, int) and not isinstance(value, int) and "float" not in p.annotation:
            return f"expected an integer, got {value!r}"
        return None
    if isinstance(d, str):
        return None if isinstance(value, str) else f"expected a string, got {value!r}"
    return None


# ---- reusable checks -------------------------------------------------------------------------------

def in_range(low: float | None = None, high: float | None = None, *, low_open: bool = False,
             high_open: bool = False) -> Callable[[Any], str | None]:
    """A check that a number lies in [low, high] (open ends as asked)."""

    def check(v: Any) -> str | None:
        ok = True
        if low is not None:
            ok &= v > low if low_open else v >= low
        if high is not None:
            ok &= v < high if high_open else v <= high
        if ok:
            return None
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        return f"must lie in {lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"

    return check


def one_of(*choices: str) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v in choices else f"must be one of {', '.join(repr(c) for c in choices)}"

    return check
