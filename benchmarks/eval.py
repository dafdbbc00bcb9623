"""Zero-shot evaluation speed: ``clipforge eval`` vs CLIP_benchmark's open_clip loop, same ViT-B-32 weights.

5,000 synthetic images of the shape task (``--quick``: 500) are written as PNG files in class folders,
then classified zero-shot (8 classes x 8 prompts) in one process by:

- open_clip as CLIP_benchmark runs it on a CPU: fp32 weights, a ``DataLoader`` over the files with
  open_clip's preprocessing, CLIP_benchmark's own ``zero_shot_classifier`` and ``run_classification``
  with ``amp=False`` (its ``--no_amp``; with AMP on, CLIP_benchmark autocasts to bf16 on CPUs too, so
  that variant is timed as well), prompts padded to 77 tokens;
- clipforge's runner (``Evaluator.zeroshot`` on a folder dataset, what ``clipforge eval zeroshot
  --precision bf16`` runs): bf16 weights, decoding in worker processes, prompts encoded up to their
  longest token.

Both use the same number of decoding workers and batch size. Also reports both accuracies and how
often the predictions agree (bf16 against fp32).

    python benchmarks/eval.py [--quick]
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from _common import parser, report
from torch.utils.data import DataLoader, Dataset

import clipforge
from clipforge._util.imageio import open_image
from clipforge.encode import default_workers
from clipforge.eval.datasets import folder_dataset, synthetic_task
from clipforge.eval.runner import Evaluator


class ImageFiles(Dataset):
    """(pixels, label) from image files, as CLIP_benchmark's torchvision folder datasets give them."""

    def __init__(self, paths: list[Path], labels: list[int], transform) -> None:
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(open_image(self.paths[index]).convert("RGB")), self.labels[index]


def write_images(root: Path, count: int) -> None:
    task = synthetic_task("shape")
    dataset = task.dataset("test", count)
    for index, (image, label) in enumerate(zip(dataset.images, dataset.labels, strict=True)):
        folder = root / f"{label}_{dataset.classnames[label]}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{index:05d}.png")


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    import open_clip
    from clip_benchmark.metrics.zeroshot_classification import (
        run_classification,
        zero_shot_classifier,
    )

    count = 500 if args.quick else 5000
    batch_size, workers = 64, default_workers()
    torch.manual_seed(0)
    reference = open_clip.create_model("ViT-B-32").eval()
    _, _, reference_preprocess = open_clip.create_model_and_transforms("ViT-B-32")
    reference_tokenizer = open_clip.get_tokenizer("ViT-B-32")
    ours = clipforge.load("ViT-B-32", precision="bf16")
    ours.load_state_dict(reference.state_dict())

    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        write_images(root, count)
        task = synthetic_task("shape").task
        dataset = replace(folder_dataset(root, classnames=task.classnames), templates=task.templates)
        classnames, templates = dataset.classnames, dataset.templates

        def open_clip_run(amp: bool) -> tuple[float, torch.Tensor]:
            loader = DataLoader(ImageFiles(list(dataset.images), dataset.labels, reference_preprocess),
                                batch_size=batch_size, num_workers=workers)
            start = time.perf_counter()
            with contextlib.redirect_stderr(io.StringIO()):  # CLIP_benchmark's progress bars
                classifier = zero_shot_classifier(reference, reference_tokenizer, classnames, templates, "cpu", amp=amp)
                logits, _ = run_classification(reference, classifier, loader, "cpu", amp=amp)
            return time.perf_counter() - start, logits.argmax(dim=1)

        def clipforge_run() -> tuple[float, torch.Tensor]:
            evaluator = Evaluator(ours, batch_size=batch_size, workers=workers)
            start = time.perf_counter()
            evaluator.zeroshot(dataset)
            seconds = time.perf_counter() - start
            return seconds, evaluator.logits(dataset).argmax(dim=1)

        warm = torch.zeros(batch_size, 3, 224, 224)
        with torch.inference_mode():
            reference.encode_image(warm), ours.encode_image(warm)
        fp32_s, fp32_pred = open_clip_run(amp=False)
        ours_s, ours_pred = clipforge_run()
        amp_s, _ = open_clip_run(amp=True)

    labels = torch.tensor(dataset.labels)
    accuracy = {name: (pred == labels).float().mean().item() for name, pred in (("open_clip", fp32_pred), ("clipforge", ours_pred))}
    rows = [
        ["open_clip fp32 (CLIP_benchmark --no_amp)", count / fp32_s, 1.0, accuracy["open_clip"]],
        ["open_clip autocast bf16 (CLIP_benchmark amp)", count / amp_s, fp32_s / amp_s, float("nan")],
        ["clipforge bf16 (clipforge eval)", count / ours_s, fp32_s / ours_s, accuracy["clipforge"]],
    ]
    figures = {
        "benchmark": "eval",
        "model": "ViT-B-32",
        "images": count,
        "workers": workers,
        "threads": torch.get_num_threads(),
        "images_per_s_openclip": round(count / fp32_s, 2),
        "images_per_s_openclip_amp": round(count / amp_s, 2),
        "images_per_s_clipforge": round(count / ours_s, 2),
        "zeroshot_eval_vs_openclip": round(fp32_s / ours_s, 3),
        "zeroshot_eval_vs_openclip_amp": round(amp_s / ours_s, 3),
        "acc1_openclip": round(accuracy["open_clip"], 4),
        "acc1_clipforge": round(accuracy["clipforge"], 4),
        "prediction_agreement": round((fp32_pred == ours_pred).float().mean().item(), 4),
    }
    report(
        f"Zero-shot evaluation of {count} synthetic images, ViT-B-32 random weights ({workers} decoding workers)",
        ["variant", "images/s", "vs open_clip fp32", "acc1"],
        rows,
        figures,
    )


if __name__ == "__main__":
    main()
