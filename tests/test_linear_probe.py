"""CLIP-protocol linear probe against independently fitted scikit-learn classifiers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn import metrics as skm
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from clipforge.errors import InputError
from clipforge.eval.linear_probe import linear_probe

Split = tuple[np.ndarray, np.ndarray]


def gaussian_classes(rng: np.random.Generator, per_class: int, means: np.ndarray, noise: float) -> Split:
    labels = np.repeat(np.arange(len(means)), per_class)
    return means[labels] + noise * rng.normal(size=(len(labels), means.shape[1])), labels


def splits(seed: int, classes: int, dim: int, separation: float, noise: float) -> tuple[Split, Split, Split]:
    rng = np.random.default_rng(seed)
    means = separation * rng.normal(size=(classes, dim))
    return tuple(gaussian_classes(rng, n, means, noise) for n in (12, 8, 20))  # type: ignore[return-value]


def sklearn_fit(features: np.ndarray, labels: np.ndarray, c: float) -> LogisticRegression:
    return LogisticRegression(C=c, max_iter=1000).fit(features, labels)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_separable_classes_are_learned_and_metrics_match_a_refit_on_train_plus_val() -> None:
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = splits(seed=0, classes=6, dim=24, separation=1.0, noise=0.3)
    result = linear_probe(torch.from_numpy(train_x).float(), train_y, val_x, val_y, test_x, test_y)
    assert result.lp_acc1 >= 0.95

    probe = sklearn_fit(np.r_[train_x, val_x].astype(np.float32), np.r_[train_y, val_y], result.C)
    assert result.lp_acc1 == pytest.approx(skm.accuracy_score(test_y, probe.predict(test_x)))
    assert result.lp_acc5 == pytest.approx(skm.top_k_accuracy_score(test_y, probe.predict_proba(test_x), k=5))
    assert result.lp_mean_per_class_recall == pytest.approx(skm.balanced_accuracy_score(test_y, probe.predict(test_x)))
    assert set(result.metrics()) == {"lp_acc1", "lp_acc5", "lp_mean_per_class_recall", "C"}


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_chosen_c_has_the_best_validation_accuracy_of_the_clip_sweep() -> None:
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = splits(seed=1, classes=5, dim=40, separation=0.35, noise=1.0)
    result = linear_probe(train_x, train_y, val_x, val_y, test_x, test_y)

    clip_grid = np.logspace(-6, 6, 97)
    tried = np.array(list(result.val_accuracy_by_c))
    assert all(np.isclose(clip_grid, c, rtol=1e-9).any() for c in tried)
    for decade in (1e-6, 1e-4, 1e-2, 1.0, 1e2, 1e4, 1e6):  # the CLIP paper's starting points
        assert np.isclose(tried, decade, rtol=1e-9).any()
    assert 7 < len(tried) <= 7 + 2 * 4  # refined around the peak with spans 8, 4, 2, 1 grid steps
    steps_from_chosen = np.round(np.log10(tried / result.C) * 8, 6)
    assert {-1.0, 1.0} & set(steps_from_chosen)  # the last refinement looked one grid step (10^(1/8)) away

    independent = {c: sklearn_fit(train_x, train_y, c).score(val_x, val_y) for c in tried}
    assert len(set(independent.values())) > 1  # a fixture where the choice of C matters
    for c, accuracy in result.val_accuracy_by_c.items():
        assert accuracy == pytest.approx(independent[c])
    assert independent[result.C] == max(independent.values())
    print(f"chosen C={result.C:.3g}, val acc {independent[result.C]:.3f}, test acc1 {result.lp_acc1:.3f}")


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_explicit_c_values_are_all_tried() -> None:
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = splits(seed=2, classes=5, dim=40, separation=0.35, noise=1.0)
    c_values = [1e-3, 1e-1, 10.0]
    result = linear_probe(train_x, train_y, val_x, val_y, test_x, test_y, c_values=c_values)
    assert sorted(result.val_accuracy_by_c) == pytest.approx(c_values)
    independent = {c: sklearn_fit(train_x, train_y, c).score(val_x, val_y) for c in c_values}
    assert independent[result.C] == max(independent.values())


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_without_a_val_split_a_stratified_seeded_one_is_carved_from_train() -> None:
    (train_x, train_y), _, (test_x, test_y) = splits(seed=3, classes=3, dim=16, separation=0.5, noise=1.0)
    carved = linear_probe(train_x, train_y, None, None, test_x, test_y, seed=7, c_values=[1e-2, 1.0, 1e2])
    fit_x, val_x, fit_y, val_y = train_test_split(train_x, train_y, test_size=0.2, stratify=train_y, random_state=7)
    assert np.ptp(np.bincount(val_y, minlength=3)) <= 1  # stratified: every class held out alike
    for c, accuracy in carved.val_accuracy_by_c.items():
        assert accuracy == pytest.approx(sklearn_fit(fit_x, fit_y, c).score(val_x, val_y))
    probe = sklearn_fit(np.r_[fit_x, val_x], np.r_[fit_y, val_y], carved.C)
    assert carved.lp_acc1 == pytest.approx(skm.accuracy_score(test_y, probe.predict(test_x)))
    assert math.isnan(carved.lp_acc5)  # 3 classes


def test_bad_input_names_the_field() -> None:
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = splits(seed=4, classes=3, dim=8, separation=1.0, noise=0.3)
    with pytest.raises(InputError, match="^test_features:"):
        linear_probe(train_x, train_y, val_x, val_y, test_x[:, :4], test_y)
    with pytest.raises(InputError, match="^val_labels:"):
        linear_probe(train_x, train_y, val_x, val_y[:-1], test_x, test_y)
    with pytest.raises(InputError, match="^val_features and val_labels:"):
        linear_probe(train_x, train_y, val_x, None, test_x, test_y)
    with pytest.raises(InputError, match="^train_labels:"):
        linear_probe(train_x[:4], np.array([0, 1, 2, 2]), None, None, test_x, test_y)  # classes with one sample
