"""The training loop of the methods that run the towers with gradients (CoOp, MaPLe, CLIP-LoRA, CLIP-SVD, WiSE-FT).

Each step draws a batch of few-shot images, augments them (``clipforge.adapt.features.Augmentation``; view =
epoch, so every epoch sees new crops), runs the model's forward (``model(pixels, tokens)``, not the
inference-only ``clipforge.encode``) and minimises the cross-entropy of ``exp(logit_scale) · cos(image, class)``,
the loss of CoOp, MaPLe, CLIP-LoRA and CLIP-SVD. Class embeddings are the renormalised mean over the
dataset's templates (one template: exactly the papers' single prompt), recomputed every step when the text
side trains. ``amp`` runs the forward under autocast (bf16 on a CPU, fp16 on CUDA), as the official code does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.adapt.features import Augmentation, augmented_batch
from clipforge.adapt.fewshot import Shots
from clipforge.adapt.optim import Schedule, epoch_batches, optimise
from clipforge.encode import model_device
from clipforge.errors import ConfigError
from clipforge.eval.zeroshot import fill_template


@dataclass(frozen=True)
class Loop:
    """How many steps of which batches: ``steps`` of ``batch_size`` images, reshuffled every pass."""

    steps: int
    batch_size: int
    augmentation: Augmentation
    seed: int
    amp: bool = False


def class_tokens(model: Any, classnames: list[str], templates: Any) -> tuple[torch.Tensor, int]:
    """Token ids of every (class, template) prompt, class-major, and the number of templates per class."""
    if isinstance(templates, dict):
        raise ConfigError("--templates: per-class descriptions (CuPL) cannot be tuned through; give {c} templates")
    prompts = [fill_template(template, name) for name in classnames for template in templates]
    return model.tokenize(prompts), len(templates)


def class_embeddings(text_features: torch.Tensor, per_class: int) -> torch.Tensor:
    """Normalised prompt embeddings [C · M, D] → the renormalised mean per class [C, D]."""
    grouped = F.normalize(text_features.float(), dim=-1).view(-1, per_class, text_features.shape[-1])
    return F.normalize(grouped.mean(dim=1), dim=-1)


def text_embeddings(model: nn.Module, tokens: torch.Tensor, per_class: int) -> torch.Tensor:
    """Class embeddings [C, D] through the model's forward (with gradients when they are enabled)."""
    return class_embeddings(model(None, tokens.to(model_device(model)))[1], per_class)


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Every parameter of ``module`` without gradients for the duration; their flags are restored after."""
    flags = [(parameter, parameter.requires_grad) for parameter in module.parameters()]
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def autocast(model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    device = model_device(model)
    return torch.autocast(device.type, dtype=torch.bfloat16 if device.type == "cpu" else torch.float16, enabled=enabled)


def train_classifier(
    model: nn.Module,
    parameters: list[nn.Parameter],
    shots: Shots,
    loop: Loop,
    schedule: Schedule,
    classes: Callable[[], torch.Tensor],
    *,
    images: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: bool = False,
    description: str = "tuning",
) -> float:
    """Minimise CE(exp(logit_scale) · cos(image, class)) over ``parameters`` for ``loop.steps`` steps.

    ``classes()`` gives the class embeddings [C, D] (normalised) and ``images(pixels)`` the image embeddings
    (default: the model's forward), both recomputed each step so that gradients reach what they depend on.
    """
    device = model_device(model)
    labels = torch.as_tensor(shots.labels)
    per_epoch = len(shots) // loop.batch_size if len(shots) >= loop.batch_size else 1  # Dassl's drop_last loader
    batches = epoch_batches(len(shots), loop.batch_size, -(-loop.steps // per_epoch), loop.seed, drop_last=True)
    encode = images or (lambda pixels: model(pixels)[0])
    scale = model.logit_scale.detach().exp().float()
    pictures = shots.images

    def loss_at(step: int) -> torch.Tensor:
        rows = batches[step].tolist()
        pixels = augmented_batch(model, [pictures[i] for i in rows], [shots.keys[i] for i in rows], step // per_epoch,
                                 loop.augmentation)
        with autocast(model, loop.amp):
            logits = scale * F.normalize(encode(pixels.to(device)).float(), dim=-1) @ classes().float().T
        return F.cross_entropy(logits, labels[rows].to(device))

    was_training = model.training
    model.train()
    try:
        return optimise(parameters, schedule, loss_at, progress=progress, description=description)
    finally:
        model.train(was_training)


@contextlib.contextmanager
def prompts_installed(model: nn.Module, text: nn.Module | None = None, image: nn.Module | None = None) -> Iterator[None]:
    """``model`` with ``text`` as its text tower's prompt hook and ``image`` as its image tower's for the duration."""
    before = (model.text_prompts, model.visual.prompts)
    model.text_prompts, model.visual.prompts = text, image
    try:
        yield
    finally:
        model.text_prompts, model.visual.prompts = before


def prompt_tokens(model: Any, prefix: str, classnames: list[str]) -> torch.Tensor:
    """Token ids of ``"{prefix} {classname}."`` per class (CoOp's and MaPLe's prompts; the prefix's words are
    the learned context's places)."""
    return model.tokenize([f"{prefix} {name}." for name in classnames])


def context_init(model: Any, prefix: str, count: int) -> torch.Tensor:
    """The word embeddings of the first ``count`` tokens of ``prefix`` [count, width] (CoOp's ``CTX_INIT``)."""
    tokens = model.tokenize([prefix])[0]
    found = int(tokens.argmax()) - 1
    if found < count:
        raise ConfigError(f"ctx_init: {prefix!r} has {found} tokens, fewer than the {count} context vectors asked")
    with torch.no_grad():
        return model.token_embedding(tokens[1 : 1 + count].to(model_device(model))).float().clone()
