"""What compression costs: speed and zero-shot accuracy of compressed variants of one model, side by side.

    from clipforge.compress.study import compare_variants, default_variants, write_report
    rows = compare_variants(model, dataset, default_variants(model))   # dataset: clipforge.eval.datasets
    write_report(rows, "compress_report", title="ViT-B-32")             # report.json and speed_accuracy.png

Per variant: images/s of ``encode_image`` on one batch (variants timed in turn, A B C A B C …, so they share
the machine's noise; medians), image-block FLOPs relative to the base model (``estimate_flops``), zero-shot
accuracy on the dataset (``clipforge.eval.runner.Evaluator``: template-ensemble heads, logits ``100·cos``), the
share of images whose prediction equals the base model's, and the mean cosine between the variant's and the
base model's image embeddings. A variant is a list of compression steps (``clipforge.compress.records``):
at most one number format (bf16, int8-dynamic) and one token reduction (ToMe, PiToMe, EViT). Variants of one
number format share one copy of the model; token reductions are switched on and off on that copy.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from clipforge._util.fileio import atomic_path
from clipforge._util.progress import progress_bar
from clipforge.compress.records import (
    NUMBER_FORMATS,
    Step,
    apply_compression,
    check_stack,
    compression_steps,
    describe_steps,
    number_format,
    parse_steps,
)
from clipforge.compress.reduction.registry import build_token_reduction, estimate_flops
from clipforge.data.formats.images import read_rgb_image
from clipforge.encode import model_device
from clipforge.errors import ConfigError
from clipforge.eval.datasets import ClassificationDataset
from clipforge.eval.runner import Evaluator
from clipforge.models.clip import CLIP
from clipforge.models.vit import image_tower

BASE = "base"


@dataclass(frozen=True)
class Variant:
    """A named list of compression steps; ``name`` defaults to the steps' spec (``"bf16+tome:r=8"``)."""

    name: str
    steps: tuple[Step, ...] = ()

    @classmethod
    def parse(cls, spec: str) -> Variant:
        """``"base"`` or steps joined by ``+`` (``clipforge.compress.records.parse_steps``)."""
        if spec.strip() == BASE:
            return cls(BASE)
        steps = tuple(parse_steps(spec))
        check_stack(steps)
        return cls(describe_steps(steps), steps)

    @property
    def number_format(self) -> str | None:
        return number_format(self.steps)

    @property
    def reduction(self) -> Step | None:
        return next((step for step in self.steps if step["method"] not in NUMBER_FORMATS), None)


@dataclass
class VariantResult:
    name: str
    images_per_s: float
    speedup: float  # images/s over the base model's
    relative_flops: float  # image-block FLOPs over the base model's
    accuracy: float  # zero-shot top-1
    agreement: float  # share of images predicted as the base model predicts them
    cosine: float  # mean cosine of the image embeddings to the base model's


def tome_rates(model: CLIP, count: int = 3) -> list[int]:
    """``count`` constant ToMe rates r evenly spaced up to patches / blocks, the rate that merges nearly every patch.

    ViT-B/16 at 224 px: 5, 11, 16 (ToMe's r=16 is about 2x; Bolya et al., ICLR 2023); ViT-B/32: 1, 3, 4.
    """
    tower = image_tower(model)
    most = tower.grid_size**2 / tower.cfg.layers
    return sorted({max(1, round(most * index / count)) for index in range(1, count + 1)})


def keep_ratio_for_flops(model: CLIP, flops: float, method: str = "pitome", setting: str = "keep_ratio") -> float:
    """The ``setting`` (a keep ratio, on a 0.005 grid from 0.5 to 1) whose ``estimate_flops`` is closest to ``flops``."""
    candidates = [round(0.5 + 0.005 * step, 3) for step in range(101)]
    return min(candidates, key=lambda ratio: abs(estimate_flops(model, method, **{setting: ratio}) - flops))


def default_variants(model: CLIP) -> list[Variant]:
    """Base, bf16, ToMe at three rates, PiToMe at the middle rate's FLOPs, EViT, int8-dynamic, bf16 + middle ToMe."""
    rates = tome_rates(model)
    middle = rates[len(rates) // 2]
    ratio = keep_ratio_for_flops(model, estimate_flops(model, "tome", r=middle))
    specs = ["base", "bf16", *(f"tome:r={r}" for r in rates), f"pitome:keep_ratio={ratio}", "evit", "int8", f"bf16+tome:r={middle}"]
    return [Variant.parse(spec) for spec in specs]


@contextmanager
def token_reduction(model: CLIP, step: Step | None) -> Iterator[CLIP]:
    """``model`` with the token reduction ``step`` installed on its image tower for the ``with`` block."""
    tower = image_tower(model)
    if step is not None:
        tower.token_reduction = build_token_reduction(step["method"], tower.cfg.layers, **step["settings"])
    try:
        yield model
    finally:
        tower.token_reduction = None


def _images_per_second(
    models: dict[str | None, CLIP], variants: Sequence[Variant], pixels: torch.Tensor, repeats: int, progress: bool
) -> dict[str, float]:
    """Median images/s of ``encode_image(pixels)`` per variant (``models`` by number format), timed in turn after one untimed round."""
    seconds: dict[str, list[float]] = {variant.name: [] for variant in variants}
    with progress_bar(disable=not progress, transient=True) as bar:
        task = bar.add_task("timing variants", total=(repeats + 1) * len(variants), unit="run")
        for round_index in range(repeats + 1):
            for variant in variants:
                with token_reduction(models[variant.number_format], variant.reduction) as run, torch.inference_mode():
                    start = time.perf_counter()
                    run.encode_image(pixels)
                    elapsed = time.perf_counter() - start
                if round_index:
                    seconds[variant.name].append(elapsed)
                bar.advance(task)
    return {name: len(pixels) / statistics.median(times) for name, times in seconds.items()}


def _number_format_models(model: CLIP, variants: Sequence[Variant]) -> dict[str | None, CLIP]:
    """The base model (key None) and one compressed copy per number format the variants use."""
    if compression_steps(model):
        raise ConfigError("the model is already compressed; compare variants of the uncompressed model")
    models: dict[str | None, CLIP] = {None: model}
    for variant in variants:
        if variant.number_format not in models:
            models[variant.number_format] = apply_compression(copy.deepcopy(model), variant.number_format)
    return models


def compare_variants(
    model: CLIP,
    dataset: ClassificationDataset,
    variants: Sequence[Variant],
    *,
    batch_size: int = 64,
    repeats: int = 5,
    progress: bool = True,
) -> list[VariantResult]:
    """One ``VariantResult`` per variant (the base model first, added if missing); see the module docstring."""
    names = [variant.name for variant in variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"variants: {names} repeats a name")
    variants = [Variant(BASE), *(v for v in variants if v.steps)]
    models = _number_format_models(model, variants)
    labels = torch.as_tensor(dataset.labels)
    base_flops = estimate_flops(model)
    measured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with progress_bar(disable=not progress, transient=True) as bar:
        task = bar.add_task("evaluating variants", total=len(variants), unit="variant")
        for variant in variants:
            with token_reduction(models[variant.number_format], variant.reduction) as run:
                evaluator = Evaluator(run, batch_size=batch_size, workers=0)
                measured[variant.name] = (evaluator.image_features(dataset), evaluator.logits(dataset).argmax(dim=1))
            bar.advance(task)
    pixels = torch.stack([model.preprocess(read_rgb_image(image)) for image in dataset.images[:batch_size]])
    pixels = pixels.to(model_device(model))
    speed = _images_per_second(models, variants, pixels, repeats, progress)
    base_features, base_predictions = measured[BASE]
    results = []
    for variant in variants:
        features, predictions = measured[variant.name]
        reduction = variant.reduction
        flops = estimate_flops(model, reduction["method"], **reduction["settings"]) if reduction else base_flops
        results.append(
            VariantResult(
                name=variant.name,
                images_per_s=speed[variant.name],
                speedup=speed[variant.name] / speed[BASE],
                relative_flops=flops / base_flops,
                accuracy=(predictions == labels).float().mean().item(),
                agreement=(predictions == base_predictions).float().mean().item(),
                cosine=F.cosine_similarity(features, base_features, dim=-1).mean().item(),
            )
        )
    return results


def write_report(
    results: Sequence[VariantResult], out_dir: str | Path, *, title: str, details: dict[str, Any] | None = None
) -> tuple[Path, Path]:
    """``report.json`` (``details`` plus one row per variant) and ``speed_accuracy.png`` in ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, plot_path = out / "report.json", out / "speed_accuracy.png"
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps({"title": title, **(details or {}), "variants": [asdict(r) for r in results]}, indent=1) + "\n")
    figure, axes = plt.subplots(figsize=(9, 4.5), layout="constrained")
    for number, result in enumerate(results, start=1):  # points carry a number, the legend the name: labels never overlap
        marker = "*" if result.name == BASE else "o"
        axes.scatter(result.images_per_s, 100 * result.accuracy, marker=marker, s=120 if marker == "*" else 40, label=f"{number}  {result.name}")
        axes.annotate(str(number), (result.images_per_s, 100 * result.accuracy), fontsize=7, xytext=(3, 3), textcoords="offset points")
    figure.legend(loc="outside right upper", fontsize=7, frameon=False, handletextpad=0.3)
    base = next(r for r in results if r.name == BASE)
    axes.axhline(100 * base.accuracy, color="grey", linestyle="--", linewidth=0.8)
    axes.set_xlabel("images / s (encode_image)")
    axes.set_ylabel("zero-shot top-1 accuracy (%)")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    with atomic_path(plot_path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)
    return json_path, plot_path
