"""Evaluation datasets: labelled images with class names and prompt templates, from four kinds of source.

- the synthetic world's zero-shot tasks (``synthetic`` or ``synthetic:<task>``, e.g. ``synthetic:color``; another
  split or a shift with ``synthetic:<task>@<split>+<shift>``, e.g. ``synthetic:shape@val+outline``), and its
  real-vs-altered set ``synthetic:altered[@<split>][+<family>,...]`` (classes real, altered) and identity set
  ``synthetic:identities[@train|@test]`` (a class per identity);
- a class-per-folder directory (``root/<class>/<image>``, classes in sorted folder order);
- a CSV/TSV/parquet/JSONL table with an image column (paths relative to the table, encoded bytes or
  ``{bytes, path}`` structs) and a label column (class ids or class names);
- webdataset shards (``.tar`` files, brace patterns such as ``shards/{000..009}.tar``) whose samples
  carry a class field (a ``<key>.cls`` member, as CLIP_benchmark's ``wds/*`` sets, or a JSON field).

Retrieval sets (image-caption pairs) come from the synthetic world, a table with image and caption
columns, webdataset shards or a folder of images, with a ``.txt`` caption per image. Files are read by
``clipforge.data.formats``, exactly as training and embedding read them; shard images stay in their
shards (``ShardMember`` references) until an image is decoded.

Class names and templates may come from files (``clipforge.eval.prompts``). Every problem is one
``InputError`` line naming the file and the line, row, class or field at fault.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from clipforge._util.imageio import IMAGE_EXTENSIONS
from clipforge.data.formats.folders import class_folders, image_files, sidecar_caption
from clipforge.data.formats.images import ImageSource
from clipforge.data.formats.samples import decode_text
from clipforge.data.formats.shards import (
    IMAGE_FIELDS,
    ShardIndex,
    expand_shards,
    shard_indexes,
)
from clipforge.data.formats.tables import (
    TABLE_SUFFIXES,
    Table,
    read_caption_table,
    read_label_table,
)
from clipforge.data.synthetic import (
    ALTERATIONS,
    CONTEXT_FACTORS,
    SHIFTS,
    SPLITS,
    SyntheticWorld,
    WorldConfig,
    ZeroShotTask,
    identities,
    identity_view,
    real_or_altered,
)
from clipforge.errors import ConfigError, InputError, one_line
from clipforge.eval.prompts import (
    DEFAULT_TEMPLATES,
    Templates,
    check_templates,
    read_classnames,
    read_templates,
)


@dataclass(frozen=True)
class ClassificationDataset:
    """Images (PIL images, file paths, encoded bytes or shard members) with class ids into ``classnames``.

    ``templates`` is a list of ``{c}`` prompts shared by all classes, or per-class descriptions
    (CuPL). ``synthetic`` is set for the synthetic world's tasks: it can render the task's other
    splits and shifted versions (validation, linear-probe training, distribution shift, OOD).
    """

    name: str
    classnames: list[str]
    templates: Templates
    images: Sequence[ImageSource]
    labels: list[int]
    synthetic: SyntheticTask | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices: Sequence[int], name: str | None = None) -> ClassificationDataset:
        return replace(
            self,
            name=name or self.name,
            images=[self.images[i] for i in indices],
            labels=[self.labels[i] for i in indices],
        )


@dataclass(frozen=True)
class RetrievalDataset:
    """Images with one or more captions each (``captions[i]`` describe ``images[i]``)."""

    name: str
    images: Sequence[ImageSource]
    captions: list[list[str]]


@dataclass(frozen=True)
class SyntheticTask:
    """A zero-shot task of the synthetic world, able to render any split of it."""

    world: SyntheticWorld
    task: ZeroShotTask
    context_factors: dict[str, dict[str, list[str]]] = field(default_factory=lambda: CONTEXT_FACTORS)

    def dataset(self, split: str, samples: int, shift: str | None = None) -> ClassificationDataset:
        """The images among the first ``samples`` of ``split`` (optionally shifted) that the task can label."""
        scenes = list(self.world.samples(split, 0, samples, shift))
        suffix = "" if split == "test" and shift is None else f"@{split}" + (f"+{shift}" if shift else "")
        return self.labelled(scenes, f"synthetic/{self.task.name}{suffix}", f"split {split!r}")

    def labelled(self, scenes: Sequence[Any], name: str, where: str = "these samples") -> ClassificationDataset:
        """The samples of ``scenes`` (``world.sample`` results) that the task can label, in order."""
        labels = [self.task.label_of(scene.metadata) for scene in scenes]
        kept = [i for i, label in enumerate(labels) if label is not None]
        if not kept:
            raise InputError(f"synthetic:{self.task.name}: {where} has no sample this task can label")
        images = [scenes[i].image for i in kept]
        return ClassificationDataset(
            name, list(self.task.classnames), list(self.task.templates), images, [labels[i] for i in kept], self
        )

    def single_object_images(self, split: str, samples: int) -> list[Image.Image]:
        """Images of ``split`` showing one kind of object only (no second object), e.g. clean OOD images."""
        scenes = (self.world.sample(split, index) for index in range(50 * samples))
        return [s.image for s in itertools.islice((s for s in scenes if s.metadata["second_shape"] is None), samples)]

    def retrieval(self, samples: int, captions_per_image: int = 5) -> RetrievalDataset:
        found = self.world.retrieval_set("test", samples, captions_per_image)
        return RetrievalDataset("synthetic/retrieval", found.images, found.captions)


# -- dataset sources --


def synthetic_task(task: str = "shape", world: WorldConfig | None = None) -> SyntheticTask:
    synthetic_world = SyntheticWorld(world or WorldConfig())
    tasks = synthetic_world.tasks()
    if task not in tasks:
        raise InputError(f"synthetic:{task}: unknown task (one of {', '.join(tasks)})")
    return SyntheticTask(synthetic_world, tasks[task])


def synthetic_dataset(spec: str, samples: int) -> ClassificationDataset:
    """``synthetic[:TASK][@SPLIT][+SHIFT]``: the task (default shape) on the first ``samples`` of the split
    (default test; e.g. ``@val`` for held-out choices), rendered under a named shift if given."""
    rest, _, shift = spec.partition(":")[2].partition("+")
    task, _, split = rest.partition("@")
    if split and split not in SPLITS:
        raise InputError(f"{spec}: split {split!r} is not one of {', '.join(SPLITS)}")
    if task == "altered":
        return altered_dataset(split or "test", samples, shift.split(",") if shift else list(ALTERATIONS))
    if task == "identities":
        return identities_dataset(split or "test", samples)
    if shift and shift not in SHIFTS:
        raise InputError(f"{spec}: shift {shift!r} is not one of {', '.join(SHIFTS)}")
    return synthetic_task(task or "shape").dataset(split or "test", samples, shift or None)


def altered_dataset(split: str, samples: int, families: Sequence[str]) -> ClassificationDataset:
    """``synthetic:altered[@SPLIT][+FAMILY,...]``: the first ``samples`` of the split, real (even indices) or
    altered by the families in turn (``clipforge.data.synthetic.real_or_altered``); classes real, altered."""
    world = SyntheticWorld(WorldConfig())
    try:
        drawn = [real_or_altered(world, split, index, families) for index in range(samples)]
    except ConfigError as error:
        raise InputError(f"synthetic:altered: {error}") from None
    name = f"synthetic/altered@{split}+{','.join(families)}"
    return ClassificationDataset(name, ["real", "altered"], ["a photo of a {c} image."], [image for image, _, _ in drawn],
                                 [label for _, label, _ in drawn])


def identities_dataset(split: str, samples: int, views: int = 4) -> ClassificationDataset:
    """``synthetic:identities[@train|@test]``: ``views`` renders of each of the first ``samples // views``
    identities of that side of the identity split (``clipforge.data.synthetic.identities``), view-major by
    identity; a class per identity."""
    sides = identities()
    if split not in sides:
        raise InputError(f"synthetic:identities@{split}: the identity split has only {', '.join(sides)}")
    chosen = sides[split][: max(2, samples // views)]
    images = [identity_view(identity, view) for identity in chosen for view in range(views)]
    labels = [label for label in range(len(chosen)) for _ in range(views)]
    return ClassificationDataset(f"synthetic/identities@{split}", [identity.name for identity in chosen],
                                 list(DEFAULT_TEMPLATES), images, labels)


def folder_dataset(root: str | Path, classnames: Sequence[str] | None = None) -> ClassificationDataset:
    """``root/<class folder>/**/<image>``; ``classnames`` (if given) name the folders in sorted order."""
    root = Path(root)
    classes = class_folders(root)
    if classnames is not None and len(classnames) != len(classes):
        raise InputError(f"{root}: {len(classes)} class folders but {len(classnames)} class names")
    images = [image for _, files in classes for image in files]
    labels = [label for label, (_, files) in enumerate(classes) for _ in files]
    names = list(classnames) if classnames is not None else [folder.name.replace("_", " ") for folder, _ in classes]
    return ClassificationDataset(root.name, names, list(DEFAULT_TEMPLATES), images, labels)


def _labels_to_ids(values: list[Any], classnames: Sequence[str] | None, source: str) -> tuple[list[int], list[str]]:
    """Class ids and class names from raw labels: ids into ``classnames``, or names (of ``classnames`` if given)."""
    for row, value in enumerate(values, start=1):
        if value is None or (isinstance(value, str) and not value.strip()):
            raise InputError(f"{source}: row {row} has no label")
    if all(isinstance(value, str) for value in values):
        names = list(classnames) if classnames is not None else sorted(set(values))
        index = {name: i for i, name in enumerate(names)}
        for row, value in enumerate(values, start=1):
            if value not in index:
                raise InputError(f"{source}: row {row} has label {value!r}, which is not in the class list")
        return [index[value] for value in values], names
    if classnames is None:
        raise InputError(f"{source}: labels are class ids, so the class names must be given (--classnames FILE)")
    for row, value in enumerate(values, start=1):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or not 0 <= value < len(classnames):
            count = len(classnames)
            raise InputError(f"{source}: row {row} has label {value!r}, outside the {count} classes (0..{count - 1})")
    return [int(value) for value in values], list(classnames)


def _require_every_class(labels: Sequence[int], classnames: Sequence[str], source: str) -> None:
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classnames))
    empty = [classnames[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise InputError(f"{source}: class {empty[0]!r} has no images ({len(empty)} empty classes)")


def _table_images(table: Table) -> list[ImageSource]:
    """Every row's image (files relative to the table); an empty cell or a missing file is an error naming its row."""
    images = [table.image(row, table.path.parent) for row in range(len(table))]
    for row, image in enumerate(images, start=1):
        if image is None:
            raise InputError(f"{table.path} column {table.image_column!r}: row {row} has no image")
        if isinstance(image, Path) and not image.exists():
            raise InputError(f"{table.path} column {table.image_column!r}: row {row}: {image}: no such file")
    return images


def table_dataset(
    path: str | Path,
    image_column: str = "image",
    label_column: str = "label",
    classnames: Sequence[str] | None = None,
) -> ClassificationDataset:
    """A CSV/TSV/parquet/JSONL table with one image and one label per row."""
    path = Path(path)
    table = read_label_table(path, image_column, label_column)
    labels, names = _labels_to_ids(table.values.to_pylist(), classnames, f"{path} column {label_column!r}")
    _require_every_class(labels, names, str(path))
    return ClassificationDataset(path.stem, names, list(DEFAULT_TEMPLATES), _table_images(table), labels)


def _class_value(index: ShardIndex, row: int, class_field: str) -> Any:
    """The class of one webdataset sample: member ``<key>.<class_field>`` or field ``class_field`` of ``<key>.json``."""
    where = index.label(row)
    raw = index.read(row, class_field)
    if raw is not None:
        text = decode_text(raw, where, "class")
        return int(text) if text.lstrip("-").isdigit() else text
    raw = index.read(row, "json")
    if raw is not None:
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise InputError(f"{where}: unreadable .json member ({one_line(error)})") from None
        if isinstance(record, dict) and class_field in record:
            return record[class_field]
    raise InputError(f"{where}: no class field {class_field!r} (neither a .{class_field} member nor a JSON field)")


def _shard_images(pattern: str) -> list[tuple[ShardIndex, int]]:
    """(index, row) of every sample with an image in the shards of ``pattern``, in order."""
    indexes = shard_indexes([Path(shard) for shard in expand_shards(pattern)])
    found = [(index, row) for index in indexes for row in index.samples_with(IMAGE_FIELDS)]
    if not found:
        raise InputError(f"{pattern}: no image samples in the shards")
    return found


def _shard_set_name(pattern: str) -> str:
    return Path(pattern).parent.name or Path(pattern).stem


def webdataset_dataset(
    pattern: str, class_field: str = "cls", classnames: Sequence[str] | None = None
) -> ClassificationDataset:
    """Webdataset shards (``clipforge.data.formats.shards``): one image per sample with an image, kept
    in its shard as a ``ShardMember``, and its class."""
    samples = _shard_images(pattern)
    images = [index.image(row) for index, row in samples]
    raw_labels = [_class_value(index, row, class_field) for index, row in samples]
    labels, names = _labels_to_ids(raw_labels, classnames, f"{pattern} field {class_field!r}")
    _require_every_class(labels, names, pattern)
    return ClassificationDataset(_shard_set_name(pattern), names, list(DEFAULT_TEMPLATES), images, labels)


def load_dataset(
    spec: str,
    *,
    classnames_file: str | Path | None = None,
    templates_file: str | Path | None = None,
    samples: int = 1000,
    image_column: str = "image",
    label_column: str = "label",
    class_field: str = "cls",
) -> ClassificationDataset:
    """A dataset from a ``--data`` spec (see the module docstring); ``samples`` sizes synthetic sets."""
    classnames = read_classnames(classnames_file) if classnames_file is not None else None
    if spec == "synthetic" or spec.startswith("synthetic:"):
        dataset = synthetic_dataset(spec, samples)
        if classnames is not None:
            raise InputError("--classnames: the synthetic world names its own classes")
    else:
        path = Path(spec)
        if path.is_dir():
            dataset = folder_dataset(path, classnames)
        elif path.suffix.lower() in TABLE_SUFFIXES:
            dataset = table_dataset(path, image_column, label_column, classnames)
        elif path.suffix.lower() == ".tar":
            dataset = webdataset_dataset(spec, class_field, classnames)
        else:
            raise InputError(f"{spec}: not a folder, table ({'/'.join(TABLE_SUFFIXES)}), webdataset (.tar) or 'synthetic[:task]'")
    if templates_file is not None:
        templates = check_templates(read_templates(templates_file), dataset.classnames, str(templates_file))
        dataset = replace(dataset, templates=templates)
    return dataset


def load_retrieval_dataset(
    spec: str, *, samples: int = 1000, image_column: str = "image", caption_column: str = "caption"
) -> RetrievalDataset:
    """``synthetic`` (five paraphrases per image), a table with one caption per row (rows grouped by
    image), webdataset shards (``.tar``, brace patterns) or a folder of images, each with one ``.txt``
    caption."""
    if spec == "synthetic" or spec.startswith("synthetic:"):
        return synthetic_task(spec.partition(":")[2] or "shape").retrieval(samples)
    path = Path(spec)
    if path.is_dir():
        files = image_files(path)
        if not files:
            raise InputError(f"{path}: no images found ({', '.join(IMAGE_EXTENSIONS)})")
        return RetrievalDataset(path.name, files, [[sidecar_caption(file, str(file))] for file in files])
    if path.suffix.lower() == ".tar":
        found = _shard_images(spec)
        captions = [[index.caption(row)] for index, row in found]
        return RetrievalDataset(_shard_set_name(spec), [index.image(row) for index, row in found], captions)
    if path.suffix.lower() not in TABLE_SUFFIXES or not path.is_file():
        raise InputError(
            f"{spec}: retrieval needs 'synthetic', a folder of images with .txt captions, webdataset shards (.tar) "
            f"or a {'/'.join(TABLE_SUFFIXES)} table with image and caption columns"
        )
    table = read_caption_table(path, image_column, caption_column)
    grouped: dict[Any, list[str]] = {}
    for row, image in enumerate(_table_images(table)):
        grouped.setdefault(image, []).append(table.caption(row, f"{path} row {row + 1}"))
    return RetrievalDataset(path.stem, list(grouped), list(grouped.values()))


