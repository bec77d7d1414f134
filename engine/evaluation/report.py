"""The paper-style results table, as Markdown and as a PNG heatmap.

Rows: the base, then the experts, then the merged models (then unlabelled ones), each group in the order the
results list them. Columns: tasks grouped by capability in the paper's order (VQA, Geometry, Chart, OCR,
Grounding, then any others), then the average over the tasks. Scores are shown ×100. A model missing some
tasks gets its average over the tasks it has, marked †. The best merged model per column is in bold.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from .results import ROLES, ResultsStore
from .suites import CAPABILITY_ORDER, Suite, builtin_suites, load_suite

__all__ = ["ReportRow", "ReportTable", "build_report_table", "render_markdown", "render_png", "write_report"]

logger = logging.getLogger(__name__)


@dataclass
class ReportRow:
    """One model's line: scores ×100 per task (``None``: not evaluated) and their average."""

    model: str
    role: str
    recipe_id: str
    values: dict[str, float | None]
    average: float | None
    complete: bool


@dataclass
class ReportTable:
    """The table a report renders: ``columns`` are (capability, task) pairs in display order."""

    columns: list[tuple[str, str]]
    metrics: dict[str, str]
    samples: dict[str, int]
    rows: list[ReportRow]
    versions: list[str] = field(default_factory=list)
    max_new_tokens: dict[str, int] = field(default_factory=dict)


def _capability_rank(capability: str, seen: list[str]) -> tuple[int, int]:
    if capability in CAPABILITY_ORDER:
        return (0, CAPABILITY_ORDER.index(capability))
    return (1, seen.index(capability))


def _suite_order(rows: list[dict[str, Any]], suite: Suite | str | None) -> list[str]:
    """Task names in suite order: the given suite, else the built-in suite the rows' settings name, else []."""
    if suite is None:
        names = {json.loads(r.get("settings") or "{}").get("suite") for r in rows} - {None, ""}
        if len(names) != 1:
            return []
        suite = names.pop()
        if suite not in builtin_suites():
            return []
    return [t.name for t in load_suite(suite).tasks]


def build_report_table(rows: list[dict[str, Any]], *, roles: Mapping[str, str] | None = None,
                       suite: Suite | str | None = None) -> ReportTable:  # fmt: skip
    """Arrange result rows (``results.RESULT_COLUMNS``) into the paper's table.

    Args:
        rows: Result rows; one metric per task is shown (the first one listed for it).
        roles: Role overrides by model name (``base``, ``expert``, ``merged``).
        suite: Orders the tasks within each capability as the suite lists them (default: the built-in suite
            named in the rows' settings, if any; else the order the rows list them).

    Returns:
        The table, ready to render.
    """
    roles = dict(roles or {})
    task_order: list[str] = []
    capability_of: dict[str, str] = {}
    metric_of: dict[str, str] = {}
    samples: dict[str, int] = {}
    max_new_tokens: dict[str, int] = {}
    models: dict[str, dict[str, Any]] = {}
    for row in rows:
        task = row["task"]
        if task not in task_order:
            task_order.append(task)
            capability_of[task] = row.get("capability") or "Other"
            metric_of[task] = row["metric"]
        if row["metric"] != metric_of[task]:
            continue
        samples[task] = max(samples.get(task, 0), int(row.get("samples") or 0))
        settings = json.loads(row.get("settings") or "{}")
        if "generation" in settings:
            max_new_tokens[task] = settings["generation"].get("max_new_tokens")
        info = models.setdefault(row["model"], {"role": row.get("role") or "model", "recipe_id": "", "values": {}})
        info["recipe_id"] = row.get("recipe_id") or info["recipe_id"]
        info["values"][task] = 100.0 * float(row["value"])
    capabilities_seen = list(dict.fromkeys(capability_of[t] for t in task_order))
    in_suite = _suite_order(rows, suite)
    position_of = {t: (in_suite.index(t) if t in in_suite else len(in_suite) + task_order.index(t)) for t in task_order}
    ordered = sorted(task_order, key=lambda t: (_capability_rank(capability_of[t], capabilities_seen),
                                                 position_of[t]))  # fmt: skip
    report_rows = []
    for name, info in models.items():
        values = {t: info["values"].get(t) for t in ordered}
        present = [v for v in values.values() if v is not None]
        report_rows.append(ReportRow(
            model=name,
            role=roles.get(name, info["role"]),
            recipe_id=info["recipe_id"],
            values=values,
            average=sum(present) / len(present) if present else None,
            complete=len(present) == len(ordered),
        ))  # fmt: skip
    position = {name: i for i, name in enumerate(models)}
    role_rank = {r: i for i, r in enumerate(ROLES)}
    report_rows.sort(key=lambda r: (role_rank.get(r.role, len(ROLES)), position[r.model]))
    versions = sorted({str(r.get("evaluator_version")) for r in rows if r.get("evaluator_version")})
    return ReportTable([(capability_of[t], t) for t in ordered], metric_of, samples, report_rows, versions,
                       max_new_tokens)  # fmt: skip


def _best_merged(table: ReportTable) -> dict[str, float]:
    merged = [r for r in table.rows if r.role == "merged"]
    if len(merged) < 2:
        return {}
    best: dict[str, float] = {}
    for key in [t for _, t in table.columns] + ["__avg__"]:
        values = [r.average if key == "__avg__" else r.values[key] for r in merged]
        values = [v for v in values if v is not None]
        if len(values) >= 2:  # a column with one merged model has nothing to compare
            best[key] = max(values)
    return best


def render_markdown(table: ReportTable, *, title: str = "Evaluation report", source: str = "") -> str:
    """The table as Markdown: header ``Capability/task``, one line per model, notes underneath."""
    best = _best_merged(table)

    def cell(value: float | None, key: str, suffix: str = "", merged: bool = False) -> str:
        if value is None:
            return "–"
        text = f"{value:.2f}{suffix}"
        return f"**{text}**" if merged and key in best and abs(value - best[key]) < 1e-9 else text

    header = ["Model", "Role"] + [f"{cap}/{task}" for cap, task in table.columns] + ["Avg"]
    lines = [f"# {title}", ""]
    if source:
        lines += [f"Results: `{source}`", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(["---", "---"] + ["---:"] * (len(header) - 2)) + "|"]
    for row in table.rows:
        merged = row.role == "merged"
        cells = [row.model, row.role] + [cell(row.values[t], t, merged=merged) for _, t in table.columns]
        cells.append(cell(row.average, "__avg__", "" if row.complete else " †", merged=merged))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Scores ×100; Avg is the mean over the task columns."]
    if any(not r.complete for r in table.rows):
        lines.append("† average over the tasks this model has; it was not evaluated on every column.")
    if best:
        lines.append("Bold: the best merged model in each column.")
    lines += ["", "| Task | Capability | Metric | Samples | max_new_tokens |", "|---|---|---|---:|---:|"]
    for cap, task in table.columns:
        lines.append(f"| {task} | {cap} | {table.metrics[task]} | {table.samples.get(task, 0)} | "
                     f"{table.max_new_tokens.get(task, '–')} |")  # fmt: skip
    recipes = [(r.model, r.recipe_id) for r in table.rows if r.recipe_id]
    if recipes:
        lines += ["", "Merged model recipes: " + ", ".join(f"{m} = `{rid}`" for m, rid in recipes)]
    if table.versions:
        lines += ["", "Evaluator: " + ", ".join(table.versions) + ". Decoding: greedy; settings per row in the table."]
    return "\n".join(lines) + "\n"


def render_png(table: ReportTable, path: str | Path, *, title: str = "Evaluation report") -> Path:
    """The same table as a heatmap (models × tasks, then Avg), capability groups marked above the columns."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = [t for _, t in table.columns]
    grid = np.array(
        [[np.nan if r.values[k] is None else r.values[k] for k in keys] + [np.nan if r.average is None else r.average]
         for r in table.rows],
        dtype=float,
    ).reshape(len(table.rows), len(keys) + 1)  # fmt: skip
    n_rows, n_cols = grid.shape
    fig, ax = plt.subplots(figsize=(max(6.0, 1.0 * n_cols + 2.5), max(2.5, 0.5 * n_rows + 2.0)))
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for i in range(n_rows):
        for j in range(n_cols):
            value = grid[i, j]
            text = "–" if np.isnan(value) else f"{value:.1f}"
            if j == n_cols - 1 and not table.rows[i].complete and not np.isnan(value):
                text += " †"
            light_cell = np.isnan(value) or value > 60
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="black" if light_cell else "white")
    ax.set_xticks(range(n_cols), keys + ["Avg"], rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(n_rows), [f"{r.model} ({r.role})" for r in table.rows], fontsize=8)
    # Capability groups: a label above each group and a line between groups; a line before Avg.
    groups: list[tuple[str, int, int]] = []
    for j, (cap, _) in enumerate(table.columns):
        if groups and groups[-1][0] == cap:
            groups[-1] = (cap, groups[-1][1], j)
        else:
            groups.append((cap, j, j))
    for cap, first, last in groups:
        ax.text((first + last) / 2, -0.7, cap, ha="center", va="bottom", fontsize=9, fontweight="bold")
        ax.axvline(last + 0.5, color="white", linewidth=2)
    for i in range(1, n_rows):
        if table.rows[i].role != table.rows[i - 1].role:
            ax.axhline(i - 0.5, color="white", linewidth=2)
    ax.set_ylim(n_rows - 0.5, -1.2)
    ax.set_title(title, pad=8)
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.02, label="score ×100")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def write_report(results: str | Path, out_dir: str | Path | None = None, *, roles: Mapping[str, str] | None = None,
                 suite: Suite | str | None = None, title: str = "Evaluation report",
                 models: Sequence[str] | None = None) -> tuple[Path, Path]:  # fmt: skip
    """Write ``report.md`` and ``report.png`` for a results directory (or a ``results.parquet`` file).

    Args:
        results: Results directory or Parquet file.
        out_dir: Where to write (default: beside the results).
        roles: Role overrides by model name.
        suite: Task order within capabilities (``build_report_table``).
        title: Report title.
        models: Report only these models, in this order within each role (default: every model, as the
            results list them).

    Returns:
        Paths of the Markdown file and the PNG.

    Raises:
        EvaluationError: No results there.
    """
    import pyarrow.parquet as pq

    from omnimerge.engine.errors import EvaluationError

    results = Path(results).expanduser()
    if results.is_dir():
        rows = ResultsStore(results).commit().to_pylist() if (results / "predictions").is_dir() else []
        source = results / "results.parquet"
    elif results.is_file():
        rows, source = pq.read_table(results).to_pylist(), results
    else:
        rows, source = [], results
    if models is not None:  # these models' rows, in this order within each role
        order = {name: i for i, name in enumerate(models)}
        rows = sorted((r for r in rows if r["model"] in order), key=lambda r: order[r["model"]])
    if not rows:
        raise EvaluationError(
            f"No evaluation results at '{results}'; run `omnimerge eval MODEL... --suite SUITE -o {results}` first."
        )
    out = Path(out_dir).expanduser() if out_dir else (results if results.is_dir() else results.parent)
    out.mkdir(parents=True, exist_ok=True)
    table = build_report_table(rows, roles=roles, suite=suite)
    md_path = out / "report.md"
    md_path.write_text(render_markdown(table, title=title, source=str(source)))
    png_path = render_png(table, out / "report.png", title=title)
    logger.info("report written: %s, %s", md_path, png_path)
    return md_path, png_path
