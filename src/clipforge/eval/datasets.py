"""Evaluation datasets: labelled images with class names and prompt templates, from five kinds of source.

- the synthetic world's zero-shot tasks (``synthetic`` or ``synthetic:<task>``, e.g. ``synthetic:color``);
- a class-per-folder directory (``root/<class>/<image>``, classes in sorted folder order);
- a CSV/TSV/parquet table with an image column (paths relative to the table, or encoded bytes) and a
  label column (class ids or class names);
- webdataset shards (``.tar`` files, brace patterns such as ``shards/{000..009}.tar``) whose samples
  carry a class field (a ``<key>.cls`` member, as CLIP_benchmark's ``wds/*`` sets, or a JSON field).

Class names and templates may come from files (``read_classnames``, ``read_templates``): one per line
in a ``.txt``, a JSON list, or, for templates, a CuPL JSON object ``{class name: [descriptions]}``
(Pratt et al., "What does a platypus look like?", ICCV 2023). Templates are ``str.format`` strings
with a ``{c}`` placeholder, as in CLIP_benchmark. Every problem is one ``InputError`` line naming the
file and the line, row, class or field at fault.
"""

from __future__ import annotations

import itertools
import json
import tarfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from clipforge._util.imageio import IMAGE_EXTENSIONS, is_image_path, open_image
from clipforge.data.synthetic import (
    CONTEXT_FACTORS,
    SyntheticWorld,
    WorldConfig,
    ZeroShotTask,
)
from clipforge.errors import InputError, one_line

DEFAULT_TEMPLATES = ["a photo of a {c}."]
"""CLIP's default prompt when a dataset comes without templates."""

Templates = list[str] | dict[str, list[str]]
ImageSource = Image.Image | str | Path | bytes


@dataclass(frozen=True)
class ClassificationDataset:
    """Images (PIL images, file paths or encoded bytes) with class ids into ``classnames``.

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


# -- class names and templates from files --


def _read_entries(path: Path, what: str) -> tuple[list[Any] | dict[str, Any], str]:
    """A ``.json`` file's list or object, or a text file's lines (trailing blank lines dropped), and
    what to call one entry in messages ("entry" or "line")."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{what} file {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{what} file {path}: cannot read it ({one_line(error)})") from None
    if path.suffix.lower() != ".json":
        return text.rstrip("\n\r ").splitlines(), "line"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"{what} file {path}: invalid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(value, list | dict):
        raise InputError(f"{what} file {path}: expected a JSON list or object, got {type(value).__name__}")
    return value, "entry"


def _nonempty_strings(values: Sequence[Any], where: str, position: str, noun: str) -> list[str]:
    for number, value in enumerate(values, start=1):
        if not isinstance(value, str) or not value.strip():
            raise InputError(f"{where}: {position} {number} is an empty {noun} ({value!r})")
    if not values:
        raise InputError(f"{where}: has no {noun}s")
    return [value.strip() for value in values]


def read_classnames(path: str | Path) -> list[str]:
    """Class names from a ``.txt`` (one per line) or a JSON list; empty or repeated names are errors."""
    path = Path(path)
    entries, position = _read_entries(path, "class names")
    if isinstance(entries, dict):
        raise InputError(f"class names file {path}: expected a list of class names, got a JSON object")
    names = _nonempty_strings(entries, f"class names file {path}", position, "class name")
    for number, name in enumerate(names, start=1):
        if (first := names.index(name) + 1) != number:
            raise InputError(f"class names file {path}: {position} {number} repeats class {name!r} ({position} {first})")
    return names


def read_templates(path: str | Path) -> Templates:
    """Prompt templates (``.txt`` lines or a JSON list, each with ``{c}``) or CuPL descriptions per class."""
    path = Path(path)
    entries, position = _read_entries(path, "templates")
    where = f"templates file {path}"
    if isinstance(entries, dict):
        return {
            name: _nonempty_strings(texts if isinstance(texts, list) else [], f"{where}, class {name!r}", "entry", "description")
            for name, texts in entries.items()
        }
    templates = _nonempty_strings(entries, where, position, "template")
    for number, template in enumerate(templates, start=1):
        if "{c}" not in template:
            raise InputError(f"{where}: {position} {number} has no {{c}} placeholder ({template!r})")
    return templates


def check_templates(templates: Templates, classnames: Sequence[str], source: str) -> Templates:
    """CuPL descriptions must cover every class; returns them restricted to ``classnames``."""
    if isinstance(templates, list):
        return templates
    missing = [name for name in classnames if name not in templates]
    if missing:
        raise InputError(f"{source}: no descriptions for class {missing[0]!r} ({len(missing)} classes missing)")
    return {name: templates[name] for name in classnames}


# -- dataset sources --


def synthetic_task(task: str = "shape", world: WorldConfig | None = None) -> SyntheticTask:
    synthetic_world = SyntheticWorld(world or WorldConfig())
    tasks = synthetic_world.tasks()
    if task not in tasks:
        raise InputError(f"synthetic:{task}: unknown task (one of {', '.join(tasks)})")
    return SyntheticTask(synthetic_world, tasks[task])


def folder_dataset(root: str | Path, classnames: Sequence[str] | None = None) -> ClassificationDataset:
    """``root/<class folder>/**/<image>``; ``classnames`` (if given) name the folders in sorted order."""
    root = Path(root)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise InputError(f"{root}: no class folders (expected {root}/<class>/<image files>)")
    if classnames is not None and len(classnames) != len(folders):
        raise InputError(f"{root}: {len(folders)} class folders but {len(classnames)} class names")
    images: list[ImageSource] = []
    labels: list[int] = []
    for label, folder in enumerate(folders):
        files = sorted(p for p in folder.rglob("*") if p.is_file() and is_image_path(p))
        if not files:
            raise InputError(f"{folder}: class {folder.name!r} has no images ({', '.join(IMAGE_EXTENSIONS)})")
        images.extend(files)
        labels.extend([label] * len(files))
    names = list(classnames) if classnames is not None else [folder.name.replace("_", " ") for folder in folders]
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


def _read_table(path: Path) -> Any:
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    try:
        if path.suffix.lower() == ".parquet":
            return pq.read_table(path)
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        return pa_csv.read_csv(path, parse_options=pa_csv.ParseOptions(delimiter=delimiter))
    except Exception as error:  # pyarrow raises ArrowInvalid, OSError, ... for unreadable tables
        raise InputError(f"{path}: cannot read the table ({one_line(error)})") from None


def _column(table: Any, name: str, path: Path) -> list[Any]:
    if name not in table.column_names:
        raise InputError(f"{path}: no column {name!r} (columns: {', '.join(table.column_names)})")
    return table.column(name).to_pylist()


def _image_cell(value: Any, base: Path, source: str, row: int) -> ImageSource:
    """A table cell as an image source: bytes, a path (relative to the table), or {"bytes", "path"}."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str) and value.strip():
        path = Path(value)
        return path if path.is_absolute() else base / path
    raise InputError(f"{source}: row {row} has no image ({value!r})")


def table_dataset(
    path: str | Path,
    image_column: str = "image",
    label_column: str = "label",
    classnames: Sequence[str] | None = None,
) -> ClassificationDataset:
    """A CSV/TSV/parquet table with one image and one label per row."""
    path = Path(path)
    table = _read_table(path)
    source = f"{path} column {label_column!r}"
    labels, names = _labels_to_ids(_column(table, label_column, path), classnames, source)
    cells = _column(table, image_column, path)
    images = [_image_cell(cell, path.parent, f"{path} column {image_column!r}", row) for row, cell in enumerate(cells, 1)]
    _require_every_class(labels, names, str(path))
    return ClassificationDataset(path.stem, names, list(DEFAULT_TEMPLATES), images, labels)


def _class_value(members: dict[str, bytes], class_field: str, where: str) -> Any:
    """The class of one webdataset sample: member ``<key>.<class_field>`` or field ``class_field`` of ``<key>.json``."""
    if class_field in members:
        text = members[class_field].decode("utf-8").strip()
        return int(text) if text.lstrip("-").isdigit() else text
    if "json" in members:
        try:
            record = json.loads(members["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise InputError(f"{where}: unreadable .json member ({one_line(error)})") from None
        if isinstance(record, dict) and class_field in record:
            return record[class_field]
    raise InputError(f"{where}: no class field {class_field!r} (neither a .{class_field} member nor a JSON field)")


def webdataset_dataset(
    pattern: str, class_field: str = "cls", classnames: Sequence[str] | None = None
) -> ClassificationDataset:
    """Webdataset shards: members grouped by key (the name up to the first dot); image bytes kept in memory."""
    from braceexpand import braceexpand

    images: list[ImageSource] = []
    raw_labels: list[Any] = []
    for shard in map(Path, braceexpand(pattern)):
        if not shard.is_file():
            raise InputError(f"{shard}: no such webdataset shard")
        samples: dict[str, dict[str, bytes]] = defaultdict(dict)
        try:
            with tarfile.open(shard) as archive:
                for member in archive:
                    if member.isfile():
                        directory, _, base = member.name.rpartition("/")
                        key, _, extension = base.partition(".")
                        samples[f"{directory}/{key}"][extension.lower()] = archive.extractfile(member).read()
        except (tarfile.TarError, OSError) as error:
            raise InputError(f"{shard}: not a readable tar shard ({one_line(error)})") from None
        for key, members in samples.items():
            image_extension = next((e for e in members if f".{e}" in IMAGE_EXTENSIONS), None)
            if image_extension is None:
                continue
            images.append(members[image_extension])
            raw_labels.append(_class_value(members, class_field, f"{shard} sample {key.lstrip('/')}"))
    if not images:
        raise InputError(f"{pattern}: no image samples in the shards")
    labels, names = _labels_to_ids(raw_labels, classnames, f"{pattern} field {class_field!r}")
    _require_every_class(labels, names, pattern)
    return ClassificationDataset(Path(pattern).parent.name or Path(pattern).stem, names, list(DEFAULT_TEMPLATES), images, labels)


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
        dataset = synthetic_task(spec.partition(":")[2] or "shape").dataset("test", samples)
        if classnames is not None:
            raise InputError("--classnames: the synthetic world names its own classes")
    else:
        path = Path(spec)
        if path.is_dir():
            dataset = folder_dataset(path, classnames)
        elif path.suffix.lower() in (".csv", ".tsv", ".parquet"):
            if not path.is_file():
                raise InputError(f"{path}: no such file")
            dataset = table_dataset(path, image_column, label_column, classnames)
        elif path.suffix.lower() == ".tar":
            dataset = webdataset_dataset(spec, class_field, classnames)
        else:
            raise InputError(f"{spec}: not a folder, table (.csv/.tsv/.parquet), webdataset (.tar) or 'synthetic[:task]'")
    if templates_file is not None:
        templates = check_templates(read_templates(templates_file), dataset.classnames, str(templates_file))
        dataset = replace(dataset, templates=templates)
    return dataset


def load_retrieval_dataset(
    spec: str, *, samples: int = 1000, image_column: str = "image", caption_column: str = "caption"
) -> RetrievalDataset:
    """``synthetic`` (five paraphrases per image) or a table with one caption per row (rows grouped by image)."""
    if spec == "synthetic" or spec.startswith("synthetic:"):
        return synthetic_task(spec.partition(":")[2] or "shape").retrieval(samples)
    path = Path(spec)
    if path.suffix.lower() not in (".csv", ".tsv", ".parquet") or not path.is_file():
        raise InputError(f"{spec}: retrieval needs 'synthetic' or a .csv/.tsv/.parquet table with image and caption columns")
    table = _read_table(path)
    grouped: dict[Any, list[str]] = {}
    cells, texts = _column(table, image_column, path), _column(table, caption_column, path)
    for row, (cell, text) in enumerate(zip(cells, texts, strict=True), start=1):
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{path} column {caption_column!r}: row {row} has an empty caption")
        grouped.setdefault(_image_cell(cell, path.parent, f"{path} column {image_column!r}", row), []).append(text)
    return RetrievalDataset(path.stem, list(grouped), list(grouped.values()))


def load_image(source: ImageSource) -> Image.Image:
    """A dataset entry as an RGB PIL image (files and bytes through ``open_image``)."""
    image = source if isinstance(source, Image.Image) else open_image(source)
    return image.convert("RGB")
