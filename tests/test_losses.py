"""Single-process parity of clipforge's contrastive losses with open_clip's, and hand-computed cases."""

from __future__ import annotations

import inspect
import math

import open_clip
import open_clip.loss as oc_loss
import pytest
import torch
import torch.nn.functional as F

from clipforge.train.losses import (
    CLIP_INIT_LOGIT_SCALE,
    MAX_LOGIT_SCALE,
    SIGLIP_INIT_LOGIT_BIAS,
    SIGLIP_INIT_LOGIT_SCALE,
    ClipLoss,
    SigLipLoss,
)

RTOL = 1e-6


def random_inputs(batch: int, dim: int, seed: int, with_bias: bool) -> dict[str, torch.Tensor]:
    """Unit-norm float64 features and scalar scale/bias, as leaves that require grad."""
    generator = torch.Generator().manual_seed(seed)
    inputs = {
        "image_features": F.normalize(torch.randn(batch, dim, generator=generator, dtype=torch.float64), dim=-1),
        "text_features": F.normalize(torch.randn(batch, dim, generator=generator, dtype=torch.float64), dim=-1),
        "logit_scale": torch.tensor(14.3, dtype=torch.float64),
    }
    if with_bias:
        inputs["logit_bias"] = torch.tensor(-3.7, dtype=torch.float64)
    return {name: tensor.requires_grad_() for name, tensor in inputs.items()}


def value_and_grads(loss_fn, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    leaves = {name: tensor.detach().clone().requires_grad_() for name, tensor in inputs.items()}
    loss = loss_fn(**leaves)
    loss.backward()
    return loss.detach(), {name: leaf.grad for name, leaf in leaves.items()}


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=1e-12)


def assert_same_value_and_grads(ours, reference, inputs: dict[str, torch.Tensor]) -> None:
    loss, grads = value_and_grads(ours, inputs)
    expected_loss, expected_grads = value_and_grads(reference, inputs)
    assert_close(loss, expected_loss)
    assert grads.keys() == expected_grads.keys()
    for name in grads:
        assert_close(grads[name], expected_grads[name])


@pytest.mark.parametrize("batch, dim, with_bias", [(8, 16, False), (13, 32, True), (1, 4, False)])
def test_clip_loss_matches_open_clip(batch: int, dim: int, with_bias: bool) -> None:
    inputs = random_inputs(batch, dim, seed=batch, with_bias=with_bias)
    assert_same_value_and_grads(ClipLoss(), oc_loss.ClipLoss(), inputs)


@pytest.mark.parametrize("batch, dim, with_bias", [(8, 16, True), (13, 32, False), (1, 4, True)])
def test_siglip_loss_matches_open_clip(batch: int, dim: int, with_bias: bool) -> None:
    inputs = random_inputs(batch, dim, seed=100 + batch, with_bias=with_bias)
    reference = oc_loss.SigLipLoss()
    assert_same_value_and_grads(
        SigLipLoss(), lambda **kw: reference(logit_bias=kw.pop("logit_bias", None), **kw), inputs
    )


def test_label_cache_follows_batch_size_changes() -> None:
    ours, reference = ClipLoss(cache_labels=True), oc_loss.ClipLoss(cache_labels=True)
    for batch in (5, 3, 5, 3):
        assert_same_value_and_grads(ours, reference, random_inputs(batch, 8, seed=batch, with_bias=False))


def test_infonce_by_hand() -> None:
    # image·text similarities [[1, 0.6], [0, 0.8]] at scale 2 give logits [[2, 1.2], [0, 1.6]] (rows: images).
    image_features = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    text_features = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)
    image_to_text = [
        -math.log(math.exp(2.0) / (math.exp(2.0) + math.exp(1.2))),
        -math.log(math.exp(1.6) / (math.exp(0.0) + math.exp(1.6))),
    ]
    text_to_image = [
        -math.log(math.exp(2.0) / (math.exp(2.0) + math.exp(0.0))),
        -math.log(math.exp(1.6) / (math.exp(1.2) + math.exp(1.6))),
    ]
    expected = (sum(image_to_text) / 2 + sum(text_to_image) / 2) / 2
    loss = ClipLoss()(image_features, text_features, torch.tensor(2.0, dtype=torch.float64))
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    # A scalar bias shifts every logit of a row equally: softmax, hence InfoNCE, ignores it.
    biased = ClipLoss()(image_features, text_features, torch.tensor(2.0, dtype=torch.float64), torch.tensor(-5.0))
    assert biased.item() == pytest.approx(expected, rel=1e-12)


def test_sigmoid_loss_by_hand() -> None:
    image_features = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    text_features = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)
    scale, bias = 2.0, -1.0  # logits [[1, 0.2], [-1, 0.6]]

    def log_sigmoid(x: float) -> float:
        return -math.log1p(math.exp(-x))

    expected = -(log_sigmoid(1.0) + log_sigmoid(-0.2) + log_sigmoid(1.0) + log_sigmoid(0.6)) / 2
    loss = SigLipLoss()(
        image_features, text_features, torch.tensor(scale, dtype=torch.float64), torch.tensor(bias, dtype=torch.float64)
    )
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_logit_constants_match_papers_and_open_clip() -> None:
    clip_default = inspect.signature(open_clip.model.CLIP).parameters["init_logit_scale"].default
    assert CLIP_INIT_LOGIT_SCALE == pytest.approx(float(clip_default), rel=1e-12)
    assert math.exp(CLIP_INIT_LOGIT_SCALE) == pytest.approx(1 / 0.07)
    assert math.exp(MAX_LOGIT_SCALE) == pytest.approx(100.0)
    assert math.exp(SIGLIP_INIT_LOGIT_SCALE) == pytest.approx(10.0)
    assert SIGLIP_INIT_LOGIT_BIAS == open_clip.get_model_config("ViT-B-16-SigLIP")["init_logit_bias"]


def test_mismatched_features_are_rejected() -> None:
    image_features, text_features = torch.zeros(4, 8), torch.zeros(3, 8)
    for loss in (ClipLoss(), SigLipLoss()):
        with pytest.raises(ValueError, match=r"image_features \(4, 8\) and text_features \(3, 8\)"):
            loss(image_features, text_features, torch.tensor(1.0))
