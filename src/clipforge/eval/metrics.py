"""Classification and retrieval metrics on logits and embeddings, with CLIP_benchmark's definitions.

Follows LAION-AI/CLIP_benchmark ``metrics/zeroshot_classification.py`` (``acc1``, ``acc5`` with NaN
when there are fewer classes than k, ``mean_per_class_recall`` = balanced accuracy, per-class
average precision in the torchnet style for multi-label sets) and ``metrics/zeroshot_retrieval.py``
(recall@k as in the CLIP paper: a query counts as a hit when ANY of its correct items is among the
top k). Inputs may be torch tensors (any device) or numpy arrays; results are Python floats or
tensors on the input's device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from clipforge.errors import InputError

ArrayLike = torch.Tensor | np.ndarray | Sequence


def as_float_tensor(values: ArrayLike, name: str, ndim: int) -> torch.Tensor:
    """``values`` as a floating tensor of ``ndim`` dimensions (half precision widened to float32)."""
    tensor = torch.as_tensor(values)
    if tensor.ndim != ndim:
        raise InputError(f"{name}: expected a {ndim}-D array, got shape {tuple(tensor.shape)}")
    if tensor.numel() == 0:
        raise InputError(f"{name}: is empty (shape {tuple(tensor.shape)})")
    if not tensor.is_floating_point() or tensor.dtype in (torch.float16, torch.bfloat16):
        tensor = tensor.float()
    if torch.isnan(tensor).any():
        raise InputError(f"{name}: contains NaN")
    return tensor


def as_label_tensor(values: ArrayLike, name: str, num_classes: int | None = None) -> torch.Tensor:
    """``values`` as a 1-D int64 tensor of class ids in ``[0, num_classes)``."""
    labels = torch.as_tensor(values)
    if labels.ndim != 1 or labels.numel() == 0:
        raise InputError(f"{name}: expected a non-empty 1-D array of class ids, got shape {tuple(labels.shape)}")
    if labels.is_floating_point() and not torch.equal(labels, labels.round()):
        raise InputError(f"{name}: class ids must be whole numbers")
    labels = labels.long()
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or (num_classes is not None and high >= num_classes):
        expected = "non-negative" if num_classes is None else f"in [0, {num_classes})"
        raise InputError(f"{name}: class ids must be {expected}, got values from {low} to {high}")
    return labels


def scores_and_labels(
    scores: ArrayLike, labels: ArrayLike, scores_name: str = "logits", labels_name: str = "targets"
) -> tuple[torch.Tensor, torch.Tensor]:
    """A checked (N, C) score matrix and its N class ids, on the scores' device."""
    score_tensor = as_float_tensor(scores, scores_name, 2)
    label_tensor = as_label_tensor(labels, labels_name, num_classes=score_tensor.shape[1])
    if len(label_tensor) != len(score_tensor):
        raise InputError(f"{labels_name}: has {len(label_tensor)} entries but {scores_name} has {len(score_tensor)} rows")
    return score_tensor, label_tensor.to(score_tensor.device)


def _check_ks(ks: Sequence[int]) -> None:
    if not ks or any(int(k) < 1 for k in ks):
        raise InputError(f"ks: expected positive integers, got {tuple(ks)}")


def topk_accuracy(logits: ArrayLike, targets: ArrayLike, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Fraction of samples whose target is among the k highest logits, as ``{"acc1": ..., "acc5": ...}``.

    ``acc{k}`` is NaN when k exceeds the number of classes (CLIP_benchmark reports ``acc5`` as NaN
    for datasets with fewer than 5 classes).
    """
    logits, targets = scores_and_labels(logits, targets)
    _check_ks(ks)
    num_classes = logits.shape[1]
    computable = [k for k in ks if k <= num_classes]
    hits = logits.topk(max(computable, default=1), dim=1).indices == targets[:, None]
    return {f"acc{k}": hits[:, :k].any(dim=1).double().mean().item() if k <= num_classes else float("nan") for k in ks}


def confusion_matrix(logits: ArrayLike, targets: ArrayLike) -> torch.Tensor:
    """(C, C) int64 counts: row = true class, column = predicted class (argmax of the logits)."""
    logits, targets = scores_and_labels(logits, targets)
    num_classes = logits.shape[1]
    cells = targets * num_classes + logits.argmax(dim=1)
    return torch.bincount(cells, minlength=num_classes * num_classes).view(num_classes, num_classes)


def mean_per_class_recall(logits: ArrayLike, targets: ArrayLike) -> float:
    """Recall averaged over the classes present in ``targets`` (balanced accuracy, as scikit-learn's)."""
    counts = confusion_matrix(logits, targets)
    support = counts.sum(dim=1)
    present = support > 0
    return (counts.diagonal()[present].double() / support[present]).mean().item()


def average_precision_per_class(scores: ArrayLike, multi_label_targets: ArrayLike) -> torch.Tensor:
    """(C,) average precision of each class's ranking of the N samples (torchnet ``APMeter`` style).

    For class c, samples are sorted by ``scores[:, c]`` (descending, ties in sample order) and AP is
    the mean of the precision at the rank of each positive; a class with no positive gets 0, as in
    CLIP_benchmark's ``average_precision_per_class``.
    """
    score_tensor = as_float_tensor(scores, "scores", 2)
    truth = as_float_tensor(multi_label_targets, "multi_label_targets", 2).to(score_tensor.device)
    if truth.shape != score_tensor.shape:
        raise InputError(f"multi_label_targets: shape {tuple(truth.shape)} differs from scores {tuple(score_tensor.shape)}")
    if not ((truth == 0) | (truth == 1)).all():
        raise InputError("multi_label_targets: expected a 0/1 indicator matrix (samples x classes)")
    order = score_tensor.argsort(dim=0, descending=True, stable=True)
    ranked_truth = truth.gather(0, order).double()
    ranks = torch.arange(1, len(ranked_truth) + 1, device=ranked_truth.device, dtype=torch.float64)[:, None]
    precision = ranked_truth.cumsum(dim=0) / ranks
    return (precision * ranked_truth).sum(dim=0) / ranked_truth.sum(dim=0).clamp(min=1)


def mean_average_precision(scores: ArrayLike, multi_label_targets: ArrayLike) -> float:
    """Mean over classes of ``average_precision_per_class`` (CLIP_benchmark's multi-label metric)."""
    return average_precision_per_class(scores, multi_label_targets).mean().item()


def classification_metrics(logits: ArrayLike, targets: ArrayLike) -> dict[str, float]:
    """CLIP_benchmark's zero-shot classification metrics.

    Single-label targets (N,) give ``acc1``, ``acc5`` and ``mean_per_class_recall``; multi-label
    0/1 targets (N, C) give ``mean_average_precision``.
    """
    if torch.as_tensor(targets).ndim == 2:
        return {"mean_average_precision": mean_average_precision(logits, targets)}
    return {**topk_accuracy(logits, targets, ks=(1, 5)), "mean_per_class_recall": mean_per_class_recall(logits, targets)}


def _any_positive_in_top_k(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    is_positive: Callable[[slice, torch.Tensor], torch.Tensor],
    ks: Sequence[int],
    batch_size: int,
) -> torch.Tensor:
    """(Q, len(ks)) bool: whether any of the top-k candidates of each query is a positive.

    Scores are computed ``batch_size`` queries at a time, so memory holds ``batch_size x M`` scores.
    ``is_positive(rows, top)`` maps the (B, K) candidate indices of query rows ``rows`` to booleans.
    A k larger than the number of candidates means all of them.
    """
    top_k = min(max(ks), len(candidates))
    hits = torch.empty(len(queries), len(ks), dtype=torch.bool, device=queries.device)
    for start in range(0, len(queries), batch_size):
        rows = slice(start, start + batch_size)
        top = (queries[rows] @ candidates.T).topk(top_k, dim=1).indices
        positive = is_positive(rows, top)
        for column, k in enumerate(ks):
            hits[rows, column] = positive[:, :k].any(dim=1)
    return hits


def retrieval_recall_at_k(
    image_emb: ArrayLike,
    text_emb: ArrayLike,
    texts_image_index: ArrayLike,
    ks: Sequence[int] = (1, 5, 10),
    batch_size: int = 1024,
) -> dict[str, float]:
    """Image-text retrieval recall@k by cosine similarity, as CLIP_benchmark's ``zeroshot_retrieval``.

    ``texts_image_index[j]`` is the image that caption j describes (an image may have several).
    ``image_retrieval_recall@k`` (text -> image): fraction of captions whose image is in their top k.
    ``text_retrieval_recall@k`` (image -> text): fraction of captioned images with at least one of
    their captions in their top k; images without a caption are distractors for text -> image only.
    A k above the number of candidates counts all of them. Similarities are computed ``batch_size``
    queries at a time (memory ``batch_size x candidates``), never as the full matrix.
    """
    _check_ks(ks)
    if batch_size < 1:
        raise InputError(f"batch_size: expected a positive integer, got {batch_size}")
    images = F.normalize(as_float_tensor(image_emb, "image_emb", 2), dim=-1)
    texts = F.normalize(as_float_tensor(text_emb, "text_emb", 2), dim=-1).to(images.device, images.dtype)
    if texts.shape[1] != images.shape[1]:
        raise InputError(f"text_emb: dimension {texts.shape[1]} differs from image_emb dimension {images.shape[1]}")
    text_to_image = as_label_tensor(texts_image_index, "texts_image_index", num_classes=len(images)).to(images.device)
    if len(text_to_image) != len(texts):
        raise InputError(f"texts_image_index: has {len(text_to_image)} entries but text_emb has {len(texts)} rows")

    image_hits = _any_positive_in_top_k(
        texts, images, lambda rows, top: top == text_to_image[rows, None], ks, batch_size
    )
    captioned = torch.bincount(text_to_image, minlength=len(images)) > 0
    image_ids = torch.arange(len(images), device=images.device)
    text_hits = _any_positive_in_top_k(
        images, texts, lambda rows, top: text_to_image[top] == image_ids[rows, None], ks, batch_size
    )[captioned]
    metrics: dict[str, float] = {}
    for column, k in enumerate(ks):
        metrics[f"image_retrieval_recall@{k}"] = image_hits[:, column].double().mean().item()
        metrics[f"text_retrieval_recall@{k}"] = text_hits[:, column].double().mean().item()
    return metrics
