"""The linear probe of CLIP's protocol on few-shot features (issue #4's probe, as a head).

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", ICML 2021, App. A.3;
the few-shot version of CoOp's repository (KaiyangZhou/CoOp ``lpclip/linear_probe.py``): L-BFGS logistic
regression (scikit-learn), C chosen on the few-shot validation set (min(K, 4) images per class) by CLIP's
search (``clipforge.eval.linear_probe.choose_c``), then refitted on the training shots.

Differences: features are the L2-normalised embeddings of ``clipforge.encode`` (lpclip uses the unnormalised
output of the image tower); the final probe is refitted on the training shots only, so that, as for every
other method here, validation images choose hyper-parameters and never train; without validation shots C = 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from clipforge.adapt.method import (
    AT_LEAST_ONE,
    POSITIVE,
    FitInputs,
    Fitted,
    Head,
    Method,
    Range,
    Saved,
)
from clipforge.adapt.selection import validation
from clipforge.eval.linear_probe import choose_c, fit_logistic


@dataclass(frozen=True)
class LinearProbeSettings:
    default_c: float = 1.0
    max_iter: int = 1000

    RANGES: ClassVar[dict[str, Range]] = {"default_c": POSITIVE, "max_iter": AT_LEAST_ONE}


class LinearHead(Head):
    """``f Wᵀ + b``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight.float())
        self.register_buffer("bias", bias.float())

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.weight.T + self.bias


def fit_linear_probe(inputs: FitInputs, settings: LinearProbeSettings) -> Fitted:
    train = inputs.shots.train
    x, y = inputs.cache.plain(train).double().numpy(), torch.as_tensor(train.labels).numpy()
    classes = len(inputs.text)
    c, tried = settings.default_c, {}
    found = validation(inputs)
    if found is not None:
        c, tried = choose_c(x, y, found[0].double().numpy(), found[1].numpy(), max_iter=settings.max_iter)
    probe = fit_logistic(x, y, c, settings.max_iter)
    weight, bias = torch.zeros(classes, x.shape[1]), torch.full((classes,), -1e4)  # classes without shots never win
    weight[probe.classes_] = torch.as_tensor(probe.coef_, dtype=torch.float32)
    bias[probe.classes_] = torch.as_tensor(probe.intercept_, dtype=torch.float32)
    return Fitted({"weight": weight, "bias": bias}, {"C": c, "val_acc": tried.get(c, float("nan"))})


def rebuild(saved: Saved) -> Head:
    return LinearHead(saved.tensors["weight"], saved.tensors["bias"])


LINEAR_PROBE = Method("linear-probe", "head", LinearProbeSettings, fit_linear_probe, rebuild,
                      "logistic regression on frozen features, C on validation (Radford et al., ICML 2021)",
                      uses_validation=True)
