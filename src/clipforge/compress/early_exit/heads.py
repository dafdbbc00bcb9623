"""LGViT's exit heads for the CLIP image tower: the head modules, ``ExitHeads``, their placement and the checks.

LGViT (Xu et al., "LGViT: Dynamic Early Exiting for Accelerating Vision Transformer", ACM MM 2023; official code
falcon-xu/LGViT 3147fb8, ``models/deit_highway/highway.py``): *local perception* heads (``DeiTHighway_v2``) run
convolutions on the patch grid (``conv1_1``: 1×1 conv → GELU → BN → 3×3 depthwise → GELU → BN → 1×1 conv → BN,
plus the input; ``conv2_1`` without the depthwise stage); *global aggregation* heads (``GlobalSparseAttn``) keep
every s-th patch in each direction (``AvgPool2d(1, s)``) and run multi-head attention over those. The exit pools
``mean(head tokens) + class token``. Placement: after blocks 4..11 (1-based) of 12; the first half of the exits
local, the second half global.

Adaptation to CLIP (ours): a head ends in ``LayerNorm`` and a projection to the shared
embedding space, initialised from the tower's ``ln_post`` and ``proj`` (LGViT copies the backbone's pooler into its
heads), so an exit emits an *image embedding*. Deviations: global heads use the tower's head count (LGViT: 8), and
the layer placement and head kinds generalise LGViT's 12-block tables (they match them for 2, 4 and 8 exits).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.errors import ConfigError
from clipforge.models.vit import VisionTransformer, image_tower

EXIT_KINDS = ("local", "local-pointwise", "global-s2", "global-s3")


def default_exit_layers(num_layers: int) -> list[int]:
    """Blocks (0-based) followed by an exit: ``L // 3 − 1`` to the last-but-one, LGViT's 3..10 of 12.

    The first exit follows block ``L // 3`` (1-based): a third of the depth when ``L`` is a multiple of 3, less
    otherwise (after block 1 of 4 on a 4-block tower)."""
    return list(range(max(0, num_layers // 3 - 1), num_layers - 1))


def default_exit_kinds(count: int) -> list[str]:
    """First half local (depthwise, then pointwise), second half global (stride 2, then 3), as LGViT's tables."""
    local = math.ceil(count / 2)
    glob = count - local
    return (
        ["local"] * math.ceil(local / 2)
        + ["local-pointwise"] * (local // 2)
        + ["global-s2"] * math.ceil(glob / 2)
        + ["global-s3"] * (glob // 2)
    )


def subsample_grid(patches: torch.Tensor, stride: int) -> torch.Tensor:
    """Every ``stride``-th patch of a square grid in each direction (LGViT's ``AvgPool2d(kernel=1, stride)``)."""
    batch, count, width = patches.shape
    grid = patch_grid(count)
    return patches.reshape(batch, grid, grid, width)[:, ::stride, ::stride].reshape(batch, -1, width)


def patch_grid(count: int) -> int:
    grid = math.isqrt(count)
    if grid * grid != count:
        raise ConfigError(f"exit heads need the full square patch grid, got {count} patch tokens; remove token reduction")
    return grid


class LocalPerception(nn.Module):
    """LGViT's local perception head (``highway_conv1_1``; ``highway_conv2_1`` when ``depthwise`` is False)."""

    def __init__(self, width: int, depthwise: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(width, width, 1), nn.GELU(), nn.BatchNorm2d(width))
        self.depthwise = (
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1, groups=width), nn.GELU(), nn.BatchNorm2d(width))
            if depthwise
            else nn.Identity()
        )
        self.conv2 = nn.Sequential(nn.Conv2d(width, width, 1), nn.BatchNorm2d(width))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """The stages on the token layout: each 1×1 convolution as a matrix product over the patches (its
        BatchNorm sees them as a batch of 1×1 maps: the same statistics), the depthwise one on a channels-last
        view of the grid; the convolutions' layout changes cost more than their arithmetic on small grids."""
        batch, count, width = patches.shape
        grid = patch_grid(count)
        x = _pointwise(self.conv1, patches.reshape(-1, width))
        if isinstance(self.depthwise, nn.Sequential):
            x = self.depthwise(x.view(batch, grid, grid, width).permute(0, 3, 1, 2))
            x = x.permute(0, 2, 3, 1).reshape(-1, width)
        return _pointwise(self.conv2, x).view(batch, count, width) + patches


def _pointwise(stage: nn.Sequential, rows: torch.Tensor) -> torch.Tensor:
    """``stage`` (a 1×1 ``Conv2d`` and what follows it) on ``rows`` [positions, channels]."""
    convolution, *rest = stage
    x = F.linear(rows, convolution.weight.flatten(1), convolution.bias).view(*rows.shape, 1, 1)
    for layer in rest:
        x = layer(x)
    return x.view(rows.shape)


class GlobalSparseAttention(nn.Module):
    """LGViT's global aggregation head (``GlobalSparseAttn``): attention over every ``stride``-th patch, no residual."""

    def __init__(self, width: int, heads: int, stride: int) -> None:
        super().__init__()
        self.heads, self.stride = heads, stride
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = subsample_grid(patches, self.stride)
        batch, count, width = x.shape
        q, k, v = self.qkv(x).reshape(batch, count, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, count, width))


class ExitHead(nn.Module):
    """Tokens after a block → ``(embedding, head tokens)``: mixer, ``mean(head tokens) + class token``, ``ln``, ``proj``."""

    def __init__(self, kind: str, width: int, heads: int, output_dim: int) -> None:
        super().__init__()
        self.kind = kind
        self.stride = int(kind[-1]) if kind.startswith("global") else 1
        if kind.startswith("local"):
            self.mixer: nn.Module = LocalPerception(width, depthwise=kind == "local")
        else:
            self.mixer = GlobalSparseAttention(width, heads, self.stride)
        self.ln = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, output_dim))

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mixed = self.mixer(tokens[:, 1:])
        return self.ln(mixed.mean(1) + tokens[:, 0]) @ self.proj, mixed


class ExitHeads(nn.Module):
    """One exit head after each of ``layers`` (0-based block indices) of a model's image tower.

    Parameters are named ``exits.<layer>.…`` (state-dict stable). ``layers`` default to
    ``default_exit_layers``, ``kinds`` (one of ``EXIT_KINDS`` per layer) to ``default_exit_kinds``.
    """

    def __init__(self, model: nn.Module, layers: Sequence[int] | None = None, kinds: Sequence[str] | None = None) -> None:
        super().__init__()
        tower = image_tower(model)
        self.num_layers = tower.cfg.layers
        self.layers = check_exit_layers(default_exit_layers(self.num_layers) if layers is None else layers, self.num_layers)
        self.kinds = check_exit_kinds(default_exit_kinds(len(self.layers)) if kinds is None else kinds, len(self.layers))
        width, output_dim = tower.proj.shape
        self.exits = nn.ModuleDict(
            {str(layer): ExitHead(kind, width, tower.cfg.heads, output_dim) for layer, kind in zip(self.layers, self.kinds)}
        )
        for head in self.exits.values():
            head.ln.load_state_dict(tower.ln_post.state_dict())
            head.proj.data.copy_(tower.proj.detach())
        self.to(device=tower.proj.device, dtype=tower.proj.dtype)

    def forward(self, layer: int, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The exit after block ``layer`` on its tokens [B, 1 + N, width] → (embedding [B, D], head tokens)."""
        return self.exits[str(layer)](tokens)


def check_exit_layers(layers: Sequence[int], num_layers: int) -> list[int]:
    """Distinct 0-based blocks before the last one, sorted; else a ``ConfigError``."""
    if not isinstance(layers, Sequence) or not layers:
        raise ConfigError(f"layers: give a non-empty list of block indices, got {layers!r}")
    last = num_layers - 2
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= last:
            raise ConfigError(
                f"layers: exit after block {layer!r} is out of range 0..{last} "
                f"(0-based blocks of a {num_layers}-block tower; the last block ends in the model's own head)"
            )
    if len(set(layers)) != len(layers):
        raise ConfigError(f"layers: {list(layers)} repeats a block")
    return sorted(layers)


def check_exit_kinds(kinds: Sequence[str], count: int) -> list[str]:
    """One of ``EXIT_KINDS`` per exit layer; else a ``ConfigError``."""
    unknown = [kind for kind in kinds if kind not in EXIT_KINDS]
    if unknown or len(kinds) != count:
        raise ConfigError(f"kinds: need {count} of {list(EXIT_KINDS)} (one per exit layer), got {list(kinds)}")
    return list(kinds)


def check_number(name: str, value: Any, low: float, high: float = math.inf) -> float:
    """``value`` as a float when it is a number (not a bool) in [low, high]; else a ``ConfigError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ConfigError(f"{name}: must be a number in [{low}, {high}], got {value!r}")
    return float(value)


def resolve_logit_scale(model: nn.Module, logit_scale: float | None) -> float:
    """The zero-shot logit scale: ``logit_scale`` when given, else the model's own (``exp`` of its learned log)."""
    if logit_scale is not None:
        return check_number("logit_scale", logit_scale, 0.0)
    if not hasattr(model, "logit_scale"):
        raise ConfigError("logit_scale: an image tower alone has no logit scale; pass logit_scale=")
    return float(model.logit_scale.detach().exp())


def check_bank(name: str, bank: torch.Tensor, heads: ExitHeads) -> torch.Tensor:
    """A copy of class embeddings [D, C] (a text bank or zero-shot classifier) that fit the heads' embedding size."""
    embed_dim = next(iter(heads.exits.values())).proj.shape[1]
    if bank.ndim != 2 or bank.shape[0] != embed_dim:
        raise ConfigError(f"{name}: class embeddings must be [{embed_dim}, classes], got {tuple(bank.shape)}")
    return bank.detach().clone()  # a normal tensor even when built under inference_mode


def check_full_tokens(tower: VisionTransformer) -> None:
    """Exit heads work on the full patch grid: a ``ConfigError`` while token reduction is on."""
    if tower.token_reduction is not None:
        raise ConfigError("early exit needs every patch token (its heads work on the patch grid); remove token reduction")
