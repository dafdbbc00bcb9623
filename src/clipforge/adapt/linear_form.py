"""Attention with separate q, k, v linears, the form CLIP-LoRA and CLIP-SVD adapt, and back.

clipforge's ``Attention`` keeps open_clip's fused ``in_proj_weight`` (rows q; k; v) as a bare parameter, which
no layer-swapping library sees. CLIP-LoRA (``loralib/layers.py: PlainMultiheadAttentionLoRA``) and CLIP-SVD
(``PlainMultiHeadAttention``) first rewrite the attention into ``q_proj``, ``k_proj``, ``v_proj`` linears;
``split_attention`` does the same (``SplitQkvAttention`` overrides only ``project_qkv``, the hook ``Attention``
provides for this), and ``fuse_attention`` writes the (adapted) linears back into the fused parameter, so the
result is a plain clipforge model that every other tool reads. ``compress/quant/int8.py`` does the same for
quantizers with one fused ``qkv`` linear.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from clipforge.layers.attention import Attention


class SplitQkvAttention(Attention):
    """``Attention`` whose q, k and v projections are the ``nn.Linear`` modules ``q_proj``, ``k_proj``, ``v_proj``."""

    def __init__(self, attention: Attention) -> None:
        dim = attention.out_proj.in_features
        super().__init__(dim, attention.heads)
        del self.in_proj_weight, self.in_proj_bias
        weight, bias = attention.in_proj_weight.detach(), attention.in_proj_bias.detach()
        for index, name in enumerate(("q_proj", "k_proj", "v_proj")):
            linear = nn.Linear(dim, dim, device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(weight[index * dim : (index + 1) * dim])
                linear.bias.copy_(bias[index * dim : (index + 1) * dim])
            setattr(self, name, linear)
        self.out_proj = attention.out_proj

    def project_qkv(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)


def split_attention(model: nn.Module) -> nn.Module:
    """Replace every ``Attention`` of ``model`` (in place) by a ``SplitQkvAttention`` with the same weights."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is Attention:
                setattr(parent, name, SplitQkvAttention(child))
    return model


def fuse_attention(model: nn.Module, as_linear: Callable[[nn.Module], nn.Linear]) -> nn.Module:
    """The inverse of ``split_attention`` (in place): each ``SplitQkvAttention`` becomes an ``Attention`` whose fused
    weight stacks ``as_linear(q_proj)``, ``…(k_proj)``, ``…(v_proj)``; other adapted linears become ``as_linear(m)``
    (e.g. CLIP-SVD's out_proj and MLP)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, SplitQkvAttention):
                parts = [as_linear(getattr(child, key)) for key in ("q_proj", "k_proj", "v_proj")]
                fused = Attention(parts[0].in_features, child.heads).to(parts[0].weight.device)
                with torch.no_grad():
                    fused.in_proj_weight.copy_(torch.cat([part.weight for part in parts]))
                    fused.in_proj_bias.copy_(torch.cat([part.bias for part in parts]))
                fused.out_proj = as_linear(child.out_proj)
                setattr(parent, name, fused)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear | Attention) and hasattr(child, "as_linear"):
                setattr(parent, name, child.as_linear())
    return model
