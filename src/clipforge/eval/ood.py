"""Out-of-distribution detection: the MCM score and threshold-free detection metrics (AUROC, AUPR-In, FPR95).

MCM: Ming, Cai, Gu, Sun, Li, "Delving into Out-of-Distribution Detection with Vision-Language
Representations", NeurIPS 2022 (deeplearning-wisc/MCM, ``utils/detection_util.py``). Metrics follow
that repository's convention: in-distribution (ID) is the positive class and a higher score means
"more in-distribution". FPR at a TPR uses the first ROC point whose TPR reaches the target (the
OpenOOD convention, no interpolation between ROC points). The other scores (MSP, energy, max-logit, CLIPN's
CTW and ATD) are in ``clipforge.eval.ood_scores``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from clipforge._util.fileio import atomic_path
from clipforge.errors import InputError
from clipforge.eval.metrics import ArrayLike, as_float_tensor


def mcm_score(image_features: ArrayLike, class_text_features: ArrayLike, temperature: float = 1.0) -> torch.Tensor:
    """Maximum Concept Matching: ``max_c softmax_c(cos(image, text_c) / temperature)`` per image.

    ``class_text_features`` (C, D) embed one prompt per ID class (the paper: "a photo of a <class>").
    The cosines are NOT multiplied by CLIP's logit scale: the paper's default temperature is T = 1
    on raw cosines, which beats CLIP's x100 (T = 0.01) and the plain maximum cosine. Returns (N,).
    """
    if temperature <= 0:
        raise InputError(f"temperature: expected a positive number, got {temperature}")
    images = F.normalize(as_float_tensor(image_features, "image_features", 2), dim=-1)
    texts = F.normalize(as_float_tensor(class_text_features, "class_text_features", 2), dim=-1)
    texts = texts.to(images.device, images.dtype)
    if texts.shape[1] != images.shape[1]:
        raise InputError(f"class_text_features: dimension {texts.shape[1]} differs from image_features {images.shape[1]}")
    return torch.softmax(images @ texts.T / temperature, dim=-1).amax(dim=-1)


def roc_points(id_scores: ArrayLike, ood_scores: ArrayLike) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fpr, tpr, thresholds) of the ROC curve with ID as positive, one point per distinct score.

    Point i accepts every sample with score >= thresholds[i]; a first point (0, 0) with threshold
    +inf is prepended, as scikit-learn's ``roc_curve``.
    """
    positives = as_float_tensor(id_scores, "id_scores", 1).double()
    negatives = as_float_tensor(ood_scores, "ood_scores", 1).double().to(positives.device)
    scores, order = torch.cat([positives, negatives]).sort(descending=True, stable=True)
    is_positive = (order < len(positives)).double()
    last_of_each_value = torch.cat([scores[1:] != scores[:-1], scores.new_ones(1, dtype=torch.bool)])
    true_positives = is_positive.cumsum(0)[last_of_each_value]
    false_positives = (1 - is_positive).cumsum(0)[last_of_each_value]
    start = scores.new_zeros(1)
    tpr = torch.cat([start, true_positives / len(positives)])
    fpr = torch.cat([start, false_positives / len(negatives)])
    thresholds = torch.cat([scores.new_full((1,), float("inf")), scores[last_of_each_value]])
    return fpr, tpr, thresholds


def auroc(id_scores: ArrayLike, ood_scores: ArrayLike) -> float:
    """Area under the ROC curve (ID positive): P(ID score > OOD score), ties counting one half."""
    fpr, tpr, _ = roc_points(id_scores, ood_scores)
    return torch.trapezoid(tpr, fpr).item()


def aupr_in(id_scores: ArrayLike, ood_scores: ArrayLike) -> float:
    """Average precision with ID as positive (AUPR-In): ``Σ_k (R_k − R_{k−1}) · P_k`` over the distinct
    thresholds, highest first (scikit-learn's ``average_precision_score``, no interpolation)."""
    fpr, tpr, _ = roc_points(id_scores, ood_scores)
    positives, negatives = len(torch.as_tensor(id_scores)), len(torch.as_tensor(ood_scores))
    true_positives, false_positives = tpr[1:] * positives, fpr[1:] * negatives
    precision = true_positives / (true_positives + false_positives)
    return float(((tpr[1:] - tpr[:-1]) * precision).sum())


def fpr_at_tpr(id_scores: ArrayLike, ood_scores: ArrayLike, tpr: float = 0.95) -> float:
    """Fraction of OOD samples accepted at the highest threshold that accepts at least ``tpr`` of ID.

    With ``tpr=0.95`` this is FPR95, the standard OOD detection metric (lower is better).
    """
    if not 0 < tpr <= 1:
        raise InputError(f"tpr: expected a rate in (0, 1], got {tpr}")
    fpr_points, tpr_points, _ = roc_points(id_scores, ood_scores)
    return fpr_points[_first_point_reaching(tpr_points, tpr)].item()


def _first_point_reaching(tpr_points: torch.Tensor, tpr: float) -> int:
    return int(torch.nonzero(tpr_points >= tpr)[0])


def roc_curve_plot(id_scores: ArrayLike, ood_scores: ArrayLike, path: str | Path) -> Path:
    """Save the ROC curve (ID positive) with its AUROC and FPR95 as a PNG."""
    fpr, tpr, _ = roc_points(id_scores, ood_scores)
    area = torch.trapezoid(tpr, fpr).item()
    at_95 = _first_point_reaching(tpr, 0.95)
    figure = Figure(figsize=(5, 5))
    axes = figure.add_subplot()
    axes.plot(fpr.cpu().numpy(), tpr.cpu().numpy(), label=f"ROC (AUROC = {area:.4f})")
    axes.plot([0, 1], [0, 1], linestyle="--", color="gray", label="chance")
    fpr95, tpr95 = fpr[at_95].item(), tpr[at_95].item()
    axes.scatter([fpr95], [tpr95], color="tab:red", zorder=3, label=f"FPR95 = {fpr95:.4f}")
    axes.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate (OOD accepted)")
    axes.set_ylabel("true positive rate (ID accepted)")
    axes.set_title("OOD detection ROC")
    axes.legend(loc="lower right")
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    return path
