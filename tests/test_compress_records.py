"""Compression steps as data, and their round trip through ``clipforge.save``/``load``.

Reference: each method applied directly (``apply_token_reduction``, ``Tensor.to(bfloat16)``,
``quantize_dynamic_int8``) to a copy of the same weights, never through the records or a checkpoint; the
loaded model must give bit-identical image and text embeddings. Expected records are written out by hand.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import clipforge
from clipforge.compress.quant.int8 import quantize_dynamic_int8, quantize_static_int8
from clipforge.compress.records import (
    apply_compression,
    apply_steps,
    compression_steps,
    parse_step,
)
from clipforge.compress.reduction.registry import apply_token_reduction
from clipforge.errors import CheckpointError, ConfigError

MICRO = str(Path(__file__).parent / "data" / "micro-clip.json")  # 32 px, patch 8: 17 tokens, 2 blocks

Reference = Callable[[clipforge.CLIP], clipforge.CLIP]


@pytest.fixture(scope="module")
def base() -> clipforge.CLIP:
    torch.manual_seed(0)
    return clipforge.load(MICRO)


@pytest.fixture(scope="module")
def inputs(base) -> tuple[torch.Tensor, torch.Tensor]:
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return pixels, base.tokenize(["a red circle", "two blue stars on the left", "a small green heart"])


def embeddings(model: clipforge.CLIP, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    pixels, tokens = inputs
    with torch.inference_mode():
        return model.encode_image(pixels), model.encode_text(tokens)


def tome(model: clipforge.CLIP) -> clipforge.CLIP:
    apply_token_reduction(model, "tome", r=4)
    return model


def pitome(model: clipforge.CLIP) -> clipforge.CLIP:
    apply_token_reduction(model, "pitome", keep_ratio=0.75)
    return model


def evit(model: clipforge.CLIP) -> clipforge.CLIP:
    apply_token_reduction(model, "evit", keep_rate=0.5, layers=[0])
    return model


def bf16(model: clipforge.CLIP) -> clipforge.CLIP:
    return model.to(torch.bfloat16)


CASES: dict[str, tuple[list[str], list[str], Reference]] = {
    "tome": (["tome:r=4"], ["tome"], tome),
    "pitome": (["pitome:keep_ratio=0.75"], ["pitome"], pitome),
    "evit": (["evit:keep_rate=0.5,layers=[0]"], ["evit"], evit),
    "bf16": (["bf16"], ["bf16"], bf16),
    "int8": (["int8"], ["int8-dynamic"], quantize_dynamic_int8),
    "bf16 then tome": (["bf16", "tome:r=4"], ["bf16", "tome"], lambda m: tome(bf16(m))),
    "pitome then int8": (["pitome:keep_ratio=0.75", "int8-dynamic"], ["pitome", "int8-dynamic"], lambda m: quantize_dynamic_int8(pitome(m))),
}


@pytest.mark.parametrize("name", CASES)
def test_saved_compression_loads_back_identical_to_the_method_applied_directly(tmp_path, base, inputs, name) -> None:
    specs, methods, reference = CASES[name]
    expected = embeddings(reference(copy.deepcopy(base)), inputs)
    assert not torch.equal(expected[0], embeddings(base, inputs)[0])  # the method does change the model
    compressed = apply_steps(copy.deepcopy(base), [parse_step(spec) for spec in specs])
    clipforge.save(compressed, tmp_path / "model.safetensors")
    loaded = clipforge.load(tmp_path / "model.safetensors")
    assert loaded.compression == compressed.compression
    for ours in (embeddings(compressed, inputs), embeddings(loaded, inputs)):
        assert torch.equal(ours[0], expected[0]) and torch.equal(ours[1], expected[1])
    assert [step["method"] for step in compression_steps(loaded)] == methods


def test_records_hold_every_setting_with_defaults_filled_in(base) -> None:
    model = apply_compression(copy.deepcopy(base), "tome", r=4)
    assert model.compression == {"method": "tome", "settings": {"r": 4, "inflect": 0.0, "prop_attn": True, "trace_source": False}}
    model = apply_compression(model, "int8", per_channel=False)
    assert model.compression == {
        "steps": [
            {"method": "tome", "settings": {"r": 4, "inflect": 0.0, "prop_attn": True, "trace_source": False}},
            {"method": "int8-dynamic", "settings": {"per_channel": False}},
        ]
    }


def test_int8_checkpoint_holds_the_float_weights(tmp_path, base) -> None:
    clipforge.save(apply_compression(copy.deepcopy(base), "int8"), tmp_path / "int8.safetensors")
    with safe_open(str(tmp_path / "int8.safetensors"), framework="pt") as stored:
        assert set(stored.keys()) == set(base.state_dict())
        assert all(torch.equal(stored.get_tensor(key), value) for key, value in base.state_dict().items())


def test_parse_step_reads_json_values_and_dashed_keys() -> None:
    assert parse_step("tome:r=[4,2],inflect=-1") == {
        "method": "tome",
        "settings": {"r": [4, 2], "inflect": -1, "prop_attn": True, "trace_source": False},
    }
    assert parse_step("pitome:keep-ratio=0.9,metric=tokens")["settings"]["keep_ratio"] == 0.9
    assert parse_step("pitome:keep-ratio=0.9,metric=tokens")["settings"]["metric"] == "tokens"
    assert parse_step("int8:per_channel=false") == {"method": "int8-dynamic", "settings": {"per_channel": False}}
    assert parse_step("bf16") == {"method": "bf16", "settings": {}}


@pytest.mark.parametrize(
    "spec,message",
    [("zip", "unknown compression method 'zip'"), ("tome:r", "expected key=value"), ("tome:speed=2", "unknown tome setting 'speed'"),
     ("bf16:fast=true", "bf16 takes no settings"), ("int8:per_channel=maybe", "must be true or false"),
     ("evit:fuse_token=maybe", "evit setting 'fuse_token' must be true or false (or 1, 0), got 'maybe'"),
     ("tome:r=2,prop_attn=2", "tome setting 'prop_attn' must be true or false (or 1, 0), got 2"),
     ("evit:layers=[0.5]", "evit setting 'layers' must be a list of ints (e.g. 3,6,9) or null, got [0.5]"),
     ("pitome:alpha=nan", "pitome setting 'alpha' must be a number, got 'nan'"),
     ("tome:inflect=x", "tome setting 'inflect' must be a number, got 'x'")],
)
def test_bad_step_specs_are_config_errors(spec, message) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_step(spec)


@pytest.mark.parametrize(
    "spec,setting,value",
    [("evit:fuse_token=False", "fuse_token", False), ("evit:fuse_token=TRUE", "fuse_token", True),
     ("tome:r=2,prop_attn=0", "prop_attn", False), ("tome:r=2,trace-source=1", "trace_source", True),
     ("int8:per_channel=False", "per_channel", False)],
)
def test_settings_given_as_text_are_read_as_their_types(spec, setting, value) -> None:
    assert parse_step(spec)["settings"][setting] is value


@pytest.mark.parametrize("first,second", [("tome", "pitome"), ("bf16", "int8")])
def test_a_model_takes_one_token_reduction_and_one_number_format(base, first, second) -> None:
    model = apply_compression(copy.deepcopy(base), first)
    with pytest.raises(ConfigError, match="a model takes one"):
        apply_compression(model, second)


def rewrite_compression(path: Path, record: str) -> None:
    with safe_open(str(path), framework="pt") as stored:
        tensors = {key: stored.get_tensor(key) for key in stored.keys()}
        metadata = {**stored.metadata(), "compression": record}
    save_file(tensors, str(path), metadata=metadata)


TOME = {"method": "tome", "settings": {"r": 2}}
BAD_RECORDS = {
    "{not json": "the metadata's 'compression' is not JSON",
    json.dumps([1, 2]): "malformed compression step",
    json.dumps({"steps": []}): "expected a compression step",
    json.dumps({"method": "zip", "settings": {}}): "unknown compression method 'zip'",
    json.dumps({"method": "tome", "settings": {"speed": 2}}): "unknown tome setting 'speed'",
    json.dumps({"method": "tome", "settings": {"r": "many"}}): "'r' must be an int",
    json.dumps({"method": "evit", "settings": {"fuse_token": "maybe"}}): "'fuse_token' must be true or false (or 1, 0), got 'maybe'",
    json.dumps({"method": "evit", "settings": {"keep_rate": 0.5, "layers": [9]}}): "entry 9 is out of range",
    json.dumps({"steps": [TOME, {"method": "pitome", "settings": {}}]}): "a model takes one token reduction",
}


@pytest.mark.parametrize("record", BAD_RECORDS)
def test_bad_compression_records_are_one_line_checkpoint_errors(tmp_path, base, record) -> None:
    path = tmp_path / "bad.safetensors"
    clipforge.save(base, path)
    rewrite_compression(path, record)
    with pytest.raises(CheckpointError) as error:
        clipforge.load(path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message and BAD_RECORDS[record] in message


def test_a_boolean_recorded_as_text_has_its_meaning(tmp_path, base, inputs) -> None:
    """A hand-edited record with "False" (text, which Python reads as true) fuses no token, as ``False`` does."""
    path = tmp_path / "evit.safetensors"
    clipforge.save(base, path)
    rewrite_compression(path, json.dumps({"method": "evit", "settings": {"keep_rate": 0.5, "layers": [0], "fuse_token": "False"}}))
    loaded = embeddings(clipforge.load(path), inputs)[0]
    model = copy.deepcopy(base)
    apply_token_reduction(model, "evit", keep_rate=0.5, layers=[0], fuse_token=False)
    assert torch.equal(loaded, embeddings(model, inputs)[0])
    assert not torch.equal(loaded, embeddings(evit(copy.deepcopy(base)), inputs)[0])  # fused: another embedding


def test_a_recorded_number_format_decides_the_precision(tmp_path, base, inputs) -> None:
    clipforge.save(apply_compression(copy.deepcopy(base), "bf16"), tmp_path / "bf16.safetensors")
    clipforge.save(apply_compression(copy.deepcopy(base), "int8"), tmp_path / "int8.safetensors")
    with pytest.raises(ConfigError, match="records bf16"):
        clipforge.load(tmp_path / "bf16.safetensors", precision="fp16")
    with pytest.raises(ConfigError, match="records int8-dynamic"):
        clipforge.load(tmp_path / "int8.safetensors", precision="bf16")
    same = clipforge.load(tmp_path / "bf16.safetensors", precision="bf16")
    assert torch.equal(embeddings(same, inputs)[0], embeddings(bf16(copy.deepcopy(base)), inputs)[0])


def test_statically_quantized_models_are_refused_by_save(tmp_path, base, inputs) -> None:
    static = quantize_static_int8(base, [inputs[0]])
    with pytest.raises(CheckpointError, match="static int8"):
        clipforge.save(static, tmp_path / "static.safetensors")
    assert not (tmp_path / "static.safetensors").exists()


def test_removing_the_token_reduction_keeps_the_number_format(base, inputs) -> None:
    from clipforge.compress.reduction.registry import remove_token_reduction

    model = apply_steps(copy.deepcopy(base), [parse_step("bf16"), parse_step("tome:r=4")])
    remove_token_reduction(model)
    assert model.compression == {"method": "bf16", "settings": {}}
    reference = copy.deepcopy(base).to(torch.bfloat16)
    for ours, theirs in zip(embeddings(model, inputs), embeddings(reference, inputs)):
        torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    remove_token_reduction(model)  # nothing left to remove: a no-op
    assert model.compression == {"method": "bf16", "settings": {}}
