"""Image preprocessing that yields the same tensors as open_clip's ``image_transform``.

open_clip (``src/open_clip/transform.py``) composes torchvision transforms on PIL images. torchvision is
not a runtime dependency here, so this module replays the same PIL calls in the same order and the
same integer arithmetic (torchvision 0.2x ``Resize``/``CenterCrop``/``RandomResizedCrop``/``ToTensor``/
``Normalize``, timm's ``ResizeKeepRatio`` and open_clip's ``CenterCropOrPad``). Because the resize, crop
and pad happen *before* the RGB conversion, exactly as in open_clip, grayscale, palette, RGBA, CMYK,
16-bit RGB and 1-bit inputs give bit-identical results (tests/test_transforms.py checks this). Where
torchvision skips a resize whose size already matches, ``Image.resize`` returns an identical copy.

One deliberate deviation: 16-bit grayscale (PIL modes ``I;16*``, and ``I`` holding values above 255) is
scaled by its value range to 8 bits first (``as_8bit``: 65535 → 255). open_clip, like PIL's
``convert("RGB")``, clips every value above 255 to white, so a 16-bit scan or medical image is embedded as a
different picture (cosine 0.79 to its 8-bit twin on a random model); here it gives its 8-bit twin's tensor.

Train-time randomness comes from an explicit ``torch.Generator`` (or the global torch RNG when none
is given), so an augmented batch is a pure function of the generator's seed.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from clipforge.errors import ConfigError

OPENAI_DATASET_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_DATASET_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
_RESIZE_MODES = ("shortest", "longest", "squash")


@dataclass(frozen=True)
class PreprocessConfig:
    """How pixels are made for one set of weights (open_clip's ``PreprocessCfg``); saved in checkpoints.

    ``resize_mode``: ``shortest`` resizes the short side then center-crops (CLIP), ``longest`` resizes
    the long side then pads with ``fill_color`` (letterbox), ``squash`` resizes to a square ignoring
    the aspect ratio (SigLIP, CLIPA).
    """

    size: int = 224
    mean: tuple[float, float, float] = OPENAI_DATASET_MEAN
    std: tuple[float, float, float] = OPENAI_DATASET_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0

    def __post_init__(self) -> None:
        if not _is_int(self.size) or self.size <= 0:
            raise ConfigError(f"preprocess.size: expected a positive integer, got {self.size!r}")
        for name in ("mean", "std"):
            object.__setattr__(self, name, _three_floats(name, getattr(self, name)))
        if min(self.std) <= 0:
            raise ConfigError(f"preprocess.std: every value must be positive, got {self.std!r}")
        if self.interpolation not in _RESAMPLE:
            raise ConfigError(
                f"preprocess.interpolation: expected one of {sorted(_RESAMPLE)}, got {self.interpolation!r}"
            )
        if self.resize_mode not in _RESIZE_MODES:
            raise ConfigError(
                f"preprocess.resize_mode: expected one of {list(_RESIZE_MODES)}, got {self.resize_mode!r}"
            )
        if not _is_int(self.fill_color) or not 0 <= self.fill_color <= 255:
            raise ConfigError(f"preprocess.fill_color: expected an integer in [0, 255], got {self.fill_color!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (tuples become lists)."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PreprocessConfig:
        """Inverse of ``to_dict``; missing keys take their defaults, unknown keys are an error."""
        if not isinstance(values, Mapping):
            raise ConfigError(f"preprocess: expected a mapping of settings, got {type(values).__name__}")
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"preprocess.{unknown[0]}: unknown setting (known: {sorted(known)})")
        return cls(**values)


def _three_floats(name: str, value: Any) -> tuple[float, float, float]:
    is_sequence = isinstance(value, Sequence) and not isinstance(value, str)
    if not is_sequence or len(value) != 3 or not all(_is_real(item) for item in value):
        raise ConfigError(f"preprocess.{name}: expected three numbers (one per RGB channel), got {value!r}")
    return (float(value[0]), float(value[1]), float(value[2]))


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Normalize:
    """open_clip's last steps: ``convert("RGB")`` → torchvision ``ToTensor`` → ``Normalize``.

    Computed with float32 numpy: its element-wise divide and subtract round exactly like torch's, so
    the values are bit-identical, and it stays out of torch's intra-op thread pool (on a busy 2-core
    machine a 224x224 normalize took 77 ms through torch's threads, 3 ms in numpy).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = np.array(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.array(std, dtype=np.float32).reshape(3, 1, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        pixels = np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32, order="C")
        pixels /= np.float32(255)
        pixels -= self.mean
        pixels /= self.std
        return torch.from_numpy(pixels)


def _shortest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    """torchvision ``_compute_resized_output_size`` for an int size: short side = size, long side truncated."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_width, new_height = (new_short, new_long) if width <= height else (new_long, new_short)
    return new_height, new_width


def _longest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    """timm/open_clip ``ResizeKeepRatio(longest=1)``: long side = size, Python (half-to-even) rounding."""
    ratio = max(height / size, width / size)
    return round(height / ratio), round(width / ratio)


def _center_crop_or_pad(image: Image.Image, size: int, fill: int) -> Image.Image:
    """open_clip ``center_crop_or_pad`` (= torchvision ``center_crop`` when ``fill`` is 0).

    Padding is torchvision's PIL ``F.pad``: ``ImageOps.expand`` with ``fill`` repeated per band (a
    palette index for P images), applied before the RGB conversion as in open_clip.
    """
    width, height = image.size
    if size > width or size > height:
        grow_w, grow_h = max(size - width, 0), max(size - height, 0)
        bands = len(image.getbands())
        color: int | tuple[int, ...] = fill if bands == 1 else (fill,) * bands
        border = (grow_w // 2, grow_h // 2, (grow_w + 1) // 2, (grow_h + 1) // 2)
        image = ImageOps.expand(image, border=border, fill=color)
        width, height = image.size
        if width == size and height == size:
            return image
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


SIXTEEN_BIT_GRAY = ("I;16", "I;16L", "I;16B", "I;16N")


def as_8bit(image: Image.Image) -> Image.Image:
    """16-bit grayscale scaled by its value range to 8-bit ``L`` (rounded ``v / 257``); other images unchanged.

    ``I;16*`` images always hold 16-bit values. An ``I`` (32-bit integer) image is read as 16-bit when a value
    exceeds 255 (PIL decodes some 16-bit files so), and as 8-bit otherwise; values outside the range clip.
    """
    if image.mode not in SIXTEEN_BIT_GRAY and image.mode != "I":
        return image
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "I" and values.size and values.max() <= 255:
        return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), "L")
    return Image.fromarray(np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8), "L")


class EvalTransform:
    """open_clip's eval ``image_transform(..., is_train=False)``: PIL image → FloatTensor [3, size, size]."""

    def __init__(self, cfg: PreprocessConfig) -> None:
        self.cfg = cfg
        self._resample = _RESAMPLE[cfg.interpolation]
        self._normalize = _Normalize(cfg.mean, cfg.std)

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        """``generator`` is accepted and ignored, so this transform can stand in for ``TrainTransform``."""
        image = as_8bit(image)
        size, mode = self.cfg.size, self.cfg.resize_mode
        if mode == "squash":
            return self._normalize(image.resize((size, size), self._resample))
        # "shortest" leaves both sides >= size, so only "longest" ever pads (torchvision's CenterCrop
        # would pad with 0, open_clip's CenterCropOrPad with fill_color).
        output_size = _longest_edge_size if mode == "longest" else _shortest_edge_size
        height, width = output_size(image.height, image.width, size)
        image = _center_crop_or_pad(image.resize((width, height), self._resample), size, self.cfg.fill_color)
        return self._normalize(image)

    def __repr__(self) -> str:
        return f"EvalTransform({self.cfg})"


def _adjust_hue(image: Image.Image, factor: float) -> Image.Image:
    """torchvision ``adjust_hue`` on an RGB PIL image: shift the 8-bit HSV hue (wrapping) by ``factor`` turns."""
    hue, saturation, value = image.convert("HSV").split()
    shifted = np.array(hue, dtype=np.uint8) + np.uint8(int(factor * 255) % 256)
    return Image.merge("HSV", (Image.fromarray(shifted, "L"), saturation, value)).convert("RGB")


_JITTER_OPS = (
    lambda image, factor: ImageEnhance.Brightness(image).enhance(factor),
    lambda image, factor: ImageEnhance.Contrast(image).enhance(factor),
    lambda image, factor: ImageEnhance.Color(image).enhance(factor),
    _adjust_hue,
)


class ColorJitter:
    """torchvision ``ColorJitter(brightness, contrast, saturation, hue)`` for RGB PIL images.

    Draws, in torchvision's order: a random permutation of the four operations, then one uniform
    factor per enabled operation (brightness/contrast/saturation in ``[max(0, 1 - x), 1 + x]``,
    hue in ``[-x, x]``); an operation whose strength is 0 is skipped and draws nothing.
    """

    def __init__(self, brightness: float, contrast: float, saturation: float, hue: float) -> None:
        strengths = (brightness, contrast, saturation, hue)
        if not all(_is_real(value) and value >= 0 for value in strengths) or hue > 0.5:
            raise ConfigError(
                "augmentation.color_jitter: expected (brightness, contrast, saturation, hue) >= 0 "
                f"with hue <= 0.5, got {strengths!r}"
            )
        self.ranges = tuple(
            None if value == 0 else (max(0.0, 1.0 - value), 1.0 + value) for value in strengths[:3]
        ) + (None if hue == 0 else (-float(hue), float(hue)),)

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> Image.Image:
        order = torch.randperm(4, generator=generator)
        factors = [
            None if bounds is None else float(torch.empty(1).uniform_(*bounds, generator=generator))
            for bounds in self.ranges
        ]
        for index in order.tolist():
            if factors[index] is not None:
                image = _JITTER_OPS[index](image, factors[index])
        return image


class TrainTransform:
    """open_clip's train ``image_transform(..., is_train=True)`` without timm.

    ``RandomResizedCrop(size, scale, ratio)`` with bicubic resampling (open_clip always uses bicubic
    here, whatever ``cfg.interpolation`` says) → RGB → optional ``ColorJitter`` with probability
    ``color_jitter_prob`` → optional 3-channel grayscale with probability ``gray_scale_prob`` →
    tensor → normalize. No horizontal flip, as in open_clip.

    Random draws, in order, from ``generator`` (global torch RNG when ``None``): the crop exactly as
    torchvision's ``RandomResizedCrop.get_params``; then, only if ``color_jitter_prob > 0``, one
    ``torch.rand(1)`` and, when it is below the probability, the jitter's draws; then, only if
    ``gray_scale_prob > 0``, one ``torch.rand(1)``. (open_clip draws the two coin flips from Python's
    ``random``; the distribution is the same.)
    """

    def __init__(
        self,
        cfg: PreprocessConfig,
        scale: tuple[float, float] = (0.9, 1.0),
        ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        color_jitter: tuple[float, float, float, float] | None = None,
        color_jitter_prob: float = 0.0,
        gray_scale_prob: float = 0.0,
    ) -> None:
        for name, bounds, low in (("scale", scale, 0.0), ("ratio", ratio, 1e-12)):
            if len(bounds) != 2 or not all(_is_real(b) for b in bounds) or not low <= bounds[0] <= bounds[1]:
                raise ConfigError(
                    f"augmentation.{name}: expected (min, max) with {low:g} <= min <= max, got {bounds!r}"
                )
        for name, probability in (("color_jitter_prob", color_jitter_prob), ("gray_scale_prob", gray_scale_prob)):
            if not _is_real(probability) or not 0.0 <= probability <= 1.0:
                raise ConfigError(f"augmentation.{name}: expected a probability in [0, 1], got {probability!r}")
        if color_jitter is not None and len(color_jitter) != 4:
            raise ConfigError(
                f"augmentation.color_jitter: expected (brightness, contrast, saturation, hue), got {color_jitter!r}"
            )
        if color_jitter_prob > 0 and color_jitter is None:
            raise ConfigError("augmentation.color_jitter: required when color_jitter_prob > 0")
        self.cfg = cfg
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.color_jitter = None if color_jitter is None else ColorJitter(*color_jitter)
        self.color_jitter_prob = float(color_jitter_prob)
        self.gray_scale_prob = float(gray_scale_prob)
        self._normalize = _Normalize(cfg.mean, cfg.std)

    def sample_crop(
        self, width: int, height: int, generator: torch.Generator | None = None
    ) -> tuple[int, int, int, int]:
        """(top, left, crop_height, crop_width): torchvision ``RandomResizedCrop.get_params`` draw for draw."""
        area = height * width
        log_ratio = torch.log(torch.tensor(self.ratio))
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(*self.scale, generator=generator).item()
            log_aspect = torch.empty(1).uniform_(float(log_ratio[0]), float(log_ratio[1]), generator=generator)
            aspect_ratio = torch.exp(log_aspect).item()
            crop_width = int(round(math.sqrt(target_area * aspect_ratio)))
            crop_height = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < crop_width <= width and 0 < crop_height <= height:
                top = int(torch.randint(0, height - crop_height + 1, size=(1,), generator=generator).item())
                left = int(torch.randint(0, width - crop_width + 1, size=(1,), generator=generator).item())
                return top, left, crop_height, crop_width
        in_ratio = float(width) / float(height)  # ten misses: central crop clamped to the ratio range
        if in_ratio < min(self.ratio):
            crop_width, crop_height = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            crop_width, crop_height = int(round(height * max(self.ratio))), height
        else:
            crop_width, crop_height = width, height
        return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.augment(image, self.sample_crop(image.width, image.height, generator), generator)

    def augment(
        self, image: Image.Image, crop: tuple[int, int, int, int], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The transform with a given crop ``(top, left, crop_height, crop_width)`` (a stored augmentation, as
        MobileCLIP's reinforced datasets replay them); the jitter and grayscale draws still come from ``generator``."""
        top, left, crop_height, crop_width = crop
        image = as_8bit(image)
        image = image.crop((left, top, left + crop_width, top + crop_height))
        size = self.cfg.size
        image = image.resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
        if self.color_jitter is not None and self.color_jitter_prob > 0:
            if torch.rand(1, generator=generator).item() < self.color_jitter_prob:
                image = self.color_jitter(image, generator)
        if self.gray_scale_prob > 0 and torch.rand(1, generator=generator).item() < self.gray_scale_prob:
            image = image.convert("L").convert("RGB")
        return self._normalize(image)

    def __repr__(self) -> str:
        return (
            f"TrainTransform({self.cfg}, scale={self.scale}, ratio={self.ratio}, "
            f"color_jitter_prob={self.color_jitter_prob}, gray_scale_prob={self.gray_scale_prob})"
        )


def image_transform(cfg: PreprocessConfig, train: bool = False) -> EvalTransform | TrainTransform:
    """The transform open_clip builds for ``cfg``: eval (deterministic) or train (default augmentation)."""
    return TrainTransform(cfg) if train else EvalTransform(cfg)
