"""Zero-shot classification with early exit: each image stops at its first confident exit (LGViT's rule).

LGViT (Xu et al., "LGViT: Dynamic Early Exiting for Accelerating Vision Transformer", ACM MM 2023; official code
falcon-xu/LGViT 3147fb8, ``DeiTEncoder.forward`` and ``confidence`` in ``models/deit_highway/modeling_highway_deit.py``):
after each exit block, exit if the prediction's ``max softmax > threshold``. Adaptation to CLIP (ours, see the
package docstring): the exit's image embedding is classified zero-shot against the class text embeddings at the
model's logit scale. This serves classification against a fixed prompt bank, not retrieval.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from clipforge.compress.early_exit.batches import pixel_batches
from clipforge.compress.early_exit.heads import (
    ExitHeads,
    check_bank,
    check_full_tokens,
    check_number,
    resolve_logit_scale,
)
from clipforge.encode import embed_images
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
    exceeds ``threshold``. Others go on; after the last block the model's own embedding decides. The blocks run
    until the last image of the batch has left; LGViT evaluates one image at a time, which turns each image's
    depth into saved compute. Puts model and heads in eval mode.
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
        self.heads = heads.eval()
        model.eval()
        self.classifier = check_bank("classifier", classifier, heads).to(self.tower.proj.device)
        self.threshold = check_number("threshold", threshold, 0.0)
        self.logit_scale = resolve_logit_scale(model, logit_scale)

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor) -> EarlyExitResult:
        check_full_tokens(self.tower)
        batch, device = pixels.shape[0], self.tower.proj.device
        predictions = torch.zeros(batch, dtype=torch.long, device=device)
        confidences = torch.zeros(batch, device=device)
        depths = torch.zeros(batch, dtype=torch.long, device=device)
        waiting = torch.arange(batch, device=device)
        last = self.tower.cfg.layers - 1
        for index, x, state in self.tower.transformer.iterate(self.tower.embed(pixels.to(device))):
            if index != last and index not in self.heads.layers:
                continue
            tokens = x[waiting]
            embedding = self.tower.head(tokens, state) if index == last else self.heads(index, tokens)[0]
            probabilities = zero_shot_logits(embedding, self.classifier, self.logit_scale).softmax(-1)
            confidence, prediction = probabilities.max(-1)
            leaving = confidence > self.threshold if index != last else torch.ones_like(confidence, dtype=torch.bool)
            rows = waiting[leaving]
            predictions[rows], confidences[rows], depths[rows] = prediction[leaving], confidence[leaving], index + 1
            waiting = waiting[~leaving]
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
    average_depth: float  # blocks run per image, on average


def evaluate_early_exit(
    model: nn.Module,
    heads: ExitHeads,
    dataset: ClassificationDataset,
    classifier: torch.Tensor,
    threshold: float,
    *,
    batch_size: int = 32,
) -> EarlyExitEvaluation:
    """Classify ``dataset``'s images with ``EarlyExitClassifier`` and with the full model (``classifier`` [D, C]
    for both; its zero-shot head, e.g. ``Evaluator.classifier``); accuracy, agreement and average depth."""
    classify = EarlyExitClassifier(model, heads, classifier, threshold)
    results = [classify(pixels) for pixels in pixel_batches(model, dataset.images, batch_size)]
    early = torch.cat([result.predictions for result in results]).cpu()
    depth = torch.cat([result.depths for result in results]).float().mean().item()
    features = embed_images(model, dataset.images, batch_size=batch_size, workers=0, strict=True, progress=False).embeddings
    full = zero_shot_logits(torch.from_numpy(features), classifier).argmax(dim=1)
    labels = torch.as_tensor(dataset.labels)
    return EarlyExitEvaluation(
        dataset=dataset.name,
        exit_layers=list(heads.layers),
        threshold=threshold,
        blocks=classify.tower.cfg.layers,
        full_accuracy=(full == labels).float().mean().item(),
        accuracy=(early == labels).float().mean().item(),
        agreement=(early == full).float().mean().item(),
        average_depth=depth,
    )
