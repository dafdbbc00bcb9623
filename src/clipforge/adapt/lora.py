"""CLIP-LoRA: low-rank updates of the q, k, v projections of every block of both towers.

Zanella & Ben Ayed, "Low-Rank Few-Shot Adaptation of Vision-Language Models", CVPR Workshops 2024; official
code MaxZanella/CLIP-LoRA (``lora.py``, ``loralib/layers.py``, ``run_utils.py``).

The attention is split into q/k/v linears (``clipforge.adapt.linear_form``) and ``peft`` adds its LoRA layers
to them: rank r = 2, ``lora_alpha`` = 1, scaling α/√r (``use_rslora``, the official code's ``alpha/sqrt(r)``),
dropout 0.25 on the LoRA branch's input, A Kaiming-uniform and B = 0 (the model starts exactly zero-shot).
AdamW (lr 2e-4, weight decay 1e-2, betas 0.9/0.999), cosine to 1e-6 over ``500 × K`` iterations of 32 images
(RandomResizedCrop(scale 0.08–1) and flip), CE on ``exp(logit_scale) · cos``; no validation. The updates are
merged into the weights and the attention fused again: the result is a plain clipforge checkpoint.

Differences: class embeddings average the dataset's templates (one template, as the official code uses: the
same); fp32 unless ``amp`` (the official code runs fp16 autocast on a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from clipforge.adapt.linear_form import fuse_attention, split_attention
from clipforge.adapt.method import (
    AT_LEAST_ONE,
    BELOW_ONE,
    POSITIVE,
    FitInputs,
    Fitted,
    Method,
    Range,
)
from clipforge.adapt.weights import (
    TRAINING_RANGES,
    train_weights,
    trainable_copy,
    tuned_model,
    tuned_text,
)
from clipforge.errors import ConfigError

ENCODERS = ("both", "vision", "text")


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 2
    alpha: float = 1.0
    dropout: float = 0.25
    params: str = "q,k,v"
    encoder: str = "both"
    lr: float = 2e-4
    weight_decay: float = 1e-2
    iterations_per_shot: int = 500
    batch_size: int = 32
    crop_scale: tuple[float, float] = (0.08, 1.0)
    flip: bool = True
    amp: bool = False

    RANGES: ClassVar[dict[str, Range]] = {**TRAINING_RANGES, "rank": AT_LEAST_ONE, "alpha": POSITIVE, "dropout": BELOW_ONE}


def add_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """``model`` (in place) with split attention and peft LoRA layers on the chosen projections; only they train."""
    from peft import LoraConfig, inject_adapter_in_model

    names = [part.strip() for part in settings.params.split(",")]
    if not names or any(name not in ("q", "k", "v") for name in names):
        raise ConfigError(f"clip-lora.params: {settings.params!r} is not a comma-separated subset of q,k,v")
    if settings.encoder not in ENCODERS:
        raise ConfigError(f"clip-lora.encoder: {settings.encoder!r} is not one of {', '.join(ENCODERS)}")
    split_attention(model)
    targets = [name for name, _ in model.named_modules()
               if name.rsplit(".", 1)[-1] in {f"{n}_proj" for n in names} and _in_encoder(name, settings.encoder)]
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=targets, use_rslora=True)
    return inject_adapter_in_model(config, model)


def _in_encoder(name: str, encoder: str) -> bool:
    vision = name.startswith("visual.")
    return encoder == "both" or (encoder == "vision") == vision


def merged_linear(module: nn.Module) -> nn.Linear:
    """A peft LoRA layer with its update merged into the base weight (``W + s·BA``), or the module itself."""
    if hasattr(module, "base_layer"):
        module.merge()
        return module.base_layer
    return module


def fit_lora(inputs: FitInputs, settings: LoraSettings) -> Fitted:
    tuned = add_lora(trainable_copy(inputs.model, "clip-lora"), settings)
    parameters = [parameter for name, parameter in tuned.named_parameters() if "lora_" in name]
    loss, steps = train_weights(inputs, tuned, parameters, settings, tuned_text(tuned, inputs), "CLIP-LoRA", eta_min=1e-6)
    fuse_attention(tuned, merged_linear)
    return Fitted({}, {"final_loss": loss, "steps": steps}, model=tuned_model(tuned, "clip-lora", inputs.model, inputs.model_source))


LORA = Method("clip-lora", "weights", LoraSettings, fit_lora, None,
              "low-rank updates of q, k, v in both towers (Zanella & Ben Ayed, CVPRW 2024)")
