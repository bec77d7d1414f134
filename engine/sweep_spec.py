"""Sweep files: one base, a pool of experts, methods with parameter grids, expert subsets → named runs.

A sweep is YAML (reference and example in ``docs/sweeps.md``)::

    name: qwen-grid
    base: ./qwen_base
    experts:                                  # the pool, as in a recipe
      chart: ./experts/chart
      ocr: {source: ./experts/ocr, weight: 0.5}
    preset: qwen2_vl                          # shared by every run: preset, rules, dtype, shard_size, seed
    methods:
      - method: ties
        parameters: {normalize: true}         # fixed for every run of this method
        grid: {density: [0.2, 0.4], scale: [0.5, 1.0]}
      - method: task_arithmetic
        grid: {scale: [0.3, 0.5, 0.7, 1.0]}
      - weight_average                        # no grid: one run per subset
    subsets: [all, leave_one_out, pairs, {combinations: 3}, [chart, ocr]]
    name_template: "{method}-{params}-{subset}"
    memory_budget: 8GB
    evaluation: {suite: zoo, data_root: ./data}

Every run *is* a :class:`~omnimerge.engine.recipe.Recipe` built from the same document a lone merge would use
(``recipes/RUN.yaml`` in the output reproduces it with ``omnimerge merge``). Every problem of the file is
collected into one :class:`~omnimerge.engine.errors.RecipeError`.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from omnimerge.algorithms.registry import method_names, validate_params

from .errors import RecipeError
from .recipe import Recipe, parse_recipe, parse_size, read_yaml_document

__all__ = ["SweepRun", "SweepSpec", "load_sweep", "parse_sweep", "expand_subsets", "recipe_document",
           "SUBSET_KINDS"]

_TOP_KEYS = {"name", "description", "base", "experts", "methods", "subsets", "name_template", "evaluation",
             "memory_budget", "preset", "rules", "dtype", "shard_size", "seed", "allow_pickle"}
_SHARED_RECIPE_KEYS = ("preset", "rules", "dtype", "shard_size", "seed", "allow_pickle")
_METHOD_KEYS = {"method", "parameters", "grid"}
_EVAL_KEYS = {"suite", "data_root", "executor", "batch_size", "max_samples", "device", "dtype", "skip_missing",
              "backend", "include_base"}
SUBSET_KINDS = ("all", "leave_one_out", "pairs", "{combinations: k}", "[explicit, list]")
_TEMPLATE_FIELDS = ("method", "params", "subset", "experts", "n", "index")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]+")


@dataclass(frozen=True)
class SweepRun:
    """One merge of a sweep: a name, what varies, and the Recipe it is.

    Attributes:
        run_id: unique, filesystem-safe name (the output folder ``runs/RUN_ID``).
        index: position in the sweep's expansion order (subset-major, then method, then grid point).
        method: the default method of the recipe.
        params: every parameter given for it (fixed ones and this grid point), as in the recipe.
        grid: only the grid point's parameters.
        experts: expert names of the pool, in pool order.
        subset: the subset's label (``all``, ``no-chart``, ``chart+ocr``, …).
        recipe: the validated recipe.
        document: the recipe document (sources absolute) — ``omnimerge merge`` on it gives the same output.
    """

    run_id: str
    index: int
    method: str
    params: dict[str, Any]
    grid: dict[str, Any]
    experts: tuple[str, ...]
    subset: str
    recipe: Recipe = field(repr=False, compare=False)
    document: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)


@dataclass
class SweepSpec:
    """A validated sweep file and its expanded runs."""

    name: str
    path: Path | None
    pool: tuple[str, ...]  # expert names, in file order
    runs: list[SweepRun]
    evaluation: dict[str, Any] | None = None
    memory_budget: int | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    def run(self, run_id: str) -> SweepRun:
        for r in self.runs:
            if r.run_id == run_id:
                return r
        raise KeyError(f"no run '{run_id}' in sweep '{self.name}'")

    def digest(self) -> str:
        doc = [(r.run_id, r.recipe.digest()) for r in self.runs]
        return hashlib.sha256(json.dumps(doc).encode()).hexdigest()


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and validate a sweep file; relative sources are taken relative to its folder."""
    doc, path = read_yaml_document(path, "a sweep YAML")
    return parse_sweep(doc, path=path)


def parse_sweep(doc: Any, *, path: Path | None = None) -> SweepSpec:
    """Validate a sweep document and expand it into runs; every problem is reported at once."""
    where = str(path) if path else None
    if not isinstance(doc, dict):
        raise RecipeError("a sweep must be a mapping with 'base', 'experts' and 'methods'.", path=where)
    problems: list[str] = []
    for key in sorted(set(doc) - _TOP_KEYS):
        problems.append(_unknown("top-level key", key, _TOP_KEYS))
    pool_raw = doc.get("experts")
    if not isinstance(pool_raw, dict) or not pool_raw:
        problems.append("'experts' must be a non-empty mapping of expert name -> source: the pool the subsets "
                        "draw from.")
        pool_raw = {}
    pool = tuple(str(n) for n in pool_raw)
    methods = _parse_methods(doc.get("methods"), problems)
    subsets = expand_subsets(doc.get("subsets", ["all"]), pool, problems)
    template = doc.get("name_template")
    if template is not None and not isinstance(template, str):
        problems.append(f"name_template must be a string like '{{method}}-{{params}}-{{subset}}', got {template!r}.")
        template = None
    budget = None
    if doc.get("memory_budget") is not None:
        try:
            budget = parse_size(doc["memory_budget"])
        except ValueError as exc:
            problems.append(f"memory_budget: {exc}")
    evaluation = _parse_evaluation(doc.get("evaluation"), problems)
    for m in methods:  # parameters against every subset size, before building runs
        for n in sorted({len(s) for _, s in subsets}) or [None]:
            for point in _grid_points(m["grid"]):
                for p in validate_params(m["method"], {**m["parameters"], **point}, n):
                    msg = f"methods: {p}"
                    if msg not in problems:
                        problems.append(msg)
    if problems:
        raise RecipeError(problems, path=where)

    shared = {k: doc[k] for k in _SHARED_RECIPE_KEYS if k in doc}
    runs: list[SweepRun] = []
    names: dict[str, int] = {}
    for label, subset in subsets:
        for m in methods:
            for point in _grid_points(m["grid"]):
                index = len(runs)
                params = {**m["parameters"], **point}
                run_id = _run_name(template, m["method"], params, point, label, subset, index, problems)
                names[run_id] = names.get(run_id, 0) + 1
                rdoc = {"name": run_id, "base": doc.get("base"),
                        "experts": {e: copy.deepcopy(pool_raw[e]) for e in subset},
                        "method": m["method"], "parameters": params, **copy.deepcopy(shared)}
                try:
                    recipe = parse_recipe(rdoc, path=path)
                except RecipeError as exc:
                    for p in exc.problems:
                        if p not in problems:
                            problems.append(p)
                    continue
                runs.append(SweepRun(run_id, index, m["method"], params, dict(point), tuple(subset), label, recipe,
                                     recipe_document(recipe, rdoc)))
    dupes = sorted(n for n, c in names.items() if c > 1)
    if dupes:
        problems.append(f"name_template {template!r} gives {len(dupes)} name(s) to several runs: "
                        f"{', '.join(dupes[:5])}. Include {{params}} and {{subset}} (or {{index}}) in it.")
    if problems:
        raise RecipeError(problems, path=where)
    name = str(doc.get("name") or (path.stem if path else "sweep"))
    return SweepSpec(name, path, pool, runs, evaluation, budget, doc)


def _parse_methods(raw: Any, problems: list[str]) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not raw:
        problems.append("'methods' must be a non-empty list of {method, parameters, grid} (or method names). "
                        f"Known methods: {', '.join(method_names())}.")
        return []
    out = []
    for i, item in enumerate(raw):
        what = f"methods[{i}]"
        if isinstance(item, str):
            item = {"method": item}
        if not isinstance(item, dict) or "method" not in item:
            problems.append(f"{what}: expected a method name or a mapping with 'method', got {item!r}.")
            continue
        for key in sorted(set(item) - _METHOD_KEYS):
            problems.append(f"{what}: {_unknown('key', key, _METHOD_KEYS)}")
        fixed = item.get("parameters") or {}
        grid = item.get("grid") or {}
        if not isinstance(fixed, dict):
            problems.append(f"{what}: 'parameters' must be a mapping of parameter -> value.")
            fixed = {}
        if not isinstance(grid, dict):
            problems.append(f"{what}: 'grid' must be a mapping of parameter -> list of values.")
            grid = {}
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                problems.append(f"{what}: grid '{key}' must be a non-empty list of values, got {values!r}.")
            elif key in fixed:
                problems.append(f"{what}: '{key}' is both fixed in 'parameters' and varied in 'grid'; keep one.")
        grid = {k: v for k, v in grid.items() if isinstance(v, list) and v}
        out.append({"method": str(item["method"]), "parameters": dict(fixed), "grid": grid})
    return out


def _grid_points(grid: dict[str, list]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def expand_subsets(raw: Any, pool: tuple[str, ...], problems: list[str]) -> list[tuple[str, tuple[str, ...]]]:
    """``(label, expert names in pool order)`` per subset; identical subsets are kept once.

    Accepted items: ``all``; ``leave_one_out`` (``no-NAME`` for each expert); ``pairs``; ``{combinations: k}``;
    an explicit list of expert names; ``{experts: [...], name: LABEL}``.
    """
    if isinstance(raw, (str, dict)):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        problems.append(f"'subsets' must be a non-empty list of: {', '.join(SUBSET_KINDS)}.")
        return []
    out: list[tuple[str, tuple[str, ...]]] = []
    order = {n: i for i, n in enumerate(pool)}

    def add(label: str, names: tuple[str, ...]) -> None:
        names = tuple(sorted(names, key=order.__getitem__))
        if names and all(names != s for _, s in out):
            out.append((label, names))

    for i, item in enumerate(raw):
        what = f"subsets[{i}]"
        if item == "all":
            add("all", pool)
        elif item == "leave_one_out":
            if len(pool) < 2:
                problems.append(f"{what}: leave_one_out needs at least 2 experts in the pool, got {len(pool)}.")
            for name in pool:
                add(f"no-{name}", tuple(n for n in pool if n != name))
        elif item == "pairs":
            if len(pool) < 2:
                problems.append(f"{what}: pairs needs at least 2 experts in the pool, got {len(pool)}.")
            for pair in itertools.combinations(pool, 2):
                add("+".join(pair), pair)
        elif isinstance(item, dict) and set(item) == {"combinations"}:
            k = item["combinations"]
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(pool):
                problems.append(f"{what}: combinations must be an integer from 1 to {len(pool)} (the pool size), "
                                f"got {k!r}.")
                continue
            for combo in itertools.combinations(pool, k):
                add("+".join(combo), combo)
        elif isinstance(item, list) or (isinstance(item, dict) and "experts" in item):
            names = item if isinstance(item, list) else item["experts"]
            if isinstance(item, dict) and set(item) - {"experts", "name"}:
                problems.append(f"{what}: an explicit subset takes 'experts' and optionally 'name'.")
            if not isinstance(names, list) or not names:
                problems.append(f"{what}: an explicit subset must be a non-empty list of expert names.")
                continue
            unknown = [str(n) for n in names if str(n) not in order]
            for n in unknown:
                close = difflib.get_close_matches(n, pool, n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                problems.append(f"{what}: expert '{n}' is not in the pool.{hint} Pool: {', '.join(pool)}.")
            if len(set(map(str, names))) != len(names):
                problems.append(f"{what}: expert names repeat in {names!r}.")
            if unknown or len(set(map(str, names))) != len(names):
                continue
            label = str(item["name"]) if isinstance(item, dict) and "name" in item else \
                "+".join(sorted(map(str, names), key=order.__getitem__))
            add(label, tuple(map(str, names)))
        else:
            problems.append(f"{what}: unknown subset {item!r}; use one of {', '.join(SUBSET_KINDS)}.")
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


def _run_name(template: str | None, method: str, params: dict[str, Any], point: dict[str, Any], label: str,
              subset: tuple[str, ...], index: int, problems: list[str]) -> str:
    pstr = "_".join(f"{k}{_fmt(v)}" for k, v in point.items())
    if template is None:
        name = "-".join(p for p in (method, pstr, label) if p)
    else:
        fields = {"method": method, "params": pstr or "default", "subset": label, "experts": "+".join(subset),
                  "n": len(subset), "index": index, **{k: _fmt(v) for k, v in params.items()}}
        try:
            name = template.format_map(fields)
        except (KeyError, IndexError, ValueError) as exc:
            msg = (f"name_template {template!r} cannot be filled for method '{method}': {exc!r}. Fields: "
                   f"{', '.join(_TEMPLATE_FIELDS)} and the parameters each method is given.")
            if msg not in problems:
                problems.append(msg)
            name = f"run{index}"
    safe = _UNSAFE.sub("_", name).strip("._") or f"run{index}"
    return safe


def _parse_evaluation(raw: Any, problems: list[str]) -> dict[str, Any] | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = {"suite": raw}
    if not isinstance(raw, dict) or "suite" not in raw:
        problems.append("evaluation: expected a suite name or a mapping with 'suite' (and optionally "
                        f"{', '.join(sorted(_EVAL_KEYS - {'suite'}))}).")
        return None
    for key in sorted(set(raw) - _EVAL_KEYS):
        problems.append(f"evaluation: {_unknown('key', key, _EVAL_KEYS)}")
    if raw.get("executor") not in (None, "ray", "local"):
        problems.append(f"evaluation: executor must be ray or local, got {raw['executor']!r}.")
    return dict(raw)


def recipe_document(recipe: Recipe, doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with the base and expert sources replaced by the resolved (absolute) ones, so the file can be
    merged on its own from anywhere."""
    out = copy.deepcopy(doc)

    def spec(s: Any) -> dict[str, Any]:
        d: dict[str, Any] = {"source": s.source}
        if s.revision is not None:
            d["revision"] = s.revision
        if s.kind != "auto":
            d["kind"] = s.kind
        return d

    out["base"] = spec(recipe.base)
    out["experts"] = {e.name: {**spec(e.source), **({"weight": e.weight} if e.weight != 1.0 else {})}
                      for e in recipe.experts}
    return out


def _unknown(what: str, key: str, allowed: set[str]) -> str:
    close = difflib.get_close_matches(str(key), allowed, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"unknown {what} '{key}'.{hint} Allowed: {', '.join(sorted(allowed))}."
