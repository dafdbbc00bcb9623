"""The benchmark mode of ``clipforge eval``: every task on every dataset spec, with an ``Evaluator``.

``run_tasks`` checks the whole request (task names, adapters, the extra data some tasks need) before any image
is encoded, loads each dataset once and runs its tasks in order; ``DataOptions`` carries the command's options.
Every dataset gets a name of its own within the run (``DatasetNames``), so no result file or plot replaces another.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from clipforge.errors import InputError
from clipforge.eval.adversarial import EPSILONS
from clipforge.eval.datasets import (
    ClassificationDataset,
    load_dataset,
    load_retrieval_dataset,
)
from clipforge.eval.perception import read_context_factors
from clipforge.eval.results import TASKS, TaskResult, slug
from clipforge.eval.runner import Evaluator

ADAPTER_TASKS = ("zeroshot", "calibration", "detection")
"""Tasks that classify with an adapter's head when the ``Evaluator`` has one (``clipforge eval --adapter``)."""
RECIPE_TASKS = ("detection", "reid", "adversarial")
"""Tasks of the task recipes (docs/recipes.md): ``detection`` needs a detector adapter, ``reid`` identity data,
``adversarial`` runs attacks (minutes); ``clipforge eval all`` leaves them out."""


def split_in_two(dataset: ClassificationDataset, seed: int = 0) -> tuple[ClassificationDataset, ClassificationDataset]:
    """A seeded random half/half split (fit, test) for tasks that need held-out data a dataset lacks."""
    if len(dataset) < 4:
        raise InputError(f"{dataset.name}: {len(dataset)} images are too few to split into fitting and test halves")
    order = np.random.default_rng(seed).permutation(len(dataset))
    half = len(dataset) // 2
    return dataset.subset(order[:half].tolist(), f"{dataset.name}@fit"), dataset.subset(order[half:].tolist())


@dataclass(frozen=True)
class DataOptions:
    """How ``run_tasks`` reads datasets (the ``clipforge eval`` options)."""

    classnames_file: str | None = None
    templates_file: str | None = None
    samples: int = 1000
    robustness_samples: int = 500
    image_column: str = "image"
    label_column: str = "label"
    caption_column: str = "caption"
    class_field: str = "cls"
    train_data: str | None = None
    ood_data: str | None = None
    method: str = "ensemble"
    context_file: str | None = None
    epsilons: tuple[float, ...] = EPSILONS


class DatasetNames:
    """Names of the datasets of one run, unique as result file names: a dataset named like one of another ``--data``
    (``table.csv`` and ``table.parquet``, two shards of one folder) is named by its file name instead, with the
    extension (``table.parquet``, ``00001.tar``), or by the spec as given, then numbered, if that is taken too."""

    def __init__(self) -> None:
        self._specs: dict[str, str] = {}  # slug of a name → the spec that holds it

    def __call__(self, name: str, spec: str) -> str:
        """The name for a dataset of ``spec`` that its loader named ``name``."""
        numbered = (f"{spec}-{number}" for number in itertools.count(2))
        candidates = itertools.chain((name, Path(spec).name, spec), numbered)
        return next(candidate for candidate in candidates if self._specs.setdefault(slug(candidate), spec) == spec)


def _load(spec: str, options: DataOptions) -> ClassificationDataset:
    return load_dataset(
        spec,
        classnames_file=options.classnames_file,
        templates_file=options.templates_file,
        samples=options.samples,
        image_column=options.image_column,
        label_column=options.label_column,
        class_field=options.class_field,
    )


def _run_task(
    evaluator: Evaluator, task: str, spec: str, dataset: ClassificationDataset | None, options: DataOptions,
    names: DatasetNames,
) -> TaskResult:
    if task == "retrieval":
        retrieval_set = load_retrieval_dataset(
            spec, samples=options.samples, image_column=options.image_column, caption_column=options.caption_column
        )
        return evaluator.retrieval(replace(retrieval_set, name=names(retrieval_set.name, spec)))
    assert dataset is not None
    synthetic = dataset.synthetic
    if task == "zeroshot":
        factors = read_context_factors(options.context_file) if options.context_file else None
        return evaluator.zeroshot(dataset, method=options.method, context_factors=factors)
    if task == "robustness":
        return evaluator.robustness(dataset, options.robustness_samples)
    if task == "detection":
        return evaluator.detection(dataset)
    if task == "reid":
        return evaluator.reid(dataset)
    if task == "adversarial":
        return evaluator.adversarial(dataset, options.robustness_samples, options.epsilons)
    if task == "calibration":
        fit, test = (synthetic.dataset("val", options.samples), dataset) if synthetic else split_in_two(dataset, evaluator.seed)
        return evaluator.calibration(fit, test)
    if task == "linear-probe":
        if synthetic is not None and options.train_data is None:
            return evaluator.linear_probe(synthetic.dataset("train", options.samples), dataset)
        return evaluator.linear_probe(_load(options.train_data, options), dataset)
    if task == "ood":
        if options.ood_data is not None:
            return evaluator.ood(dataset, _load(options.ood_data, options).images, options.ood_data)
        if synthetic is None:  # synthetic:altered and synthetic:identities have no out-of-distribution split
            raise _no_ood_data(spec)
        return evaluator.ood(dataset, synthetic.single_object_images("test_ood", options.samples), "synthetic/test_ood")
    raise InputError(f"task: {task!r} is not one of {', '.join(TASKS)}")


def _no_ood_data(spec: str) -> InputError:
    return InputError(f"ood on {spec}: give the out-of-distribution images with --ood-data")


def run_tasks(
    evaluator: Evaluator, tasks: Sequence[str], data: Sequence[str], options: DataOptions | None = None
) -> list[TaskResult]:
    """Every task on every dataset spec, in order (the benchmark mode of ``clipforge eval``); a task or spec given
    twice runs once."""
    options = options or DataOptions()
    tasks, data = list(dict.fromkeys(tasks)), list(dict.fromkeys(data))
    unknown = [task for task in tasks if task not in TASKS]
    if unknown:
        raise InputError(f"task: {unknown[0]!r} is not one of {', '.join(TASKS)}")
    unadapted = [task for task in tasks if task not in ADAPTER_TASKS]
    if evaluator.adapter is not None and unadapted:
        raise InputError(f"--adapter: {unadapted[0]} does not classify with it (only {', '.join(ADAPTER_TASKS)} do)")
    if evaluator.no_encoder is not None and any(task != "ood" for task in tasks):
        raise InputError(f"--adapter: a CLIPN adapter scores OOD detection only; run ood alone, not {', '.join(tasks)}")
    if not tasks or not data:
        raise InputError("eval: give at least one task and one dataset (--data)")
    for spec in data:  # checked before any image is encoded
        if "linear-probe" in tasks and options.train_data is None and not spec.startswith("synthetic"):
            raise InputError(f"linear-probe on {spec}: give the training images with --train-data")
        if "ood" in tasks and options.ood_data is None and not spec.startswith("synthetic"):
            raise _no_ood_data(spec)
    results, names = [], DatasetNames()
    for spec in data:
        dataset = _load(spec, options) if any(task != "retrieval" for task in tasks) else None
        if dataset is not None:
            dataset = replace(dataset, name=names(dataset.name, spec))
        results.extend(_run_task(evaluator, task, spec, dataset, options, names) for task in tasks)
    return results
