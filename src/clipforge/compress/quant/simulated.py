"""Simulated ("fake") quantization of CLIP's towers, to study accuracy against bit width (not speed).

    from clipforge.compress.quant.mixed_precision import block_relevance
    from clipforge.compress.quant.simulated import quantization_study, simulate_quantization
    sim = simulate_quantization(model, 4, 4, "shift_log2", calibration_batches=batches)
    sim = simulate_quantization(model, 4, 4, "shift_log2", calibration_batches=batches,
                                mixed_precision=block_relevance(model, batches))
    rows = quantization_study(model, eval_fn, batches, bits=(8, 6, 4))

What is quantized, as the ViT PTQ papers simulate it (FQ-ViT, Lin et al., IJCAI 2022; I&S-ViT, Zhong et al. 2023): the weights of every linear layer
(uniform, per output channel), the input of every linear layer (uniform, one range per tensor) and the
post-softmax attention probabilities (``uniform``, FQ-ViT's ``log2`` or I&S-ViT's ``shift_log2``). LayerNorm,
GELU, the patch embedding and the attention logits stay in float. Uniform ranges come from I&S-ViT's
percentile search: the candidate clipping percentile with the least squared error wins (zysxmu/IaS-ViT
9300cea, ``quant/quantizer.py::UniformQuantizer``). Activation ranges are calibrated "in parallel" as in
PTQ4ViT: every layer sees the float outputs of the layers before it. The image tower is always quantized,
the text tower when ``text_batches`` (token ids) are given to calibrate it.

Mixed precision (``mixed_precision=block_relevance(...)``) follows LRP-QViT; see ``mixed_precision.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.compress.quant.int8 import (
    LinearQkvAttention,
    image_batches,
    quantized_towers,
    replace_linears,
    to_linear_form,
    token_batches,
    tower_modules,
)
from clipforge.compress.quant.mixed_precision import (
    MAX_BITS,
    MIN_BITS,
    block_bits,
    block_relevance,
    tower_blocks,
)
from clipforge.encode import model_device
from clipforge.errors import ConfigError
from clipforge.layers.attention import AttentionOutput
from clipforge.models.clip import CLIP

SOFTMAX_QUANTIZERS = ("uniform", "log2", "shift_log2")
WEIGHT_PERCENTILES = (0.97, 0.98, 0.99, 0.995, 0.9995, 0.9997, 0.9999, 0.99995, 0.99999)  # I&S-ViT, weights
ACTIVATION_PERCENTILES = (0.999, 0.9999, 0.99999, 1.0)  # I&S-ViT's, plus the full range (see ActivationQuantizer)
SHIFT_CANDIDATES = (0.001, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.1, 0.2, 0.5, 1.0)  # I&S-ViT, SULQ's η
SAMPLE_SIZE = 2**18  # calibration values kept per quantizer (a uniform random sample; extremes kept exactly)


# ------------------------------------------------------------------------------------------- quantizers


def uniform_quantize(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric uniform fake quantization of ``x`` to ``2^bits`` levels spanning ``[low, high]`` (broadcast).

    ``Δ = (high - low) / (2^b - 1)``, zero point ``z = round(-low / Δ)``, ``x̂ = (clamp(round(x/Δ) + z, 0, 2^b - 1) - z)·Δ``.
    """
    delta = ((high - low) / (2**bits - 1)).clamp_min(torch.finfo(torch.float32).tiny)
    zero_point = torch.round(-low / delta)
    levels = torch.clamp(torch.round(x / delta) + zero_point, 0, 2**bits - 1)
    return (levels - zero_point) * delta


def search_uniform_range(
    x: torch.Tensor, bits: int, percentiles: Iterable[float], per_channel: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """I&S-ViT's range search: for each percentile p clip to ``[quantile(1-p), quantile(p)]``, keep the least MSE.

    ``per_channel``: one range per row (output channel) of ``x``, shapes [rows, 1]; otherwise one range, shape [1, 1].
    """
    values = x.detach().float()
    values = values.reshape(values.shape[0], -1) if per_channel else values.reshape(1, -1)
    best_error = torch.full((values.shape[0], 1), math.inf, device=values.device)
    best_low, best_high = torch.zeros_like(best_error), torch.zeros_like(best_error)
    percentiles = list(percentiles)
    quantiles = torch.tensor([*percentiles, *(1.0 - p for p in percentiles)], device=values.device)
    bounds = torch.quantile(values, quantiles, dim=1, keepdim=True)  # [2P, rows, 1], one sort for all
    for index in range(len(percentiles)):
        high, low = bounds[index], bounds[len(percentiles) + index]
        error = (values - uniform_quantize(values, low, high, bits)).pow(2).mean(dim=1, keepdim=True)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_low, best_high = torch.where(better, low, best_low), torch.where(better, high, best_high)
    return best_low, best_high


def log2_quantize(p: torch.Tensor, bits: int) -> torch.Tensor:
    """FQ-ViT's log2 quantizer of probabilities (megvii-research/FQ-ViT ``ptq/quantizer/log2.py``).

    ``q = round(-log2 p)``; ``p̂ = 2^-q`` for ``q < 2^b`` (q clamped at 0), else 0: the whole tail below
    ``2^-(2^b - 0.5)`` becomes zero.
    """
    exponent = torch.round(-torch.log2(p))
    levels = 2**bits
    return torch.where(exponent >= levels, 0.0, torch.exp2(-exponent.clamp(0, levels - 1)))


def shift_log2_quantize(p: torch.Tensor, bits: int, shift: float, low: float, high: float) -> torch.Tensor:
    """I&S-ViT's shift-uniform-log2 quantizer (SULQ), forward pass of zysxmu/IaS-ViT ``LogSqrt2Quantizer``.

    ``y = log2(p + η)`` is quantized uniformly on ``[low, high]`` with ``Δ = (high - low) / 2^b`` and levels
    clamped to ``[0, 2^b]``, then ``p̂ = 2^round(q·Δ + low) - η``. Faithful to the official code, whose forward
    pass uses ``2^b`` steps where its calibration (``calibrate_shift_log2``) uses ``2^b - 1``, and rounds the
    exponent, so the outputs are powers of two minus η.
    """
    return _shifted_log2_grid(p, shift, low, high, 2**bits)


def calibrate_shift_log2(
    p: torch.Tensor, bits: int, minimum: float | None = None, maximum: float | None = None
) -> tuple[float, float, float]:
    """SULQ's calibration: the shift η from I&S-ViT's candidates with least squared error → ``(η, low, high)``.

    ``low, high`` are the extremes of ``log2(p + η)`` (from ``minimum``/``maximum`` of the data when ``p`` is a
    sample of it); candidates are scored with ``2^b - 1`` steps, as the official ``quantize``.
    """
    values = p.detach().float().reshape(-1)
    minimum = float(values.min()) if minimum is None else minimum
    maximum = float(values.max()) if maximum is None else maximum
    scored = []
    for shift in SHIFT_CANDIDATES:
        low, high = math.log2(minimum + shift), math.log2(maximum + shift)
        error = float((values - _shifted_log2_grid(values, shift, low, high, 2**bits - 1)).pow(2).mean())
        scored.append((error, shift, low, high))
    _, shift, low, high = min(scored, key=lambda candidate: candidate[0])  # the first of equals, as the paper's ``<``
    return shift, low, high


def _shifted_log2_grid(p: torch.Tensor, shift: float, low: float, high: float, steps: int) -> torch.Tensor:
    delta = max(high - low, torch.finfo(torch.float32).tiny) / steps
    levels = torch.clamp(torch.round((torch.log2(p + shift) - low) / delta), 0, steps)
    return torch.exp2(torch.round(levels * delta + low)) - shift


class CalibrationSample:
    """Exact minimum and maximum of every value seen, and a uniform random sample (with replacement) of them."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator
        self.values: torch.Tensor | None = None
        self.seen = 0
        self.minimum, self.maximum = math.inf, -math.inf

    def add(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1).float()
        self.minimum, self.maximum = min(self.minimum, float(flat.min())), max(self.maximum, float(flat.max()))
        total = self.seen + flat.numel()
        new_share = min(flat.numel(), round(SAMPLE_SIZE * flat.numel() / total))
        kept = flat.new_zeros(0) if self.values is None else self.values
        self.values = torch.cat([self._subset(kept, SAMPLE_SIZE - new_share), self._subset(flat, new_share)])
        self.seen = total

    def _subset(self, values: torch.Tensor, count: int) -> torch.Tensor:
        if count >= values.numel():
            return values
        return values[torch.randint(values.numel(), (count,), generator=self.generator).to(values.device)]


class CalibratedQuantizer(nn.Module):
    """A fake quantizer that records its inputs while calibrating and quantizes them afterwards."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits
        self.sample: CalibrationSample | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sample is not None:
            self.sample.add(x)
            return x
        return self.quantize(x)

    def needs_calibration(self) -> bool:
        return True

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def finish_calibration(self) -> None:
        raise NotImplementedError


class ActivationQuantizer(CalibratedQuantizer):
    """Per-tensor uniform quantization of a linear layer's input; range by the activation percentile search.

    I&S-ViT searches the percentiles 0.999, 0.9999 and 0.99999 only; the full observed range is added as a
    fourth candidate, so that where rounding noise is negligible (16 bits) no outlier is clipped.
    """

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return uniform_quantize(x, self.low, self.high, self.bits)

    def finish_calibration(self) -> None:
        extremes = self.sample.values.new_tensor([self.sample.minimum, self.sample.maximum])
        values = torch.cat([self.sample.values, extremes])
        low, high = search_uniform_range(values, self.bits, ACTIVATION_PERCENTILES)
        self.register_buffer("low", low.reshape(()))
        self.register_buffer("high", high.reshape(()))
        self.sample = None


class SoftmaxQuantizer(CalibratedQuantizer):
    """Post-softmax attention probabilities: ``uniform`` on [0, 1], FQ-ViT's ``log2``, or I&S-ViT's ``shift_log2``."""

    def __init__(self, kind: str, bits: int) -> None:
        super().__init__(bits)
        self.kind = kind
        self.shift = self.low = self.high = 0.0

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "uniform":
            return uniform_quantize(x, x.new_tensor(0.0), x.new_tensor(1.0), self.bits)
        if self.kind == "log2":
            return log2_quantize(x, self.bits)
        return shift_log2_quantize(x, self.bits, self.shift, self.low, self.high)

    def needs_calibration(self) -> bool:
        return self.kind == "shift_log2"

    def finish_calibration(self) -> None:
        sample, self.sample = self.sample, None
        self.shift, self.low, self.high = calibrate_shift_log2(sample.values, self.bits, sample.minimum, sample.maximum)


# ---------------------------------------------------------------------------------------- layers


class FakeQuantLinear(nn.Module):
    """A linear layer with per-output-channel uniform fake-quantized weights and a fake-quantized input."""

    def __init__(self, linear: nn.Linear, w_bits: int, a_bits: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.w_bits = w_bits
        self.input_quantizer = ActivationQuantizer(a_bits)

    def quantize_weight(self) -> None:
        low, high = search_uniform_range(self.weight, self.w_bits, WEIGHT_PERCENTILES, per_channel=True)
        with torch.no_grad():
            self.weight.copy_(uniform_quantize(self.weight.float(), low, high, self.w_bits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quantizer(x), self.weight, self.bias)


class FakeQuantAttention(LinearQkvAttention):
    """Attention that computes its probabilities explicitly (no SDPA) and fake-quantizes them before ``A·V``."""

    def __init__(self, attention: LinearQkvAttention, softmax_quantizer: SoftmaxQuantizer) -> None:
        super().__init__(attention.qkv, attention.out_proj, attention.heads)
        self.softmax_quantizer = softmax_quantizer

    def forward(
        self,
        x: torch.Tensor,
        attn_bias: torch.Tensor | None = None,
        *,
        is_causal: bool = False,
        return_keys: bool = False,
        return_weights: bool = False,
        first_query_only: bool = False,
    ) -> AttentionOutput:
        q, k, v, attn_bias = self.split_heads(x, attn_bias, is_causal=is_causal, first_query_only=first_query_only)
        weights = self.softmax_quantizer(self._weights(q, k, attn_bias, is_causal))
        return AttentionOutput(self.merge_heads(weights @ v), k if return_keys else None, weights if return_weights else None)


# -------------------------------------------------------------------------------------- the model


def simulate_quantization(
    model: CLIP,
    w_bits: int,
    a_bits: int,
    softmax_quantizer: str = "uniform",
    *,
    calibration_batches: Iterable[torch.Tensor],
    mixed_precision: Mapping[str, float] | None = None,
    text_batches: Iterable[torch.Tensor] | None = None,
) -> CLIP:
    """A fake-quantized copy of ``model`` (the original is untouched), calibrated on ``calibration_batches``.

    ``w_bits``/``a_bits`` (2..16) for weights and for linear inputs and attention probabilities;
    ``mixed_precision``: block relevance (``block_relevance``), making ``w_bits``/``a_bits`` the average over
    each tower's blocks (``allocate_bits``); the projection matrices keep ``w_bits``/``a_bits``.
    """
    if softmax_quantizer not in SOFTMAX_QUANTIZERS:
        raise ConfigError(f"softmax_quantizer: expected one of {SOFTMAX_QUANTIZERS}, got {softmax_quantizer!r}")
    for name, bits in (("w_bits", w_bits), ("a_bits", a_bits)):
        if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
            raise ConfigError(f"{name}: expected an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")
    towers = quantized_towers(text_batches)
    plan = block_bits(model, towers, w_bits, a_bits, mixed_precision)
    simulated = to_linear_form(model).float().eval()
    for tower in towers:
        for name, block in tower_blocks(simulated, tower):
            block_w, block_a = plan[name]
            replace_linears(block, partial(FakeQuantLinear, w_bits=block_w, a_bits=block_a))
            block.attn = FakeQuantAttention(block.attn, SoftmaxQuantizer(softmax_quantizer, block_a))
        replace_linears(tower_modules(simulated, tower)[1], partial(FakeQuantLinear, w_bits=w_bits, a_bits=a_bits))
    _calibrate(simulated, calibration_batches, text_batches)
    return simulated


def _calibrate(model: CLIP, calibration_batches: Iterable[torch.Tensor], text_batches: Iterable[torch.Tensor] | None) -> None:
    device = model_device(model)
    generator = torch.Generator().manual_seed(0)
    quantizers = [m for m in model.modules() if isinstance(m, CalibratedQuantizer) and m.needs_calibration()]
    for quantizer in quantizers:
        quantizer.sample = CalibrationSample(generator)
    with torch.no_grad():
        for pixels in image_batches(calibration_batches):
            model.encode_image(pixels.to(device))
        for tokens in token_batches(text_batches) if text_batches is not None else ():
            model.encode_text(tokens.to(device))
    for quantizer in quantizers:
        quantizer.finish_calibration()
    for module in model.modules():
        if isinstance(module, FakeQuantLinear):
            module.quantize_weight()


# ---------------------------------------------------------------------------------------- study


def quantization_study(
    model: CLIP,
    eval_fn: Callable[[CLIP], float],
    calibration_batches: Iterable[torch.Tensor],
    bits: Iterable[int] = (8, 6, 4),
    *,
    text_batches: Iterable[torch.Tensor] | None = None,
    class_embeddings: torch.Tensor | None = None,
) -> list[dict[str, Any]]:
    """Accuracy (``eval_fn(model)``) of the float model (bits 32) and of each bit width × softmax quantizer.

    Rows ``{w_bits, a_bits, softmax_quantizer, mixed, accuracy}``: per bit width b, WbAb with each softmax
    quantizer, then WbAb with relevance-based mixed precision (``block_relevance``) and ``shift_log2``.
    """
    calibration = list(calibration_batches)
    texts = list(text_batches) if text_batches is not None else None
    rows = [{"w_bits": 32, "a_bits": 32, "softmax_quantizer": None, "mixed": False, "accuracy": float(eval_fn(model))}]
    relevance = block_relevance(model, calibration, text_batches=texts, class_embeddings=class_embeddings)
    settings = [(kind, None) for kind in SOFTMAX_QUANTIZERS] + [("shift_log2", relevance)]
    for b in bits:
        for kind, mixed in settings:
            simulated = simulate_quantization(
                model, b, b, kind, calibration_batches=calibration, mixed_precision=mixed, text_batches=texts
            )
            accuracy = float(eval_fn(simulated))
            rows.append({"w_bits": b, "a_bits": b, "softmax_quantizer": kind, "mixed": mixed is not None, "accuracy": accuracy})
    return rows
