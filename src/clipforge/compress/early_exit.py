"""Early exit for the CLIP image tower: LGViT's exit heads, self-distilled, adapted to zero-shot classification.

LGViT (Xu et al., "LGViT: Dynamic Early Exiting for Accelerating Vision Transformer", ACM MM 2023; official code
falcon-xu/LGViT 3147fb8, ``models/deit_highway/highway.py`` and ``modeling_highway_deit.py``) attaches exit heads
to intermediate blocks, trains them with the backbone frozen by distilling the final prediction, and at inference
stops at the first exit whose maximum softmax probability exceeds a threshold. Faithful parts:

- Heads (``DeiTHighway_v2``): *local perception* heads run convolutions on the patch grid (``conv1_1``: 1×1 conv →
  GELU → BN → 3×3 depthwise → GELU → BN → 1×1 conv → BN, plus the input; ``conv2_1`` without the depthwise
  stage); *global aggregation* heads (``GlobalSparseAttn``) keep every s-th patch in each direction
  (``AvgPool2d(1, s)``) and run multi-head attention over those. The exit pools ``mean(head tokens) + class token``.
  Placement: after blocks 4..11 (1-based) of 12; the first half of the exits local, the second half global.
- Exit rule (``DeiTEncoder.forward``, ``confidence``): after each exit block, exit if ``max softmax > threshold``.
- Training (``distillation_LGViT``): backbone frozen, per exit a prediction term mixing a hard target and
  ``α·KL_T(exit ‖ final)·T²`` (summed, divided by the logits' element count, α=0.3, T=2), plus 0.01× heterogeneous
  feature distillation (channel-softmax KL from the first and last exit of each kind to the last block's patch
  tokens, subsampled to the head's stride) and 0.01× homogeneous distillation (MSE of each exit's tokens to the
  last exit of its kind; Gram matrices for the global heads). AdamW with linearly decaying lr (Hugging Face
  ``Trainer`` defaults used by ``run_distillation_deit.py``).

Adaptation to CLIP (research note efficiency.md §4.3): a head ends in ``LayerNorm`` and a projection to the shared
embedding space, initialised from the tower's ``ln_post`` and ``proj`` (LGViT copies the backbone's pooler into its
heads), so an exit emits an *image embedding*. The hard target becomes the final embedding itself (``1 − cosine``),
and the KL compares zero-shot distributions over a text bank (class embeddings) at the model's logit scale;
without a text bank only the cosine term is used. At inference the exit's zero-shot prediction against the class
text embeddings decides. This serves classification against a fixed prompt bank, not retrieval. Deviations:
global heads use the tower's head count (LGViT: 8), and the layer placement and head kinds generalise LGViT's
12-block tables (they match them for 2, 4 and 8 exits).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipforge._util.fileio import atomic_path
from clipforge.errors import CheckpointError, ConfigError, InputError
from clipforge.eval.zeroshot import zero_shot_logits
from clipforge.io.state_dict import read_tensors
from clipforge.models.vit import VisionTransformer, image_tower

EXIT_KINDS = ("local", "local-pointwise", "global-s2", "global-s3")
FORMAT = "clipforge-exit-heads"


def default_exit_layers(num_layers: int) -> list[int]:
    """Blocks (0-based) followed by an exit: LGViT's 3..10 of 12, i.e. from a third of the depth to the last-but-one."""
    return list(range(max(0, num_layers // 3 - 1), num_layers - 1))


def default_exit_kinds(count: int) -> list[str]:
    """First half local (depthwise, then pointwise), second half global (stride 2, then 3), as LGViT's tables."""
    local = math.ceil(count / 2)
    glob = count - local
    return (
        ["local"] * math.ceil(local / 2)
        + ["local-pointwise"] * (local // 2)
        + ["global-s2"] * math.ceil(glob / 2)
        + ["global-s3"] * (glob // 2)
    )


def subsample_grid(patches: torch.Tensor, stride: int) -> torch.Tensor:
    """Every ``stride``-th patch of a square grid in each direction (LGViT's ``AvgPool2d(kernel=1, stride)``)."""
    batch, count, width = patches.shape
    grid = patch_grid(count)
    return patches.reshape(batch, grid, grid, width)[:, ::stride, ::stride].reshape(batch, -1, width)


def patch_grid(count: int) -> int:
    grid = math.isqrt(count)
    if grid * grid != count:
        raise ConfigError(f"exit heads need the full square patch grid, got {count} patch tokens; remove token reduction")
    return grid


class LocalPerception(nn.Module):
    """LGViT's local perception head (``highway_conv1_1``; ``highway_conv2_1`` when ``depthwise`` is False)."""

    def __init__(self, width: int, depthwise: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(width, width, 1), nn.GELU(), nn.BatchNorm2d(width))
        self.depthwise = (
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1, groups=width), nn.GELU(), nn.BatchNorm2d(width))
            if depthwise
            else nn.Identity()
        )
        self.conv2 = nn.Sequential(nn.Conv2d(width, width, 1), nn.BatchNorm2d(width))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        batch, count, width = patches.shape
        grid = patch_grid(count)
        x = patches.transpose(1, 2).reshape(batch, width, grid, grid)
        x = self.conv2(self.depthwise(self.conv1(x)))
        return x.flatten(2).transpose(1, 2) + patches


class GlobalSparseAttention(nn.Module):
    """LGViT's global aggregation head (``GlobalSparseAttn``): attention over every ``stride``-th patch, no residual."""

    def __init__(self, width: int, heads: int, stride: int) -> None:
        super().__init__()
        self.heads, self.stride = heads, stride
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = subsample_grid(patches, self.stride)
        batch, count, width = x.shape
        q, k, v = self.qkv(x).reshape(batch, count, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, count, width))


class ExitHead(nn.Module):
    """Tokens after a block → ``(embedding, head tokens)``: mixer, ``mean(head tokens) + class token``, ``ln``, ``proj``."""

    def __init__(self, kind: str, width: int, heads: int, output_dim: int) -> None:
        super().__init__()
        self.kind = kind
        self.stride = int(kind[-1]) if kind.startswith("global") else 1
        if kind.startswith("local"):
            self.mixer: nn.Module = LocalPerception(width, depthwise=kind == "local")
        else:
            self.mixer = GlobalSparseAttention(width, heads, self.stride)
        self.ln = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, output_dim))

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mixed = self.mixer(tokens[:, 1:])
        return self.ln(mixed.mean(1) + tokens[:, 0]) @ self.proj, mixed


class ExitHeads(nn.Module):
    """One exit head after each of ``layers`` (0-based block indices) of a model's image tower.

    Parameters are named ``exits.<layer>.…`` (state-dict stable). ``layers`` default to
    ``default_exit_layers``, ``kinds`` (one of ``EXIT_KINDS`` per layer) to ``default_exit_kinds``.
    """

    def __init__(self, model: nn.Module, layers: Sequence[int] | None = None, kinds: Sequence[str] | None = None) -> None:
        super().__init__()
        tower = image_tower(model)
        self.num_layers = tower.cfg.layers
        self.layers = check_exit_layers(default_exit_layers(self.num_layers) if layers is None else layers, self.num_layers)
        self.kinds = check_exit_kinds(default_exit_kinds(len(self.layers)) if kinds is None else kinds, len(self.layers))
        width, output_dim = tower.proj.shape
        self.exits = nn.ModuleDict(
            {str(layer): ExitHead(kind, width, tower.cfg.heads, output_dim) for layer, kind in zip(self.layers, self.kinds)}
        )
        for head in self.exits.values():
            head.ln.load_state_dict(tower.ln_post.state_dict())
            head.proj.data.copy_(tower.proj.detach())
        self.to(device=tower.proj.device, dtype=tower.proj.dtype)

    def forward(self, layer: int, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The exit after block ``layer`` on its tokens [B, 1 + N, width] → (embedding [B, D], head tokens)."""
        return self.exits[str(layer)](tokens)


def check_exit_layers(layers: Sequence[int], num_layers: int) -> list[int]:
    if not isinstance(layers, Sequence) or not layers:
        raise ConfigError(f"layers: give a non-empty list of block indices, got {layers!r}")
    last = num_layers - 2
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= last:
            raise ConfigError(
                f"layers: exit after block {layer!r} is out of range 0..{last} "
                f"(0-based blocks of a {num_layers}-block tower; the last block ends in the model's own head)"
            )
    if len(set(layers)) != len(layers):
        raise ConfigError(f"layers: {list(layers)} repeats a block")
    return sorted(layers)


def check_exit_kinds(kinds: Sequence[str], count: int) -> list[str]:
    unknown = [kind for kind in kinds if kind not in EXIT_KINDS]
    if unknown or len(kinds) != count:
        raise ConfigError(f"kinds: need {count} of {list(EXIT_KINDS)} (one per exit layer), got {list(kinds)}")
    return list(kinds)


def _check_number(name: str, value: Any, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ConfigError(f"{name}: must be a number in [{low}, {high}], got {value!r}")
    return float(value)


def _logit_scale(model: nn.Module, logit_scale: float | None) -> float:
    if logit_scale is not None:
        return _check_number("logit_scale", logit_scale, 0.0)
    if not hasattr(model, "logit_scale"):
        raise ConfigError("logit_scale: an image tower alone has no logit scale; pass logit_scale=")
    return float(model.logit_scale.detach().exp())


def _check_bank(name: str, bank: torch.Tensor, heads: ExitHeads) -> torch.Tensor:
    embed_dim = next(iter(heads.exits.values())).proj.shape[1]
    if bank.ndim != 2 or bank.shape[0] != embed_dim:
        raise ConfigError(f"{name}: class embeddings must be [{embed_dim}, classes], got {tuple(bank.shape)}")
    return bank.detach().clone()  # a normal tensor even when built under inference_mode


def _check_full_tokens(tower: VisionTransformer) -> None:
    if tower.token_reduction is not None:
        raise ConfigError("early exit needs every patch token (its heads work on the patch grid); remove token reduction")


@torch.no_grad()
def _frozen_pass(
    tower: VisionTransformer, pixels: torch.Tensor, layers: list[int]
) -> tuple[dict[int, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The frozen tower's tokens after each exit block, the last block's tokens, and the final embedding."""
    _check_full_tokens(tower)
    exit_tokens, x = {}, None
    for index, x, _ in tower.transformer.iterate(tower.embed(pixels)):
        if index in layers:
            exit_tokens[index] = x
    return exit_tokens, x, tower.head(x)


def exit_distillation_loss(
    model: nn.Module,
    heads: ExitHeads,
    pixels: torch.Tensor,
    *,
    text_bank: torch.Tensor | None = None,
    distill_weight: float = 0.3,
    temperature: float = 2.0,
    feature_weight: float = 0.01,
    logit_scale: float | None = None,
) -> torch.Tensor:
    """LGViT's stage-2 loss (``distillation_LGViT``) for CLIP exits, against the frozen model; see the module docstring.

    Per exit: ``1 − cos(exit, final)`` alone, or with a ``text_bank`` [D, C]
    ``(1 − distill_weight)·(1 − cos) + distill_weight·KL_T`` of the zero-shot distributions; summed over exits, plus
    ``feature_weight`` times the heterogeneous and homogeneous feature terms.
    """
    distill_weight = _check_number("distill_weight", distill_weight, 0.0, 1.0)
    temperature = _check_number("temperature", temperature, 1e-6)
    feature_weight = _check_number("feature_weight", feature_weight, 0.0)
    tower = image_tower(model)
    exit_tokens, final_tokens, teacher = _frozen_pass(tower, pixels, heads.layers)
    outputs = {layer: heads(layer, exit_tokens[layer]) for layer in heads.layers}
    loss = torch.zeros((), device=pixels.device)
    for embedding, _ in outputs.values():
        cosine = 1 - F.cosine_similarity(embedding.float(), teacher.float(), dim=-1).mean()
        loss = loss + (cosine if text_bank is None else (1 - distill_weight) * cosine)
    if text_bank is not None:
        bank, scale = _check_bank("text_bank", text_bank, heads), _logit_scale(model, logit_scale)
        teacher_logits = zero_shot_logits(teacher, bank, scale) / temperature
        for embedding, _ in outputs.values():
            student_logits = zero_shot_logits(embedding, bank, scale) / temperature
            kl = F.kl_div(student_logits.log_softmax(-1), teacher_logits.log_softmax(-1), reduction="sum", log_target=True)
            loss = loss + distill_weight * kl * temperature**2 / student_logits.numel()
    return loss + feature_weight * _feature_distillation(heads, outputs, final_tokens[:, 1:])


def _feature_distillation(
    heads: ExitHeads, outputs: dict[int, tuple[torch.Tensor, torch.Tensor]], final_patches: torch.Tensor
) -> torch.Tensor:
    """LGViT's heterogeneous (``cal_hete_loss``) plus homogeneous (``cal_homo_loss``) feature distillation."""
    total = torch.zeros((), device=final_patches.device)
    for family in ("local", "global"):
        members = [layer for layer, kind in zip(heads.layers, heads.kinds) if kind.startswith(family)]
        if not members:
            continue
        for layer in dict.fromkeys((members[0], members[-1])):
            mixed = outputs[layer][1].float()
            target = subsample_grid(final_patches, heads.exits[str(layer)].stride).float()
            total = total + F.kl_div(mixed.log_softmax(-1), target.log_softmax(-1), reduction="batchmean", log_target=True)
        last = outputs[members[-1]][1].float()
        for layer in members[:-1]:
            mixed = outputs[layer][1].float()
            if family == "global":
                mixed, last_aligned = mixed.transpose(1, 2) @ mixed, last.transpose(1, 2) @ last
            else:
                last_aligned = last
            total = total + F.mse_loss(mixed, last_aligned)
    return total


def train_exit_heads(
    model: nn.Module,
    heads: ExitHeads,
    data: Iterable[Any],
    steps: int,
    lr: float = 1e-3,
    **loss_settings: Any,
) -> list[float]:
    """Train ``heads`` on the frozen ``model`` for ``steps`` batches of ``data``; returns the loss of each step.

    ``data`` yields pixel batches [B, 3, H, W] or tuples whose first item is one (an image-caption loader).
    AdamW (no weight decay) with the learning rate decaying linearly to 0, as LGViT's Hugging Face ``Trainer``;
    LGViT fine-tunes 50 epochs at 5e-5, short runs need more. ``loss_settings`` go to ``exit_distillation_loss``.
    Leaves the model's mode unchanged and the heads in eval mode.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps: must be a positive integer, got {steps!r}")
    _check_number("lr", lr, 1e-12)
    device = image_tower(model).proj.device
    optimizer = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    was_training = model.training
    model.eval()
    heads.train()
    losses: list[float] = []
    batches = iter(data)
    try:
        for step in range(steps):
            batch = next(batches, None)
            if batch is None:
                raise InputError(f"data: ran out after {step} of {steps} steps")
            pixels = batch[0] if isinstance(batch, tuple | list) else batch
            loss = exit_distillation_loss(model, heads, pixels.to(device), **loss_settings)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
    finally:
        model.train(was_training)
        heads.eval()
    return losses


@dataclass
class EarlyExitResult:
    predictions: torch.Tensor  # [B] class index
    depths: torch.Tensor  # [B] blocks run before the image exited (1..layers)
    confidences: torch.Tensor  # [B] max softmax probability at the exit taken

    @property
    def average_depth(self) -> float:
        return self.depths.float().mean().item()


class EarlyExitClassifier:
    """Zero-shot classification that stops each image at its first confident exit (LGViT's confidence rule).

    After each exit block, the exit's embedding is classified against ``classifier`` [D, C] (from
    ``build_zero_shot_classifier``) at the model's logit scale; an image leaves when its max softmax probability
    exceeds ``threshold``. Others go on; after the last block the model's own embedding decides. The blocks run
    until the last image of the batch has left; LGViT evaluates one image at a time, which turns each image's
    depth into saved compute. Puts model and heads in eval mode.
    """

    def __init__(
        self,
        model: nn.Module,
        heads: ExitHeads,
        classifier: torch.Tensor,
        threshold: float,
        *,
        logit_scale: float | None = None,
    ) -> None:
        self.tower = image_tower(model)
        if heads.num_layers != self.tower.cfg.layers:
            raise ConfigError(f"heads: made for a {heads.num_layers}-block tower, the model has {self.tower.cfg.layers}")
        self.heads = heads.eval()
        model.eval()
        self.classifier = _check_bank("classifier", classifier, heads).to(self.tower.proj.device)
        self.threshold = _check_number("threshold", threshold, 0.0)
        self.logit_scale = _logit_scale(model, logit_scale)

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor) -> EarlyExitResult:
        _check_full_tokens(self.tower)
        batch, device = pixels.shape[0], self.tower.proj.device
        predictions = torch.zeros(batch, dtype=torch.long, device=device)
        confidences = torch.zeros(batch, device=device)
        depths = torch.zeros(batch, dtype=torch.long, device=device)
        waiting = torch.arange(batch, device=device)
        last = self.tower.cfg.layers - 1
        for index, x, state in self.tower.transformer.iterate(self.tower.embed(pixels.to(device))):
            if index != last and index not in self.heads.layers:
                continue
            tokens = x[waiting]
            embedding = self.tower.head(tokens, state) if index == last else self.heads(index, tokens)[0]
            probabilities = zero_shot_logits(embedding, self.classifier, self.logit_scale).softmax(-1)
            confidence, prediction = probabilities.max(-1)
            leaving = confidence > self.threshold if index != last else torch.ones_like(confidence, dtype=torch.bool)
            rows = waiting[leaving]
            predictions[rows], confidences[rows], depths[rows] = prediction[leaving], confidence[leaving], index + 1
            waiting = waiting[~leaving]
            if waiting.numel() == 0:
                break
        return EarlyExitResult(predictions, depths, confidences)


def save_exit_heads(heads: ExitHeads, path: str | os.PathLike[str], threshold: float | None = None) -> Path:
    """The heads' weights in one ``.safetensors`` file; layers, kinds, tower shape and threshold in its metadata."""
    from safetensors.torch import save_file

    if threshold is not None:
        _check_number("threshold", threshold, 0.0)
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
    tensors = {name: value.detach().contiguous().cpu() for name, value in heads.state_dict().items()}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


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
