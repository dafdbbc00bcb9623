"""ONNX export of both towers, with onnxruntime int8, as a directory ``clipforge.load`` reads.

    from clipforge.compress.export_onnx import export_onnx
    export_onnx(model, "clip-onnx", int8=True)
    clip = clipforge.load("clip-onnx")               # an ExportedCLIP running the int8 graphs in onnxruntime
    features = clip.encode_image(clip.preprocess(image)[None])

The directory layout, the record and the runtime are ``clipforge.compress.exported``'s. Graphs come from
torch's TorchScript-based exporter (``dynamo=False``) on a float32 CPU copy: ``image_encoder.onnx`` with a
dynamic batch axis, ``text_encoder.onnx`` with dynamic batch and length axes. A token reduction the model
records (ToMe, PiToMe, EViT) is traced into the image graph: its token counts depend only on the image size.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch

from clipforge.compress.exported import (
    ImageGraph,
    TextGraph,
    example_inputs,
    float_copy_for_export,
    write_export_record,
)
from clipforge.errors import ConfigError, InputError
from clipforge.models.clip import CLIP

IMAGE_FILE, TEXT_FILE = "image_encoder.onnx", "text_encoder.onnx"
INT8_SUFFIX = ".int8.onnx"
MIN_OPSET = 14


def supported_opsets() -> range:
    """The opsets the export writes: 14 up to the highest the installed torch's TorchScript exporter supports
    (``torch.onnx``'s ``ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET``: above it, that exporter warns that it does not
    support the opset, or fails)."""
    from torch.onnx import _constants

    return range(MIN_OPSET, _constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET + 1)


def check_opset(opset: int) -> None:
    """A one-line ``ConfigError`` unless the export writes ``opset`` (``supported_opsets``)."""
    opsets = supported_opsets()
    if opset not in opsets:
        raise ConfigError(f"opset {opset}: torch {torch.__version__}'s ONNX exporter writes opsets {opsets[0]} to {opsets[-1]}")


def int8_name(name: str) -> str:
    """``image_encoder.onnx`` → ``image_encoder.int8.onnx``."""
    return name.removesuffix(".onnx") + INT8_SUFFIX


def export_onnx(model: CLIP, out_dir: str | Path, opset: int = 17, *, int8: bool = False) -> Path:
    """Write ``image_encoder.onnx``, ``text_encoder.onnx`` and ``clipforge_export.json`` to ``out_dir``.

    With ``int8`` also writes ``*.int8.onnx`` (``quantize_onnx_int8``) and makes them the default variant.
    ``opset`` is one of ``supported_opsets()``.
    """
    check_opset(opset)
    model, steps = float_copy_for_export(model, "ONNX")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pixels, tokens = example_inputs(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (torch.jit.TracerWarning, DeprecationWarning, UserWarning))
        _export(ImageGraph(model), pixels, out / IMAGE_FILE, "pixels", "image_features", {0: "batch"}, opset)
        _export(TextGraph(model), tokens, out / TEXT_FILE, "token_ids", "text_features", {0: "batch", 1: "length"}, opset)
    variants = {"fp32": {"image": [IMAGE_FILE], "text": [TEXT_FILE]}}
    if int8:
        for name in (IMAGE_FILE, TEXT_FILE):
            quantize_onnx_int8(out / name, out / int8_name(name))
        variants["int8"] = {"image": [int8_name(IMAGE_FILE)], "text": [int8_name(TEXT_FILE)]}
    write_export_record(out, model, "onnxruntime", variants, "int8" if int8 else "fp32", steps, opset=opset)
    return out


def _export(
    module: torch.nn.Module,
    example: torch.Tensor,
    path: Path,
    input_name: str,
    output_name: str,
    input_axes: dict[int, str],
    opset: int,
) -> None:
    torch.onnx.export(
        module,
        (example,),
        str(path),
        input_names=[input_name],
        output_names=[output_name],
        dynamic_axes={input_name: input_axes, output_name: {0: "batch"}},
        opset_version=opset,
        dynamo=False,
    )


def quantize_onnx_int8(onnx_path: str | Path, out_path: str | Path) -> Path:
    """Dynamic int8 quantization of an ONNX model with onnxruntime: int8 weights, uint8 activations per batch.

    Runs onnxruntime's recommended pre-processing (shape inference, graph optimisation) and then
    ``quantize_dynamic``, which turns every MatMul with a constant weight into ``MatMulInteger``.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source = Path(onnx_path)
    if not source.is_file():
        raise InputError(f"{source}: no such ONNX file")
    with tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / source.name
        quant_pre_process(source, prepared, skip_symbolic_shape=True)
        quantize_dynamic(prepared, Path(out_path), weight_type=QuantType.QInt8)
    return Path(out_path)
