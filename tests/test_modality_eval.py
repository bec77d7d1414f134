"""Video and audio evaluation on tiny real modality models, and modality-merge evaluation side by side.

Tiny LLaVA and Video-LLaVA share one tiny LLaMA; tiny Qwen2-VL and Qwen2-Audio share one tiny Qwen2
(``tiny_modality_models``, with their real processors). Tasks are the synthetic ones
(``omnimerge.engine.evaluation.synthetic``). Random models score near zero: what is tested is that the frames
and waveforms reach the model through its processor as a by-hand pipeline feeds them, that scores are
re-derived from the saved predictions, and that every model meets only its own modality's tasks.
"""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch
from tiny_models import make_expert
from tiny_modality_models import (
    build_llama_llm,
    build_llava_on,
    build_qwen2_llm,
    build_qwen2audio_on,
    build_qwen2vl_on,
    build_video_llava_on,
)

from omnimerge.engine.errors import EvaluationError
from omnimerge.engine.evaluation.evaluator import EvalOptions, Evaluator, rescore_predictions
from omnimerge.engine.evaluation.results import ModelEntry, ResultsStore, read_predictions
from omnimerge.engine.evaluation.suites import load_suite
from omnimerge.engine.evaluation.synthetic import write_synthetic_tasks

OPTIONS = EvalOptions(batch_size=4, device="cpu")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """llama → llava, vllava (+ experts moving their LLM); qwen2 → qvl, qaudio (+ experts)."""
    root = tmp_path_factory.mktemp("models")
    build_llama_llm(root / "llama")
    build_llava_on(root / "llama", root / "llava")
    build_video_llava_on(root / "llama", root / "vllava")
    build_qwen2_llm(root / "qwen2")
    build_qwen2vl_on(root / "qwen2", root / "qvl")
    build_qwen2audio_on(root / "qwen2", root / "qaudio")
    make_expert(root / "llava", root / "llava_x", seed=5, noise=0.02, only=r"^language_model\.")
    make_expert(root / "vllava", root / "vllava_x", seed=6, noise=0.02, only=r"^language_model\.")
    make_expert(root / "qvl", root / "qvl_x", seed=7, noise=0.02, only=r"^(model\.|lm_head)")
    make_expert(root / "qaudio", root / "qaudio_x", seed=8, noise=0.02, only=r"^language_model\.")
    return root


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic tasks (4 samples each) and their suites image.yaml, video.yaml, audio.yaml."""
    root = tmp_path_factory.mktemp("tasks")
    write_synthetic_tasks(root, samples=4)
    return root


def _greedy(model: Any, inputs: dict[str, torch.Tensor], steps: int) -> list[int]:
    """Argmax decoding one token at a time over the full sequence (no cache), media inputs passed every step."""
    ids = inputs["input_ids"]
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(steps):
            full = torch.cat([ids, torch.tensor([out], dtype=ids.dtype)], dim=1) if out else ids
            logits = model(**{**inputs, "input_ids": full, "attention_mask": torch.ones_like(full)}).logits
            out.append(int(logits[0, -1].argmax()))
            if out[-1] == model.generation_config.eos_token_id:
                break
    return out


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def test_video_task_feeds_sampled_frames_through_the_real_processor(models: Path, tasks: Path) -> None:
    """Video-LLaVA's inputs equal those built here by hand -- the 4 frames linspace picks from 6 (0, 1, 3, 5),
    each through the CLIP image processor, 5 video tokens per frame (4 patches + CLS) -- and its prediction is
    their greedy decoding."""
    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer, VideoLlavaForConditionalGeneration

    from omnimerge.engine.evaluation.data import iter_samples
    from omnimerge.engine.evaluation.media import prepare_sample_media

    task = load_suite(tasks / "video.yaml").task("video_colour")
    evaluator = Evaluator(models / "vllava", OPTIONS)
    outcome = evaluator.run_task(task, tasks)
    assert outcome.samples == 4 and outcome.settings["modality"] == "video" and outcome.settings["num_frames"] == 4
    first = outcome.predictions[0]
    assert (first["modality"], first["frames"], first["frame_indices"]) == ("video", 4, [0, 1, 3, 5])
    assert (first["width"], first["height"]) == (32, 32)

    tokenizer = AutoTokenizer.from_pretrained(models / "vllava")
    image_processor = AutoImageProcessor.from_pretrained(models / "vllava")
    model = VideoLlavaForConditionalGeneration.from_pretrained(models / "vllava").eval()
    sample = next(iter_samples(task, tasks))

    def pixels_of(indices: tuple[int, ...]) -> torch.Tensor:
        frames = [Image.open(io.BytesIO(sample.video[i])).convert("RGB") for i in indices]
        return torch.stack([image_processor(images=f, return_tensors="pt")["pixel_values"][0] for f in frames])[None]

    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": first["prompt"]}]}],
        add_generation_prompt=True, tokenize=False)  # fmt: skip
    ids = tokenizer(text.replace("<video>", "<video>" * (5 * 4)), return_tensors="pt")["input_ids"]
    _, frames, _, _ = prepare_sample_media(task, sample, None)
    inputs = evaluator.model_inputs([first["prompt"]], [None], videos=[frames])
    assert torch.equal(inputs["input_ids"], ids)
    assert torch.equal(inputs["pixel_values_videos"], pixels_of((0, 1, 3, 5)))
    assert not torch.equal(inputs["pixel_values_videos"], pixels_of((0, 1, 2, 3)))  # the square moved
    by_hand = {"input_ids": ids, "pixel_values_videos": pixels_of((0, 1, 3, 5))}
    assert first["prediction"] == _decode(tokenizer, _greedy(model, by_hand, task.max_new_tokens))
    with torch.inference_mode():  # the frames reach the logits (a random tiny model's argmax rarely shows it)
        logits = [model(input_ids=ids, pixel_values_videos=pixels_of(f)).logits[0, -1]
                  for f in ((0, 1, 3, 5), (2, 2, 2, 2))]
    assert not torch.allclose(logits[0], logits[1])
    # Every score is re-derived from the saved records alone.
    for record in outcome.predictions:
        assert record["score"] == float(record["prediction"].strip().rstrip(".").lower() == record["answers"][0])
    assert outcome.value == sum(r["score"] for r in outcome.predictions) / 4


def test_audio_task_feeds_resampled_waveforms_through_the_real_processor(models: Path, tasks: Path) -> None:
    """Qwen2-Audio's predictions equal greedy decoding of inputs built here: Whisper features of the waveform
    (padded to 100 frames), 12 audio tokens for 0.5 s (50 frames → conv stride 2 → 25 → pool 2 → 12)."""
    from transformers import AutoTokenizer, Qwen2AudioForConditionalGeneration, WhisperFeatureExtractor

    from omnimerge.engine.evaluation.data import iter_samples
    from omnimerge.engine.evaluation.media import prepare_sample_media

    evaluator = Evaluator(models / "qaudio", OPTIONS)
    assert evaluator.sampling_rate == 16000
    task = load_suite(tasks / "audio.yaml").task("audio_pitch")
    outcome = evaluator.run_task(task, tasks)
    first = outcome.predictions[0]
    assert (first["modality"], first["sampling_rate"], first["audio_seconds"]) == ("audio", 16000, 0.5)
    assert outcome.settings["sampling_rate"] == 16000 and first["choices"] == ["high", "low"]

    tokenizer = AutoTokenizer.from_pretrained(models / "qaudio")
    extractor = WhisperFeatureExtractor.from_pretrained(models / "qaudio")
    model = Qwen2AudioForConditionalGeneration.from_pretrained(models / "qaudio").eval()
    waveform = next(iter_samples(task, tasks)).audio.waveform
    features = extractor(waveform, sampling_rate=16000, padding="max_length", return_attention_mask=True,
                         return_tensors="pt")  # fmt: skip
    assert features["input_features"].shape == (1, 16, 100) and int(features["attention_mask"].sum()) == 50
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "audio", "audio": "x"}, {"type": "text", "text": first["prompt"]}]}],
        add_generation_prompt=True, tokenize=False)  # fmt: skip
    ids = tokenizer(text.replace("<|AUDIO|>", "<|AUDIO|>" * 12), return_tensors="pt")["input_ids"]
    inputs = evaluator.model_inputs([first["prompt"]], [None], audios=[waveform])
    assert torch.equal(inputs["input_ids"], ids)
    assert torch.equal(inputs["input_features"], features["input_features"])
    assert torch.equal(inputs["feature_attention_mask"], features["attention_mask"])
    by_hand = {"input_ids": ids, "input_features": features["input_features"],
               "feature_attention_mask": features["attention_mask"]}  # fmt: skip
    assert first["prediction"] == _decode(tokenizer, _greedy(model, by_hand, task.max_new_tokens))
    with torch.inference_mode():  # the waveform reaches the logits
        silent = {**by_hand, "input_features": extractor(np.zeros_like(waveform), sampling_rate=16000,
                                                         padding="max_length", return_tensors="pt")["input_features"]}
        logits = [model(**inputs).logits[0, -1] for inputs in (by_hand, silent)]
    assert not torch.allclose(logits[0], logits[1])

    # 8 kHz beeps are resampled to the extractor's 16 kHz before feature extraction: 0.8 s → 80 frames → 20 tokens.
    beeps_task = load_suite(tasks / "audio.yaml").task("audio_beeps")
    beeps = evaluator.run_task(beeps_task, tasks)
    assert {(r["source_sampling_rate"], r["sampling_rate"], r["audio_seconds"]) for r in beeps.predictions} == {
        (8000, 16000, 0.8)}
    from omnimerge.engine.evaluation.media import resample

    clip_sample = next(iter_samples(beeps_task, tasks))
    upsampled = resample(clip_sample.audio.waveform, 8000, 16000)
    assert len(upsampled) == 12800
    assert np.array_equal(prepare_sample_media(beeps_task, clip_sample, 16000)[2], upsampled)
    inputs = evaluator.model_inputs([beeps.predictions[0]["prompt"]], [None], audios=[upsampled])
    assert int(inputs["feature_attention_mask"].sum()) == 80 and int((inputs["input_ids"] == 122).sum()) == 20
    expected = extractor(upsampled, sampling_rate=16000, padding="max_length", return_tensors="pt")["input_features"]
    assert torch.equal(inputs["input_features"], expected)


def test_rescoring_saved_predictions_with_planted_answers(models: Path, tasks: Path, tmp_path: Path) -> None:
    """The saved references are the task's: plant the right answers and the rescored value becomes 1."""
    from omnimerge.engine.evaluation.evaluator import evaluate_model

    entry = ModelEntry("video", str(models / "vllava"), "model")
    suite = load_suite(tasks / "video.yaml")
    rows = evaluate_model(entry, suite.tasks, data_root=tasks, results_dir=tmp_path, options=OPTIONS)
    store = ResultsStore(tmp_path)
    for row in rows:
        path = store.predictions_path("video", row["task"])
        assert rescore_predictions(path) == pytest.approx(row["value"])
        records = read_predictions(path)
        planted = [{**r, "prediction": r["answers"][0] if r["choices"] else r["answers"][0].upper()} for r in records]
        path.write_text("".join(json.dumps(r) + "\n" for r in planted))
        assert rescore_predictions(path) == 1.0
        if records[0]["choices"]:  # multiple choice also takes the option's letter
            letters = [{**r, "prediction": "ABCD"[r["choices"].index(r["answers"][0])]} for r in records]
            path.write_text("".join(json.dumps(r) + "\n" for r in letters))
            assert rescore_predictions(path) == 1.0


@pytest.mark.parametrize(
    ("model", "suite", "task", "message"),
    [
        ("llava", "video", "video_colour", "Task 'video_colour' feeds video, but model '{path}' "
         "(LlavaForConditionalGeneration) takes image only. Evaluate each model on its own modality's tasks"),
        ("vllava", "audio", "audio_pitch", "Task 'audio_pitch' feeds audio, but model '{path}' "
         "(VideoLlavaForConditionalGeneration) takes image and video only."),
        ("qaudio", "image", "image_colour", "Task 'image_colour' feeds image, but model '{path}' "
         "(Qwen2AudioForConditionalGeneration) takes audio only."),
    ],
)
def test_a_task_the_model_cannot_take_is_refused(models: Path, tasks: Path, model: str, suite: str, task: str,
                                                 message: str) -> None:  # fmt: skip
    evaluator = Evaluator(models / model, OPTIONS)
    with pytest.raises(EvaluationError) as info:
        evaluator.run_task(load_suite(tasks / f"{suite}.yaml").task(task), tasks)
    assert str(info.value).startswith(message.format(path=models / model))


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision builds the processor")
def test_video_without_torchvision_is_refused_for_qwen2vl(models: Path, tasks: Path) -> None:
    evaluator = Evaluator(models / "qvl", OPTIONS)
    with pytest.raises(EvaluationError) as info:
        evaluator.run_task(load_suite(tasks / "video.yaml").task("video_colour"), tasks)
    assert str(info.value) == (
        f"Task 'video_colour' feeds video, but the processor of model '{models / 'qvl'}' "
        "(Qwen2VLForConditionalGeneration) has no video processor: transformers builds this family's video processor "
        "with torchvision, which is not installed. Install torchvision to evaluate video, or evaluate this model on "
        "its image tasks."
    )
    assert evaluator.run_task(load_suite(tasks / "image.yaml").task("image_colour"), tasks).samples == 4


def test_dispatch_refuses_every_mismatched_pair_before_loading(models: Path, tasks: Path, tmp_path: Path) -> None:
    from omnimerge.cluster.evaluate import evaluate_model_suites

    jobs = [(f"image={models / 'llava'}", tasks / "video.yaml"), (f"audio={models / 'qaudio'}", tasks / "audio.yaml"),
            (f"vision={models / 'qvl'}", tasks / "audio.yaml")]  # fmt: skip
    with pytest.raises(EvaluationError) as info:
        evaluate_model_suites(jobs, data_root=tasks, results_dir=tmp_path / "r", executor="local")
    assert str(info.value) == (
        "4 (model, task) pair(s) feed an input the model cannot take:\n"
        "  - model 'image' (LlavaForConditionalGeneration, takes image) cannot take task 'video_colour' (video)\n"
        "  - model 'image' (LlavaForConditionalGeneration, takes image) cannot take task 'video_direction' (video)\n"
        "  - model 'vision' (Qwen2VLForConditionalGeneration, takes image and video) cannot take task 'audio_pitch' "
        "(audio)\n"
        "  - model 'vision' (Qwen2VLForConditionalGeneration, takes image and video) cannot take task 'audio_beeps' "
        "(audio)\n"
        "Evaluate each model on its own modality's tasks: one suite per model (`omnimerge modality RECIPE "
        "--eval-suite NAME=SUITE`, or one `omnimerge eval` per suite)."
    )
    assert not (tmp_path / "r" / "predictions").exists()  # nothing ran


# ---- `omnimerge modality` with per-model suites, through Ray ------------------------------------------------------


@pytest.fixture(scope="module")
def ray_instance() -> Iterator[None]:
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2)
    yield
    ray.shutdown()


def _run_cli(argv: list[str]) -> int:
    from omnimerge.cluster.cli import main

    return main(argv)


def _check_results(results: Path, expected: dict[str, list[str]], roles: dict[str, str]) -> None:
    """Rows are exactly each model × its own tasks; every value is re-derived from the saved predictions."""
    import pyarrow.parquet as pq

    table = pq.read_table(results / "results.parquet").to_pylist()
    assert sorted((r["model"], r["task"]) for r in table) == sorted((m, t) for m, ts in expected.items() for t in ts)
    store = ResultsStore(results)
    for row in table:
        assert row["role"] == roles[row["model"]] and row["samples"] == 4
        settings = json.loads(row["settings"])
        assert settings["generation"]["do_sample"] is False and settings["modality"] in row["task"]
        assert rescore_predictions(store.predictions_path(row["model"], row["task"])) == pytest.approx(row["value"])


@pytest.mark.ray
def test_modality_cli_evaluates_each_model_on_its_own_modality_through_ray(
    ray_instance: None, models: Path, tasks: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """LLaVA (image) + Video-LLaVA (video) on one LLaMA, and Qwen2-VL (image) + Qwen2-Audio (audio) on one Qwen2:
    merged and unmerged models, each on its own suite, in one Ray dispatch per merge; reports of both kinds."""
    llama = tmp_path / "llama.yaml"
    llama.write_text(f"kind: modality\nllm_base: {models / 'llama'}\nmethod: task_arithmetic\n"
                     f"parameters: {{scale: 0.5}}\nmodels:\n  image: {models / 'llava_x'}\n"
                     f"  video: {models / 'vllava_x'}\n")  # fmt: skip
    out = tmp_path / "llama_out"
    assert _run_cli(["modality", str(llama), "-o", str(out), "--eval-suite", f"image={tasks / 'image.yaml'}",
                     "--eval-suite", f"video={tasks / 'video.yaml'}", "--data-root", str(tasks),
                     "--batch-size", "4"]) == 0  # fmt: skip
    roles = {"image-merged": "merged", "image-source": "expert", "video-merged": "merged", "video-source": "expert"}
    video_tasks = ["video_colour", "video_direction"]
    _check_results(out / "eval", {"image-merged": ["image_colour"], "image-source": ["image_colour"],
                                  "video-merged": video_tasks, "video-source": video_tasks}, roles)  # fmt: skip
    combined = (out / "eval" / "report.md").read_text().splitlines()
    assert combined[4] == "| Model | Role | Image/image_colour | Video/video_colour | Video/video_direction | Avg |"
    assert [line.split(" | ")[0:2] for line in combined[6:10]] == [
        ["| image-source", "expert"], ["| video-source", "expert"], ["| image-merged", "merged"],
        ["| video-merged", "merged"]]  # fmt: skip
    assert [line.count("| – ") for line in combined[6:10]] == [2, 1, 2, 1]  # each model only on its own tasks
    per_model = (out / "eval" / "video" / "report.md").read_text()
    assert "| Model | Role | Video/video_colour | Video/video_direction | Avg |" in per_model
    assert "| video-source | expert |" in per_model and "| video-merged | merged |" in per_model
    assert "image-" not in per_model.split("Merged model recipes")[0]
    for folder in (out / "eval", out / "eval" / "image", out / "eval" / "video"):
        assert (folder / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "report every model:" in capsys.readouterr().err

    qwen = tmp_path / "qwen.yaml"
    qwen.write_text(f"kind: modality\nllm_base: {models / 'qwen2'}\nmethod: weight_average\nmodels:\n"
                    f"  vision: {{source: {models / 'qvl_x'}, eval_suite: {tasks / 'image.yaml'}}}\n"
                    f"  audio: {{source: {models / 'qaudio_x'}, eval_suite: {tasks / 'audio.yaml'}}}\n")  # fmt: skip
    out = tmp_path / "qwen_out"
    assert _run_cli(["modality", str(qwen), "-o", str(out), "--data-root", str(tasks)]) == 0
    roles = {"vision-merged": "merged", "vision-source": "expert", "audio-merged": "merged", "audio-source": "expert"}
    audio_tasks = ["audio_pitch", "audio_beeps"]
    _check_results(out / "eval", {"vision-merged": ["image_colour"], "vision-source": ["image_colour"],
                                  "audio-merged": audio_tasks, "audio-source": audio_tasks}, roles)  # fmt: skip
    assert "| audio-merged | merged |" in (out / "eval" / "audio" / "report.md").read_text()
    # The merged audio model's predictions differ from its source's only through the merged LLM: same samples.
    store = ResultsStore(out / "eval")
    ids = [[r["question_id"] for r in read_predictions(store.predictions_path(m, "audio_beeps"))]
           for m in ("audio-merged", "audio-source")]  # fmt: skip
    assert ids[0] == ids[1] == [f"audio_beeps_{i}" for i in range(4)]
    assert np.isfinite([r["value"] for r in store.read().to_pylist()]).all()
