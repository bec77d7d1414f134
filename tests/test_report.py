"""The paper-style report: row and column order, averages, Markdown text, and a PNG that opens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from omnimerge.engine.errors import EvaluationError
from omnimerge.engine.evaluation.report import build_report_table, render_markdown, write_report
from omnimerge.engine.evaluation.results import ModelEntry, ResultsStore, result_row

TASKS = [("chartqa", "Chart", "relaxed_accuracy"), ("gqa", "VQA", "exact_match_gqa"),
         ("refcoco", "Grounding", "grounding_accuracy"), ("vizwiz", "VQA", "vqa_accuracy")]  # fmt: skip


def _rows(scores: dict[tuple[str, str], dict[str, float]], recipe: dict[str, str] | None = None) -> list[dict]:
    rows = []
    for (model, role), values in scores.items():
        entry = ModelEntry(model, f"/m/{model}", role, (recipe or {}).get(model, ""))
        for task, capability, metric in TASKS:
            if task in values:
                settings = {"generation": {"max_new_tokens": 16}}
                rows.append(result_row(entry, task=task, capability=capability, metric=metric,
                                       value=values[task], samples=50, settings=settings, seconds=1.0))  # fmt: skip
    return rows


# Merged models listed first and the base last, to check the report reorders them.
SCORES = {
    ("ta", "merged"): {"chartqa": 0.5, "gqa": 0.6, "refcoco": 0.4, "vizwiz": 0.3},
    ("ties", "merged"): {"chartqa": 0.55, "gqa": 0.5, "refcoco": 0.45, "vizwiz": 0.3},
    ("chart", "expert"): {"chartqa": 0.7, "gqa": 0.2, "refcoco": 0.1, "vizwiz": 0.1},
    ("base", "base"): {"chartqa": 0.1, "gqa": 0.3, "vizwiz": 0.2},  # no refcoco: partial average
}


def test_table_order_and_averages() -> None:
    table = build_report_table(_rows(SCORES))
    # Capabilities in the paper's order (VQA, Chart, Grounding); tasks in first-seen order within a group.
    assert table.columns == [("VQA", "gqa"), ("VQA", "vizwiz"), ("Chart", "chartqa"), ("Grounding", "refcoco")]
    assert [(r.model, r.role) for r in table.rows] == [("base", "base"), ("chart", "expert"), ("ta", "merged"),
                                                      ("ties", "merged")]  # fmt: skip
    base, chart, ta, ties = table.rows
    assert base.average == pytest.approx((30 + 20 + 10) / 3) and not base.complete
    assert ta.average == pytest.approx((60 + 30 + 50 + 40) / 4) and ta.complete
    assert ties.values["chartqa"] == pytest.approx(55.0)
    relabelled = build_report_table(_rows(SCORES), roles={"chart": "merged"})
    assert [r.model for r in relabelled.rows] == ["base", "ta", "ties", "chart"]


def test_markdown() -> None:
    text = render_markdown(build_report_table(_rows(SCORES, {"ta": "abc123"})), title="Zoo")
    lines = text.splitlines()
    assert lines[0] == "# Zoo"
    assert lines[2] == "| Model | Role | VQA/gqa | VQA/vizwiz | Chart/chartqa | Grounding/refcoco | Avg |"
    assert lines[3] == "|---|---|---:|---:|---:|---:|---:|"
    assert lines[4] == "| base | base | 30.00 | 20.00 | 10.00 | – | 20.00 † |"
    assert lines[5] == "| chart | expert | 20.00 | 10.00 | 70.00 | 10.00 | 27.50 |"
    # Best merged per column in bold (ties on vizwiz: both bold); Avg 45.00 vs 45.00 as well.
    assert lines[6] == "| ta | merged | **60.00** | **30.00** | 50.00 | 40.00 | **45.00** |"
    assert lines[7] == "| ties | merged | 50.00 | **30.00** | **55.00** | **45.00** | **45.00** |"
    assert "| chartqa | Chart | relaxed_accuracy | 50 | 16 |" in lines
    assert "Merged model recipes: ta = `abc123`" in text
    assert "† average over the tasks this model has" in text


def test_write_report_from_results_dir(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path / "results")
    rows = _rows(SCORES)
    for model in {r["model"] for r in rows}:
        for row in [r for r in rows if r["model"] == model]:
            store.record_task(model, row["task"], [row], [])
    md_path, png_path = write_report(tmp_path / "results", tmp_path / "out", title="Zoo")
    assert md_path.read_text().startswith("# Zoo\n\nResults: `")
    assert (tmp_path / "results" / "results.parquet").is_file()  # finished tasks were folded in first
    with Image.open(png_path) as image:
        assert image.format == "PNG" and image.width > 600 and image.height > 300
    # A Parquet file works as well, and settings survive as JSON.
    md_again, _ = write_report(tmp_path / "results" / "results.parquet", tmp_path / "again")
    assert md_again.read_text().count("| ties | merged |") == 1
    assert json.loads(store.read().column("settings")[0].as_py())["generation"]["max_new_tokens"] == 16


def test_no_results_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(EvaluationError, match=f"No evaluation results at '{tmp_path}'; run `omnimerge eval"):
        write_report(tmp_path)


def test_report_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from omnimerge.cluster.cli import main

    store = ResultsStore(tmp_path / "results")
    for row in _rows(SCORES):
        store.record_task(row["model"], row["task"], [row], [])
    assert main(["report", str(tmp_path / "results"), "--role", "chart=merged", "--title", "Zoo"]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "results" / n) for n in ("report.md", "report.png")]
    assert "| chart | merged |" in (tmp_path / "results" / "report.md").read_text()
    assert main(["report", str(tmp_path / "results"), "--role", "chart=teacher"]) == 1
    assert "--role 'chart=teacher': role must be one of base, expert, merged, model." in capsys.readouterr().err
