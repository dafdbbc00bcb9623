"""Robustness of zero-shot classification: common corruptions, patch perturbations, distribution shift.

Corruptions follow Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common
Corruptions and Perturbations" (ICLR 2019, ``make_imagenet_c.py``) at severities 1–5, applied to the
8-bit image the model sees (after its resize and crop, as ImageNet-C corrupts 224 px crops):
gaussian/shot noise, gaussian blur, JPEG, contrast and pixelate reuse the synthetic world's
implementation (``clipforge.data.synthetic.render.corrupt``); shot noise and brightness are added here.

``patch`` perturbs whole patches of the ViT grid, after Gu, Tresp, Qin, "Are Vision Transformers
Robust to Patch Perturbations?" (ECCV 2022): at severity s a fraction ``PATCH_FRACTIONS[s - 1]`` of
the grid-aligned patches (at least one) is replaced by uniform noise.

The report is an accuracy table (corruption × severity), the mean corruption accuracy over every
cell, and for the synthetic world the accuracy on its shifted renderings (textured or outline
objects, unseen backgrounds).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

from clipforge._util.fileio import atomic_path
from clipforge.data.synthetic import CORRUPTIONS as SYNTHETIC_CORRUPTIONS
from clipforge.data.synthetic import SHIFTS, corrupt
from clipforge.encode import Encoder, embed_images
from clipforge.errors import InputError
from clipforge.eval.metrics import topk_accuracy
from clipforge.eval.zeroshot import zero_shot_logits

SHOT_NOISE_PHOTONS = (60, 25, 12, 5, 3)  # ImageNet-C shot_noise: x ~ Poisson(x * c) / c
BRIGHTNESS_SHIFTS = (0.1, 0.2, 0.3, 0.4, 0.5)  # ImageNet-C brightness: V + c in HSV
PATCH_FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.5)  # share of the ViT patch grid replaced by noise

CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "gaussian_blur",
    "jpeg",
    "contrast",
    "brightness",
    "pixelate",
    "patch",
)
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
SHIFT_NAMES: tuple[str, ...] = tuple(name for name, shift in SHIFTS.items() if name != "none" and shift.corruption == "none")
"""The synthetic world's non-corruption shifts: textured/outline fills and unseen backgrounds."""


def _as_unit_float(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64) / 255


def _to_image(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8), "RGB")


def shot_noise(image: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    """Poisson photon noise: ``Poisson(x · c) / c`` on [0, 1] pixels (ImageNet-C)."""
    photons = SHOT_NOISE_PHOTONS[severity - 1]
    return _to_image(rng.poisson(_as_unit_float(image) * photons) / photons)


def brightness(image: Image.Image, severity: int) -> Image.Image:
    """ImageNet-C brightness: add c to the HSV value and clip, keeping hue and saturation.

    With hue and saturation fixed, RGB scales with V, so the HSV round trip is ``rgb · V'/V``
    (grey ``V'`` where V = 0, as ``skimage.color.hsv2rgb`` gives for black).
    """
    pixels = _as_unit_float(image)
    value = pixels.max(axis=-1, keepdims=True)
    brighter = np.clip(value + BRIGHTNESS_SHIFTS[severity - 1], 0, 1)
    scaled = np.divide(pixels * brighter, value, out=np.broadcast_to(brighter, pixels.shape).copy(), where=value > 0)
    return _to_image(scaled)


def patch_perturbation(image: Image.Image, severity: int, rng: np.random.Generator, patch_size: int) -> Image.Image:
    """Replace ``PATCH_FRACTIONS[severity - 1]`` of the grid-aligned ``patch_size`` patches by uniform noise."""
    pixels = np.array(image.convert("RGB"))
    rows, columns = pixels.shape[0] // patch_size, pixels.shape[1] // patch_size
    if rows == 0 or columns == 0:
        raise InputError(f"patch perturbation: a {image.width}x{image.height} image holds no {patch_size}-pixel patch")
    count = max(1, round(PATCH_FRACTIONS[severity - 1] * rows * columns))
    for cell in rng.choice(rows * columns, size=count, replace=False):
        top, left = (cell // columns) * patch_size, (cell % columns) * patch_size
        pixels[top : top + patch_size, left : left + patch_size] = rng.integers(0, 256, (patch_size, patch_size, 3))
    return Image.fromarray(pixels, "RGB")


def corrupt_image(image: Image.Image, corruption: str, severity: int, rng: np.random.Generator, patch_size: int) -> Image.Image:
    """``image`` with one corruption at ``severity`` 1–5; ``rng`` draws any noise."""
    if corruption not in CORRUPTIONS:
        raise InputError(f"corruption: {corruption!r} is not one of {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise InputError(f"severity: {severity} is not between 1 and 5")
    if corruption == "shot_noise":
        return shot_noise(image, severity, rng)
    if corruption == "brightness":
        return brightness(image, severity)
    if corruption == "patch":
        return patch_perturbation(image, severity, rng, patch_size)
    assert corruption in SYNTHETIC_CORRUPTIONS
    return corrupt(image.convert("RGB"), corruption, severity, rng)


def corruption_rng(seed: int, corruption: str, severity: int, index: int) -> np.random.Generator:
    """The noise of image ``index`` under one corruption: the same in every run and every process."""
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(corruption.encode()), severity, index]))


@dataclass(frozen=True)
class CorruptionTable:
    """Top-1 accuracy on clean images and under each corruption at severities 1–5."""

    clean: float
    accuracy: dict[str, list[float]]

    @property
    def mean_corruption_accuracy(self) -> float:
        """The mean over every (corruption, severity) cell."""
        return float(np.mean([value for row in self.accuracy.values() for value in row]))

    def metrics(self) -> dict[str, float]:
        cells = {f"{name}@{s}": row[s - 1] for name, row in self.accuracy.items() for s in SEVERITIES}
        return {"acc1_clean": self.clean, "mean_corruption_acc": self.mean_corruption_accuracy, **cells}

    def rows(self) -> list[list[Any]]:
        """``[corruption, acc@1, ..., acc@5, mean]`` per corruption."""
        return [[name, *row, float(np.mean(row))] for name, row in self.accuracy.items()]


def _accuracy(
    model: Encoder, images: Sequence[Any], labels: torch.Tensor, classifier: torch.Tensor, batch_size: int, workers: int | None
) -> list[float]:
    """Top-1 accuracy of consecutive blocks of ``len(labels)`` images."""
    embedded = embed_images(model, images, batch_size=batch_size, workers=workers, strict=True, progress=False)
    features = torch.from_numpy(embedded.embeddings)
    logits = zero_shot_logits(features, classifier.cpu()).view(-1, len(labels), classifier.shape[1])
    return [topk_accuracy(block, labels, ks=(1,))["acc1"] for block in logits]


def corruption_accuracy(
    model: Encoder,
    images: Sequence[Image.Image],
    labels: Sequence[int],
    classifier: torch.Tensor,
    *,
    corruptions: Sequence[str] = CORRUPTIONS,
    seed: int = 0,
    batch_size: int = 64,
    workers: int | None = None,
) -> CorruptionTable:
    """Zero-shot accuracy of ``classifier`` on model-size RGB ``images`` (see ``model_input_image``) under corruptions."""
    targets = torch.as_tensor(list(labels))
    patch_size = model.visual.patch_size
    clean = _accuracy(model, images, targets, classifier, batch_size, workers)[0]
    table: dict[str, list[float]] = {}
    for name in corruptions:
        corrupted = [
            corrupt_image(image, name, severity, corruption_rng(seed, name, severity, index), patch_size)
            for severity in SEVERITIES
            for index, image in enumerate(images)
        ]
        table[name] = _accuracy(model, corrupted, targets, classifier, batch_size, workers)
    return CorruptionTable(clean, table)


def corruption_plot(table: CorruptionTable, path: str | Path) -> Path:
    """Accuracy against severity, one line per corruption, the clean accuracy at severity 0."""
    figure = Figure(figsize=(6, 4))
    axes = figure.add_subplot()
    for name, row in table.accuracy.items():
        axes.plot([0, *SEVERITIES], [table.clean, *row], marker="o", label=name)
    axes.set(xlabel="severity (0 = clean)", ylabel="top-1 accuracy", ylim=(0, 1.02), xticks=[0, *SEVERITIES])
    axes.set_title(f"Corruption robustness (mean corruption accuracy {table.mean_corruption_accuracy:.3f})")
    axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    return path
