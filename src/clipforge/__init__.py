"""clipforge: the whole life of a CLIP-ViT model.

    import clipforge
    model = clipforge.load("ViT-B-32")            # or a checkpoint file / Hugging Face directory
    pixels = model.preprocess(image)
    tokens = model.tokenize(["a dog", "a cat"])
    image_features, text_features, logit_scale = model(pixels[None], tokens)
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load": "clipforge.api",
    "save": "clipforge.api",
    "CLIP": "clipforge.models.clip",
    "ModelConfig": "clipforge.config",
    "list_models": "clipforge.config",
    "get_model_config": "clipforge.config",
    "ClipforgeError": "clipforge.errors",
}


def __getattr__(name: str) -> Any:
    """Import heavy modules (torch) only when their names are used, so ``clipforge --help`` is instant."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'clipforge' has no attribute {name!r}")


__all__ = sorted(_LAZY)
