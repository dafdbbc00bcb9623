"""Checkpoint formats, detection and the errors a user sees."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from safetensors.torch import save_file

import clipforge
from clipforge.errors import CheckpointError, ConfigError

NAME = "synthetic-tiny"


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_clipforge_round_trip_keeps_weights_config_and_preprocessing(tmp_path, tiny) -> None:
    path = clipforge.save(tiny, tmp_path / "m.safetensors", provenance={"trained_on": "synthetic"})
    loaded = clipforge.load(path)
    assert same_weights(loaded, tiny)
    assert loaded.config == tiny.config
    assert loaded.preprocess_cfg == tiny.preprocess_cfg
    assert loaded.provenance["trained_on"] == "synthetic"


def test_a_safetensors_file_is_read_whatever_its_name(tmp_path, tiny) -> None:
    """The format is told by the file's bytes: a clipforge checkpoint renamed to .bin or to no suffix loads."""
    written = clipforge.save(tiny, tmp_path / "m.safetensors").read_bytes()
    for name in ("m.bin", "m"):
        (tmp_path / name).write_bytes(written)
        loaded = clipforge.load(tmp_path / name)
        assert same_weights(loaded, tiny) and loaded.config == tiny.config


def test_training_checkpoint_with_module_prefix(tmp_path, tiny) -> None:
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in tiny.state_dict().items()}}
    torch.save(wrapped, tmp_path / "epoch_3.pt")
    assert same_weights(clipforge.load(tmp_path / "epoch_3.pt", config=NAME), tiny)


def test_bare_state_dict_needs_activation(tmp_path) -> None:
    torch.manual_seed(0)
    torch.save(open_clip.create_model("ViT-B-32").state_dict(), tmp_path / "bare.bin")
    with pytest.raises(CheckpointError) as error:
        clipforge.load(tmp_path / "bare.bin")
    message = str(error.value)
    assert "\n" not in message and "'ViT-B-32'" in message and "'ViT-B-32-quickgelu'" in message and "--config" in message


def test_openai_layout_is_quick_gelu_with_inferred_config(tmp_path) -> None:
    torch.manual_seed(0)
    reference = open_clip.create_model("ViT-B-32-quickgelu").eval()
    state = dict(reference.state_dict(), input_resolution=torch.tensor(224), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    torch.save(state, tmp_path / "ViT-B-32.pt")
    model = clipforge.load(tmp_path / "ViT-B-32.pt")
    assert model.config.activation == "quick_gelu" and model.config.vision.patch_size == 32
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(model.encode_image(pixels), reference.encode_image(pixels), atol=1e-5)


def test_open_clip_safetensors_and_custom_text_layout(tmp_path, tiny) -> None:
    nested = {("text." + k if not k.startswith(("visual.", "logit_")) else k): v for k, v in tiny.state_dict().items()}
    save_file({k: v.contiguous() for k, v in nested.items()}, tmp_path / "custom.safetensors")
    assert same_weights(clipforge.load(tmp_path / "custom.safetensors", config=NAME), tiny)


def test_open_clip_hub_directory(tmp_path, tiny) -> None:
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, tmp_path / "open_clip_model.safetensors")
    config = clipforge.get_model_config(NAME).to_dict()
    preprocess = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic", "resize_mode": "squash"}
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": preprocess}))
    model = clipforge.load(tmp_path)
    assert same_weights(model, tiny)
    assert model.preprocess_cfg.resize_mode == "squash" and tuple(model.preprocess_cfg.mean) == (0.5, 0.5, 0.5)


def test_mismatch_lists_missing_unexpected_and_misshaped_keys(tmp_path, tiny) -> None:
    state = dict(tiny.state_dict())
    state.pop("ln_final.weight")
    state["extra.weight"] = torch.zeros(1)
    state["text_projection"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError) as error:
        clipforge.load(tmp_path / "broken.pt", config=NAME)
    message = str(error.value)
    assert "missing: ln_final.weight" in message and "unexpected: extra.weight" in message
    assert "text_projection (3, 3)" in message and "\n" not in message


def test_pickled_code_is_refused(tmp_path) -> None:
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": object()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused: it holds pickled Python objects"):
        clipforge.load(tmp_path / "evil.pt", config=NAME)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"\x00" * 64])
def test_garbage_files_fail_in_one_line(tmp_path, content: bytes) -> None:
    for suffix in (".pt", ".safetensors"):
        path = tmp_path / f"junk{suffix}"
        path.write_bytes(content)
        with pytest.raises(CheckpointError) as error:
            clipforge.load(path, config=NAME)
        assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_unknown_source_and_bad_precision() -> None:
    with pytest.raises(CheckpointError, match="not a model config name"):
        clipforge.load("ViT-Z-99")
    with pytest.raises(ConfigError, match="precision"):
        clipforge.load(NAME, precision="fp8")


def test_precision_casts_weights() -> None:
    model = clipforge.load(NAME, precision="bf16")
    assert model.visual.conv1.weight.dtype == torch.bfloat16
    with torch.no_grad():
        features = model.encode_image(torch.randn(1, 3, 64, 64), normalize=True)
    assert features.dtype == torch.bfloat16 and torch.isfinite(features.float()).all()


def test_pretrained_offline_names_the_file_to_fetch(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setenv("CLIPFORGE_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError) as error:
        clipforge.load("ViT-B-32", pretrained="laion2b_s34b_b79k")
    message = str(error.value)
    assert "huggingface.co/laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in message
    assert str(tmp_path / "ViT-B-32" / "laion2b_s34b_b79k") in message


def test_pretrained_from_local_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CLIPFORGE_CACHE", str(tmp_path))
    torch.manual_seed(0)
    reference = open_clip.create_model("ViT-B-32-quickgelu")
    target = tmp_path / "ViT-B-32-quickgelu" / "openai" / "open_clip_model.safetensors"
    target.parent.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, target)
    model = clipforge.load("ViT-B-32-quickgelu", pretrained="openai")
    assert same_weights(model, reference)
    (tmp_path / "ViT-B-32" / "openai").mkdir(parents=True)
    (tmp_path / "ViT-B-32" / "openai" / target.name).symlink_to(target)
    assert clipforge.load("ViT-B-32", pretrained="openai").config.activation == "quick_gelu"  # the tag decides
    with pytest.raises(ConfigError, match="quick_gelu"):
        clipforge.load("ViT-B-32", pretrained="openai", config="ViT-B-32")


def test_token_reduction_travels_with_the_checkpoint(tmp_path, tiny) -> None:
    from clipforge.compress.reduction.registry import (
        apply_token_reduction,
        remove_token_reduction,
    )

    model = clipforge.load(NAME)
    model.load_state_dict(tiny.state_dict())
    apply_token_reduction(model, "tome", r=4)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        merged = model.encode_image(pixels)
    clipforge.save(model, tmp_path / "tome.safetensors")
    loaded = clipforge.load(tmp_path / "tome.safetensors")
    assert loaded.compression["method"] == "tome" and loaded.compression["settings"]["r"] == 4
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(pixels), merged)
        remove_token_reduction(loaded)
        assert not torch.allclose(loaded.encode_image(pixels), merged)
