"""Evaluation results: one ``TaskResult`` per (dataset, task), in LAION-AI/CLIP_benchmark's result schema.

``record`` gives CLIP_benchmark's JSON (``dataset, model, pretrained, task, metrics, language``);
``write_results`` writes one file per result under CLIP_benchmark's name
``{dataset}_{pretrained}_{model}_{language}_{task}.json``. ``Table`` holds the extra tables of a report.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipforge._util.fileio import atomic_path

TASKS: dict[str, str] = {
    "zeroshot": "zeroshot_classification",
    "retrieval": "zeroshot_retrieval",
    "linear-probe": "linear_probe",
    "robustness": "robustness",
    "ood": "ood_detection",
    "calibration": "calibration",
    "detection": "altered_image_detection",
    "reid": "reidentification",
    "adversarial": "adversarial_robustness",
}
"""Command-line task names → the task name in the result JSON (CLIP_benchmark's where it has one)."""


@dataclass(frozen=True)
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]]


@dataclass
class TaskResult:
    """One (dataset, task) evaluation: CLIP_benchmark metrics plus tables and plots for the report."""

    dataset: str
    task: str
    metrics: dict[str, float]
    tables: list[Table] = field(default_factory=list)
    plots: dict[str, Path] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def record(self, model: str, pretrained: str, language: str = "en") -> dict[str, Any]:
        """CLIP_benchmark's result JSON; ``extra`` (e.g. the OOD dataset) adds keys after the standard ones."""
        return {"dataset": self.dataset, "model": model, "pretrained": pretrained, "task": self.task,
                "metrics": self.metrics, "language": language, **self.extra}


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+@-]+", "_", text).strip("_")


def write_results(
    results: Sequence[TaskResult], out_dir: str | Path, model: str, pretrained: str, language: str = "en"
) -> list[Path]:
    """One CLIP_benchmark JSON per result, named ``{dataset}_{pretrained}_{model}_{language}_{task}.json``."""
    paths = []
    for result in results:
        name = "_".join(slug(part) for part in (result.dataset, Path(pretrained).name, model, language, result.task))
        path = Path(out_dir) / f"{name}.json"
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(result.record(model, pretrained, language), indent=1) + "\n")
        paths.append(path)
    return paths
