"""Reading and writing tensor files safely, and reconciling state-dict layouts (open_clip, OpenAI, training wrappers).

Nothing is ever unpickled beyond tensors: ``.safetensors`` files are read with safetensors, other files
with ``torch.load(weights_only=True)``, which refuses pickled code.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from clipforge._util.fileio import atomic_path
from clipforge.config import ModelConfig, TextConfig, VisionConfig
from clipforge.errors import CheckpointError, one_line

OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
CUSTOM_TEXT_KEYS = ("positional_embedding", "token_embedding.", "transformer.", "ln_final.", "text_projection")
IGNORED_KEYS = ("attn_mask", "text.transformer.embeddings.position_ids")


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's archive (PyTorch >= 1.6)
PICKLE_MAGIC = b"\x80"  # a pickle of protocol 2 or later: torch.save's legacy format


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and string metadata of a weights file; one-line ``CheckpointError`` when it is not one.

    The format is told by the file's first bytes, not its name: safetensors (an 8-byte header length, then the
    JSON header), a ``torch.save`` archive or legacy pickle; anything else (an image, a text file, a tar
    archive) is refused before a reader guesses at it.
    """
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    head = _first_bytes(path, 9)
    if path.suffix == ".safetensors" or _is_safetensors(head, path):
        return _read_safetensors(path)
    if not head.startswith((ZIP_MAGIC, PICKLE_MAGIC)):
        raise CheckpointError(
            f"{path}: not a checkpoint (expected a .safetensors file, a torch.save file such as .pt/.pth/.bin, or a "
            "checkpoint directory)"
        )
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" not in str(error) and "Unsupported class" not in str(error):
            raise CheckpointError(f"{path}: not a readable checkpoint (a damaged pickle)") from None
        raise CheckpointError(
            f"{path}: refused: it holds pickled Python objects besides tensors, and unpickling can run code; if you trust "
            "the file, convert it once (torch.load(path, weights_only=False), then safetensors.torch.save_file of its "
            "state dict; docs/models.md shows how)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as error:
        if "TorchScript" in str(error) or "constants.pkl" in str(error):
            raise CheckpointError(
                f"{path}: a TorchScript (JIT) archive; clipforge never runs pickled code — export its state_dict()"
            ) from None
        raise CheckpointError(f"{path}: not a readable checkpoint ({_shortened(one_line(error))})") from None
    return _unwrap(loaded, path), {}


def _first_bytes(path: Path, count: int) -> bytes:
    try:
        with path.open("rb") as handle:
            return handle.read(count)
    except OSError as error:
        raise CheckpointError(f"{path}: unreadable ({one_line(error)})") from None


def _is_safetensors(head: bytes, path: Path) -> bool:
    """A safetensors file begins with its JSON header's length (little-endian u64) and then ``{``."""
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({one_line(error)})") from None


def _shortened(text: str, limit: int = 200) -> str:
    """``text`` cut at a word boundary before ``limit`` characters, with an ellipsis when cut."""
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " …"


REQUIRED = object()


def metadata_json(metadata: dict[str, str], key: str, source: str | Path, default: Any = REQUIRED) -> Any:
    """The JSON value stored under ``key`` in a tensor file's metadata (``default`` when absent, if given); a
    one-line ``CheckpointError`` naming the file and the key when it is missing or not JSON."""
    if key not in metadata:
        if default is REQUIRED:
            raise CheckpointError(f"{source}: the metadata lacks {key!r}; the file was not written by clipforge.save")
        return default
    try:
        return json.loads(metadata[key])
    except ValueError as error:
        raise CheckpointError(f"{source}: the metadata's {key!r} is not JSON ({one_line(error)})") from None


def read_json(path: Path) -> Any:
    """A JSON file of a checkpoint directory (``config.json``, ``open_clip_config.json``, ...); one-line
    ``CheckpointError`` naming it when it is unreadable or not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable JSON file ({one_line(error)})") from None


def write_safetensors(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Tensors (copied to contiguous CPU memory) and string metadata in one ``.safetensors`` file, written atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({key: value.detach().contiguous().cpu() for key, value in tensors.items()}, str(tmp), metadata=metadata)
    return path


def weights_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's values as float32 (keys sorted; names and shapes included), in hex.

    The same weights give the same fingerprint whatever file format or precision (bf16, fp16) they were
    stored in, so a fine-tune can record the weights it started from and a merge can check its base.
    """
    digest = hashlib.sha256()
    for key in sorted(state):
        value = state[key].detach()
        value = value.float() if value.is_floating_point() else value
        digest.update(f"{key}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(value.cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _unwrap(loaded: Any, path: Path) -> dict[str, torch.Tensor]:
    """Find the state dict inside a training checkpoint (``{"state_dict": ...}``) and drop wrapper prefixes."""
    if isinstance(loaded, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict) or not loaded:
        raise CheckpointError(f"{path}: holds no state dict")
    state = {}
    for key, value in loaded.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{path}: not a state dict (key {key!r})")
        for prefix in WRAPPER_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix) :]
        state[key] = value
    return state


def is_openai_layout(state: dict[str, Any]) -> bool:
    """OpenAI's released state dicts carry these three integer entries beside the weights."""
    return all(key in state for key in OPENAI_EXTRA_KEYS)


def to_open_clip_layout(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Canonical open_clip ``CLIP`` keys: drop OpenAI's extras and buffers, un-nest ``CustomTextCLIP``'s ``text.``."""
    out = {}
    for key, value in state.items():
        if key in OPENAI_EXTRA_KEYS or key in IGNORED_KEYS or not isinstance(value, torch.Tensor):
            continue
        if key.startswith("text.") and key[5:].startswith(CUSTOM_TEXT_KEYS):
            key = key[5:]
        out[key] = value
    if "logit_scale" in out:
        out["logit_scale"] = out["logit_scale"].reshape(())
    if "logit_bias" in out:
        out["logit_bias"] = out["logit_bias"].reshape(())
    return out


def infer_architecture(state: dict[str, torch.Tensor], activation: str) -> ModelConfig:
    """A model config read off tensor shapes, as open_clip v3's ``build_model_from_openai_state_dict``."""
    try:
        conv = state["visual.conv1.weight"]
        vision_width, patch = conv.shape[0], conv.shape[-1]
        grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        vision_layers = _count_blocks(state, "visual.transformer.resblocks.")
        vision_hidden = state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        text_width = state["ln_final.weight"].shape[0]
        text_hidden = state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        embed_dim = state["text_projection"].shape[1]
        vision = VisionConfig(
            image_size=patch * grid,
            patch_size=patch,
            width=vision_width,
            layers=vision_layers,
            head_width=_head_width(vision_width),
            mlp_ratio=vision_hidden / vision_width,
            ls_init_value=1.0 if "visual.transformer.resblocks.0.ls_1.gamma" in state else None,
        )
        text = TextConfig(
            context_length=state["positional_embedding"].shape[0],
            vocab_size=state["token_embedding.weight"].shape[0],
            width=text_width,
            heads=text_width // 64,
            layers=_count_blocks(state, "transformer.resblocks."),
            mlp_ratio=text_hidden / text_width,
            ls_init_value=1.0 if "transformer.resblocks.0.ls_1.gamma" in state else None,
        )
    except KeyError as error:
        raise CheckpointError(f"not a CLIP ViT state dict: missing {error.args[0]!r}") from None
    return ModelConfig(
        embed_dim=embed_dim,
        activation=activation,
        vision=vision,
        text=text,
        init_logit_bias=0.0 if "logit_bias" in state else None,
    )


def _count_blocks(state: dict[str, torch.Tensor], prefix: str) -> int:
    return len({key[len(prefix) :].split(".")[0] for key in state if key.startswith(prefix)})


def _head_width(width: int) -> int:
    """open_clip's ViT head widths: 64 except ViT-H (80), ViT-g (88), ViT-bigG (104)."""
    return {1280: 80, 1408: 88, 1664: 104}.get(width, 64)


def check_state_dict(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str) -> None:
    """One error listing every missing, unexpected and mis-shaped key."""
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    misshaped = [
        f"{key} {tuple(state[key].shape)} vs {tuple(value.shape)}"
        for key, value in expected.items()
        if key in state and state[key].shape != value.shape
    ]
    if missing or unexpected or misshaped:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped (file vs model)", misshaped)):
            if keys:
                shown = ", ".join(keys[:6]) + (f", … ({len(keys)} in all)" if len(keys) > 6 else "")
                parts.append(f"{label}: {shown}")
        raise CheckpointError(f"{source}: weights do not fit the model — " + "; ".join(parts))
