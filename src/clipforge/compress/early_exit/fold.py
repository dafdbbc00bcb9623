"""Inference copies of exit heads whose BatchNorms are folded into the neighbouring convolutions.

In eval mode a BatchNorm is the per-channel affine map ``x·a + b`` (``a = γ/√(var + ε)``, ``b = β − mean·a``), so
it merges into the linear map next to it: the standard convolution–BatchNorm fusion (Jacob et al., "Quantization
and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference", CVPR 2018, §3.2; PyTorch's
``torch.nn.utils.fusion.fuse_conv_bn_weights``, used here) for a BatchNorm after a convolution, and its mirror for
one before.
LGViT's local perception head (``LocalPerception``) has three, each a full pass over the head's tokens:

- after the last 1×1 convolution: into that convolution (``W ← diag(a)·W``, ``c ← a·c + b``);
- between the depthwise stage's GELU and the last 1×1 convolution: into that convolution (``W ← W·diag(a)``,
  ``c ← c + W·b``); without a depthwise stage, the one after the first GELU goes there too;
- between the first GELU and the zero-padded 3×3 depthwise convolution: its scale into the depthwise weights; its
  shift leaves a bias that depends on the position (border taps read the padding, not the shift), which is the
  depthwise convolution of the constant shift map, computed once for the tower's patch grid.

The outputs equal the eval-mode head's up to float rounding, with three fewer passes over the tokens.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from clipforge.compress.early_exit.heads import ExitHeads, LocalPerception


class FoldedLocalPerception(nn.Module):
    """``LocalPerception`` in eval mode with its three BatchNorms folded (module docstring); weights are buffers."""

    def __init__(self, local: LocalPerception, grid: int) -> None:
        super().__init__()
        self.grid = grid
        conv1, _, norm1 = local.conv1
        conv2, norm3 = local.conv2
        scale1, shift1 = _affine(norm1)
        self.register_buffer("weight1", conv1.weight.flatten(1).clone())
        self.register_buffer("bias1", conv1.bias.clone())
        if isinstance(local.depthwise, nn.Sequential):
            depthwise, _, norm2 = local.depthwise
            shift_map = shift1.view(1, -1, 1, 1).expand(1, -1, grid, grid)
            self.register_buffer("depthwise_weight", depthwise.weight * scale1.view(-1, 1, 1, 1))
            self.register_buffer("depthwise_bias", _depthwise(shift_map, depthwise.weight, depthwise.bias)[0])
            scale2, shift2 = _affine(norm2)
        else:
            self.register_buffer("depthwise_weight", None)
            self.register_buffer("depthwise_bias", None)
            scale2, shift2 = scale1, shift1
        weight2 = conv2.weight.flatten(1)
        weight2, bias2 = fuse_conv_bn_weights(
            weight2 * scale2, conv2.bias + weight2 @ shift2, norm3.running_mean, norm3.running_var, norm3.eps, norm3.weight, norm3.bias
        )
        self.register_buffer("weight2", weight2.detach())
        self.register_buffer("bias2", bias2.detach())

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        batch, count, width = patches.shape
        x = F.gelu(F.linear(patches.reshape(-1, width), self.weight1, self.bias1))
        if self.depthwise_weight is not None:
            x = x.view(batch, self.grid, self.grid, width).permute(0, 3, 1, 2)
            x = F.gelu(_depthwise(x, self.depthwise_weight) + self.depthwise_bias)
            x = x.permute(0, 2, 3, 1).reshape(-1, width)
        return F.linear(x, self.weight2, self.bias2).view(batch, count, width) + patches


def fold_batch_norms(heads: ExitHeads, grid: int) -> ExitHeads:
    """A copy of ``heads`` for inference on a ``grid``×``grid`` patch grid: eval mode, no gradients, every local
    head's mixer a ``FoldedLocalPerception``; ``heads`` itself is left as it is."""
    folded = copy.deepcopy(heads).eval().requires_grad_(False)
    with torch.no_grad():
        for head in folded.exits.values():
            if isinstance(head.mixer, LocalPerception):
                head.mixer = FoldedLocalPerception(head.mixer, grid)
    return folded


def _affine(norm: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode BatchNorm as ``x·scale + shift`` per channel."""
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    return scale, norm.bias - norm.running_mean * scale


def _depthwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.conv2d(x, weight, bias, padding=1, groups=weight.shape[0])
