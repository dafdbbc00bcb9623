"""Task recipes on the demo model: CLIPN against MCM, CLIP-ReIdent against the frozen model, altered-image detectors.

The base model is the demo's (``clipforge demo``, trained once into ``--demo-model``'s folder). Every recipe runs
at its defaults (``clipforge.adapt.clipn.ClipnSettings``, ``reid.ReidSettings``, ``detector.DetectorSettings``:
the papers' rates) with the step and sample counts below, for seeds 1 and 2; figures are means (± std over
the seeds in the table). Settings were fixed before the first run of this script:

- CLIPN: the no-encoder trained on the first 3,000 (quick: 1,500) train-split pairs for 300 (150) steps; OOD
  detection with the shape task's zero-shot head (its own 8 color templates), ID = the first 400 (200) test
  images, OOD = as many single-object images of the held-out shapes; ``auroc_clipn`` is ATD's AUROC (the paper's
  headline rule), CTW's beside it; ``auroc_mcm`` is MCM on the same model.
- ReID: 200 (100) steps on the 600 training identities (4 views each); mAP and rank-1 on the first 200 (100) of
  the 360 unseen test identities, one query and three gallery renders each.
- Detector: trained on 1,200 (600) train-split images, half altered by checkerboard, seam and channel_shift, for
  300 (100) steps with LayerNorm-only tuning and with full fine-tuning (and LoRA in the full run); AUROC on 400
  (200) val images of the seen families and of the unseen double_jpeg family.
- Adversarial: FGSM and PGD (10 steps) at ε = 1, 2, 4 /255 and the single-patch attacks
  (``clipforge.eval.adversarial``) against the shape task's zero-shot head, on 200 (100) test images; no
  training, so one run (PGD's random start and the patch cells from seed 0).

    python benchmarks/recipes.py [--quick] [--demo-model runs/demo/model.safetensors]
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _common import parser, report

import clipforge
from clipforge.adapt.clipn import fit_clipn
from clipforge.adapt.recipe_data import detector_images
from clipforge.adapt.recipes import fit_recipe
from clipforge.eval.adversarial import EPSILONS
from clipforge.eval.datasets import load_dataset, synthetic_task
from clipforge.eval.detection import detection_metrics
from clipforge.eval.runner import Evaluator

SEEDS = (1, 2)
SEEN, UNSEEN = "checkerboard,seam,channel_shift", "double_jpeg"


def demo_model(path: Path) -> clipforge.CLIP:
    if not path.is_file():
        from clipforge.demo import run_demo

        print(f"{path} is missing: training the demo model (clipforge demo) into {path.parent}", flush=True)
        run_demo(path.parent)
    return clipforge.load(path)


def over_seeds(run: Callable[[int], dict[str, float]]) -> dict[str, list[float]]:
    found: dict[str, list[float]] = {}
    for seed in SEEDS:
        for key, value in run(seed).items():
            found.setdefault(key, []).append(value)
    return found


def clipn_figures(model: clipforge.CLIP, quick: bool) -> dict[str, list[float]]:
    task = synthetic_task("shape")
    samples = 200 if quick else 400
    dataset = task.dataset("test", samples)
    ood = task.single_object_images("test_ood", samples)
    plain = Evaluator(model, workers=0).ood(dataset, ood, "held-out shapes").metrics

    def run(seed: int) -> dict[str, float]:
        settings = {"steps": 150 if quick else 300, "samples": 1500 if quick else 3000}
        encoder = fit_clipn(model, "synthetic", settings, seed=seed).encoder
        metrics = Evaluator(model, workers=0, no_encoder=encoder).ood(dataset, ood, "held-out shapes").metrics
        return {"auroc_clipn": metrics["auroc_atd"], "auroc_ctw": metrics["auroc_ctw"], "fpr95_clipn": metrics["fpr95_atd"]}

    return {**over_seeds(run), "auroc_mcm": [plain["auroc_mcm"]], "fpr95_mcm": [plain["fpr95_mcm"]],
            "auroc_msp": [plain["auroc_msp"]], "auroc_energy": [plain["auroc_energy"]]}


def reid_figures(model: clipforge.CLIP, quick: bool) -> dict[str, list[float]]:
    test = load_dataset("synthetic:identities@test", samples=400 if quick else 800)
    frozen = Evaluator(model, workers=0).reid(test).metrics

    def run(seed: int) -> dict[str, float]:
        tuned = fit_recipe("reid", model, "synthetic:identities", {"steps": 100 if quick else 200}, seed).model
        metrics = Evaluator(tuned, workers=0).reid(test).metrics
        return {"map_reid": metrics["map"], "rank1_reid": metrics["rank1"]}

    return {**over_seeds(run), "map_frozen": [frozen["map"]], "rank1_frozen": [frozen["rank1"]]}


def detector_figures(model: clipforge.CLIP, quick: bool) -> dict[str, list[float]]:
    samples = 200 if quick else 400
    tests = {name: detector_images("synthetic:altered@val", samples, families) for name, families in
             (("seen", SEEN), ("unseen", UNSEEN))}
    tunings = ("ln", "full") if quick else ("ln", "full", "lora")

    def run(seed: int) -> dict[str, float]:
        found = {}
        for tuning in tunings:
            settings = {"tuning": tuning, "steps": 100 if quick else 300, "samples": 600 if quick else 1200, "families": SEEN}
            classifier = fit_recipe("detector", model, "synthetic:altered", settings, seed)(model)
            for name, (images, labels, _) in tests.items():
                logits = classifier.classify(images, workers=0).logits
                found[f"auroc_{name}_{tuning}"] = detection_metrics(logits[:, 1] - logits[:, 0], labels)["auroc"]
        return found

    return over_seeds(run)


def adversarial_figures(model: clipforge.CLIP, quick: bool) -> dict[str, list[float]]:
    dataset = load_dataset("synthetic:shape", samples=400)
    metrics = Evaluator(model, workers=0).adversarial(dataset, samples=100 if quick else 200, epsilons=EPSILONS).metrics
    return {name: [value] for name, value in metrics.items()}


def main() -> None:
    arguments = parser(__doc__.splitlines()[0])
    arguments.add_argument("--demo-model", type=Path, default=Path("runs/demo/model.safetensors"))
    arguments.add_argument("--threads", type=int, default=1, help="torch threads (one is fastest on a shared machine)")
    args = arguments.parse_args()
    torch.set_num_threads(args.threads)
    model = demo_model(args.demo_model)
    start = time.perf_counter()
    figures: dict[str, list[float]] = {}
    for part in (clipn_figures, reid_figures, detector_figures, adversarial_figures):
        figures.update(part(model, args.quick))
        print(f"{part.__name__}: done at {time.perf_counter() - start:.0f} s", flush=True)
    rows = [[name, statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)]
            for name, values in figures.items()]
    summary = {name: round(statistics.mean(values), 4) for name, values in figures.items()}
    summary["auroc_seen"] = summary["auroc_seen_ln"]
    for attack in ("fgsm", "pgd"):
        summary[f"acc_{attack}"] = {f"{e}/255": summary[f"acc_{attack}@{e}"] for e in EPSILONS}
    summary.update({"seeds": list(SEEDS), "quick": args.quick, "wall_s": round(time.perf_counter() - start, 1)})
    report("task recipes on the demo model (mean ± std over seeds; frozen baselines: one run)",
           ["figure", "mean", "std", "runs"], rows, summary)


if __name__ == "__main__":
    main()
