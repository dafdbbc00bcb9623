"""Int8 post-training quantization of both CLIP towers with ``torch.ao.quantization`` (CPU kernels).

    from clipforge.compress.quant.int8 import quantize_dynamic_int8, quantize_static_int8
    fast = quantize_dynamic_int8(model)                         # a copy; int8 weights, activations per batch
    fast = quantize_static_int8(model, calibration_batches)     # a copy; int8 activations with calibrated scales

Every GEMM of both towers becomes int8: the fused q/k/v projection, ``out_proj``, the MLP ``c_fc`` and
``c_proj``, and the two projection matrices ``visual.proj`` / ``text_projection``. ``nn.MultiheadAttention``
keeps its q/k/v weight as a bare parameter that ``quantize_dynamic`` never sees (it swaps ``nn.Linear`` modules only), so
``to_linear_form`` first turns the model into one where every GEMM is an ``nn.Linear`` module: attention
becomes ``LinearQkvAttention`` (q/k/v as ``qkv``), the projection matrices become the towers' ``proj_linear``
and ``text_projection_linear`` modules.
Patch embedding (a convolution), LayerNorm, softmax, GELU and the attention matmuls stay in float.

The quantized copies run on the CPU only (torch.ao's int8 kernels) and their weights are packed for the
engine given (``x86`` by default; ``fbgemm`` and ``onednn`` ran as fast on an AVX512-VNNI CPU), and this sets
``torch.backends.quantized.engine``, which must stay on that engine while they run.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn
from torch.ao import quantization as tq

from clipforge.errors import ConfigError, InputError
from clipforge.layers.attention import Attention
from clipforge.models.clip import CLIP

Tower = Literal["image", "text"]


class LinearQkvAttention(Attention):
    """``Attention`` whose fused q/k/v projection is the module ``qkv`` (an ``nn.Linear``), not a bare parameter."""

    def __init__(self, qkv: nn.Module, out_proj: nn.Module, heads: int) -> None:
        super().__init__(out_proj.in_features, heads)
        del self.in_proj_weight, self.in_proj_bias  # made by Attention.__init__; ``qkv`` replaces them
        self.qkv = qkv
        self.out_proj = out_proj

    @classmethod
    def from_attention(cls, attention: Attention) -> LinearQkvAttention:
        dim = attention.out_proj.in_features
        qkv = nn.Linear(dim, 3 * dim, device=attention.in_proj_weight.device, dtype=attention.in_proj_weight.dtype)
        with torch.no_grad():
            qkv.weight.copy_(attention.in_proj_weight)
            qkv.bias.copy_(attention.in_proj_bias)
        return cls(qkv, attention.out_proj, attention.heads)

    def project_qkv(self, x: torch.Tensor) -> torch.Tensor:
        return self.qkv(x)


def to_linear_form(model: CLIP) -> CLIP:
    """A deep copy of ``model`` in which every GEMM of both towers is an ``nn.Linear`` module; same outputs."""
    if not isinstance(model, CLIP):
        raise ConfigError(f"quantization needs a clipforge CLIP model, got {type(model).__name__}")
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is Attention:
                setattr(parent, name, LinearQkvAttention.from_attention(child))
    model.visual.proj_linear = _as_linear(model.visual.proj)
    model.text_projection_linear = _as_linear(model.text_projection)
    del model.visual.proj, model.text_projection  # the towers now call the linear modules
    return model


def _as_linear(matrix: torch.Tensor) -> nn.Sequential:
    """``x @ W`` (W [in, out]) as an ``nn.Linear`` without bias (weight ``Wᵀ``), inside a container so that
    module-swapping quantizers (``replace_linears``, ``quantize_dynamic``) can replace it."""
    linear = nn.Linear(matrix.shape[0], matrix.shape[1], bias=False, device=matrix.device, dtype=matrix.dtype)
    with torch.no_grad():
        linear.weight.copy_(matrix.detach().T)
    return nn.Sequential(linear)


def is_linear_form(model: CLIP) -> bool:
    """True for a copy made by ``to_linear_form`` (quantized or simulated): its float weights are gone."""
    return model.visual.proj_linear is not None


def tower_modules(model: CLIP, tower: Tower) -> list[nn.Module]:
    """The block stack and the projection of one tower of a model in linear form."""
    if tower == "image":
        return [model.visual.transformer, model.visual.proj_linear]
    return [model.transformer, model.text_projection_linear]


def quantized_towers(text_batches: Iterable[torch.Tensor] | None) -> list[Tower]:
    """The towers a calibrated method quantizes: the image tower, and the text tower when it has text batches."""
    return ["image"] if text_batches is None else ["image", "text"]


def replace_linears(module: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> None:
    """Replace every ``nn.Linear`` (exact type) inside ``module`` by ``make(linear)``."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, make(child))


def image_batches(batches: Iterable[torch.Tensor], field: str = "calibration_batches") -> Iterator[torch.Tensor]:
    """Yield the pixel batches [B, 3, H, W] of ``batches``; a clear error on anything else or on none at all."""
    return _checked(batches, field, "pixels [batch, 3, height, width]", lambda b: b.ndim == 4 and b.shape[1] == 3)


def token_batches(batches: Iterable[torch.Tensor], field: str = "text_batches") -> Iterator[torch.Tensor]:
    """Yield the token-id batches [B, L] of ``batches``; a clear error on anything else or on none at all."""
    return _checked(batches, field, "integer token ids [batch, length]", lambda b: b.ndim == 2 and not b.is_floating_point())


def _checked(
    batches: Iterable[torch.Tensor], field: str, expected: str, valid: Callable[[torch.Tensor], bool]
) -> Iterator[torch.Tensor]:
    count = 0
    for count, batch in enumerate(batches, start=1):
        if not isinstance(batch, torch.Tensor) or not valid(batch):
            found = f"shape {tuple(batch.shape)}" if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise InputError(f"{field}[{count - 1}]: expected {expected}, got {found}")
        yield batch
    if count == 0:
        raise InputError(f"{field}: no batches given; calibration needs at least one")


@contextmanager
def _torch_ao(engine: str) -> Iterator[None]:
    """Select the int8 engine; hide torch.ao's deprecation notice (pytorch/ao supersedes it)."""
    if engine not in torch.backends.quantized.supported_engines:
        raise ConfigError(f"engine: {engine!r} is not one of {torch.backends.quantized.supported_engines}")
    torch.backends.quantized.engine = engine
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions", category=UserWarning)
        yield


def _cpu_float_linear_form(model: CLIP) -> CLIP:
    return to_linear_form(model).float().cpu().eval()


def quantize_dynamic_int8(model: CLIP, *, engine: str = "x86", per_channel: bool = True) -> CLIP:
    """A copy of ``model`` whose every linear layer is int8 (``torch.ao`` dynamic quantization).

    Weights are int8, per output channel by default (``per_channel_dynamic_qconfig``; per tensor with
    ``per_channel=False``); activations are quantized on the fly with each batch's range. No calibration.
    """
    quantized = _cpu_float_linear_form(model)
    qconfig = tq.per_channel_dynamic_qconfig if per_channel else tq.default_dynamic_qconfig
    with _torch_ao(engine):
        return tq.quantize_dynamic(quantized, {nn.Linear: qconfig}, dtype=torch.qint8, inplace=True)


def quantize_static_int8(
    model: CLIP,
    calibration_batches: Iterable[torch.Tensor],
    *,
    text_batches: Iterable[torch.Tensor] | None = None,
    engine: str = "x86",
    observer: Literal["histogram", "minmax"] = "histogram",
) -> CLIP:
    """A copy of ``model`` with statically quantized int8 linear layers (post-training quantization).

    Each linear layer is wrapped in quantize → int8 linear → dequantize (``torch.ao.quantization.QuantWrapper``):
    weights are int8 per output channel, the input of each linear has one int8 scale and zero point fixed by
    observers run on the calibration data (``histogram``: torch.ao's L2-optimal ``HistogramObserver``,
    ``minmax``: the observed range). LayerNorm, softmax, GELU and the attention matmuls stay in float between
    the int8 GEMMs: fully integer attention needs the PTF/log2 machinery of FQ-ViT, which torch.ao lacks.

    ``calibration_batches`` are pixel batches [B, 3, H, W] for the image tower. The text tower is calibrated
    on ``text_batches`` (token ids [B, L]) when given, otherwise its linears get dynamic int8 quantization.
    """
    if observer not in ("histogram", "minmax"):
        raise ConfigError(f"observer: expected 'histogram' or 'minmax', got {observer!r}")
    quantized = _cpu_float_linear_form(model)
    with _torch_ao(engine):
        # torch.ao's defaults for x86/fbgemm keep activations to 7 bits (no int16 overflow in AVX2 kernels)
        quant_max = 127 if engine in ("x86", "fbgemm") else 255
        activation = tq.HistogramObserver if observer == "histogram" else tq.MinMaxObserver
        qconfig = tq.QConfig(
            activation=activation.with_args(dtype=torch.quint8, quant_min=0, quant_max=quant_max),
            weight=tq.default_per_channel_weight_observer,
        )
        for tower in quantized_towers(text_batches):
            for module in tower_modules(quantized, tower):
                replace_linears(module, lambda linear: _wrapped(linear, qconfig))
        tq.prepare(quantized, inplace=True)
        with torch.no_grad():
            for pixels in image_batches(calibration_batches):
                quantized.encode_image(pixels.cpu())
            if text_batches is not None:
                for tokens in token_batches(text_batches):
                    quantized.encode_text(tokens.cpu())
        tq.convert(quantized, inplace=True)
        if text_batches is None:
            for module in tower_modules(quantized, "text"):
                tq.quantize_dynamic(module, {nn.Linear: tq.per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
    return quantized


def _wrapped(linear: nn.Linear, qconfig: tq.QConfig) -> tq.QuantWrapper:
    wrapper = tq.QuantWrapper(linear)
    wrapper.qconfig = qconfig
    return wrapper
