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

A sample that cannot be reinforced (no image, an unreadable image or caption, no extra captions where
``--captions`` looks for them) is skipped with a one-line reason naming it (``<shard>:<key>``). Settings that
cannot work are refused before anything is written: ``--captions synthetic`` without the ``world.json`` of
``clipforge data synth`` beside the shards, and a shard none of whose samples can be reinforced (the job
record is written with the first output shard, so a refused job leaves nothing behind).
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
from clipforge.errors import ConfigError, InputError, one_line
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

    def check(self, shards: Sequence[Path]) -> None:
        """Refuse, before any work, ``synthetic`` captions for shards without the world that wrote them."""
        if self.kind == "synthetic" and self.count > 0:
            for shard in shards:
                self._world(shard)

    def captions(self, shard: Path, raw_json: bytes | None, key: str) -> list[str]:
        """The extra captions of sample ``key``; its ``.json`` (``raw_json``) is parsed only when they come from it."""
        if self.kind == "none" or self.count == 0:
            return []
        metadata = _metadata(raw_json, key)
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
                raise ConfigError(
                    f"{manifest}: missing; --captions synthetic reads the world clipforge data synth wrote beside the shards "
                    "(use --captions json:FIELD or none for other shards)"
                )
            self._worlds[manifest.parent] = SyntheticWorld(WorldConfig(**json.loads(manifest.read_text())["world"]))
        return self._worlds[manifest.parent]


def _metadata(raw_json: bytes | None, key: str) -> dict[str, Any]:
    """A sample's ``.json`` (``{}`` without one); ``InputError`` naming the sample when it is not a JSON object."""
    if not raw_json:
        return {}
    try:
        metadata = json.loads(raw_json)
    except ValueError as error:
        raise InputError(f"{key}: .json is not valid JSON ({one_line(error)})") from None
    if not isinstance(metadata, dict):
        raise InputError(f"{key}: .json is not a JSON object")
    return metadata


def input_shards(inputs: Sequence[str | Path]) -> list[Path]:
    """Shard paths from paths, brace patterns and folders of shards, in order; each must exist, names must be unique."""
    shards: list[Path] = []
    for given in inputs:
        for path in map(Path, expand_shards(str(given))):
            if not path.exists():
                raise InputError(f"{path}: no such shard or folder")
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
    job = {**record, "inputs": [str(shard.absolute()) for shard in shards]}
    _claim(root, job, write=False)
    caption_source = CaptionSource(captions, caption_count)
    caption_source.check(shards)
    crop = record["crop"]
    cropper = TrainTransform(teachers[0].preprocess_cfg, scale=tuple(crop["scale"]), ratio=tuple(crop["ratio"]))
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
                samples = _read_samples(shard, cropper, record, caption_source, report)
                _claim(root, job, write=True)
                _write_shard(samples, target, teachers, record, batch_size)
                report.samples += len(samples)
                report.written.append(str(target))
            bar.advance(task)
    if root.is_dir() and (shards[0].parent / "world.json").is_file() and not (root / "world.json").exists():
        shutil.copyfile(shards[0].parent / "world.json", root / "world.json")
    report.wall_s = time.perf_counter() - started
    return report


def _claim(root: Path, job: dict[str, Any], *, write: bool) -> None:
    """Check that ``root`` holds no other job; with ``write``, record this one (``reinforce.json``) if it is not yet."""
    path = root / JOB_FILE
    job = json.loads(json.dumps(job))  # as it reads back (tuples become lists)
    if path.exists():
        previous = json.loads(path.read_text())
        if previous != job:
            changed = sorted(key for key in job if previous.get(key) != job.get(key))
            raise ConfigError(f"{root}: holds a reinforcement with other {', '.join(changed)}; use an empty directory")
        return
    if not write:
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
    """The shard's samples that can be reinforced: their members, decoded image, captions and drawn crops. Each
    other sample's reason goes to ``report.skipped``; a shard with samples but none usable is an ``InputError``."""
    index = shard_index(shard)
    samples, skipped = [], []
    for row in range(len(index)):
        label = index.label(row)
        image_field = next((name for name in IMAGE_FIELDS if index.member(row, name) is not None), None)
        try:
            if image_field is None:
                raise InputError(f"{label}: no image member")
            image_bytes = index.read(row, image_field)
            image = read_image(image_bytes, name=label).convert("RGB")
            text = index.caption(row)
            raw_json = index.read(row, "json")
            extra = captions.captions(shard, raw_json, label)
        except (InputError, ValueError) as error:
            skipped.append(one_line(error))
            continue
        generator = seeded_generator(record["seed"], zlib.crc32(shard.name.encode()), row)
        crops = [cropper.sample_crop(image.width, image.height, generator) for _ in range(record["augmentations"])]
        members = {image_field: image_bytes, "txt": text.encode(), **({"json": raw_json} if raw_json else {})}
        samples.append(_Sample(index.keys[row], members, image, [text, *extra], crops))
    if skipped and not samples:
        raise InputError(f"{shard}: none of its {len(skipped)} samples can be reinforced (the first: {skipped[0]})")
    report.skipped += skipped
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


def _write_shard(samples: list[_Sample], target: Path, teachers: Sequence[CLIP], record: dict[str, Any], batch_size: int) -> None:
    """The reinforced shard ``target``: the job record, then each sample with its crops, captions and embeddings."""
    from webdataset import (
        TarWriter,  # pulls in torch's data utilities; imported when a shard is written
    )

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
