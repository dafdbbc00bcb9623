"""The exit-heads file: one ``.safetensors`` file, the heads' weights and what they were made for.

Tensors: the ``ExitHeads`` state dict (``exits.<layer>.…``). Metadata (strings): ``format`` =
``clipforge-exit-heads``, ``layers`` and ``kinds`` (JSON lists), ``num_layers`` (blocks of the image tower),
``width`` and ``embed_dim`` (the tower's ``proj`` shape) and ``threshold`` (JSON number or ``null``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from clipforge.compress.early_exit.heads import ExitHeads, check_number
from clipforge.errors import CheckpointError, ConfigError
from clipforge.io.state_dict import read_tensors, write_safetensors
from clipforge.models.vit import image_tower

FORMAT = "clipforge-exit-heads"


def save_exit_heads(heads: ExitHeads, path: str | os.PathLike[str], threshold: float | None = None) -> Path:
    """The heads' weights in one ``.safetensors`` file; layers, kinds, tower shape and threshold in its metadata."""
    if threshold is not None:
        check_number("threshold", threshold, 0.0)
    head = next(iter(heads.exits.values()))
    metadata = {
        "format": FORMAT,
        "layers": json.dumps(heads.layers),
        "kinds": json.dumps(heads.kinds),
        "num_layers": str(heads.num_layers),
        "width": str(head.proj.shape[0]),
        "embed_dim": str(head.proj.shape[1]),
        "threshold": json.dumps(threshold),
    }
    return write_safetensors(path, heads.state_dict(), metadata)


def load_exit_heads(path: str | os.PathLike[str], model: nn.Module) -> tuple[ExitHeads, float | None]:
    """Heads saved by ``save_exit_heads`` for ``model``'s image tower, in eval mode, and the saved threshold."""
    path = Path(path)
    tensors, metadata = read_tensors(path)
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an exit-heads file (metadata format {metadata.get('format')!r})")
    tower = image_tower(model)
    expected = {"num_layers": tower.cfg.layers, "width": tower.proj.shape[0], "embed_dim": tower.proj.shape[1]}
    try:
        for field, value in expected.items():
            if int(metadata[field]) != value:
                raise CheckpointError(f"{path}: {field} {metadata[field]} does not fit the model's image tower ({value})")
        layers, kinds, threshold = (json.loads(metadata[key]) for key in ("layers", "kinds", "threshold"))
        heads = ExitHeads(model, layers, kinds)
    except (KeyError, ValueError, ConfigError) as error:
        raise CheckpointError(f"{path}: bad exit-heads metadata ({error})") from None
    missing = sorted(set(heads.state_dict()) - set(tensors))
    unexpected = sorted(set(tensors) - set(heads.state_dict()))
    if missing or unexpected:
        raise CheckpointError(f"{path}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    try:
        heads.load_state_dict(tensors)
    except RuntimeError as error:
        raise CheckpointError(f"{path}: {' '.join(str(error).split())[:300]}") from None
    return heads.eval(), threshold
