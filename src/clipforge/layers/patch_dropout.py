"""Patch dropout (FLIP: Li et al., "Scaling Language-Image Pre-training via Masking", CVPR 2023).

During training, keep a random subset of the patch tokens (the class token always stays), so each
step costs roughly ``1 - prob`` of the full image forward. Inactive in eval mode.
"""

from __future__ import annotations

import torch
from torch import nn


class PatchDropout(nn.Module):
    def __init__(self, prob: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= prob < 1.0:
            raise ValueError(f"patch_dropout must be in [0, 1), got {prob}")
        self.prob = prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.prob == 0.0:
            return x
        cls_token, patches = x[:, :1], x[:, 1:]
        batch, tokens = patches.shape[:2]
        keep = max(1, int(tokens * (1.0 - self.prob)))
        scores = torch.rand(batch, tokens, device=x.device)
        kept = scores.topk(keep, dim=-1).indices.sort(dim=-1).values
        patches = patches.gather(1, kept.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        return torch.cat([cls_token, patches], dim=1)
