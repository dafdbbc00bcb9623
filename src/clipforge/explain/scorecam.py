"""Score-CAM for an image–text pair: Wang et al., "Score-CAM: Score-Weighted Visual Explanations for
Convolutional Neural Networks", CVPRW 2020, with a CLIP similarity target as in CLIP-ReIdent
(jacobgil/pytorch-grad-cam ``score_cam.py`` with ``vit_reshape_transform``).

The patch tokens of one image block (default: the last) are K = width activation maps on the patch
grid. Each map is upsampled to the input size (bilinear, corners aligned as ``UpsamplingBilinear2d``)
and min-max scaled to [0, 1]; the preprocessed image is masked by it and encoded; the cosine
similarity of that embedding to the text is the channel's score. The map is
``relu(Σ_k softmax(scores)_k · A_k)``, upsampled and min-max scaled. Gradient-free, K forward passes
per image, batched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipforge.encode import Encoder, encode_pixels, model_device
from clipforge.errors import InputError


def _scaled_per_map(maps: torch.Tensor) -> torch.Tensor:
    """Min-max scale every [H, W] map of a [..., H, W] tensor to [0, 1]."""
    low = maps.amin(dim=(-2, -1), keepdim=True)
    high = maps.amax(dim=(-2, -1), keepdim=True)
    return (maps - low) / (high - low + 1e-8)


@torch.inference_mode()
def score_cam(
    model: Encoder, pixels: torch.Tensor, text_embedding: torch.Tensor, *, layer: int = -1, batch_size: int = 32
) -> torch.Tensor:
    """Score-CAM maps [B, H, W] in [0, 1] of preprocessed ``pixels`` [B, 3, H, W] for text embeddings [B or 1, D]."""
    if pixels.ndim != 4:
        raise InputError(f"score_cam: pixels must be [B, 3, H, W], got shape {tuple(pixels.shape)}")
    pixels = pixels.to(model_device(model))
    target = F.normalize(text_embedding.float().cpu().reshape(-1, text_embedding.shape[-1]), dim=-1)
    target = target.expand(len(pixels), -1)
    activations = model.visual.forward_intermediates(
        pixels, indices=[layer], output_fmt="NCHW", intermediates_only=True, stop_early=True
    )["image_intermediates"][0].float()  # [B, K, h, w]
    size = pixels.shape[-2:]
    masks = _scaled_per_map(F.interpolate(activations, size=size, mode="bilinear", align_corners=True))
    scores = torch.stack(
        [encode_pixels(model, pixels[image] * masks[image, :, None].to(pixels.dtype), batch_size) @ target[image] for image in range(len(pixels))]
    )
    weights = scores.softmax(dim=-1).to(activations.device)
    cam = F.relu((weights[:, :, None, None] * activations).sum(dim=1, keepdim=True))
    return _scaled_per_map(F.interpolate(cam, size=size, mode="bilinear", align_corners=True))[:, 0]
