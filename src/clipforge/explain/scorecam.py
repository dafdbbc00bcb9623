"""Score-CAM for image–text pairs: Wang et al., "Score-CAM: Score-Weighted Visual Explanations for
Convolutional Neural Networks", CVPRW 2020, with a CLIP similarity target as in CLIP-ReIdent
(jacobgil/pytorch-grad-cam ``score_cam.py`` with ``vit_reshape_transform``).

The patch tokens of one image block (default: the last) are K = width activation maps A_k on the patch grid.
Each map is upsampled to the input size (bilinear, corners aligned as ``UpsamplingBilinear2d``) and min-max
scaled to [0, 1]; the preprocessed image X is masked by it and encoded; the cosine c_k of that embedding to the
text is the channel's score, and c_b that of the baseline image X_b (all zeros after normalisation: the dataset
mean colour). The map is ``relu(Σ_k w_k · A_k)``, upsampled and min-max scaled, with the channel weights w:

- ``cosine``: softmax_k(c_k), pytorch-grad-cam's ``ScoreCAM`` with ``SimilarityToConceptTarget``;
- ``logit``: softmax_k(s · c_k), s the model's logit scale: the paper's Algorithm 1 on CLIP's output scale
  (its baseline subtraction f(X∘H_k) − f(X_b) cancels inside a softmax over channels);
- ``increase``: s · (c_k − c_b), the paper's channel-wise increase of confidence (CIC) itself, unnormalised,
  so a channel whose mask lowers the similarity below the baseline's counts against its region.

``DEFAULT_WEIGHTING`` was chosen by a test fixed before its results were seen
(``tests/test_explain_localisation.py``, slow): on 200 synthetic images with a left and a right object, the map
for each object's caption must put more of its mass on that object than the other caption's map does, in
significantly more than half of the images (one-sided sign test, p < 0.01); the weighting with the most such
images wins (ties: increase, logit, cosine). Gradient-free; K + 1 forward passes per image, batched, shared by
every text and weighting. A model with token merging or pruning (ToMe, PiToMe, EViT) is refused, as by attention
rollout: its tokens no longer form the patch grid the maps live on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clipforge.encode import Encoder, encode_pixels, model_device
from clipforge.errors import ConfigError, InputError

WEIGHTINGS = ("cosine", "logit", "increase")
DEFAULT_WEIGHTING = "logit"


def _scaled_per_map(maps: torch.Tensor) -> torch.Tensor:
    """Min-max scale every [H, W] map of a [..., H, W] tensor to [0, 1]."""
    low = maps.amin(dim=(-2, -1), keepdim=True)
    high = maps.amax(dim=(-2, -1), keepdim=True)
    return (maps - low) / (high - low + 1e-8)


@dataclass(frozen=True)
class ChannelScores:
    """What every weighting needs, computed once per image: activations and the similarities to each text."""

    activations: torch.Tensor  # [B, K, h, w] float32, on the model's device
    masked: torch.Tensor  # [B, K, T] cosine of each masked image to each text
    baseline: torch.Tensor  # [B, T] cosine of the baseline image to each text
    logit_scale: float
    size: tuple[int, int]  # input height, width


@torch.inference_mode()
def channel_scores(
    model: Encoder, pixels: torch.Tensor, text_embeddings: torch.Tensor, *, layer: int = -1, batch_size: int = 32
) -> ChannelScores:
    """Activations of block ``layer`` for preprocessed ``pixels`` [B, 3, H, W] and their masked images' cosines
    to ``text_embeddings`` [T, D] (normalised here)."""
    if pixels.ndim != 4:
        raise InputError(f"score_cam: pixels must be [B, 3, H, W], got shape {tuple(pixels.shape)}")
    if model.visual.token_reduction is not None:
        raise ConfigError("Score-CAM needs every image token: switch off token merging/pruning on this model first")
    pixels = pixels.to(model_device(model))
    texts = F.normalize(text_embeddings.float().cpu().reshape(-1, text_embeddings.shape[-1]), dim=-1)
    activations = model.visual.forward_intermediates(
        pixels, indices=[layer], output_fmt="NCHW", intermediates_only=True, stop_early=True
    )["image_intermediates"][0].float()  # [B, K, h, w]
    size = (pixels.shape[-2], pixels.shape[-1])
    masks = _scaled_per_map(F.interpolate(activations, size=size, mode="bilinear", align_corners=True))
    masked = torch.stack(
        [encode_pixels(model, pixels[image] * masks[image, :, None].to(pixels.dtype), batch_size) @ texts.T for image in range(len(pixels))]
    )
    baseline = encode_pixels(model, torch.zeros_like(pixels)) @ texts.T
    return ChannelScores(activations, masked, baseline, float(model.logit_scale.exp()), size)


def channel_weights(masked: torch.Tensor, baseline: torch.Tensor, logit_scale: float, weighting: str) -> torch.Tensor:
    """The weights w [..., K] of ``masked`` cosines [..., K] (``baseline`` [...]) under ``weighting`` (module docstring)."""
    if weighting == "cosine":
        return masked.softmax(dim=-1)
    if weighting == "logit":
        return (logit_scale * masked).softmax(dim=-1)
    if weighting == "increase":
        return logit_scale * (masked - baseline[..., None])
    raise InputError(f"Score-CAM weighting: {weighting!r} is not one of {', '.join(WEIGHTINGS)}")


def maps_from(scores: ChannelScores, text: int | torch.Tensor = 0, weighting: str = DEFAULT_WEIGHTING) -> torch.Tensor:
    """Score-CAM maps [B, H, W] in [0, 1] for text ``text`` of ``scores`` (one index, or one per image)."""
    chosen = torch.as_tensor(text).expand(scores.masked.shape[0])
    rows = torch.arange(len(chosen))
    masked, baseline = scores.masked[rows, :, chosen], scores.baseline[rows, chosen]
    weights = channel_weights(masked, baseline, scores.logit_scale, weighting)
    cam = F.relu((weights.to(scores.activations.device)[:, :, None, None] * scores.activations).sum(dim=1, keepdim=True))
    return _scaled_per_map(F.interpolate(cam, size=scores.size, mode="bilinear", align_corners=True))[:, 0]


def score_cam(
    model: Encoder,
    pixels: torch.Tensor,
    text_embedding: torch.Tensor,
    *,
    layer: int = -1,
    batch_size: int = 32,
    weighting: str = DEFAULT_WEIGHTING,
) -> torch.Tensor:
    """Score-CAM maps [B, H, W] in [0, 1] of preprocessed ``pixels`` [B, 3, H, W] for text embeddings [1, D]
    (one text for every image) or [B, D] (one per image)."""
    if weighting not in WEIGHTINGS:
        raise InputError(f"Score-CAM weighting: {weighting!r} is not one of {', '.join(WEIGHTINGS)}")
    texts = text_embedding.reshape(-1, text_embedding.shape[-1])
    if len(texts) not in (1, len(pixels)):
        raise InputError(f"score_cam: {len(texts)} text embeddings for {len(pixels)} images; give 1 or one per image")
    scores = channel_scores(model, pixels, texts, layer=layer, batch_size=batch_size)
    return maps_from(scores, 0 if len(texts) == 1 else torch.arange(len(texts)), weighting)
