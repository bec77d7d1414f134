"""The omni bundle: the merged LLM once, each modality's encoder and connector, and how to assemble each model.

Layout::

    omni/
      manifest.json                      format, recipe, inputs, and per model: architecture, files, assembly
      llm/model-0000i-of-0000n.safetensors   the merged LLM under shared-namespace names (+ index when sharded)
      modalities/<model>/weights/*.safetensors   that model's own tensors (encoders, connectors) under its names
      modalities/<model>/files/*         config.json, tokenizer/processor files, omnimerge_manifest.json

``manifest.json`` ``models.<name>.assembly.shards`` lists, for every file of the model's checkpoint, its tensors
in write order as ``[name, origin, key, dtype, shape]``: origin ``llm`` reads ``key`` from ``llm/``, origin
``own`` from ``modalities/<name>/weights/``. :func:`assemble_from_bundle` writes exactly those files (and copies
the model's files), so the result is byte-for-byte the checkpoint ``omnimerge modality`` wrote to
``models/<name>/``; each file's sha256 is checked against the manifest.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from .errors import OutputExistsError, SourceError, SourceNotFoundError
from .modality_plan import OutputEntry
from .safetensors_io import DTYPES, ShardWriter, TensorIndex, TensorReader

__all__ = ["BUNDLE_FORMAT", "BUNDLE_MANIFEST", "assemble_from_bundle", "read_bundle_manifest", "write_index_json",
           "assemble_into"]

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "omnimerge-omni-bundle/1"
BUNDLE_MANIFEST = "manifest.json"
INDEX_FILE = "model.safetensors.index.json"
SHARD_METADATA = {"format": "pt"}


def read_bundle_manifest(bundle_dir: str | Path) -> dict[str, Any]:
    """The bundle's ``manifest.json``, checked for its format.

    Raises:
        SourceNotFoundError: no manifest there.
        SourceError: not an omni bundle manifest, or one of an unknown format version.
    """
    path = Path(bundle_dir) / BUNDLE_MANIFEST
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise SourceNotFoundError(f"'{bundle_dir}' has no {BUNDLE_MANIFEST}; give the omni/ folder an `omnimerge "
                                  "modality` run wrote.") from None
    except json.JSONDecodeError as exc:
        raise SourceError(f"'{path}' is not valid JSON ({exc}); the bundle is damaged.") from None
    if not isinstance(doc, dict) or doc.get("format") != BUNDLE_FORMAT:
        raise SourceError(f"'{path}' is not an omni bundle manifest of format {BUNDLE_FORMAT} (found "
                          f"{doc.get('format') if isinstance(doc, dict) else type(doc).__name__!r}).")
    return doc


def write_index_json(out_dir: Path, shards: list[dict[str, Any]]) -> None:
    """``model.safetensors.index.json`` for a sharded checkpoint (deterministic: same shards, same bytes)."""
    weight_map: dict[str, str] = {}
    total = 0
    for shard in shards:
        for raw in shard["tensors"]:
            e = OutputEntry.from_json(raw)
            weight_map[e.name] = shard["filename"]
            n = 1
            for s in e.shape:
                n *= s
            total += n * DTYPES[e.dtype].itemsize
    doc = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    tmp = out_dir / f".{INDEX_FILE}.tmp"
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out_dir / INDEX_FILE)


def assemble_into(bundle_dir: Path, manifest: dict[str, Any], model_name: str, dest: Path, *,
                  verify: bool = True) -> list[dict[str, Any]]:
    """Write ``model_name``'s checkpoint from the bundle into ``dest`` (created; must not hold its files yet).

    Returns:
        ``[{filename, size, sha256}]`` of the weight files written.

    Raises:
        SourceError: unknown model, a tensor the bundle lacks, or a file whose sha256 differs from the manifest.
    """
    models = manifest.get("models") or {}
    if model_name not in models:
        raise SourceError(f"Omni bundle '{bundle_dir}' has no model '{model_name}'; it holds "
                          f"{', '.join(sorted(models)) or 'none'}.")
    entry = models[model_name]
    dest.mkdir(parents=True, exist_ok=True)
    llm = TensorReader(TensorIndex.from_dir(bundle_dir / manifest["llm"]["dir"]))
    own_dir = bundle_dir / entry["weights_dir"]
    own = TensorReader(TensorIndex.from_dir(own_dir)) if own_dir.is_dir() else None
    written = []
    try:
        for shard in entry["assembly"]["shards"]:
            entries = [OutputEntry.from_json(raw) for raw in shard["tensors"]]
            tmp = dest / f".{shard['filename']}.{uuid.uuid4().hex[:8]}.tmp"
            writer = ShardWriter(tmp, [(e.name, e.dtype, e.shape) for e in entries], metadata=SHARD_METADATA)
            try:
                for e in entries:
                    reader = llm if e.origin == "llm" else own
                    if reader is None or e.key not in reader.index:
                        raise SourceError(f"Omni bundle '{bundle_dir}' lacks tensor '{e.key}' ({e.origin}) that model "
                                          f"'{model_name}' needs as '{e.name}'; the bundle is incomplete.")
                    writer.write(e.name, reader.read(e.key))
                size, sha = writer.close()
            except BaseException:
                writer.abort()
                raise
            expected = shard.get("sha256")
            if verify and expected and expected != sha:
                tmp.unlink(missing_ok=True)
                raise SourceError(f"Omni bundle '{bundle_dir}': model '{model_name}' file '{shard['filename']}' "
                                  f"assembles to sha256 {sha[:16]}… but the manifest says {expected[:16]}…; the bundle "
                                  "was changed or damaged. Rerun the modality merge.")
            os.replace(tmp, dest / shard["filename"])
            written.append({"filename": shard["filename"], "size": size, "sha256": sha})
    finally:
        llm.close()
        if own is not None:
            own.close()
    if len(entry["assembly"]["shards"]) > 1:
        write_index_json(dest, entry["assembly"]["shards"])
    files_dir = bundle_dir / entry["files_dir"]
    for fname in entry.get("files", []):
        shutil.copyfile(files_dir / fname, dest / fname)
    return written


def assemble_from_bundle(bundle_dir: str | Path, model_name: str, out_dir: str | Path, *,
                         overwrite: bool = False) -> Path:
    """Rebuild one model's complete checkpoint from an omni bundle.

    The checkpoint (weights, index, config, tokenizer/processor files, omnimerge manifest) is byte-for-byte the
    one ``omnimerge modality`` wrote to ``models/<model_name>/``. It appears only when complete (written beside
    ``out_dir``, then renamed).

    Args:
        bundle_dir: the ``omni/`` folder of a modality merge output.
        model_name: a model of the recipe (``manifest.json`` ``models``).
        out_dir: where the checkpoint goes.
        overwrite: replace ``out_dir`` if it exists.

    Returns:
        ``out_dir``.

    Raises:
        OutputExistsError: ``out_dir`` exists and ``overwrite`` is false.
        SourceError / SourceNotFoundError: not a bundle, unknown model, damaged bundle.
    """
    bundle_dir, out_dir = Path(bundle_dir), Path(out_dir)
    manifest = read_bundle_manifest(bundle_dir)
    if out_dir.exists() and not overwrite:
        raise OutputExistsError(f"Output directory '{out_dir}' already exists. Choose another path, or pass "
                                "overwrite=True (--overwrite) to replace it.")
    staging = out_dir.parent / f".{out_dir.name}.assembling-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        assemble_into(bundle_dir, manifest, model_name, staging)
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.replaced-{os.getpid()}"
            os.replace(out_dir, old)
        os.replace(staging, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("assembled model '%s' from %s into %s", model_name, bundle_dir, out_dir)
    return out_dir

