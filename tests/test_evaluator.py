"""The built-in evaluator on a tiny real Qwen2-VL (random weights: scores are ~0, the pipeline is what is tested)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from test_evaluator_support import build_model, make_task_data, png_bytes, tiny_suite

from omnimerge.engine.errors import EvaluationError
from omnimerge.engine.evaluation.evaluator import EvalOptions, Evaluator, evaluate_model, rescore_predictions
from omnimerge.engine.evaluation.loading import load_model_and_processor
from omnimerge.engine.evaluation.results import ModelEntry, ResultsStore, read_predictions


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = build_model(tmp_path_factory.mktemp("model") / "base")
    # Make the inherited generation config as hostile as a real one: sampling, hot, penalised.
    config_path = path / "generation_config.json"
    config = json.loads(config_path.read_text())
    config.update(do_sample=True, temperature=5.0, top_k=0, top_p=1.0, repetition_penalty=1.5)
    config_path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_task_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def evaluator(model_dir: Path) -> Evaluator:
    return Evaluator(model_dir, EvalOptions(batch_size=4, device="cpu"))


def test_processor_loads_without_torchvision(model_dir: Path) -> None:
    model, processor = load_model_and_processor(model_dir)
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert processor.tokenizer.padding_side == "left"
    assert processor.image_processor is not None


def test_missing_checkpoint_is_named(tmp_path: Path) -> None:
    with pytest.raises(EvaluationError, match=f"Model '{tmp_path}' has no config.json; give a Hugging Face"):
        load_model_and_processor(tmp_path)


def test_greedy_ignores_inherited_sampling(evaluator: Evaluator, data_root: Path) -> None:
    """Predictions equal plain greedy decoding done here by hand, although the checkpoint asks to sample."""
    import torch
    from PIL import Image

    task = tiny_suite().task("vqa")
    outcome = evaluator.run_task(task, data_root)
    first = outcome.predictions[0]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": first["prompt"]}]}]
    text = evaluator.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image = Image.open(io.BytesIO(png_bytes(0))).convert("RGB")
    inputs = evaluator.processor(text=[text], images=[image], return_tensors="pt")
    ids = inputs["input_ids"]
    generated = []
    with torch.inference_mode():  # argmax decoding, one token at a time, no cache
        for _ in range(task.max_new_tokens):
            extra = torch.zeros((1, len(generated)), dtype=ids.dtype)
            full_ids = torch.cat([ids, torch.tensor([generated], dtype=ids.dtype)], dim=1) if generated else ids
            logits = evaluator.model(
                input_ids=full_ids,
                attention_mask=torch.ones_like(full_ids),
                mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"], extra], dim=1),
                pixel_values=inputs["pixel_values"],
                image_grid_thw=inputs["image_grid_thw"],
            ).logits
            token = int(logits[0, -1].argmax())
            if token in evaluator.generation_settings(1)["eos_token_id"]:
                break
            generated.append(token)
    expected = evaluator.tokenizer.decode(generated, skip_special_tokens=True).strip()
    assert first["prediction"] == expected
    settings = outcome.settings["generation"]
    assert settings["do_sample"] is False and settings["repetition_penalty"] == 1.0 and settings["num_beams"] == 1
    assert settings["max_new_tokens"] == task.max_new_tokens


def test_deterministic_and_batch_size_invariant(model_dir: Path, evaluator: Evaluator, data_root: Path) -> None:
    task = tiny_suite().task("vqa")
    batched = [p["prediction"] for p in evaluator.run_task(task, data_root).predictions]
    again = [p["prediction"] for p in evaluator.run_task(task, data_root).predictions]
    single = Evaluator(model_dir, EvalOptions(batch_size=1, device="cpu"))
    one_by_one = [p["prediction"] for p in single.run_task(task, data_root).predictions]
    assert len(batched) == 6 and batched == again == one_by_one


def test_evaluate_model_records_predictions_and_settings(model_dir: Path, data_root: Path, tmp_path: Path) -> None:
    suite = tiny_suite()
    entry = ModelEntry("base", str(model_dir), role="base")
    done: list[tuple[str, str]] = []
    rows = evaluate_model(entry, suite.tasks, data_root=data_root, results_dir=tmp_path,
                          options=EvalOptions(batch_size=3, device="cpu"), suite_name="tiny",
                          on_task_done=lambda m, t: done.append((m, t)))  # fmt: skip
    assert done == [("base", "vqa"), ("base", "ground")]
    assert [(r["model"], r["task"], r["metric"], r["samples"]) for r in rows] == [
        ("base", "vqa", "vqa_accuracy", 6),
        ("base", "ground", "grounding_accuracy", 6),
    ]
    store = ResultsStore(tmp_path)
    for row in rows:
        settings = json.loads(row["settings"])
        assert settings["generation"]["do_sample"] is False
        assert settings["batch_size"] == 3 and settings["suite"] == "tiny" and settings["box_format"] == "qwen2vl"
        assert settings["padding_side"] == "left" and settings["dtype"] == "float32"
        path = store.predictions_path("base", row["task"])
        records = read_predictions(path)
        assert [r["question_id"] for r in records] == [f"q{i}" for i in range(6)]
        assert all({"prompt", "prediction", "answers", "score", "extracted"} <= set(r) for r in records)
        # Any score can be recomputed from the saved predictions alone.
        assert rescore_predictions(path) == pytest.approx(row["value"])
    grounding = read_predictions(store.predictions_path("base", "ground"))
    assert grounding[0]["bbox"] == [10.0, 20.0, 40.0, 30.0] and grounding[0]["resized"] == [112, 112]
    # A second call finds both tasks finished on disk and loads nothing.
    assert evaluate_model(entry, suite.tasks, data_root=data_root, results_dir=tmp_path) == []
    assert store.commit().num_rows == 2


def test_rescore_with_a_planted_correct_answer(tmp_path: Path) -> None:
    """Rescoring uses the saved references: edit a prediction to the right answer and the value moves."""
    store = ResultsStore(tmp_path)
    record = {"question_id": "q0", "prediction": "Two", "answers": ["2"] * 4 + ["3"] * 6, "choices": [],
              "bbox": None, "width": None, "height": None, "resized": None, "metric": "vqa_accuracy",
              "box_format": "auto"}  # fmt: skip
    wrong = {**record, "question_id": "q1", "prediction": "five"}
    store.record_task("m", "t", [], [record, wrong])
    assert rescore_predictions(store.predictions_path("m", "t")) == pytest.approx(0.5)  # (1.0 + 0.0) / 2
    assert rescore_predictions(store.predictions_path("m", "t"), metric="exact_match_ocrvqa") == 0.0


def test_eval_command_in_process(model_dir: Path, data_root: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    from omnimerge.cluster.cli import main

    suite_file = tmp_path / "tiny.yaml"
    suite_file.write_text(
        "name: tiny\ntasks:\n  - {name: vqa, capability: VQA, path: vqa, metric: vqa_accuracy, max_new_tokens: 3}\n"
    )
    argv = ["eval", "--base", f"base={model_dir}", "--suite", str(suite_file), "--data-root", str(data_root),
            "-o", str(tmp_path / "res"), "--executor", "local", "--max-samples", "2", "--report"]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out == "base\tvqa\tvqa_accuracy\t0.0000\t2\n"
    assert "eval: 1/1 (model × task) done" in captured.err
    assert (tmp_path / "res" / "report.png").is_file()
    assert main(["eval", "--suite", str(suite_file)]) == 1
    assert "No models to evaluate; give checkpoint directories" in capsys.readouterr().err
