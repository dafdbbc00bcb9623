"""Image features of few-shot images, plain and augmented, each computed once per model (``FeatureCache``).

Training-free methods and heads work on frozen features: Tip-Adapter and GDA build their caches from
``augment_epoch`` = 10 augmented passes over the K-shot set, CLAP pre-extracts augmented features, the linear
probe uses plain ones (Zhang et al. 2022, ``Tip-Adapter/main.py: build_cache_model``; Wang et al. 2024,
``ICLR24/main_few_shots.py``; Silva-Rodríguez et al. 2024, ``CLAP/trainers/adapters.py``). Every method of one
benchmark cell reads the same cached rows, so no image is encoded twice. Images are encoded by
``clipforge.encode``.

The augmentation is the one of those repositories, ``RandomResizedCrop(size, scale=(0.5, 1), bicubic)`` and a
horizontal flip with probability 0.5, at the model's input size (``Augmentation``). View ``v`` of an image is
drawn from a generator seeded by the image's key and ``v``, so a view is the same whichever set the image is in.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from clipforge.adapt.fewshot import Shots
from clipforge.encode import Encoder, embed_images, encode_pixels
from clipforge.errors import ConfigError
from clipforge.preprocess.transforms import TrainTransform


@dataclass(frozen=True)
class Augmentation:
    """Random resized crop (area fraction in ``crop_scale``, bicubic) and, with ``flip``, a horizontal flip (p 0.5)."""

    crop_scale: tuple[float, float] = (0.5, 1.0)
    flip: bool = True

    def __post_init__(self) -> None:
        low, high = (float(value) for value in self.crop_scale)
        if not 0.0 < low <= high <= 1.0:
            raise ConfigError(f"crop_scale: {self.crop_scale!r} is not (min, max) with 0 < min <= max <= 1")
        object.__setattr__(self, "crop_scale", (low, high))

    def pixels(self, model: Any, image: Image.Image, generator: torch.Generator) -> torch.Tensor:
        """One augmented view of ``image`` as model input [3, H, W]."""
        pixels = TrainTransform(model.preprocess_cfg, scale=self.crop_scale)(image, generator)
        if self.flip and torch.rand(1, generator=generator).item() < 0.5:
            pixels = pixels.flip(-1)
        return pixels


def view_generator(key: str, view: int, seed: int = 0) -> torch.Generator:
    """The generator of augmented view ``view`` of the image named ``key``."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}|{view}|{key}".encode()))


def augmented_batch(
    model: Any, images: Sequence[Image.Image], keys: Sequence[str], view: int, augmentation: Augmentation
) -> torch.Tensor:
    """View ``view`` of every image [N, 3, H, W]."""
    return torch.stack([augmentation.pixels(model, image, view_generator(key, view)) for image, key in zip(images, keys, strict=True)])


class FeatureCache:
    """Normalised float32 image features of one model, per (image key, view): view -1 is the plain image."""

    def __init__(self, model: Encoder, batch_size: int = 256) -> None:
        self.model = model
        self.batch_size = batch_size
        self._rows: dict[tuple[str, int, Augmentation | None], torch.Tensor] = {}

    def plain(self, shots: Shots) -> torch.Tensor:
        """Features of the images as the model sees them at evaluation [N, D]."""
        missing = [i for i, key in enumerate(shots.keys) if (key, -1, None) not in self._rows]
        if missing:
            images = [shots.images[i] for i in missing]
            found = embed_images(self.model, images, batch_size=self.batch_size, workers=0, strict=True, progress=False)
            for i, row in zip(missing, torch.from_numpy(found.embeddings), strict=True):
                self._rows[(shots.keys[i], -1, None)] = row
        return torch.stack([self._rows[(key, -1, None)] for key in shots.keys])

    def augmented(self, shots: Shots, views: int, augmentation: Augmentation) -> torch.Tensor:
        """Features of ``views`` augmented views of every image [views, N, D]."""
        out = []
        for view in range(views):
            missing = [i for i, key in enumerate(shots.keys) if (key, view, augmentation) not in self._rows]
            if missing:
                images = [shots.images[i] for i in missing]
                pixels = augmented_batch(self.model, images, [shots.keys[i] for i in missing], view, augmentation)
                for i, row in zip(missing, encode_pixels(self.model, pixels, self.batch_size), strict=True):
                    self._rows[(shots.keys[i], view, augmentation)] = row
            out.append(torch.stack([self._rows[(key, view, augmentation)] for key in shots.keys]))
        return torch.stack(out)
