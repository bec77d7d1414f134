"""Modality recipes: several models of different architectures that share one LLM, merged into one LLM.

A modality recipe is YAML with ``kind: modality``::

    kind: modality
    name: omni-tiny
    llm_base: ./vicuna-tiny                 # the shared LLM base: a causal LM, or {source, key_map} of any model
    models:
      image: {source: ./llava-tiny}         # key map found from config.json architectures (engine/keymaps)
      video: {source: ./video-llava-tiny, key_map: video_llava, weight: 1.0}
      audio: {source: ./qwen2-audio-tiny, key_map: {'^language_model\\.model\\.': 'model.'}}   # inline map
      lora_image: {source: ./llava-base, adapter: ./llava-lora}   # PEFT adapter on that model
    method: task_arithmetic
    parameters: {scale: 0.5}
    rules:                                  # on shared-namespace names; first match wins; default: merge
      - {match: "*norm.weight", action: keep}            # base value into every model
      - {match: "model.embed_tokens.weight", action: own}   # each model keeps its own (vocabularies differ)
    lora: {merge: delta}                    # delta (default: merge ΔW = s·B·A) | factors (A's and B's apart)
    dtype: bfloat16                         # merged LLM dtype (default: the LLM base's)
    shard_size: 5GB
    seed: 0

Task vectors are taken against the shared LLM base. Every problem is reported at once (``RecipeError``).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from omnimerge.algorithms.registry import get_method, method_names, validate_params

from .errors import RecipeError
from .modality_keymap import KeyMap, parse_keymap
from .recipe import DEFAULT_SHARD_SIZE, DTYPE_NAMES, Rule, parse_size
from .sources import SourceSpec

__all__ = ["ModalityModel", "ModalityRecipe", "load_modality_recipe", "parse_modality_recipe", "is_modality_recipe",
           "LLM_ACTIONS", "LORA_MERGE_MODES"]

LLM_ACTIONS = ("merge", "keep", "own")
LORA_MERGE_MODES = ("delta", "factors")
_TOP_KEYS = {"kind", "name", "description", "llm_base", "models", "method", "parameters", "rules", "lora", "dtype",
             "shard_size", "seed", "allow_pickle"}
_MODEL_KEYS = {"source", "revision", "key_map", "adapter", "weight", "eval_suite"}
_BASE_KEYS = {"source", "revision", "key_map"}
_RULE_KEYS = {"match", "regex", "action", "method", "parameters", "ndim", "why"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class ModalityModel:
    """One model of a modality recipe.

    Attributes:
        name: the recipe's name for it (names its output folder ``models/<name>``).
        source: the model checkpoint (for a LoRA model: the model the adapter was trained on).
        key_map: how its LLM tensors align to the shared namespace; ``None``: found from its config.
        adapter: a PEFT LoRA adapter on ``source`` (LLM targets, connectors in ``modules_to_save``), or None.
        weight: its weight for methods that use weights.
        eval_suite: the suite it is evaluated on (its own modality's tasks), if any.
    """

    name: str
    source: SourceSpec
    key_map: KeyMap | None = None
    adapter: SourceSpec | None = None
    weight: float = 1.0
    eval_suite: str | None = None


@dataclass
class ModalityRecipe:
    """A validated modality recipe (module docstring for the YAML)."""

    llm_base: SourceSpec
    llm_base_key_map: KeyMap | None
    models: list[ModalityModel]
    method: str
    params: dict[str, Any]
    rules: list[Rule]
    lora_merge: str = "delta"
    dtype: str | None = None
    shard_size: int = DEFAULT_SHARD_SIZE
    seed: int = 0
    allow_pickle: bool = False
    name: str | None = None
    path: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    def rule_for(self, name: str, ndim: int) -> Rule:
        """The first rule matching a shared-namespace tensor; merging with the default method otherwise."""
        for rule in self.rules:
            if rule.matches(name, ndim):
                return rule
        return Rule(pattern="*", action="merge", origin="default")

    def method_of(self, rule: Rule) -> tuple[str, dict[str, Any]]:
        if rule.method is None:
            return self.method, dict(self.params)
        return rule.method, dict(rule.params)

    @property
    def weights(self) -> list[float]:
        return [m.weight for m in self.models]

    def canonical(self) -> dict[str, Any]:
        """A normalised, JSON-able form (for digests and provenance)."""
        def spec(s: SourceSpec | None) -> dict[str, Any] | None:
            return None if s is None else {"source": s.source, "revision": s.revision, "kind": s.kind}

        return {
            "kind": "modality",
            "llm_base": {**(spec(self.llm_base) or {}),
                         "key_map": self.llm_base_key_map.to_dict() if self.llm_base_key_map else "auto"},
            "models": [{"name": m.name, **(spec(m.source) or {}), "adapter": spec(m.adapter), "weight": m.weight,
                        "key_map": m.key_map.to_dict() if m.key_map else "auto"} for m in self.models],
            "method": self.method,
            "parameters": self.params,
            "rules": [{"pattern": r.pattern, "regex": r.is_regex, "action": r.action, "method": r.method,
                       "parameters": dict(r.params), "ndim": r.ndim} for r in self.rules],
            "lora_merge": self.lora_merge,
            "dtype": self.dtype,
            "shard_size": self.shard_size,
            "seed": self.seed,
        }

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.canonical(), sort_keys=True, default=str).encode()).hexdigest()


def is_modality_recipe(doc: Any) -> bool:
    """True for a parsed YAML document with ``kind: modality``."""
    return isinstance(doc, dict) and doc.get("kind") == "modality"


def load_modality_recipe(path: str | Path) -> ModalityRecipe:
    """Read and validate a modality recipe file."""
    from .recipe import read_yaml_document

    doc, path = read_yaml_document(path, "a modality recipe (YAML)")
    return parse_modality_recipe(doc, path=path)


def parse_modality_recipe(doc: Any, *, path: Path | None = None) -> ModalityRecipe:
    """Validate a parsed modality recipe; every problem is reported at once in one ``RecipeError``."""
    where = str(path) if path else None
    if not isinstance(doc, dict):
        raise RecipeError("the top level must be a mapping with kind: modality, llm_base, models and method.",
                          path=where)
    problems: list[str] = []
    root = path.parent if path else Path.cwd()
    if doc.get("kind") != "modality":
        problems.append(f"kind must be 'modality' for a modality recipe, got {doc.get('kind')!r}. (A recipe "
                        "without kind: modality is an ordinary merge recipe: use `omnimerge merge`.)")
    for key in sorted(set(doc) - _TOP_KEYS):
        problems.append(_unknown("top-level key", key, _TOP_KEYS))

    base_spec, base_map = None, None
    if "llm_base" not in doc:
        problems.append("'llm_base' is missing: name the shared LLM base the modality models were tuned from (a "
                        "causal LM checkpoint, or {source, key_map} of a model whose LLM is the base).")
    else:
        base_spec, base_map = _parse_base(doc["llm_base"], root, problems)

    models = _parse_models(doc.get("models"), root, problems)

    method = doc.get("method")
    params = doc.get("parameters") or {}
    if method is None:
        problems.append(f"'method' is missing. Known methods: {', '.join(method_names())}.")
        method = "task_arithmetic"
    elif not isinstance(params, dict):
        problems.append("'parameters' must be a mapping of parameter -> value.")
        params = {}
    else:
        problems += [f"default method: {p}" for p in validate_params(str(method), params, len(models) or None)]
        _check_prepass(str(method), params, "default method", problems)

    rules = _parse_rules(doc.get("rules"), len(models) or None, problems)

    lora = doc.get("lora") or {}
    lora_merge = "delta"
    if not isinstance(lora, dict) or set(lora) - {"merge"}:
        problems.append(f"'lora' must be {{merge: delta | factors}}, got {lora!r}.")
    else:
        lora_merge = lora.get("merge", "delta")
        if lora_merge not in LORA_MERGE_MODES:
            problems.append(f"lora.merge must be 'delta' (merge ΔW = s·B·A, the default) or 'factors' (merge the A "
                            f"factors and the B factors separately, as the paper's modality script), got "
                            f"{lora_merge!r}.")
            lora_merge = "delta"
        if lora_merge == "factors" and models and not all(m.adapter for m in models):
            plain = [m.name for m in models if not m.adapter]
            problems.append(f"lora.merge: factors needs every model to be a LoRA adapter, but "
                            f"{', '.join(repr(n) for n in plain)} have no 'adapter'. Use lora.merge: delta.")

    dtype = doc.get("dtype")
    if dtype is not None:
        if str(dtype).lower() not in DTYPE_NAMES:
            problems.append(f"dtype {dtype!r} is not supported; use float32, float16 or bfloat16 (or leave it out "
                            "to keep the LLM base's dtypes).")
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
    allow_pickle = doc.get("allow_pickle", False)
    if not isinstance(allow_pickle, bool):
        problems.append(f"allow_pickle must be true or false, got {allow_pickle!r}.")
        allow_pickle = False

    if problems:
        raise RecipeError(problems, path=where)
    assert base_spec is not None  # guarded by problems above
    return ModalityRecipe(llm_base=base_spec, llm_base_key_map=base_map, models=models, method=str(method),
                          params=dict(params), rules=rules, lora_merge=lora_merge, dtype=dtype, shard_size=shard_size,
                          seed=seed, allow_pickle=allow_pickle, name=doc.get("name"), path=path, raw=doc)


def _parse_base(raw: Any, root: Path, problems: list[str]) -> tuple[SourceSpec | None, KeyMap | None]:
    if isinstance(raw, str):
        return SourceSpec(_localise(raw, root)), None
    if not isinstance(raw, dict) or not isinstance(raw.get("source"), str):
        problems.append(f"llm_base: expected a source string or {{source, revision, key_map}}, got {raw!r}.")
        return None, None
    for key in sorted(set(raw) - _BASE_KEYS):
        problems.append(f"llm_base: {_unknown('key', key, _BASE_KEYS)}")
    key_map = parse_keymap(raw["key_map"], "llm_base key_map", problems) if raw.get("key_map") is not None else None
    revision = raw.get("revision")
    return SourceSpec(_localise(raw["source"], root), None if revision is None else str(revision), "model"), key_map


def _parse_models(raw: Any, root: Path, problems: list[str]) -> list[ModalityModel]:
    if not raw:
        problems.append("'models' is missing or empty: give a mapping of model name -> {source[, key_map, adapter]}.")
        return []
    if not isinstance(raw, dict):
        problems.append("'models' must be a mapping of model name -> source or {source, key_map, adapter, weight}.")
        return []
    models = []
    for name, item in raw.items():
        what = f"model '{name}'"
        if not isinstance(name, str) or not _NAME_RE.match(name):
            problems.append(f"{what}: a model name names its output folder; use letters, digits and . _ - only.")
            continue
        if isinstance(item, str):
            item = {"source": item}
        if not isinstance(item, dict) or not isinstance(item.get("source"), str):
            problems.append(f"{what}: expected a source string or a mapping with 'source', got {item!r}.")
            continue
        for key in sorted(set(item) - _MODEL_KEYS):
            problems.append(f"{what}: {_unknown('key', key, _MODEL_KEYS)}")
        key_map = parse_keymap(item["key_map"], f"{what} key_map", problems) if item.get("key_map") is not None \
            else None
        adapter = item.get("adapter")
        if adapter is not None and not isinstance(adapter, str):
            problems.append(f"{what}: 'adapter' must be the path (or hub id) of a PEFT LoRA adapter, got {adapter!r}.")
            adapter = None
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            problems.append(f"{what}: weight must be a number, got {weight!r}.")
            weight = 1.0
        suite = item.get("eval_suite")
        revision = item.get("revision")
        models.append(ModalityModel(
            name=name,
            source=SourceSpec(_localise(item["source"], root), None if revision is None else str(revision), "model"),
            key_map=key_map,
            adapter=SourceSpec(_localise(adapter, root), None, "lora") if adapter else None,
            weight=float(weight),
            eval_suite=None if suite is None else str(_localise(str(suite), root)),
        ))
    return models


def _parse_rules(raw: Any, n_models: int | None, problems: list[str]) -> list[Rule]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        problems.append("'rules' must be a list of {match|regex, action[, method, parameters, ndim]}.")
        return []
    rules = []
    for i, item in enumerate(raw):
        what = f"rule {i + 1}"
        if not isinstance(item, dict):
            problems.append(f"{what}: expected a mapping like {{match: '*norm.weight', action: keep}}, got {item!r}.")
            continue
        for key in sorted(set(item) - _RULE_KEYS):
            problems.append(f"{what}: {_unknown('key', key, _RULE_KEYS)}")
        if ("match" in item) == ("regex" in item):
            problems.append(f"{what}: give exactly one of 'match' (a glob) or 'regex'.")
            continue
        is_regex = "regex" in item
        pattern = str(item["regex"] if is_regex else item["match"])
        try:
            re.compile(pattern if is_regex else fnmatch.translate(pattern))
        except re.error as exc:
            problems.append(f"{what}: regex {pattern!r} does not compile: {exc}.")
            continue
        action = item.get("action", "merge")
        if action not in LLM_ACTIONS:
            hint = " (a modality merge must keep every model complete, so nothing is dropped)" if action == "drop" else ""
            problems.append(f"{what}: action must be merge, keep (base value into every model) or own (each model "
                            f"keeps its own tensor); got {action!r}{hint}.")
            continue
        method, params = item.get("method"), item.get("parameters") or {}
        if not isinstance(params, dict):
            problems.append(f"{what}: 'parameters' must be a mapping.")
            params = {}
        if action != "merge" and (method is not None or params):
            problems.append(f"{what}: 'method'/'parameters' only apply to action: merge (this rule is {action}).")
        elif method is not None:
            problems += [f"{what}: {p}" for p in validate_params(str(method), params, n_models)]
            _check_prepass(str(method), params, what, problems)
        elif params:
            problems.append(f"{what}: 'parameters' given without 'method'; name the method they belong to.")
        ndim = item.get("ndim")
        if ndim is not None and (isinstance(ndim, bool) or not isinstance(ndim, int) or ndim < 0):
            problems.append(f"{what}: ndim must be a non-negative integer, got {ndim!r}.")
            ndim = None
        rules.append(Rule(pattern=pattern, action=action, is_regex=is_regex,
                          method=None if method is None else str(method), params=tuple(sorted(params.items())),
                          ndim=ndim, origin="recipe", why=str(item.get("why", ""))))
    return rules


def _check_prepass(method: str, params: dict[str, Any], what: str, problems: list[str]) -> None:
    """Model-wide pre-passes (e.g. TIES scope: model) are not run by modality merges: say so before any work."""
    try:
        spec = get_method(method)
    except KeyError:
        return  # validate_params already reported the unknown method
    if spec.prepass is None:
        return
    try:
        needs = spec.prepass(spec.resolve(params)) is not None
    except (TypeError, ValueError):
        return
    if needs:
        problems.append(f"{what}: method '{method}' with these parameters needs a model-wide pre-pass, which modality "
                        "merges do not run; use its per-tensor form (for ties: scope: tensor).")


def _localise(source: str, root: Path) -> str:
    expanded = Path(source).expanduser()
    if expanded.is_absolute():
        return str(expanded)
    candidate = root / expanded
    if candidate.exists() or source.startswith(("./", "../")):
        return str(candidate.resolve())
    return source


def _unknown(what: str, key: Any, allowed: set[str]) -> str:
    import difflib

    close = difflib.get_close_matches(str(key), allowed, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"unknown {what} '{key}'.{hint} Allowed: {', '.join(sorted(allowed))}."
