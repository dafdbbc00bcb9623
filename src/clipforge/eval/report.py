"""The evaluation report: one markdown and one HTML page with every task's figures, tables and plots.

Each ``TaskResult`` (see ``clipforge.eval.results``) becomes a section: its metrics, its extra tables
(corruption × severity, distribution shifts, ...) and its PNG plots (confusion matrix, reliability
diagrams, ROC curve, robustness curves), referenced by file name so the pages stay next to them.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from clipforge._util.fileio import atomic_path
from clipforge.eval.results import Table, TaskResult

HEADLINE_METRICS: dict[str, tuple[str, ...]] = {
    "zeroshot_classification": ("acc1", "acc5", "mean_per_class_recall"),
    "zeroshot_retrieval": (
        "image_retrieval_recall@1",
        "image_retrieval_recall@5",
        "text_retrieval_recall@1",
        "text_retrieval_recall@5",
    ),
    "linear_probe": ("lp_acc1", "lp_mean_per_class_recall"),
    "robustness": ("acc1_clean", "mean_corruption_acc", "mean_shift_acc"),
    "ood_detection": ("auroc", "fpr95"),
    "calibration": ("ece_before", "ece_after", "temperature"),
}
"""The figures the one-table summary shows per task (every figure is in the JSON and the report)."""


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def headline_rows(results: Sequence[TaskResult]) -> list[list[str]]:
    """``[dataset, task, metric, value]`` rows of the headline figures of every result."""
    rows = []
    for result in results:
        for key in HEADLINE_METRICS.get(result.task, tuple(result.metrics)):
            if key in result.metrics:
                rows.append([result.dataset, result.task, key, format_value(result.metrics[key])])
    return rows


def confusion_matrix_plot(matrix: np.ndarray, classnames: Sequence[str], path: str | Path) -> Path:
    """Row-normalised confusion matrix (true class down, predicted class across) as a PNG."""
    counts = np.asarray(matrix, dtype=np.float64)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = min(12.0, 2.5 + 0.3 * len(classnames))
    figure = Figure(figsize=(side, side))
    axes = figure.add_subplot()
    image = axes.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(classnames))
    font = max(4, 9 - len(classnames) // 10)
    axes.set_xticks(ticks, classnames, rotation=90, fontsize=font)
    axes.set_yticks(ticks, classnames, fontsize=font)
    axes.set(xlabel="predicted class", ylabel="true class", title="Confusion matrix (row-normalised)")
    figure.colorbar(image, ax=axes, fraction=0.046)
    figure.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    return path


def _metric_table(result: TaskResult) -> Table:
    return Table("metrics", ["metric", "value"], [[key, value] for key, value in result.metrics.items()])


def _markdown_table(table: Table) -> list[str]:
    lines = [f"**{table.title}**", "", "| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(format_value(cell) for cell in row) + " |" for row in table.rows]
    return [*lines, ""]


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(str(column))}</th>" for column in table.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(format_value(cell))}</td>" for cell in row) + "</tr>" for row in table.rows
    )
    return f"<h4>{html.escape(table.title)}</h4><table><tr>{head}</tr>{body}</table>"


def write_report(results: Sequence[TaskResult], out_dir: str | Path, title: str) -> tuple[Path, Path]:
    """``report.md`` and ``report.html`` in ``out_dir``; plots are linked by their path relative to it."""
    out_dir = Path(out_dir)
    markdown = [f"# {title}", ""]
    sections = [f"<h1>{html.escape(title)}</h1>"]
    for result in results:
        heading = f"{result.dataset} — {result.task}"
        tables = [_metric_table(result), *result.tables]
        markdown += [f"## {heading}", ""]
        sections.append(f"<h2>{html.escape(heading)}</h2>")
        for table in tables:
            markdown += _markdown_table(table)
            sections.append(_html_table(table))
        for caption, plot in result.plots.items():
            relative = Path(os.path.relpath(Path(plot).resolve(), out_dir.resolve())).as_posix()
            markdown += [f"![{caption}]({relative})", ""]
            sections.append(f'<figure><img src="{html.escape(relative)}" alt="{html.escape(caption)}">'
                            f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    style = "body{font-family:sans-serif;max-width:60em;margin:auto}table{border-collapse:collapse}" \
            "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}img{max-width:100%}"
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>" \
           f"<style>{style}</style></head><body>{''.join(sections)}</body></html>\n"
    markdown_path, html_path = out_dir / "report.md", out_dir / "report.html"
    with atomic_path(markdown_path) as tmp:
        tmp.write_text("\n".join(markdown) + "\n", encoding="utf-8")
    with atomic_path(html_path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return markdown_path, html_path
