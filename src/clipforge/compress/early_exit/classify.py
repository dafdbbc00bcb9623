"""Zero-shot classification with early exit: each image stops at its first confident exit (LGViT's rule).

LGViT (Xu et al., "LGViT: Dynamic Early Exiting for Accelerating Vision Transformer", ACM MM 2023; official code
falcon-xu/LGViT 3147fb8, ``DeiTEncoder.forward`` and ``confidence`` in ``models/deit_highway/modeling_highway_deit.py``):
after each exit block, exit if the prediction's ``max softmax > threshold``. Adaptation to CLIP (ours, see the
package docstring): the exit's image embedding is classified zero-shot against the class text embeddings at the
model's logit scale. This serves classification against a fixed prompt bank, not retrieval.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from clipforge.compress.early_exit.batches import pixel_batches
from clipforge.compress.early_exit.fold import fold_batch_norms
from clipforge.compress.early_exit.heads import (
    ExitHeads,
    check_bank,
    check_full_tokens,
    check_number,
    resolve_logit_scale,
)
from clipforge.encode import encode_pixels
from clipforge.errors import ConfigError
from clipforge.eval.zeroshot import zero_shot_logits
from clipforge.models.vit import image_tower

if TYPE_CHECKING:
    from clipforge.eval.datasets import ClassificationDataset


@dataclass
class EarlyExitResult:
    predictions: torch.Tensor  # [B] class index
    depths: torch.Tensor  # [B] blocks run before the image exited (1..layers)
    confidences: torch.Tensor  # [B] max softmax probability at the exit taken

    @property
    def average_depth(self) -> float:
        return self.depths.float().mean().item()


class EarlyExitClassifier:
    """Zero-shot classification that stops each image at its first confident exit (LGViT's confidence rule).

    After each exit block, the exit's embedding is classified against ``classifier`` [D, C] (from
    ``build_zero_shot_classifier``) at the model's logit scale; an image leaves when its max softmax probability
    exceeds ``threshold``. Others go on; after the last block the model's own embedding decides. Images that
    leave are dropped from the batch, so each later block runs on the images still in: the depths are the
    compute spent, and every image's answer is the one it gets alone (LGViT evaluates one image at a time).
    Puts the model in eval mode; runs a copy of ``heads`` made at construction, with their BatchNorms folded
    (``fold_batch_norms``): later changes to ``heads`` need a new classifier.
    """

    def __init__(
        self,
        model: nn.Module,
        heads: ExitHeads,
        classifier: torch.Tensor,
        threshold: float,
        *,
        logit_scale: float | None = None,
    ) -> None:
        self.tower = image_tower(model)
        if heads.num_layers != self.tower.cfg.layers:
            raise ConfigError(f"heads: made for a {heads.num_layers}-block tower, the model has {self.tower.cfg.layers}")
        self.heads = fold_batch_norms(heads, self.tower.grid_size)
        model.eval()
        self.classifier = check_bank("classifier", classifier, heads).to(self.tower.proj.device)
        self.threshold = check_number("threshold", threshold, 0.0)
        self.logit_scale = resolve_logit_scale(model, logit_scale)

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor) -> EarlyExitResult:
        tower = self.tower
        check_full_tokens(tower)
        batch, device = pixels.shape[0], tower.proj.device
        predictions = torch.zeros(batch, dtype=torch.long, device=device)
        confidences = torch.zeros(batch, device=device)
        depths = torch.zeros(batch, dtype=torch.long, device=device)
        waiting = torch.arange(batch, device=device)  # the images still in, by their row in ``pixels``
        x = tower.embed(pixels.to(device))
        last = tower.cfg.layers - 1
        for index, block in enumerate(tower.transformer.resblocks):
            if tower.prompts is not None:
                x = tower.prompts.before_block(index, x)
            # as VisionTransformer.forward: with class-token pooling the last block computes that token alone
            x, _ = block(x, layer=index, first_token_only=index == last and tower.cfg.pool_type == "tok")
            if index != last and index not in self.heads.layers:
                continue
            embedding = tower.head(x) if index == last else self.heads(index, x)[0]
            probabilities = zero_shot_logits(embedding, self.classifier, self.logit_scale).softmax(-1)
            confidence, prediction = probabilities.max(-1)
            leaving = confidence > self.threshold if index != last else torch.ones_like(confidence, dtype=torch.bool)
            rows = waiting[leaving]
            predictions[rows], confidences[rows], depths[rows] = prediction[leaving], confidence[leaving], index + 1
            x, waiting = x[~leaving], waiting[~leaving]
            if waiting.numel() == 0:
                break
        return EarlyExitResult(predictions, depths, confidences)


@dataclass(frozen=True)
class EarlyExitEvaluation:
    """Early exit against the full model on one labelled set (``evaluate_early_exit``); shares in [0, 1]."""

    dataset: str
    exit_layers: list[int]  # blocks (0-based) followed by an exit
    threshold: float
    blocks: int  # blocks of the image tower: the depth of the full model
    full_accuracy: float  # the full model's zero-shot accuracy
    accuracy: float  # with early exit
    agreement: float  # images early exit classifies as the full model does
    average_depth: float  # blocks run per image, on average (images leave the batch: compute actually spent)
    seconds: float  # wall time of early exit over the set (heads included, preprocessing excluded)
    full_seconds: float  # wall time of the full model's image tower and zero-shot head on the same batches

    @property
    def speedup(self) -> float:
        """Measured: the full model's wall time over early exit's."""
        return self.full_seconds / self.seconds


def evaluate_early_exit(
    model: nn.Module,
    heads: ExitHeads,
    dataset: ClassificationDataset,
    classifier: torch.Tensor,
    threshold: float,
    *,
    batch_size: int = 32,
    repeats: int = 5,
) -> EarlyExitEvaluation:
    """Classify ``dataset``'s images with ``EarlyExitClassifier`` and with the full model (``classifier`` [D, C]
    for both; its zero-shot head, e.g. ``Evaluator.classifier``): accuracy, agreement, average depth, and both
    wall times on the same preprocessed pixels: each batch runs under both ``repeats`` times, in turn, the order
    swapped each time, and the medians per batch add up (both run once untimed first: a path's first call builds
    its kernels; single timings of a few milliseconds move by 10% on a shared machine)."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"repeats: must be a positive integer, got {repeats!r}")
    classify = EarlyExitClassifier(model, heads, classifier, threshold)
    bank = classifier.cpu()  # encode_pixels answers on the CPU

    @torch.inference_mode()
    def full_model(pixels: torch.Tensor) -> torch.Tensor:
        return zero_shot_logits(encode_pixels(model, pixels, batch_size), bank).argmax(dim=1)

    def early_exit(pixels: torch.Tensor) -> EarlyExitResult:
        result = classify(pixels)
        result.predictions.cpu()  # waits for the device, as encode_pixels does
        return result

    paths = {"early": early_exit, "full": full_model}
    early, full, seconds, full_seconds = [], [], 0.0, 0.0
    for index, pixels in enumerate(pixel_batches(model, dataset.images, batch_size)):
        if index == 0:  # warm-up, untimed
            early_exit(pixels)
            full_model(pixels)
        outputs: dict[str, Any] = {}
        times: dict[str, list[float]] = {"early": [], "full": []}
        for repeat in range(repeats):
            for name in ("early", "full") if repeat % 2 == 0 else ("full", "early"):  # neither always goes first
                start = time.perf_counter()
                outputs[name] = paths[name](pixels)
                times[name].append(time.perf_counter() - start)
        early.append(outputs["early"])
        full.append(outputs["full"])
        seconds += statistics.median(times["early"])
        full_seconds += statistics.median(times["full"])
    depths = torch.cat([result.depths.cpu() for result in early])
    predictions, full_predictions = torch.cat([result.predictions.cpu() for result in early]), torch.cat(full)
    labels = torch.as_tensor(dataset.labels)
    return EarlyExitEvaluation(
        dataset=dataset.name,
        exit_layers=list(heads.layers),
        threshold=threshold,
        blocks=classify.tower.cfg.layers,
        full_accuracy=(full_predictions == labels).float().mean().item(),
        accuracy=(predictions == labels).float().mean().item(),
        agreement=(predictions == full_predictions).float().mean().item(),
        average_depth=depths.float().mean().item(),
        seconds=seconds,
        full_seconds=full_seconds,
    )
