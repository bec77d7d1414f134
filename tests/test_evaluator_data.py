"""Suites as data and the local data reader: layouts, column mapping, filters, and what-is-missing messages."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
from test_evaluator_support import png_bytes, task_rows, write_parquet

from omnimerge.engine.errors import EvaluationError
from omnimerge.engine.evaluation.data import check_suite_data, iter_samples
from omnimerge.engine.evaluation.suites import TaskSpec, builtin_suites, load_suite, parse_suite


def _task(path: str, **kw: object) -> TaskSpec:
    return TaskSpec(name="t", metric="vqa_accuracy", path=path, **kw)  # type: ignore[arg-type]


def _ids(task: TaskSpec, root: Path, **kw: object) -> list[str]:
    return [s.question_id for s in iter_samples(task, root, **kw)]  # type: ignore[arg-type]


def test_parquet_layouts(tmp_path: Path) -> None:
    write_parquet(tmp_path / "a" / "test.parquet", task_rows(3))
    write_parquet(tmp_path / "b" / "val-00000-of-00002.parquet", task_rows(2))
    write_parquet(tmp_path / "b" / "val-00001-of-00002.parquet", task_rows(3)[2:])
    write_parquet(tmp_path / "c" / "data" / "testmini-00000-of-00001.parquet", task_rows(1))
    assert _ids(_task("a"), tmp_path) == ["q0", "q1", "q2"]
    assert _ids(_task("b", split="val"), tmp_path) == ["q0", "q1", "q2"]
    assert _ids(_task("c", split="testmini"), tmp_path) == ["q0"]
    assert _ids(_task(str(tmp_path / "a" / "test.parquet")), None) == ["q0", "q1", "q2"]  # a file, absolute
    assert _ids(_task("a"), tmp_path, limit=2) == ["q0", "q1"]
    sample = next(iter_samples(_task("a"), tmp_path))
    assert (sample.image, sample.answers, sample.question) == (png_bytes(0), ("3",), "what colour is the circle ?")


def _save_to_disk(folder: Path, rows: list[dict]) -> None:
    """The layout ``datasets.Dataset.save_to_disk`` writes: Arrow stream files listed in state.json."""
    folder.mkdir(parents=True)
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=2)
    state = {"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_split": "test"}
    (folder / "state.json").write_text(json.dumps(state))


def test_save_to_disk_layouts(tmp_path: Path) -> None:
    _save_to_disk(tmp_path / "single", task_rows(3))  # Dataset.save_to_disk
    _save_to_disk(tmp_path / "dict" / "validation", task_rows(2))  # DatasetDict.save_to_disk
    assert _ids(_task("single"), tmp_path) == ["q0", "q1", "q2"]
    assert _ids(_task("dict", split="validation"), tmp_path) == ["q0", "q1"]


def test_jsonl_with_image_paths(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "0.png").write_bytes(png_bytes(7))
    line = {"question_id": 5, "image": "imgs/0.png", "question": "q?", "answers": "yes"}
    (tmp_path / "mine.jsonl").write_text(json.dumps(line) + "\n")
    suite = load_suite(tmp_path / "mine.jsonl", metric="vqa_accuracy")
    [sample] = list(iter_samples(suite.tasks[0], None))
    assert (sample.question_id, sample.answers, sample.image) == ("5", ("yes",), png_bytes(7))
    (tmp_path / "bad.jsonl").write_text(json.dumps({**line, "image": "imgs/missing.png"}) + "\n")
    with pytest.raises(EvaluationError, match="Image file '.*imgs/missing.png' named in the data under"):
        list(iter_samples(load_suite(tmp_path / "bad.jsonl", metric="vqa_accuracy").tasks[0], None))


def test_column_mapping_filter_explode_and_image_join(tmp_path: Path) -> None:
    rows = [
        {"pid": "1", "decoded_image": {"bytes": png_bytes(1), "path": None}, "query": "Q1", "answer": "3",
         "options": ["1", "3"], "metadata": {"task": "geometry problem solving"}, "expr": ["the cat", "a cat"],
         "vqa": [{"answer": "A"}, {"answer": "b"}]},
        {"pid": "2", "decoded_image": {"bytes": png_bytes(2), "path": None}, "query": "Q2", "answer": "4",
         "options": None, "metadata": {"task": "figure question answering"}, "expr": [], "vqa": []},
    ]  # fmt: skip
    write_parquet(tmp_path / "mv" / "testmini.parquet", rows)
    columns = {"question_id": "pid", "image": "decoded_image", "question": "query", "answers": "answer",
               "choices": "options", "category": "metadata.task"}  # fmt: skip
    task = _task("mv", split="testmini", columns=columns, filter={"field": "category", "contains": "GEOMETRY"})
    [sample] = list(iter_samples(task, tmp_path))
    assert (sample.question_id, sample.answers, sample.choices) == ("1", ("3",), ("1", "3"))
    assert sample.category == "geometry problem solving"
    in_filter = _task("mv", split="testmini", columns=columns, filter={"field": "question_id", "in": ["2", "9"]})
    assert _ids(in_filter, tmp_path) == ["2"]
    first_expr = _task("mv", split="testmini", columns={**columns, "question": "expr.0", "answers": "vqa"})
    first = next(iter_samples(first_expr, tmp_path))
    assert first.question == "the cat" and first.answers == ("A", "b")  # list index; VQAv2-style answer dicts

    write_parquet(tmp_path / "ocr" / "test.parquet",
                  [{"image_id": "b7", "image": png_bytes(3), "questions": ["Who?", "Title?"], "answers": ["x", "y"]}])
    exploded = _task("ocr", columns={"question_id": "image_id", "question": "questions"}, explode=True)
    assert [(s.question_id, s.question, s.answers) for s in iter_samples(exploded, tmp_path)] == [
        ("b7_0", "Who?", ("x",)),
        ("b7_1", "Title?", ("y",)),
    ]

    write_parquet(tmp_path / "gqa" / "ins" / "testdev.parquet",
                  [{"id": "g1", "imageId": "n5", "question": "Q", "answer": "no"}])
    write_parquet(tmp_path / "gqa" / "img" / "testdev.parquet", [{"id": "n5", "image": {"bytes": png_bytes(5)}}])
    joined = _task("gqa/ins", split="testdev", columns={"question_id": "id", "answers": "answer"},
                   images_from={"path": "gqa/img", "key": "imageId"})  # fmt: skip
    [gqa] = list(iter_samples(joined, tmp_path))
    assert (gqa.question_id, gqa.answers, gqa.image) == ("g1", ("no",), png_bytes(5))


def test_check_suite_data_says_what_is_missing(tmp_path: Path) -> None:
    write_parquet(tmp_path / "chart" / "test.parquet", [{"question": "q", "image": png_bytes(0), "label": "1"}])
    suite = parse_suite(
        {"name": "s", "tasks": [
            {"name": "chartqa", "dataset": "lmms-lab/ChartQA", "path": "chart", "metric": "relaxed_accuracy"},
            {"name": "textvqa", "dataset": "lmms-lab/textvqa", "path": "textvqa", "split": "validation",
             "metric": "vqa_accuracy"},
            {"name": "ok", "path": "chart", "metric": "relaxed_accuracy", "columns": {"answers": "label"}},
        ]}
    )  # fmt: skip
    assert check_suite_data(suite, tmp_path) == [
        f"task 'chartqa' (lmms-lab/ChartQA, split test): field 'answers' needs column 'answers', which "
        f"{tmp_path}/chart/test.parquet lacks (columns: image, label, question). Map it with "
        "`columns: {answers: <column>}` in the suite.",
        f"task 'textvqa' (lmms-lab/textvqa, split validation): no data at {tmp_path}/textvqa (looked for "
        "validation.parquet, validation-*.parquet, data/validation-*.parquet, validation/state.json, state.json, "
        f"validation.jsonl). Download 'lmms-lab/textvqa' there, e.g. `hf download lmms-lab/textvqa --repo-type "
        f"dataset --local-dir {tmp_path}/textvqa` (or point the suite's 'path' at an existing copy).",
    ]
    with pytest.raises(EvaluationError, match="task 'textvqa' .* no data at"):
        list(iter_samples(suite.task("textvqa"), tmp_path))


def test_builtin_suites_load() -> None:
    assert {"paper_qwen2vl", "paper_internvl"} <= set(builtin_suites())
    paper = load_suite("paper_qwen2vl")
    assert len(paper.tasks) == 10
    assert paper.capabilities() == ["VQA", "Geometry", "Chart", "OCR", "Grounding"]
    assert [t.capability for t in paper.tasks].count("Grounding") == 3
    internvl = load_suite("paper_internvl")
    assert [t.name for t in internvl.tasks] == [t.name for t in paper.tasks]
    assert internvl.task("refcoco_val").box_format == "internvl"
    assert "<ref>{question}</ref>" in internvl.task("refcoco_val").prompt
    assert internvl.task("chartqa") == paper.task("chartqa")
    if "zoo" in builtin_suites():  # written by the zoo's author in this format
        assert load_suite("zoo").tasks


def test_suite_errors_are_collected(tmp_path: Path) -> None:
    with pytest.raises(EvaluationError, match="Unknown suite 'paper_qwen2'. Did you mean 'paper_qwen2vl'"):
        load_suite("paper_qwen2")
    bad = {"name": "bad", "tasks": [
        {"name": "a", "path": "x", "metric": "vqa_acc"},
        {"name": "b", "metric": "vqa_accuracy", "box_format": "qwen3", "colour": 1, "prompt": "no placeholder"},
    ]}  # fmt: skip
    with pytest.raises(EvaluationError) as info:
        parse_suite(bad, source="bad.yaml")
    message = str(info.value)
    assert message.startswith("Suite 'bad.yaml' has 5 problem(s); fix them in the file:")
    for part in ("task 0 'a': unknown metric 'vqa_acc' (did you mean 'vqa_accuracy'?)",
                 "task 1 'b': unknown key 'colour'", "task 1 'b': missing 'path'",
                 "task 1 'b': unknown box_format 'qwen3'", "task 1 'b': prompt must contain '{question}'"):  # fmt: skip
        assert part in message
    (tmp_path / "d.jsonl").write_text("{}\n")
    with pytest.raises(EvaluationError, match="is a data file; say how to score it with a metric name"):
        load_suite(tmp_path / "d.jsonl")
    child = tmp_path / "child.yaml"
    child.write_text("extends: paper_qwen2vl\noverrides: {nope: {max_new_tokens: 3}}\n")
    with pytest.raises(EvaluationError, match="overrides tasks its parent 'paper_qwen2vl' lacks: nope"):
        load_suite(child)
