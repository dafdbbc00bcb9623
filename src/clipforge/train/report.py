"""A training run's report: loss curve, accuracy table and a grid of example retrievals (PNG + markdown)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
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


@torch.inference_mode()
def retrieval_grid(model: Any, queries: Sequence[str], images: Sequence[Any], image_features: torch.Tensor, path: Path, k: int = 5) -> Path:
    """For each text query, its top-k images with their similarity."""
    device = next(model.parameters()).device
    text = model.encode_text(model.tokenize(list(queries)).to(device), normalize=True).float().cpu()
    scores = text @ torch.nn.functional.normalize(image_features.float().cpu(), dim=-1).T
    top = scores.topk(k, dim=1)
    figure = Figure(figsize=(1.6 * k + 2.2, 1.7 * len(queries)), dpi=110)
    for row, query in enumerate(queries):
        for col in range(k):
            axes = figure.add_subplot(len(queries), k, row * k + col + 1)
            axes.imshow(images[int(top.indices[row, col])])
            axes.set_xticks([])
            axes.set_yticks([])
            axes.set_title(f"{float(top.values[row, col]):.2f}", fontsize=7)
            if col == 0:
                axes.set_ylabel(query, fontsize=8, rotation=0, ha="right", va="center")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return path


def write_markdown(path: Path, title: str, figures: dict[str, Any], images: dict[str, str]) -> Path:
    lines = [f"# {title}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in figures.items()]
    lines.append("")
    lines += [f"![{name}]({file})" for name, file in images.items()]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path
