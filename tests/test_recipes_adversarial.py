"""Adversarial evaluation: FGSM against the gradient of a linear classifier worked out by hand, PGD's ε-ball,
the patch grid, the attention ratio against ``clipforge.explain``'s attention weights, clean accuracy against
the encoder's zero-shot accuracy, and out-of-range ε as one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import clipforge
from clipforge.cli import main
from clipforge.encode import embed_images
from clipforge.errors import InputError
from clipforge.eval.adversarial import (
    check_epsilons,
    fgsm,
    model_pixels,
    patch_attention,
    patch_masks,
    pgd,
)
from clipforge.eval.datasets import load_dataset
from clipforge.eval.runner import Evaluator
from clipforge.eval.zeroshot import zero_shot_head, zero_shot_logits
from clipforge.explain.rollout import attention_weights


def linear_fixture():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(3 * 4 * 4, 5, generator=generator, dtype=torch.float64)
    pixels = torch.rand(6, 3, 4, 4, generator=generator, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    return (lambda x: x.flatten(1) @ weight), weight, pixels, labels


def test_fgsm_steps_along_the_sign_of_the_hand_gradient() -> None:
    classify, weight, pixels, labels = linear_fixture()
    logits = pixels.flatten(1) @ weight
    probabilities = torch.softmax(logits, dim=1)
    onehot = torch.nn.functional.one_hot(labels, 5).double()
    gradient = ((probabilities - onehot) @ weight.T / len(labels)).view_as(pixels)  # d mean-CE / dx
    expected = (pixels + 0.03 * gradient.sign()).clamp(0, 1)
    torch.testing.assert_close(fgsm(classify, pixels, labels, 0.03), expected)


def test_pgd_stays_in_the_ball_and_raises_the_loss() -> None:
    classify, _, pixels, labels = linear_fixture()
    adversarial = pgd(classify, pixels, labels, 0.05, generator=torch.Generator().manual_seed(1))
    assert (adversarial - pixels).abs().max() <= 0.05 + 1e-12 and adversarial.min() >= 0 and adversarial.max() <= 1
    loss = torch.nn.functional.cross_entropy
    assert loss(classify(adversarial), labels) > loss(classify(fgsm(classify, pixels, labels, 0.05)), labels) * 0.99
    assert loss(classify(adversarial), labels) > loss(classify(pixels), labels)


def test_patch_masks_cover_one_grid_cell_each() -> None:
    masks, tokens = patch_masks(5, 64, 8, torch.Generator().manual_seed(0))
    for mask, token in zip(masks, tokens.tolist(), strict=True):
        rows, cols = torch.nonzero(mask[0], as_tuple=True)
        assert len(rows) == 64 and rows.min() % 8 == 0 and cols.min() % 8 == 0
        assert rows.max() - rows.min() == 7 and cols.max() - cols.min() == 7
        assert token == 1 + (rows.min().item() // 8) * 8 + cols.min().item() // 8


def test_attention_ratio_and_clean_accuracy_against_independent_paths(tiny) -> None:
    dataset = load_dataset("synthetic:shape", samples=12)
    images = list(dataset.images[:6])
    pixels = model_pixels(tiny, images)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (tiny.preprocess_cfg.mean, tiny.preprocess_cfg.std))
    tokens = torch.tensor([1, 5, 9, 20, 33, 64])
    found = patch_attention(tiny, lambda x: (x - mean) / std, pixels, tokens)
    last = attention_weights(tiny, (pixels - mean) / std)[-1].mean(dim=1)
    torch.testing.assert_close(found, last[torch.arange(6), 0, tokens] * last.shape[-1])
    metrics = Evaluator(tiny, workers=0).adversarial(dataset.subset(range(6)), samples=6, epsilons=(2,))
    features = torch.from_numpy(embed_images(tiny, images, workers=0, progress=False).embeddings)
    logits = zero_shot_logits(features, zero_shot_head(tiny, dataset.classnames, dataset.templates))
    expected = (logits.argmax(1) == torch.tensor(dataset.labels[:6])).float().mean().item()
    assert metrics.metrics["acc_clean"] == pytest.approx(expected)
    assert metrics.metrics["acc_pgd@2"] <= metrics.metrics["acc_clean"]
    assert set(metrics.metrics) >= {"acc_fgsm@2", "patch_fooling_natural", "patch_fooling_pgd", "patch_attention_ratio"}


def test_epsilon_out_of_range_is_one_line(tmp_path: Path, capsys) -> None:
    with pytest.raises(InputError, match=r"^epsilons: 300.0 is out of range"):
        check_epsilons([1, 300])
    torch.manual_seed(0)
    model = tmp_path / "micro.safetensors"
    clipforge.save(clipforge.load(str(Path(__file__).parent / "data" / "micro-clip.json")), model)
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "adversarial", "--model", str(model), "--data", "synthetic:shape", "--epsilons", "1,0",
              "--out", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "epsilons: 0.0 is out of range" in err and len(err.strip().splitlines()) == 1
    assert np.isfinite(check_epsilons([0.5, 64])).all()
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "adversarial", "--model", str(model), "--data", "synthetic:shape", "--epsilons", "3",
              "--samples", "8", "--robustness-samples", "4", "--workers", "0", "--out", str(tmp_path / "eval")])
    assert exit_info.value.code == 0
    record = json.loads(next((tmp_path / "eval").glob("*adversarial_robustness.json")).read_text())
    assert {"acc_clean", "acc_fgsm@3", "acc_pgd@3", "patch_attention_ratio"} <= set(record["metrics"])
