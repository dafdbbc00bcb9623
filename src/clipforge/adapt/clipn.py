"""CLIPN: teaching CLIP to say "no" with a second text encoder, for zero-shot OOD detection.

Wang, Li, Yao, Li, "CLIPN for Zero-Shot OOD Detection: Teaching CLIP to Say No", ICCV 2023; official code
xmed-lab/CLIPN (``src/open_clip/model.py``, ``src/open_clip/loss.py``, ``src/zero_shot_infer.py``).

- The "no" text encoder is a copy of the model's text tower (token and position embeddings, transformer,
  ``ln_final``, projection), with 16 learnable "no" prompts [16, context, width], zero-initialised and
  **added** to its token embeddings. Training adds, per caption, one of the 16 prompts or their mean
  (uniformly among the 17); inference adds the mean.
- The image tower and the "yes" (the model's own) text tower stay frozen; the no-encoder and the prompts train.
- Per batch of N image–caption pairs, with ``s = exp(logit_scale)``, ``p_ij = softmax([s·f_i·g_j, s·f_i·g_j^no])``:
  image–text binary-opposite ``L_yes = mean_i −log p_ii[yes]``, ``L_no = mean_{i≠j} −log p_ij[no]``;
  text semantic-opposite ``L_tso = mean_j (2 − sqrt(2 − 2·g_j·g_j^no + 1e-4))`` (the official code's
  ε keeps the gradient finite where the encoders agree); ``loss = L_yes + L_no + L_tso``.
- OOD scores CTW and ATD (``clipforge.eval.ood_scores``) read the yes head (the model's zero-shot head) and the
  no head (this encoder, same class names and prompts); ``clipforge eval ood --adapter FILE``.

Differences: the official code trains 10 epochs on CC3M, batch 2048 on 4 GPUs, with open_clip's defaults (AdamW
lr 5e-4, betas 0.9/0.98, eps 1e-6, weight decay 0.2, 10,000 warm-up steps, cosine); here the defaults are the
same rate, decay and eps at betas 0.9/0.999, no warm-up and ``steps`` of ``batch_size`` pairs from the first
``samples`` of ``--data`` (image features are computed once, as the image tower is frozen). Images are encoded
with the eval transform (the official code's CC3M loader augments with open_clip's train transform).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.adapt.adapter_file import (
    AdapterRecord,
    check_fingerprint,
    model_fingerprint,
    write_adapter,
)
from clipforge.adapt.method import (
    AT_LEAST_ONE,
    AT_LEAST_TWO,
    NON_NEGATIVE,
    POSITIVE,
    Range,
    settings_dict,
    settings_from,
)
from clipforge.adapt.optim import Schedule, epoch_batches, optimise
from clipforge.adapt.recipe_data import captioned_features
from clipforge.compress.records import compression_steps
from clipforge.errors import CheckpointError, ConfigError
from clipforge.layers.prompts import PromptTokens
from clipforge.models.text import TextTower

TSO_EPSILON = 1e-4
TEXT_PREFIXES = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


class NoPrompts(PromptTokens):
    """The learnable "no" prompts, added to the no-encoder's token embeddings (all positions)."""

    def __init__(self, count: int, context_length: int, width: int) -> None:
        super().__init__()
        self.prompts = nn.Parameter(torch.zeros(count, context_length, width))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        choices = torch.cat([self.prompts, self.prompts.mean(dim=0, keepdim=True)])
        if self.training:
            picked = choices[torch.randint(len(choices), (x.shape[0],), device=choices.device)]
        else:
            picked = choices[-1:].expand(x.shape[0], -1, -1)
        return x + picked[:, : x.shape[1]].to(x.dtype)


class NoTextEncoder(TextTower):
    """CLIPN's "no" text encoder: the model's text tower copied, with ``NoPrompts``. It encodes text like a model
    (``clipforge.encode.encode_texts``, ``zero_shot_head``) and has no image tower."""

    def __init__(self, model: Any, prompts: int = 16) -> None:
        config = model.config
        super().__init__(config.text, config.embed_dim, config.activation)
        self.config = config
        self.tokenizer = model.tokenizer
        self.load_state_dict(text_tower_state(model), strict=False)
        self.text_prompts = NoPrompts(prompts, config.text.context_length, config.text.width)
        self.to(next(model.parameters()).device)

    def tokenize(self, texts: str | list[str]) -> torch.Tensor:
        return self.tokenizer(texts)

    def preprocess(self, image: Any) -> torch.Tensor:
        raise ConfigError("CLIPN's no-encoder has no image tower; encode images with the base model")

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        raise ConfigError("CLIPN's no-encoder has no image tower; encode images with the base model")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Normalised no-embeddings [B, D] of token ids (with gradients: the training forward)."""
        return F.normalize(self.text_features(tokens[:, : int(tokens.argmax(dim=-1).max()) + 1]), dim=-1)


def text_tower_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The text tower's float tensors of ``model`` (CLIPN initialises the no-encoder with them)."""
    if compression_steps(model) or getattr(model, "text_projection_linear", None) is not None:
        raise ConfigError("clipn: train on the uncompressed model (this one records compression steps)")
    return {name: tensor.detach().float().clone() for name, tensor in model.state_dict().items()
            if name.startswith(TEXT_PREFIXES)}


def clipn_losses(image: torch.Tensor, text_yes: torch.Tensor, text_no: torch.Tensor,
                 scale: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(L_yes, L_no, L_tso)`` of N normalised images, yes- and no-captions [N, D] (the module docstring)."""
    yes_no = torch.stack([scale * image @ text_yes.T, scale * image @ text_no.T], dim=-1)
    log_p = torch.log_softmax(yes_no, dim=-1)
    matched = torch.eye(len(image), dtype=torch.bool, device=image.device)
    count = len(image)
    loss_yes = -log_p[..., 0][matched].sum() / count
    loss_no = -log_p[..., 1][~matched].sum() / max(1, count * count - count)
    distance = torch.sqrt(2 - 2 * (text_yes * text_no).sum(dim=-1) + TSO_EPSILON)
    return loss_yes, loss_no, (2 - distance).mean()


@dataclass(frozen=True)
class ClipnSettings:
    prompts: int = 16
    lr: float = 5e-4
    weight_decay: float = 0.2
    eps: float = 1e-6
    batch_size: int = 128
    steps: int = 400
    samples: int = 4000

    RANGES: ClassVar[dict[str, Range]] = {
        "prompts": AT_LEAST_ONE, "lr": POSITIVE, "weight_decay": NON_NEGATIVE, "eps": POSITIVE, "batch_size": AT_LEAST_TWO,
        "steps": AT_LEAST_ONE, "samples": AT_LEAST_TWO,
    }


@dataclass
class ClipnAdapter:
    """A trained no-encoder and its adapter record (``method = "clipn"``)."""

    record: AdapterRecord
    encoder: NoTextEncoder

    def save(self, path: Any) -> Any:
        self.record.tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in self.encoder.state_dict().items()}
        return write_adapter(path, self.record)


def fit_clipn(model: Any, data: str, settings: dict[str, Any] | None = None, seed: int = 1,
              progress: bool = False) -> ClipnAdapter:
    """Train CLIPN's no-encoder on the first ``samples`` image–caption pairs of ``data`` (any training source:
    ``synthetic``, a folder with .txt captions, a table, shards); ``model`` is left unchanged."""
    chosen = settings_from(ClipnSettings, settings or {}, "clipn")
    found = captioned_features(model, data, chosen.samples, progress=progress)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = NoTextEncoder(model, chosen.prompts).train()
        loss = train_no_encoder(model, encoder, found.features, found.tokens, chosen, seed, progress)
    encoder.eval()
    record = AdapterRecord(
        method="clipn", tensors={}, settings=settings_dict(chosen), classnames=[], templates=[],
        base_model=model_fingerprint(model), extra={"final_loss": loss},
        provenance={"train": data, "pairs": len(found.features), "seed": seed, "skipped_images": found.skipped},
    )
    return ClipnAdapter(record, encoder)


def train_no_encoder(model: Any, encoder: NoTextEncoder, features: torch.Tensor, tokens: torch.Tensor,
                     settings: ClipnSettings, seed: int, progress: bool) -> float:
    """Minimise ``L_yes + L_no + L_tso`` over the no-encoder and its prompts; the last loss."""
    device = next(encoder.parameters()).device
    with torch.no_grad():
        yes = torch.cat([model(None, tokens[rows].to(device))[1].float()
                         for rows in torch.arange(len(tokens)).split(256)])
    scale = model.logit_scale.detach().exp().float()
    per_epoch = max(1, len(features) // settings.batch_size)
    batches = epoch_batches(len(features), settings.batch_size, -(-settings.steps // per_epoch), seed, drop_last=True)
    schedule = Schedule("adamw", settings.lr, settings.steps, weight_decay=settings.weight_decay, eps=settings.eps)

    def loss_at(step: int) -> torch.Tensor:
        rows = batches[step]
        no = encoder(tokens[rows].to(device))
        return sum(clipn_losses(features[rows].to(device), yes[rows], no, scale))

    return optimise(list(encoder.parameters()), schedule, loss_at, progress=progress, description="CLIPN")


def load_no_encoder(record: AdapterRecord, model: Any, source: str = "clipn adapter") -> NoTextEncoder:
    """The no-encoder of a ``clipn`` record, for ``model`` (refused if the record was fitted on another)."""
    if record.method != "clipn":
        raise CheckpointError(f"{source}: a {record.method} adapter, not a CLIPN one")
    check_fingerprint(record.base_model, model, source)
    settings = settings_from(ClipnSettings, record.settings, "clipn")
    encoder = NoTextEncoder(model, settings.prompts)
    try:
        encoder.load_state_dict(record.tensors)
    except RuntimeError as error:
        raise CheckpointError(f"{source}: the no-encoder tensors do not fit this model ({str(error).splitlines()[0]})") from None
    return encoder.eval()
