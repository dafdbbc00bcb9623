"""Shared by the early-exit tests: the synthetic world and its test images, heads moved off their initial
values, and the tokens after a block (the reference for every head)."""

from __future__ import annotations

import torch
from torch import nn

import clipforge
from clipforge.compress.early_exit import ExitHeads
from clipforge.data.synthetic import SyntheticWorld, WorldConfig

WORLD = WorldConfig(seed=0, image_size=64)


def preprocess(model: clipforge.CLIP, world: SyntheticWorld, split: str, count: int, start: int = 0) -> torch.Tensor:
    return torch.stack([model.preprocess(sample.image) for sample in world.samples(split, start, count)])


def sample_pixels(model: clipforge.CLIP) -> torch.Tensor:
    """The first 24 test-split images of ``WORLD``, preprocessed for ``model``."""
    return preprocess(model, SyntheticWorld(WORLD), "test", 24)


def perturbed_heads(model: nn.Module, seed: int = 1, **settings) -> ExitHeads:
    """Heads whose every parameter and BatchNorm statistic is moved off its initial value (no identity shortcuts)."""
    torch.manual_seed(seed)
    heads = ExitHeads(model, **settings)
    with torch.no_grad():
        for parameter in heads.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter) * parameter.detach().abs().mean().clamp(min=0.1))
        for module in heads.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(0.1 * torch.randn_like(module.running_mean))
                module.running_var.copy_(0.5 + torch.rand_like(module.running_var))
    return heads.eval()


def tokens_after(model: clipforge.CLIP, pixels: torch.Tensor, block: int) -> torch.Tensor:
    """[B, 1 + N, width] after ``block``, from forward_intermediates (class token first)."""
    out = model.forward_intermediates(
        pixels, indices=[block], output_fmt="NLC", output_extra_tokens=True, intermediates_only=True, stop_early=True
    )
    return torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1)
