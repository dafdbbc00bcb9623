"""Altered-image detectors: the metrics against scikit-learn and a hand count, the synthetic alteration families,
which parameters each tuning trains, and the saved file's round trip.
"""

from __future__ import annotations

import numpy as np
import pytest
import sklearn.metrics as skm
import torch
import torch.nn.functional as F
from torch import nn

from clipforge.adapt import load_adapter
from clipforge.adapt.detector import DetectorSettings, prepare
from clipforge.adapt.recipe_data import detector_images
from clipforge.adapt.recipes import fit_recipe
from clipforge.data.synthetic import ALTERATIONS, SyntheticWorld, real_or_altered
from clipforge.encode import embed_images
from clipforge.errors import ConfigError, InputError
from clipforge.eval.detection import detection_metrics


def test_detection_metrics_against_sklearn_and_a_hand_count() -> None:
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(40), np.ones(60)].astype(int)
    scores = np.r_[rng.normal(-1, 1, 40), rng.normal(1, 1, 60)]
    found = detection_metrics(scores, labels, threshold=0.0, fpr=0.1)
    assert found["auroc"] == pytest.approx(skm.roc_auc_score(labels, scores), rel=1e-12)
    assert found["acc"] == pytest.approx(skm.accuracy_score(labels, scores > 0))
    real = np.sort(scores[labels == 0])[::-1]
    cut = real[4]  # 10% of 40 real images = 4 may score above the threshold
    assert np.mean(scores[labels == 0] > cut) <= 0.1
    assert found["acc_at_fpr"] == pytest.approx(skm.accuracy_score(labels, scores > cut))
    with pytest.raises(InputError, match="^labels:"):
        detection_metrics(scores, np.zeros(100))


def test_alteration_families_change_the_image_and_keep_its_size() -> None:
    world = SyntheticWorld()
    real, label, family = real_or_altered(world, "val", 0, list(ALTERATIONS))
    assert label == 0 and family == "real"
    seen = set()
    for index in range(1, 9, 2):
        image, label, family = real_or_altered(world, "val", index, list(ALTERATIONS))
        original = np.asarray(world.sample("val", index).image, dtype=float)
        assert label == 1 and image.size == (64, 64) and np.abs(np.asarray(image, dtype=float) - original).max() >= 8
        seen.add(family)
        again, _, _ = real_or_altered(world, "val", index, list(ALTERATIONS))
        assert np.array_equal(np.asarray(again), np.asarray(image))
    assert seen == set(ALTERATIONS)
    with pytest.raises(ConfigError, match="families"):
        real_or_altered(world, "val", 1, ["sepia"])


def test_each_tuning_trains_its_parameters_only(tiny) -> None:
    counts = {}
    for tuning in ("head", "ln", "lora", "full"):
        tuned, trained = prepare(tiny, DetectorSettings(tuning=tuning))
        names = {id(p): n for n, p in tuned.named_parameters()}
        counts[tuning] = [names[id(p)] for p in trained]
    layer_norms = {f"visual.{n}" for n, m in tiny.visual.named_modules() if isinstance(m, nn.LayerNorm)}
    assert counts["head"] == []
    assert counts["ln"] and all(name.rsplit(".", 1)[0] in layer_norms for name in counts["ln"])
    assert counts["lora"] and all("lora_" in name and name.startswith("visual.") for name in counts["lora"])
    assert len(counts["full"]) == len(list(tiny.visual.parameters()))
    with pytest.raises(ConfigError, match="tuning"):
        prepare(tiny, DetectorSettings(tuning="bitfit"))


def test_frozen_head_detector_round_trips_and_scores_as_its_formula(tiny, tmp_path) -> None:
    adapter = fit_recipe("detector", tiny, "synthetic:altered", {"tuning": "head", "steps": 4, "samples": 16, "batch_size": 8})
    assert adapter.record.extra["tuned_tensors"] == 0
    path = adapter.save(tmp_path / "det.safetensors")
    classifier = load_adapter(path)(tiny)
    images, _, _ = detector_images("synthetic:altered@val", 6, "double_jpeg")
    features = torch.from_numpy(embed_images(tiny, images, workers=0, progress=False).embeddings)
    weight, bias = adapter.record.tensors["head.weight"], adapter.record.tensors["head.bias"]
    torch.testing.assert_close(classifier.classify(images, workers=0).logits, F.normalize(features) @ weight.T + bias)


def test_layer_norm_detector_stores_only_layer_norms_and_reloads(tiny, tmp_path) -> None:
    adapter = fit_recipe("detector", tiny, "synthetic:altered", {"tuning": "ln", "steps": 3, "samples": 16, "batch_size": 8, "lr": 1e-2})
    stored = [name for name in adapter.record.tensors if name.startswith("visual.")]
    assert stored and all(".ln" in name or "ln_" in name for name in stored)
    path = adapter.save(tmp_path / "ln.safetensors")
    classifier = load_adapter(path)(tiny)
    for name in stored:
        torch.testing.assert_close(classifier.image_model.state_dict()[name], adapter.record.tensors[name])
    with pytest.raises(InputError, match="two classes"):
        fit_recipe("detector", tiny, "synthetic:shape", {"samples": 8})


def test_detector_trains_on_a_user_folder_with_a_real_class(tiny, tmp_path) -> None:
    world = SyntheticWorld()
    for index in range(12):
        image, label, _ = real_or_altered(world, "train", index, ["checkerboard"])
        folder = tmp_path / "photos" / ("real" if label == 0 else "fake")
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{index}.png")
    adapter = fit_recipe("detector", tiny, str(tmp_path / "photos"), {"tuning": "head", "steps": 2, "batch_size": 4})
    assert adapter.record.provenance["images"] == 12 and adapter.record.classnames == ["real", "altered"]
    (tmp_path / "photos" / "real").rename(tmp_path / "photos" / "genuine")
    with pytest.raises(InputError, match="one named 'real'"):
        fit_recipe("detector", tiny, str(tmp_path / "photos"), {"tuning": "head", "steps": 2})
