"""The strongest CPU peers of clipforge's encoders, each at the setting its users choose for speed.

Every peer runs the same open_clip model (same weights) in one process, with the threads torch uses:

- open_clip fp32, and open_clip ``precision="bf16"`` (its weights and inputs in bfloat16);
- ONNX Runtime on the model exported with ``torch.onnx.export``: fp32, and int8 by ``quantize_dynamic`` after
  onnxruntime's ``quant_pre_process`` (its documented recipe for transformers);
- OpenVINO on the model converted with ``openvino.convert_model``: fp32 and bf16 (``INFERENCE_PRECISION_HINT``),
  and int8 by NNCF post-training quantization (``nncf.quantize``, ``model_type=TRANSFORMER``) on the
  calibration batches given; every variant reshaped to the static input shape it is timed at and compiled
  with ``PERFORMANCE_HINT=LATENCY``, as OpenVINO's performance guide advises.

Text follows open_clip: its tokenizer pads every caption to 77 tokens, so the exported text graphs take
[batch, 77]. Each peer is ``Peer(precision, run)`` where ``run(inputs) -> np.ndarray`` embeds one batch.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch


@dataclass
class Peer:
    precision: str
    run: Callable[[Any], np.ndarray]


class _Tower(torch.nn.Module):
    """One tower of an open_clip model as a module to export: ``encode_image`` or ``encode_text``."""

    def __init__(self, model: torch.nn.Module, tower: str) -> None:
        super().__init__()
        self.model, self.tower = model, tower

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return getattr(self.model, f"encode_{self.tower}")(inputs)


def torch_peers(fp32_model: torch.nn.Module, bf16_model: torch.nn.Module, tower: str) -> dict[str, Peer]:
    """open_clip itself, fp32 and bf16 (``create_model(..., precision="bf16")``), under ``torch.no_grad``."""

    def runner(model: torch.nn.Module, dtype: torch.dtype) -> Callable[[torch.Tensor], np.ndarray]:
        encode = model.encode_image if tower == "image" else model.encode_text

        def run(inputs: torch.Tensor) -> np.ndarray:
            with torch.no_grad():
                return encode(inputs.to(dtype) if tower == "image" else inputs).float().numpy()

        return run

    return {"open_clip fp32": Peer("fp32", runner(fp32_model, torch.float32)), "open_clip bf16": Peer("bf16", runner(bf16_model, torch.bfloat16))}


def onnxruntime_peers(model: torch.nn.Module, tower: str, example: torch.Tensor, threads: int, scratch: Path) -> dict[str, Peer]:
    """ONNX Runtime fp32 and dynamic int8 on ``torch.onnx.export`` of one tower (dynamic batch)."""
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_path, prepared, int8_path = scratch / f"{tower}.onnx", scratch / f"{tower}.prep.onnx", scratch / f"{tower}.int8.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.backends.mha.set_fastpath_enabled(False)  # nn.MultiheadAttention's fused kernel has no ONNX export
        torch.onnx.export(_Tower(model, tower), (example,), str(fp32_path), input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, opset_version=17, dynamo=False)
        torch.backends.mha.set_fastpath_enabled(True)
    quant_pre_process(fp32_path, prepared, skip_symbolic_shape=True)
    quantize_dynamic(prepared, int8_path, weight_type=QuantType.QInt8)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    peers = {}
    for label, path in (("fp32", fp32_path), ("int8", int8_path)):
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        peers[f"onnxruntime {label}"] = Peer(label, lambda inputs, session=session: session.run(None, {"input": inputs.numpy()})[0])
    return peers


def openvino_peers(
    model: torch.nn.Module, tower: str, example: torch.Tensor, calibration: list[torch.Tensor], threads: int
) -> dict[str, Peer]:
    """OpenVINO fp32, bf16 and NNCF int8 on ``openvino.convert_model`` of one tower, static at ``example``'s shape."""
    import nncf
    import openvino

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        graph = openvino.convert_model(_Tower(model, tower), example_input=example)
    logging.getLogger("nncf").setLevel(logging.ERROR)
    quantized = nncf.quantize(graph, nncf.Dataset([batch.numpy() for batch in calibration]),
                              model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calibration))
    core = openvino.Core()
    peers = {}
    for label, source, hint in (("fp32", graph, "f32"), ("bf16", graph, "bf16"), ("int8", quantized, None)):
        static = source.clone()
        static.reshape(list(example.shape))
        settings: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
        if hint:
            settings["INFERENCE_PRECISION_HINT"] = hint
        request = core.compile_model(static, "CPU", settings).create_infer_request()
        peers[f"openvino {label}"] = Peer(label, lambda inputs, request=request: request.infer([inputs.numpy()])[0].copy())
    return peers


def all_peers(
    fp32_model: torch.nn.Module, bf16_model: torch.nn.Module, tower: str, example: torch.Tensor, calibration: list[torch.Tensor], threads: int
) -> dict[str, Peer]:
    """Every peer of one tower (see the module docstring); exports live in a temporary directory."""
    with tempfile.TemporaryDirectory() as scratch:
        return {
            **torch_peers(fp32_model, bf16_model, tower),
            **onnxruntime_peers(fp32_model, tower, example, threads, Path(scratch)),
            **openvino_peers(fp32_model, tower, example, calibration, threads),
        }
