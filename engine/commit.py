"""Staging and commit: output appears only when complete.

Shards are written into ``<out>.omnimerge-staging/`` (beside the output, same filesystem) with one record per
finished shard (size, sha256 and the digest of the plan it was computed for). ``commit_output`` verifies
coverage and that every shard's record is this plan's and matches what the run reported, writes the index,
config, every tagalong file the model needs, a model card and a manifest, then renames the staging directory
into place. A rerun of the same recipe on the same inputs resumes from verified shards of the same plan; a
changed recipe or input is refused, and a record of another plan (a worker orphaned by a killed driver that
finished after the staging was recreated) is never accepted (see :mod:`omnimerge.engine.staging_claim`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import OutputExistsError, PlanError, ResumeError
from .execute import ShardResult, record_path
from .plan import Plan
from .staging_claim import STAGING_STATE
from .version import omnimerge_version

__all__ = ["Staging", "prepare_staging", "commit_output", "TAGALONG_FILES", "staging_dir_for", "omnimerge_version"]

log = logging.getLogger(__name__)

# Files a model needs beside its weights; copied from the base when present.
TAGALONG_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "vocab.txt",
    "chat_template.json", "chat_template.jinja", "preprocessor_config.json", "processor_config.json",
    "video_preprocessor_config.json", "image_processor_config.json",
)
MANIFEST = "omnimerge_manifest.json"


def staging_dir_for(out_dir: Path) -> Path:
    return out_dir.parent / f"{out_dir.name}.omnimerge-staging"


@dataclass
class Staging:
    path: Path
    plan_digest: str
    done: dict[str, ShardResult]  # verified shards from an earlier run, by filename


def prepare_staging(plan: Plan, out_dir: Path, *, overwrite: bool = False) -> Staging:
    """Create the staging directory, or reopen it for resume after checking it belongs to this plan."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise OutputExistsError(
            f"Output directory '{out_dir}' already exists. Choose another -o path, or pass --overwrite to replace "
            f"it once the new merge is complete.")
    staging = staging_dir_for(out_dir)
    digest = plan.digest()
    state_file = staging / STAGING_STATE
    done: dict[str, ShardResult] = {}
    if state_file.is_file():
        state = json.loads(state_file.read_text())
        if state.get("plan_digest") != digest:
            raise ResumeError(_mismatch_message(state, plan, staging))
        done = _verified_records(staging, plan, digest)
        log.info("resuming in %s: %d of %d shards already verified", staging, len(done), len(plan.jobs))
    else:
        if staging.exists():
            raise ResumeError(f"'{staging}' exists but holds no omnimerge staging state. Remove it and rerun.")
        staging.mkdir(parents=True)
        state = {
            "plan_digest": digest,
            "recipe_digest": plan.recipe.digest(),
            "inputs": {s.label: s.fingerprint() for s in [plan.base, *plan.experts]},
            "created": time.time(),
            "version": omnimerge_version(),
        }
        tmp = state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, state_file)
    return Staging(staging, digest, done)


def _mismatch_message(state: dict[str, Any], plan: Plan, staging: Path) -> str:
    changes = []
    if state.get("recipe_digest") != plan.recipe.digest():
        changes.append("the recipe changed")
    old_inputs = state.get("inputs", {})
    for s in [plan.base, *plan.experts]:
        if old_inputs.get(s.label) != s.fingerprint():
            changes.append(f"input '{s.label}' ({s.spec.source}) changed" if s.label in old_inputs
                           else f"input '{s.label}' is new")
    reason = "; ".join(changes) or "the shard layout changed"
    return (f"Cannot resume into '{staging}': {reason} since that staging was written. Its shards would mix two "
            f"different merges. Delete '{staging}' to start over, or restore the original recipe and inputs.")


def _read_record(staging: Path, filename: str) -> ShardResult | None:
    try:
        return ShardResult(**json.loads(record_path(staging, filename).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _verified_records(staging: Path, plan: Plan, digest: str) -> dict[str, ShardResult]:
    done: dict[str, ShardResult] = {}
    for job in plan.jobs:
        shard = staging / job.filename
        result = _read_record(staging, job.filename) if shard.is_file() else None
        if result is None:
            continue
        if result.plan_digest != digest:
            log.warning("shard %s in staging was recorded for plan %s, not this one (%s); it will be redone",
                        job.filename, result.plan_digest[:12] or "(none)", digest[:12])
            continue
        if shard.stat().st_size != result.size or _sha256(shard) != result.sha256:
            log.warning("shard %s in staging does not match its record; it will be redone", job.filename)
            continue
        result.skipped = True
        done[job.filename] = result
    return done


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def commit_output(plan: Plan, staging: Staging, results: dict[str, ShardResult], out_dir: Path, *,
                  overwrite: bool = False, timings: dict[str, float] | None = None,
                  extra_manifest: dict[str, Any] | None = None) -> Path:
    """Write index, config, tagalongs, model card and manifest into staging, then rename it to ``out_dir``."""
    out_dir = Path(out_dir)
    sdir = staging.path
    # Coverage: every planned tensor was written in exactly the shard the plan gave it.
    missing_jobs = [j.filename for j in plan.jobs if j.filename not in results]
    if missing_jobs:
        raise PlanError(f"Cannot commit: shards {missing_jobs} were not produced. Rerun to resume.")
    weight_map: dict[str, str] = {}
    for job in plan.jobs:
        written = results[job.filename].tensors
        expected = [t.name for t in job.tensors]
        if written != expected:
            raise PlanError(f"Shard '{job.filename}' holds {len(written)} tensors but the plan gave it "
                            f"{len(expected)}; refusing to commit an incomplete model.")
        for name in written:
            weight_map[name] = job.filename
    _check_records(plan, staging, results)
    planned = {t.name for t in plan.tensors} | {n for n, _ in plan.dropped}
    unaccounted = sorted(set(plan.base.index.names()) - planned)
    if unaccounted:
        raise PlanError(f"Tensors of the base are neither written nor dropped: {unaccounted[:8]}")

    if len(plan.jobs) > 1:
        index = {"metadata": {"total_size": sum(results[j.filename].size for j in plan.jobs)},
                 "weight_map": dict(sorted(weight_map.items()))}
        _write_json(sdir / "model.safetensors.index.json", index)
    _write_config(plan, sdir)
    copied = []
    for fname in TAGALONG_FILES:
        src = plan.base.path / fname
        if src.is_file():
            shutil.copyfile(src, sdir / fname)
            copied.append(fname)
    manifest = _manifest(plan, results, timings or {}, copied, extra_manifest or {})
    _write_json(sdir / MANIFEST, manifest)
    (sdir / "README.md").write_text(_model_card(plan, manifest))
    # Staging bookkeeping goes; then the directory becomes the output in one rename.
    shutil.rmtree(sdir / ".records", ignore_errors=True)
    (sdir / STAGING_STATE).unlink(missing_ok=True)
    for leftover in sdir.glob(".*.tmp"):
        leftover.unlink()
    old = None
    if out_dir.exists():
        if not overwrite:
            raise OutputExistsError(f"Output directory '{out_dir}' appeared during the merge; not replacing it. "
                                    f"The finished merge stays in '{sdir}'.")
        old = out_dir.parent / f".{out_dir.name}.replaced-{os.getpid()}"
        os.replace(out_dir, old)
    os.replace(sdir, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out_dir


def _check_records(plan: Plan, staging: Staging, results: dict[str, ShardResult]) -> None:
    """Every shard file in staging must have a record of this plan that matches what the run reported.

    Catches a shard (and its record) that a stale writer of another plan put there after this run wrote its
    own; a full re-hash is left to resume, which does it before trusting a shard.
    """
    bad = []
    for job in plan.jobs:
        mine = results[job.filename]
        shard = staging.path / job.filename
        rec = _read_record(staging.path, job.filename)
        if rec is None or not shard.is_file():
            bad.append(f"'{job.filename}': no shard file or no record")
        elif rec.plan_digest != staging.plan_digest:
            bad.append(f"'{job.filename}': recorded for plan {rec.plan_digest[:12] or '(none)'}…")
        elif (rec.sha256, rec.size) != (mine.sha256, mine.size) or shard.stat().st_size != mine.size:
            bad.append(f"'{job.filename}': staging holds other bytes than this run computed")
    if bad:
        raise ResumeError(
            f"Cannot commit '{staging.path}' (plan {staging.plan_digest[:12]}…): {'; '.join(bad)}. Another run "
            "(e.g. a worker outliving a killed driver) wrote into this staging. Nothing was committed; rerun the "
            "same command: it verifies every shard against its record and redoes the others.")


def _write_json(path: Path, doc: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


_DTYPE_CONFIG = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _write_config(plan: Plan, sdir: Path) -> None:
    config = plan.base.config()
    if config is None:
        log.warning("base %s has no config.json; the output will have none", plan.base.spec.source)
        return
    if plan.recipe.dtype:
        name = _DTYPE_CONFIG[plan.recipe.dtype]
        for key in ("torch_dtype", "dtype"):
            if key in config:
                config[key] = name
        for sub in ("text_config", "vision_config", "llm_config"):
            if isinstance(config.get(sub), dict):
                for key in ("torch_dtype", "dtype"):
                    if key in config[sub]:
                        config[sub][key] = name
        if "torch_dtype" not in config and "dtype" not in config:
            config["torch_dtype"] = name
    _write_json(sdir / "config.json", config)


def _manifest(plan: Plan, results: dict[str, ShardResult], timings: dict[str, float], copied: list[str],
              extra: dict[str, Any]) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for t in plan.tensors:
        key = f"merge:{t.method}" if t.action == "merge" else t.action
        counts[key] = counts.get(key, 0) + 1
    return {
        "omnimerge_version": omnimerge_version(),
        "recipe": plan.recipe.canonical(),
        "recipe_digest": plan.recipe.digest(),
        "plan_digest": plan.digest(),
        "inputs": [
            {"label": s.label, "source": s.spec.source, "revision": s.revision, "kind": s.kind,
             "fingerprint": s.fingerprint()} for s in [plan.base, *plan.experts]
        ],
        "tensors": counts,
        "dropped": [n for n, _ in plan.dropped],
        "shards": {name: {"size": r.size, "sha256": r.sha256, "seconds": round(r.seconds, 3),
                          "worker": r.worker, "resumed": r.skipped} for name, r in sorted(results.items())},
        "tagalong_files": copied,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    }


def _model_card(plan: Plan, manifest: dict[str, Any]) -> str:
    r = plan.recipe
    lines = [
        "---",
        "tags: [merge, omnimerge]",
        f"base_model: {plan.base.spec.source}",
        "---",
        "",
        f"# {r.name or 'Merged model'}",
        "",
        f"Merged with omnimerge {manifest['omnimerge_version']} using **{r.method}** "
        f"({', '.join(f'{k}={v}' for k, v in sorted(r.params.items())) or 'default parameters'}).",
        "",
        "## Inputs",
        "",
        "| role | source | revision / fingerprint | weight |",
        "|---|---|---|---|",
        f"| base | {plan.base.spec.source} | {plan.base.revision or plan.base.fingerprint()[:16]} | |",
    ]
    for spec, src in zip(r.experts, plan.experts):
        lines.append(f"| expert `{spec.name}` ({src.kind}) | {src.spec.source} | "
                     f"{src.revision or src.fingerprint()[:16]} | {spec.weight} |")
    lines += ["", "## What happened to each tensor", ""]
    lines += [f"- {k}: {v} tensors" for k, v in sorted(manifest["tensors"].items())]
    if manifest["dropped"]:
        lines.append(f"- dropped on purpose: {len(manifest['dropped'])} tensors")
    lines += ["", "## Recipe", "", "```json", json.dumps(manifest["recipe"], indent=2, default=str), "```", ""]
    if manifest["timings"]:
        lines += ["## Timings (s)", ""] + [f"- {k}: {v}" for k, v in manifest["timings"].items()] + [""]
    return "\n".join(lines)
