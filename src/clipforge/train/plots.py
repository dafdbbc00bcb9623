"""Plots of a training run (from its ``metrics.jsonl``)."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from clipforge._util.fileio import atomic_path
from clipforge.train.metrics_log import read_metrics


def loss_curve(run_dir: Path, path: Path) -> Path:
    rows = [row for row in read_metrics(run_dir) if "loss" in row]
    figure = Figure(figsize=(6, 3.5), dpi=110)
    axes = figure.add_subplot()
    axes.plot([r["step"] for r in rows], [r["loss"] for r in rows], color="tab:blue")
    axes.set(xlabel="step", ylabel="contrastive loss", title="training loss")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return path
