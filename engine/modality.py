"""Merging across modalities toward an omni model (the paper's third contribution) as a recipe.

Vision-, video- and audio-language models that share one LLM are merged into one LLM while each keeps its own
encoder and connector (:mod:`.modality_recipe` for the YAML). ``run_modality_merge`` writes::

    OUT/
      models/<name>/   a complete checkpoint of each model's own architecture carrying the merged LLM
                       (its config, tokenizer/processor files, omnimerge_manifest.json); loads with transformers
      omni/            the bundle: merged LLM once + each model's own tensors and files + manifest.json
                       (:mod:`.modality_bundle`; :func:`assemble_from_bundle` rebuilds any model from it)

Shared LLM tensors (after each model's key map) are merged with the recipe's method against the shared LLM base;
tensors unique to one model are carried byte for byte; a shared name with different shapes in different models is
an error found while planning. The output appears only when complete: everything is written into
``OUT.omnimerge-staging`` and renamed into place at the end (a failed run removes its staging; there is no
resume).

Pipeline: recipe → :func:`plan_modality` (headers only) → merged LLM shards (:mod:`.modality_execute`) → own
tensors and files per model → bundle manifest → each model assembled from the staged bundle → commit.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .commit import TAGALONG_FILES, omnimerge_version
from .errors import OutputExistsError, ResumeError
from .modality_bundle import BUNDLE_FORMAT, BUNDLE_MANIFEST, assemble_from_bundle, assemble_into, write_index_json
from .modality_execute import ShardRecord, compute_llm_shards, write_own_shards
from .modality_plan import ModalityPlan, ModelInputs, OutputShard, plan_modality
from .modality_recipe import ModalityRecipe, load_modality_recipe, parse_modality_recipe

__all__ = ["ModalityReport", "run_modality_merge", "plan_modality", "load_modality_recipe", "parse_modality_recipe",
           "assemble_from_bundle", "MODEL_MANIFEST"]

log = logging.getLogger(__name__)

MODEL_MANIFEST = "omnimerge_manifest.json"  # the name evaluation reads roles and recipe ids from
_STAGING_MARK = "modality-staging.json"


@dataclass
class ModalityReport:
    """What a modality merge wrote."""

    out_dir: Path
    plan: ModalityPlan
    models: dict[str, Path]
    bundle: Path
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"Merged the shared LLM of {len(self.models)} model(s) into {self.out_dir}",
                 f"  method {self.plan.recipe.method}; lora merge {self.plan.recipe.lora_merge}",
                 f"  omni bundle: {self.bundle}"]
        lines += [f"  model '{name}': {path}" for name, path in self.models.items()]
        lines.append("  timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in self.timings.items()))
        return "\n".join(lines)


def run_modality_merge(recipe: ModalityRecipe, out_dir: str | Path, *, overwrite: bool = False, workers: int = 1,
                       device: str = "cpu", plan: ModalityPlan | None = None) -> ModalityReport:
    """Merge the shared LLM of ``recipe``'s models and write per-model checkpoints and the omni bundle.

    Args:
        recipe: a validated modality recipe.
        out_dir: the output directory (``models/`` and ``omni/`` go inside).
        overwrite: replace ``out_dir`` once the new output is complete.
        workers: threads computing merged LLM shards at once.
        device: where the merge math runs (``cpu``, ``cuda``).
        plan: a plan made earlier for this recipe (made here otherwise).

    Raises:
        OutputExistsError: ``out_dir`` exists and ``overwrite`` is false.
        TensorMismatchError / PlanError: the inputs do not fit (every problem listed).
        NonFiniteError / ShardJobError: a tensor could not be merged (nothing is left behind).
    """
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    if out_dir.exists() and not overwrite:
        raise OutputExistsError(f"Output directory '{out_dir}' already exists. Choose another -o path, or pass "
                                "--overwrite to replace it once the new merge is complete.")
    plan = plan or plan_modality(recipe)
    t_plan = time.perf_counter()
    staging = _fresh_staging(out_dir, plan)
    try:
        bundle = staging / "omni"
        llm_records = compute_llm_shards(plan, bundle / "llm", workers=workers, device=device)
        if len(plan.llm_shards) > 1:
            write_index_json(bundle / "llm", [_shard_json(s) for s in plan.llm_shards])
        t_llm = time.perf_counter()
        manifest = _bundle_manifest(plan, llm_records)
        for m in plan.models:
            own_records = write_own_shards(plan, m, bundle / "modalities" / m.name / "weights")
            if len(plan.own_shards[m.name]) > 1:
                write_index_json(bundle / "modalities" / m.name / "weights",
                                 [_shard_json(s) for s in plan.own_shards[m.name]])
            files = _write_model_files(plan, m, bundle / "modalities" / m.name / "files")
            manifest["models"][m.name].update(files=files, own_shards=_records_json(own_records))
        _write_json(bundle / BUNDLE_MANIFEST, manifest)
        models = {}
        for m in plan.models:
            written = assemble_into(bundle, manifest, m.name, staging / "models" / m.name)
            for shard, record in zip(manifest["models"][m.name]["assembly"]["shards"], written):
                shard.update(size=record["size"], sha256=record["sha256"])
            models[m.name] = out_dir / "models" / m.name
        t_models = time.perf_counter()
        manifest["timings"] = {"plan": round(t_plan - t0, 3), "merged_llm": round(t_llm - t_plan, 3),
                               "models": round(t_models - t_llm, 3)}
        _write_json(bundle / BUNDLE_MANIFEST, manifest)
        (staging / _STAGING_MARK).unlink()
        _commit(staging, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    timings = {"plan": t_plan - t0, "merged_llm": t_llm - t_plan, "models": t_models - t_llm,
               "total": time.perf_counter() - t0}
    log.info("modality merge written to %s in %.2f s", out_dir, timings["total"])
    return ModalityReport(out_dir, plan, models, out_dir / "omni", timings)


def _fresh_staging(out_dir: Path, plan: ModalityPlan) -> Path:
    staging = out_dir.parent / f"{out_dir.name}.omnimerge-staging"
    if staging.exists():
        if not (staging / _STAGING_MARK).is_file():
            raise ResumeError(f"'{staging}' exists but is not a modality merge staging directory. Remove it and rerun.")
        log.warning("removing the staging of an unfinished modality merge at %s (modality merges do not resume)",
                    staging)
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    _write_json(staging / _STAGING_MARK, {"plan_digest": plan.digest(), "created": time.time()})
    return staging


def _commit(staging: Path, out_dir: Path, overwrite: bool) -> None:
    old = None
    if out_dir.exists():
        if not overwrite:
            raise OutputExistsError(f"Output directory '{out_dir}' appeared during the merge; not replacing it.")
        old = out_dir.parent / f".{out_dir.name}.replaced-{os.getpid()}"
        os.replace(out_dir, old)
    os.replace(staging, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _shard_json(shard: OutputShard) -> dict[str, Any]:
    return {"filename": shard.filename, "tensors": [e.to_json() for e in shard.entries]}


def _records_json(records: list[ShardRecord]) -> dict[str, Any]:
    return {r.filename: {"size": r.size, "sha256": r.sha256} for r in records}


def _write_json(path: Path, doc: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _inputs_json(plan: ModalityPlan) -> list[dict[str, Any]]:
    out = [{"label": "llm_base", "source": plan.base.spec.source, "revision": plan.base.revision,
            "fingerprint": plan.base.fingerprint(), "key_map": plan.base_key_map.name}]
    for m in plan.models:
        out.append({"label": m.name, "source": m.source.spec.source, "revision": m.source.revision,
                    "fingerprint": m.source.fingerprint(), "key_map": m.key_map.name,
                    "architecture": m.architecture})
        if m.adapter:
            out.append({"label": f"{m.name} adapter", "source": m.adapter.spec.source,
                        "revision": m.adapter.revision, "fingerprint": m.adapter.fingerprint()})
    return out


def _tensor_counts(plan: ModalityPlan) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in plan.shared:
        key = f"{t.action}:{t.method}" if t.action != "keep" else "keep"
        counts[key] = counts.get(key, 0) + 1
    return counts


def _bundle_manifest(plan: ModalityPlan, llm_records: list[ShardRecord]) -> dict[str, Any]:
    recipe = plan.recipe
    models: dict[str, Any] = {}
    for m in plan.models:
        models[m.name] = {
            "architecture": m.architecture,
            "source": m.source.spec.source,
            "adapter": m.adapter.spec.source if m.adapter else None,
            "key_map": m.key_map.to_dict(),
            "weights_dir": f"modalities/{m.name}/weights",
            "files_dir": f"modalities/{m.name}/files",
            "shared_llm_tensors": len(m.llm),
            "own_tensors": len(m.own),
            "llm_names": dict(sorted(m.llm.items())),  # shared-namespace name -> this model's name
            "assembly": {"shards": [_shard_json(s) for s in plan.model_shards[m.name]],
                         "index": len(plan.model_shards[m.name]) > 1},
        }
    return {
        "format": BUNDLE_FORMAT,
        "omnimerge_version": omnimerge_version(),
        "name": recipe.name,
        "recipe": recipe.canonical(),
        "recipe_digest": recipe.digest(),
        "plan_digest": plan.digest(),
        "inputs": _inputs_json(plan),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "llm": {
            "dir": "llm",
            "namespace": "causal LM (model.embed_tokens, model.layers.N, model.norm, lm_head)",
            "tensors": _tensor_counts(plan),
            "shards": _records_json(llm_records),
            "unused_base_tensors": plan.unused_base,
        },
        "models": models,
        "how_to_assemble": "omnimerge.engine.modality.assemble_from_bundle(omni_dir, MODEL, OUT): for each file in "
                           "models.MODEL.assembly.shards write its tensors in order; origin 'llm' reads KEY from llm/, "
                           "origin 'own' from modalities/MODEL/weights/; then copy modalities/MODEL/files/*.",
    }


def _write_model_files(plan: ModalityPlan, m: ModelInputs, files_dir: Path) -> list[str]:
    """The model's config and tagalong files (verbatim from its source) and its omnimerge manifest."""
    files_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for fname in ("config.json", *TAGALONG_FILES):
        src = m.source.path / fname
        if src.is_file():
            shutil.copyfile(src, files_dir / fname)
            copied.append(fname)
    if "config.json" not in copied:
        log.warning("model '%s' (%s) has no config.json; its output will not load with from_pretrained",
                    m.name, m.source.spec.source)
    recipe = plan.recipe
    manifest = {
        "omnimerge_version": omnimerge_version(),
        "kind": "modality",
        "role": "merged",
        "model": m.name,
        "architecture": m.architecture,
        "recipe_digest": recipe.digest(),
        "recipe_id": f"{recipe.digest()[:16]}/{m.name}",
        "recipe": recipe.canonical(),
        "inputs": _inputs_json(plan),
        "shared_llm": {"tensors": len(m.llm), "method": recipe.method, "parameters": recipe.params,
                       "lora_merge": recipe.lora_merge if m.adapter else None},
        "own_tensors": len(m.own),
        "tagalong_files": [f for f in copied if f != "config.json"],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _write_json(files_dir / MODEL_MANIFEST, manifest)
    return [*copied, MODEL_MANIFEST]
