"""Building the zoo on disk: data, base, experts (full and LoRA), scores, and the manifest ``zoo.json``.

Layout of a zoo directory::

    zoo.json                      manifest: settings, per-file sha256, timings, teacher-forced scores
    base/                         the pre-trained tiny Qwen2-VL (HF checkpoint with tokenizer and processor)
    experts/<task>/               full fine-tunes of the LLM's linear weights (HF checkpoints)
    lora/<task>/                  PEFT LoRA adapters (adapter_config.json, adapter_model.safetensors)
    data/<task>/test.parquet      held-out evaluation sets (question_id, image{bytes,path}, question, answers,
                                  + choices for geometry, + bbox/width/height for grounding)

Every part is written to a staging directory and renamed when complete, then recorded in the manifest
with its files' sha256; a rerun skips parts whose files still match, so an interrupted build resumes.
Everything is seeded and runs with a fixed thread count, so the same seed gives the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from omnimerge.benchmarks.zoo.modeling import ZooModelSize, build_tiny_base
from omnimerge.benchmarks.zoo.tasks import CAPABILITIES, IMAGE_SIZE, TASKS, make_sample, png_bytes
from omnimerge.benchmarks.zoo.train import Schedule
from omnimerge.engine.errors import OutputExistsError

__all__ = ["ZooSize", "SIZES", "FAMILIES", "DEFAULT_ZOO_DIR", "build_zoo", "default_zoo_dir", "THREADS"]

logger = logging.getLogger(__name__)

FAMILIES = ("full", "lora", "both")
THREADS = 2  # fixed, so that float reductions (and so the checkpoints' bytes) do not depend on the machine
DEFAULT_ZOO_DIR = Path("~/.cache/omnimerge/zoo")
MANIFEST = "zoo.json"
FORMAT_VERSION = 1
# Files of the base that every full expert carries unchanged.
_SHARED_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json")


@dataclass(frozen=True)
class ZooSize:
    """How much of everything a zoo gets."""

    name: str
    pretrain: Schedule
    expert: Schedule
    lora: Schedule
    qa_fraction: float
    test_items: int
    object_fraction: float = 0.0  # single-object warm-up captions in pre-training (tasks.make_object_caption_sample)
    merge_scale: float = 0.5  # the task-arithmetic scale the zoo's own property check merges with
    model: ZooModelSize = ZooModelSize()


SIZES: dict[str, ZooSize] = {
    # Measured on 2 cores (teacher-forced, 300 items per task): every expert beats the base on its own task by
    # 3.4-8.3 standard errors; task arithmetic at 0.5 beats the best expert on the average by 2.4 (DARE 2.2).
    "full": ZooSize(
        name="full",
        pretrain=Schedule(steps=1500, lr=2e-3, batch_size=32, warmup=100, final_fraction=0.1),
        expert=Schedule(steps=150, lr=2e-4, batch_size=32),
        lora=Schedule(steps=150, lr=1e-3, batch_size=32),
        qa_fraction=0.15,
        object_fraction=0.10,
        test_items=300,
        merge_scale=0.5,
    ),
    "test": ZooSize(
        name="test",
        pretrain=Schedule(steps=600, lr=2e-3, batch_size=32, warmup=50, final_fraction=0.1),
        expert=Schedule(steps=100, lr=2e-4, batch_size=32),
        lora=Schedule(steps=40, lr=1e-3, batch_size=32),
        qa_fraction=0.15,
        object_fraction=0.10,
        test_items=200,
        merge_scale=0.5,
    ),
}


def default_zoo_dir() -> Path:
    """``$OMNIMERGE_ZOO`` if set, else ``~/.cache/omnimerge/zoo``."""
    return Path(os.environ.get("OMNIMERGE_ZOO", DEFAULT_ZOO_DIR)).expanduser()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _hashes(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): _sha256(p) for p in sorted(directory.rglob("*")) if p.is_file()}


class _Zoo:
    """The zoo directory and its manifest, written after every finished part."""

    def __init__(self, root: Path, settings: dict[str, Any]) -> None:
        self.root = root
        self.path = root / MANIFEST
        manifest = json.loads(self.path.read_text()) if self.path.is_file() else None
        if manifest is not None and manifest.get("settings") != settings:
            old = manifest.get("settings") or {}
            if (old.get("size"), old.get("seed")) != (settings["size"], settings["seed"]):
                what = f"size '{old.get('size')}', seed {old.get('seed')}"
            else:
                what = "a different recipe (schedules or model sizes changed since)"
            raise OutputExistsError(
                f"Zoo directory '{root}' holds a zoo built with {what}; this build is size '{settings['size']}', "
                f"seed {settings['seed']}. Give another output directory (-o DIR), or delete that directory to "
                "rebuild it."
            )
        self.manifest = manifest or {"format": FORMAT_VERSION, "settings": settings, "parts": {}, "scores": {}}

    def save(self) -> None:
        staging = self.path.with_suffix(".json.partial")
        staging.write_text(json.dumps(self.manifest, indent=2, sort_keys=True) + "\n")
        staging.replace(self.path)

    def verified(self, part: str, depends_on: str | None = None) -> bool:
        """True when ``part`` is recorded, its files hash as recorded, and it was built on ``depends_on``."""
        entry = self.manifest["parts"].get(part)
        directory = self.root / part
        if entry is None or not directory.is_dir():
            return False
        if depends_on is not None and entry.get("built_on") != self.fingerprint(depends_on):
            return False
        return _hashes(directory) == entry["files"]

    def fingerprint(self, part: str) -> str | None:
        entry = self.manifest["parts"].get(part)
        if entry is None:
            return None
        return hashlib.sha256(json.dumps(entry["files"], sort_keys=True).encode()).hexdigest()

    def commit(self, part: str, staging: Path, **record: Any) -> None:
        """Moves a finished staging directory into place and records it."""
        target = self.root / part
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging.replace(target)
        self.manifest["parts"][part] = {"files": _hashes(target), **record}
        self.manifest["scores"].pop(part, None)
        self.save()

    def staging(self, part: str) -> Path:
        path = self.root / ".staging" / part.replace("/", "--")
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path


def _write_test_set(directory: Path, task: str, count: int, seed: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows: dict[str, list[Any]] = {"question_id": [], "image": [], "question": [], "answers": []}
    extra: dict[str, list[Any]] = {"choices": [], "bbox": [], "width": [], "height": []}
    for index in range(count):
        sample = make_sample(task, "test", index, seed)
        rows["question_id"].append(f"zoo-{task}-{index:05d}")
        rows["image"].append({"bytes": png_bytes(sample.image), "path": f"{task}-{index:05d}.png"})
        rows["question"].append(sample.question)
        rows["answers"].append(sample.answers)
        extra["choices"].append(sample.choices)
        extra["bbox"].append(sample.bbox)
        extra["width"].append(IMAGE_SIZE)
        extra["height"].append(IMAGE_SIZE)
    fields = [
        pa.field("question_id", pa.string()),
        pa.field("image", pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])),
        pa.field("question", pa.string()),
        pa.field("answers", pa.list_(pa.string())),
    ]
    if task == "geometry":
        fields.append(pa.field("choices", pa.list_(pa.string())))
        rows["choices"] = extra["choices"]
    if task == "grounding":
        fields += [pa.field("bbox", pa.list_(pa.float64())), pa.field("width", pa.int64()), pa.field("height", pa.int64())]
        rows.update(bbox=extra["bbox"], width=extra["width"], height=extra["height"])
    table = pa.table(rows, schema=pa.schema(fields))
    pq.write_table(table, directory / "test.parquet")


def _load(path: Path) -> tuple[Any, Any]:
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration.from_pretrained(path), AutoTokenizer.from_pretrained(path)


class _Builder:
    def __init__(self, zoo: _Zoo, size: ZooSize, seed: int, say: Callable[[str], None]) -> None:
        self.zoo, self.size, self.seed, self.say = zoo, size, seed, say

    def _loss_reporter(self, part: str) -> Callable[[int, int, float], None]:
        return lambda step, steps, loss: self.say(f"{part}: step {step}/{steps}, loss {loss:.3f}")

    def data(self, task: str) -> None:
        part = f"data/{task}"
        if self.zoo.verified(part):
            return
        started = time.perf_counter()
        staging = self.zoo.staging(part)
        _write_test_set(staging, task, self.size.test_items, self.seed)
        self.zoo.commit(part, staging, items=self.size.test_items, seconds=round(time.perf_counter() - started, 2))
        self.say(f"{part}: {self.size.test_items} held-out items")

    def base(self) -> None:
        from omnimerge.benchmarks.zoo.train import pretrain_batches, train_steps

        if self.zoo.verified("base"):
            return
        started = time.perf_counter()
        staging = self.zoo.staging("base")
        build_tiny_base(staging, self.seed, size=self.size.model)
        model, tokenizer = _load(staging)
        schedule = self.size.pretrain
        batches = pretrain_batches(self.seed, schedule.batch_size, self.size.qa_fraction, self.size.object_fraction)
        losses = train_steps(model, tokenizer, batches, schedule, seed=self.seed, progress=self._loss_reporter("base"))
        model.save_pretrained(staging)
        self.zoo.commit("base", staging, steps=schedule.steps, final_loss=_tail(losses),
                        seconds=round(time.perf_counter() - started, 1))  # fmt: skip

    def expert(self, task: str) -> None:
        from omnimerge.benchmarks.zoo.train import task_batches, train_only_merged_weights, train_steps

        part = f"experts/{task}"
        if self.zoo.verified(part, depends_on="base"):
            return
        started = time.perf_counter()
        staging = self.zoo.staging(part)
        model, tokenizer = _load(self.zoo.root / "base")
        train_only_merged_weights(model)
        schedule = self.size.expert
        batches = task_batches(task, self.seed, schedule.batch_size)
        losses = train_steps(model, tokenizer, batches, schedule, seed=self.seed, progress=self._loss_reporter(part))
        model.save_pretrained(staging)
        for name in _SHARED_FILES:
            shutil.copy2(self.zoo.root / "base" / name, staging / name)
        self.zoo.commit(part, staging, built_on=self.zoo.fingerprint("base"), steps=schedule.steps,
                        final_loss=_tail(losses), seconds=round(time.perf_counter() - started, 1))  # fmt: skip

    def lora(self, task: str) -> None:
        from omnimerge.benchmarks.zoo.train import lora_model, task_batches, train_steps

        part = f"lora/{task}"
        if self.zoo.verified(part, depends_on="base"):
            return
        started = time.perf_counter()
        staging = self.zoo.staging(part)
        base, tokenizer = _load(self.zoo.root / "base")
        model = lora_model(base, seed=self.seed)
        schedule = self.size.lora
        batches = task_batches(task, self.seed, schedule.batch_size)
        losses = train_steps(model, tokenizer, batches, schedule, seed=self.seed, progress=self._loss_reporter(part))
        model.save_pretrained(staging)
        _point_adapter_at_base(staging)
        self.zoo.commit(part, staging, built_on=self.zoo.fingerprint("base"), steps=schedule.steps,
                        final_loss=_tail(losses), seconds=round(time.perf_counter() - started, 1))  # fmt: skip

    def scores(self, parts: list[str]) -> None:
        from omnimerge.benchmarks.zoo.score import read_test_items, score_model

        missing = [p for p in parts if p not in self.zoo.manifest["scores"]]
        if not missing:
            return
        items = {task: read_test_items(self.zoo.root, task) for task in TASKS}
        for part in missing:
            model, tokenizer = load_zoo_checkpoint(self.zoo.root, part)
            scores = score_model(model, tokenizer, items)
            self.zoo.manifest["scores"][part] = scores.as_dict()
            self.zoo.save()
            self.say(f"{part}: average {scores.average():.3f} " + " ".join(f"{t} {scores.mean(t):.3f}" for t in TASKS))


def _tail(losses: list[float], n: int = 25) -> float:
    return round(sum(losses[-n:]) / len(losses[-n:]), 4)


def _point_adapter_at_base(adapter_dir: Path) -> None:
    # peft records the path the base was loaded from; the zoo's adapters name their base relative to
    # the zoo (`../../base` from the adapter directory), so a moved zoo stays consistent.
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "../../base"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_zoo_checkpoint(zoo_dir: str | Path, part: str) -> tuple[Any, Any]:
    """Loads ``base``, ``experts/<task>`` or ``lora/<task>`` (LoRA merged into the base) with its tokenizer."""
    root = Path(zoo_dir)
    if not part.startswith("lora/"):
        return _load(root / part)
    from peft import PeftModel

    base, tokenizer = _load(root / "base")
    return PeftModel.from_pretrained(base, root / part).merge_and_unload(), tokenizer


def build_zoo(
    out_dir: str | Path | None = None,
    *,
    family: str = "both",
    size: str = "full",
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Builds (or completes) a zoo: test sets, base, experts of ``family``, their scores and ``zoo.json``.

    Args:
        out_dir: the zoo directory (default :func:`default_zoo_dir`).
        family: ``"full"`` (full fine-tunes), ``"lora"`` (LoRA adapters) or ``"both"``.
        size: ``"full"`` (the demo's zoo, a few minutes on 2 cores) or ``"test"`` (the test suite's).
        seed: the zoo seed; the same seed and size give byte-identical checkpoints.
        progress: called with one line of text per finished stage and every 25 training steps.

    Returns:
        The zoo directory.

    Raises:
        ValueError: unknown ``family`` or ``size``.
        OutputExistsError: ``out_dir`` holds a zoo built with another size or seed.
    """
    import torch

    if family not in FAMILIES:
        raise ValueError(f"Unknown zoo family '{family}'; choose one of {', '.join(FAMILIES)}.")
    if size not in SIZES:
        raise ValueError(f"Unknown zoo size '{size}'; choose one of {', '.join(SIZES)}.")
    zoo_size = SIZES[size]
    root = Path(out_dir).expanduser() if out_dir is not None else default_zoo_dir()
    root.mkdir(parents=True, exist_ok=True)
    settings = {"size": size, "seed": seed, "sizes": asdict(zoo_size), "threads": THREADS}
    zoo = _Zoo(root, settings)
    say = progress or (lambda line: logger.info("%s", line))
    builder = _Builder(zoo, zoo_size, seed, say)
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    try:
        for task in TASKS:
            builder.data(task)
        builder.base()
        parts = ["base"]
        for task in TASKS:
            if family in ("full", "both"):
                builder.expert(task)
                parts.append(f"experts/{task}")
            if family in ("lora", "both"):
                builder.lora(task)
                parts.append(f"lora/{task}")
        builder.scores(parts)
    finally:
        torch.set_num_threads(threads)
    shutil.rmtree(root / ".staging", ignore_errors=True)
    zoo.manifest["capabilities"] = CAPABILITIES
    zoo.manifest["last_build_seconds"] = round(time.perf_counter() - started, 1)
    zoo.manifest["versions"] = _versions()
    zoo.save()
    return root


def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
