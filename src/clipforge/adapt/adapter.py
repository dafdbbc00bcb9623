"""``fit`` a method on few shots, ``Adapter`` (save, load, apply to a model) and ``AdaptedClassifier``.

    adapter = clipforge.adapt.fit("tip-adapter", model, "synthetic:shape_all", shots=16, seed=1)
    adapter.save("shapes.safetensors")
    classifier = clipforge.adapt.load_adapter("shapes.safetensors")(model)   # refused by any other model
    classifier.classify(images).names

Head methods write an adapter file (``clipforge.adapt.adapter_file``); weight methods (CLIP-LoRA, CLIP-SVD,
WiSE-FT) write a clipforge checkpoint whose provenance holds the same record under ``adaptation``: it loads as
a model (``clipforge.load``) and as an adapter of its base model (``load_adapter``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clipforge.adapt.adapter_file import (
    FORMAT,
    AdapterRecord,
    check_fingerprint,
    model_fingerprint,
    read_adapter,
    write_adapter,
)
from clipforge.adapt.features import FeatureCache
from clipforge.adapt.fewshot import FewShotSet, sample_few_shot
from clipforge.adapt.method import FitInputs, Head, Saved, settings_dict, settings_from
from clipforge.adapt.registry import RECIPE_FILES, get_method
from clipforge.adapt.selection import ZeroShotHead
from clipforge.api import load, save
from clipforge.encode import EmbeddingResult, embed_images
from clipforge.errors import CheckpointError, InputError
from clipforge.eval.datasets import ClassificationDataset
from clipforge.eval.zeroshot import zero_shot_head
from clipforge.io.state_dict import read_tensors

CHECKPOINT_KEY = "adaptation"
DEFAULT_VAL_SHOTS = 4  # CoOp's few-shot validation: min(K, 4) images per class


def class_embeddings(model: Any, classnames: Sequence[str], templates: Any) -> torch.Tensor:
    """The zero-shot head of ``model`` as normalised rows [C, D]."""
    return zero_shot_head(model, classnames, templates).T.contiguous()


@dataclass(frozen=True)
class Classification:
    """Predicted class ids and names and the logits [N, C] of the images that were read; ``skipped`` lists the
    unreadable ones by position, with a one-line reason."""

    labels: list[int]
    names: list[str]
    logits: torch.Tensor
    kept: list[int]
    skipped: list[tuple[int, str]]


class AdaptedClassifier:
    """A model with a fitted head: ``image_model`` encodes the images, ``head`` scores them."""

    def __init__(self, image_model: Any, head: Head, classnames: Sequence[str], method: str) -> None:
        self.image_model = image_model
        self.head = head.eval()
        self.classnames = list(classnames)
        self.method = method

    def features(self, images: Sequence[Any], *, batch_size: int = 64, workers: int | None = None,
                 progress: bool = False) -> EmbeddingResult:
        return embed_images(self.image_model, images, batch_size=batch_size, workers=workers, progress=progress)

    @torch.no_grad()
    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits [N, C] of normalised features read with ``image_model`` [N, D]."""
        return self.head.logits(features.float())

    def classify(self, images: Sequence[Any], **options: Any) -> Classification:
        found = self.features(images, **options)
        logits = self.logits(torch.from_numpy(found.embeddings))
        labels = logits.argmax(dim=1).tolist()
        return Classification(labels, [self.classnames[i] for i in labels], logits, found.kept, found.skipped)


class Adapter:
    """A fitted method: its record, and for weight methods the tuned model."""

    def __init__(self, record: AdapterRecord, model: Any = None, source: str = "adapter") -> None:
        self.record = record
        self.model = model
        self.source = source

    @property
    def method(self) -> str:
        return self.record.method

    @property
    def classnames(self) -> list[str]:
        return self.record.classnames

    def __call__(self, model: Any) -> AdaptedClassifier:
        """The classifier of this adapter on ``model``, which must be the model it was fitted on."""
        if self.record.method in RECIPE_FILES:
            what, where = RECIPE_FILES[self.record.method]
            raise CheckpointError(f"{self.source}: {what}, not a few-shot adapter: {where}")
        check_fingerprint(self.record.base_model, model, self.source)
        method = get_method(self.record.method)
        if self.model is not None:
            text = class_embeddings(self.model, self.classnames, self.record.templates)
            return AdaptedClassifier(self.model, ZeroShotHead(text), self.classnames, self.method)
        if method.rebuild is None:
            raise CheckpointError(f"{self.source}: method {method.name} writes checkpoints, but this file has no weights")
        settings = settings_from(method.settings, self.record.settings, method.name)
        text = class_embeddings(model, self.classnames, self.record.templates)
        try:
            head = method.rebuild(Saved(self.record.tensors, self.record.extra, settings, model, text, self.classnames))
        except (KeyError, RuntimeError, ValueError) as error:
            raise CheckpointError(f"{self.source}: the {method.name} tensors do not fit ({error})") from None
        return AdaptedClassifier(head.image_model(model), head, self.classnames, self.method)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """An adapter file, or for weight methods a checkpoint recording the adaptation in its provenance."""
        if self.model is None:
            return write_adapter(path, self.record)
        record = {key: value for key, value in dataclasses.asdict(self.record).items() if key != "tensors"}
        return save(self.model, path, provenance={CHECKPOINT_KEY: record})


def load_adapter(path: str | os.PathLike[str]) -> Adapter:
    """An adapter file, or a checkpoint written by a weight method (its base model is in the record)."""
    path = Path(path)
    _, metadata = read_tensors(path)
    if metadata.get("format") == FORMAT:
        return Adapter(read_adapter(path), source=str(path))
    model = load(path)
    record = model.provenance.get(CHECKPOINT_KEY)
    if not isinstance(record, dict):
        raise CheckpointError(f"{path}: neither an adapter file nor a checkpoint written by clipforge adapt")
    try:
        return Adapter(AdapterRecord(tensors={}, **record), model=model, source=str(path))
    except TypeError as error:
        raise CheckpointError(f"{path}: bad adaptation record in the provenance ({error})") from None


def fit(
    method: str,
    model: Any,
    train: str | ClassificationDataset | FewShotSet,
    shots: int | None = None,
    seed: int = 1,
    *,
    settings: Mapping[str, Any] | None = None,
    cache: FeatureCache | None = None,
    progress: bool = False,
    model_source: str | None = None,
    **data_options: Any,
) -> Adapter:
    """Fit ``method`` on ``shots`` images per class of ``train`` (a ``--train`` spec, a dataset, or shots already
    drawn), drawn with ``seed``. ``settings`` override the method's defaults (``val_shots`` too, for the methods
    that choose hyper-parameters on validation images: per class, min(K, 4) by default); ``cache`` shares image
    features between fits on the same model; ``model_source`` names the model in a tuned checkpoint's provenance
    (default: its config name). ``model`` is left unchanged."""
    spec = get_method(method)
    values = dict(settings or {})
    val_shots = values.pop("val_shots", None) if spec.uses_validation else None
    method_settings = settings_from(spec.settings, values, spec.name, also=("val_shots",) if spec.uses_validation else ())
    if isinstance(train, FewShotSet):
        drawn = train if shots is None else train.subset(shots, min(shots, DEFAULT_VAL_SHOTS) if spec.uses_validation else 0)
    else:
        if shots is None:
            raise InputError("fit: give the number of shots per class")
        if val_shots is None:
            val_shots = min(shots, DEFAULT_VAL_SHOTS) if spec.uses_validation else 0
        drawn = sample_few_shot(train, shots, seed, val_shots=val_shots, **data_options)
    if len(drawn.classnames) < 2:
        raise InputError(f"{drawn.source}: one class ({', '.join(drawn.classnames)}); few-shot adaptation needs at least 2")
    if cache is None or cache.model is not model:
        cache = FeatureCache(model)
    text = class_embeddings(model, drawn.classnames, drawn.templates)
    inputs = FitInputs(model, drawn, cache, text, progress, model_source or str(model.config.name))
    with torch.random.fork_rng(devices=[]):  # initialisations, dropout and shuffles follow the seed, not the caller's RNG
        torch.manual_seed(drawn.seed)
        fitted = spec.fit(inputs, method_settings)
    record = AdapterRecord(
        method=spec.name,
        tensors=fitted.tensors,
        settings=settings_dict(method_settings),
        classnames=drawn.classnames,
        templates=drawn.templates,
        base_model=model_fingerprint(model),
        extra=fitted.extra,
        provenance={"train": drawn.source, "shots": drawn.shots, "val_shots": drawn.val_shots, "seed": drawn.seed,
                    "skipped_images": len(drawn.skipped)},
    )
    return Adapter(record, model=fitted.model, source=f"{spec.name} adapter")
