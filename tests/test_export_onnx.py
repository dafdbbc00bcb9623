"""ONNX export: onnxruntime outputs against the PyTorch model (``encode_image``/``encode_text``) at two batch
sizes and two text lengths, the int8 ONNX models against the float ones, and the exported configuration."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import clipforge
from clipforge.compress import apply_token_reduction
from clipforge.compress.export_onnx import (
    CONFIG_FILE,
    OnnxCLIP,
    export_onnx,
    quantize_onnx_int8,
)
from clipforge.compress.quant.int8 import quantize_dynamic_int8
from clipforge.errors import ConfigError, InputError

EOT = 49407


@pytest.fixture(scope="module")
def model() -> clipforge.CLIP:
    torch.manual_seed(0)
    return clipforge.load("synthetic-tiny").eval()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    return export_onnx(model, tmp_path_factory.mktemp("onnx"), int8=True)


def token_ids(batch: int, length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40000, (batch, length), generator=generator)
    ends = torch.randint(1, length, (batch,), generator=generator)
    ends[0] = length - 1  # one sequence uses the whole length
    for row, end in enumerate(ends):
        ids[row, end] = EOT
        ids[row, end + 1 :] = 0
    return ids


def max_relative_error(ours: np.ndarray, reference: torch.Tensor) -> float:
    return float(np.abs(ours - reference.numpy()).max() / reference.abs().max())


def cosines(a: np.ndarray, b: torch.Tensor) -> np.ndarray:
    b = b.numpy()
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.mark.parametrize("batch", [1, 5])
def test_image_encoder_matches_pytorch(model, exported, batch: int) -> None:
    pixels = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        reference = model.encode_image(pixels)
    assert max_relative_error(OnnxCLIP(exported).encode_image(pixels.numpy()), reference) <= 1e-4
    assert cosines(OnnxCLIP(exported, int8=True).encode_image(pixels.numpy()), reference).min() >= 0.98


@pytest.mark.parametrize("batch,length", [(2, 9), (3, 32)])
def test_text_encoder_matches_pytorch_at_any_length(model, exported, batch: int, length: int) -> None:
    ids = token_ids(batch, length, seed=length)
    with torch.no_grad():
        reference = model.encode_text(ids)
    assert max_relative_error(OnnxCLIP(exported).encode_text(ids.numpy()), reference) <= 1e-4
    assert cosines(OnnxCLIP(exported, int8=True).encode_text(ids.numpy()), reference).min() >= 0.98


def test_normalized_features_and_helpers_match_the_model(model, exported) -> None:
    clip = OnnxCLIP(exported)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 100, 3), dtype=np.uint8))
    assert np.allclose(clip.preprocess(image), model.preprocess(image).numpy())
    assert np.array_equal(clip.tokenize(["two red circles"]), model.tokenize(["two red circles"]).numpy())
    features = clip.encode_text(clip.tokenize(["a", "two red circles on the left"]), normalize=True)
    with torch.no_grad():
        reference = model.encode_text(model.tokenize(["a", "two red circles on the left"]), normalize=True)
    assert np.allclose(features, reference.numpy(), atol=1e-5)


def test_config_records_preprocessing_and_context_length(model, exported) -> None:
    config = json.loads((exported / CONFIG_FILE).read_text())
    assert config["preprocess"] == model.preprocess_cfg.to_dict()
    assert config["context_length"] == 32 and config["embed_dim"] == 128
    assert config["logit_scale"] == pytest.approx(model.logit_scale.detach().exp().item())


def test_bad_inputs_are_clear_errors(model, exported, tmp_path) -> None:
    clip = OnnxCLIP(exported)
    with pytest.raises(InputError, match="context length 32"):
        clip.encode_text(np.ones((1, 33), dtype=np.int64))
    with pytest.raises(InputError, match="pixels"):
        clip.encode_image(np.zeros((3, 64, 64), dtype=np.float32))
    with pytest.raises(InputError, match="clipforge_onnx.json"):
        OnnxCLIP(tmp_path)
    with pytest.raises(InputError, match="missing.onnx"):
        quantize_onnx_int8(tmp_path / "missing.onnx", tmp_path / "out.onnx")
    with pytest.raises(ConfigError, match="float model"):
        export_onnx(quantize_dynamic_int8(model), tmp_path)
    reduced = clipforge.load("synthetic-tiny")
    apply_token_reduction(reduced, "tome", r=2)
    with pytest.raises(ConfigError, match="token reduction.*tome"):
        export_onnx(reduced, tmp_path)
