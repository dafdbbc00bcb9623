"""Reading and writing checkpoints in every supported format; nothing here runs a model or compresses one.

Detected formats: a config name (random initialisation), clipforge ``.safetensors`` (config and
preprocessing in the metadata), open_clip state dicts (``.pt``/``.bin``/``.safetensors``, also training
checkpoints wrapped in ``state_dict`` with ``module.`` prefixes), OpenAI-layout state dicts (config read
off the shapes), Hugging Face ``CLIPModel`` directories, and open_clip hub directories
(``open_clip_config.json``); well-known open_clip tags are fetched on request (``clipforge.io.pretrained``).

``read_checkpoint`` returns the model and, for a clipforge checkpoint, its compression record (the JSON
``model.compression`` held when it was saved); ``read_weights`` the weights without the model (model
merging streams them); ``write_checkpoint`` writes one ``.safetensors`` file with
config, preprocessing, provenance and that record in its metadata. ``clipforge.load``/``clipforge.save``
(``clipforge.api``) add the replay of the record (``clipforge.compress.records``) on top.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from clipforge.config import ModelConfig, get_model_config, list_models
from clipforge.errors import CheckpointError, ConfigError
from clipforge.io.hf import from_hf_state_dict, read_hf_directory
from clipforge.io.pretrained import pretrained_entry, resolve_pretrained
from clipforge.io.state_dict import (
    check_state_dict,
    infer_architecture,
    is_openai_layout,
    metadata_json,
    read_json,
    read_tensors,
    to_open_clip_layout,
    write_safetensors,
)
from clipforge.layers.pos_embed import resize_pos_embed
from clipforge.models.clip import CLIP
from clipforge.preprocess.transforms import PreprocessConfig

FORMAT = "clipforge"
FORMAT_VERSION = "1"


def read_checkpoint(
    source: str | os.PathLike[str],
    config: str | os.PathLike[str] | ModelConfig | None = None,
    image_size: int | None = None,
    *,
    pretrained: str | None = None,
) -> tuple[CLIP, Any]:
    """The float32 model in ``source`` (see the module docstring) and its compression record, or None.

    ``config`` overrides the architecture read from the source; ``image_size`` runs the model at another
    resolution (position embeddings interpolated); ``pretrained`` names an open_clip tag of the config ``source``.
    """
    explicit = _as_config(config)
    path = Path(source)
    if pretrained is not None:
        return _load_pretrained(str(source), pretrained, explicit, image_size), None
    if path.is_dir():
        return _load_directory(path, explicit, image_size), None
    if path.is_file() and path.suffix != ".json":
        return _load_file(path, explicit, image_size)
    if str(source) in list_models() or path.suffix == ".json":
        model_cfg = get_model_config(source)
        if image_size is not None:
            model_cfg = model_cfg.with_image_size(image_size)
        model = CLIP(model_cfg)
        model.provenance = {"source": f"random-init:{model_cfg.name}"}
        return model, None
    raise CheckpointError(f"{source}: no such file or directory, and not a model config name (`clipforge models`)")


def read_weights(
    source: str | os.PathLike[str], config: ModelConfig | None = None
) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, Any], Any]:
    """Config, state dict, provenance and compression record of a checkpoint file or directory.

    A clipforge ``.safetensors`` file is read as it is stored, without building the model: its tensors are
    not checked against the config (compare them with the model they are meant for, ``check_state_dict``).
    Other formats go through ``read_checkpoint``, with ``config`` as the architecture (needed for a bare
    open_clip state dict, which does not record its activation).
    """
    path = Path(source)
    if path.is_file() and path.suffix == ".safetensors":
        tensors, metadata = read_tensors(path)
        if metadata.get("format") == FORMAT:
            model_cfg = _config_from(metadata_json(metadata, "config", path), None, path)
            provenance = metadata_json(metadata, "provenance", path, default={})
            return model_cfg, tensors, provenance, metadata_json(metadata, "compression", path, default=None)
    model, compression = read_checkpoint(source, config)
    return model.config, model.state_dict(), model.provenance, compression


def write_checkpoint(
    model: CLIP,
    path: str | os.PathLike[str],
    provenance: dict[str, Any] | None = None,
    *,
    tensors: dict[str, torch.Tensor] | None = None,
    compression: Any = None,
) -> Path:
    """One ``.safetensors`` file (atomic): ``tensors`` (default: the state dict) plus config, preprocessing,
    provenance and the compression record in its metadata."""
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": json.dumps(model.config.to_dict()),
        "preprocess": json.dumps(model.preprocess_cfg.to_dict()),
        "provenance": json.dumps({**model.provenance, **(provenance or {})}),
    }
    if compression:
        metadata["compression"] = json.dumps(compression)
    return write_safetensors(path, model.state_dict() if tensors is None else tensors, metadata)


# -- format detection ---------------------------------------------------------------------------


def _as_config(config: str | os.PathLike[str] | ModelConfig | None) -> ModelConfig | None:
    if config is None or isinstance(config, ModelConfig):
        return config
    return get_model_config(config)


def _load_pretrained(name: str, tag: str, explicit: ModelConfig | None, image_size: int | None) -> CLIP:
    entry = pretrained_entry(name, tag)
    state, _ = read_tensors(resolve_pretrained(name, tag))
    model_cfg = explicit or dataclasses.replace(get_model_config(name), activation=entry["activation"])
    if model_cfg.activation != entry["activation"]:
        raise ConfigError(
            f"{name}/{tag} was trained with {entry['activation']} but config {model_cfg.name} uses "
            f"{model_cfg.activation}; use the matching -quickgelu / plain config"
        )
    preprocess = PreprocessConfig.from_dict({"size": model_cfg.vision.image_size, **entry.get("preprocess", {})})
    model = _build(model_cfg, to_open_clip_layout(state), preprocess, f"{name}/{tag}", image_size)
    model.provenance = {"source": f"open_clip:{name}/{tag}"}
    return model


def _load_directory(path: Path, explicit: ModelConfig | None, image_size: int | None) -> CLIP:
    if (path / "open_clip_config.json").is_file():
        hub = read_json(path / "open_clip_config.json")
        model_cfg = explicit or _config_from(hub.get("model_cfg", {}) if isinstance(hub, dict) else hub, path.name, path)
        preprocess = _preprocess_from_open_clip(hub.get("preprocess_cfg", {}), model_cfg)
        weights = next((path / n for n in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin") if (path / n).is_file()), None)
        if weights is None:
            raise CheckpointError(f"{path}: open_clip directory without open_clip_model.safetensors or open_clip_pytorch_model.bin")
        state, _ = read_tensors(weights)
        model = _build(model_cfg, to_open_clip_layout(state), preprocess, str(path), image_size)
        model.provenance = {"source": f"open_clip-dir:{path}"}
        return model
    if (path / "config.json").is_file():
        model_cfg, state, processor = read_hf_directory(path)
        preprocess = _preprocess_from_hf(processor, explicit or model_cfg)
        model = _build(explicit or model_cfg, state, preprocess, str(path), image_size)
        model.provenance = {"source": f"huggingface:{path}"}
        return model
    raise CheckpointError(f"{path}: a directory with neither config.json (Hugging Face) nor open_clip_config.json")


def _load_file(path: Path, explicit: ModelConfig | None, image_size: int | None) -> tuple[CLIP, Any]:
    """The model in the file, and the compression record (replayed by ``load``) of a clipforge checkpoint."""
    tensors, metadata = read_tensors(path)
    if metadata.get("format") == FORMAT:
        model_cfg = explicit or _config_from(metadata_json(metadata, "config", path), None, path)
        try:
            preprocess = PreprocessConfig.from_dict(metadata_json(metadata, "preprocess", path))
        except ConfigError as error:
            raise CheckpointError(f"{path}: {error}") from None
        model = _build(model_cfg, tensors, preprocess, str(path), image_size)
        model.provenance = metadata_json(metadata, "provenance", path, default={})
        return model, metadata_json(metadata, "compression", path, default=None)
    if any(key.startswith(("vision_model.", "text_model.")) for key in tensors):
        state = from_hf_state_dict(tensors)
        layout = "huggingface"
    else:
        state = to_open_clip_layout(tensors)
        layout = "openai" if is_openai_layout(tensors) else "open_clip"
    model_cfg = explicit or _config_for_bare_state(state, layout, path)
    model = _build(model_cfg, state, PreprocessConfig(size=model_cfg.vision.image_size), str(path), image_size)
    model.provenance = {"source": f"{layout}:{path}"}
    return model, None


NAME_THE_CONFIG = "name it with --config (config= in Python):"


def _config_from(values: Any, name: str | None, source: Path) -> ModelConfig:
    """A model config from a checkpoint's JSON; its errors name the checkpoint."""
    if not isinstance(values, dict):
        raise CheckpointError(f"{source}: the model config is not a JSON object")
    try:
        return ModelConfig.from_dict(values, name=name)
    except ConfigError as error:
        raise CheckpointError(f"{source}: {error}") from None


def _config_for_bare_state(state: dict[str, torch.Tensor], layout: str, path: Path) -> ModelConfig:
    """The architecture read off the shapes; the activation only where the layout settles it. Its errors name
    the file (shapes no architecture explains, e.g. a head width that is not the usual 64)."""
    try:
        shape_only = infer_architecture(state, activation="gelu")
    except ConfigError as error:
        raise CheckpointError(
            f"{path}: the architecture cannot be read off this {layout} state dict ({error}); {NAME_THE_CONFIG} a config"
        ) from None
    matches = [name for name in list_models() if _same_architecture(get_model_config(name), shape_only)]
    if layout == "openai":  # every OpenAI release was trained with QuickGELU
        named = [m for m in matches if get_model_config(m).activation == "quick_gelu"]
        return get_model_config(named[0]) if named else infer_architecture(state, activation="quick_gelu")
    hint = " or ".join(repr(m) for m in matches) or "a config JSON file with an explicit activation"
    raise CheckpointError(
        f"{path}: a bare {layout} state dict does not record its activation (gelu or quick_gelu); {NAME_THE_CONFIG} {hint}"
    )


def _same_architecture(a: ModelConfig, b: ModelConfig) -> bool:
    fields = ("image_size", "patch_size", "width", "layers", "mlp_ratio")
    same_vision = all(abs(getattr(a.vision, f) - getattr(b.vision, f)) < 1e-3 for f in fields)
    return same_vision and a.text == b.text and a.embed_dim == b.embed_dim and (a.vision.ls_init_value is None) == (
        b.vision.ls_init_value is None
    )


def _build(
    model_cfg: ModelConfig,
    state: dict[str, torch.Tensor],
    preprocess: PreprocessConfig,
    source: str,
    image_size: int | None,
) -> CLIP:
    if image_size is not None and image_size != model_cfg.vision.image_size:
        model_cfg = model_cfg.with_image_size(image_size)
        preprocess = PreprocessConfig.from_dict({**preprocess.to_dict(), "size": image_size})
    model = CLIP(model_cfg, preprocess)
    expected = model.state_dict()
    key = "visual.positional_embedding"
    if key in state and key in expected and state[key].shape[0] != expected[key].shape[0]:
        state = {**state, key: resize_pos_embed(state[key], model_cfg.vision.grid_size)}
    check_state_dict(expected, state, source)
    model.load_state_dict(state, strict=True)
    return model


def _preprocess_from_open_clip(cfg: dict[str, Any], model_cfg: ModelConfig) -> PreprocessConfig:
    known = {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg}
    for key in ("mean", "std"):
        if key in known:
            known[key] = tuple(known[key])
    return PreprocessConfig.from_dict({"size": model_cfg.vision.image_size, **known})


def _preprocess_from_hf(processor: dict[str, Any] | None, model_cfg: ModelConfig) -> PreprocessConfig:
    if processor is None:
        return PreprocessConfig(size=model_cfg.vision.image_size)
    crop = processor.get("crop_size", model_cfg.vision.image_size)
    size = crop.get("height", model_cfg.vision.image_size) if isinstance(crop, dict) else int(crop)
    values: dict[str, Any] = {"size": size, "interpolation": "bicubic" if processor.get("resample", 3) == 3 else "bilinear"}
    for ours, theirs in (("mean", "image_mean"), ("std", "image_std")):
        if theirs in processor:
            values[ours] = tuple(processor[theirs])
    return PreprocessConfig.from_dict(values)
