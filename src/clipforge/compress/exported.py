"""Exported models: a directory of ONNX or OpenVINO IR graphs that ``clipforge.load`` reads as a model.

    clipforge compress openvino --model M --out clip-ov --int8 --calibration synthetic:shape
    model = clipforge.load("clip-ov")            # an ExportedCLIP: encode_image, encode_text, preprocess, tokenize
    clipforge embed photos/ --model clip-ov --out store/

A directory holds ``clipforge_export.json`` and, per variant (``fp32``, and ``int8`` when quantized), an image
and a text graph: ``image_encoder.onnx``/``text_encoder.onnx`` for onnxruntime (``export_onnx``), or
``image_encoder.xml``/``.bin`` and ``text_encoder.xml``/``.bin`` for OpenVINO (``export_openvino``). The JSON
records the engine, the model config, preprocessing, logit scale, the compression steps baked into the
graphs (token merging keeps static shapes, so it exports), the default variant and the SHA-256 of every
graph file: a file from another export or a damaged one is refused with one line naming it.

The image graph maps pixels [batch, 3, H, W] to image embeddings; the text graph maps token ids [batch,
length] (any length up to the context length) to text embeddings pooled at the end-of-text token.
``ExportedCLIP.encode_text`` cuts each batch after its last end-of-text token before running the graph,
as ``CLIP.encode_text`` does: 5–15-word captions run ~20 positions, not 77.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clipforge._util.fileio import atomic_path
from clipforge.compress.quant.int8 import is_linear_form
from clipforge.compress.records import (
    compression_steps,
    describe_steps,
    record_of,
    steps_of_record,
)
from clipforge.config import ModelConfig
from clipforge.encode import encode_pixels, encode_texts
from clipforge.errors import CheckpointError, ConfigError
from clipforge.models.clip import CLIP
from clipforge.preprocess.tokenizer import get_tokenizer
from clipforge.preprocess.transforms import PreprocessConfig, image_transform

EXPORT_FILE = "clipforge_export.json"
EXPORT_FORMAT = "clipforge-export"
ENGINES = ("onnxruntime", "openvino")
TOWERS = ("image", "text")


class ImageGraph(nn.Module):
    """``pixels → model.encode_image(pixels)``: what the image graph computes."""

    def __init__(self, model: CLIP) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)


class TextGraph(nn.Module):
    """``encode_text`` on the whole given length: what the text graph computes.

    ``encode_text`` first cuts the batch after its last end-of-text token; a traced graph would freeze that
    cut at the example's length. Under the causal mask the positions after a sequence's end token cannot
    change the features pooled at it, so running every position gives the same embeddings.
    """

    def __init__(self, model: CLIP) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.text_features(tokens)


ENGINE_FORMATS = {"onnxruntime": "ONNX", "openvino": "OpenVINO"}


def is_export_dir(path: str | Path) -> bool:
    return (Path(path) / EXPORT_FILE).is_file()


def refuse_export(path: str | Path, command: str) -> None:
    """A one-line ``ConfigError`` when ``path`` is an export directory: ``command`` needs the PyTorch model
    (its weights or its modules), which an export does not hold."""
    if is_export_dir(path):
        engine = ENGINE_FORMATS[read_export_record(Path(path))["engine"]]
        raise ConfigError(f"{path} is an {engine} export: {command} needs the PyTorch checkpoint it was made from")


def float_copy_for_export(model: CLIP, engine: str) -> tuple[CLIP, list[dict[str, Any]]]:
    """A float32 CPU copy of ``model`` to trace, and the compression steps the graphs keep.

    Token reductions stay in the graph (their token counts depend only on the image size, so shapes stay
    static); bf16 becomes the engine's inference precision (recorded, float weights exported); torch.ao
    int8 cannot be traced and is refused: quantize the export instead (``int8=True``).
    """
    if not isinstance(model, CLIP):
        raise ConfigError(f"{engine} export needs a clipforge CLIP model, got {type(model).__name__}")
    steps = compression_steps(model)
    if is_linear_form(model):
        raise ConfigError(
            f"the model is torch.ao-quantized ({describe_steps(steps) or 'no record'}), which cannot be exported; "
            "export the float model and ask the export for int8 (--int8)"
        )
    return copy.deepcopy(model).float().cpu().eval(), steps


def example_inputs(model: CLIP, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels and full-length token ids to trace the two graphs with."""
    size = model.visual.cfg.image_size
    tokens = torch.zeros(batch, model.text_cfg.context_length, dtype=torch.long)
    tokens[:, -1] = model.text_cfg.vocab_size - 1
    return torch.zeros(batch, 3, size, size), tokens


def file_digest(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def write_export_record(
    out: Path, model: CLIP, engine: str, variants: dict[str, dict[str, list[str]]], default: str, steps: Sequence[dict[str, Any]], **extra: Any
) -> Path:
    """``clipforge_export.json`` for the graph files of ``variants`` ({variant: {tower: [files]}}), written last."""
    record = {
        "format": EXPORT_FORMAT,
        "engine": engine,
        "model": model.config.name,
        "config": model.config.to_dict(),
        "preprocess": model.preprocess_cfg.to_dict(),
        "logit_scale": model.logit_scale.detach().exp().item(),
        "logit_bias": None if model.logit_bias is None else model.logit_bias.detach().item(),
        "steps": list(steps),
        "default": default,
        "variants": variants,
        "digests": {name: file_digest(out / name) for files in variants.values() for names in files.values() for name in names},
        "provenance": getattr(model, "provenance", {}),
        **extra,
    }
    path = out / EXPORT_FILE
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(record, indent=2))
    return path


def read_export_record(directory: Path) -> dict[str, Any]:
    path = directory / EXPORT_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not a readable export record ({error})") from None
    if not isinstance(record, dict) or record.get("format") != EXPORT_FORMAT or record.get("engine") not in ENGINES:
        raise CheckpointError(f"{path}: not a clipforge export record (format {EXPORT_FORMAT!r}, engine one of {', '.join(ENGINES)})")
    for field in ("config", "preprocess", "logit_scale", "default", "variants", "digests"):
        if field not in record:
            raise CheckpointError(f"{path}: missing field {field!r}; re-export the model")
    return record


def _check_files(directory: Path, names: Sequence[str], digests: dict[str, str]) -> None:
    """Every graph file exists and is the file the export wrote (its SHA-256 is the recorded one)."""
    for name in names:
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing; re-export the model")
        if file_digest(path) != digests.get(name):
            raise CheckpointError(
                f"{path}: differs from the file this export wrote (SHA-256 in {EXPORT_FILE}); "
                "it is damaged or comes from another export: re-export the model"
            )


def _onnx_runner(directory: Path, names: Sequence[str], threads: int, precision: str, static: bool) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime

    if precision not in ("fp32", "default"):
        raise ConfigError(f"precision: onnxruntime runs the exported graphs in fp32 or int8, not {precision}; export to openvino for bf16")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # token-merging graphs make it warn about shapes it could not infer
    path = directory / names[0]
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own exception types for unreadable graphs
        raise CheckpointError(f"{path}: onnxruntime cannot read it ({str(error).splitlines()[0]})") from None
    input_name = session.get_inputs()[0].name
    return lambda array: session.run(None, {input_name: array})[0]


@functools.cache
def openvino_core() -> Any:
    """The process's one ``openvino.Core``: OpenVINO expects one per application, and creating many in one
    process has crashed it (ultralytics/ultralytics#25864, openvinotoolkit/openvino#35338)."""
    import openvino

    return openvino.Core()


class _OpenVinoGraph:
    """One IR graph compiled for the CPU; with ``static``, compiled once per input shape (the last few kept).

    OpenVINO's CPU plugin runs static shapes faster than dynamic ones (its performance guide says so; on
    ViT-B-32 int8, batch 32: 34 → 38 images/s), so the image graph is reshaped to each batch shape it
    meets; text keeps its dynamic length (every batch has another).
    """

    KEEP = 4

    def __init__(self, path: Path, settings: dict[str, Any], static: bool) -> None:
        self.core, self.settings, self.static, self.path = openvino_core(), settings, static, path
        try:
            self.graph = self.core.read_model(str(path))
        except RuntimeError as error:
            raise CheckpointError(f"{path}: OpenVINO cannot read it ({str(error).strip().splitlines()[0]})") from None
        self.requests = {None: self._compile(self.graph)} if not static else {}

    def _compile(self, graph: Any) -> Any:
        """An inference request of ``graph`` compiled for the CPU; a graph the plugin rejects is one line naming the file."""
        try:
            return self.core.compile_model(graph, "CPU", self.settings).create_infer_request()
        except RuntimeError as error:
            raise CheckpointError(f"{self.path}: OpenVINO cannot compile it ({str(error).strip().splitlines()[0]})") from None

    def __call__(self, array: np.ndarray) -> np.ndarray:
        key = array.shape if self.static else None
        if key not in self.requests:
            graph = self.graph.clone()
            graph.reshape(list(array.shape))
            if len(self.requests) >= self.KEEP:
                self.requests.pop(next(iter(self.requests)))
            self.requests[key] = self._compile(graph)
        return self.requests[key].infer([array])[0].copy()


def _openvino_runner(directory: Path, names: Sequence[str], threads: int, precision: str, static: bool) -> Callable[[np.ndarray], np.ndarray]:
    settings: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
    if precision != "default":
        settings["INFERENCE_PRECISION_HINT"] = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}[precision]
    return _OpenVinoGraph(directory / names[0], settings, static)


RUNNERS = {"onnxruntime": _onnx_runner, "openvino": _openvino_runner}


class ExportedCLIP:
    """Both towers of an export directory, run by onnxruntime or OpenVINO on the CPU, with ``CLIP``'s surface.

    ``encode_image``, ``encode_text``, ``preprocess``, ``tokenize``, ``config``, ``preprocess_cfg`` and
    ``logit_scale`` behave as on the PyTorch model, so ``clipforge.encode`` (and through it ``embed``,
    ``eval``, ``search`` and ``serve``) runs it unchanged. ``variant`` picks ``fp32`` or ``int8`` graphs (of
    ``variants``; the export's default otherwise); ``precision`` is OpenVINO's inference precision for float graphs (``fp32``,
    ``bf16``; the export's recorded one by default).
    """

    device = torch.device("cpu")

    def __init__(self, directory: str | Path, *, variant: str | None = None, precision: str | None = None, threads: int | None = None) -> None:
        self.directory = Path(directory)
        record = read_export_record(self.directory)
        self.engine: str = record["engine"]
        self.variants: list[str] = list(record["variants"])
        self.variant: str = variant or record["default"]
        if self.variant not in self.variants:
            raise ConfigError(f"{self.directory}: no {self.variant} graphs in this export (it has {', '.join(self.variants)})")
        try:
            self.config = ModelConfig.from_dict(record["config"], record.get("model"))
            self.preprocess_cfg = PreprocessConfig.from_dict(record["preprocess"])
        except ConfigError as error:
            raise CheckpointError(f"{self.directory / EXPORT_FILE}: {error}") from None
        self.logit_scale = torch.tensor(float(record["logit_scale"])).log()
        self.logit_bias = None if record.get("logit_bias") is None else torch.tensor(float(record["logit_bias"]))
        self.context_length = self.config.text.context_length
        steps = steps_of_record({"steps": record["steps"]}, str(self.directory / EXPORT_FILE)) if record.get("steps") else []
        self.compression = record_of(steps) if steps else None  # the steps baked into the graphs, as on a CLIP
        self.provenance = {**record.get("provenance", {}), "export": str(self.directory)}
        self.precision = precision or record.get("precision", "fp32")
        if self.variant == "int8" and precision is None:
            self.precision = "default"  # OpenVINO picks the precision of the ops NNCF left in float
        files = record["variants"][self.variant]
        threads = threads or torch.get_num_threads()
        runners = {}
        for tower in TOWERS:
            _check_files(self.directory, files[tower], record["digests"])
            runners[tower] = RUNNERS[self.engine](self.directory, files[tower], threads, self.precision, tower == "image")
        self._image, self._text = runners["image"], runners["text"]
        self._transform = image_transform(self.preprocess_cfg)
        self._tokenizer = get_tokenizer(self.context_length)

    def eval(self) -> ExportedCLIP:
        return self

    @property
    def runs(self) -> str:
        """The graphs that run and their inference precision: ``int8``, ``fp32``, ``fp32 (bf16)``."""
        shown = "" if self.precision in ("default", self.variant) else f" ({self.precision})"
        return f"{self.variant}{shown}"

    @property
    def label(self) -> str:
        """What runs the model, for tables: ``openvino int8``, ``onnxruntime fp32``, ``openvino fp32 (bf16)``."""
        return f"{self.engine} {self.runs}"

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Pixels [B, 3, H, W] (as ``preprocess`` makes them) → image embeddings [B, embed_dim], float32."""
        size = self.config.vision.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ConfigError(f"pixels: expected [batch, 3, {size}, {size}], got {tuple(pixels.shape)}")
        features = torch.from_numpy(self._image(pixels.detach().float().cpu().numpy()))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Token ids [B, L ≤ context length] → text embeddings [B, embed_dim], float32; the batch runs only up
        to its last end-of-text token."""
        if tokens.ndim != 2 or tokens.dtype.is_floating_point or tokens.shape[1] > self.context_length:
            raise ConfigError(f"tokens: expected integer ids [batch, ≤{self.context_length}], got {tokens.dtype} {tuple(tokens.shape)}")
        length = int(tokens.argmax(dim=-1).max()) + 1 if len(tokens) else 1
        features = torch.from_numpy(self._text(tokens[:, :length].cpu().numpy().astype(np.int64)))
        return F.normalize(features, dim=-1) if normalize else features

    def preprocess(self, image: Any) -> torch.Tensor:
        return self._transform(image)

    def tokenize(self, texts: str | list[str]) -> torch.Tensor:
        return self._tokenizer(texts)

    def __repr__(self) -> str:
        return f"ExportedCLIP({self.directory}, engine={self.engine}, variant={self.variant}, precision={self.precision})"


def load_exported(directory: str | Path, precision: str, device: str | torch.device) -> ExportedCLIP:
    """``clipforge.load`` of an export directory: CPU only; ``precision="fp32"`` (the default) keeps the export's own."""
    if torch.device(device).type != "cpu":
        raise ConfigError(f"{directory}: an exported model runs on the CPU (onnxruntime, OpenVINO), not {device}")
    return ExportedCLIP(directory, precision=None if precision == "fp32" else precision)


@dataclass(frozen=True)
class ExportCheck:
    """How far one variant of an export is from the PyTorch model on the same inputs."""

    label: str  # fp32 or int8
    max_abs_difference: float
    min_cosine: float


def check_export(model: CLIP, out_dir: str | Path) -> list[ExportCheck]:
    """Run every variant of the export and the model on two random images and two captions."""
    size = model.config.vision.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    captions = ["a photo of a dog", "two red circles on the left"]
    expected = torch.cat([encode_pixels(model, pixels), encode_texts(model, captions)])
    checks = []
    for variant in read_export_record(Path(out_dir))["variants"]:
        exported = ExportedCLIP(out_dir, variant=variant, precision="fp32" if variant == "fp32" else None)
        found = torch.cat([encode_pixels(exported, pixels), encode_texts(exported, captions)])
        cosine = F.cosine_similarity(found, expected).min().item()
        checks.append(ExportCheck(variant, (found - expected).abs().max().item(), cosine))
    return checks
