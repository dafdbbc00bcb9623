"""The adapter file: one ``.safetensors`` file with a head's tensors and what it was fitted for.

Tensors: whatever the method stores (Tip-Adapter's cache keys, GDA's weights, CoOp's context vectors, …).
Metadata (strings): ``format`` = ``clipforge-adapter``, ``format_version``, ``method``, and JSON for
``settings`` (the method's hyper-parameters as fitted), ``extra`` (scalars the fit chose, e.g. Tip-Adapter's
α and β), ``classnames``, ``templates`` (the prompts of the zero-shot head), ``base_model`` (the fingerprint
of the model it was fitted on) and ``provenance`` (training data, shots, seed, skipped images).

Nothing here knows a method: ``clipforge.adapt.registry`` turns a record back into a head. Any head that can
be written as tensors plus JSON (issue #15's task heads too) fits the format.

The fingerprint is the SHA-256 of the model's weights rounded to bfloat16 (names, shapes and values, in name
order): the same weights loaded in float32 or bfloat16, or with compression steps that keep them (token
merging, dynamic int8), give the same fingerprint; any other model gives another.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from clipforge.compress.records import checkpoint_tensors
from clipforge.errors import CheckpointError
from clipforge.io.state_dict import read_tensors, write_safetensors

FORMAT = "clipforge-adapter"
FORMAT_VERSION = "1"
_JSON_FIELDS = ("settings", "extra", "classnames", "templates", "base_model", "provenance")


@dataclass
class AdapterRecord:
    """Everything an adapter file holds."""

    method: str
    tensors: dict[str, torch.Tensor]
    settings: dict[str, Any]
    classnames: list[str]
    templates: list[str] | dict[str, list[str]]
    base_model: dict[str, str]
    extra: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)


def model_fingerprint(model: Any) -> dict[str, str]:
    """``{"config": name, "sha256": digest}`` of the model's weights (see the module docstring)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(checkpoint_tensors(model).items()):
        values = tensor.detach().to("cpu", torch.bfloat16).contiguous()
        digest.update(f"{name}:{tuple(values.shape)};".encode())
        digest.update(values.view(torch.int16).numpy().tobytes())
    return {"config": str(model.config.name), "sha256": digest.hexdigest()}


def check_fingerprint(expected: dict[str, str], model: Any, what: str) -> None:
    """A one-line ``CheckpointError`` when ``model`` is not the model ``what`` was fitted on."""
    found = model_fingerprint(model)
    if found["sha256"] != expected.get("sha256"):
        raise CheckpointError(
            f"{what} was fitted on another model ({expected.get('config')}, weights {expected.get('sha256', '?')[:12]}); "
            f"this one is {found['config']}, weights {found['sha256'][:12]}"
        )


def write_adapter(path: str | os.PathLike[str], record: AdapterRecord) -> Path:
    """The record as one ``.safetensors`` file (atomic)."""
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "method": record.method}
    metadata.update({name: json.dumps(getattr(record, name)) for name in _JSON_FIELDS})
    tensors = record.tensors or {"_empty": torch.zeros(0)}  # safetensors files need at least one tensor
    return write_safetensors(path, tensors, metadata)


def read_adapter(path: str | os.PathLike[str]) -> AdapterRecord:
    """A record written by ``write_adapter``; one-line ``CheckpointError`` for anything else."""
    path = Path(path)
    tensors, metadata = read_tensors(path)
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a clipforge adapter file (metadata format {metadata.get('format')!r})")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: adapter format version {metadata.get('format_version')!r}, expected {FORMAT_VERSION}")
    try:
        values = {name: json.loads(metadata[name]) for name in _JSON_FIELDS}
        method = metadata["method"]
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"{path}: bad adapter metadata ({error})") from None
    tensors.pop("_empty", None)
    return AdapterRecord(method=method, tensors=tensors, **values)
