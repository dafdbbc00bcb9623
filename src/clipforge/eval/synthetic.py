"""Zero-shot and retrieval figures of a model on the synthetic world (used by training and the demo).

Test images are rendered once and cached per preprocessing; every call then costs one image pass,
one text pass per task, and a few matrix products.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from clipforge.data.synthetic import SyntheticWorld
from clipforge.eval.metrics import retrieval_recall_at_k
from clipforge.eval.zeroshot import build_zero_shot_classifier, zero_shot_logits


@torch.inference_mode()
def encode_pil_images(model: Any, images: Sequence[Any], batch_size: int = 256) -> torch.Tensor:
    device = next(model.parameters()).device
    rows = []
    for start in range(0, len(images), batch_size):
        pixels = torch.stack([model.preprocess(image) for image in images[start : start + batch_size]])
        rows.append(model.encode_image(pixels.to(device)).float())
    return torch.cat(rows)


class SyntheticBenchmark:
    """``acc_<task>`` on the test split, ``acc_heldout_combos`` on held-out shape+color pairs, and recall@1."""

    def __init__(
        self,
        world: SyntheticWorld,
        *,
        samples: int = 512,
        tasks: Sequence[str] = ("shape_color", "color", "shape"),
        heldout_samples: int = 256,
        retrieval_samples: int = 256,
    ) -> None:
        self.world = world
        self.tasks = {name: world.tasks()[name] for name in tasks}
        self.test = list(world.samples("test", 0, samples))
        self.heldout = list(world.samples("test_heldout", 0, heldout_samples)) if world.config.heldout_combos else []
        self.retrieval = world.retrieval_set("test", retrieval_samples) if retrieval_samples else None

    def __call__(self, model: Any) -> dict[str, float]:
        results: dict[str, float] = {}
        features = encode_pil_images(model, [s.image for s in self.test])
        for name, task in self.tasks.items():
            results[f"acc_{name}"] = self._accuracy(model, task, features, [s.metadata for s in self.test])
        if self.heldout:
            heldout_features = encode_pil_images(model, [s.image for s in self.heldout])
            task = self.world.tasks()["shape_color"]
            results["acc_heldout_combos"] = self._accuracy(model, task, heldout_features, [s.metadata for s in self.heldout])
        if self.retrieval is not None:
            results.update(self._retrieval(model))
        return results

    @staticmethod
    def _accuracy(model: Any, task: Any, features: torch.Tensor, metadata: list[dict[str, Any]]) -> float:
        labels = [task.label_of(m) for m in metadata]
        rows = [i for i, label in enumerate(labels) if label is not None]
        if not rows:
            return float("nan")
        classifier = build_zero_shot_classifier(model, task.classnames, task.templates)
        predictions = zero_shot_logits(features[rows], classifier).argmax(dim=1)
        targets = torch.tensor([labels[i] for i in rows])
        return round((predictions.cpu() == targets).float().mean().item(), 4)

    def _retrieval(self, model: Any) -> dict[str, float]:
        assert self.retrieval is not None
        image_features = encode_pil_images(model, self.retrieval.images)
        captions = [text for texts in self.retrieval.captions for text in texts]
        owner = [i for i, texts in enumerate(self.retrieval.captions) for _ in texts]
        device = next(model.parameters()).device
        with torch.inference_mode():
            text_features = torch.cat(
                [model.encode_text(model.tokenize(captions[s : s + 512]).to(device)).float() for s in range(0, len(captions), 512)]
            )
        recall = retrieval_recall_at_k(image_features, text_features, owner, ks=(1,))
        return {
            "recall_at_1_i2t": round(recall["text_retrieval_recall@1"], 4),
            "recall_at_1_t2i": round(recall["image_retrieval_recall@1"], 4),
        }
