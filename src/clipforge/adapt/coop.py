"""CoOp: learned context vectors in place of the prompt's words, the rest of CLIP frozen.

Zhou et al., "Learning to Prompt for Vision-Language Models", IJCV 2022; official code KaiyangZhou/CoOp
(``trainers/coop.py``, ``configs/trainers/CoOp``).

The prompt of class c is ``[SOS] V_1 … V_M [CLASS] . [EOS]``: M = 16 context vectors in word-embedding space,
N(0, 0.02²) at the start (or, with ``ctx_init``, the word embeddings of that phrase, M = its length), shared by
all classes (unified) or one set per class (``class_specific``, CSC); the class token at the end. They enter the
text tower through its prompt hook (``clipforge.layers.prompts``) and get the position embedding like words.
CE on ``exp(logit_scale) · cos(f, g(prompt))``; SGD lr 0.002 (momentum 0.9, weight decay 5e-4), batch 32,
cosine after one warm-up epoch at 1e-5; 50 epochs at 1 shot, 100 at 2–4, 200 at 8–16.

Differences: the image tower is frozen in CoOp, so its features come from the cache of augmented views
(epoch e reads view e mod ``augment_epoch``, 10 views) instead of fresh crops every epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from clipforge.adapt.features import Augmentation
from clipforge.adapt.method import (
    AT_LEAST_ONE,
    NON_NEGATIVE,
    POSITIVE,
    FitInputs,
    Fitted,
    Head,
    Method,
    Range,
    Saved,
)
from clipforge.adapt.optim import Schedule, epoch_batches, optimise
from clipforge.adapt.selection import ZeroShotHead
from clipforge.adapt.tuning import (
    context_init,
    frozen,
    prompt_tokens,
    prompts_installed,
)
from clipforge.encode import model_device
from clipforge.layers.prompts import PromptTokens


@dataclass(frozen=True)
class CoopSettings:
    n_ctx: int = 16
    ctx_init: str = ""
    class_specific: bool = False
    epochs: int = 0  # 0: CoOp's schedule by shots (50 / 100 / 200)
    batch_size: int = 32
    lr: float = 0.002
    weight_decay: float = 5e-4
    augment_epoch: int = 10
    crop_scale: tuple[float, float] = (0.08, 1.0)
    flip: bool = True

    RANGES: ClassVar[dict[str, Range]] = {
        "n_ctx": AT_LEAST_ONE, "epochs": NON_NEGATIVE, "batch_size": AT_LEAST_ONE, "lr": POSITIVE,
        "weight_decay": NON_NEGATIVE, "augment_epoch": AT_LEAST_ONE,
    }


class ContextPrompts(PromptTokens):
    """Replaces the words at positions 1..M of each prompt by the context (shared [M, W] or per class [C, M, W])."""

    def __init__(self, context: torch.Tensor) -> None:
        super().__init__()
        self.context = nn.Parameter(context)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        context = self.context.to(x.dtype)
        context = context if context.dim() == 3 else context.expand(len(x), -1, -1)
        return torch.cat([x[:, :1], context, x[:, 1 + context.shape[1] :]], dim=1)


def coop_epochs(shots: int) -> int:
    return 50 if shots == 1 else 100 if shots <= 4 else 200


def prefix_of(settings: CoopSettings) -> tuple[str, int]:
    """The prompt's context placeholder and its length: ``ctx_init`` or M times "X"."""
    if settings.ctx_init:
        return settings.ctx_init, 0
    return " ".join(["X"] * settings.n_ctx), settings.n_ctx


def class_text(model: Any, prompts: ContextPrompts, tokens: torch.Tensor) -> torch.Tensor:
    """Normalised class embeddings [C, D] of the prompts with the context put in."""
    with prompts_installed(model, text=prompts):
        return model(None, tokens.to(model_device(model)))[1].float()


def fit_coop(inputs: FitInputs, settings: CoopSettings) -> Fitted:
    model, train = inputs.model, inputs.shots.train
    prefix, count = prefix_of(settings)
    tokens = prompt_tokens(model, prefix, train.classnames)
    if settings.ctx_init:
        count = int(model.tokenize([prefix])[0].argmax()) - 1
        start = context_init(model, prefix, count)
    else:
        start = torch.randn(count, model.text_cfg.width, generator=torch.Generator().manual_seed(inputs.shots.seed)) * 0.02
    if settings.class_specific:
        start = start.expand(len(train.classnames), -1, -1).clone()
    prompts = ContextPrompts(start.to(model_device(model)))
    views = inputs.cache.augmented(train, settings.augment_epoch, Augmentation(settings.crop_scale, settings.flip))
    labels = torch.as_tensor(train.labels)
    epochs = settings.epochs or coop_epochs(inputs.shots.shots)
    per_epoch = len(labels) // settings.batch_size if len(labels) >= settings.batch_size else 1
    batches = epoch_batches(len(labels), settings.batch_size, epochs, inputs.shots.seed, drop_last=True)
    scale = model.logit_scale.detach().exp().float()

    def loss_at(step: int) -> torch.Tensor:
        rows = batches[step]
        features = views[(step // per_epoch) % len(views)][rows].to(model_device(model))
        logits = scale * features @ class_text(model, prompts, tokens).T
        return torch.nn.functional.cross_entropy(logits, labels[rows].to(features.device))

    schedule = Schedule("sgd", settings.lr, epochs * per_epoch, weight_decay=settings.weight_decay, warmup=per_epoch)
    with frozen(model):
        loss = optimise(prompts.parameters(), schedule, loss_at, progress=inputs.progress, description="CoOp")
    extra = {"prefix": prefix, "final_loss": loss, "epochs": epochs}
    return Fitted({"context": prompts.context.detach().cpu()}, extra)


def rebuild(saved: Saved) -> Head:
    model = saved.model
    prompts = ContextPrompts(saved.tensors["context"].to(model_device(model)))
    with torch.no_grad():
        return ZeroShotHead(class_text(model, prompts, prompt_tokens(model, saved.extra["prefix"], saved.classnames)))


COOP = Method("coop", "prompts", CoopSettings, fit_coop, rebuild,
              "learned context vectors in the text prompt (Zhou et al., IJCV 2022)")
