"""Affinity mimicking (TinyCLIP Eq. 1–3, MobileCLIP's (1 − λ)·CLIP + λ·KD) against the papers' equations written
out here, open_clip's DistillClipLoss, and a case computed by hand."""

from __future__ import annotations

import math

import open_clip.loss as oc_loss
import pytest
import torch
import torch.nn.functional as F

from clipforge.distill.losses import AffinityMimickingLoss


def softmax_rows(matrix: torch.Tensor) -> torch.Tensor:
    exponentials = torch.exp(matrix - matrix.max(dim=1, keepdim=True).values)
    return exponentials / exponentials.sum(dim=1, keepdim=True)


def affinities(images: torch.Tensor, texts: torch.Tensor, scale: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TinyCLIP Eq. 1: A^{I2T} = softmax(s · I Tᵀ) row-wise, A^{T2I} = softmax(s · T Iᵀ)."""
    return softmax_rows(scale * images @ texts.T), softmax_rows(scale * texts @ images.T)


def cross_entropy(target: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """TinyCLIP Eq. 2: −(1/b) Σ_i Σ_j A_t[i, j] · log A_s[i, j]."""
    batch = target.shape[0]
    total = 0.0
    for i in range(batch):
        for j in range(target.shape[1]):
            total = total - target[i, j] * torch.log(predicted[i, j])
    return total / batch


def paper_loss(student_images, student_texts, student_scale, teacher_images, teacher_texts, teacher_scales, weight):
    """(1 − λ)·L_CLIP + λ·½(L_I2T + L_T2I), teachers averaged after the softmax (MobileCLIP's ensemble)."""
    teacher_images = teacher_images if isinstance(teacher_images, list) else [teacher_images]
    teacher_texts = teacher_texts if isinstance(teacher_texts, list) else [teacher_texts]
    teacher_scales = teacher_scales if isinstance(teacher_scales, list) else [teacher_scales]
    student_i2t, student_t2i = affinities(student_images, student_texts, student_scale)
    pairs = [affinities(i, t, s) for i, t, s in zip(teacher_images, teacher_texts, teacher_scales)]
    teacher_i2t = sum(p[0] for p in pairs) / len(pairs)
    teacher_t2i = sum(p[1] for p in pairs) / len(pairs)
    distill = 0.5 * (cross_entropy(teacher_i2t, student_i2t) + cross_entropy(teacher_t2i, student_t2i))
    batch = student_images.shape[0]
    clip = 0.5 * (-sum(torch.log(student_i2t[i, i]) for i in range(batch)) / batch
                  - sum(torch.log(student_t2i[i, i]) for i in range(batch)) / batch)
    return (1 - weight) * clip + weight * distill


def unit(rows: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(rows, dim, generator=generator, dtype=torch.float64), dim=-1)


def value_and_grads(loss_fn, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    leaves = {name: t.detach().clone().requires_grad_() for name, t in inputs.items()}
    loss = loss_fn(**leaves)
    loss.backward()
    return loss.detach(), {name: leaf.grad for name, leaf in leaves.items()}


def assert_same_value_and_gradients(ours, reference, inputs: dict[str, torch.Tensor]) -> None:
    value, grads = value_and_grads(ours, inputs)
    expected, expected_grads = value_and_grads(reference, inputs)
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12)
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-8, atol=1e-12)


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return {
        "student_images": unit(6, 8, generator),
        "student_texts": unit(6, 8, generator),
        "teacher_images": unit(6, 12, generator),  # teachers may be wider than the student
        "teacher_texts": unit(6, 12, generator),
        "second_images": unit(6, 5, generator),
        "second_texts": unit(6, 5, generator),
    }


@pytest.mark.parametrize("weight", [0.0, 0.25, 1.0])
@pytest.mark.parametrize("local_loss", [True, False])
def test_value_and_gradients_equal_the_papers_equations(batch, weight, local_loss) -> None:
    student = {"image_features": batch["student_images"], "text_features": batch["student_texts"],
               "logit_scale": torch.tensor(50.0, dtype=torch.float64)}
    loss = AffinityMimickingLoss(weight, [50.0], local_loss=local_loss)

    def ours(**kw):
        return loss(**kw, teacher_image_features=batch["teacher_images"], teacher_text_features=batch["teacher_texts"])

    def equations(image_features, text_features, logit_scale):
        return paper_loss(image_features, text_features, logit_scale, batch["teacher_images"], batch["teacher_texts"], 50.0, weight)

    assert_same_value_and_gradients(ours, equations, student)


def test_an_ensemble_averages_the_teachers_distributions_after_the_softmax(batch) -> None:
    student = {"image_features": batch["student_images"], "text_features": batch["student_texts"],
               "logit_scale": torch.tensor(20.0, dtype=torch.float64)}
    loss = AffinityMimickingLoss(0.75, [100.0, 70.0])

    def ours(**kw):
        return loss(**kw, teacher_image_features=[batch["teacher_images"], batch["second_images"]],
                    teacher_text_features=[batch["teacher_texts"], batch["second_texts"]])

    def equations(image_features, text_features, logit_scale):
        return paper_loss(image_features, text_features, logit_scale,
                          [batch["teacher_images"], batch["second_images"]],
                          [batch["teacher_texts"], batch["second_texts"]], [100.0, 70.0], 0.75)

    assert_same_value_and_gradients(ours, equations, student)


def test_a_two_pair_batch_by_hand() -> None:
    """Student = teacher, orthogonal pairs, scale log 3: every row's distribution is (3, 1)/4 or (1, 3)/4, so the
    distillation term is the entropy H = −(¾ log ¾ + ¼ log ¼) and InfoNCE is −log ¾."""
    images = torch.eye(2, dtype=torch.float64)
    texts = torch.eye(2, dtype=torch.float64)
    scale = math.log(3.0)
    loss = AffinityMimickingLoss(0.5, [scale], local_loss=False)
    value = loss(images, texts, torch.tensor(scale, dtype=torch.float64), teacher_image_features=images, teacher_text_features=texts)
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert value.item() == pytest.approx(0.5 * -math.log(0.75) + 0.5 * entropy, rel=1e-12)
    assert loss.parts == pytest.approx({"loss_clip": -math.log(0.75), "loss_distill": entropy}, rel=1e-12)


@pytest.mark.parametrize(("weight", "part"), [(0.0, "contrastive_loss"), (1.0, "distill_loss")])
def test_the_two_terms_are_open_clips_distillation_loss(batch, weight, part) -> None:
    """open_clip's DistillClipLoss (PR #399) with the same teacher scale: its two terms are ours at λ = 0 and 1."""
    student = {"image_features": batch["student_images"], "text_features": batch["student_texts"],
               "logit_scale": torch.tensor(14.0, dtype=torch.float64)}
    teacher_scale = torch.tensor(31.0, dtype=torch.float64)
    loss = AffinityMimickingLoss(weight, [31.0], local_loss=False)
    reference = oc_loss.DistillClipLoss()

    def ours(**kw):
        return loss(**kw, teacher_image_features=batch["teacher_images"], teacher_text_features=batch["teacher_texts"])

    def theirs(**kw):
        return reference(**kw, dist_image_features=batch["teacher_images"], dist_text_features=batch["teacher_texts"],
                         dist_logit_scale=teacher_scale, output_dict=True)[part]

    assert_same_value_and_gradients(ours, theirs, student)


def test_teacher_count_must_match_its_scales(batch) -> None:
    loss = AffinityMimickingLoss(1.0, [50.0, 50.0])
    with pytest.raises(ValueError, match="2 teacher scales but 1 image and 1 text feature sets"):
        loss(batch["student_images"], batch["student_texts"], torch.tensor(50.0, dtype=torch.float64),
             teacher_image_features=batch["teacher_images"], teacher_text_features=batch["teacher_texts"])
