"""Int8 quantization (torch.ao dynamic and static) and simulated quantization of both towers.

References: the float model's own features (cosine), module types after conversion, quantizer outputs
computed by hand from the papers' formulas (FQ-ViT log2, I&S-ViT shift-uniform-log2), a numpy transcription
of I&S-ViT's calibration loop, and brute-force enumeration for the bit allocation.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.nn.quantized import Linear as StaticInt8Linear
from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

import clipforge
from clipforge.compress.quant.int8 import (
    quantize_dynamic_int8,
    quantize_static_int8,
    to_linear_form,
)
from clipforge.compress.quant.mixed_precision import (
    MIN_BITS,
    allocate_bits,
    block_relevance,
)
from clipforge.compress.quant.simulated import (
    SHIFT_CANDIDATES,
    FakeQuantAttention,
    FakeQuantLinear,
    calibrate_shift_log2,
    log2_quantize,
    quantization_study,
    shift_log2_quantize,
    simulate_quantization,
    uniform_quantize,
)
from clipforge.errors import ConfigError, InputError

EOT = 49407


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40000, (batch, length), generator=generator)
    ids[:, 0] = 49406
    ends = torch.randint(2, length, (batch,), generator=generator)
    for row, end in enumerate(ends):
        ids[row, end] = EOT
        ids[row, end + 1 :] = 0
    return ids


def pixels(batch: int, size: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a, b, dim=-1).mean())


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], value) for name, value in before.items())
    attention = model.visual.transformer.resblocks[0].attn
    assert type(attention).__name__ == "Attention" and isinstance(attention.in_proj_weight, nn.Parameter)
    assert isinstance(model.visual.proj, nn.Parameter) and isinstance(model.text_projection, nn.Parameter)


SMALL = {
    "embed_dim": 32,
    "activation": "gelu",
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def make_small() -> clipforge.CLIP:
    torch.manual_seed(0)
    return clipforge.CLIP(clipforge.ModelConfig.from_dict(SMALL, name="small")).eval()


@pytest.fixture(scope="module")
def small() -> clipforge.CLIP:
    """A 3-block image tower and 2-block text tower, for the simulated-quantization tests (many calibrations)."""
    return make_small()


def linears_per_model(model: clipforge.CLIP) -> int:
    """q/k/v, out_proj, c_fc and c_proj per block of both towers, plus the two projection matrices."""
    return 4 * (model.config.vision.layers + model.config.text.layers) + 2


# ------------------------------------------------------------------------------ torch.ao int8


def test_linear_form_gives_identical_features(tiny) -> None:
    linear = to_linear_form(tiny)
    ids = tokens(3, 12)
    with torch.no_grad():
        assert torch.allclose(linear.encode_image(pixels(2, 64, 1)), tiny.encode_image(pixels(2, 64, 1)), atol=1e-6)
        assert torch.allclose(linear.encode_text(ids), tiny.encode_text(ids), atol=1e-5)
    assert sum(type(m) is nn.Linear for m in linear.modules()) == linears_per_model(tiny)


def test_dynamic_int8_quantizes_every_linear_of_vit_b32_and_keeps_features() -> None:
    torch.manual_seed(0)
    model = clipforge.load("ViT-B-32").eval()
    before = snapshot(model)
    quantized = quantize_dynamic_int8(model)
    assert_unchanged(model, before)
    assert sum(isinstance(m, DynamicInt8Linear) for m in quantized.modules()) == linears_per_model(model)
    assert not any(type(m) is nn.Linear for m in quantized.modules())
    assert not any(hasattr(m, "in_proj_weight") for m in quantized.modules())
    assert all(p.dim() <= 1 or name.endswith(("conv1.weight", "token_embedding.weight", "positional_embedding"))
               for name, p in quantized.named_parameters())  # the only float matrices left are not GEMMs
    images, ids = pixels(2, 224, 3), tokens(3, 20)
    with torch.inference_mode():
        assert cosine(quantized.encode_image(images), model.encode_image(images)) >= 0.99
        assert cosine(quantized.encode_text(ids), model.encode_text(ids)) >= 0.99


def test_static_int8_calibrates_image_linears_and_keeps_features(tiny) -> None:
    before = snapshot(tiny)
    calibration = [pixels(8, 64, seed) for seed in range(4)]
    quantized = quantize_static_int8(tiny, calibration)
    assert_unchanged(tiny, before)
    image_linears = [m for m in quantized.visual.modules() if isinstance(m, StaticInt8Linear)]
    assert len(image_linears) == 4 * tiny.config.vision.layers + 1
    assert all(linear.weight().qscheme() == torch.per_channel_affine for linear in image_linears)
    text_linears = [m for m in quantized.transformer.modules() if isinstance(m, DynamicInt8Linear)]
    assert len(text_linears) == 4 * tiny.config.text.layers
    assert not any(type(m) is nn.Linear for m in quantized.modules())
    images, ids = pixels(4, 64, 9), tokens(3, 16)
    with torch.no_grad():
        assert cosine(quantized.encode_image(images), tiny.encode_image(images)) >= 0.98
        assert cosine(quantized.encode_text(ids), tiny.encode_text(ids)) >= 0.98


def test_static_int8_with_text_batches_is_static_in_both_towers(tiny) -> None:
    quantized = quantize_static_int8(tiny, [pixels(8, 64, 0)], text_batches=[tokens(8, 20)], observer="minmax")
    assert sum(isinstance(m, StaticInt8Linear) for m in quantized.modules()) == linears_per_model(tiny)
    ids = tokens(4, 20, seed=5)
    with torch.no_grad():
        assert cosine(quantized.encode_text(ids), tiny.encode_text(ids)) >= 0.98


def test_bad_calibration_input_is_a_clear_error(tiny) -> None:
    with pytest.raises(InputError, match="calibration_batches: no batches"):
        quantize_static_int8(tiny, [])
    with pytest.raises(InputError, match=r"calibration_batches\[0\]"):
        quantize_static_int8(tiny, [torch.zeros(2, 64, 64)])
    with pytest.raises(ConfigError, match="observer"):
        quantize_static_int8(tiny, [pixels(1, 64, 0)], observer="mse")
    with pytest.raises(ConfigError, match="engine"):
        quantize_dynamic_int8(tiny, engine="tpu")


# ---------------------------------------------------------------------------- quantizers by hand


def test_uniform_softmax_quantizer_by_hand() -> None:
    p = torch.tensor([0.6, 0.25, 0.1, 0.04, 0.01])
    # 2 bits on [0, 1]: step 1/3, so 1.8 → 2, 0.75 → 1, 0.3 → 0, ...
    expected = torch.tensor([2 / 3, 1 / 3, 0.0, 0.0, 0.0])
    assert torch.allclose(uniform_quantize(p, torch.tensor(0.0), torch.tensor(1.0), 2), expected)


def test_log2_quantizer_by_hand() -> None:
    p = torch.tensor([0.6, 0.25, 0.1, 0.04, 0.01, 0.0])
    # -log2 p = 0.74, 2, 3.32, 4.64, 6.64, inf → rounded 1, 2, 3, 5, 7, inf
    two_bits = torch.tensor([0.5, 0.25, 0.125, 0.0, 0.0, 0.0])  # exponents ≥ 2^2 = 4 become 0
    three_bits = torch.tensor([0.5, 0.25, 0.125, 1 / 32, 1 / 128, 0.0])  # exponents ≥ 8 become 0
    assert torch.equal(log2_quantize(p, 2), two_bits)
    assert torch.equal(log2_quantize(p, 3), three_bits)


def test_shift_uniform_log2_quantizer_by_hand() -> None:
    p = torch.tensor([0.5, 0.375, 0.125, 0.0])
    shift, low, high = 0.125, -3.0, math.log2(0.625)
    # 3 bits: Δ = (high - low) / 8 = 0.29024; y = log2(p + η) = -0.678, -1, -2, -3
    # levels round((y - low)/Δ) = 8, 6.89→7, 3.45→3, 0; exponents 8Δ-3=-0.678→-1, -0.968→-1, -2.129→-2, -3
    expected = torch.tensor([0.5 - 0.125, 0.5 - 0.125, 0.25 - 0.125, 0.125 - 0.125])
    assert torch.allclose(shift_log2_quantize(p, 3, shift, low, high), expected)


def test_shift_log2_calibration_matches_the_papers_search_loop() -> None:
    generator = torch.Generator().manual_seed(0)
    probabilities = torch.randn(6, 20, generator=generator).mul(3).softmax(-1).reshape(-1)
    for bits in (3, 4):
        shift, low, high = calibrate_shift_log2(probabilities, bits)
        x = probabilities.double().numpy()
        errors = []
        for eta in SHIFT_CANDIDATES:  # I&S-ViT's shift-uniform-log2 search (zysxmu/IaS-ViT), in numpy
            y = np.log2(x + eta)
            lo, hi = y.min(), y.max()
            delta = (hi - lo) / (2**bits - 1)
            xq = 2.0 ** np.round(lo + np.clip(np.round((y - lo) / delta), 0, 2**bits - 1) * delta) - eta
            errors.append(((x - xq) ** 2).sum())
        best = int(np.argmin(errors))
        assert shift == SHIFT_CANDIDATES[best]
        assert low == pytest.approx(math.log2(float(probabilities.min()) + shift))
        assert high == pytest.approx(math.log2(float(probabilities.max()) + shift))


# ------------------------------------------------------------------------- simulated quantization


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).norm() / reference.norm())


def test_sixteen_bits_is_nearly_identity_and_error_grows_as_bits_fall(small) -> None:
    before = snapshot(small)
    images = pixels(4, 32, 11)
    with torch.no_grad():
        reference = small.encode_image(images)
    errors = {}
    for bits in (16, 8, 6, 4):
        simulated = simulate_quantization(small, bits, bits, "uniform", calibration_batches=[images])
        with torch.no_grad():
            errors[bits] = relative_error(simulated.encode_image(images), reference)
    assert_unchanged(small, before)
    assert errors[16] <= 1e-3
    assert errors[16] < errors[8] < errors[6] < errors[4]


@pytest.mark.parametrize("kind,bits", [("uniform", 3), ("log2", 3), ("shift_log2", 3)])
def test_attention_probabilities_are_on_the_quantizer_grid(small, kind: str, bits: int) -> None:
    images = pixels(2, 32, 4)
    simulated = simulate_quantization(small, 8, bits, kind, calibration_batches=[images])
    attention = simulated.visual.transformer.resblocks[1].attn
    assert isinstance(attention, FakeQuantAttention)
    with torch.no_grad():
        weights = attention(torch.randn(2, 17, small.config.vision.width), return_weights=True).weights
    values = weights.unique()
    if kind == "uniform":
        assert torch.allclose(values * (2**bits - 1), (values * (2**bits - 1)).round(), atol=1e-4)
    elif kind == "log2":
        exponents = -torch.log2(values[values > 0])
        assert torch.equal(exponents, exponents.round()) and exponents.max() <= 2**bits - 1
    else:
        shift = attention.softmax_quantizer.shift
        assert shift in SHIFT_CANDIDATES
        exponents = torch.log2(values.double() + shift)
        assert torch.allclose(exponents, exponents.round(), atol=1e-5)


def test_weights_have_at_most_two_to_the_bits_levels_per_output_channel(small) -> None:
    simulated = simulate_quantization(small, 3, 8, "log2", calibration_batches=[pixels(2, 32, 0)])
    layers = [m for m in simulated.visual.modules() if isinstance(m, FakeQuantLinear)]
    assert len(layers) == 4 * small.config.vision.layers + 1
    for layer in layers:
        assert max(len(row.unique()) for row in layer.weight) <= 2**3
    assert not any(isinstance(m, FakeQuantLinear) for m in simulated.transformer.modules())  # no text batches


def test_text_tower_is_simulated_when_text_batches_are_given(small) -> None:
    ids = tokens(4, 16, seed=2)
    simulated = simulate_quantization(
        small, 16, 16, "uniform", calibration_batches=[pixels(2, 32, 0)], text_batches=[ids]
    )
    assert sum(isinstance(m, FakeQuantLinear) for m in simulated.modules()) == linears_per_model(small)
    with torch.no_grad():
        assert relative_error(simulated.encode_text(ids), small.encode_text(ids)) <= 1e-3


def test_allocate_bits_matches_brute_force() -> None:
    relevance = {"a": 20.0, "b": 1.0, "c": 5.0}
    for average in (3, 4, 6):
        best = min(
            (bits for bits in itertools.product(range(MIN_BITS, 17), repeat=3) if sum(bits) == 3 * average),
            key=lambda bits: sum(r * 4.0**-b for r, b in zip(relevance.values(), bits)),
        )
        assert allocate_bits(relevance, average) == dict(zip(relevance, best))
    assert allocate_bits({"x": 1.0, "y": 1.0, "z": 1.0}, 5) == {"x": 5, "y": 5, "z": 5}


def test_block_relevance_sums_to_one_and_finds_a_dead_block() -> None:
    model = make_small()
    dead = model.visual.transformer.resblocks[2]
    for layer in (dead.attn.out_proj, dead.mlp.c_proj):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    model.requires_grad_(False)
    before = snapshot(model)
    relevance = block_relevance(model, [pixels(4, 32, 0)], text_batches=[tokens(4, 16)])
    assert_unchanged(model, before)
    assert not any(p.requires_grad or p.grad is not None for p in model.parameters())
    image = {k: v for k, v in relevance.items() if k.startswith("visual.")}
    text = {k: v for k, v in relevance.items() if not k.startswith("visual.")}
    assert len(image) == 3 and len(text) == 2
    assert sum(image.values()) == pytest.approx(1.0) and sum(text.values()) == pytest.approx(1.0)
    assert image["visual.transformer.resblocks.2"] == 0.0
    assert min(v for k, v in image.items() if k != "visual.transformer.resblocks.2") > 0
    simulated = simulate_quantization(model, 4, 4, "shift_log2", calibration_batches=[pixels(2, 32, 0)],
                                      mixed_precision=image)
    blocks = simulated.visual.transformer.resblocks
    weight_bits = [block.mlp.c_fc.w_bits for block in blocks]
    activation_bits = [block.attn.softmax_quantizer.bits for block in blocks]
    assert weight_bits[2] == MIN_BITS and activation_bits[2] == MIN_BITS
    assert sum(weight_bits) == 4 * len(blocks) and sum(activation_bits) == 4 * len(blocks)
    with pytest.raises(ConfigError, match="mixed_precision"):
        simulate_quantization(model, 4, 4, calibration_batches=[pixels(1, 32, 0)], mixed_precision={"block.9": 1.0})


def test_quantization_study_rows(small) -> None:
    images = pixels(4, 32, 7)
    with torch.no_grad():
        reference = small.encode_image(images)
    evaluated = []

    def eval_fn(model: clipforge.CLIP) -> float:
        evaluated.append(model)
        with torch.no_grad():
            return cosine(model.encode_image(images), reference)

    rows = quantization_study(small, eval_fn, [images], bits=(4,))
    assert evaluated[0] is small
    assert [(r["w_bits"], r["a_bits"], r["softmax_quantizer"], r["mixed"]) for r in rows] == [
        (32, 32, None, False), (4, 4, "uniform", False), (4, 4, "log2", False),
        (4, 4, "shift_log2", False), (4, 4, "shift_log2", True),
    ]
    assert rows[0]["accuracy"] == pytest.approx(1.0)
    assert all(row["accuracy"] < 0.9999 for row in rows[1:])


def test_bad_simulation_settings_are_clear_errors(small) -> None:
    with pytest.raises(ConfigError, match="softmax_quantizer"):
        simulate_quantization(small, 8, 8, "log10", calibration_batches=[pixels(1, 32, 0)])
    with pytest.raises(ConfigError, match="w_bits"):
        simulate_quantization(small, 1, 8, calibration_batches=[pixels(1, 32, 0)])
    with pytest.raises(InputError, match="text_batches"):
        simulate_quantization(small, 8, 8, calibration_batches=[pixels(1, 32, 0)], text_batches=[pixels(1, 32, 0)])
