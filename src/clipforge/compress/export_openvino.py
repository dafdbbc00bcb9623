"""OpenVINO export of both towers, with NNCF post-training int8, as a directory ``clipforge.load`` reads.

    from clipforge.compress.export_openvino import export_openvino
    export_openvino(model, "clip-ov", int8=True, calibration_images=pixels, calibration_texts=prompts)
    clip = clipforge.load("clip-ov")                 # an ExportedCLIP running the int8 IR in OpenVINO

The graphs are converted from PyTorch with ``openvino.convert_model`` (a float32 CPU copy; dynamic batch, and
dynamic length for text) and saved as IR with float32 weights. ``int8`` quantizes both with NNCF's
post-training quantization (``nncf.quantize``, ``model_type=TRANSFORMER``: MatMuls and their inputs in int8,
SmoothQuant and fast bias correction, as NNCF and optimum-intel recommend for transformer encoders) on
the given calibration pixels and texts; the float IR stays beside it as the ``fp32`` variant. A token
reduction the model records (ToMe, PiToMe, EViT) is converted with the image graph: its token counts depend
only on the image size, so every shape inside stays static. A model that records bf16 is exported in
float32 with bf16 as its recorded inference precision (OpenVINO's ``INFERENCE_PRECISION_HINT``).

openvino and nncf are the optional ``openvino`` extra (``pip install clipforge[openvino]``).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from clipforge.compress.exported import (
    ImageGraph,
    TextGraph,
    example_inputs,
    float_copy_for_export,
    write_export_record,
)
from clipforge.compress.records import number_format
from clipforge.errors import ConfigError
from clipforge.layers.attention import Attention
from clipforge.models.clip import CLIP

IMAGE_FILE, TEXT_FILE = "image_encoder.xml", "text_encoder.xml"
CALIBRATION_BATCH = 32
TOKEN_REDUCTION_PATTERN = ".*token_reduction.*"
"""Graph nodes NNCF leaves in float: the token reduction's similarity products (int8 there could change which
tokens merge) and its merge product (a data movement: int8 there would round the residual stream)."""


def ir_files(xml_name: str, prefix: str = "") -> list[str]:
    """The two files of one IR graph: ``[prefix + name.xml, prefix + name.bin]``."""
    return [prefix + xml_name, prefix + xml_name.removesuffix(".xml") + ".bin"]


def require_openvino() -> Any:
    try:
        import openvino
    except ImportError:
        raise ConfigError("OpenVINO export needs the openvino extra: pip install 'clipforge[openvino]'") from None
    return openvino


def export_openvino(
    model: CLIP,
    out_dir: str | Path,
    *,
    int8: bool = False,
    calibration_images: torch.Tensor | None = None,
    calibration_texts: Sequence[str] | None = None,
    progress: bool = False,
) -> Path:
    """Write the float IR of both towers (and with ``int8`` their NNCF-quantized IR) and ``clipforge_export.json``.

    ``calibration_images`` are preprocessed pixels [N, 3, H, W] and ``calibration_texts`` the texts the
    model will see (class prompts, captions); both are needed for ``int8`` and run in batches of 32.
    """
    openvino = require_openvino()
    if int8 and (calibration_images is None or not len(calibration_images) or not calibration_texts):
        raise ConfigError("int8: NNCF calibrates on data; give calibration images and texts (--calibration DATA)")
    model, steps = float_copy_for_export(model, "OpenVINO")
    split_projections(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pixels, tokens = example_inputs(model)
    size = model.visual.cfg.image_size
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", (torch.jit.TracerWarning, DeprecationWarning, UserWarning))
        image = openvino.convert_model(ImageGraph(model), example_input=pixels, input=[openvino.PartialShape([-1, 3, size, size])])
        text = openvino.convert_model(TextGraph(model), example_input=tokens, input=[(openvino.PartialShape([-1, -1]), openvino.Type.i64)])
    graphs = {"fp32": {"image": image, "text": text}}
    if int8:
        graphs["int8"] = {
            "image": _quantize(image, list(calibration_images.split(CALIBRATION_BATCH)), progress),
            "text": _quantize(text, _token_batches(model, calibration_texts), progress),
        }
    variants: dict[str, dict[str, list[str]]] = {}
    for variant, towers in graphs.items():
        prefix = "" if variant == "fp32" else f"{variant}/"
        (out / prefix).mkdir(exist_ok=True)
        variants[variant] = {}
        for tower, graph in towers.items():
            names = ir_files(IMAGE_FILE if tower == "image" else TEXT_FILE, prefix)
            openvino.save_model(graph, out / names[0], compress_to_fp16=False)
            variants[variant][tower] = names
    precision = "bf16" if number_format(steps) == "bf16" else "fp32"
    extra = {"precision": precision, "openvino": openvino.__version__}
    write_export_record(out, model, "openvino", variants, "int8" if int8 else "fp32", steps, **extra)
    return out


class GraphAttention(Attention):
    """``Attention`` as the OpenVINO graphs take it: q, k and v from three products on row slices of the fused
    weight, each viewed to heads and transposed — the form of ``nn.MultiheadAttention``'s graph, whose
    transposes and quantizers OpenVINO folds into its attention kernel. Traced from the fused product and one
    5-d permute, the int8 graphs ran ViT-B-32 at 221 images/s and 831 texts/s, from this form at 265 and 1,308
    (AMX Xeon, 2 threads, batch 32 and 64). ONNX Runtime's int8 graph is slower this way (texts 774 → 646 per
    second; likely one dynamic quantization of the input per product), so ``export_onnx`` keeps the fused one."""

    def project_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, tokens, width = x.shape
        weights, biases = self.in_proj_weight.split(width), self.in_proj_bias.split(width)
        return tuple(
            F.linear(x, weight, bias).view(batch, tokens, self.heads, self.head_dim).transpose(1, 2)
            for weight, bias in zip(weights, biases, strict=True)
        )


def split_projections(model: torch.nn.Module) -> None:
    """Make every plain ``Attention`` of ``model`` (an export copy) a ``GraphAttention``, in place: same
    parameters and outputs."""
    for module in model.modules():
        if type(module) is Attention:
            module.__class__ = GraphAttention


def calibration_set(model: CLIP, spec: str, samples: int) -> tuple[torch.Tensor, list[str]]:
    """Preprocessed pixels of the first ``samples`` images of the eval dataset ``spec`` (a synthetic task, a
    class folder, a table, shards: ``clipforge.eval.datasets.load_dataset``) and its class prompts."""
    from clipforge.data.formats.images import read_image
    from clipforge.eval.datasets import load_dataset
    from clipforge.eval.zeroshot import fill_template

    dataset = load_dataset(spec, samples=samples)
    count = min(samples, len(dataset))
    pixels = torch.stack([model.preprocess(read_image(dataset.images[i])) for i in range(count)])
    templates = dataset.templates
    if isinstance(templates, dict):  # per-class descriptions (CuPL)
        return pixels, [text for name in dataset.classnames for text in templates[name]]
    return pixels, [fill_template(template, name) for name in dataset.classnames for template in templates]


def _token_batches(model: CLIP, texts: Sequence[str]) -> list[torch.Tensor]:
    """Token ids of ``texts`` in batches, each cut after its last end-of-text token (as the runtime feeds them)."""
    batches = []
    for start in range(0, len(texts), CALIBRATION_BATCH):
        tokens = model.tokenize(list(texts[start : start + CALIBRATION_BATCH]))
        batches.append(tokens[:, : int(tokens.argmax(dim=-1).max()) + 1])
    return batches


def _quantize(graph: Any, batches: list[torch.Tensor], progress: bool) -> Any:
    """NNCF post-training int8 of one graph on ``batches`` (every batch used for statistics), token reduction
    left out (``TOKEN_REDUCTION_PATTERN``)."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # nncf's import warns there is no CUDA
    import nncf

    ignored = nncf.IgnoredScope(patterns=[TOKEN_REDUCTION_PATTERN], validate=False)
    logging.getLogger("nncf").setLevel(logging.INFO if progress else logging.ERROR)
    dataset = nncf.Dataset([batch.numpy() for batch in batches])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nncf.quantize(graph, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(batches), ignored_scope=ignored)
