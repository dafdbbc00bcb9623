"""The image tower's last block computes only the class token when that is all the pooling reads.

Reference: the same weights run through every block in full (``forward_intermediates``, which never
takes the shortcut), then pooled; and open_clip's own forward in tests/test_model_parity.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import clipforge
from clipforge.compress.reduction.registry import build_token_reduction
from clipforge.explain.rollout import attention_weights


def tiny_model(pool_type: str = "tok", ls_init_value: float | None = None) -> clipforge.CLIP:
    config = clipforge.get_model_config("synthetic-tiny")
    vision = dataclasses.replace(config.vision, pool_type=pool_type, ls_init_value=ls_init_value)
    torch.manual_seed(0)
    return clipforge.CLIP(dataclasses.replace(config, vision=vision)).eval()


def full_path_features(model: clipforge.CLIP, pixels: torch.Tensor) -> torch.Tensor:
    return model.visual.forward_intermediates(pixels, indices=1, output_fmt="NLC")["image_features"]


@pytest.mark.parametrize("ls_init_value", [None, 0.1])
def test_last_block_on_the_class_token_alone_gives_the_same_embedding(ls_init_value) -> None:
    model = tiny_model(ls_init_value=ls_init_value)
    pixels = torch.randn(3, 3, 64, 64)
    seen: list[tuple[int, ...]] = []
    hook = model.visual.transformer.resblocks[-1].mlp.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    with torch.no_grad():
        fast = model.visual(pixels)
        reference = full_path_features(model, pixels)
    hook.remove()
    assert seen[0] == (3, 1, model.visual.cfg.width)  # the shortcut ran: the last MLP saw one token per image
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-6)


def test_gradients_are_those_of_the_full_last_block() -> None:
    model = tiny_model()
    pixels = torch.randn(2, 3, 64, 64)
    model.visual(pixels).square().sum().backward()
    fast = {name: p.grad.clone() for name, p in model.visual.named_parameters()}
    model.zero_grad()
    full_path_features(model, pixels).square().sum().backward()
    for name, p in model.visual.named_parameters():
        scale = p.grad.abs().max().item()  # float32 summation-order noise is relative to the gradient's size
        torch.testing.assert_close(fast[name], p.grad, rtol=1e-4, atol=1e-6 * scale, msg=name)


def test_token_merging_keeps_its_output_with_the_shortcut() -> None:
    model = tiny_model()
    model.visual.token_reduction = build_token_reduction("tome", model.visual.cfg.layers, r=8)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.visual(pixels), full_path_features(model, pixels), rtol=1e-5, atol=1e-6)


def test_average_pooling_and_attention_maps_still_see_every_token() -> None:
    averaged = tiny_model(pool_type="avg")
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(averaged.visual(pixels), full_path_features(averaged, pixels), rtol=1e-5, atol=1e-6)
    model = tiny_model()
    weights = attention_weights(model, pixels)
    tokens = 1 + model.visual.cfg.grid_size**2
    assert weights[-1].shape[-2:] == (tokens, tokens)
