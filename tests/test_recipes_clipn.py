"""CLIPN (Wang et al., ICCV 2023) and the OOD scores beside MCM, against the papers' equations written out here.

The losses are computed with explicit loops over image–caption pairs (values and gradients); CTW and ATD with
per-class two-way softmaxes; MSP, energy and max-logit with numpy/scipy; AUPR-In with scikit-learn.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import sklearn.metrics as skm
import torch
import torch.nn.functional as F
from scipy.special import logsumexp, softmax

from clipforge.adapt.adapter_file import read_adapter
from clipforge.adapt.clipn import (
    NoTextEncoder,
    clipn_losses,
    fit_clipn,
    load_no_encoder,
)
from clipforge.errors import CheckpointError
from clipforge.eval.datasets import synthetic_task
from clipforge.eval.ood import aupr_in
from clipforge.eval.ood_scores import (
    atd_score,
    ctw_score,
    energy_score,
    max_logit_score,
    msp_score,
)
from clipforge.eval.runner import Evaluator
from clipforge.eval.zeroshot import zero_shot_head


def paper_losses(f, g, g_no, s):
    """The image–text binary-opposite and text semantic-opposite losses, one pair at a time."""
    n = len(f)
    yes_terms, no_terms, tso_terms = [], [], []
    for i in range(n):
        for j in range(n):
            a, b = s * torch.dot(f[i], g[j]), s * torch.dot(f[i], g_no[j])
            p_yes = torch.exp(a) / (torch.exp(a) + torch.exp(b))
            (yes_terms if i == j else no_terms).append(-torch.log(p_yes if i == j else 1 - p_yes))
    for j in range(n):
        tso_terms.append(2 - torch.sqrt(torch.sum((g[j] - g_no[j]) ** 2) + 1e-4))
    return sum(yes_terms) / n, sum(no_terms) / (n * n - n), sum(tso_terms) / n


def test_clipn_losses_equal_the_papers_equations_values_and_gradients() -> None:
    torch.manual_seed(0)
    raw = [torch.randn(6, 5, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    ours = clipn_losses(*(F.normalize(x, dim=-1) for x in raw), 2.5)
    ours_grads = torch.autograd.grad(sum(ours), raw)
    theirs = paper_losses(*(F.normalize(x, dim=-1) for x in raw), 2.5)
    their_grads = torch.autograd.grad(sum(theirs), raw)
    for a, b in zip(ours, theirs, strict=True):
        assert a.item() == pytest.approx(b.item(), rel=1e-9)
    for a, b in zip(ours_grads, their_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_ctw_and_atd_equal_a_direct_computation() -> None:
    rng = np.random.default_rng(0)
    yes, no = rng.normal(0, 3, size=(7, 4)), rng.normal(0, 3, size=(7, 4))
    ctw, atd = [], []
    for row_yes, row_no in zip(yes, no, strict=True):
        p_yes = [math.exp(a) / (math.exp(a) + math.exp(b)) for a, b in zip(row_yes, row_no, strict=True)]
        p_class = softmax(row_yes)
        ctw.append(p_yes[int(np.argmax(row_yes))])
        atd.append(1 - (1 - sum(p * q for p, q in zip(p_class, p_yes, strict=True))))
    np.testing.assert_allclose(ctw_score(yes, no).numpy(), ctw, rtol=1e-6)
    np.testing.assert_allclose(atd_score(yes, no).numpy(), atd, rtol=1e-6)


def test_msp_energy_max_logit_and_aupr_against_references() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 5, size=(9, 6))
    np.testing.assert_allclose(msp_score(logits).numpy(), softmax(logits, axis=1).max(1), rtol=1e-10)
    np.testing.assert_allclose(energy_score(logits).numpy(), logsumexp(logits, axis=1), rtol=1e-10)
    np.testing.assert_allclose(energy_score(logits, 2.0).numpy(), 2 * logsumexp(logits / 2, axis=1), rtol=1e-10)
    np.testing.assert_allclose(max_logit_score(logits).numpy(), logits.max(1), rtol=0)
    for id_scores, ood_scores in [(rng.normal(1, 1, 50), rng.normal(0, 1, 70)),
                                  (rng.integers(2, 9, 60).astype(float), rng.integers(0, 6, 40).astype(float))]:
        labels = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
        expected = skm.average_precision_score(labels, np.r_[id_scores, ood_scores])
        assert aupr_in(id_scores, ood_scores) == pytest.approx(expected, rel=1e-12)


def test_untrained_no_branch_leaves_the_yes_scores_of_the_base_model(tiny) -> None:
    """Zero prompts and copied weights: the no-encoder embeds texts exactly as the model, the yes head (and so
    MCM, MSP, energy, max-logit) is the base model's, and every p_yes is 1/2."""
    task = synthetic_task("shape")
    dataset = task.dataset("test", 12)
    ood = task.single_object_images("test_ood", 8)
    plain = Evaluator(tiny, workers=0).ood(dataset, ood, "ood")
    evaluator = Evaluator(tiny, workers=0, no_encoder=NoTextEncoder(tiny).eval())
    with_no = evaluator.ood(dataset, ood, "ood")
    for name in ("mcm", "msp", "energy", "max_logit"):
        assert with_no.metrics[f"auroc_{name}"] == plain.metrics[f"auroc_{name}"]
    torch.testing.assert_close(evaluator.no_classifier(dataset), zero_shot_head(tiny, dataset.classnames, dataset.templates))
    scores = evaluator.ood_scores(dataset, evaluator.image_features(dataset))
    torch.testing.assert_close(scores["ctw"], torch.full_like(scores["ctw"], 0.5))


def test_clipn_training_says_no_to_mismatched_pairs_and_round_trips(tiny, tmp_path) -> None:
    """A short fit lowers the loss of the untrained branch and raises p_no on mismatched pairs; the file
    reloads to the same encoder and is refused by another model."""
    torch.manual_seed(0)
    adapter = fit_clipn(tiny, "synthetic", {"steps": 30, "samples": 64, "batch_size": 32, "lr": 1e-3}, seed=3)
    from clipforge.adapt.recipe_data import captioned_features

    found = captioned_features(tiny, "synthetic", 64)
    with torch.no_grad():
        yes = tiny(None, found.tokens)[1]
        untrained = NoTextEncoder(tiny).eval()
        before = clipn_losses(found.features, yes, untrained(found.tokens), tiny.logit_scale.exp())
        after = clipn_losses(found.features, yes, adapter.encoder(found.tokens), tiny.logit_scale.exp())
    assert sum(after).item() < sum(before).item() and after[1].item() < before[1].item()
    path = adapter.save(tmp_path / "clipn.safetensors")
    reloaded = load_no_encoder(read_adapter(path), tiny)
    tokens = tiny.tokenize(["a photo of a circle."])
    torch.testing.assert_close(reloaded(tokens), adapter.encoder(tokens))
    other = type(tiny)(tiny.config)
    with pytest.raises(CheckpointError, match="fitted on another model"):
        load_no_encoder(read_adapter(path), other)
