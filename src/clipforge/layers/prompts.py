"""The prompt hook of both towers: learned tokens put into the token sequence.

A tower whose ``prompts`` (image tower) or ``text_prompts`` (text tower) is set calls the hook's ``embed`` on
the tokens entering the tower and its ``before_block`` before every block. The base class changes nothing;
prompt learning (CoOp's context vectors, MaPLe's coupled vision-language prompts) subclasses it, so a prompted
model is an option of the model rather than a patch of its classes.

- text tower: ``embed`` receives the word embeddings [B, L, width] *before* the position embedding is added
  (CoOp's context vectors take the place of word embeddings and get their positions added, as in
  ``trainers/coop.py``);
- image tower: ``embed`` receives the class and patch tokens *after* the position embedding, before
  ``ln_pre``; tokens it appends at the end are counted in ``appended`` so that mean pooling leaves them out.
"""

from __future__ import annotations

import torch
from torch import nn


class PromptTokens(nn.Module):
    """Identity prompts; subclasses override what they need."""

    appended: int = 0
    """How many tokens ``embed`` appends at the end of the image sequence (pooling ignores them)."""

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The tokens entering the tower [B, N, width] → the tokens with the learned ones put in."""
        return x

    def before_block(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The tokens entering block ``layer`` → the tokens that block sees (deep prompts replace some)."""
        return x
