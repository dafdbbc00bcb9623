"""The evaluation runner: zero-shot, retrieval, linear probe, robustness, OOD detection, calibration, and the task
recipes' detection, re-identification and adversarial attacks.

Each task returns a ``TaskResult`` (``clipforge.eval.results``: CLIP_benchmark's result JSON). Image features
and zero-shot heads are computed once per dataset and shared by the tasks that need them; images are
encoded by ``clipforge.encode`` (images decoded in worker processes; text encoded only up to the longest
prompt of each batch), in the model's precision.

Zero-shot heads follow CLIP_benchmark: templates give ``build_zero_shot_classifier``, per-class
descriptions (CuPL) their renormalised mean; logits are ``100 · cos``. ``method="perceptionclip"``
classifies with ``clipforge.eval.perception`` instead.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from clipforge.data.formats.images import read_rgb_image
from clipforge.encode import Encoder, embed_images, encode_texts, model_input_image
from clipforge.errors import InputError
from clipforge.eval.adversarial import EPSILONS, adversarial_metrics, model_pixels
from clipforge.eval.calibration import (
    expected_calibration_error,
    fit_temperature,
    reliability_diagram,
)
from clipforge.eval.datasets import ClassificationDataset, RetrievalDataset
from clipforge.eval.detection import detection_metrics
from clipforge.eval.linear_probe import linear_probe
from clipforge.eval.metrics import (
    classification_metrics,
    confusion_matrix,
    retrieval_recall_at_k,
    topk_accuracy,
)
from clipforge.eval.ood import aupr_in, auroc, fpr_at_tpr, mcm_score, roc_curve_plot
from clipforge.eval.ood_scores import (
    atd_score,
    ctw_score,
    energy_score,
    max_logit_score,
    msp_score,
)
from clipforge.eval.perception import (
    ContextFactors,
    build_perception_classifier,
    perception_clip,
)
from clipforge.eval.ranking import query_gallery_split, reid_metrics
from clipforge.eval.report import confusion_matrix_plot
from clipforge.eval.results import TASKS, Table, TaskResult, slug
from clipforge.eval.robustness import SHIFT_NAMES, corruption_accuracy, corruption_plot
from clipforge.eval.zeroshot import zero_shot_head, zero_shot_logits

MAX_CONFUSION_CLASSES = 100


class AdaptedHead(Protocol):
    """A fitted classification head (``clipforge.adapt.AdaptedClassifier``): class logits of image features."""

    classnames: list[str]
    method: str

    def logits(self, features: torch.Tensor) -> torch.Tensor: ...


class Evaluator:
    """Runs evaluation tasks with one model, caching image features and zero-shot heads per dataset."""

    def __init__(
        self,
        model: Encoder,
        *,
        batch_size: int = 64,
        workers: int | None = None,
        out_dir: str | Path | None = None,
        seed: int = 0,
        progress: bool = False,
        adapter: AdaptedHead | None = None,
        no_encoder: Encoder | None = None,
        no_encoder_name: str = "clipn",
    ) -> None:
        """``adapter``: classify with this head instead of the zero-shot one (``clipforge.eval.tasks.ADAPTER_TASKS``); ``model``
        must then be the model whose image features it reads. ``no_encoder``: CLIPN's no text encoder
        (``clipforge.adapt.clipn``), which adds its CTW and ATD scores to ``ood``."""
        self.model = model
        self.adapter = adapter
        self.no_encoder = no_encoder
        self.no_encoder_name = no_encoder_name
        self.batch_size = batch_size
        self.workers = workers
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.seed = seed
        self.progress = progress
        self._features: dict[int, tuple[Any, torch.Tensor]] = {}
        self._classifiers: dict[str, torch.Tensor] = {}

    # -- shared pieces --

    def embed(self, images: Sequence[Any], name: str = "") -> torch.Tensor:
        """Normalised float32 features (N, D) of images, decoded in worker processes; bad files are errors."""
        result = embed_images(
            self.model, images, batch_size=self.batch_size, workers=self.workers, strict=True, progress=self.progress,
            description=f"encoding {name}" if name else "encoding images",
        )
        return torch.from_numpy(result.embeddings)

    def image_features(self, dataset: ClassificationDataset) -> torch.Tensor:
        if id(dataset) not in self._features:
            self._features[id(dataset)] = (dataset, self.embed(dataset.images, dataset.name))
        return self._features[id(dataset)][1]

    def share_features(self, dataset: ClassificationDataset, features: torch.Tensor) -> None:
        """Use ``features`` (normalised, one row per image of ``dataset``, e.g. rows of a larger set already
        encoded) for ``dataset`` instead of encoding its images again."""
        if len(features) != len(dataset):
            raise InputError(f"{dataset.name}: {len(features)} feature rows for {len(dataset)} images")
        self._features[id(dataset)] = (dataset, features)

    def classifier(self, dataset: ClassificationDataset) -> torch.Tensor:
        """Zero-shot head [D, C]: template ensemble, or CuPL descriptions per class (computed once per prompt set)."""
        key = json.dumps([dataset.classnames, dataset.templates])
        if key not in self._classifiers:
            self._classifiers[key] = zero_shot_head(self.model, dataset.classnames, dataset.templates)
        return self._classifiers[key]

    def logits(self, dataset: ClassificationDataset) -> torch.Tensor:
        if self.adapter is not None:
            return self._adapted_logits(dataset)
        return zero_shot_logits(self.image_features(dataset), self.classifier(dataset))

    def _adapted_logits(self, dataset: ClassificationDataset) -> torch.Tensor:
        """The adapter's logits, columns in the dataset's class order (matched by class name)."""
        assert self.adapter is not None
        known = {name: i for i, name in enumerate(self.adapter.classnames)}
        missing = [name for name in dataset.classnames if name not in known]
        if missing or len(known) != len(dataset.classnames):
            example = f"e.g. {missing[0]!r} is not one of them" if missing else f"it has {len(dataset.classnames)}"
            raise InputError(f"{dataset.name}: the adapter was fitted on {len(known)} other classes ({example})")
        logits = self.adapter.logits(self.image_features(dataset))
        return logits[:, [known[name] for name in dataset.classnames]]

    def _plot_path(self, dataset: str, name: str) -> Path | None:
        return self.out_dir / f"{slug(dataset)}_{name}.png" if self.out_dir is not None else None

    # -- tasks --

    def zeroshot(
        self,
        dataset: ClassificationDataset,
        *,
        method: str = "ensemble",
        context_factors: ContextFactors | None = None,
        temperature: float = 1.0,
    ) -> TaskResult:
        """acc1, acc5, mean per-class recall (CLIP_benchmark), a confusion matrix plot; or PerceptionCLIP."""
        labels = torch.as_tensor(dataset.labels)
        if method == "ensemble":
            scores = self.logits(dataset)
        elif method == "perceptionclip":
            factors = context_factors or (dataset.synthetic.context_factors if dataset.synthetic else None)
            if not factors:
                raise InputError(f"{dataset.name}: PerceptionCLIP needs contextual factors (--context FILE)")
            head = build_perception_classifier(self.model, dataset.classnames, factors)
            scale = self.model.logit_scale.exp().item()
            probs = perception_clip(self.image_features(dataset), head, scale, temperature).class_probs
            scores = probs.clamp_min(1e-30).log()
        else:
            raise InputError(f"zero-shot method: {method!r} is not 'ensemble' or 'perceptionclip'")
        extra = {"method": method} if method != "ensemble" else {}
        if self.adapter is not None:
            if method != "ensemble":
                raise InputError(f"zero-shot method {method!r} does not use an adapter; run it without --adapter")
            extra = {"adapter": self.adapter.method}
        result = TaskResult(dataset.name, TASKS["zeroshot"], classification_metrics(scores, labels), extra=extra)
        path = self._plot_path(dataset.name, "confusion")
        if path is not None and len(dataset.classnames) <= MAX_CONFUSION_CLASSES:
            matrix = confusion_matrix(scores, labels).numpy()
            result.plots["confusion matrix"] = confusion_matrix_plot(matrix, dataset.classnames, path)
        return result

    def retrieval(self, dataset: RetrievalDataset, ks: Sequence[int] = (1, 5, 10)) -> TaskResult:
        """Image→text and text→image recall@k, a hit when any correct item is in the top k (CLIP_benchmark)."""
        captions = [text for texts in dataset.captions for text in texts]
        owner = [i for i, texts in enumerate(dataset.captions) for _ in texts]
        image_features = self.embed(dataset.images, dataset.name)
        text_features = encode_texts(self.model, captions, progress=self.progress, description=f"encoding {dataset.name} captions")
        return TaskResult(dataset.name, TASKS["retrieval"], retrieval_recall_at_k(image_features, text_features, owner, ks))

    def linear_probe(
        self, train: ClassificationDataset, test: ClassificationDataset, c_values: Sequence[float] | None = None
    ) -> TaskResult:
        """CLIP-protocol logistic regression on frozen features: C chosen on 20% of train (CLIP's search,
        or among ``c_values``), then refit on all of train."""
        if train.classnames != test.classnames:
            raise InputError(f"linear probe: {train.name} and {test.name} have different class lists")
        train_features, test_features = self.image_features(train).double(), self.image_features(test).double()
        probe = linear_probe(
            train_features, train.labels, None, None, test_features, test.labels, c_values=c_values, seed=self.seed
        )
        return TaskResult(test.name, TASKS["linear-probe"], probe.metrics(), extra={"train_dataset": train.name})

    def robustness(self, dataset: ClassificationDataset, samples: int = 500) -> TaskResult:
        """Corruptions × severities on up to ``samples`` images; shifted renderings for the synthetic world."""
        picked = np.unique(np.linspace(0, len(dataset) - 1, min(samples, len(dataset))).round().astype(int))
        images = [model_input_image(self.model, read_rgb_image(dataset.images[i])) for i in picked]
        labels = [dataset.labels[i] for i in picked]
        table = corruption_accuracy(self.model, images, labels, self.classifier(dataset), seed=self.seed,
                                    batch_size=self.batch_size, workers=self.workers)
        metrics = table.metrics()
        columns = ["corruption", *(f"severity {s}" for s in range(1, 6)), "mean"]
        corruption_table = Table("accuracy under corruption", columns, table.rows())
        result = TaskResult(dataset.name, TASKS["robustness"], metrics, [corruption_table])
        if dataset.synthetic is not None:
            shifts = {name: self._accuracy(dataset.synthetic.dataset("test", len(picked), name), self.classifier(dataset))
                      for name in SHIFT_NAMES}
            metrics.update({f"shift_{name}": value for name, value in shifts.items()})
            metrics["mean_shift_acc"] = float(np.mean(list(shifts.values())))
            result.tables.append(Table("distribution shift (synthetic renderings)", ["shift", "acc1"],
                                       [["none", table.clean], *([name, value] for name, value in shifts.items())]))
        path = self._plot_path(dataset.name, "robustness")
        if path is not None:
            result.plots["accuracy against corruption severity"] = corruption_plot(table, path)
        return result

    def _accuracy(self, dataset: ClassificationDataset, classifier: torch.Tensor) -> float:
        logits = zero_shot_logits(self.embed(dataset.images, dataset.name), classifier)
        return topk_accuracy(logits, dataset.labels, ks=(1,))["acc1"]

    def ood(self, dataset: ClassificationDataset, ood_images: Sequence[Any], ood_name: str) -> TaskResult:
        """Every OOD score (``ood_scores``): AUROC, AUPR-In and FPR at 95% TPR each, ID = ``dataset``; MCM's are
        also the headline ``auroc`` and ``fpr95``; a ROC plot of MCM (of ATD with a CLIPN no-encoder)."""
        id_scores, ood_scores = self.ood_scores(dataset, self.image_features(dataset)), self.ood_scores(
            dataset, self.embed(ood_images, ood_name))
        metrics = {"auroc": auroc(id_scores["mcm"], ood_scores["mcm"]), "fpr95": fpr_at_tpr(id_scores["mcm"], ood_scores["mcm"])}
        rows = []
        for name in id_scores:
            figures = {"auroc": auroc(id_scores[name], ood_scores[name]), "aupr": aupr_in(id_scores[name], ood_scores[name]),
                       "fpr95": fpr_at_tpr(id_scores[name], ood_scores[name], 0.95)}
            metrics.update({f"{metric}_{name}": value for metric, value in figures.items()})
            rows.append([name, *figures.values()])
        metrics.update({"id_samples": float(len(id_scores["mcm"])), "ood_samples": float(len(ood_scores["mcm"]))})
        extra = {"ood_dataset": ood_name} | ({"no_encoder": self.no_encoder_name} if self.no_encoder is not None else {})
        table = Table("OOD detection (ID positive)", ["score", "auroc", "aupr_in", "fpr95"], rows)
        result = TaskResult(dataset.name, TASKS["ood"], metrics, [table], extra=extra)
        path = self._plot_path(dataset.name, "roc")
        if path is not None:
            shown = "atd" if "atd" in id_scores else "mcm"
            result.plots[f"OOD ROC curve ({shown.upper()})"] = roc_curve_plot(id_scores[shown], ood_scores[shown], path)
        return result

    def ood_scores(self, dataset: ClassificationDataset, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """MCM, MSP, energy and max-logit of ``features`` against the zero-shot head of ``dataset``; CTW and ATD too
        when the evaluator has a CLIPN no-encoder (its head: the same class names and prompts)."""
        head = self.classifier(dataset)
        logits = zero_shot_logits(features, head)
        scores = {"mcm": mcm_score(features, head.T), "msp": msp_score(logits), "energy": energy_score(logits),
                  "max_logit": max_logit_score(logits)}
        if self.no_encoder is not None:
            no_logits = zero_shot_logits(features, self.no_classifier(dataset))
            scores.update({"ctw": ctw_score(logits, no_logits), "atd": atd_score(logits, no_logits)})
        return scores

    def no_classifier(self, dataset: ClassificationDataset) -> torch.Tensor:
        """The CLIPN no-encoder's head [D, C] for the dataset's class names and prompts."""
        key = json.dumps(["no", dataset.classnames, dataset.templates])
        if key not in self._classifiers:
            self._classifiers[key] = zero_shot_head(self.no_encoder, dataset.classnames, dataset.templates)
        return self._classifiers[key]

    def detection(self, dataset: ClassificationDataset, fpr: float = 0.05) -> TaskResult:
        """A real-vs-altered detector (the adapter, classes "real" and another) on two classes, one named "real" (the
        other, whatever its name, altered): AUROC, accuracy and accuracy at ``fpr`` of the real images flagged, on
        the logit difference altered − real."""
        if self.adapter is None or len(self.adapter.classnames) != 2 or "real" not in self.adapter.classnames:
            raise InputError("detection: give a detector adapter (clipforge adapt detector) with --adapter")
        if len(dataset.classnames) != 2 or "real" not in dataset.classnames:
            raise InputError(f"{dataset.name}: detection needs two classes, one named 'real' (found {', '.join(dataset.classnames)})")
        logits = self.adapter.logits(self.image_features(dataset))
        real = self.adapter.classnames.index("real")
        scores = logits[:, 1 - real] - logits[:, real]
        labels = [int(dataset.classnames[label] != "real") for label in dataset.labels]  # the other class is altered
        return TaskResult(dataset.name, TASKS["detection"], detection_metrics(scores, labels, fpr=fpr),
                          extra={"adapter": self.adapter.method})

    def reid(self, dataset: ClassificationDataset) -> TaskResult:
        """Re-identification: each identity's first image queries the other images (``ranking``): rank-1, rank-5, mAP."""
        queries, gallery = query_gallery_split(dataset.labels, dataset.name)
        features, labels = self.image_features(dataset), dataset.labels
        metrics = reid_metrics(features[queries], [labels[i] for i in queries], features[gallery],
                               [labels[i] for i in gallery])
        metrics.update({"queries": float(len(queries)), "gallery": float(len(gallery))})
        return TaskResult(dataset.name, TASKS["reid"], metrics)

    def adversarial(self, dataset: ClassificationDataset, samples: int = 200, epsilons: Sequence[float] = EPSILONS) -> TaskResult:
        """FGSM, PGD and single-patch attacks on the zero-shot head (``clipforge.eval.adversarial``)."""
        picked = np.unique(np.linspace(0, len(dataset) - 1, min(samples, len(dataset))).round().astype(int))
        pixels = model_pixels(self.model, [read_rgb_image(dataset.images[i]) for i in picked])
        labels = [dataset.labels[i] for i in picked]
        metrics = adversarial_metrics(self.model, self.classifier(dataset), pixels, labels, epsilons, self.seed, self.batch_size)
        return TaskResult(dataset.name, TASKS["adversarial"], metrics)

    def calibration(self, fit: ClassificationDataset, test: ClassificationDataset) -> TaskResult:
        """ECE (15 bins) and NLL of softmax(100·cos) before and after a temperature fitted on ``fit``."""
        temperature = fit_temperature(self.logits(fit), fit.labels)
        logits, labels = self.logits(test), torch.as_tensor(test.labels)
        before, after = logits.softmax(dim=1), (logits / temperature).softmax(dim=1)
        metrics = {
            "ece_before": expected_calibration_error(before, labels),
            "ece_after": expected_calibration_error(after, labels),
            "nll_before": F.cross_entropy(logits.double(), labels).item(),
            "nll_after": F.cross_entropy(logits.double() / temperature, labels).item(),
            "temperature": temperature,
            "acc1": topk_accuracy(logits, labels, ks=(1,))["acc1"],
        }
        result = TaskResult(test.name, TASKS["calibration"], metrics, extra={"fit_dataset": fit.name})
        for name, probs in (("before", before), ("after", after)):
            path = self._plot_path(test.name, f"reliability_{name}")
            if path is not None:
                result.plots[f"reliability diagram, {name} temperature scaling"] = reliability_diagram(probs, labels, path)
        return result
