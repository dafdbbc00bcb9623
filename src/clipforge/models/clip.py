"""CLIP: a ViT image tower, a causal text tower and a contrastive head (Radford et al. 2021).

Parameter names are exactly open_clip's ``CLIP`` (and OpenAI's), so their state dicts load unchanged.
The preprocessing and the tokenizer travel with the model: ``model.preprocess(image)`` and
``model.tokenize(texts)`` are always the ones the weights expect.
"""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.config import ModelConfig
from clipforge.models.text import TextTower
from clipforge.models.vit import VisionTransformer

if TYPE_CHECKING:
    from PIL import Image

    from clipforge.preprocess.transforms import PreprocessConfig


class CLIP(TextTower):
    def __init__(self, config: ModelConfig, preprocess_cfg: PreprocessConfig | None = None) -> None:
        super().__init__(config.text, config.embed_dim, config.activation)
        from clipforge.preprocess.transforms import PreprocessConfig

        self.config = config
        self.visual = VisionTransformer(config.vision, config.embed_dim, config.activation)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        self.logit_bias = (
            nn.Parameter(torch.tensor(float(config.init_logit_bias))) if config.init_logit_bias is not None else None
        )
        self.preprocess_cfg = preprocess_cfg or PreprocessConfig(size=config.vision.image_size)
        self.provenance: dict[str, Any] = {}

    # -- the open_clip interface (CLIP_benchmark and existing scripts rely on it) --

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Pixels [B, 3, H, W] (as made by ``preprocess``) → image embeddings [B, embed_dim]."""
        features = self.visual(pixels)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(
        self, image: torch.Tensor | None = None, text: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, ...]:
        """``(image_features, text_features, logit_scale)`` normalised, as open_clip; plus ``logit_bias`` if the model has one."""
        image_features = self.encode_image(image, normalize=True) if image is not None else None
        text_features = self.encode_text(text, normalize=True) if text is not None else None
        if self.logit_bias is not None:
            return image_features, text_features, self.logit_scale.exp(), self.logit_bias
        return image_features, text_features, self.logit_scale.exp()

    def get_logits(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits_per_image, logits_per_text)``: scaled cosine similarities (plus bias when present)."""
        image_features, text_features, scale, *bias = self(image, text)
        logits = scale * image_features @ text_features.T
        if bias:
            logits = logits + bias[0]
        return logits, logits.T

    def forward_intermediates(self, image: torch.Tensor, **kwargs: Any) -> dict[str, Any]:
        """Patch tokens of chosen image blocks; see ``VisionTransformer.forward_intermediates``."""
        return self.visual.forward_intermediates(image, **kwargs)

    # -- preprocessing and tokenizer that belong to these weights --

    @cached_property
    def _eval_transform(self) -> Any:
        from clipforge.preprocess.transforms import image_transform

        return image_transform(self.preprocess_cfg, train=False)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """A PIL image → FloatTensor [3, H, W], exactly open_clip's eval transform for these weights."""
        return self._eval_transform(image)

    def train_transform(self) -> Any:
        """open_clip's training augmentation with this model's preprocessing settings."""
        from clipforge.preprocess.transforms import image_transform

        return image_transform(self.preprocess_cfg, train=True)

    def tokenize(self, texts: str | list[str]) -> torch.Tensor:
        """Strings → LongTensor [N, context_length], exactly open_clip's token ids."""
        from clipforge.preprocess.tokenizer import get_tokenizer

        return get_tokenizer(self.text_cfg.context_length)(texts)

    @property
    def tokenizer(self) -> Any:
        from clipforge.preprocess.tokenizer import get_tokenizer

        return get_tokenizer(self.text_cfg.context_length)

    # -- training helpers --

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.transformer.grad_checkpointing = enable
        self.transformer.grad_checkpointing = enable

    def lock_image_tower(self, unlocked_groups: int = 0) -> None:
        """Freeze the image tower except its last ``unlocked_groups`` layer groups (LiT, Zhai et al. 2022).

        Groups in order: embeddings (conv1, class and position embeddings, ln_pre), each block, head (ln_post, proj).
        """
        visual = self.visual
        groups = [[visual.conv1, visual.class_embedding, visual.positional_embedding, visual.ln_pre]]
        groups += [[block] for block in visual.transformer.resblocks]
        groups.append([visual.ln_post, visual.proj])
        _freeze(groups, unlocked_groups)

    def lock_text_tower(self, unlocked_layers: int = 0) -> None:
        """Freeze the text tower except its last ``unlocked_layers`` groups (embeddings, blocks, head)."""
        groups = [[self.token_embedding, self.positional_embedding]]
        groups += [[block] for block in self.transformer.resblocks]
        groups.append([self.ln_final, self.text_projection])
        _freeze(groups, unlocked_layers)


def _freeze(groups: list[list[nn.Module | nn.Parameter]], unlocked: int) -> None:
    frozen = groups[: max(0, len(groups) - unlocked)]
    for group in frozen:
        for item in group:
            parameters = [item] if isinstance(item, nn.Parameter) else list(item.parameters())
            for parameter in parameters:
                parameter.requires_grad_(False)
