"""Reading mergekit YAML recipes, for the methods both tools share, with mergekit's meaning.

A mergekit config (``merge_method``, ``base_model``, ``models`` with per-model ``parameters``, global
``parameters``, ``dtype``/``out_dtype``) is translated into an omnimerge recipe document. What mergekit means:

- ``models`` lists full models; a per-model ``weight`` becomes the expert's weight; the other per-model
  parameters (``density``, ``epsilon``, ``gamma``…) become the method's parameters and must then be the same for
  every model (omnimerge has one value per method; differing values are an error, not silently averaged).
- For the task-vector methods the ``base_model`` entry in ``models`` contributes nothing (mergekit skips it); for
  ``linear`` it takes part in the average with its weight; for ``slerp`` the base model is the t = 0 end.
- ``lambda`` is omnimerge's ``scale``. mergekit's ``dtype`` is its compute dtype; omnimerge always computes in
  float32 and writes ``out_dtype`` (or ``dtype`` when ``out_dtype`` is absent), as mergekit does.
Everything else (``slices``, per-layer gradients given as lists, ``tokenizer_source``, ``chat_template``,
``int8_mask``, methods omnimerge lacks) is a clear error naming the key.
"""

from __future__ import annotations

from typing import Any

from .errors import RecipeError

__all__ = ["translate_mergekit", "MERGEKIT_METHODS"]

# mergekit method -> (omnimerge method, mergekit parameter -> omnimerge parameter).
# Parameters whose names agree are listed too, so an unknown mergekit parameter is caught here.
MERGEKIT_METHODS: dict[str, tuple[str, dict[str, str]]] = {
    "linear": ("linear", {"normalize": "normalize"}),
    "task_arithmetic": ("task_arithmetic", {"lambda": "scale"}),
    "ties": ("ties", {"density": "density", "lambda": "scale", "normalize": "normalize"}),
    # mergekit's DARE `density` is the probability of KEEPING an entry: omnimerge's drop rate p = 1 − density.
    "dare_linear": ("dare_linear", {"density": "p", "lambda": "scale", "normalize": "normalize",
                                    "rescale": "rescale"}),
    "dare_ties": ("dare_ties", {"density": "p", "lambda": "scale", "normalize": "normalize",
                                "rescale": "rescale"}),
    "breadcrumbs": ("breadcrumbs", {"density": "density", "gamma": "gamma", "lambda": "scale",
                                    "normalize": "normalize"}),
    "della": ("della", {"density": "density", "epsilon": "epsilon", "lambda": "scale", "normalize": "normalize"}),
    "della_linear": ("della", {"density": "density", "epsilon": "epsilon", "lambda": "scale",
                               "normalize": "normalize"}),
    "slerp": ("slerp", {"t": "t"}),
    "model_stock": ("model_stock", {}),
}
_PER_MODEL_SHARED = {"density", "epsilon", "gamma"}
# Value conversions where mergekit's parameter means the complement of omnimerge's.
_CONVERT = {("dare_linear", "density"): lambda v: 1.0 - v, ("dare_ties", "density"): lambda v: 1.0 - v}
# Parameters fixed by the mergekit method's definition.
_FIXED = {
    # mergekit's dare_ties: DARE + sign consensus, no extra magnitude trim, not normalised by default.
    "dare_ties": {"density": 1.0, "normalize": False},
    "della_linear": {"consensus": False, "normalize": False},
}  # mergekit allows these per model; we need one value
_TOP = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "name"}
_REFUSED = {
    "slices": "layer slicing/stacking (frankenmerges) is not supported; merge whole models",
    "tokenizer_source": "tokenizer merging is not supported; omnimerge copies the base's tokenizer",
    "tokenizer": "tokenizer merging is not supported; omnimerge copies the base's tokenizer",
    "chat_template": "chat template selection is not supported; omnimerge copies the base's template",
    "modules": "per-module definitions are not supported",
}


def translate_mergekit(doc: dict[str, Any], *, path: str | None = None) -> dict[str, Any]:
    """An omnimerge recipe document with the meaning of mergekit config ``doc``; all problems raised at once."""
    problems: list[str] = []
    for key in doc:
        if key in _REFUSED:
            problems.append(f"mergekit key '{key}': {_REFUSED[key]}.")
        elif key not in _TOP:
            problems.append(f"mergekit key '{key}' is not supported by omnimerge.")
    mk_method = doc.get("merge_method")
    if mk_method not in MERGEKIT_METHODS:
        problems.append(f"mergekit merge_method '{mk_method}' is not supported; supported: "
                        f"{', '.join(sorted(MERGEKIT_METHODS))}.")
        raise RecipeError(problems, path=path)
    method, names = MERGEKIT_METHODS[mk_method]
    base = doc.get("base_model")
    if isinstance(base, dict):
        base = base.get("model")
    models = doc.get("models") or []
    if not base:
        if mk_method == "linear" and models:
            base = _model_source(models[0], problems)  # linear needs no base; the first model's layout serves
        else:
            problems.append(f"mergekit merge_method '{mk_method}' needs base_model.")

    params: dict[str, Any] = {}
    for key, value in (doc.get("parameters") or {}).items():
        _put_param(params, key, value, names, mk_method, "parameters", problems)

    experts: dict[str, Any] = {}
    shared: dict[str, set] = {}
    base_weight = None
    for i, entry in enumerate(models):
        source = _model_source(entry, problems)
        if source is None:
            continue
        mparams = entry.get("parameters") or {} if isinstance(entry, dict) else {}
        weight = mparams.get("weight", 1.0)
        if isinstance(weight, (list, dict)):
            problems.append(f"models[{i}] ({source}): per-layer weight gradients are not supported; give one number.")
            weight = 1.0
        for key, value in mparams.items():
            if key == "weight":
                continue
            if key in _PER_MODEL_SHARED and key in names:
                if isinstance(value, (list, dict)):
                    problems.append(f"models[{i}] ({source}): per-layer '{key}' gradients are not supported.")
                    continue
                shared.setdefault(key, set()).add(value)
            else:
                _put_param(params, key, value, names, mk_method, f"models[{i}].parameters", problems)
        if source == base:
            if mk_method == "linear":
                base_weight = weight
            continue  # task-vector methods skip the base model, as mergekit does
        name = _expert_name(source, experts)
        experts[name] = {"source": source, "weight": weight}
    for key, values in shared.items():
        if len(values) > 1:
            problems.append(f"models give different '{key}' values {sorted(values)}; omnimerge uses one value per "
                            f"method. Set it once under 'parameters'.")
        else:
            value = next(iter(values))
            params[names[key]] = _CONVERT.get((mk_method, key), lambda v: v)(value)
    for key, value in _FIXED.get(mk_method, {}).items():
        params.setdefault(key, value)
    if mk_method == "linear" and base_weight is not None:
        params["include_base"] = True
        params["base_weight"] = base_weight
    if mk_method == "slerp":
        if len(experts) != 1:
            problems.append("mergekit slerp needs base_model plus exactly one other model.")
        else:
            # slerp(t) from the base (t = 0) to the other model (t = 1): the base enters as a zero task vector.
            experts = {"base_model": {"source": base, "weight": 1.0}, **experts}

    if problems:
        raise RecipeError(problems, path=path)
    out: dict[str, Any] = {"base": base, "experts": experts, "method": method, "parameters": params}
    dtype = doc.get("out_dtype") or doc.get("dtype")
    if dtype:
        out["dtype"] = dtype
    if doc.get("name"):
        out["name"] = doc["name"]
    return out


def _model_source(entry: Any, problems: list[str]) -> str | None:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict):
        model = entry.get("model")
        if isinstance(model, dict):
            if model.get("lora"):
                problems.append(f"mergekit 'model+lora' sources are not supported; name the LoRA adapter as an "
                                f"omnimerge expert instead ({model}).")
                return None
            model = model.get("model") or model.get("path")
        if isinstance(model, str):
            if "+" in model:
                problems.append(f"mergekit 'base+lora' syntax '{model}' is not supported; write an omnimerge recipe "
                                f"with the adapter as an expert.")
                return None
            return model
    problems.append(f"mergekit models entry {entry!r} has no 'model'.")
    return None


def _put_param(params: dict[str, Any], key: str, value: Any, names: dict[str, str], method: str, where: str,
               problems: list[str]) -> None:
    if key == "int8_mask":
        return  # mergekit's memory-saving storage switch; results do not depend on it
    if key not in names:
        problems.append(f"{where}: mergekit parameter '{key}' is not supported for {method} "
                        f"(supported: {', '.join(sorted(names)) or 'none'}).")
        return
    if isinstance(value, (list, dict)):
        problems.append(f"{where}: per-layer '{key}' gradients are not supported; give one value.")
        return
    params[names[key]] = _CONVERT.get((method, key), lambda v: v)(value)


def _expert_name(source: str, taken: dict[str, Any]) -> str:
    stem = source.rstrip("/").split("/")[-1] or "model"
    name, i = stem, 2
    while name in taken:
        name, i = f"{stem}_{i}", i + 1
    return name
