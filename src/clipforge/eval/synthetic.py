"""The synthetic world's figures during training and in the demo: a preset of the evaluation runner.

``acc_<task>`` is zero-shot top-1 (``Evaluator.zeroshot``) on the images among the first ``samples`` of the
test split that the task labels: exactly what ``clipforge eval zeroshot --data synthetic:<task> --samples N``
reports for the same model and world. ``acc_heldout_combos`` is shape+color on the held-out pairs
(``test_heldout``), and ``recall_at_1_i2t``/``recall_at_1_t2i`` are image↔text recall@1 (``Evaluator.retrieval``)
on the first ``retrieval_samples`` test images with five paraphrases each. The images are rendered once;
each call encodes the test images once and scores every task on its share of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from clipforge.data.synthetic import SyntheticWorld
from clipforge.encode import Encoder
from clipforge.eval.datasets import (
    ClassificationDataset,
    RetrievalDataset,
    SyntheticTask,
)
from clipforge.eval.runner import Evaluator

BATCH_SIZE = 256


RETRIEVAL_SAMPLES = 256  # test images of the retrieval figures, five captions each

class SyntheticBenchmark:
    """``acc_<task>`` per task, ``acc_heldout_combos`` and recall@1, as a dict of figures rounded to 4 places."""

    def __init__(
        self,
        world: SyntheticWorld,
        *,
        samples: int = 512,
        tasks: Sequence[str] = ("shape_color", "color", "shape"),
        heldout_samples: int = 256,
        retrieval_samples: int = RETRIEVAL_SAMPLES,
    ) -> None:
        test = list(world.samples("test", 0, samples))
        self.test_images = [scene.image for scene in test]
        self.tasks: dict[str, tuple[ClassificationDataset, list[int]] | None] = {}
        for name in tasks:
            task = world.tasks()[name]
            rows = [i for i, scene in enumerate(test) if task.label_of(scene.metadata) is not None]
            self.tasks[name] = (SyntheticTask(world, task).labelled(test, f"synthetic/{name}"), rows) if rows else None
        self.heldout = (
            SyntheticTask(world, world.tasks()["shape_color"]).dataset("test_heldout", heldout_samples)
            if heldout_samples and world.config.heldout_combos
            else None
        )
        found = world.retrieval_set("test", retrieval_samples) if retrieval_samples else None
        self.retrieval = RetrievalDataset("synthetic/retrieval", found.images, found.captions) if found else None

    def __call__(self, model: Encoder) -> dict[str, float]:
        evaluator = Evaluator(model, batch_size=BATCH_SIZE, workers=0)
        features = evaluator.embed(self.test_images)
        results: dict[str, float] = {}
        for name, share in self.tasks.items():
            if share is None:
                results[f"acc_{name}"] = float("nan")
                continue
            dataset, rows = share
            evaluator.share_features(dataset, features[torch.tensor(rows)])
            results[f"acc_{name}"] = round(evaluator.zeroshot(dataset).metrics["acc1"], 4)
        if self.heldout is not None:
            results["acc_heldout_combos"] = round(evaluator.zeroshot(self.heldout).metrics["acc1"], 4)
        if self.retrieval is not None:
            recall = evaluator.retrieval(self.retrieval, ks=(1,)).metrics
            results["recall_at_1_i2t"] = round(recall["text_retrieval_recall@1"], 4)
            results["recall_at_1_t2i"] = round(recall["image_retrieval_recall@1"], 4)
        return results
