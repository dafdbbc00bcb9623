"""K images per class, drawn reproducibly from a seed: the training data of every adaptation method.

Sources (``--train``):

- ``synthetic:<task>[+<shift>]``: the synthetic world. Class ``c``'s candidates are the first
  ``POOL_PER_CLASS`` images the task labels ``c`` among indices ``POOL_START, POOL_START + 1, …`` of the
  splits in ``POOL_SPLITS`` (val for the in-distribution concepts, test_heldout, test_ood and test_fewshot
  for held-out pairs, held-out and few-shot shapes), rendered under ``shift`` when one is given. Evaluation
  reads the first ``--samples`` indices of a split, so adaptation never sees an evaluation image;
- a class-per-folder directory (``root/<class>/<image>``), a table or webdataset shards with a class column:
  anything ``clipforge.eval.datasets.load_dataset`` reads.

The K shots of class ``c`` are the first K readable images of a permutation of its candidates drawn from
``numpy.random.default_rng([seed, c])``: the draw is nested (the 2-shot set holds the 1-shot set), as in
CoOp's and Tip-Adapter's samplers K shots are drawn once per seed. An unreadable image is skipped and
counted; a class with fewer than K readable images is a one-line ``InputError`` naming it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from PIL import Image

from clipforge.data.formats.images import ImageSource, read_rgb_image
from clipforge.errors import ConfigError, InputError
from clipforge.eval.datasets import (
    ClassificationDataset,
    SyntheticTask,
    load_dataset,
    synthetic_task,
)
from clipforge.eval.prompts import Templates, check_templates, read_templates

POOL_START = 1_000_000
POOL_PER_CLASS = 64
POOL_SPLITS = ("val", "test_heldout", "test_ood", "test_fewshot")
Reader = Callable[[Any], Image.Image]
SCAN_LIMIT = 1000  # consecutive indices of a split that add no candidate before the split is left


@dataclass(frozen=True)
class Shots:
    """Decoded RGB images with their labels (``dataset``) and stable names (``keys``, ``<source>#<class>/<row>``)
    that caches and augmentation seeds use."""

    dataset: ClassificationDataset
    keys: list[str]

    @property
    def images(self) -> list[Image.Image]:
        return list(self.dataset.images)  # type: ignore[arg-type]

    @property
    def labels(self) -> list[int]:
        return self.dataset.labels

    @property
    def classnames(self) -> list[str]:
        return self.dataset.classnames

    def __len__(self) -> int:
        return len(self.keys)

    def rows(self, start: int, stop: int) -> Shots:
        """The images at draw positions ``start`` to ``stop - 1`` of each class."""
        seen: Counter[int] = Counter()
        rows = []
        for row, label in enumerate(self.labels):
            if start <= seen[label] < stop:
                rows.append(row)
            seen[label] += 1
        return Shots(self.dataset.subset(rows), [self.keys[i] for i in rows])


@dataclass(frozen=True)
class FewShotSet:
    """The images drawn per class, in draw order: ``shots`` training images then ``val_shots`` validation images
    (CoOp's few-shot validation, min(K, 4) per class, for the methods that choose hyper-parameters on it).
    ``skipped`` lists the unreadable images met while drawing, with one-line reasons."""

    drawn: Shots
    shots: int
    val_shots: int
    seed: int
    source: str
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def train(self) -> Shots:
        return self.drawn.rows(0, self.shots)

    @property
    def val(self) -> Shots | None:
        return self.drawn.rows(self.shots, self.shots + self.val_shots) if self.val_shots else None

    @property
    def classnames(self) -> list[str]:
        return self.drawn.classnames

    @property
    def templates(self) -> Templates:
        return self.drawn.dataset.templates

    def subset(self, shots: int, val_shots: int = 0) -> FewShotSet:
        """The set drawn with ``shots`` and ``val_shots`` and the same seed (draws are nested)."""
        if shots < 1 or val_shots < 0 or shots + val_shots > self.shots + self.val_shots:
            raise InputError(f"shots: {shots} + {val_shots} validation images per class exceed the {self.shots + self.val_shots} drawn")
        return replace(self, drawn=self.drawn.rows(0, shots + val_shots), shots=shots, val_shots=val_shots)


def check_shots(shots: int, seed: int) -> None:
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise ConfigError(f"shots: {shots!r} is not a positive integer")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed: {seed!r} is not a non-negative integer")


def sample_few_shot(
    source: str | ClassificationDataset,
    shots: int,
    seed: int = 1,
    *,
    val_shots: int = 0,
    classnames_file: str | None = None,
    templates_file: str | None = None,
    image_column: str = "image",
    label_column: str = "label",
    class_field: str = "cls",
) -> FewShotSet:
    """``shots`` (+ ``val_shots``) images per class of ``source`` (a ``--train`` spec or a dataset), drawn with ``seed``."""
    check_shots(shots, seed)
    if isinstance(val_shots, bool) or not isinstance(val_shots, int) or val_shots < 0:
        raise ConfigError(f"val_shots: {val_shots!r} is not a non-negative integer")
    if isinstance(source, ClassificationDataset):
        return _draw(source, source.name, shots, val_shots, seed)
    if source == "synthetic" or source.startswith("synthetic:"):
        if classnames_file is not None:
            raise InputError("--classnames: the synthetic world names its own classes")
        task_name, _, shift = source.partition(":")[2].partition("+")
        task = synthetic_task(task_name or "shape")
        dataset, read = synthetic_pool(task, shift or None, max(POOL_PER_CLASS, shots + val_shots))
        if templates_file is not None:
            templates = check_templates(read_templates(templates_file), dataset.classnames, str(templates_file))
            dataset = replace(dataset, templates=templates)
        return _draw(dataset, source, shots, val_shots, seed, read)
    dataset = load_dataset(source, classnames_file=classnames_file, templates_file=templates_file,
                           image_column=image_column, label_column=label_column, class_field=class_field)
    return _draw(dataset, source, shots, val_shots, seed)


def synthetic_pool(task: SyntheticTask, shift: str | None, per_class: int) -> tuple[ClassificationDataset, Reader]:
    """Up to ``per_class`` candidates per class from ``POOL_SPLITS`` (see the module docstring) as a dataset of
    ``(split, index)`` places, and the reader that renders one."""
    world, classes = task.world, len(task.task.classnames)
    found: list[list[tuple[str, int]]] = [[] for _ in range(classes)]
    for split in POOL_SPLITS:
        if not _split_shows_anything(world, split):
            continue
        misses = 0
        index = POOL_START
        while misses < SCAN_LIMIT and any(len(c) < per_class for c in found):
            label = task.task.label_of(world.describe(split, index, shift)[1])
            if label is not None and len(found[label]) < per_class:
                found[label].append((split, index))
                misses = 0
            else:
                misses += 1
            index += 1
    missing = [task.task.classnames[label] for label, candidates in enumerate(found) if not candidates]
    if missing:
        raise InputError(f"synthetic:{task.task.name}: no split of the world shows class {missing[0]!r}")
    places = [where for candidates in found for where in candidates]
    labels = [label for label, candidates in enumerate(found) for _ in candidates]
    name = f"synthetic/{task.task.name}" + (f"+{shift}" if shift else "")
    dataset = ClassificationDataset(name, list(task.task.classnames), list(task.task.templates), places, labels, task)  # type: ignore[arg-type]
    return dataset, lambda where: world.sample(where[0], where[1], shift).image


def _split_shows_anything(world: object, split: str) -> bool:
    try:
        world.describe(split, POOL_START)  # type: ignore[attr-defined]
    except ConfigError:  # an empty split (its WorldConfig field names nothing)
        return False
    return True


def _draw(
    dataset: ClassificationDataset, source: str, shots: int, val_shots: int, seed: int, read: Reader = read_rgb_image
) -> FewShotSet:
    wanted = shots + val_shots
    by_class: list[list[int]] = [[] for _ in dataset.classnames]
    for row, label in enumerate(dataset.labels):
        by_class[label].append(row)
    rows: list[int] = []
    images: list[Image.Image] = []
    keys: list[str] = []
    skipped: list[tuple[str, str]] = []
    for label, candidates in enumerate(by_class):
        order = np.random.default_rng([seed, label]).permutation(len(candidates))
        kept = 0
        for position in order:
            if kept == wanted:
                break
            row = candidates[position]
            image = _readable(dataset.images[row], read, skipped)
            if image is None:
                continue
            rows.append(row)
            images.append(image)
            keys.append(f"{source}#{label}/{candidates[position]}")
            kept += 1
        if kept < wanted:
            _too_few(dataset, source, label, len(candidates), kept, shots, val_shots, skipped)
    chosen = replace(dataset.subset(rows), images=images, name=f"{dataset.name}@{shots}shot-seed{seed}")
    return FewShotSet(Shots(chosen, keys), shots, val_shots, seed, source, skipped)


def _readable(source: Any, read: Reader, skipped: list[tuple[str, str]]) -> Image.Image | None:
    try:
        return read(source)
    except InputError as error:
        skipped.append((_name(source), str(error)))
        return None


def _name(source: ImageSource) -> str:
    label = getattr(source, "label", None)
    return label if isinstance(label, str) else (str(source) if not isinstance(source, Image.Image | bytes) else "<image>")


def _too_few(
    dataset: ClassificationDataset, source: str, label: int, candidates: int, readable: int, shots: int,
    val_shots: int, skipped: Sequence[tuple[str, str]],
) -> None:
    name = dataset.classnames[label]
    unreadable = candidates - readable
    if readable == 0 and unreadable:
        raise InputError(f"{source}: class {name!r} has no readable image ({unreadable} unreadable, e.g. {skipped[-1][1]})")
    detail = f" ({unreadable} unreadable skipped)" if unreadable else ""
    asked = f"{shots} shots" + (f" + {val_shots} validation images (--set val_shots=0 draws none)" if val_shots else "")
    raise InputError(f"{source}: class {name!r} has {readable} readable images{detail}, fewer than the {asked} asked")
