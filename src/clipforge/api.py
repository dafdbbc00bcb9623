"""``clipforge.load`` and ``clipforge.save``: one entry point for every checkpoint format.

``load`` reads the model with ``clipforge.io.checkpoint.read_checkpoint`` (every format it detects), casts it
to ``precision`` and ``device``, and replays the compression steps a clipforge checkpoint records
(``clipforge.compress.records``: token merging or pruning, bf16, int8-dynamic), so a compressed model loads
as it was saved. ``save`` writes the weights the steps start from (the float weights an int8-dynamic model
kept) and the record, with ``clipforge.io.checkpoint.write_checkpoint``.

Code below this layer (``io``, ``train``) reads and writes checkpoints through ``clipforge.io`` directly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from clipforge.compress.exported import ExportedCLIP, is_export_dir, load_exported
from clipforge.compress.records import checkpoint_tensors, restore_compression
from clipforge.config import ModelConfig
from clipforge.errors import ConfigError
from clipforge.io.checkpoint import read_checkpoint, write_checkpoint
from clipforge.models.clip import CLIP

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load(
    source: str | os.PathLike[str],
    config: str | os.PathLike[str] | ModelConfig | None = None,
    precision: str = "fp32",
    image_size: int | None = None,
    *,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
) -> CLIP | ExportedCLIP:
    """A ready-to-use model (eval mode) from a checkpoint file, a directory, a config name or a pretrained tag.

    ``config`` overrides the architecture read from the source (needed for bare open_clip state dicts);
    ``image_size`` runs the model at another resolution; ``pretrained`` names an open_clip tag of the config
    ``source`` (downloaded on request). A checkpoint that records bf16 or int8 decides the precision.
    An export directory (``clipforge compress onnx|openvino``) loads as an ``ExportedCLIP`` on the CPU.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    if is_export_dir(source):
        if config is not None or image_size is not None or pretrained is not None:
            raise ConfigError(f"{source}: an export directory fixes its architecture and size; drop config, image_size and pretrained")
        return load_exported(source, precision, device)
    model, compression = read_checkpoint(source, config, image_size, pretrained=pretrained)
    model = model.to(device=device, dtype=PRECISIONS[precision]).eval()
    if compression is not None:
        model = restore_compression(model, compression, precision=precision, source=str(source))
    return model


def save(model: CLIP, path: str | os.PathLike[str], provenance: dict[str, Any] | None = None) -> Path:
    """One ``.safetensors`` file: weights plus config, preprocessing, provenance and compression steps (atomic)."""
    return write_checkpoint(
        model, path, provenance, tensors=checkpoint_tensors(model), compression=getattr(model, "compression", None)
    )
