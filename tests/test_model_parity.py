"""clipforge vs open_clip on identical random weights: features, logits, and another resolution."""

from __future__ import annotations

import open_clip
import pytest
import torch

import clipforge

CONFIGS = ["ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-B-32-quickgelu"]
CAPTIONS = ["a photo of a dog", "two red circles on the left", "", "an astronaut riding a horse on the moon at night"]


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).abs().max() / reference.abs().max())


def make_reference(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return open_clip.create_model(name).eval()


@pytest.mark.parametrize("name", CONFIGS)
def test_open_clip_state_dict_loads_and_agrees(name: str) -> None:
    reference = make_reference(name)
    model = clipforge.load(name)
    model.load_state_dict(reference.state_dict(), strict=True)  # no remapping, no missing or extra keys
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, 224, 224)
    tokens = open_clip.get_tokenizer(name)(CAPTIONS)
    with torch.no_grad():
        ref_image, ref_text, ref_scale = reference(pixels, tokens)
        image, text, scale = model(pixels, tokens)
        assert relative_error(model.encode_image(pixels), reference.encode_image(pixels)) <= 1e-4
        assert relative_error(model.encode_text(tokens), reference.encode_text(tokens)) <= 1e-4
    assert relative_error(image, ref_image) <= 1e-4
    assert relative_error(text, ref_text) <= 1e-4
    assert relative_error(scale * image @ text.T, ref_scale * ref_image @ ref_text.T) <= 1e-4


@pytest.mark.parametrize("name,size", [("ViT-B-32", 288), ("ViT-B-16", 160)])
def test_second_resolution_matches_open_clip_resize_pos_embed(tmp_path, name: str, size: int) -> None:
    weights = tmp_path / "weights.pt"
    torch.save(make_reference(name).state_dict(), weights)
    reference = open_clip.create_model(name, pretrained=str(weights), force_image_size=size).eval()
    model = clipforge.load(weights, config=name, image_size=size)
    assert model.visual.positional_embedding.shape == reference.visual.positional_embedding.shape
    torch.manual_seed(2)
    pixels = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert relative_error(model.encode_image(pixels), reference.encode_image(pixels)) <= 1e-4
    assert model.preprocess_cfg.size == size


def test_forward_intermediates_match_open_clip() -> None:
    reference = make_reference("ViT-B-32")
    model = clipforge.load("ViT-B-32")
    model.load_state_dict(reference.state_dict())
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ours = model.visual.forward_intermediates(pixels, indices=[2, -1], normalize_intermediates=True)
        theirs = reference.visual.forward_intermediates(pixels, indices=[2, -1], normalize_intermediates=True)
    assert ours["image_intermediates"][0].shape == (1, 768, 7, 7)
    for a, b in zip(ours["image_intermediates"], theirs["image_intermediates"]):
        assert relative_error(a, b) <= 1e-4
    assert relative_error(ours["image_features"], theirs["image_features"]) <= 1e-4


def test_dynamic_text_length_is_exact() -> None:
    """Encoding only up to the last end token must equal encoding the full 77 positions."""
    reference = make_reference("ViT-B-32")
    model = clipforge.load("ViT-B-32")
    model.load_state_dict(reference.state_dict())
    tokens = model.tokenize(["a cat", "a much longer caption about many things in a row"])
    with torch.no_grad():
        full = reference.encode_text(tokens)
        short = model.encode_text(tokens)
    assert relative_error(short, full) <= 1e-5


def test_sin_cos_position_embedding_equals_open_clip() -> None:
    """``pos_embed_type="sin_cos_2d"``: the same fixed table as open_clip's (MAE's), frozen, and the same outputs."""
    vision = {"image_size": 64, "patch_size": 8, "width": 96, "layers": 2, "head_width": 32, "pos_embed_type": "sin_cos_2d"}
    text = {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}
    torch.manual_seed(0)
    reference = open_clip.CLIP(embed_dim=64, vision_cfg=vision, text_cfg=text).eval()
    model = clipforge.CLIP(clipforge.ModelConfig.from_dict({"embed_dim": 64, "activation": "gelu", "vision_cfg": vision, "text_cfg": text})).eval()
    assert not model.visual.positional_embedding.requires_grad
    torch.testing.assert_close(model.visual.positional_embedding, reference.visual.positional_embedding, atol=1e-6, rtol=0)
    model.load_state_dict(reference.state_dict(), strict=True)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert relative_error(model.encode_image(pixels), reference.encode_image(pixels)) <= 1e-4
