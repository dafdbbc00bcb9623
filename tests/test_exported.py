"""Exported models (ONNX Runtime and OpenVINO): the graphs against the PyTorch model they came from.

References: ``encode_image``/``encode_text`` of the PyTorch model (with the same token merging applied in
PyTorch), its ``preprocess`` and ``tokenize``, at two batch sizes and two text lengths; damaged or swapped
graph files written by the test. The slow test checks the acceptance figures on the trained demo model:
cosine ≥ 0.999 (float) and ≥ 0.995 (int8) on real images, zero-shot accuracy within one point.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clipforge
from clipforge.compress.export_onnx import export_onnx, quantize_onnx_int8
from clipforge.compress.export_openvino import (
    GraphAttention,
    calibration_set,
    export_openvino,
    split_projections,
)
from clipforge.compress.exported import EXPORT_FILE, ExportedCLIP
from clipforge.compress.quant.int8 import quantize_dynamic_int8
from clipforge.compress.records import apply_compression
from clipforge.data.formats.images import read_image
from clipforge.encode import embed_images, encode_texts
from clipforge.errors import CheckpointError, ConfigError, InputError
from clipforge.eval.datasets import load_dataset
from clipforge.eval.runner import Evaluator
from clipforge.layers.attention import Attention

EOT = 49407
ENGINES = ("onnxruntime", "openvino")


@pytest.fixture(scope="module")
def model() -> clipforge.CLIP:
    torch.manual_seed(0)
    return clipforge.load("synthetic-tiny").eval()


def export(engine: str, model: clipforge.CLIP, out, int8: bool = False):
    if engine == "onnxruntime":
        return export_onnx(model, out, int8=int8)
    images, texts = calibration_set(model, "synthetic:shape", 64) if int8 else (None, None)
    return export_openvino(model, out, int8=int8, calibration_images=images, calibration_texts=texts)


@pytest.fixture(scope="module", params=ENGINES)
def exported(request, model, tmp_path_factory):
    return export(request.param, model, tmp_path_factory.mktemp(request.param), int8=True)


def token_ids(batch: int, length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40000, (batch, length), generator=generator)
    ends = torch.randint(1, length, (batch,), generator=generator)
    ends[0] = length - 1  # one sequence uses the whole length
    for row, end in enumerate(ends):
        ids[row, end] = EOT
        ids[row, end + 1 :] = 0
    return ids


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).abs().max() / reference.abs().max())


def synthetic_images(count: int) -> list[Image.Image]:
    dataset = load_dataset("synthetic:shape_color", samples=count)
    return [read_image(source) for source in dataset.images]


@pytest.mark.parametrize("causal", [False, True])
def test_the_graph_attention_is_multi_head_attention(causal: bool) -> None:
    """OpenVINO's form of the attention (three products) against torch's ``nn.MultiheadAttention``."""
    torch.manual_seed(0)
    holder = torch.nn.Sequential(Attention(32, 4))
    split_projections(holder)
    ours = holder[0]
    assert type(ours) is GraphAttention
    reference = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(3, 7, 32)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(7) if causal else None
    with torch.no_grad():
        torch.testing.assert_close(ours(x, is_causal=causal).out, reference(x, x, x, attn_mask=mask, need_weights=False)[0])


@pytest.mark.parametrize("batch", [1, 5])
def test_image_graph_matches_pytorch(model, exported, batch: int) -> None:
    pixels = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        reference = model.encode_image(pixels)
    assert relative_error(ExportedCLIP(exported, variant="fp32").encode_image(pixels), reference) <= 1e-4


@pytest.mark.parametrize("batch,length", [(2, 9), (3, 32)])
def test_text_graph_matches_pytorch_at_any_length(model, exported, batch: int, length: int) -> None:
    ids = token_ids(batch, length, seed=length)
    with torch.no_grad():
        reference = model.encode_text(ids)
    assert relative_error(ExportedCLIP(exported, variant="fp32").encode_text(ids), reference) <= 1e-4


def test_int8_graphs_stay_close_on_real_images_and_prompts(model, exported) -> None:
    images = synthetic_images(32)
    prompts = [f"a photo of a {color} {shape}." for color in ("red", "green") for shape in ("circle", "square", "star")]
    reference = torch.cat([torch.from_numpy(embed_images(model, images, workers=0, progress=False).embeddings), encode_texts(model, prompts)])
    quantized = ExportedCLIP(exported)
    assert quantized.variant == "int8"
    found = torch.cat([torch.from_numpy(embed_images(quantized, images, workers=0, progress=False).embeddings), encode_texts(quantized, prompts)])
    assert F.cosine_similarity(found, reference).min() >= 0.98


def test_load_gives_the_models_surface(model, exported) -> None:
    loaded = clipforge.load(exported)
    assert isinstance(loaded, ExportedCLIP) and loaded.config == model.config
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 100, 3), dtype=np.uint8))
    assert torch.equal(loaded.preprocess(image), model.preprocess(image))
    assert torch.equal(loaded.tokenize(["two red circles"]), model.tokenize(["two red circles"]))
    assert loaded.logit_scale.exp().item() == pytest.approx(model.logit_scale.exp().item())
    fp32 = ExportedCLIP(exported, variant="fp32")
    texts = ["a", "two red circles on the left"]
    assert torch.allclose(encode_texts(fp32, texts), encode_texts(model, texts), atol=1e-5)
    with pytest.raises(ConfigError, match="CPU"):
        clipforge.load(exported, device="cuda")


@pytest.mark.parametrize("engine", ENGINES)
def test_token_merging_is_exported_with_its_static_shapes(model, engine, tmp_path) -> None:
    merged = apply_compression(clipforge.load("synthetic-tiny"), "tome", r=3)
    merged.load_state_dict(model.state_dict())
    out = export(engine, merged, tmp_path)
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        reference, full = merged.encode_image(pixels), model.encode_image(pixels)
    found = clipforge.load(out).encode_image(pixels)
    assert relative_error(found, reference) <= 1e-4 and relative_error(found, full) > 1e-3
    assert json.loads((out / EXPORT_FILE).read_text())["steps"][0]["method"] == "tome"


def test_damaged_or_swapped_graph_files_are_refused(model, exported, tmp_path) -> None:
    copy = shutil.copytree(exported, tmp_path / "copy")
    record = json.loads((copy / EXPORT_FILE).read_text())
    graph = copy / record["variants"]["fp32"]["image"][-1]
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{graph.name}: differs from the file this export wrote"):
        ExportedCLIP(copy, variant="fp32")
    other = clipforge.load("synthetic-tiny")  # other random weights, same architecture
    other_dir = export(record["engine"], other, tmp_path / "other")
    for name in record["variants"]["fp32"]["image"]:
        shutil.copy(other_dir / name, copy / name)
    with pytest.raises(CheckpointError, match="another export"):
        ExportedCLIP(copy, variant="fp32")
    (copy / EXPORT_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match=EXPORT_FILE):
        clipforge.load(copy)


def test_bad_inputs_are_clear_errors(model, exported, tmp_path) -> None:
    loaded = ExportedCLIP(exported, variant="fp32")
    with pytest.raises(ConfigError, match="≤32"):
        loaded.encode_text(torch.ones(1, 33, dtype=torch.long))
    with pytest.raises(ConfigError, match="pixels"):
        loaded.encode_image(torch.zeros(3, 64, 64))
    with pytest.raises(ConfigError, match="no bf8 graphs"):
        ExportedCLIP(exported, variant="bf8")
    with pytest.raises(InputError, match="missing.onnx"):
        quantize_onnx_int8(tmp_path / "missing.onnx", tmp_path / "out.onnx")
    with pytest.raises(ConfigError, match="int8-dynamic.*cannot be exported"):
        export_onnx(apply_compression(clipforge.load("synthetic-tiny"), "int8-dynamic"), tmp_path / "a")
    with pytest.raises(ConfigError, match="torch.ao-quantized"):
        export_openvino(quantize_dynamic_int8(model), tmp_path / "b")
    with pytest.raises(ConfigError, match="calibration"):
        export_openvino(model, tmp_path / "c", int8=True)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_demo_model_exports_keep_features_and_accuracy(demo_model, engine, tmp_path) -> None:
    """Acceptance (#18): cosine ≥ 0.999 float, ≥ 0.995 int8 on real images; zero-shot within one point."""
    out = export(engine, demo_model, tmp_path, int8=True)
    test = load_dataset("synthetic:shape_color", samples=1000)
    images = [read_image(source) for source in test.images[:256]]
    reference = torch.from_numpy(embed_images(demo_model, images, workers=0, progress=False).embeddings)
    accuracy = Evaluator(demo_model, workers=0).zeroshot(test).metrics["acc1"]
    for variant, floor in (("fp32", 0.999), ("int8", 0.995)):
        exported_model = ExportedCLIP(out, variant=variant)
        found = torch.from_numpy(embed_images(exported_model, images, workers=0, progress=False).embeddings)
        cosine = F.cosine_similarity(found, reference)
        exported_accuracy = Evaluator(exported_model, workers=0).zeroshot(test).metrics["acc1"]
        print(f"{engine} {variant}: mean cosine {cosine.mean():.5f}, min {cosine.min():.5f}, acc {exported_accuracy:.4f} vs {accuracy:.4f}")
        assert cosine.mean() >= floor
        assert abs(exported_accuracy - accuracy) <= 0.01
