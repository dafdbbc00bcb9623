"""OOD scores beside MCM: MSP, energy, max-logit, and CLIPN's CTW and ATD; every score is higher for ID.

All take class logits ``100 · cos(image, class)`` (CLIP's scale), rows = images:

- MSP (Hendrycks & Gimpel, ICLR 2017): ``max_c softmax(logits)_c``;
- max-logit (Hendrycks et al., ICML 2022): ``max_c logits_c``;
- energy (Liu et al., NeurIPS 2020): ``T · logsumexp(logits / T)`` (the negative free energy), T = 1;
- CTW and ATD (Wang et al., "CLIPN for Zero-Shot OOD Detection: Teaching CLIP to Say No", ICCV 2023;
  xmed-lab/CLIPN ``src/zero_shot_infer.py``) from the "yes" logits and the "no" logits of the same images
  against the no-encoder's class embeddings: ``p_yes_c = softmax([yes_c, no_c])_0`` per class;
  competing-to-win ``CTW = p_yes`` of the class the yes logits pick (OOD when below 0.5) and
  agreeing-to-differ ``ATD = Σ_c softmax(yes)_c · p_yes_c`` (= 1 − p_ood). The official code thresholds both
  rules; as AUROC scores they are used directly, as the paper's ROC curves do.

MCM is ``clipforge.eval.ood.mcm_score`` (raw cosines at T = 1).
"""

from __future__ import annotations

import torch

from clipforge.errors import InputError
from clipforge.eval.metrics import ArrayLike, as_float_tensor


def msp_score(logits: ArrayLike) -> torch.Tensor:
    """Maximum softmax probability per row."""
    return torch.softmax(as_float_tensor(logits, "logits", 2), dim=-1).amax(dim=-1)


def max_logit_score(logits: ArrayLike) -> torch.Tensor:
    """The largest logit per row."""
    return as_float_tensor(logits, "logits", 2).amax(dim=-1)


def energy_score(logits: ArrayLike, temperature: float = 1.0) -> torch.Tensor:
    """``T · logsumexp(logits / T)`` per row: the negative energy, higher for ID."""
    if temperature <= 0:
        raise InputError(f"temperature: expected a positive number, got {temperature}")
    return temperature * torch.logsumexp(as_float_tensor(logits, "logits", 2) / temperature, dim=-1)


def yes_probabilities(yes_logits: ArrayLike, no_logits: ArrayLike) -> torch.Tensor:
    """CLIPN's per-class "yes" probability ``softmax([yes, no])_0`` = ``sigmoid(yes − no)`` [N, C]."""
    yes = as_float_tensor(yes_logits, "yes_logits", 2)
    no = as_float_tensor(no_logits, "no_logits", 2).to(yes.device)
    if yes.shape != no.shape:
        raise InputError(f"no_logits: shape {tuple(no.shape)} differs from yes_logits {tuple(yes.shape)}")
    return torch.sigmoid(yes - no)


def ctw_score(yes_logits: ArrayLike, no_logits: ArrayLike) -> torch.Tensor:
    """Competing-to-win: the yes-probability of the class the yes logits rank first [N]."""
    p_yes = yes_probabilities(yes_logits, no_logits)
    winner = as_float_tensor(yes_logits, "yes_logits", 2).argmax(dim=-1, keepdim=True)
    return p_yes.gather(1, winner.to(p_yes.device)).squeeze(1)


def atd_score(yes_logits: ArrayLike, no_logits: ArrayLike) -> torch.Tensor:
    """Agreeing-to-differ: ``1 − p_ood = Σ_c softmax(yes)_c · p_yes_c`` [N]."""
    p_yes = yes_probabilities(yes_logits, no_logits)
    p_class = torch.softmax(as_float_tensor(yes_logits, "yes_logits", 2), dim=-1).to(p_yes.device)
    return (p_class * p_yes).sum(dim=-1)
