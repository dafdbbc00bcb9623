"""Attention rollout and Score-CAM against loops over an open_clip model with the same weights; overlays; CLI.

The references take attention weights from open_clip's own ``nn.MultiheadAttention`` (asked for per-head
weights, which open_clip never requests) and activations from a forward hook on its last block, then
apply the published formulas written out here (jacobgil/vit-explain ``vit_rollout.py``,
jacobgil/pytorch-grad-cam ``score_cam.py``).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image
from test_clip_benchmark_parity import open_clip_tokenize, open_clip_twins
from test_reliability import MICRO, one_error_line, run

import clipforge
from clipforge.cli import main
from clipforge.compress.export_onnx import export_onnx
from clipforge.compress.records import apply_compression
from clipforge.errors import ConfigError, InputError
from clipforge.explain import explain_image
from clipforge.explain.overlay import heatmap_overlay
from clipforge.explain.rollout import attention_rollout, recording_attention
from clipforge.explain.scorecam import channel_weights, score_cam


@pytest.fixture(scope="module")
def twin_models() -> tuple[torch.nn.Module, clipforge.CLIP]:
    return open_clip_twins()


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def reference_attentions(reference: torch.nn.Module, pixels: torch.Tensor) -> list[torch.Tensor]:
    """Per-head attention of every open_clip image block, from the inputs its attention receives."""
    inputs: list[torch.Tensor] = []
    hooks = [block.attn.register_forward_pre_hook(lambda _, args: inputs.append(args[0])) for block in reference.visual.transformer.resblocks]
    with torch.no_grad():
        reference.encode_image(pixels)
    for hook in hooks:
        hook.remove()
    with torch.no_grad():
        return [block.attn(x, x, x, need_weights=True, average_attn_weights=False)[1]
                for block, x in zip(reference.visual.transformer.resblocks, inputs, strict=True)]


def vit_explain_rollout(attentions: list[torch.Tensor], fusion: str, discard_ratio: float) -> np.ndarray:
    """vit-explain's loop for one image, keeping the whole class-token column when discarding."""
    result = np.eye(attentions[0].shape[-1])
    for attention in attentions:
        heads = attention.double().numpy()
        fused = {"mean": heads.mean(axis=0), "max": heads.max(axis=0), "min": heads.min(axis=0)}[fusion]
        if discard_ratio:
            patches = fused[:, 1:].copy()
            flat = patches.reshape(-1)
            flat[np.argsort(flat, kind="stable")[: int(fused.size * discard_ratio)]] = 0
            fused = np.concatenate([fused[:, :1], flat.reshape(patches.shape)], axis=1)
        a = (fused + np.eye(len(fused))) / 2
        a = a / a.sum(axis=-1, keepdims=True)
        result = a @ result
    mask = result[0, 1:].reshape(4, 4)
    return mask / mask.max()


@pytest.mark.parametrize(("fusion", "discard_ratio"), [("mean", 0.0), ("max", 0.0), ("min", 0.3)])
def test_rollout_matches_open_clip_attention(twin_models, pixels, fusion, discard_ratio) -> None:
    reference, ours = twin_models
    attentions = reference_attentions(reference, pixels)
    got = attention_rollout(ours, pixels, fusion, discard_ratio)
    assert got.shape == (2, 4, 4)
    for image in range(2):
        expected = vit_explain_rollout([a[image] for a in attentions], fusion, discard_ratio)
        assert np.abs(got[image].numpy() - expected).max() < 1e-5


def test_rollout_refuses_models_that_drop_tokens(twin_models) -> None:
    _, ours = twin_models
    with recording_attention(ours.visual):
        with pytest.raises(ConfigError, match="every image token"):
            attention_rollout(ours, torch.zeros(1, 3, 32, 32))
    assert ours.visual.token_reduction is None


def softmax_weights(scores: np.ndarray, baseline: float, scale: float) -> np.ndarray:
    """pytorch-grad-cam: a softmax over the channels' cosines."""
    return np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()


def increase_weights(scores: np.ndarray, baseline: float, scale: float) -> np.ndarray:
    """The Score-CAM paper's channel-wise increase of confidence on CLIP's logit scale, unnormalised."""
    return scale * (scores - baseline)


def reference_score_cam(reference: torch.nn.Module, pixels: torch.Tensor, text: torch.Tensor, weights=softmax_weights) -> torch.Tensor:
    """pytorch-grad-cam's ScoreCAM with vit_reshape_transform and a cosine-to-text target, one channel at a time
    (with ``weights`` computed from the channels' cosines, the baseline image's cosine and the logit scale)."""
    captured: list[torch.Tensor] = []
    hook = reference.visual.transformer.resblocks[-1].register_forward_hook(lambda *args: captured.append(args[2]))
    with torch.no_grad():
        reference.encode_image(pixels)
    hook.remove()
    tokens = captured[0][:, 1:]
    activations = tokens.reshape(len(pixels), 4, 4, tokens.shape[-1]).permute(0, 3, 1, 2)
    upsampled = torch.nn.UpsamplingBilinear2d(size=pixels.shape[-2:])(activations)
    low = upsampled.flatten(2).min(-1).values[..., None, None]
    high = upsampled.flatten(2).max(-1).values[..., None, None]
    masks = (upsampled - low) / (high - low + 1e-8)
    maps = []
    for image in range(len(pixels)):
        with torch.no_grad():
            scores = torch.stack([
                F.cosine_similarity(reference.encode_image(pixels[image : image + 1] * masks[image, k]), text[image : image + 1])[0]
                for k in range(masks.shape[1])
            ])
            baseline = F.cosine_similarity(reference.encode_image(torch.zeros_like(pixels[:1])), text[image : image + 1])[0]
        w = weights(scores.double().numpy(), float(baseline), float(reference.logit_scale.detach().exp()))
        cam = F.relu((torch.from_numpy(w).float()[:, None, None] * activations[image]).sum(0))
        cam = torch.nn.UpsamplingBilinear2d(size=pixels.shape[-2:])(cam[None, None])[0, 0]
        maps.append((cam - cam.min()) / (cam.max() - cam.min() + 1e-8))
    return torch.stack(maps)


def test_score_cam_matches_a_channel_by_channel_loop(twin_models, pixels) -> None:
    reference, ours = twin_models
    tokens = open_clip_tokenize(["a red circle", "two blue stars on the left"])
    with torch.no_grad():
        text = F.normalize(reference.encode_text(tokens), dim=-1)
    got = score_cam(ours, pixels, text, batch_size=7, weighting="cosine")
    expected = reference_score_cam(reference, pixels, text)
    assert got.shape == (2, 32, 32) and got.min() >= 0 and got.max() <= 1
    assert (got - expected).abs().max().item() < 1e-4
    increase = score_cam(ours, pixels, text, batch_size=7, weighting="increase")
    assert (increase - reference_score_cam(reference, pixels, text, increase_weights)).abs().max().item() < 1e-4


def test_channel_weightings_follow_their_formulas() -> None:
    generator = torch.Generator().manual_seed(0)
    masked, baseline, scale = torch.rand(3, 5, generator=generator) * 0.4, torch.rand(3, generator=generator) * 0.3, 37.0
    for name, formula in (("cosine", lambda x, b: np.exp(x) / np.exp(x).sum()),
                          ("logit", lambda x, b: np.exp(scale * x) / np.exp(scale * x).sum()),
                          ("increase", lambda x, b: scale * (x - b))):
        got = channel_weights(masked, baseline, scale, name).numpy()
        for row in range(3):
            expected = formula(masked[row].double().numpy(), float(baseline[row]))
            np.testing.assert_allclose(got[row], expected, rtol=1e-5, atol=1e-7, err_msg=name)
    with pytest.raises(InputError, match="weighting: 'mean' is not one of cosine, logit, increase"):
        channel_weights(masked, baseline, scale, "mean")


def test_overlay_blends_the_colormap() -> None:
    image = Image.new("RGB", (4, 2), (200, 100, 0))
    heatmap = np.array([[0.0, 1.0], [0.5, 0.25]])
    overlay = heatmap_overlay(image, heatmap, alpha=0.4, min_side=2)
    assert overlay.size == (4, 2)
    jet_at_zero = np.array(colormaps["jet"](0.0)[:3])
    expected = np.round((0.6 * np.array([200, 100, 0]) / 255 + 0.4 * jet_at_zero) * 255)
    assert np.array_equal(np.asarray(overlay)[0, 0], expected.astype(np.uint8))
    assert heatmap_overlay(image, heatmap).size == (448, 224)
    with pytest.raises(InputError, match="2-D"):
        heatmap_overlay(image, np.zeros(3))


def test_explain_command_writes_the_suffixs_format_with_a_legend(tmp_path, capsys) -> None:
    torch.manual_seed(0)
    model = clipforge.load("synthetic-tiny")
    clipforge.save(model, tmp_path / "tiny.safetensors")
    Image.new("RGB", (80, 60), (30, 160, 50)).save(tmp_path / "green.png")
    for method, text, name, kind in (("scorecam", "a green square", "map.jpg", "JPEG"), ("rollout", "", "map.png", "PNG")):
        with pytest.raises(SystemExit) as exit_info:
            main(["explain", str(tmp_path / "green.png"), text, "--model", str(tmp_path / "tiny.safetensors"),
                  "--method", method, "--out", str(tmp_path / name)])
        assert exit_info.value.code == 0, capsys.readouterr().err
        written = Image.open(tmp_path / name)
        assert written.format == kind and written.size == (256, 256 + 38)  # 64 px enlarged 4x, then the legend strip
    legend = np.asarray(Image.open(tmp_path / "map.png").convert("RGB"))[256:]
    assert (legend[:16, :120] < 128).all(axis=2).any()  # the label's dark text is drawn on the white strip
    for out, message in (("map.gif", "unknown image suffix '.gif'"), ("map.png", None)):
        with pytest.raises(SystemExit) as exit_info:
            main(["explain", str(tmp_path / "green.png"), " " if message is None else "x", "--model", str(tmp_path / "tiny.safetensors"), "--out", str(tmp_path / out)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1 and (message or "non-empty text") in err
    assert not (tmp_path / "map.gif").exists()


def test_explain_command_refuses_reduced_models_and_exports_in_one_line(tmp_path, capsys) -> None:
    """Both maps need every patch token of a PyTorch image tower: a ToMe or EViT checkpoint, and an ONNX export
    of the model, are refused in one line and nothing is written."""
    torch.manual_seed(0)
    model = clipforge.load(MICRO)
    models = {"onnx": tmp_path / "onnx"}
    export_onnx(model, models["onnx"])
    for method, settings in (("tome", {"r": 2}), ("evit", {"keep_rate": 0.5, "layers": [0]})):
        models[method] = clipforge.save(apply_compression(copy.deepcopy(model), method, **settings), tmp_path / f"{method}.safetensors")
    Image.new("RGB", (40, 30), "red").save(tmp_path / "red.png")
    reduced = "every image token: switch off token merging/pruning on this model first"
    expected = {"tome": reduced, "evit": reduced,
                "onnx": f"{models['onnx']} is an ONNX export: explain needs the PyTorch checkpoint it was made from"}
    for name, path in models.items():
        for method in ("scorecam", "rollout"):
            code, _, err = run(capsys, "explain", str(tmp_path / "red.png"), "a red square", "--model", str(path),
                               "--method", method, "--out", str(tmp_path / "map.png"))
            assert code == 2 and expected[name] in one_error_line(err), (name, method)
    assert not (tmp_path / "map.png").exists()


def test_explain_image_rejects_unknown_methods(twin_models) -> None:
    with pytest.raises(InputError, match="gradcam"):
        explain_image(twin_models[1], Image.new("RGB", (32, 32)), "x", method="gradcam")
