"""Well-known open_clip pretrained tags: where the weights live and which preprocessing they expect.

The table (``assets/pretrained.json``) is data taken from open_clip's pretrained registry for the plain
ViT family. Weights download from the Hugging Face Hub with ``huggingface_hub`` only when the user asks
for a tag; offline, the error says exactly which file to fetch and where to put it.
"""

from __future__ import annotations

import json
import os
import socket
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from clipforge.errors import CheckpointError

WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
OFFLINE_PROBE_S = 3.0


@cache
def pretrained_table() -> dict[str, dict[str, dict[str, Any]]]:
    return json.loads((resources.files("clipforge") / "assets" / "pretrained.json").read_text())


def list_pretrained() -> list[tuple[str, str]]:
    """All ``(config name, tag)`` pairs clipforge knows how to fetch."""
    return [(model, tag) for model, tags in pretrained_table().items() for tag in tags]


def pretrained_entry(model: str, tag: str) -> dict[str, Any]:
    tags = pretrained_table().get(model)
    if not tags:
        raise CheckpointError(f"no pretrained weights are registered for {model!r}; `clipforge models` lists them")
    if tag not in tags:
        raise CheckpointError(f"{model}: unknown pretrained tag {tag!r} (known: {', '.join(tags)})")
    return tags[tag]


def cache_dir() -> Path:
    return Path(os.environ.get("CLIPFORGE_CACHE", Path.home() / ".cache" / "clipforge"))


def resolve_pretrained(model: str, tag: str) -> Path:
    """A local path to the weights of ``model``/``tag``: our cache, the Hub cache, or a download."""
    entry = pretrained_entry(model, tag)
    local_dir = cache_dir() / model / tag
    for name in WEIGHT_FILES:
        if (local_dir / name).is_file():
            return local_dir / name
    filenames = [entry["filename"]] if "filename" in entry else list(WEIGHT_FILES)
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    for filename in filenames:
        if isinstance(cached := try_to_load_from_cache(entry["hf_hub"], filename), str):
            return Path(cached)
    url = f"https://huggingface.co/{entry['hf_hub']}/resolve/main/{filenames[0]}"
    instead = f"fetch {url} and save it as {local_dir / filenames[0]}"
    if offline_reason := _offline():
        raise CheckpointError(f"{model}/{tag}: weights not cached and {offline_reason}; {instead}")
    errors = []
    for filename in filenames:
        try:
            return Path(hf_hub_download(entry["hf_hub"], filename))
        except Exception as error:  # noqa: BLE001 - any hub failure leads to the same instruction
            errors.append(type(error).__name__)
    raise CheckpointError(f"{model}/{tag}: weights not cached and the download failed ({', '.join(errors)}); {instead}")


def _offline() -> str | None:
    """Why a download cannot work, found in at most a few seconds (the Hub client would retry for about a minute):
    offline mode set, or no connection to the Hub's host (not probed behind a proxy, which may still reach it)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    host = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=OFFLINE_PROBE_S).close()
    except OSError as error:
        return f"{host} cannot be reached ({error.strerror or type(error).__name__}): this machine looks offline"
    return None
