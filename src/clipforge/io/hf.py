"""Two-way conversion between clipforge (open_clip layout) and Hugging Face ``transformers.CLIPModel``.

The key mapping follows transformers' ``convert_clip_original_pytorch_to_hf.py``: the fused
``in_proj_weight`` splits into ``q_proj``/``k_proj``/``v_proj`` (in that order) and the two projections
are transposed (open_clip stores ``[in, out]``, ``nn.Linear`` stores ``[out, in]``). The activation travels
as ``hidden_act`` (``"gelu"`` or ``"quick_gelu"``), so a GELU model never silently runs as QuickGELU.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from clipforge._util.fileio import atomic_path
from clipforge.config import ModelConfig, TextConfig, VisionConfig
from clipforge.errors import CheckpointError
from clipforge.io.state_dict import read_json, read_tensors, write_safetensors
from clipforge.models.clip import CLIP

_BLOCK_RENAMES = (
    ("ln_1.", "layer_norm1."),
    ("ln_2.", "layer_norm2."),
    ("attn.out_proj.", "self_attn.out_proj."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
)
_DIRECT = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "logit_scale": "logit_scale",
}
_NORMS = {
    "visual.ln_pre.": "vision_model.pre_layrnorm.",
    "visual.ln_post.": "vision_model.post_layernorm.",
    "ln_final.": "text_model.final_layer_norm.",
}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_TOWERS = (("visual.transformer.resblocks.", "vision_model.encoder.layers."), ("transformer.resblocks.", "text_model.encoder.layers."))
_HF_IGNORED = re.compile(r".*embeddings\.position_ids$")


def to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip-layout tensors → ``CLIPModel`` tensors."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in _DIRECT:
            out[_DIRECT[key]] = value
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.T.contiguous()
        elif any(key.startswith(norm) for norm in _NORMS):
            prefix = next(norm for norm in _NORMS if key.startswith(norm))
            out[_NORMS[prefix] + key[len(prefix) :]] = value
        else:
            out.update(_block_to_hf(key, value))
    return out


def _block_to_hf(key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    for ours, theirs in _TOWERS:
        if key.startswith(ours):
            index, rest = key[len(ours) :].split(".", 1)
            base = f"{theirs}{index}."
            if rest.startswith("attn.in_proj_"):
                kind = rest.rsplit("_", 1)[1]  # weight | bias
                return {f"{base}self_attn.{name}_proj.{kind}": part for name, part in zip("qkv", value.chunk(3, dim=0))}
            for old, new in _BLOCK_RENAMES:
                if rest.startswith(old):
                    return {base + new + rest[len(old) :]: value}
    raise CheckpointError(f"no Hugging Face CLIP equivalent for {key!r} (layer scale, logit_bias and avg pooling are not in CLIPModel)")


def from_hf_state_dict(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``CLIPModel`` tensors → open_clip-layout tensors (the inverse of ``to_hf_state_dict``)."""
    inverse_direct = {v: k for k, v in _DIRECT.items()}
    inverse_transposed = {v: k for k, v in _TRANSPOSED.items()}
    out: dict[str, torch.Tensor] = {}
    pending_qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in hf_state.items():
        if _HF_IGNORED.match(key):
            continue
        if key in inverse_direct:
            out[inverse_direct[key]] = value
        elif key in inverse_transposed:
            out[inverse_transposed[key]] = value.T.contiguous()
        elif any(key.startswith(norm) for norm in _NORMS.values()):
            ours, theirs = next((o, t) for o, t in _NORMS.items() if key.startswith(t))
            out[ours + key[len(theirs) :]] = value
        else:
            match = re.fullmatch(r"(.*)self_attn\.([qkv])_proj\.(weight|bias)", key)
            if match:
                pending_qkv.setdefault(f"{match[1]}attn.in_proj_{match[3]}", {})[match[2]] = value
            else:
                out[_block_from_hf(key)] = value
    for fused_key, parts in pending_qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"Hugging Face checkpoint lacks some of q/k/v for {fused_key}")
        out[_block_from_hf(fused_key, renamed=True)] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def _block_from_hf(key: str, renamed: bool = False) -> str:
    for ours, theirs in _TOWERS:
        if key.startswith(theirs):
            index, rest = key[len(theirs) :].split(".", 1)
            if not renamed:
                for old, new in _BLOCK_RENAMES:
                    if rest.startswith(new):
                        rest = old + rest[len(new) :]
                        break
                else:
                    raise CheckpointError(f"unexpected Hugging Face CLIP key {key!r}")
            return f"{ours}{index}.{rest}"
    raise CheckpointError(f"unexpected Hugging Face CLIP key {key!r}")


def hf_config_dict(config: ModelConfig) -> dict[str, Any]:
    """The ``config.json`` of a ``CLIPModel`` with the same architecture and activation."""
    if config.vision.pool_type != "tok" or config.vision.ls_init_value is not None or config.text.ls_init_value is not None:
        raise CheckpointError(f"{config.name or 'model'}: avg pooling and layer scale have no Hugging Face CLIPModel equivalent")
    if config.init_logit_bias is not None:
        raise CheckpointError(f"{config.name or 'model'}: logit_bias (SigLIP head) has no Hugging Face CLIPModel equivalent")
    vision, text = config.vision, config.text
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": config.embed_dim,
        "logit_scale_init_value": config.init_logit_scale,
        "text_config": {
            "vocab_size": text.vocab_size,
            "hidden_size": text.width,
            "intermediate_size": int(text.width * text.mlp_ratio),
            "num_hidden_layers": text.layers,
            "num_attention_heads": text.heads,
            "max_position_embeddings": text.context_length,
            "hidden_act": config.activation,
            "layer_norm_eps": 1e-5,
            "projection_dim": config.embed_dim,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 1,
        },
        "vision_config": {
            "hidden_size": vision.width,
            "intermediate_size": int(vision.width * vision.mlp_ratio),
            "num_hidden_layers": vision.layers,
            "num_attention_heads": vision.heads,
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "num_channels": 3,
            "hidden_act": config.activation,
            "layer_norm_eps": 1e-5,
            "projection_dim": config.embed_dim,
        },
    }


def config_from_hf(hf: dict[str, Any], source: str) -> ModelConfig:
    """A clipforge config from a ``CLIPModel`` ``config.json``; errors name the field."""
    if not isinstance(hf, dict):
        raise CheckpointError(f"{source}: config.json holds {type(hf).__name__}, not a JSON object")
    if hf.get("model_type") != "clip":
        raise CheckpointError(f"{source}: model_type is {hf.get('model_type')!r}, not 'clip'")
    text, vision = hf.get("text_config") or {}, hf.get("vision_config") or {}
    acts = {text.get("hidden_act", "quick_gelu"), vision.get("hidden_act", "quick_gelu")}
    if len(acts) != 1 or not acts <= {"gelu", "quick_gelu"}:
        raise CheckpointError(f"{source}: hidden_act {sorted(acts)} is not one shared 'gelu' or 'quick_gelu'")
    for tower in (text, vision):
        if tower.get("layer_norm_eps", 1e-5) != 1e-5:
            raise CheckpointError(f"{source}: layer_norm_eps {tower['layer_norm_eps']} is not 1e-5")
    v_width, t_width = vision.get("hidden_size", 768), text.get("hidden_size", 512)
    return ModelConfig(
        embed_dim=hf.get("projection_dim", 512),
        activation=acts.pop(),
        vision=VisionConfig(
            image_size=vision.get("image_size", 224),
            patch_size=vision.get("patch_size", 32),
            width=v_width,
            layers=vision.get("num_hidden_layers", 12),
            head_width=v_width // vision.get("num_attention_heads", 12),
            mlp_ratio=vision.get("intermediate_size", 3072) / v_width,
        ),
        text=TextConfig(
            context_length=text.get("max_position_embeddings", 77),
            vocab_size=text.get("vocab_size", 49408),
            width=t_width,
            heads=text.get("num_attention_heads", 8),
            layers=text.get("num_hidden_layers", 12),
            mlp_ratio=text.get("intermediate_size", 2048) / t_width,
        ),
        init_logit_scale=hf.get("logit_scale_init_value", 2.6592),
    )


def read_hf_directory(directory: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, Any] | None]:
    """Config, open_clip-layout tensors and the image-processor settings of a ``CLIPModel`` directory."""
    config = config_from_hf(read_json(directory / "config.json"), str(directory))
    weights = [directory / name for name in ("model.safetensors", "pytorch_model.bin") if (directory / name).is_file()]
    if not weights:
        raise CheckpointError(f"{directory}: no model.safetensors or pytorch_model.bin (sharded checkpoints are not supported)")
    hf_state, _ = read_tensors(weights[0])
    processor_file = directory / "preprocessor_config.json"
    processor = read_json(processor_file) if processor_file.is_file() else None
    return config, from_hf_state_dict(hf_state), processor


def save_hf(model: CLIP, directory: str | os.PathLike[str]) -> Path:
    """A Hugging Face ``CLIPModel`` directory (``config.json``, ``model.safetensors``, ``preprocessor_config.json``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = hf_config_dict(model.config)
    tensors = to_hf_state_dict({key: value.float() for key, value in model.state_dict().items()})
    write_safetensors(directory / "model.safetensors", tensors, {"format": "pt"})
    pre = model.preprocess_cfg
    processor = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": pre.size},
        "do_center_crop": True,
        "crop_size": {"height": pre.size, "width": pre.size},
        "resample": 3 if pre.interpolation == "bicubic" else 2,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(pre.mean),
        "image_std": list(pre.std),
        "do_convert_rgb": True,
    }
    for name, content in (("config.json", config), ("preprocessor_config.json", processor)):
        with atomic_path(directory / name) as tmp:
            tmp.write_text(json.dumps(content, indent=2) + "\n")
    return directory
