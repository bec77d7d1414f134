"""Recipes: what to merge, how, and where each tensor goes — parsed and validated before any work starts.

A recipe is YAML::

    base: Qwen/Qwen2-VL-7B-Instruct          # local dir, hub id, or {source: ..., revision: ...}
    experts:
      vqa: ./experts/vqa                     # short form
      chart: {source: org/chart, revision: 3f2a..., weight: 0.5}
      ocr: {source: ./lora/ocr}              # a PEFT LoRA adapter dir is detected (adapter_config.json)
    method: ties                             # default method for tensors a rule merges
    parameters: {density: 0.2}
    preset: qwen2_vl                         # optional: the paper's policy for a model family
    rules:                                   # first match wins; checked before the preset's rules
      - {match: "*.bias", action: keep}      # glob on the tensor name (`*` crosses dots)
      - {regex: 'mlp\\.down_proj', action: merge, method: task_arithmetic, parameters: {scale: 0.5}}
      - {match: "lm_head.weight", action: drop}
    dtype: bfloat16                          # output dtype of merged/kept float tensors (default: as the base)
    shard_size: 5GB
    seed: 0

Every problem is collected and reported together (``RecipeError.problems``).
A mergekit YAML (``merge_method``, ``base_model``, ``models``…) is recognised and translated
(:mod:`omnimerge.engine.mergekit_compat`).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import yaml

from omnimerge.algorithms.registry import get_method, method_names, validate_params

from .errors import RecipeError
from .sources import SourceSpec

__all__ = ["ExpertSpec", "Rule", "Recipe", "load_recipe", "parse_recipe", "parse_size", "load_preset",
           "preset_names", "DTYPE_NAMES", "read_yaml_document"]

# Output dtype names accepted in recipes -> safetensors dtype strings.
DTYPE_NAMES = {
    "float32": "F32", "fp32": "F32", "f32": "F32",
    "float16": "F16", "fp16": "F16", "f16": "F16", "half": "F16",
    "bfloat16": "BF16", "bf16": "BF16",
}
ACTIONS = ("merge", "keep", "drop")
_TOP_KEYS = {"base", "experts", "method", "parameters", "preset", "rules", "dtype", "shard_size", "seed",
             "allow_pickle", "trust_remote_code", "name", "description"}
_EXPERT_KEYS = {"source", "revision", "weight", "kind"}
_RULE_KEYS = {"match", "regex", "action", "method", "parameters", "ndim", "why"}
DEFAULT_SHARD_SIZE = 5 * 10**9  # transformers' default max_shard_size is "5GB" (decimal)


@dataclass(frozen=True)
class ExpertSpec:
    """One expert of a recipe: a name, where it comes from, and its weight (1.0 unless given)."""

    name: str
    source: SourceSpec
    weight: float = 1.0


@dataclass(frozen=True)
class Rule:
    """``action`` for tensors whose name matches ``pattern`` (glob unless ``is_regex``).

    ``method``/``params`` are None/empty for the recipe's default method. ``ndim`` restricts the rule to
    tensors of that rank. ``origin`` says where the rule came from (``recipe`` or ``preset:NAME``).
    """

    pattern: str
    action: str
    is_regex: bool = False
    method: str | None = None
    params: tuple[tuple[str, Any], ...] = ()
    ndim: int | None = None
    origin: str = "recipe"
    why: str = ""

    @cached_property
    def _regex(self) -> re.Pattern[str]:
        return re.compile(self.pattern) if self.is_regex else re.compile(fnmatch.translate(self.pattern))

    def matches(self, name: str, ndim: int) -> bool:
        if self.ndim is not None and ndim != self.ndim:
            return False
        return bool(self._regex.search(name)) if self.is_regex else bool(self._regex.match(name))

    def describe(self) -> str:
        kind = "regex" if self.is_regex else "glob"
        nd = f" ndim={self.ndim}" if self.ndim is not None else ""
        return f"{self.origin} {kind} {self.pattern!r}{nd}"


DEFAULT_RULE = Rule(pattern="*", action="merge", origin="default")


@dataclass
class Recipe:
    """A validated recipe. ``rules`` holds the recipe's own rules followed by the preset's."""

    base: SourceSpec
    experts: list[ExpertSpec]
    method: str
    params: dict[str, Any]
    rules: list[Rule]
    dtype: str | None = None  # safetensors dtype string, or None: keep each tensor's base dtype
    shard_size: int = DEFAULT_SHARD_SIZE
    seed: int = 0
    allow_pickle: bool = False
    trust_remote_code: bool = False
    preset: str | None = None
    path: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict)
    name: str | None = None

    def rule_for(self, name: str, ndim: int) -> Rule:
        """The first rule that matches; the default rule (merge with the default method) otherwise."""
        for rule in self.rules:
            if rule.matches(name, ndim):
                return rule
        return DEFAULT_RULE

    def method_of(self, rule: Rule) -> tuple[str, dict[str, Any]]:
        """Method name and parameters (with the recipe's defaults) that ``rule`` merges with."""
        if rule.method is None:
            return self.method, dict(self.params)
        return rule.method, dict(rule.params)

    @property
    def weights(self) -> list[float]:
        return [e.weight for e in self.experts]

    def canonical(self) -> dict[str, Any]:
        """A normalised, JSON-able form: the same merge gives the same dict (used for hashes, provenance)."""
        return {
            "base": _spec_dict(self.base),
            "experts": [{"name": e.name, "weight": e.weight, **_spec_dict(e.source)} for e in self.experts],
            "method": self.method,
            "parameters": self.params,
            "rules": [
                {"pattern": r.pattern, "regex": r.is_regex, "action": r.action, "method": r.method,
                 "parameters": dict(r.params), "ndim": r.ndim, "origin": r.origin}
                for r in self.rules
            ],
            "dtype": self.dtype,
            "shard_size": self.shard_size,
            "seed": self.seed,
        }

    def digest(self) -> str:
        blob = json.dumps(self.canonical(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()


def _spec_dict(spec: SourceSpec) -> dict[str, Any]:
    return {"source": spec.source, "revision": spec.revision, "kind": spec.kind}


# ---- sizes -------------------------------------------------------------------------------------------

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 10**3, "m": 10**6, "g": 10**9,
          "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(value: Any) -> int:
    """``"5GB"`` → 5·10⁹, ``"512MiB"`` → 512·2²⁰, ``1000`` → 1000. Raises ValueError with the accepted forms."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size like '5GB' or '512MiB', got {value!r}")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ValueError(f"size must be positive, got {value!r}")
        return int(value)
    m = _SIZE_RE.match(str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"expected a size like '5GB' or '512MiB', got {value!r}")
    size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if size <= 0:
        raise ValueError(f"size must be positive, got {value!r}")
    return size


# ---- presets -----------------------------------------------------------------------------------------

def preset_names() -> list[str]:
    folder = resources.files("omnimerge.engine") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_preset(name: str) -> tuple[list[Rule], dict[str, Any]]:
    """The rules of a built-in preset (data in ``engine/presets/NAME.yaml``) and its raw document."""
    path = resources.files("omnimerge.engine") / "presets" / f"{name}.yaml"
    if not path.is_file():
        import difflib

        close = difflib.get_close_matches(name, preset_names(), n=2)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise KeyError(f"unknown preset '{name}'.{hint} Built-in presets: {', '.join(preset_names())}.")
    doc = yaml.safe_load(path.read_text())
    problems: list[str] = []
    rules = [r for i, raw in enumerate(doc.get("rules", []))
             if (r := _parse_rule(raw, f"preset '{name}' rule {i + 1}", problems, origin=f"preset:{name}"))]
    if problems:  # a broken built-in preset is a bug in omnimerge, but say what it is
        raise RecipeError(problems, path=str(path))
    return rules, doc


# ---- parsing -----------------------------------------------------------------------------------------

def read_yaml_document(path: str | Path, what: str) -> tuple[Any, Path]:
    """The parsed YAML of a recipe-like file; ``RecipeError`` naming the file when missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"file not found: {path}. Give the path of {what}.", path=str(path))
    try:
        return yaml.safe_load(path.read_text()), path
    except yaml.YAMLError as exc:
        raise RecipeError(f"not valid YAML: {exc}", path=str(path)) from None


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file (omnimerge or mergekit format)."""
    doc, path = read_yaml_document(path, "a YAML recipe")
    return parse_recipe(doc, path=path)


def parse_recipe(doc: Any, *, path: Path | None = None) -> Recipe:
    """Validate a parsed recipe document; every problem is reported at once in one ``RecipeError``."""
    where = str(path) if path else None
    if not isinstance(doc, dict):
        raise RecipeError("the top level must be a mapping with 'base', 'experts' and 'method'.", path=where)
    if doc.get("kind") == "modality":
        raise RecipeError("this is a modality recipe (kind: modality); run it with `omnimerge modality RECIPE -o OUT`.",
                          path=where)
    if "merge_method" in doc:
        from .mergekit_compat import translate_mergekit

        doc = translate_mergekit(doc, path=where)
    problems: list[str] = []
    root = path.parent if path else Path.cwd()

    for key in sorted(set(doc) - _TOP_KEYS):
        problems.append(_unknown_key("top-level key", key, _TOP_KEYS))

    base = None
    if "base" not in doc:
        problems.append("'base' is missing: name the base model (local dir or hub id) the experts were tuned from.")
    else:
        base = _parse_source(doc["base"], "base", root, problems)

    experts: list[ExpertSpec] = []
    raw_experts = doc.get("experts")
    if not raw_experts:
        problems.append("'experts' is missing or empty: give a mapping of expert name -> source.")
    elif not isinstance(raw_experts, dict):
        problems.append("'experts' must be a mapping of expert name -> source (or {source, revision, weight}).")
    else:
        for name, raw in raw_experts.items():
            spec = _parse_source(raw, f"expert '{name}'", root, problems, allow_weight=True)
            weight = raw.get("weight", 1.0) if isinstance(raw, dict) else 1.0
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                problems.append(f"expert '{name}': weight must be a number, got {weight!r}.")
                weight = 1.0
            if spec is not None:
                experts.append(ExpertSpec(str(name), spec, float(weight)))

    method = doc.get("method")
    params = doc.get("parameters") or {}
    if method is None:
        problems.append(f"'method' is missing. Known methods: {', '.join(method_names())}.")
        method = "task_arithmetic"
    elif not isinstance(params, dict):
        problems.append("'parameters' must be a mapping of parameter -> value.")
        params = {}
    else:
        problems += [f"default method: {p}" for p in validate_params(str(method), params, len(experts) or None)]

    rules: list[Rule] = []
    raw_rules = doc.get("rules") or []
    if not isinstance(raw_rules, list):
        problems.append("'rules' must be a list of {match|regex, action[, method, parameters, ndim]}.")
        raw_rules = []
    for i, raw in enumerate(raw_rules):
        rule = _parse_rule(raw, f"rule {i + 1}", problems, n_experts=len(experts) or None)
        if rule:
            rules.append(rule)

    preset = doc.get("preset")
    if preset is not None:
        try:
            preset_rules, _ = load_preset(str(preset))
            rules.extend(preset_rules)
        except KeyError as exc:
            problems.append(str(exc.args[0]))

    dtype = doc.get("dtype")
    if dtype is not None:
        if str(dtype).lower() not in DTYPE_NAMES:
            problems.append(f"dtype {dtype!r} is not supported for output; use one of "
                            f"float32, float16, bfloat16 (or leave it out to keep the base's dtypes).")
            dtype = None
        else:
            dtype = DTYPE_NAMES[str(dtype).lower()]

    shard_size = DEFAULT_SHARD_SIZE
    if "shard_size" in doc:
        try:
            shard_size = parse_size(doc["shard_size"])
        except ValueError as exc:
            problems.append(f"shard_size: {exc}")

    seed = doc.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        problems.append(f"seed must be a non-negative integer, got {seed!r}.")
        seed = 0

    flags = {}
    for flag in ("allow_pickle", "trust_remote_code"):
        value = doc.get(flag, False)
        if not isinstance(value, bool):
            problems.append(f"{flag} must be true or false, got {value!r}.")
            value = False
        flags[flag] = value
    if flags["trust_remote_code"]:
        problems.append("trust_remote_code: true is not supported: omnimerge reads weights and configs only and "
                        "never runs model code. Remove the key.")

    if problems:
        raise RecipeError(problems, path=where)
    assert base is not None  # guarded by problems above
    return Recipe(base=base, experts=experts, method=str(method), params=dict(params), rules=rules,
                  dtype=dtype, shard_size=shard_size, seed=seed, allow_pickle=flags["allow_pickle"],
                  preset=preset, path=path, raw=doc, name=doc.get("name"))


def _parse_source(raw: Any, what: str, root: Path, problems: list[str], *,
                  allow_weight: bool = False) -> SourceSpec | None:
    if isinstance(raw, str):
        return SourceSpec(_localise(raw, root))
    if not isinstance(raw, dict):
        problems.append(f"{what}: expected a source string or a mapping with 'source', got {raw!r}.")
        return None
    allowed = _EXPERT_KEYS if allow_weight else _EXPERT_KEYS - {"weight"}
    for key in sorted(set(raw) - allowed):
        problems.append(f"{what}: {_unknown_key('key', key, allowed)}")
    if "source" not in raw or not isinstance(raw["source"], str):
        problems.append(f"{what}: 'source' is missing (a local dir, a hub id, or a LoRA adapter dir).")
        return None
    kind = raw.get("kind", "auto")
    if kind not in ("auto", "model", "lora"):
        problems.append(f"{what}: kind must be auto, model or lora, got {kind!r}.")
        kind = "auto"
    revision = raw.get("revision")
    return SourceSpec(_localise(raw["source"], root), None if revision is None else str(revision), kind)


def _localise(source: str, root: Path) -> str:
    """Relative local paths are taken relative to the recipe's folder; hub ids pass through unchanged."""
    expanded = Path(source).expanduser()
    if expanded.is_absolute():
        return str(expanded)
    candidate = root / expanded
    if candidate.exists() or source.startswith(("./", "../")):
        return str(candidate.resolve())
    return source


def _parse_rule(raw: Any, what: str, problems: list[str], *, origin: str = "recipe",
                n_experts: int | None = None) -> Rule | None:
    if not isinstance(raw, dict):
        problems.append(f"{what}: expected a mapping like {{match: '*.bias', action: keep}}, got {raw!r}.")
        return None
    for key in sorted(set(raw) - _RULE_KEYS):
        problems.append(f"{what}: {_unknown_key('key', key, _RULE_KEYS)}")
    if ("match" in raw) == ("regex" in raw):
        problems.append(f"{what}: give exactly one of 'match' (a glob) or 'regex'.")
        return None
    is_regex = "regex" in raw
    pattern = str(raw["regex"] if is_regex else raw["match"])
    if is_regex:
        try:
            re.compile(pattern)
        except re.error as exc:
            problems.append(f"{what}: regex {pattern!r} does not compile: {exc}.")
            return None
    action = raw.get("action", "merge")
    if action not in ACTIONS:
        problems.append(f"{what}: action must be one of merge, keep, drop; got {action!r}.")
        return None
    method = raw.get("method")
    params = raw.get("parameters") or {}
    if action != "merge" and (method is not None or params):
        problems.append(f"{what}: 'method'/'parameters' only apply to action: merge (this rule is {action}).")
    if not isinstance(params, dict):
        problems.append(f"{what}: 'parameters' must be a mapping.")
        params = {}
    if method is not None:
        problems += [f"{what}: {p}" for p in validate_params(str(method), params, n_experts)]
    elif params:
        problems.append(f"{what}: 'parameters' given without 'method'; name the method they belong to.")
    ndim = raw.get("ndim")
    if ndim is not None and (isinstance(ndim, bool) or not isinstance(ndim, int) or ndim < 0):
        problems.append(f"{what}: ndim must be a non-negative integer, got {ndim!r}.")
        ndim = None
    return Rule(pattern=pattern, action=action, is_regex=is_regex, method=None if method is None else str(method),
                params=tuple(sorted(params.items())), ndim=ndim, origin=origin, why=str(raw.get("why", "")))


def _unknown_key(what: str, key: str, allowed: set[str]) -> str:
    import difflib

    close = difflib.get_close_matches(str(key), allowed, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"unknown {what} '{key}'.{hint} Allowed: {', '.join(sorted(allowed))}."


def resolve_params(method: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Parameters with the method's defaults filled in (for provenance and plans)."""
    return get_method(method).resolve(params)
