"""Linear probe on frozen image features, with the CLIP paper's protocol.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", 2021,
Appendix A.3: L-BFGS logistic regression (scikit-learn, max_iter 1000); the L2 strength is chosen on
a validation split by a parametric binary search over [1e-6, 1e6] that starts from the decades
1e-6, 1e-4, ..., 1e6 and refines to 8 steps per decade; the final classifier is refitted on
train + validation. The search mirrors LAION-AI/CLIP_benchmark ``metrics/linear_probe.py``
(``find_peak`` over a 97-point log grid, spans 8, 4, 2, 1), here on scikit-learn's C = 1 / lambda.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from clipforge.errors import InputError
from clipforge.eval.metrics import (
    ArrayLike,
    as_float_tensor,
    as_label_tensor,
    classification_metrics,
)

CLIP_C_GRID = np.logspace(-6, 6, 97)  # 12 decades at 8 steps per decade
_COARSE_STRIDE = 16  # every second decade: the 7 starting points of the CLIP search
_FIRST_REFINE_SPAN = 8


@dataclass(frozen=True)
class LinearProbeResult:
    """Test metrics of the refitted probe (CLIP_benchmark's ``lp_*`` names) and the C search."""

    lp_acc1: float
    lp_acc5: float  # NaN with fewer than 5 classes
    lp_mean_per_class_recall: float
    C: float
    val_accuracy_by_c: dict[float, float] = field(repr=False)  # every C tried, in the order tried

    def metrics(self) -> dict[str, float]:
        """The figures to report: ``lp_acc1``, ``lp_acc5``, ``lp_mean_per_class_recall``, ``C``."""
        return {
            "lp_acc1": self.lp_acc1,
            "lp_acc5": self.lp_acc5,
            "lp_mean_per_class_recall": self.lp_mean_per_class_recall,
            "C": self.C,
        }


def _split_arrays(features: ArrayLike, labels: ArrayLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    feature_tensor = as_float_tensor(features, f"{split}_features", 2)
    label_tensor = as_label_tensor(labels, f"{split}_labels")
    if len(label_tensor) != len(feature_tensor):
        raise InputError(
            f"{split}_labels: has {len(label_tensor)} entries but {split}_features has {len(feature_tensor)} rows"
        )
    return feature_tensor.detach().cpu().numpy(), label_tensor.cpu().numpy()


def fit_logistic(features: np.ndarray, labels: np.ndarray, c: float, max_iter: int = 1000) -> LogisticRegression:
    """L-BFGS multinomial logistic regression with L2 strength 1 / ``c`` (scikit-learn)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # large C on separable data stops at max_iter
        return LogisticRegression(C=c, solver="lbfgs", max_iter=max_iter).fit(features, labels)


def _search_c(val_accuracy: Callable[[float], float], c_values: Sequence[float] | None) -> tuple[float, dict[float, float]]:
    """The C with the best validation accuracy and every C tried.

    Without ``c_values``: CLIP's coarse-to-fine search on ``CLIP_C_GRID``; with them: all of them.
    Ties go to the largest C (weakest regularisation), as in CLIP_benchmark's ``find_peak``.
    """
    grid = CLIP_C_GRID if c_values is None else np.unique(np.asarray(c_values, dtype=np.float64))
    if grid.size == 0 or (grid <= 0).any():
        raise InputError(f"c_values: expected positive numbers, got {c_values}")
    tried: dict[int, float] = {}

    def best(indices: Sequence[int]) -> int:
        for index in indices:
            if index not in tried:
                tried[index] = val_accuracy(float(grid[index]))
        return max(indices, key=lambda index: (tried[index], index))

    if c_values is not None:
        peak = best(range(len(grid)))
    else:
        peak = best(range(0, len(grid), _COARSE_STRIDE))
        span = _FIRST_REFINE_SPAN
        while span > 0:
            peak = best([max(peak - span, 0), peak, min(peak + span, len(grid) - 1)])
            span //= 2
    return float(grid[peak]), {float(grid[index]): accuracy for index, accuracy in tried.items()}


def choose_c(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    c_values: Sequence[float] | None = None,
    max_iter: int = 1000,
) -> tuple[float, dict[float, float]]:
    """The C whose probe fitted on train scores best on validation (CLIP's search, or among ``c_values``), and
    the validation accuracy of every C tried."""
    return _search_c(lambda c: fit_logistic(train_x, train_y, c, max_iter).score(val_x, val_y), c_values)


def linear_probe(
    train_features: ArrayLike,
    train_labels: ArrayLike,
    val_features: ArrayLike | None,
    val_labels: ArrayLike | None,
    test_features: ArrayLike,
    test_labels: ArrayLike,
    *,
    c_values: Sequence[float] | None = None,
    val_proportion: float = 0.2,
    seed: int = 0,
    max_iter: int = 1000,
) -> LinearProbeResult:
    """Choose C on validation accuracy, refit on train + validation, score on test.

    Features are used as given (normalise them beforehand if wanted). Without a validation split
    (``val_features=val_labels=None``) a stratified ``val_proportion`` of train, drawn with ``seed``,
    is held out for the search. Labels are class ids 0..C-1 shared by all splits.
    """
    train_x, train_y = _split_arrays(train_features, train_labels, "train")
    test_x, test_y = _split_arrays(test_features, test_labels, "test")
    if (val_features is None) != (val_labels is None):
        raise InputError("val_features and val_labels: give both or neither")
    if val_features is None:
        try:
            train_x, val_x, train_y, val_y = train_test_split(
                train_x, train_y, test_size=val_proportion, stratify=train_y, random_state=seed
            )
        except ValueError as error:
            raise InputError(f"train_labels: cannot hold out a stratified validation split ({error})") from None
    else:
        val_x, val_y = _split_arrays(val_features, val_labels, "val")
    for split, features in (("val", val_x), ("test", test_x)):
        if features.shape[1] != train_x.shape[1]:
            raise InputError(
                f"{split}_features: dimension {features.shape[1]} differs from train_features {train_x.shape[1]}"
            )

    best_c, val_accuracy_by_c = choose_c(train_x, train_y, val_x, val_y, c_values, max_iter)
    probe = fit_logistic(np.concatenate([train_x, val_x]), np.concatenate([train_y, val_y]), best_c, max_iter)

    num_classes = int(max(train_y.max(), val_y.max(), test_y.max())) + 1
    test_scores = torch.full((len(test_x), num_classes), float("-inf"), dtype=torch.float64)
    test_scores[:, torch.as_tensor(probe.classes_)] = torch.as_tensor(probe.predict_log_proba(test_x))
    metrics = classification_metrics(test_scores, test_y)
    return LinearProbeResult(
        lp_acc1=metrics["acc1"],
        lp_acc5=metrics["acc5"],
        lp_mean_per_class_recall=metrics["mean_per_class_recall"],
        C=best_c,
        val_accuracy_by_c=val_accuracy_by_c,
    )
