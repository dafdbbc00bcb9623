"""The data of the task recipes: image–caption pairs (CLIPN) read by ``clipforge.data.sources``, the same
readers training uses (``synthetic``, a folder with .txt captions, a table, webdataset shards)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from clipforge.data.sources import open_source
from clipforge.encode import embed_images
from clipforge.errors import InputError


@dataclass(frozen=True)
class CaptionedFeatures:
    """Normalised image features [N, D] of the readable pairs, their captions' token ids [N, L], and how many
    pairs were unreadable (skipped)."""

    features: torch.Tensor
    tokens: torch.Tensor
    skipped: int


def captioned_features(model: Any, spec: str, samples: int, *, progress: bool = False) -> CaptionedFeatures:
    """The first ``samples`` pairs of the source ``spec``, images encoded once by ``clipforge.encode``."""
    if samples < 2:
        raise InputError(f"samples: {samples} pairs are too few (at least 2)")
    source = open_source(spec)
    images, captions, skipped = [], [], 0
    for index in range(min(samples, len(source))):
        try:
            image, caption = source.load(index)
        except InputError:
            skipped += 1
            continue
        images.append(image)
        captions.append(caption)
    if len(images) < 2:
        raise InputError(f"{spec}: {len(images)} readable image–caption pairs; at least 2 are needed")
    found = embed_images(model, images, workers=0, progress=progress, description="encoding images")
    kept_captions = [captions[i] for i in found.kept]
    return CaptionedFeatures(torch.from_numpy(found.embeddings), model.tokenize(kept_captions),
                             skipped + len(found.skipped))
