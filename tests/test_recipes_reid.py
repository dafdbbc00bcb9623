"""CLIP-ReIdent (Habel et al., MMSports 2022): the ranking metrics against scikit-learn, the loss against its
formula written out here, the sampler's one-identity-per-batch rule, and the synthetic identity split.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import sklearn.metrics as skm
import torch
import torch.nn.functional as F
from PIL import Image

from clipforge.adapt.reid import identity_batches, symmetric_info_nce
from clipforge.data.synthetic import identities, identity_view
from clipforge.errors import InputError
from clipforge.eval.datasets import folder_dataset, load_dataset
from clipforge.eval.ranking import query_gallery_split, reid_metrics
from clipforge.eval.runner import Evaluator


def test_reid_metrics_against_sklearn_average_precision() -> None:
    rng = np.random.default_rng(0)
    query, gallery = rng.normal(size=(12, 8)), rng.normal(size=(40, 8))
    query_ids, gallery_ids = rng.integers(0, 5, 12), rng.integers(0, 5, 40)
    gallery_ids[:5] = np.arange(5)  # every identity has a gallery image
    found = reid_metrics(query, query_ids, gallery, gallery_ids, ks=(1, 5))
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    similarity = q @ g.T
    aps, first_ranks = [], []
    for row in range(12):
        truth = gallery_ids == query_ids[row]
        aps.append(skm.average_precision_score(truth, similarity[row]))
        ranked = np.argsort(-similarity[row], kind="stable")
        first_ranks.append(int(np.nonzero(truth[ranked])[0][0]))
    assert found["map"] == pytest.approx(np.mean(aps), rel=1e-10)
    assert found["rank1"] == pytest.approx(np.mean(np.array(first_ranks) < 1))
    assert found["rank5"] == pytest.approx(np.mean(np.array(first_ranks) < 5))
    with pytest.raises(InputError, match="no gallery image"):
        reid_metrics(query, np.full(12, 9), gallery, gallery_ids)


def test_symmetric_info_nce_with_label_smoothing_equals_its_formula() -> None:
    torch.manual_seed(0)
    left, right = F.normalize(torch.randn(5, 6, dtype=torch.float64), dim=-1), F.normalize(torch.randn(5, 6, dtype=torch.float64), dim=-1)
    s, eps, n = 14.0, 0.1, 5

    def smoothed_ce(logits: torch.Tensor) -> float:
        total = 0.0
        for i in range(n):
            log_p = [logits[i, j].item() - math.log(sum(math.exp(logits[i, k].item()) for k in range(n))) for j in range(n)]
            total += -sum(((1 - eps) * (j == i) + eps / n) * log_p[j] for j in range(n))
        return total / n

    logits = s * left @ right.T
    expected = 0.5 * (smoothed_ce(logits) + smoothed_ce(logits.T))
    assert symmetric_info_nce(left, right, torch.tensor(s, dtype=torch.float64), eps).item() == pytest.approx(expected, rel=1e-10)


def test_sampler_puts_each_identity_once_per_batch_with_two_distinct_images() -> None:
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4]  # identity 4 has one image: never drawn
    batches = identity_batches(labels, batch_size=3, steps=20, seed=1)
    assert len(batches) == 20
    for batch in batches:
        ids = [labels[a] for a, _, _ in batch]
        assert len(ids) == len(set(ids)) == 3 and 4 not in ids
        assert all(a != b and labels[a] == labels[b] for a, b, _ in batch)
    assert {flip for batch in batches for _, _, flip in batch} == {True, False}


def test_synthetic_identities_are_split_and_rendered_deterministically() -> None:
    sides = identities()
    assert len(sides["train"]) == 600 and len(sides["test"]) == 360
    assert not {i.name for i in sides["train"]} & {i.name for i in sides["test"]}
    identity = sides["test"][0]
    first, second = np.asarray(identity_view(identity, 0)), np.asarray(identity_view(identity, 1))
    assert first.shape == (64, 64, 3) and not np.array_equal(first, second)
    assert np.array_equal(first, np.asarray(identity_view(identity, 0)))
    dataset = load_dataset("synthetic:identities@test", samples=12)
    assert dataset.labels == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert query_gallery_split(dataset.labels) == ([0, 4, 8], [1, 2, 3, 5, 6, 7, 9, 10, 11])


def test_reid_refuses_a_folder_with_one_identity(tiny, tmp_path: Path) -> None:
    for name in ("alice", "bob"):
        (tmp_path / name).mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (10 * i, 0, 0)).save(tmp_path / "alice" / f"{i}.png")
    Image.new("RGB", (32, 32), (0, 90, 0)).save(tmp_path / "bob" / "0.png")
    with pytest.raises(InputError, match="at least two identities with two images each"):
        Evaluator(tiny, workers=0).reid(folder_dataset(tmp_path))
