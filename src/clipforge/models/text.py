"""The causal text transformer of CLIP (Radford et al. 2021) with end-of-text pooling.

Its parameters sit at the top level of the CLIP state dict (``token_embedding``, ``positional_embedding``,
``transformer``, ``ln_final``, ``text_projection``): that is the OpenAI layout every open_clip, OpenAI
and converted checkpoint uses, so ``CLIP`` inherits this tower rather than nesting it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.config import TextConfig
from clipforge.layers.prompts import PromptTokens
from clipforge.layers.transformer import Transformer


class TextTower(nn.Module):
    def __init__(self, cfg: TextConfig, output_dim: int, activation: str) -> None:
        super().__init__()
        self.text_cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, activation, cfg.ls_init_value)
        self.ln_final = nn.LayerNorm(cfg.width)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, output_dim))
        self.text_projection_linear: nn.Module | None = None
        self.text_prompts: PromptTokens | None = None  # learned prompt tokens (CoOp, MaPLe); None: plain text
        self.text_output_dim = output_dim
        self._init_text_parameters()

    def _init_text_parameters(self) -> None:
        """OpenAI's initialisation of the text tower (as open_clip's ``TextTransformer.init_parameters``)."""
        cfg = self.text_cfg
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        attn_std = cfg.width**-0.5
        proj_std = cfg.width**-0.5 * (2 * cfg.layers) ** -0.5
        fc_std = (2 * cfg.width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=cfg.width**-0.5)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Token ids [B, L] → text embeddings [B, embed_dim], pooled at the end-of-text token.

        Only the positions up to the last end token of the batch are computed: with a causal mask, later
        (padding) positions cannot change earlier ones, so this is exact and saves most of the work on
        short captions.
        """
        if tokens.shape[-1] > self.text_cfg.context_length:
            raise ValueError(f"token sequences of length {tokens.shape[-1]} exceed the context length {self.text_cfg.context_length}")
        if tokens.shape[0] == 0:
            return self.token_embedding.weight.new_zeros(0, self.text_output_dim)
        features = self.text_features(tokens[:, : int(tokens.argmax(dim=-1).max()) + 1])
        return F.normalize(features, dim=-1) if normalize else features

    def text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [B, L] → unnormalised embeddings, computing all L positions (the end token has the
        largest id, so ``argmax`` finds it). ONNX export traces this: its graph keeps the length dynamic."""
        eot = tokens.argmax(dim=-1)
        x = self.token_embedding(tokens)
        if self.text_prompts is not None:
            x = self.text_prompts.embed(x)
        x = x + self.positional_embedding[: tokens.shape[1]]
        x, _ = self.transformer(x, is_causal=True, prompts=self.text_prompts)
        return self.project_text(self.ln_final(x[torch.arange(x.shape[0], device=x.device), eot]))

    def project_text(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled features [B, width] → the shared embedding space: ``pooled @ text_projection``, or
        ``text_projection_linear(pooled)`` when a quantizer has put the projection in a module."""
        if self.text_projection_linear is None:
            return pooled @ self.text_projection
        return self.text_projection_linear(pooled)
