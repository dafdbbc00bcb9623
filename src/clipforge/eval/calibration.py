"""Calibration: expected calibration error, temperature scaling and reliability diagrams.

Guo, Pleiss, Sun, Weinberger, "On Calibration of Modern Neural Networks", ICML 2017: confidence is
the maximum softmax probability, ECE bins it into equal-width intervals (lower, upper] and sums
|accuracy - confidence| weighted by the fraction of samples in each bin; temperature scaling divides
the logits by one scalar T > 0 fitted by minimising the negative log-likelihood on held-out data.
CLIP's logits are ``100 * cos``, so ECE depends strongly on that scale: report it before and after
temperature scaling.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from clipforge._util.fileio import atomic_path
from clipforge.errors import InputError
from clipforge.eval.metrics import ArrayLike, scores_and_labels

_ROW_SUM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class ConfidenceBins:
    """Per-bin statistics of equal-width confidence bins (empty bins have accuracy = confidence = 0)."""

    edges: torch.Tensor  # (n_bins + 1,) from 0 to 1
    counts: torch.Tensor  # (n_bins,) samples whose confidence falls in (edges[b], edges[b + 1]]
    accuracy: torch.Tensor  # (n_bins,) fraction of those whose argmax is the target
    confidence: torch.Tensor  # (n_bins,) their mean maximum probability


def confidence_bins(probs: ArrayLike, targets: ArrayLike, n_bins: int = 15) -> ConfidenceBins:
    """Bin samples by maximum probability into ``n_bins`` equal-width intervals (lower, upper]."""
    if n_bins < 1:
        raise InputError(f"n_bins: expected a positive integer, got {n_bins}")
    probs, targets = scores_and_labels(probs, targets, scores_name="probs")
    probs = probs.double()
    row_sums = probs.sum(dim=1)
    if probs.min() < 0 or probs.max() > 1 or (row_sums - 1).abs().max() > _ROW_SUM_TOLERANCE:
        raise InputError(
            f"probs: rows must be probability vectors (apply softmax to logits first); "
            f"values span {probs.min().item():.3g}..{probs.max().item():.3g}, row sums "
            f"{row_sums.min().item():.3g}..{row_sums.max().item():.3g}"
        )
    confidence, predictions = probs.max(dim=1)
    correct = (predictions == targets).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64, device=probs.device)
    bin_index = torch.bucketize(confidence, edges[1:-1])  # right=False: edges[b] < conf <= edges[b + 1]
    counts = torch.bincount(bin_index, minlength=n_bins)
    filled = counts.clamp(min=1).double()
    accuracy = torch.bincount(bin_index, weights=correct, minlength=n_bins) / filled
    mean_confidence = torch.bincount(bin_index, weights=confidence, minlength=n_bins) / filled
    return ConfidenceBins(edges=edges, counts=counts, accuracy=accuracy, confidence=mean_confidence)


def _expected_calibration_error(bins: ConfidenceBins) -> float:
    weights = bins.counts.double() / bins.counts.sum()
    return (weights * (bins.accuracy - bins.confidence).abs()).sum().item()


def expected_calibration_error(probs: ArrayLike, targets: ArrayLike, n_bins: int = 15) -> float:
    """ECE = sum_b |B_b| / n * |acc(B_b) - conf(B_b)| over equal-width confidence bins (Guo et al. 2017)."""
    return _expected_calibration_error(confidence_bins(probs, targets, n_bins))


def fit_temperature(logits: ArrayLike, targets: ArrayLike, max_iter: int = 100) -> float:
    """Temperature T > 0 minimising the NLL of ``softmax(logits / T)`` (Guo et al. 2017, Sec. 4.2).

    L-BFGS with a strong-Wolfe line search on log T, which keeps T positive, starting from T = 1.
    Fit it on held-out (validation) logits, then divide test logits by it.
    """
    logits, targets = scores_and_labels(logits, targets)
    logits = logits.detach().double()
    log_temperature = torch.zeros((), dtype=torch.float64, device=logits.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_temperature], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def negative_log_likelihood() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_temperature.exp(), targets)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(negative_log_likelihood)
    return log_temperature.exp().item()


def reliability_diagram(probs: ArrayLike, targets: ArrayLike, path: str | Path, n_bins: int = 15) -> Path:
    """Save a reliability diagram (accuracy per confidence bin against the diagonal) as a PNG."""
    bins = confidence_bins(probs, targets, n_bins)
    edges = bins.edges.cpu().numpy()
    accuracy = bins.accuracy.cpu().numpy()
    confidence = bins.confidence.cpu().numpy()
    filled = bins.counts.cpu().numpy() > 0
    width = 1.0 / n_bins

    figure = Figure(figsize=(5, 5))
    axes = figure.add_subplot()
    axes.bar(edges[:-1][filled], accuracy[filled], width=width, align="edge", edgecolor="black", label="accuracy")
    axes.bar(
        edges[:-1][filled], (confidence - accuracy)[filled], bottom=accuracy[filled], width=width, align="edge",
        color="tab:red", alpha=0.3, edgecolor="tab:red", label="gap to confidence",
    )
    axes.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    axes.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy")
    axes.set_title(f"Reliability diagram (ECE = {_expected_calibration_error(bins):.4f}, {n_bins} bins)")
    axes.legend(loc="upper left")
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    return path
