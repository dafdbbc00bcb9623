"""Training LGViT's exit heads on a frozen CLIP model: the self-distillation loss and the training loop.

LGViT (Xu et al., "LGViT: Dynamic Early Exiting for Accelerating Vision Transformer", ACM MM 2023; official code
falcon-xu/LGViT 3147fb8, ``distillation_LGViT`` in ``models/deit_highway/modeling_highway_deit.py``): backbone
frozen, per exit a prediction term mixing a hard target and ``α·KL_T(exit ‖ final)·T²`` (summed, divided by the
logits' element count, α=0.3, T=2), plus 0.01× heterogeneous feature distillation (channel-softmax KL from the
first and last exit of each kind to the last block's patch tokens, subsampled to the head's stride) and 0.01×
homogeneous distillation (MSE of each exit's tokens to the last exit of its kind; Gram matrices for the global
heads). AdamW with linearly decaying lr (Hugging Face ``Trainer`` defaults used by ``run_distillation_deit.py``).

Adaptation to CLIP (ours): an exit emits an image embedding, so the hard target becomes
the final embedding itself (``1 − cosine``), and the KL compares zero-shot distributions over a text bank (class
embeddings) at the model's logit scale; without a text bank only the cosine term is used.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from clipforge._util.progress import progress_bar
from clipforge.compress.early_exit.batches import pixel_batches
from clipforge.compress.early_exit.heads import (
    ExitHeads,
    check_bank,
    check_full_tokens,
    check_number,
    resolve_logit_scale,
    subsample_grid,
)
from clipforge.errors import ConfigError, InputError
from clipforge.eval.zeroshot import zero_shot_logits
from clipforge.models.vit import VisionTransformer, image_tower

if TYPE_CHECKING:
    from clipforge.eval.datasets import ClassificationDataset

# The default training budget. LGViT trains its heads to convergence (50 epochs at 5e-5); ours is the budget past
# which doubling it gains less than a point of accuracy kept, measured on the demo model and the synthetic world's
# val split (task shape, threshold 0.8, batches of 32; the full model 82%). Steps / train samples:
# accuracy kept, blocks run of 4, and each exit's accuracy alone (after blocks 1, 2, 3):
#   200 / 1000: exits 43%, 59%, 72%;  2000 / 8000: 0.961, 1.78 blocks, exits 72%, 70%, 78%;
#   4000 / 16000: 0.980, 1.76, exits 74%, 73%, 78%;  8000 / 32000: 0.988, 1.68, exits 77%, 77%, 80%.
FIT_STEPS = 4000
SYNTHETIC_FIT_IMAGES = 16000  # samples of a synthetic task's train split to learn from (those the task can label)


@torch.no_grad()
def _frozen_pass(
    tower: VisionTransformer, pixels: torch.Tensor, layers: list[int]
) -> tuple[dict[int, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The frozen tower's tokens after each exit block, the last block's tokens, and the final embedding."""
    check_full_tokens(tower)
    exit_tokens, x = {}, None
    for index, x, _ in tower.transformer.iterate(tower.embed(pixels)):
        if index in layers:
            exit_tokens[index] = x
    return exit_tokens, x, tower.head(x)


def exit_distillation_loss(
    model: nn.Module,
    heads: ExitHeads,
    pixels: torch.Tensor,
    *,
    text_bank: torch.Tensor | None = None,
    distill_weight: float = 0.3,
    temperature: float = 2.0,
    feature_weight: float = 0.01,
    logit_scale: float | None = None,
) -> torch.Tensor:
    """LGViT's stage-2 loss (``distillation_LGViT``) for CLIP exits, against the frozen model; see the module docstring.

    Per exit: ``1 − cos(exit, final)`` alone, or with a ``text_bank`` [D, C]
    ``(1 − distill_weight)·(1 − cos) + distill_weight·KL_T`` of the zero-shot distributions; summed over exits, plus
    ``feature_weight`` times the heterogeneous and homogeneous feature terms.
    """
    distill_weight = check_number("distill_weight", distill_weight, 0.0, 1.0)
    temperature = check_number("temperature", temperature, 1e-6)
    feature_weight = check_number("feature_weight", feature_weight, 0.0)
    tower = image_tower(model)
    exit_tokens, final_tokens, teacher = _frozen_pass(tower, pixels, heads.layers)
    outputs = {layer: heads(layer, exit_tokens[layer]) for layer in heads.layers}
    loss = torch.zeros((), device=pixels.device)
    for embedding, _ in outputs.values():
        cosine = 1 - F.cosine_similarity(embedding.float(), teacher.float(), dim=-1).mean()
        loss = loss + (cosine if text_bank is None else (1 - distill_weight) * cosine)
    if text_bank is not None:
        bank, scale = check_bank("text_bank", text_bank, heads), resolve_logit_scale(model, logit_scale)
        teacher_logits = zero_shot_logits(teacher, bank, scale) / temperature
        for embedding, _ in outputs.values():
            student_logits = zero_shot_logits(embedding, bank, scale) / temperature
            kl = F.kl_div(student_logits.log_softmax(-1), teacher_logits.log_softmax(-1), reduction="sum", log_target=True)
            loss = loss + distill_weight * kl * temperature**2 / student_logits.numel()
    return loss + feature_weight * _feature_distillation(heads, outputs, final_tokens[:, 1:])


def _feature_distillation(
    heads: ExitHeads, outputs: dict[int, tuple[torch.Tensor, torch.Tensor]], final_patches: torch.Tensor
) -> torch.Tensor:
    """LGViT's heterogeneous (``cal_hete_loss``) plus homogeneous (``cal_homo_loss``) feature distillation."""
    total = torch.zeros((), device=final_patches.device)
    for family in ("local", "global"):
        members = [layer for layer, kind in zip(heads.layers, heads.kinds) if kind.startswith(family)]
        if not members:
            continue
        for layer in dict.fromkeys((members[0], members[-1])):
            mixed = outputs[layer][1].float()
            target = subsample_grid(final_patches, heads.exits[str(layer)].stride).float()
            total = total + F.kl_div(mixed.log_softmax(-1), target.log_softmax(-1), reduction="batchmean", log_target=True)
        last = outputs[members[-1]][1].float()
        for layer in members[:-1]:
            mixed = outputs[layer][1].float()
            if family == "global":
                mixed, last_aligned = mixed.transpose(1, 2) @ mixed, last.transpose(1, 2) @ last
            else:
                last_aligned = last
            total = total + F.mse_loss(mixed, last_aligned)
    return total


def train_exit_heads(
    model: nn.Module,
    heads: ExitHeads,
    data: Iterable[Any],
    steps: int,
    lr: float = 1e-3,
    **loss_settings: Any,
) -> list[float]:
    """Train ``heads`` on the frozen ``model`` for ``steps`` batches of ``data``; returns the loss of each step.

    ``data`` yields pixel batches [B, 3, H, W] or tuples whose first item is one (an image-caption loader).
    AdamW (no weight decay) with the learning rate decaying linearly to 0, as LGViT's Hugging Face ``Trainer``;
    LGViT fine-tunes 50 epochs at 5e-5, short runs need more. ``loss_settings`` go to ``exit_distillation_loss``.
    Leaves the model's mode unchanged and the heads in eval mode.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps: must be a positive integer, got {steps!r}")
    check_number("lr", lr, 1e-12)
    device = image_tower(model).proj.device
    optimizer = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    was_training = model.training
    model.eval()
    heads.train()
    losses: list[float] = []
    batches = iter(data)
    try:
        for step in range(steps):
            batch = next(batches, None)
            if batch is None:
                raise InputError(f"data: ran out after {step} of {steps} steps")
            pixels = batch[0] if isinstance(batch, tuple | list) else batch
            loss = exit_distillation_loss(model, heads, pixels.to(device), **loss_settings)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
    finally:
        model.train(was_training)
        heads.eval()
    return losses


def fit_exit_heads(
    model: nn.Module,
    dataset: ClassificationDataset,
    text_bank: torch.Tensor | None = None,
    *,
    steps: int = FIT_STEPS,
    batch_size: int = 32,
    lr: float = 1e-3,
    layers: Sequence[int] | None = None,
    kinds: Sequence[str] | None = None,
    progress: bool = False,
    **loss_settings: Any,
) -> ExitHeads:
    """New ``ExitHeads(model, layers, kinds)`` trained by ``train_exit_heads`` on ``dataset``'s images.

    Batches of ``batch_size`` images in order, cycling, preprocessed by ``model.preprocess``; ``text_bank``
    [D, C] (the task's zero-shot classifier) adds the KL term. A progress bar (stderr) when ``progress``.
    """
    heads = ExitHeads(model, layers, kinds)
    with progress_bar(disable=not progress) as bar:
        task = bar.add_task("training exit heads", total=steps, unit="step")
        batches = pixel_batches(model, dataset.images, batch_size, forever=True, advance=lambda: bar.advance(task))
        train_exit_heads(model, heads, batches, steps, lr, text_bank=text_bank, **loss_settings)
    return heads
