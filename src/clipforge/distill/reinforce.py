"""``clipforge data reinforce``: write MobileCLIP's reinforcements beside the images of webdataset shards.

For every image of every input shard: ``augmentations`` RandomResizedCrop boxes (open_clip's training crop,
drawn from a generator seeded by (seed, shard name, row), so a rerun draws the same), extra captions (the
synthetic world's paraphrases of the sample, a list in a field of the sample's ``.json``, or none), and each
teacher's embedding of every crop (the teacher's own preprocessing of the cropped image) and of every caption,
computed through ``clipforge.encode``. The layout is ``clipforge.distill.reinforced``'s.

Like ``clipforge embed``, the job is idempotent per shard: each output shard (same name as its input) is written
whole to a temporary file and renamed, so a rerun skips finished shards and a killed job resumes; ``reinforce.json``
records the job, and a rerun with other teachers or settings is refused. Under ``torchrun`` rank r takes shards
r, r + W, ….
"""

from __future__ import annotations

import json
import shutil
import tarfile
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipforge._util.fileio import atomic_path
from clipforge._util.progress import progress_bar
from clipforge.data.formats.images import read_image
from clipforge.data.formats.shards import IMAGE_FIELDS, expand_shards, shard_index
from clipforge.data.loader import seeded_generator
from clipforge.data.synthetic import SyntheticWorld, WorldConfig
from clipforge.distill.reinforced import (
    AUGMENTATION_FIELD,
    CAPTIONS_FIELD,
    EMBEDDING_DTYPE,
    EMBEDDINGS_FIELD,
    RECORD_KEY,
    REINFORCE_FORMAT,
)
from clipforge.distill.teacher import teacher_record
from clipforge.encode import encode_pixels, encode_texts
from clipforge.errors import ConfigError, InputError
from clipforge.models.clip import CLIP
from clipforge.preprocess.transforms import TrainTransform
from clipforge.train.distributed import world_info_from_env

JOB_FILE = "reinforce.json"
CHUNK = 64  # samples encoded together


@dataclass
class ReinforceReport:
    shards: int
    written: list[str] = field(default_factory=list)
    already_done: list[str] = field(default_factory=list)
    samples: int = 0
    skipped: list[str] = field(default_factory=list)  # one-line reasons
    wall_s: float = 0.0


class CaptionSource:
    """Extra captions of a sample: ``synthetic`` (the world's paraphrases), ``json:FIELD`` or ``none``."""

    def __init__(self, spec: str, count: int) -> None:
        kind, _, self.field = spec.partition(":")
        if kind not in ("synthetic", "json", "none") or (kind == "json") != bool(self.field):
            raise ConfigError(f"--captions {spec!r}: expected synthetic, json:FIELD or none")
        if count < 0:
            raise ConfigError(f"--caption-count {count}: must be ≥ 0")
        self.kind, self.count = kind, count
        self._worlds: dict[Path, SyntheticWorld] = {}

    def captions(self, shard: Path, metadata: dict[str, Any], key: str) -> list[str]:
        if self.kind == "none" or self.count == 0:
            return []
        if self.kind == "json":
            value = metadata.get(self.field)
            values = [value] if isinstance(value, str) else value
            if not isinstance(values, list) or not all(isinstance(v, str) and v.strip() for v in values):
                raise InputError(f"{key}: .json field {self.field!r} is not a caption or a list of captions")
            return values[: self.count]
        if "split" not in metadata or "index" not in metadata:
            raise InputError(f"{key}: --captions synthetic needs the synthetic world's .json (split, index)")
        return self._world(shard).paraphrases(metadata["split"], metadata["index"], self.count + 1)[1:]

    def _world(self, shard: Path) -> SyntheticWorld:
        manifest = shard.parent / "world.json"
        if manifest.parent not in self._worlds:
            if not manifest.is_file():
                raise InputError(f"{manifest}: missing; --captions synthetic reads the world clipforge data synth wrote")
            self._worlds[manifest.parent] = SyntheticWorld(WorldConfig(**json.loads(manifest.read_text())["world"]))
        return self._worlds[manifest.parent]


def input_shards(inputs: Sequence[str | Path]) -> list[Path]:
    """Shard paths from paths, brace patterns and folders of shards, in order; names must be unique."""
    shards: list[Path] = []
    for given in inputs:
        for path in map(Path, expand_shards(str(given))):
            shards.extend(sorted(path.glob("*.tar")) if path.is_dir() else [path])
    if not shards:
        raise InputError(f"{', '.join(map(str, inputs))}: no .tar shards found")
    names = [shard.name for shard in shards]
    if len(set(names)) != len(names):
        raise ConfigError("input shards must have distinct file names (each output shard keeps its input's name)")
    return shards


def reinforce(
    teachers: Sequence[CLIP],
    teacher_sources: Sequence[str],
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    augmentations: int = 5,
    captions: str = "synthetic",
    caption_count: int = 5,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = True,
) -> ReinforceReport:
    """Reinforce this rank's unfinished shards of ``inputs`` into ``out`` (see the module docstring)."""
    if not teachers or len(teachers) != len(teacher_sources):
        raise ConfigError("reinforce: give at least one teacher, and one source name per teacher")
    if augmentations < 1:
        raise ConfigError(f"--augmentations {augmentations}: must be ≥ 1")
    started = time.perf_counter()
    root, shards = Path(out), input_shards(inputs)
    record = {
        "format": REINFORCE_FORMAT,
        "teachers": [teacher_record(t, s) for t, s in zip(teachers, teacher_sources)],
        "augmentations": augmentations,
        "crop": {"scale": [0.9, 1.0], "ratio": [3 / 4, 4 / 3]},
        "captions": {"source": captions, "count": caption_count},
        "seed": seed,
    }
    _claim(root, {**record, "inputs": [str(shard.absolute()) for shard in shards]})
    caption_source = CaptionSource(captions, caption_count)
    world = world_info_from_env()
    report = ReinforceReport(len(shards))
    mine = shards[world.rank :: world.world_size]
    with progress_bar(disable=not progress) as bar:
        task = bar.add_task("reinforcing", total=len(mine), unit="shard")
        for shard in mine:
            target = root / shard.name
            if target.exists():
                report.already_done.append(str(target))
            else:
                _reinforce_shard(shard, target, teachers, record, caption_source, batch_size, report)
                report.written.append(str(target))
            bar.advance(task)
    if (shards[0].parent / "world.json").is_file() and not (root / "world.json").exists():
        shutil.copyfile(shards[0].parent / "world.json", root / "world.json")
    report.wall_s = time.perf_counter() - started
    return report


def _claim(root: Path, job: dict[str, Any]) -> None:
    """Write the job description, or check that ``root`` already holds this very job."""
    path = root / JOB_FILE
    job = json.loads(json.dumps(job))  # as it reads back (tuples become lists)
    if path.exists():
        previous = json.loads(path.read_text())
        if previous != job:
            changed = sorted(key for key in job if previous.get(key) != job.get(key))
            raise ConfigError(f"{root}: holds a reinforcement with other {', '.join(changed)}; use an empty directory")
        return
    root.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(job, indent=2) + "\n")


@dataclass
class _Sample:
    key: str
    members: dict[str, bytes]  # image, txt, json as read
    image: Any
    texts: list[str]  # the .txt caption, then the extra ones
    crops: list[tuple[int, int, int, int]]


def _read_samples(
    shard: Path, cropper: TrainTransform, record: dict[str, Any], captions: CaptionSource, report: ReinforceReport
) -> list[_Sample]:
    """The shard's samples with an image: their members, decoded image, captions and drawn crops."""
    index = shard_index(shard)
    samples = []
    for row in index.samples_with(IMAGE_FIELDS).tolist():
        label = index.label(row)
        image_field = next(name for name in IMAGE_FIELDS if index.member(row, name) is not None)
        try:
            image_bytes = index.read(row, image_field)
            image = read_image(image_bytes, name=label).convert("RGB")
            text = index.caption(row)
            raw_json = index.read(row, "json")
            metadata = json.loads(raw_json) if raw_json else {}
            extra = captions.captions(shard, metadata, label)
        except (InputError, ValueError) as error:
            report.skipped.append(str(error).splitlines()[0])
            continue
        generator = seeded_generator(record["seed"], zlib.crc32(shard.name.encode()), row)
        crops = [cropper.sample_crop(image.width, image.height, generator) for _ in range(record["augmentations"])]
        members = {image_field: image_bytes, "txt": text.encode(), **({"json": raw_json} if raw_json else {})}
        samples.append(_Sample(index.keys[row], members, image, [text, *extra], crops))
    return samples


def _embeddings(samples: list[_Sample], teachers: Sequence[CLIP], batch_size: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per sample: the teachers' embeddings of its crops [N, ΣD] and of its captions [1 + k, ΣD] (float16)."""
    images, texts = [], []
    for teacher in teachers:
        crop = TrainTransform(teacher.preprocess_cfg)
        pixels = torch.stack([crop.augment(s.image, box) for s in samples for box in s.crops])
        images.append(encode_pixels(teacher, pixels, batch_size))
        texts.append(encode_texts(teacher, [text for s in samples for text in s.texts], batch_size=batch_size))
    image_rows, text_rows = torch.cat(images, dim=1).half().numpy(), torch.cat(texts, dim=1).half().numpy()
    image_split = np.cumsum([len(s.crops) for s in samples])[:-1]
    text_split = np.cumsum([len(s.texts) for s in samples])[:-1]
    return np.split(image_rows, image_split), np.split(text_rows, text_split)


def _reinforce_shard(
    shard: Path, target: Path, teachers: Sequence[CLIP], record: dict[str, Any], captions: CaptionSource, batch_size: int, report: ReinforceReport
) -> None:
    from webdataset import (
        TarWriter,  # pulls in torch's data utilities; imported when a shard is written
    )

    crop = record["crop"]
    cropper = TrainTransform(teachers[0].preprocess_cfg, scale=tuple(crop["scale"]), ratio=tuple(crop["ratio"]))
    samples = _read_samples(shard, cropper, record, captions, report)
    with atomic_path(target) as tmp, open(tmp, "wb") as stream:
        writer = TarWriter(stream, encoder=False, mtime=int(time.time()), format=tarfile.USTAR_FORMAT)
        writer.write({"__key__": RECORD_KEY, "json": json.dumps(record, sort_keys=True).encode()})
        for start in range(0, len(samples), CHUNK):
            chunk = samples[start : start + CHUNK]
            image_rows, text_rows = _embeddings(chunk, teachers, batch_size)
            for sample, image_embedding, text_embedding in zip(chunk, image_rows, text_rows):
                writer.write({
                    "__key__": sample.key,
                    **sample.members,
                    AUGMENTATION_FIELD: json.dumps({"crops": [list(c) for c in sample.crops]}).encode(),
                    CAPTIONS_FIELD: json.dumps({"captions": sample.texts[1:]}).encode(),
                    EMBEDDINGS_FIELD: np.concatenate([image_embedding, text_embedding]).astype(EMBEDDING_DTYPE).tobytes(),
                })
        writer.close()
    report.samples += len(samples)
