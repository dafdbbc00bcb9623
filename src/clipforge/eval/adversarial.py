"""Adversarial robustness of zero-shot classification: pixel-space FGSM and PGD, and single-patch attacks.

- FGSM (Goodfellow, Shlens, Szegedy, ICLR 2015) and L∞ PGD with a random start (Madry et al., ICLR 2018) on the
  cross-entropy of the zero-shot logits ``100 · cos(image, class)``, at ε ∈ {1, 2, 4}/255 on [0, 1] pixels
  (before the model's normalisation). PGD: 10 steps of 2.5·ε/10 (Madry's ratio), projected after each step.
- One grid-aligned patch per image (a random grid cell, seeded), as Gu, Tresp, Qin, "Are Vision Transformers
  Robust to Patch Perturbations?", ECCV 2022: a natural corruption (Gaussian noise σ 0.38, ImageNet-C severity 5,
  inside the patch only) and an adversarial patch (its pixels unconstrained in [0, 1], 50 PGD steps of 0.05 from
  uniform noise). Reported: the fooling rate (predictions that change) and the class token's attention to the
  patch's token in the last block (mean over heads) as a multiple of the uniform 1/N — the paper finds attention
  drawn to adversarial patches and away from naturally corrupted ones.

Not from the papers: these settings (the ECCV paper's budgets were not verified); attacks target the
zero-shot head of the evaluated classes, the adversarial patch the true class.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clipforge.encode import model_input_image
from clipforge.errors import InputError
from clipforge.layers.attention_recorder import recording_attention

EPSILONS = (1, 2, 4)  # in 1/255 of the pixel range
MAX_EPSILON = 64
PGD_STEPS, PGD_RATIO = 10, 2.5
PATCH_STEPS, PATCH_STEP, PATCH_NOISE = 50, 0.05, 0.38

Classifier = Callable[[torch.Tensor], torch.Tensor]


def check_epsilons(epsilons: Sequence[float]) -> list[float]:
    """ε values in 1/255 units, each in (0, 64]; one-line ``InputError`` otherwise."""
    values = [float(value) for value in epsilons]
    bad = [value for value in values if not 0 < value <= MAX_EPSILON]
    if not values or bad:
        raise InputError(f"epsilons: {bad[0] if bad else 'none given'} is out of range (0, {MAX_EPSILON}] (units of 1/255)")
    return values


def model_pixels(model: Any, images: Sequence[Image.Image]) -> torch.Tensor:
    """The [0, 1] pixels [N, 3, H, W] the model sees (after its resize and crop), before normalisation."""
    arrays = [np.asarray(model_input_image(model, image), dtype=np.float32) / 255 for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def zero_shot_classifier(model: torch.nn.Module, head: torch.Tensor) -> Classifier:
    """Logits ``100 · normalise(image) @ head`` [B, C] of [0, 1] pixels [B, 3, H, W], differentiable in the pixels."""
    mean = torch.tensor(model.preprocess_cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.preprocess_cfg.std).view(1, 3, 1, 1)
    weights = head.float()

    def classify(pixels: torch.Tensor) -> torch.Tensor:
        features = model((pixels - mean.to(pixels.device)) / std.to(pixels.device))[0]
        return 100.0 * F.normalize(features.float(), dim=-1) @ weights.to(features.device)

    return classify


def _gradient(classify: Classifier, pixels: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    pixels = pixels.detach().requires_grad_(True)
    return torch.autograd.grad(F.cross_entropy(classify(pixels), labels), pixels)[0]


def fgsm(classify: Classifier, pixels: torch.Tensor, labels: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``clip(x + ε · sign(∇ₓ CE))``."""
    return (pixels + epsilon * _gradient(classify, pixels, labels).sign()).clamp(0, 1).detach()


def pgd(classify: Classifier, pixels: torch.Tensor, labels: torch.Tensor, epsilon: float, steps: int = PGD_STEPS,
        generator: torch.Generator | None = None) -> torch.Tensor:
    """L∞ PGD from a uniform random start in the ε-ball, ``steps`` signed-gradient steps of 2.5·ε/steps."""
    step = PGD_RATIO * epsilon / steps
    start = torch.rand(pixels.shape, generator=generator).to(pixels.device) * 2 - 1
    adversarial = (pixels + epsilon * start).clamp(0, 1)
    for _ in range(steps):
        adversarial = adversarial + step * _gradient(classify, adversarial, labels).sign()
        adversarial = torch.minimum(torch.maximum(adversarial, pixels - epsilon), pixels + epsilon).clamp(0, 1).detach()
    return adversarial


def patch_masks(count: int, image_size: int, patch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One random grid cell per image: masks [count, 1, H, W] and each cell's token index (1 + row·grid + col)."""
    grid = image_size // patch_size
    cells = torch.randint(grid * grid, (count,), generator=generator)
    masks = torch.zeros(count, 1, image_size, image_size)
    for row, cell in enumerate(cells.tolist()):
        top, left = (cell // grid) * patch_size, (cell % grid) * patch_size
        masks[row, :, top : top + patch_size, left : left + patch_size] = 1
    return masks, cells + 1


def natural_patch(pixels: torch.Tensor, masks: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(pixels.shape, generator=generator).to(pixels.device) * PATCH_NOISE
    return (pixels + noise * masks).clamp(0, 1)


def adversarial_patch(classify: Classifier, pixels: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor,
                      generator: torch.Generator) -> torch.Tensor:
    """The patch's pixels optimised (unconstrained in [0, 1]) to raise the cross-entropy of the true class."""
    start = torch.rand(pixels.shape, generator=generator).to(pixels.device)
    adversarial = pixels * (1 - masks) + start * masks
    for _ in range(PATCH_STEPS):
        adversarial = (adversarial + PATCH_STEP * _gradient(classify, adversarial, labels).sign() * masks).clamp(0, 1)
    return adversarial.detach()


@torch.no_grad()
def patch_attention(model: torch.nn.Module, normalise: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor,
                    tokens: torch.Tensor) -> torch.Tensor:
    """The last block's class-token attention to ``tokens`` [B] (mean over heads) times the token count N."""
    with recording_attention(model.visual) as recorder:
        model(normalise(pixels))
    last = recorder.weights[-1].float().mean(dim=1)  # [B, N, N]
    return last[torch.arange(len(tokens)), 0, tokens] * last.shape[-1]


def adversarial_metrics(model: torch.nn.Module, head: torch.Tensor, pixels: torch.Tensor, labels: Sequence[int],
                        epsilons: Sequence[float] = EPSILONS, seed: int = 0, batch_size: int = 32) -> dict[str, float]:
    """Accuracy clean and under FGSM and PGD at each ε (``acc_fgsm@E``, ``acc_pgd@E``, E in 1/255), the patch
    attacks' fooling rates and attention ratios (``patch_*``), on [0, 1] pixels [N, 3, H, W] and class ids."""
    chosen = check_epsilons(epsilons)
    classify = zero_shot_classifier(model, head)
    mean = torch.tensor(model.preprocess_cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.preprocess_cfg.std).view(1, 3, 1, 1)
    device = next(model.parameters()).device

    def normalise(x: torch.Tensor) -> torch.Tensor:
        return (x - mean.to(x.device)) / std.to(x.device)

    generator = torch.Generator().manual_seed(seed)
    targets = torch.as_tensor(list(labels))
    sums: dict[str, float] = {}
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(pixels), batch_size):
            x, y = pixels[start : start + batch_size].to(device), targets[start : start + batch_size].to(device)
            with torch.no_grad():
                clean = classify(x).argmax(dim=1)
            found = {"acc_clean": (clean == y).float()}
            for epsilon in chosen:
                for name, attack in (("fgsm", fgsm), ("pgd", pgd)):
                    options = {"generator": generator} if attack is pgd else {}
                    adversarial = attack(classify, x, y, epsilon / 255, **options)
                    with torch.no_grad():
                        found[f"acc_{name}@{epsilon:g}"] = (classify(adversarial).argmax(dim=1) == y).float()
            masks, tokens = patch_masks(len(x), x.shape[-1], model.visual.cfg.patch_size, generator)
            masks, tokens = masks.to(device), tokens.to(device)
            for name, attacked in (("natural", natural_patch(x, masks, generator)),
                                   ("pgd", adversarial_patch(classify, x, y, masks, generator))):
                with torch.no_grad():
                    found[f"patch_fooling_{name}"] = (classify(attacked).argmax(dim=1) != clean).float()
                found[f"patch_attention_ratio_{name}"] = patch_attention(model, normalise, attacked, tokens)
            found["patch_attention_ratio_clean"] = patch_attention(model, normalise, x, tokens)
            for key, values in found.items():
                sums[key] = sums.get(key, 0.0) + float(values.sum())
    finally:
        model.train(was_training)
    metrics = {key: value / len(pixels) for key, value in sums.items()}
    metrics["patch_attention_ratio"] = metrics["patch_attention_ratio_pgd"]
    return metrics
