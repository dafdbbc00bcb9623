"""The ViT image tower of CLIP (Radford et al. 2021; Dosovitskiy et al. 2021), open_clip parameter names."""

from __future__ import annotations

import torch
from torch import nn

from clipforge.config import VisionConfig
from clipforge.errors import ConfigError
from clipforge.layers.patch_dropout import PatchDropout
from clipforge.layers.pos_embed import sincos_2d_pos_embed
from clipforge.layers.prompts import PromptTokens
from clipforge.layers.token_reduction import TokenReduction, TokenState
from clipforge.layers.transformer import Transformer


class VisionTransformer(nn.Module):
    """Patchify (conv, no bias) → class token → position embedding → ``ln_pre`` → blocks → ``ln_post`` → pool → proj.

    ``token_reduction`` (None by default) is the hook every block calls between attention and MLP.
    ``proj_linear`` (None by default) replaces ``x @ proj`` by a module, for quantizers that swap ``nn.Linear``s.
    ``prompts`` (None by default) puts learned tokens into the sequence (``clipforge.layers.prompts``).
    """

    def __init__(self, cfg: VisionConfig, output_dim: int, activation: str) -> None:
        super().__init__()
        self.cfg = cfg
        scale = cfg.width**-0.5
        self.patch_size = cfg.patch_size
        self.grid_size = cfg.grid_size
        self.conv1 = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(cfg.width))
        if cfg.pos_embed_type == "sin_cos_2d":
            table = sincos_2d_pos_embed(cfg.width, cfg.grid_size)
            self.positional_embedding = nn.Parameter(table, requires_grad=False)
        else:
            self.positional_embedding = nn.Parameter(scale * torch.randn(cfg.grid_size**2 + 1, cfg.width))
        self.patch_dropout = PatchDropout(cfg.patch_dropout)
        self.ln_pre = nn.LayerNorm(cfg.width)
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, activation, cfg.ls_init_value)
        self.ln_post = nn.LayerNorm(cfg.width)
        self.proj = nn.Parameter(scale * torch.randn(cfg.width, output_dim))
        self.proj_linear: nn.Module | None = None
        self.token_reduction: TokenReduction | None = None
        self.prompts: PromptTokens | None = None

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, H, W] → tokens [B, 1 + grid², width] entering the first block."""
        x = self.conv1(pixels.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)
        cls_token = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = self.patch_dropout(torch.cat([cls_token, x], dim=1) + self.positional_embedding.to(x.dtype))
        if self.prompts is not None:
            x = self.prompts.embed(x)
        return self.ln_pre(x)

    def pool(self, x: torch.Tensor, state: TokenState | None = None) -> torch.Tensor:
        """``ln_post`` then the class token (``tok``) or the mean of patch tokens (``avg``, size-weighted after merging)."""
        x = self.ln_post(x)
        if self.cfg.pool_type == "tok":
            return x[:, 0]
        patches = x[:, 1 : x.shape[1] - self._appended_prompts()]
        if state is not None and state.size is not None:
            size = state.size[:, 1:].to(patches.dtype)
            return (patches * size).sum(1) / size.sum(1)
        return patches.mean(1)

    def _appended_prompts(self) -> int:
        return self.prompts.appended if self.prompts is not None else 0

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled features [B, width] → the shared embedding space: ``pooled @ proj``, or ``proj_linear(pooled)``."""
        return pooled @ self.proj if self.proj_linear is None else self.proj_linear(pooled)

    def head(self, x: torch.Tensor, state: TokenState | None = None) -> torch.Tensor:
        """Final tokens → the image embedding (before normalisation)."""
        return self.project(self.pool(x, state))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels → image embedding. With class-token pooling the last block computes the class token
        alone (the other tokens' outputs are never read), saving most of that block; exact."""
        reduction = self.token_reduction
        first_token_out = self.cfg.pool_type == "tok" and not (reduction is not None and reduction.observes_every_block)
        x, state = self.transformer(
            self.embed(pixels), reduction=reduction, first_token_out=first_token_out, prompts=self.prompts
        )
        return self.head(x, state)

    def forward_intermediates(
        self,
        pixels: torch.Tensor,
        indices: int | list[int] | None = None,
        *,
        stop_early: bool = False,
        normalize_intermediates: bool = False,
        intermediates_only: bool = False,
        output_fmt: str = "NCHW",
        output_extra_tokens: bool = False,
    ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Patch tokens of chosen blocks (open_clip / timm semantics).

        ``indices``: None → every block, an int n → the last n blocks, a list → those blocks (negative
        counts from the end). ``output_fmt`` ``NCHW`` gives [B, width, grid, grid] feature maps (dense
        features for segmentation, depth, MLLM projectors), ``NLC`` gives [B, grid², width].
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be NCHW or NLC, got {output_fmt!r}")
        take = _take_indices(self.cfg.layers, indices)
        batch, _, height, width = pixels.shape
        intermediates, x, state = [], None, None
        blocks = self.transformer.iterate(self.embed(pixels), reduction=self.token_reduction, prompts=self.prompts)
        for index, x, state in blocks:
            if index in take:
                intermediates.append(x)
            if stop_early and index >= max(take):
                break
        if normalize_intermediates:
            intermediates = [self.ln_post(t) for t in intermediates]
        output: dict[str, torch.Tensor | list[torch.Tensor]] = {}
        if output_extra_tokens:
            output["image_intermediates_prefix"] = [t[:, :1] for t in intermediates]
        patches = [t[:, 1 : t.shape[1] - self._appended_prompts()] for t in intermediates]
        if output_fmt == "NCHW":
            grid_h, grid_w = height // self.patch_size, width // self.patch_size
            if any(p.shape[1] != grid_h * grid_w for p in patches):
                raise ValueError("NCHW intermediates need every patch token; use output_fmt='NLC' with token reduction")
            patches = [p.reshape(batch, grid_h, grid_w, -1).permute(0, 3, 1, 2).contiguous() for p in patches]
        output["image_intermediates"] = patches
        if not intermediates_only:
            if stop_early and index < self.cfg.layers - 1:
                raise ValueError("stop_early=True leaves no final features; pass intermediates_only=True")
            output["image_features"] = self.head(x, state)
        return output


def _take_indices(layers: int, indices: int | list[int] | None) -> list[int]:
    if indices is None:
        return list(range(layers))
    if isinstance(indices, int):
        if not 0 < indices <= layers:
            raise ValueError(f"last-n intermediates ({indices}) is out of range 1..{layers}")
        return list(range(layers - indices, layers))
    take = [i + layers if i < 0 else i for i in indices]
    bad = [i for i in take if not 0 <= i < layers]
    if bad:
        raise ValueError(f"intermediate block index {bad[0]} is out of range 0..{layers - 1}")
    return take


def image_tower(model: nn.Module) -> VisionTransformer:
    """``model.visual`` for a CLIP model, or the model itself if it is a ``VisionTransformer``."""
    tower = getattr(model, "visual", model)
    if not isinstance(tower, VisionTransformer):
        raise ConfigError(f"{type(model).__name__} has no ViT image tower (token reduction and early exit need one)")
    return tower
