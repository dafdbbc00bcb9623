"""ONNX export of both towers, int8 ONNX quantization, and an onnxruntime CLIP.

    from clipforge.compress.export_onnx import OnnxCLIP, export_onnx
    export_onnx(model, "clip-onnx", int8=True)
    clip = OnnxCLIP("clip-onnx")                      # OnnxCLIP("clip-onnx", int8=True) for the int8 files
    image_features = clip.encode_image(clip.preprocess(image)[None])
    text_features = clip.encode_text(clip.tokenize(["a photo of a dog"]))

``image_encoder.onnx`` maps pixels [batch, 3, H, W] (float32, as ``model.preprocess`` makes them) to image
embeddings; ``text_encoder.onnx`` maps token ids [batch, length] (int64, any length up to the context
length) to text embeddings pooled at the end-of-text token, as ``encode_text``. Both have a dynamic batch
axis, the text encoder also a dynamic length axis. ``clipforge_onnx.json`` holds the preprocessing, the
context length and the logit scale. Embeddings are not normalised (``normalize=True`` in ``OnnxCLIP``).
"""

from __future__ import annotations

import copy
import json
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from clipforge.compress.quant.int8 import is_linear_form
from clipforge.encode import encode_pixels, encode_texts
from clipforge.errors import ConfigError, InputError
from clipforge.models.clip import CLIP

IMAGE_FILE, TEXT_FILE, CONFIG_FILE = "image_encoder.onnx", "text_encoder.onnx", "clipforge_onnx.json"
INT8_SUFFIX = ".int8.onnx"


class ImageEncoder(nn.Module):
    """``pixels → model.encode_image(pixels)``, the graph of ``image_encoder.onnx``."""

    def __init__(self, model: CLIP) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)


class TextEncoder(nn.Module):
    """``encode_text`` on the whole given length, the graph of ``text_encoder.onnx``.

    ``encode_text`` first cuts the batch after its last end-of-text token; a traced graph would freeze that
    cut at the example's length. Under the causal mask the positions after a sequence's end token cannot
    change the features pooled at it, so running every position gives the same embeddings.
    """

    def __init__(self, model: CLIP) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.text_features(tokens)


def int8_name(name: str) -> str:
    """``image_encoder.onnx`` → ``image_encoder.int8.onnx``."""
    return name.removesuffix(".onnx") + INT8_SUFFIX


def export_onnx(model: CLIP, out_dir: str | Path, opset: int = 17, *, int8: bool = False) -> Path:
    """Write ``image_encoder.onnx``, ``text_encoder.onnx`` and ``clipforge_onnx.json`` to ``out_dir``.

    Exports a float32 CPU copy with torch's TorchScript-based exporter (``dynamo=False``). With ``int8``
    also writes ``*.int8.onnx`` (``quantize_onnx_int8``). Token reduction (ToMe, PiToMe, EViT) changes the
    token count inside the graph and is not exportable: remove it first.
    """
    if not isinstance(model, CLIP):
        raise ConfigError(f"ONNX export needs a clipforge CLIP model, got {type(model).__name__}")
    if model.visual.token_reduction is not None:
        method = getattr(model, "compression", {}).get("method", type(model.visual.token_reduction).__name__)
        raise ConfigError(
            f"ONNX export does not support token reduction ({method}); "
            "call clipforge.compress.remove_token_reduction(model) first"
        )
    if is_linear_form(model):
        raise ConfigError(
            "ONNX export needs the float model, not a torch.ao-quantized or simulated copy; "
            "export the float model and use export_onnx(..., int8=True) for int8"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).float().cpu().eval()
    size = model.visual.cfg.image_size
    context = model.text_cfg.context_length
    pixels = torch.zeros(2, 3, size, size)
    tokens = torch.zeros(2, context, dtype=torch.long)
    tokens[:, -1] = model.text_cfg.vocab_size - 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (torch.jit.TracerWarning, DeprecationWarning, UserWarning))
        _export(ImageEncoder(model), pixels, out / IMAGE_FILE, "pixels", "image_features", {0: "batch"}, opset)
        _export(TextEncoder(model), tokens, out / TEXT_FILE, "token_ids", "text_features", {0: "batch", 1: "length"}, opset)
    config = {
        "format": "clipforge-onnx",
        "opset": opset,
        "model": model.config.name,
        "preprocess": model.preprocess_cfg.to_dict(),
        "context_length": context,
        "embed_dim": model.config.embed_dim,
        "logit_scale": model.logit_scale.detach().exp().item(),
        "logit_bias": None if model.logit_bias is None else model.logit_bias.detach().item(),
        "provenance": model.provenance,
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    if int8:
        for name in (IMAGE_FILE, TEXT_FILE):
            quantize_onnx_int8(out / name, out / int8_name(name))
    return out


def _export(
    module: nn.Module,
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


class OnnxCLIP:
    """Both encoders of an ``export_onnx`` directory, run with onnxruntime on the CPU."""

    def __init__(self, out_dir: str | Path, *, int8: bool = False) -> None:
        import onnxruntime

        directory = Path(out_dir)
        config_path = directory / CONFIG_FILE
        if not config_path.is_file():
            raise InputError(f"{config_path}: missing; is {directory} an export_onnx directory?")
        self.config: dict[str, Any] = json.loads(config_path.read_text())
        sessions = []
        for name in (IMAGE_FILE, TEXT_FILE):
            path = directory / (int8_name(name) if int8 else name)
            if not path.is_file():
                raise InputError(f"{path}: missing; export with export_onnx(..., int8={int8})")
            sessions.append(onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]))
        self.image_session, self.text_session = sessions
        self.context_length: int = self.config["context_length"]

    def encode_image(self, pixels: np.ndarray, normalize: bool = False) -> np.ndarray:
        """Pixels [B, 3, H, W] → image embeddings [B, embed_dim] (float32)."""
        pixels = np.asarray(pixels, dtype=np.float32)
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise InputError(f"pixels: expected [batch, 3, height, width], got shape {pixels.shape}")
        return _maybe_normalize(self.image_session.run(None, {"pixels": pixels})[0], normalize)

    def encode_text(self, token_ids: np.ndarray, normalize: bool = False) -> np.ndarray:
        """Token ids [B, L] with L ≤ the context length → text embeddings [B, embed_dim] (float32)."""
        token_ids = np.asarray(token_ids)
        if token_ids.ndim != 2 or not np.issubdtype(token_ids.dtype, np.integer):
            raise InputError(f"token_ids: expected integer ids [batch, length], got {token_ids.dtype} {token_ids.shape}")
        if token_ids.shape[1] > self.context_length:
            raise InputError(f"token_ids: length {token_ids.shape[1]} exceeds the context length {self.context_length}")
        features = self.text_session.run(None, {"token_ids": token_ids.astype(np.int64)})[0]
        return _maybe_normalize(features, normalize)

    def preprocess(self, image: Any) -> np.ndarray:
        """A PIL image → float32 pixels [3, H, W] with the exported model's preprocessing."""
        from clipforge.preprocess.transforms import PreprocessConfig, image_transform

        transform = image_transform(PreprocessConfig.from_dict(self.config["preprocess"]))
        return transform(image).numpy()

    def tokenize(self, texts: str | list[str]) -> np.ndarray:
        """Strings → int64 token ids [N, context_length]."""
        from clipforge.preprocess.tokenizer import get_tokenizer

        return get_tokenizer(self.context_length)(texts).numpy()


def _maybe_normalize(features: np.ndarray, normalize: bool) -> np.ndarray:
    if not normalize:
        return features
    return features / np.linalg.norm(features, axis=-1, keepdims=True)


@dataclass(frozen=True)
class ExportCheck:
    """How far one exported pair of graphs is from the PyTorch model on the same inputs."""

    label: str  # fp32 or int8
    max_abs_difference: float
    min_cosine: float


def check_export(model: CLIP, out_dir: str | Path, *, int8: bool = False) -> list[ExportCheck]:
    """Run the exported graphs (and their int8 copies) and the model on two random images and two captions."""
    size = model.config.vision.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    captions = ["a photo of a dog", "two red circles on the left"]
    expected = torch.cat([encode_pixels(model, pixels), encode_texts(model, captions)])
    checks = []
    for quantized in (False, True) if int8 else (False,):
        onnx = OnnxCLIP(out_dir, int8=quantized)
        found = torch.from_numpy(
            np.concatenate([onnx.encode_image(pixels.numpy(), normalize=True), onnx.encode_text(onnx.tokenize(captions), normalize=True)])
        )
        cosine = torch.nn.functional.cosine_similarity(found, expected).min().item()
        checks.append(ExportCheck("int8" if quantized else "fp32", (found - expected).abs().max().item(), cosine))
    return checks
