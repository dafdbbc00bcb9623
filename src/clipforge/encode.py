"""The one encoder: images and texts → L2-normalised float32 embeddings, in batches, on the model's device.

Every module that turns images or text into embeddings calls this one (``tests/test_layering.py`` checks
that no other module calls ``encode_image``/``encode_text``, but for the documented exceptions). It decides,
once for the package:

- batching: images in batches of ``batch_size``, decoded and preprocessed (``model.preprocess``) in worker
  processes while the model encodes the previous batch; texts tokenized a batch at a time, so the text
  tower runs only up to the longest caption of each batch;
- device: inputs go to the model's device (``model_device``), embeddings come back on the CPU;
- precision: the model runs in its own dtype (``clipforge.load(precision=...)``); embeddings are cast to
  float32 before they are normalised, so a bf16 model's vectors are normalised in float32;
- progress: an optional bar with the caller's description;
- bad images: skipped and reported by position with a one-line reason, or the first one raised under ``strict``;
  the embeddings of the good ones keep their input order.

Any model with the ``Encoder`` surface works: a clipforge ``CLIP``, a quantized copy of one, an exported model
(``clipforge.compress.exported.ExportedCLIP``: onnxruntime or OpenVINO), or an open_clip model with
``preprocess``, ``tokenize`` and ``config.embed_dim`` attached.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from clipforge._util.fileio import printable
from clipforge._util.progress import progress_bar
from clipforge.data.formats.images import read_image
from clipforge.errors import InputError

TEXT_BATCH = 256


class Encoder(Protocol):
    """What the encoder needs of a model (open_clip's ``CLIP`` interface plus its preprocessing and tokenizer)."""

    config: Any  # has ``embed_dim``

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor: ...

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor: ...

    def preprocess(self, image: Any) -> torch.Tensor: ...

    def tokenize(self, texts: str | list[str]) -> torch.Tensor: ...

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]: ...  # or a ``device`` attribute


@dataclass
class EmbeddingResult:
    embeddings: np.ndarray  # [n_kept, embed_dim] float32, L2-normalised
    kept: list[int]  # input positions the rows belong to
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (position, one-line reason)


def model_device(model: Encoder) -> torch.device:
    """Where the model's inputs must go: its ``device`` (an exported model) or its parameters' device."""
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


def default_workers() -> int:
    """Decoding processes: the cores but one, at most 4."""
    return min(4, max(0, (os.cpu_count() or 1) - 1))


def fixed_batches(count: int, batch_size: int) -> list[range]:
    return [range(start, min(count, start + batch_size)) for start in range(0, count, batch_size)]


def _normalized(features: torch.Tensor) -> torch.Tensor:
    return F.normalize(features.float(), dim=-1).cpu()


# -- images -------------------------------------------------------------------------------------------


def model_input_image(model: Encoder, image: Image.Image) -> Image.Image:
    """The RGB image the model sees (after its resize and crop), recovered exactly from ``model.preprocess``.

    Un-normalising the preprocessed tensor gives back the 8-bit pixels (the float error is far below
    half a level), so this works for every resize mode without re-implementing the geometry.
    """
    pixels = model.preprocess(image)
    mean = torch.tensor(model.preprocess_cfg.mean).view(3, 1, 1)
    std = torch.tensor(model.preprocess_cfg.std).view(3, 1, 1)
    values = ((pixels * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(values.permute(1, 2, 0).numpy(), "RGB")


@torch.inference_mode()
def encode_pixels(model: Encoder, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Preprocessed pixels [N, 3, H, W] → embeddings [N, embed_dim] (float32, normalised, CPU)."""
    device = model_device(model)
    rows = [_normalized(model.encode_image(pixels[start : start + batch_size].to(device))) for start in range(0, len(pixels), batch_size)]
    return torch.cat(rows) if rows else torch.zeros(0, model.config.embed_dim)


class _Images(Dataset):
    """Decodes and preprocesses one image per index; runs inside the DataLoader's worker processes."""

    def __init__(self, sources: Sequence[Any], transform: Callable[[Any], torch.Tensor]) -> None:
        self.sources = sources
        self.transform = transform

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return index, self.transform(read_image(self.sources[index])), None
        except InputError as error:
            return index, None, str(error)


def _collate(items: list[tuple[int, torch.Tensor | None, str | None]]) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    good = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, reason) for i, x, reason in items if x is None]
    pixels = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], pixels, bad


@torch.inference_mode()
def encode_image_batches(
    model: Encoder, sources: Sequence[Any], batches: Sequence[Sequence[int]], workers: int, strict: bool = False
) -> Iterator[tuple[list[int], torch.Tensor, list[tuple[int, str]]]]:
    """For each batch of source positions, in order: (kept positions, their embeddings, skipped positions).

    Sources are PIL images, image paths, encoded bytes or shard members (``clipforge.data.formats.images``).
    Decoding and ``model.preprocess`` run in ``workers`` processes (none when 0) while the model encodes
    the previous batch. Under ``strict`` the first unreadable image raises its ``InputError``.
    """
    device = model_device(model)
    loader = DataLoader(
        _Images(sources, model.preprocess),
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
    )
    empty = torch.zeros((0, model.config.embed_dim))
    for positions, pixels, bad in loader:
        if bad and strict:
            raise InputError(bad[0][1])
        vectors = empty if pixels is None else _normalized(model.encode_image(pixels.to(device)))
        yield positions, vectors, bad


def embed_images(
    model: Encoder,
    images: Sequence[Any],
    *,
    batch_size: int = 64,
    workers: int | None = None,
    strict: bool = False,
    progress: bool = True,
    description: str = "embedding images",
) -> EmbeddingResult:
    """Embed PIL images, image paths, encoded bytes or shard members; decoding runs in ``workers`` processes."""
    workers = default_workers() if workers is None else workers
    batches = fixed_batches(len(images), batch_size)
    rows, kept, skipped = [], [], []
    with progress_bar(disable=not progress) as bar:
        task = bar.add_task(description, total=len(images), unit="img")
        for positions, vectors, bad in encode_image_batches(model, images, batches, workers if len(batches) > 1 else 0, strict):
            skipped.extend(bad)
            rows.append(vectors)
            kept.extend(positions)
            bar.advance(task, len(positions) + len(bad))
    embeddings = torch.cat(rows).numpy() if rows else np.zeros((0, model.config.embed_dim), np.float32)
    return EmbeddingResult(embeddings, kept, skipped)


# -- texts --------------------------------------------------------------------------------------------


def check_texts(texts: Sequence[Any]) -> None:
    """``InputError`` naming the position of the first empty, non-string or non-UTF-8 text (bytes a shell passed
    from another encoding reach Python as surrogate escapes, which no tokenizer can read)."""
    for position, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"text #{position}: empty or not a string ({text!r})")
        if printable(text) != text:
            raise InputError(f"text #{position}: not valid UTF-8 ({printable(text)}); convert it to UTF-8 first")


@torch.inference_mode()
def encode_texts(
    model: Encoder,
    texts: Sequence[str],
    *,
    batch_size: int = TEXT_BATCH,
    progress: bool = False,
    description: str = "embedding texts",
    normalize: bool = True,
) -> torch.Tensor:
    """Strings → embeddings [N, embed_dim] (float32, CPU; normalised unless ``normalize`` is False: the text
    tower's raw output, float32); empty or non-string items raise ``InputError`` naming their position."""
    check_texts(texts)
    device = model_device(model)
    rows = []
    with progress_bar(disable=not progress) as bar:
        task = bar.add_task(description, total=len(texts), unit="text")
        for chunk in fixed_batches(len(texts), batch_size):
            tokens = model.tokenize([texts[i] for i in chunk]).to(device)
            embeddings = model.encode_text(tokens)
            rows.append(_normalized(embeddings) if normalize else embeddings.float().cpu())
            bar.advance(task, len(chunk))
    return torch.cat(rows) if rows else torch.zeros(0, model.config.embed_dim)


def embed_texts(model: Encoder, texts: Sequence[str], *, batch_size: int = TEXT_BATCH, progress: bool = True) -> np.ndarray:
    """``encode_texts`` as a float32 numpy array [N, embed_dim], with a progress bar by default."""
    return encode_texts(model, texts, batch_size=batch_size, progress=progress).numpy()
