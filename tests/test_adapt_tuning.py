"""The methods that change weights or prompts: their start points reproduce the base model, their results
are what their parts computed by hand give.

References: the base model's own features (CLIP-SVD with its singular values unchanged, CLIP-LoRA with B = 0,
CoOp with its context initialised from the words it replaces), peft's LoRA layers as they run against the
merged and fused weights, and the WiSE-FT endpoints against the two state dicts.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import clipforge
from clipforge.adapt import fit, load_adapter, sample_few_shot
from clipforge.adapt.coop import ContextPrompts, class_text
from clipforge.adapt.linear_form import fuse_attention, split_attention
from clipforge.adapt.lora import LoraSettings, add_lora, merged_linear
from clipforge.adapt.svd import SingularValueLinear, add_singular_values
from clipforge.adapt.tuning import context_init, prompt_tokens
from clipforge.adapt.wise_ft import interpolate
from clipforge.errors import CheckpointError

MICRO = str(Path(__file__).parent / "data" / "micro-clip.json")
PROMPTS = ["a photo of a red box.", "a photo of a blue ring.", "a photo of a green star."]


@pytest.fixture(scope="module")
def micro() -> clipforge.CLIP:
    torch.manual_seed(0)
    return clipforge.load(MICRO)


def features(model, pixels, tokens):
    with torch.no_grad():
        image, text, _ = model.eval()(pixels, tokens)
    return image, text


@pytest.fixture(scope="module")
def inputs(micro):
    torch.manual_seed(3)
    return torch.randn(4, 3, 32, 32), micro.tokenize(PROMPTS)


def test_split_attention_and_back_reproduce_the_model(micro, inputs) -> None:
    split = split_attention(copy.deepcopy(micro))
    for got, want in zip(features(split, *inputs), features(micro, *inputs), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    fused = fuse_attention(split, lambda module: module)
    assert all(torch.equal(fused.state_dict()[k], v) for k, v in micro.state_dict().items())


def test_clip_svd_with_unchanged_singular_values_reproduces_the_features(micro, inputs) -> None:
    svd = add_singular_values(copy.deepcopy(micro))
    wrapped = [m for m in svd.modules() if isinstance(m, SingularValueLinear)]
    linears = sum(1 for m in micro.modules() if type(m) is torch.nn.Linear)
    blocks = micro.config.vision.layers + micro.config.text.layers
    assert len(wrapped) == linears + 3 * blocks  # and q, k, v of every block, split out of the fused parameter
    assert sum(m.s.numel() for m in wrapped) == sum(min(m.u.shape[0], m.vh.shape[1]) for m in wrapped)
    for got, want in zip(features(svd, *inputs), features(micro, *inputs), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        for module in wrapped:
            module.s.mul_(1.1)
        expected = features(svd, *inputs)
    fused = fuse_attention(svd, lambda m: m.as_linear() if isinstance(m, SingularValueLinear) else m)
    for got, want in zip(features(fused, *inputs), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_clip_lora_with_zero_update_reproduces_the_features_and_merges_exactly(micro, inputs) -> None:
    lora = add_lora(copy.deepcopy(micro), LoraSettings())
    layers = [m for m in lora.modules() if hasattr(m, "lora_A")]
    assert len(layers) == 3 * (micro.config.vision.layers + micro.config.text.layers)
    assert all(m.scaling["default"] == pytest.approx(1 / 2**0.5) for m in layers)  # alpha / sqrt(r), r = 2
    for got, want in zip(features(lora, *inputs), features(micro, *inputs), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    trainable = {name for name, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    with torch.no_grad():
        for module in layers:
            module.lora_B["default"].weight.normal_(std=0.5)
        expected = features(lora, *inputs)  # peft's own forward: W x + s·B A x
    fused = fuse_attention(lora, merged_linear)
    assert not any(hasattr(m, "lora_A") for m in fused.modules())
    for got, want in zip(features(fused, *inputs), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_wise_ft_endpoints_are_the_two_models(micro) -> None:
    torch.manual_seed(9)
    other = clipforge.load(MICRO)
    for alpha, target in ((0.0, micro), (1.0, other)):
        mixed = interpolate(micro, other, alpha).state_dict()
        assert all(torch.equal(mixed[k], v) for k, v in target.state_dict().items())
    half = interpolate(micro, other, 0.5).state_dict()
    key = "visual.proj"
    torch.testing.assert_close(half[key], (micro.state_dict()[key] + other.state_dict()[key]) / 2)


def test_coop_started_from_the_words_is_zero_shot(micro) -> None:
    classes = ["red box", "blue ring", "green star"]
    tokens = prompt_tokens(micro, "a photo of a", classes)
    context = ContextPrompts(context_init(micro, "a photo of a", 4))
    with torch.no_grad():
        prompted = class_text(micro, context, tokens)
        plain = F.normalize(micro.encode_text(micro.tokenize(PROMPTS)), dim=-1)
    torch.testing.assert_close(prompted, plain, rtol=1e-5, atol=1e-6)
    assert micro.text_prompts is None


@pytest.mark.parametrize("method,settings", [
    ("coop", {"epochs": 2, "n_ctx": 4}),
    ("maple", {"epochs": 1}),
    ("clip-svd", {"iterations_per_shot": 2, "batch_size": 4}),
])
def test_tuned_methods_save_load_and_refuse_other_models(micro, tmp_path, method, settings) -> None:
    shots = sample_few_shot("synthetic:shape", 1, seed=1)
    adapter = fit(method, micro, shots, settings=settings)
    assert micro.text_prompts is None and micro.visual.prompts is None
    path = adapter.save(tmp_path / f"{method}.safetensors")
    images = shots.train.images
    fitted, loaded = adapter(micro), load_adapter(path)(micro)
    features_fitted = torch.from_numpy(fitted.features(images, workers=0).embeddings)
    features_loaded = torch.from_numpy(loaded.features(images, workers=0).embeddings)
    torch.testing.assert_close(features_loaded, features_fitted, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loaded.logits(features_loaded), fitted.logits(features_fitted), rtol=1e-4, atol=1e-4)
    torch.manual_seed(11)
    with pytest.raises(CheckpointError, match="was fitted on another model"):
        load_adapter(path)(clipforge.load(MICRO))
    if method == "clip-svd":
        tuned = clipforge.load(path)  # a plain checkpoint: loads as a model too
        assert tuned.provenance["adaptation"]["method"] == "clip-svd"
