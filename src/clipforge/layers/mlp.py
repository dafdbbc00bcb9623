"""The transformer MLP (``c_fc`` → activation → ``c_proj``, open_clip names) and the two activations."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``: the activation OpenAI trained CLIP with (and LAION-400M, MetaCLIP)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_activation(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name == "quick_gelu":
        return QuickGELU()
    raise ValueError(f"unknown activation {name!r}")


class Mlp(nn.Sequential):
    def __init__(self, width: int, hidden: int, activation: str) -> None:
        super().__init__(
            OrderedDict(
                c_fc=nn.Linear(width, hidden),
                gelu=make_activation(activation),
                c_proj=nn.Linear(hidden, width),
            )
        )
