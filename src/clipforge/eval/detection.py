"""Detection metrics for real-vs-altered detectors (DeeCLIP; Yermakov, Čech, Matas, "Unlocking the Hidden
Potential of CLIP in Generalizable Deepfake Detection", 2025): AUROC, accuracy at the decision threshold, and
accuracy at the threshold that flags a fixed fraction of real images (FPR), altered = positive."""

from __future__ import annotations

import torch

from clipforge.errors import InputError
from clipforge.eval.metrics import ArrayLike, as_float_tensor
from clipforge.eval.ood import auroc


def detection_metrics(scores: ArrayLike, labels: ArrayLike, threshold: float = 0.0, fpr: float = 0.05) -> dict[str, float]:
    """``scores`` [N] (higher = altered; a logit difference, so ``threshold`` 0 is p = 1/2) and ``labels``
    (1 = altered, 0 = real) → ``auroc``, ``acc`` (score > threshold) and ``acc_at_fpr``: the accuracy when the
    threshold is the smallest score that flags at most ``fpr`` of the real images."""
    values = as_float_tensor(scores, "scores", 1).double()
    truth = torch.as_tensor(labels).to(values.device)
    if truth.shape != values.shape or not bool(((truth == 0) | (truth == 1)).all()):
        raise InputError(f"labels: expected {len(values)} labels of 0 (real) or 1 (altered)")
    real, altered = values[truth == 0], values[truth == 1]
    if len(real) == 0 or len(altered) == 0:
        raise InputError("labels: detection metrics need both real (0) and altered (1) images")
    if not 0 <= fpr < 1:
        raise InputError(f"fpr: expected a rate in [0, 1), got {fpr}")
    ordered = real.sort(descending=True).values
    allowed = int(fpr * len(real))  # real images that may score above the threshold
    cut = ordered[allowed]  # flag strictly above the (allowed+1)-th highest real score
    accuracy_at = ((altered > cut).sum() + (real <= cut).sum()).item() / len(values)
    accuracy = ((altered > threshold).sum() + (real <= threshold).sum()).item() / len(values)
    return {"auroc": auroc(altered, real), "acc": accuracy, "acc_at_fpr": accuracy_at, "fpr_target": fpr}
