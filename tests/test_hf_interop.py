"""Hugging Face CLIPModel ↔ clipforge: features agree and the round trip is exact."""

from __future__ import annotations

import pytest
import torch
import transformers

import clipforge
from clipforge.io.hf import save_hf


def small_hf_model(activation: str) -> "transformers.CLIPModel":
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, hidden_act=activation),
        vision_config=dict(
            hidden_size=96, intermediate_size=384, num_hidden_layers=2, num_attention_heads=3, image_size=64,
            patch_size=16, hidden_act=activation,
        ),
        projection_dim=48,
    )
    return transformers.CLIPModel(config).eval()


@pytest.mark.parametrize("activation", ["gelu", "quick_gelu"])
def test_hf_directory_loads_with_matching_features(tmp_path, activation: str) -> None:
    reference = small_hf_model(activation)
    reference.save_pretrained(tmp_path)
    model = clipforge.load(tmp_path)
    assert model.config.activation == activation
    torch.manual_seed(1)
    pixels = torch.randn(3, 3, 64, 64)
    tokens = model.tokenize(["a dog", "two red circles on the left", ""])
    with torch.no_grad():
        ref_image = reference.get_image_features(pixel_values=pixels)
        ref_text = reference.get_text_features(input_ids=tokens)
        ref_image = getattr(ref_image, "pooler_output", ref_image)
        ref_text = getattr(ref_text, "pooler_output", ref_text)
        image, text = model.encode_image(pixels), model.encode_text(tokens)
    assert float((image - ref_image).abs().max() / ref_image.abs().max()) <= 1e-4
    assert float((text - ref_text).abs().max() / ref_text.abs().max()) <= 1e-4


@pytest.mark.parametrize("activation", ["gelu", "quick_gelu"])
def test_round_trip_reproduces_hf_state_dict(tmp_path, activation: str) -> None:
    reference = small_hf_model(activation)
    reference.save_pretrained(tmp_path / "hf")
    save_hf(clipforge.load(tmp_path / "hf"), tmp_path / "back")
    reloaded = transformers.CLIPModel.from_pretrained(tmp_path / "back")
    assert reloaded.config.text_config.hidden_act == activation
    original, returned = reference.state_dict(), reloaded.state_dict()
    assert set(original) == set(returned)
    for key, value in original.items():
        assert torch.equal(value, returned[key]), key
