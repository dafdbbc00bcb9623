"""The feature-space adaptation methods against independent references.

GDA: class means, shared covariance, precision and logits computed here with numpy, and scikit-learn's
``LinearDiscriminantAnalysis`` where its shrinkage equals GDA's. Tip-Adapter: the affinity and the logits of
the paper's formula written out here; α = 0 gives zero-shot. Few-shot draws: counted by hand.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

import clipforge
from clipforge.adapt import FeatureCache, fit, sample_few_shot
from clipforge.adapt.gda import GdaHead, gaussian_discriminant
from clipforge.adapt.tip_adapter import TipAdapterHead
from clipforge.errors import ConfigError, InputError
from clipforge.eval.datasets import folder_dataset

MICRO = str(Path(__file__).parent / "data" / "micro-clip.json")


@pytest.fixture(scope="module")
def micro() -> clipforge.CLIP:
    torch.manual_seed(0)
    return clipforge.load(MICRO)


def clustered_features(classes: int = 3, per_class: int = 20, dim: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 2
    labels = np.repeat(np.arange(classes), per_class)
    return centres[labels] + rng.normal(size=(len(labels), dim)), labels


def test_gda_equals_numpy() -> None:
    x, y = clustered_features()
    n, d = x.shape
    means = np.stack([x[y == c].mean(0) for c in range(3)])
    z = x - means[y]
    s = z.T @ z / (n - 1)
    precision = d * np.linalg.inv((n - 1) * s + np.trace(s) * np.eye(d))
    weight = means @ precision
    bias = np.log(1 / 3) - 0.5 * np.einsum("cd,de,ce->c", means, precision, means)
    ours_w, ours_b = gaussian_discriminant(torch.from_numpy(x).float(), torch.from_numpy(y), 3)
    np.testing.assert_allclose(ours_w.numpy(), weight, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours_b.numpy(), bias, rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)
    text = F.normalize(torch.randn(3, d), dim=-1)
    f = F.normalize(torch.randn(5, d), dim=-1)
    head = GdaHead(ours_w, ours_b, text, alpha=0.3)
    expected = 100 * f.numpy() @ text.numpy().T + 0.3 * (f.numpy() @ weight.T + bias)
    np.testing.assert_allclose(head.logits(f).numpy(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(GdaHead(ours_w, ours_b, text, alpha=0.0).logits(f), 100 * f @ text.T, rtol=0, atol=0)


def test_gda_matches_scikit_learn_lda_at_the_same_shrinkage() -> None:
    """GDA's precision D·(ZᵀZ + tr(S) I)⁻¹ is c·Σ⁻¹ for sklearn's shrunk Σ = (1-s)Σ_emp + s·tr(Σ_emp)/D·I
    with s = D / (N - 1 + D) and c = D(1 - s)/N (balanced classes: sklearn's prior-weighted class covariances
    are the pooled one), so W = coef_ · c and b - log(1/C) = (intercept_ - log(1/C)) · c."""
    x, y = clustered_features(classes=4, per_class=15, dim=5, seed=3)
    n, d = x.shape
    shrinkage = d / (n - 1 + d)
    lda = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=shrinkage).fit(x, y)
    scale = d * (1 - shrinkage) / n
    weight, bias = gaussian_discriminant(torch.from_numpy(x), torch.from_numpy(y), 4)
    np.testing.assert_allclose(weight.numpy(), lda.coef_ * scale, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bias.numpy() - np.log(0.25), (lda.intercept_ - np.log(0.25)) * scale, rtol=1e-4, atol=1e-5)
    assert (GdaHead(weight, bias, torch.zeros(4, d), 1.0).discriminant(torch.from_numpy(x).float()).argmax(1).numpy()
            == lda.predict(x)).all()


def test_tip_adapter_affinity_and_logits_are_the_papers_formula() -> None:
    torch.manual_seed(0)
    keys, text = F.normalize(torch.randn(8, 6), dim=-1), F.normalize(torch.randn(3, 6), dim=-1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    f = F.normalize(torch.randn(4, 6), dim=-1)
    head = TipAdapterHead(keys, labels, text, alpha=1.7, beta=5.5)
    affinity = np.exp(-5.5 * (1 - f.numpy() @ keys.numpy().T))  # φ(f Kᵀ) with φ(x) = exp(-β(1 - x))
    values = np.eye(3)[labels.numpy()]
    np.testing.assert_allclose(head.affinity(f).numpy(), affinity, rtol=1e-6)
    expected = 100 * f.numpy() @ text.numpy().T + 1.7 * affinity @ values
    np.testing.assert_allclose(head.logits(f).numpy(), expected, rtol=1e-5, atol=1e-4)
    zero_alpha = TipAdapterHead(keys, labels, text, alpha=0.0, beta=5.5)
    torch.testing.assert_close(zero_alpha.logits(f), 100 * f @ text.T, rtol=0, atol=0)


def write_folder(root: Path, classes: dict[str, int], bad: dict[str, int] | None = None) -> Path:
    for index, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (20 + i, 20), (40 * index, 10 * i, 200 - 30 * index)).save(root / name / f"{i:02d}.png")
        for i in range((bad or {}).get(name, 0)):
            (root / name / f"bad{i}.png").write_bytes(b"not an image")
    return root


def test_few_shot_draws_are_reproducible_nested_and_per_class(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "data", {"a": 9, "b": 7, "c": 8})
    first, again = sample_few_shot(str(root), 3, seed=5), sample_few_shot(str(root), 3, seed=5)
    assert first.train.keys == again.train.keys
    assert [first.train.labels.count(c) for c in range(3)] == [3, 3, 3]
    other = sample_few_shot(str(root), 3, seed=6)
    assert other.train.keys != first.train.keys
    bigger = sample_few_shot(str(root), 5, seed=5)
    assert set(first.train.keys) <= set(bigger.train.keys)  # the 3-shot set sits inside the 5-shot set
    assert bigger.subset(3).train.keys == first.train.keys
    with_val = sample_few_shot(str(root), 3, seed=5, val_shots=2)
    assert with_val.train.keys == first.train.keys and not set(with_val.val.keys) & set(first.train.keys)
    dataset = folder_dataset(root)
    rows = {key.split("#")[1] for key in first.train.keys}
    assert len(rows) == 9 and all(dataset.labels[int(row.split("/")[1])] == int(row.split("/")[0]) for row in rows)


def test_few_shot_bad_inputs(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "data", {"a": 4, "b": 2}, bad={"a": 3})
    shots = sample_few_shot(str(root), 2, seed=1)
    assert len(shots.skipped) <= 3 and all("bad" in name for name, _ in shots.skipped)
    with pytest.raises(InputError, match=r"^.*class 'b' has 2 readable images, fewer than the 3 shots asked$"):
        sample_few_shot(str(root), 3, seed=1)
    with pytest.raises(InputError, match=r"class 'a' has 4 readable images \(3 unreadable skipped\), fewer than the 5"):
        sample_few_shot(str(root), 5, seed=1)
    unreadable = write_folder(tmp_path / "broken", {"ok": 3, "dead": 0}, bad={"dead": 2})
    with pytest.raises(InputError, match=r"class 'dead' has no readable image \(2 unreadable"):
        sample_few_shot(str(unreadable), 1, seed=1)
    with pytest.raises(ConfigError, match="shots: 0 is not a positive integer"):
        sample_few_shot(str(root), 0)


def test_synthetic_draws_come_from_the_adaptation_pool() -> None:
    shots = sample_few_shot("synthetic:shape_all", 1, seed=2)
    assert len(shots.train) == 12 and sorted(shots.train.labels) == list(range(12))
    assert all(int(key.rsplit("/", 1)[1]) >= 0 for key in shots.train.keys)
    with pytest.raises(ConfigError, match="shift"):
        sample_few_shot("synthetic:shape+nonsense", 1)


def test_methods_reproduce_zero_shot_when_their_weight_is_zero(micro: clipforge.CLIP, tmp_path: Path) -> None:
    root = write_folder(tmp_path / "data", {"red": 6, "blue": 6})
    cache = FeatureCache(micro)
    for method in ("tip-adapter", "gda"):
        adapter = fit(method, micro, str(root), 2, seed=1, cache=cache)
        classifier = adapter(micro)
        features = cache.plain(sample_few_shot(str(root), 2, seed=1).train)
        text = classifier.head.text
        classifier.head.alpha = 0.0
        torch.testing.assert_close(classifier.logits(features), 100 * features @ text.T, rtol=0, atol=0)


def test_clap_multipliers_and_zero_shot_start(micro: clipforge.CLIP, tmp_path: Path) -> None:
    from clipforge.adapt.clap import PrototypeHead, zero_shot_multipliers

    torch.manual_seed(1)
    features, text = F.normalize(torch.randn(10, 4), dim=-1), F.normalize(torch.randn(2, 4), dim=-1)
    labels = torch.tensor([0, 1] * 5)
    probabilities = np.exp(30 * features.numpy() @ text.numpy().T)
    probabilities /= probabilities.sum(1, keepdims=True)
    expected = [probabilities[labels.numpy() == c, c].mean() for c in range(2)]
    np.testing.assert_allclose(zero_shot_multipliers(features, labels, text, 30.0).numpy(), expected, rtol=1e-5)
    torch.testing.assert_close(PrototypeHead(text, 30.0).logits(features), 30 * features @ text.T)  # ZS-LP at step 0
    root = write_folder(tmp_path / "data", {"red": 4, "blue": 4})
    adapter = fit("clap", micro, str(root), 2, settings={"epochs": 3, "augment_epoch": 2})
    assert adapter.record.tensors["prototypes"].shape == (2, micro.config.embed_dim)


def test_clap_starts_from_the_raw_text_embeddings(micro: clipforge.CLIP, tmp_path: Path) -> None:
    """CLAP's prototypes start at each class's mean *unnormalised* prompt embedding (the official
    ``_get_base_text_features``), here from the text tower called directly; one epoch is one warm-up step at
    1e-5, so the fitted prototypes are still that base, not the normalised zero-shot head."""
    root = write_folder(tmp_path / "data", {"red": 4, "blue": 4})
    shots = sample_few_shot(str(root), 2, seed=1)
    with torch.no_grad():
        base = torch.stack([
            micro.encode_text(micro.tokenize([template.format(c=name) for template in shots.templates])).mean(dim=0)
            for name in shots.classnames
        ])
    assert (base.norm(dim=-1) - 1).abs().min() > 0.1  # the scale differs from the unit head on this model
    adapter = fit("clap", micro, str(root), 2, seed=1, settings={"epochs": 1, "augment_epoch": 1})
    torch.testing.assert_close(adapter.record.tensors["prototypes"], base, atol=1e-3, rtol=0)


def test_linear_probe_is_scikit_learns_probe(micro: clipforge.CLIP, tmp_path: Path) -> None:
    from sklearn.linear_model import LogisticRegression

    root = write_folder(tmp_path / "data", {"a": 5, "b": 5, "c": 5})
    cache = FeatureCache(micro)
    adapter = fit("linear-probe", micro, str(root), 3, seed=4, cache=cache, settings={"val_shots": 0})
    shots = sample_few_shot(str(root), 3, seed=4)
    x = cache.plain(shots.train).double().numpy()
    reference = LogisticRegression(C=1.0, max_iter=1000).fit(x, shots.train.labels)
    logits = adapter(micro).logits(torch.from_numpy(x).float())
    np.testing.assert_allclose(logits.numpy(), reference.decision_function(x), rtol=1e-4, atol=1e-4)
