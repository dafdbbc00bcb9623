"""Reinforced datasets (MobileCLIP): shards whose samples carry stored augmentations, captions and teacher embeddings.

MobileCLIP (Vasu et al., CVPR 2024, §3.1; apple/ml-mobileclip ``training/``, DataCompDR) stores per image N
random augmentations as parameters, several synthetic captions, and the embeddings an ensemble of teachers
gives every augmented image and every caption; training draws one stored augmentation and one caption per seen
sample and never runs a teacher. Layout of a reinforced shard (``clipforge data reinforce`` writes it), per
sample ``{key}``, beside the copied image, ``.txt`` and ``.json`` members:

- ``{key}.paug.json``: ``{"crops": [[top, left, height, width], ...]}`` (RandomResizedCrop boxes, N of them);
- ``{key}.syn.json``: ``{"captions": [...]}`` (captions besides the ``.txt`` one);
- ``{key}.emb.f16``: the teachers' normalised embeddings side by side, raw little-endian float16 rows of
  ΣD values (the widths the record lists): N crop rows, then 1 + captions text rows (the ``.txt`` caption
  first). Raw rows rather than an ``.npz``: a seen sample decodes them in microseconds, where parsing an
  archive cost a fifth of the loader's time per sample;

and one ``__reinforce__.json`` member, the job's record (teachers with their fingerprints, embedding widths and
tokenizers; N; the caption source), the same in every shard of one job.

What differs: MobileCLIP sums two loss passes per seen sample (ground-truth caption and a synthetic one); here
one caption is drawn among all of them per seen sample, which sees the same captions in expectation at half
the text cost. A reinforced shard reads as an ordinary shard too (the extra members are ignored).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipforge.data.formats.shards import (
    SOURCE_LIST_SEPARATOR,
    expand_shards,
    shard_index,
)
from clipforge.data.sources import WebDatasetSource
from clipforge.distill.objective import Distillation, DistillSettings
from clipforge.distill.teacher import check_teachers_match
from clipforge.errors import ConfigError, InputError
from clipforge.preprocess.transforms import TrainTransform
from clipforge.train.config import TrainConfig

RECORD_KEY = "__reinforce__"
RECORD_MEMBER = f"{RECORD_KEY}.json"
AUGMENTATION_FIELD, CAPTIONS_FIELD, EMBEDDINGS_FIELD = "paug.json", "syn.json", "emb.f16"
EMBEDDING_DTYPE = np.dtype("<f2")
REINFORCE_FORMAT = 2  # 1: embeddings as emb.npz


def read_record(index: Any) -> dict[str, Any] | None:
    """The job record of a shard (its ``__reinforce__.json``), or None for an ordinary shard."""
    if RECORD_KEY not in index.keys:
        return None
    try:
        return json.loads(index.read(index.keys.index(RECORD_KEY), "json"))
    except ValueError as error:
        raise InputError(f"{index.path}: unreadable {RECORD_MEMBER} ({error})") from None


class ReinforcedSource(WebDatasetSource):
    """Reinforced shards as a training source: ``load_train`` replays one stored augmentation and hands over the
    matching stored embeddings (``extras``: ``teacher_image`` [ΣD], ``teacher_text`` [ΣD])."""

    def __init__(self, shards: str | Sequence[str]) -> None:
        super().__init__(shards)
        records = [read_record(index) for index in self.indexes]
        if records[0] is None:
            raise InputError(f"{self.shards[0]}: not a reinforced shard (no {RECORD_MEMBER}); run clipforge data reinforce")
        for shard, record in zip(self.shards, records):
            if record != records[0]:
                raise ConfigError(
                    f"{shard}: its teacher record differs from {self.shards[0]}'s (another reinforcement job); "
                    "train on shards of one job"
                )
        self.record: dict[str, Any] = records[0]
        if self.record.get("format") != REINFORCE_FORMAT:
            raise InputError(
                f"{self.shards[0]}: reinforced in format {self.record.get('format')}, this clipforge reads format "
                f"{REINFORCE_FORMAT}; rerun clipforge data reinforce into an empty directory"
            )
        try:
            self.width = sum(int(teacher["embed_dim"]) for teacher in self.record["teachers"])
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{self.shards[0]}: {RECORD_MEMBER} lists no teachers with their embedding widths") from None
        self._crop_transforms: dict[Any, TrainTransform] = {}

    def _crop_transform(self, transform: Any) -> TrainTransform:
        """The student's preprocessing replaying a stored crop (whatever augmentation its own transform draws)."""
        cfg = transform.cfg
        if cfg not in self._crop_transforms:
            self._crop_transforms[cfg] = transform if isinstance(transform, TrainTransform) else TrainTransform(cfg)
        return self._crop_transforms[cfg]

    def load_train(self, index: int, transform: Any, generator: torch.Generator) -> tuple[torch.Tensor, str, dict[str, np.ndarray]]:
        image, caption = self.load(index)
        shard, row = self._locate(index)
        shard_index, key = self.indexes[shard], self.key(index)
        try:
            crops = json.loads(shard_index.read(row, AUGMENTATION_FIELD))["crops"]
            captions = [caption, *json.loads(shard_index.read(row, CAPTIONS_FIELD))["captions"]]
            stored = np.frombuffer(shard_index.read(row, EMBEDDINGS_FIELD) or b"", dtype=EMBEDDING_DTYPE)
        except (TypeError, ValueError, KeyError, OSError) as error:
            raise InputError(f"{key}: incomplete reinforcement ({type(error).__name__}: {error})") from None
        if stored.size != (len(crops) + len(captions)) * self.width:
            raise InputError(
                f"{key}: {len(crops)} crops and {len(captions)} captions need {len(crops) + len(captions)} embeddings "
                f"of {self.width} values, but {EMBEDDINGS_FIELD} holds {stored.size} values"
            )
        rows = stored.reshape(-1, self.width)
        choice = int(torch.randint(len(crops), (1,), generator=generator))
        said = int(torch.randint(len(captions), (1,), generator=generator))
        pixels = self._crop_transform(transform).augment(image, tuple(crops[choice]), generator)
        extras = {"teacher_image": rows[choice].astype(np.float32), "teacher_text": rows[len(crops) + said].astype(np.float32)}
        return pixels, captions[said], extras


class ReinforcedData:
    """A reinforced dataset for ``distill``: its source, the teachers it records, and the objective that trains on it."""

    def __init__(self, shards: str | Sequence[str]) -> None:
        self.source = ReinforcedSource(shards)
        self.teachers = self.source.record["teachers"]

    def check_teachers(self, records: Sequence[dict[str, Any]]) -> None:
        """Refuse teachers other than those the shards were reinforced with (width, tokenizer, weights), given
        the offered teachers' ``teacher_record``s."""
        check_teachers_match(self.teachers, records, str(self.source.shards[0]))

    def objective_arguments(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "teacher_dims": [teacher["embed_dim"] for teacher in self.teachers],
            "stored_scales": [teacher["logit_scale"] for teacher in self.teachers],
        }

    def objective(self, config: TrainConfig, settings: DistillSettings) -> Distillation:
        return Distillation(config, settings, **self.objective_arguments())


def detect_reinforced(data: str) -> ReinforcedData | None:
    """Reinforced shards behind a ``data.train`` value (a folder of them, or shard paths), else None."""
    parts = data.split(SOURCE_LIST_SEPARATOR)
    folder = Path(data)
    if folder.is_dir():
        shards = sorted(str(path) for path in folder.glob("*.tar"))
    elif all(part.endswith(".tar") for part in parts):
        shards = expand_shards(data)
    else:
        return None
    if not shards or not Path(shards[0]).is_file() or read_record(shard_index(Path(shards[0]))) is None:
        return None
    return ReinforcedData(shards)
