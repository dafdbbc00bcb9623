"""Model configurations.

A configuration is data: ``model_configs/*.json`` is the registry, with the same names and
hyper-parameters as open_clip's ``model_configs`` for the plain ViT family. Unlike open_clip,
every configuration states its activation (``"gelu"`` or ``"quick_gelu"``) explicitly: a silent
default that disagrees with the weights costs accuracy without any error.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from clipforge.errors import ConfigError

ACTIVATIONS = ("gelu", "quick_gelu")
POOL_TYPES = ("tok", "avg")
POS_EMBED_TYPES = ("learnable", "sin_cos_2d")


@dataclass(frozen=True)
class VisionConfig:
    """The ViT image tower (open_clip ``CLIPVisionCfg`` names)."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    head_width: int = 64
    mlp_ratio: float = 4.0
    pool_type: str = "tok"
    ls_init_value: float | None = None
    patch_dropout: float = 0.0
    pos_embed_type: str = "learnable"  # or "sin_cos_2d": fixed 2-D sine-cosine (MAE; Beyer et al. 2022)

    @property
    def heads(self) -> int:
        return self.width // self.head_width

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class TextConfig:
    """The causal text transformer (open_clip ``CLIPTextCfg`` names)."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    ls_init_value: float | None = None


@dataclass(frozen=True)
class ModelConfig:
    """A whole CLIP model: two towers, a shared embedding size and the contrastive head."""

    embed_dim: int
    activation: str
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation: {self.activation!r} is not one of {', '.join(ACTIVATIONS)}")
        if self.vision.pool_type not in POOL_TYPES:
            raise ConfigError(f"vision_cfg.pool_type: {self.vision.pool_type!r} is not one of {', '.join(POOL_TYPES)}")
        if self.vision.pos_embed_type not in POS_EMBED_TYPES:
            raise ConfigError(
                f"vision_cfg.pos_embed_type: {self.vision.pos_embed_type!r} is not one of {', '.join(POS_EMBED_TYPES)}"
            )
        if self.vision.image_size % self.vision.patch_size:
            raise ConfigError(
                f"vision_cfg.image_size: {self.vision.image_size} is not a multiple of patch_size {self.vision.patch_size}"
            )
        if self.vision.width % self.vision.head_width:
            raise ConfigError(f"vision_cfg.head_width: {self.vision.head_width} does not divide width {self.vision.width}")
        if self.text.width % self.text.heads:
            raise ConfigError(f"text_cfg.heads: {self.text.heads} does not divide width {self.text.width}")

    def with_image_size(self, image_size: int) -> ModelConfig:
        """The same model run at another resolution (position embeddings are interpolated on load)."""
        return dataclasses.replace(self, vision=dataclasses.replace(self.vision, image_size=image_size))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: open_clip's layout plus an explicit ``activation``."""
        out: dict[str, Any] = {
            "embed_dim": self.embed_dim,
            "activation": self.activation,
            "vision_cfg": dataclasses.asdict(self.vision),
            "text_cfg": dataclasses.asdict(self.text),
            "init_logit_scale": self.init_logit_scale,
        }
        if self.init_logit_bias is not None:
            out["init_logit_bias"] = self.init_logit_bias
        if self.name is not None:
            out["name"] = self.name
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], name: str | None = None) -> ModelConfig:
        """Validate and build a configuration; errors name the offending field."""
        if not isinstance(data, dict):
            raise ConfigError(f"{name or 'config'}: a model config is a JSON object, not {type(data).__name__}")
        data = dict(data)
        if "quick_gelu" in data and "activation" not in data:
            data["activation"] = "quick_gelu" if data.pop("quick_gelu") else "gelu"
        for required in ("embed_dim", "activation", "vision_cfg", "text_cfg"):
            if required not in data:
                raise ConfigError(f"{name or 'config'}: missing field {required!r}")
        vision = _build(VisionConfig, data.pop("vision_cfg"), "vision_cfg")
        text = _build(TextConfig, data.pop("text_cfg"), "text_cfg")
        data.setdefault("name", name)
        top = {f.name for f in dataclasses.fields(cls)} - {"vision", "text"}
        unknown = sorted(set(data) - top)
        if unknown:
            raise ConfigError(f"{name or 'config'}: unknown field {unknown[0]!r}")
        return cls(vision=vision, text=text, **data)


def _build(kind: type, values: dict[str, Any], prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix}: expected a JSON object of fields, got {values!r}")
    known = {f.name: f.default for f in dataclasses.fields(kind)}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{prefix}.{key}: unknown field (known: {', '.join(known)})")
        default = known[key]
        if value is None and default is None:
            continue
        if isinstance(default, str):
            if not isinstance(value, str):
                raise ConfigError(f"{prefix}.{key}: expected a string, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{prefix}.{key}: expected a number, got {value!r}")
    return kind(**values)


def _registry_dir() -> Path:
    return Path(str(resources.files("clipforge") / "model_configs"))


@cache
def _registry() -> dict[str, dict[str, Any]]:
    return {path.stem: json.loads(path.read_text()) for path in sorted(_registry_dir().glob("*.json"))}


def list_models() -> list[str]:
    """Names of the configurations shipped with clipforge."""
    return sorted(_registry(), key=_natural_key)


def get_model_config(name_or_path: str | Path) -> ModelConfig:
    """A registered configuration by name, or a JSON file on disk."""
    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}: not valid JSON ({error})") from None
        try:
            return ModelConfig.from_dict(data, name=path.stem)
        except ConfigError as error:  # name the file, not only the config's name (its stem)
            raise ConfigError(f"{path}: {str(error).removeprefix(f'{path.stem}: ')}") from None
    registry = _registry()
    if str(name_or_path) not in registry:
        raise ConfigError(f"unknown model config {str(name_or_path)!r}; `clipforge models` lists the known names")
    return ModelConfig.from_dict(registry[str(name_or_path)], name=str(name_or_path))


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]
