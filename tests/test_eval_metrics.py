"""Classification, retrieval, calibration and OOD metrics against scikit-learn, CLIP_benchmark and loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from clip_benchmark.metrics.zeroshot_classification import (
    average_precision_per_class as cb_average_precision,
)
from clip_benchmark.metrics.zeroshot_retrieval import batchify as cb_batchify
from clip_benchmark.metrics.zeroshot_retrieval import recall_at_k as cb_recall_at_k
from PIL import Image
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax
from sklearn import metrics as skm

from clipforge.errors import InputError
from clipforge.eval.calibration import (
    expected_calibration_error,
    fit_temperature,
    reliability_diagram,
)
from clipforge.eval.metrics import (
    average_precision_per_class,
    classification_metrics,
    confusion_matrix,
    mean_average_precision,
    mean_per_class_recall,
    retrieval_recall_at_k,
    topk_accuracy,
)
from clipforge.eval.ood import auroc, fpr_at_tpr, mcm_score, roc_curve_plot


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def classification_fixture(rng: np.random.Generator, n: int = 300, classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Logits that are informative but imperfect; classes 8 and 9 never occur as targets."""
    targets = rng.integers(0, classes - 2, size=n)
    logits = rng.normal(size=(n, classes))
    logits[np.arange(n), targets] += 1.5
    return logits.astype(np.float32), targets


# ---------------------------------------------------------------- classification


def test_topk_accuracy_matches_sklearn(rng: np.random.Generator) -> None:
    logits, targets = classification_fixture(rng)
    result = topk_accuracy(torch.from_numpy(logits), torch.from_numpy(targets), ks=(1, 3, 5))
    assert result["acc1"] == pytest.approx(skm.accuracy_score(targets, logits.argmax(1)))
    for k in (3, 5):
        expected = skm.top_k_accuracy_score(targets, logits, k=k, labels=np.arange(10))
        assert result[f"acc{k}"] == pytest.approx(expected)
    assert topk_accuracy(logits, targets, ks=(1, 3, 5)) == result  # numpy input gives the same


def test_topk_accuracy_is_nan_beyond_the_number_of_classes(rng: np.random.Generator) -> None:
    logits = rng.normal(size=(50, 4))
    targets = rng.integers(0, 4, size=50)
    result = topk_accuracy(logits, targets, ks=(1, 4, 5))
    assert result["acc1"] == pytest.approx(skm.accuracy_score(targets, logits.argmax(1)))
    assert result["acc4"] == 1.0
    assert math.isnan(result["acc5"])


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_confusion_matrix_and_balanced_accuracy_match_sklearn(rng: np.random.Generator) -> None:
    logits, targets = classification_fixture(rng)
    predictions = logits.argmax(1)
    expected = skm.confusion_matrix(targets, predictions, labels=np.arange(10))
    np.testing.assert_array_equal(confusion_matrix(logits, targets).numpy(), expected)
    assert mean_per_class_recall(logits, targets) == pytest.approx(skm.balanced_accuracy_score(targets, predictions))


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_classification_metrics_have_clip_benchmark_keys_and_sklearn_values(rng: np.random.Generator) -> None:
    # CLIP_benchmark's own ``accuracy`` fails under numpy 2 (float() of a 1-element array), so sklearn is the reference.
    logits, targets = classification_fixture(rng)
    result = classification_metrics(logits, targets)
    assert set(result) == {"acc1", "acc5", "mean_per_class_recall"}
    assert result["acc1"] == pytest.approx(skm.accuracy_score(targets, logits.argmax(1)))
    assert result["acc5"] == pytest.approx(skm.top_k_accuracy_score(targets, logits, k=5, labels=np.arange(10)))
    assert result["mean_per_class_recall"] == pytest.approx(skm.balanced_accuracy_score(targets, logits.argmax(1)))


def multilabel_fixture(rng: np.random.Generator, n: int = 120, classes: int = 6) -> tuple[np.ndarray, np.ndarray]:
    targets = (rng.random((n, classes)) < 0.3).astype(np.int64)
    targets[0] = 1  # every class has a positive
    scores = rng.normal(size=(n, classes)) + 1.2 * targets
    return scores.astype(np.float32), targets


def test_average_precision_matches_sklearn_and_clip_benchmark(rng: np.random.Generator) -> None:
    scores, targets = multilabel_fixture(rng)
    per_class = average_precision_per_class(scores, targets).numpy()
    for c in range(scores.shape[1]):
        assert per_class[c] == pytest.approx(skm.average_precision_score(targets[:, c], scores[:, c]))
    reference = cb_average_precision(torch.from_numpy(scores), torch.from_numpy(targets)).numpy()
    np.testing.assert_allclose(per_class, reference, rtol=1e-6)
    assert mean_average_precision(scores, targets) == pytest.approx(reference.mean())
    assert classification_metrics(scores, targets) == {"mean_average_precision": pytest.approx(reference.mean())}


def test_average_precision_of_a_class_without_positives_is_zero_like_clip_benchmark(rng: np.random.Generator) -> None:
    scores, targets = multilabel_fixture(rng)
    targets[:, 2] = 0
    reference = cb_average_precision(torch.from_numpy(scores), torch.from_numpy(targets)).numpy()
    np.testing.assert_allclose(average_precision_per_class(scores, targets).numpy(), reference, rtol=1e-6)
    assert reference[2] == 0


@pytest.mark.parametrize(
    ("logits", "targets", "field"),
    [
        (np.zeros((4, 3)), np.array([0, 1, 2]), "targets"),  # length mismatch
        (np.zeros((3, 3)), np.array([0, 1, 3]), "targets"),  # class id out of range
        (np.zeros(3), np.array([0, 1, 2]), "logits"),  # not 2-D
        (np.array([[0.0, np.nan]]), np.array([0]), "logits"),
    ],
)
def test_bad_classification_input_names_the_field(logits: np.ndarray, targets: np.ndarray, field: str) -> None:
    with pytest.raises(InputError, match=f"^{field}:"):
        classification_metrics(logits, targets)


# ---------------------------------------------------------------- retrieval


def retrieval_fixture(rng: np.random.Generator, images: int = 40, dim: int = 16) -> tuple[np.ndarray, ...]:
    """Captions near their image (1 to 5 per image); image 0 has no caption (a distractor)."""
    image_emb = rng.normal(size=(images, dim))
    index = np.concatenate([np.full(rng.integers(1, 6), i) for i in range(1, images)])
    text_emb = image_emb[index] + 1.3 * rng.normal(size=(len(index), dim))
    return image_emb.astype(np.float32), text_emb.astype(np.float32), index


def brute_force_recall(image_emb: np.ndarray, text_emb: np.ndarray, index: np.ndarray, k: int) -> tuple[float, float]:
    images = image_emb / np.linalg.norm(image_emb, axis=1, keepdims=True)
    texts = text_emb / np.linalg.norm(text_emb, axis=1, keepdims=True)
    text_hits = []
    for j, text in enumerate(texts):
        ranked_images = sorted(range(len(images)), key=lambda i: -float(images[i] @ text))
        text_hits.append(index[j] in ranked_images[:k])
    captioned = set(index.tolist())
    image_hits = []
    for i, image in enumerate(images):
        if i not in captioned:
            continue
        ranked_texts = sorted(range(len(texts)), key=lambda j: -float(texts[j] @ image))
        image_hits.append(any(index[j] == i for j in ranked_texts[:k]))
    return float(np.mean(text_hits)), float(np.mean(image_hits))


@pytest.mark.parametrize("batch_size", [1, 7, 4096])
def test_retrieval_recall_matches_a_brute_force_loop(rng: np.random.Generator, batch_size: int) -> None:
    image_emb, text_emb, index = retrieval_fixture(rng)
    ks = (1, 5, 10, 1000)
    result = retrieval_recall_at_k(image_emb, text_emb, index, ks=ks, batch_size=batch_size)
    assert 0.2 < result["image_retrieval_recall@1"] < 0.9  # a fixture where ranks matter
    for k in ks:
        text_to_image, image_to_text = brute_force_recall(image_emb, text_emb, index, k)
        assert result[f"image_retrieval_recall@{k}"] == pytest.approx(text_to_image)
        assert result[f"text_retrieval_recall@{k}"] == pytest.approx(image_to_text)


def test_retrieval_recall_matches_clip_benchmark(rng: np.random.Generator) -> None:
    image_emb, text_emb, index = retrieval_fixture(rng)
    image_emb, index = image_emb[1:], index - 1  # CLIP_benchmark: every image has a caption
    images = torch.nn.functional.normalize(torch.from_numpy(image_emb), dim=-1)
    texts = torch.nn.functional.normalize(torch.from_numpy(text_emb), dim=-1)
    scores = texts @ images.T
    positive_pairs = torch.zeros_like(scores, dtype=torch.bool)
    positive_pairs[torch.arange(len(texts)), torch.from_numpy(index)] = True
    result = retrieval_recall_at_k(
        torch.from_numpy(image_emb), torch.from_numpy(text_emb), torch.from_numpy(index), ks=(1, 5, 10), batch_size=16
    )
    for k in (1, 5, 10):
        image_recall = (cb_batchify(cb_recall_at_k, scores, positive_pairs, 16, "cpu", k=k) > 0).float().mean().item()
        text_recall = (cb_batchify(cb_recall_at_k, scores.T, positive_pairs.T, 16, "cpu", k=k) > 0).float().mean().item()
        assert result[f"image_retrieval_recall@{k}"] == pytest.approx(image_recall)
        assert result[f"text_retrieval_recall@{k}"] == pytest.approx(text_recall)


def test_retrieval_rejects_an_index_beyond_the_images(rng: np.random.Generator) -> None:
    image_emb, text_emb, index = retrieval_fixture(rng)
    with pytest.raises(InputError, match="^texts_image_index:"):
        retrieval_recall_at_k(image_emb, text_emb, index + 1)
    with pytest.raises(InputError, match="^text_emb:"):
        retrieval_recall_at_k(image_emb, text_emb[:, :8], index)


# ---------------------------------------------------------------- calibration


def loop_ece(probs: np.ndarray, targets: np.ndarray, n_bins: int) -> float:
    confidences, predictions = probs.max(1), probs.argmax(1)
    edges = np.linspace(0, 1, n_bins + 1)
    ece = 0.0
    for lower, upper in zip(edges[:-1], edges[1:]):
        in_bin = (confidences > lower) & (confidences <= upper)
        if in_bin.any():
            gap = abs((predictions[in_bin] == targets[in_bin]).mean() - confidences[in_bin].mean())
            ece += in_bin.mean() * gap
    return ece


def overconfident_fixture(
    rng: np.random.Generator, n: int = 2000, classes: int = 10, scale: float = 3.0
) -> tuple[np.ndarray, np.ndarray]:
    """Targets drawn from softmax(z); the model reports scale * z, so the right temperature is ``scale``."""
    z = 2.0 * rng.normal(size=(n, classes))
    p = softmax(z, axis=1)
    targets = np.minimum((p.cumsum(axis=1) < rng.random((n, 1))).sum(axis=1), classes - 1)  # inverse-CDF sampling
    return scale * z, targets


def nll(logits: np.ndarray, targets: np.ndarray, temperature: float) -> float:
    return float(-log_softmax(logits / temperature, axis=1)[np.arange(len(targets)), targets].mean())


@pytest.mark.parametrize("n_bins", [15, 10])
def test_ece_matches_a_loop_over_bins(rng: np.random.Generator, n_bins: int) -> None:
    logits, targets = overconfident_fixture(rng, n=500)
    probs = softmax(logits, axis=1)
    assert expected_calibration_error(probs, targets, n_bins) == pytest.approx(loop_ece(probs, targets, n_bins), rel=1e-9)
    assert expected_calibration_error(torch.from_numpy(probs).float(), torch.from_numpy(targets), n_bins) == pytest.approx(
        loop_ece(probs, targets, n_bins), abs=1e-5
    )


def test_ece_puts_a_confidence_on_a_bin_edge_into_the_lower_bin() -> None:
    probs = np.array(
        [[0.75, 0.25, 0, 0], [0.75, 0, 0.25, 0], [0.5, 0.25, 0.25, 0], [1.0, 0, 0, 0], [0.6, 0.4, 0, 0], [0.3, 0.3, 0.4, 0]]
    )
    targets = np.array([0, 1, 0, 3, 0, 2])
    assert expected_calibration_error(probs, targets, n_bins=4) == pytest.approx(loop_ece(probs, targets, 4), rel=1e-12)


def test_temperature_scaling_recovers_the_temperature_and_improves_calibration(rng: np.random.Generator) -> None:
    logits, targets = overconfident_fixture(rng)
    with torch.no_grad():  # a runner may call it under no_grad
        temperature = fit_temperature(torch.from_numpy(logits).float(), torch.from_numpy(targets))
    scipy_best = minimize_scalar(
        lambda t: nll(logits, targets, t), bounds=(0.1, 20), method="bounded", options={"xatol": 1e-6}
    ).x
    assert temperature == pytest.approx(scipy_best, abs=1e-3)
    assert temperature == pytest.approx(3.0, rel=0.15)
    assert nll(logits, targets, temperature) < nll(logits, targets, 1.0)
    before = loop_ece(softmax(logits, axis=1), targets, 15)
    after = loop_ece(softmax(logits / temperature, axis=1), targets, 15)
    assert after <= before
    print(f"fitted T={temperature:.4f} (scipy {scipy_best:.4f}); ECE {before:.4f} -> {after:.4f}")


def test_reliability_diagram_writes_a_png(rng: np.random.Generator, tmp_path) -> None:
    logits, targets = overconfident_fixture(rng, n=300)
    path = reliability_diagram(softmax(logits, axis=1), targets, tmp_path / "plots" / "reliability.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 100 and image.height > 100


def test_calibration_rejects_logits_passed_as_probabilities(rng: np.random.Generator) -> None:
    logits, targets = overconfident_fixture(rng, n=50)
    with pytest.raises(InputError, match="^probs:"):
        expected_calibration_error(logits, targets)


# ---------------------------------------------------------------- OOD detection


@pytest.mark.parametrize("temperature", [1.0, 0.01])
def test_mcm_score_matches_numpy(rng: np.random.Generator, temperature: float) -> None:
    image_features, text_features = rng.normal(size=(30, 12)), rng.normal(size=(5, 12))
    cosines = (image_features / np.linalg.norm(image_features, axis=1, keepdims=True)) @ (
        text_features / np.linalg.norm(text_features, axis=1, keepdims=True)
    ).T
    expected = softmax(cosines / temperature, axis=1).max(axis=1)
    result = mcm_score(torch.from_numpy(image_features), torch.from_numpy(text_features), temperature=temperature)
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-10)


def score_fixtures(rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    continuous = (rng.normal(1.0, 1.0, size=157), rng.normal(0.0, 1.0, size=211))
    tied = (rng.integers(2, 10, size=200).astype(float), rng.integers(0, 7, size=120).astype(float))
    tpr_lands_on_target = (rng.normal(1.0, 1.0, size=20), rng.normal(0.0, 1.0, size=30))  # 19/20 = 0.95 exactly
    return [continuous, tied, tpr_lands_on_target]


def test_auroc_matches_sklearn_with_and_without_ties(rng: np.random.Generator) -> None:
    for id_scores, ood_scores in score_fixtures(rng):
        labels = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
        expected = skm.roc_auc_score(labels, np.r_[id_scores, ood_scores])
        assert auroc(id_scores, ood_scores) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("tpr", [0.95, 0.5, 1.0])
def test_fpr_at_tpr_matches_sklearn_roc_curve_and_a_direct_count(rng: np.random.Generator, tpr: float) -> None:
    for id_scores, ood_scores in score_fixtures(rng):
        labels = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
        fpr, tpr_points, _ = skm.roc_curve(labels, np.r_[id_scores, ood_scores], drop_intermediate=False)
        from_sklearn = fpr[np.searchsorted(tpr_points, tpr, side="left")]
        threshold = np.sort(id_scores)[::-1][math.ceil(round(tpr * len(id_scores), 9)) - 1]
        direct_count = np.mean(ood_scores >= threshold)
        result = fpr_at_tpr(torch.from_numpy(id_scores), torch.from_numpy(ood_scores), tpr=tpr)
        assert result == pytest.approx(from_sklearn) and result == pytest.approx(direct_count)


def test_roc_curve_plot_writes_a_png(rng: np.random.Generator, tmp_path) -> None:
    id_scores, ood_scores = score_fixtures(rng)[0]
    path = roc_curve_plot(id_scores, ood_scores, tmp_path / "roc.png")
    with Image.open(path) as image:
        assert image.format == "PNG"


def test_ood_metrics_reject_bad_input(rng: np.random.Generator) -> None:
    id_scores, ood_scores = score_fixtures(rng)[0]
    with pytest.raises(InputError, match="^tpr:"):
        fpr_at_tpr(id_scores, ood_scores, tpr=0.0)
    with pytest.raises(InputError, match="^ood_scores:"):
        auroc(id_scores, ood_scores[:, None])
    with pytest.raises(InputError, match="^class_text_features:"):
        mcm_score(rng.normal(size=(3, 8)), rng.normal(size=(2, 4)))
