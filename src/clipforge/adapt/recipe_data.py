"""The data of the task recipes: image–caption pairs (CLIPN) read by ``clipforge.data.sources``, the same
readers training uses (``synthetic``, a folder with .txt captions, a table, webdataset shards); labelled images
(detector, re-identification) read as ``clipforge eval --data`` reads them (a folder per class, a table, shards
with a class column), or the synthetic world's real-vs-altered and identity tasks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from clipforge.data.formats.images import read_rgb_image
from clipforge.data.sources import open_source
from clipforge.data.synthetic import SPLITS, SyntheticWorld, real_or_altered
from clipforge.encode import embed_images
from clipforge.errors import InputError
from clipforge.eval.datasets import identities_dataset, load_dataset

DETECTOR_CLASSES = ("real", "altered")


@dataclass(frozen=True)
class CaptionedFeatures:
    """Normalised image features [N, D] of the readable pairs, their captions' token ids [N, L], and how many
    pairs were unreadable (skipped)."""

    features: torch.Tensor
    tokens: torch.Tensor
    skipped: int


def captioned_features(model: Any, spec: str, samples: int, *, progress: bool = False) -> CaptionedFeatures:
    """The first ``samples`` pairs of the source ``spec``, images encoded once by ``clipforge.encode``."""
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


def synthetic_split(data: str, name: str, default: str = "train", variant_setting: str = "") -> str | None:
    """The split of ``synthetic:NAME[@SPLIT]``, or None when ``data`` is not that task. Training data takes no
    ``+VARIANT`` (the evaluation sets' suffix): it is refused, naming the setting that chooses it if there is one."""
    rest, plus, variant = data.removeprefix("synthetic:").partition("+")
    task, _, split = rest.partition("@")
    if not data.startswith("synthetic:") or task != name:
        return None
    if plus:
        hint = f"; set the {variant_setting} with --set {variant_setting}={variant}" if variant_setting else ""
        raise InputError(f"{data}: the training data takes no +{variant}{hint}")
    if split and split not in SPLITS:
        raise InputError(f"{data}: split {split!r} is not one of {', '.join(SPLITS)}")
    return split or default


def detector_images(data: str, samples: int, families: str, **data_options: Any) -> tuple[list[Any], list[int], str]:
    """Images and labels (0 real, 1 altered) and a description: ``synthetic:altered[@SPLIT]`` (the first
    ``samples`` of the split, half altered by ``families`` in turn; not ``+FAMILY``), or two classes of labelled
    images, one named "real" (e.g. folders ``real/`` and ``fake/``)."""
    split = synthetic_split(data, "altered", variant_setting="families")
    if split is not None:
        world = SyntheticWorld()
        names = [name.strip() for name in families.split(",") if name.strip()]
        drawn = [real_or_altered(world, split, index, names) for index in range(samples)]
        return [image for image, _, _ in drawn], [label for _, label, _ in drawn], f"{data} ({', '.join(names)})"
    dataset = load_dataset(data, samples=samples, **data_options)
    if len(dataset.classnames) != 2 or "real" not in dataset.classnames:
        raise InputError(f"{data}: a detector needs two classes, one named 'real' (found {', '.join(dataset.classnames)})")
    real = dataset.classnames.index("real")
    return [read_rgb_image(image) for image in dataset.images], [int(label != real) for label in dataset.labels], data


def identity_images(data: str, samples: int, **data_options: Any) -> tuple[list[Any], list[int], str]:
    """Images, identity ids and a description: ``synthetic:identities`` (the training identities' views; ``@test``
    for the held-out ones), or labelled images with a class per identity (a folder per identity, a table, shards)."""
    split = synthetic_split(data, "identities")
    dataset = identities_dataset(split, samples) if split is not None else load_dataset(data, samples=samples, **data_options)
    if len(dataset.classnames) < 2:
        raise InputError(f"{data}: re-identification needs at least two identities (found {len(dataset.classnames)})")
    return [read_rgb_image(image) for image in dataset.images], list(dataset.labels), data
