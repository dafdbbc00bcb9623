"""Detectors of altered images: a binary head on normalised CLIP image features, with the image tower frozen,
LayerNorm-only tuned, LoRA-tuned or fully fine-tuned.

Yermakov, Čech, Matas, "Unlocking the Hidden Potential of CLIP in Generalizable Deepfake Detection", 2025 (official
code yermandy/deepfake-detection: ``src/model/dfdet.py``, ``src/config.py``): the ``LinearNorm`` head (L2-normalise,
then ``Linear(D, 2)``, cross-entropy) on CLIP's image feature, with only the LayerNorms' affine parameters trained
(``peft.LNTuningConfig``; here the same parameters are unfrozen directly), AdamW, weight decay 0, cosine decay.
DeeCLIP (Keita et al., 2025; Mamadou-Keita/DeeCLIP ``model.py``): LoRA r 16, α 32, dropout 0.05 on q, k, v of every
image block (peft, through ``clipforge.adapt.lora``).

Differences: the feature is the projected, normalised image embedding (``clipforge.encode``'s), not the
pre-projection class token; no slerp feature augmentation, alignment/uniformity or triplet terms, nor DeeCLIP's
DeeFuser; the head's rate is ``head_lr`` (the backbone's is ``lr``, the paper's 8e-5), so that the head converges
in the few hundred steps run here; the LoRA scaling is rsLoRA's α/√r (``clipforge.adapt.lora``) where DeeCLIP uses α/r.
The tuned image-tower tensors that changed are stored beside the head in the adapter file.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.adapt.adapter_file import AdapterRecord, model_fingerprint
from clipforge.adapt.linear_form import fuse_attention
from clipforge.adapt.lora import LoraSettings, add_lora, merged_linear
from clipforge.adapt.method import (
    AT_LEAST_ONE,
    AT_LEAST_TWO,
    BELOW_ONE,
    NON_NEGATIVE,
    POSITIVE,
    Head,
    Method,
    Range,
    Saved,
    settings_dict,
    settings_from,
)
from clipforge.adapt.optim import Schedule, epoch_batches, optimise
from clipforge.adapt.recipe_data import DETECTOR_CLASSES, detector_images
from clipforge.adapt.tuning import autocast
from clipforge.adapt.weights import trainable_copy
from clipforge.encode import model_device
from clipforge.errors import ConfigError

TUNINGS = ("head", "ln", "lora", "full")


@dataclass(frozen=True)
class DetectorSettings:
    tuning: str = "ln"
    lr: float = 8e-5
    head_lr: float = 1e-2
    weight_decay: float = 0.0
    batch_size: int = 32
    steps: int = 300
    samples: int = 1200
    families: str = "checkerboard,seam,channel_shift"
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    amp: bool = False

    RANGES: ClassVar[dict[str, Range]] = {
        "lr": POSITIVE, "head_lr": POSITIVE, "weight_decay": NON_NEGATIVE, "batch_size": AT_LEAST_ONE, "steps": AT_LEAST_ONE,
        "samples": AT_LEAST_TWO, "lora_rank": AT_LEAST_ONE, "lora_alpha": POSITIVE, "lora_dropout": BELOW_ONE,
    }


class DetectorHead(Head):
    """``Linear(D, 2)`` on normalised features (class 0 real, 1 altered) over its (tuned) image model."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, tuned: nn.Module | None) -> None:
        super().__init__()
        self.linear = nn.Linear(weight.shape[1], 2)
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(bias)
        self.tuned = tuned

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(F.normalize(features.float(), dim=-1))

    def image_model(self, model: Any) -> Any:
        return model if self.tuned is None else self.tuned


def prepare(model: nn.Module, settings: DetectorSettings) -> tuple[nn.Module, list[nn.Parameter]]:
    """A float copy of ``model`` (frozen) and the image-tower parameters ``settings.tuning`` trains."""
    if settings.tuning not in TUNINGS:
        raise ConfigError(f"detector.tuning: {settings.tuning!r} is not one of {', '.join(TUNINGS)}")
    tuned = trainable_copy(model, "detector")
    if settings.tuning == "lora":
        add_lora(tuned, LoraSettings(rank=settings.lora_rank, alpha=settings.lora_alpha, dropout=settings.lora_dropout,
                                     encoder="vision"))
        return tuned, [p for name, p in tuned.visual.named_parameters() if "lora_" in name]
    if settings.tuning == "ln":
        return tuned, [p for module in tuned.visual.modules() if isinstance(module, nn.LayerNorm) for p in module.parameters()]
    return tuned, list(tuned.visual.parameters()) if settings.tuning == "full" else []


def fit_detector(model: Any, data: str, settings: dict[str, Any] | None = None, seed: int = 1,
                 progress: bool = False, **data_options: Any) -> AdapterRecord:
    """Train a detector on ``data`` (``synthetic:altered`` with ``families``, or two classes of labelled images,
    one named "real"); its record classifies into ``DETECTOR_CLASSES`` (``clipforge.adapt.Adapter(record)``)."""
    chosen = settings_from(DetectorSettings, settings or {}, "detector")
    images, labels, source = detector_images(data, chosen.samples, chosen.families, **data_options)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tuned, backbone = prepare(model, chosen)
        head = nn.Linear(model.config.embed_dim, 2).to(model_device(tuned))
        loss = train_detector(tuned, backbone, head, images, labels, chosen, seed, progress)
    if chosen.tuning == "lora":
        fuse_attention(tuned, merged_linear)
    base = model.visual.state_dict()
    changed = {f"visual.{name}": tensor.detach().cpu().contiguous() for name, tensor in tuned.visual.state_dict().items()
               if not torch.equal(tensor.to(base[name].device, base[name].dtype), base[name])}
    tensors = {"head.weight": head.weight.detach().cpu(), "head.bias": head.bias.detach().cpu(), **changed}
    return AdapterRecord(
        method="detector", tensors=tensors, settings=settings_dict(chosen), classnames=list(DETECTOR_CLASSES),
        templates=["a photo of a {c} image."], base_model=model_fingerprint(model),
        extra={"final_loss": loss, "tuned_tensors": len(changed)},
        provenance={"train": source, "images": len(images), "seed": seed},
    )


def train_detector(tuned: nn.Module, backbone: list[nn.Parameter], head: nn.Linear, images: list[Any],
                   labels: list[int], settings: DetectorSettings, seed: int, progress: bool) -> float:
    """Cross-entropy of ``head(normalise(image tower(x)))`` over ``steps`` batches; the last loss."""
    device = model_device(tuned)
    for parameter in backbone:
        parameter.requires_grad_(True)
    targets = torch.as_tensor(labels)
    per_epoch = max(1, len(images) // settings.batch_size)
    batches = epoch_batches(len(images), settings.batch_size, -(-settings.steps // per_epoch), seed, drop_last=True)
    schedule = Schedule("adamw", settings.lr, settings.steps, weight_decay=settings.weight_decay)
    pixels = torch.stack([tuned.preprocess(image) for image in images])

    def loss_at(step: int) -> torch.Tensor:
        rows = batches[step]
        with autocast(tuned, settings.amp):
            features = tuned(pixels[rows].to(device))[0]
        return F.cross_entropy(head(F.normalize(features.float(), dim=-1)), targets[rows].to(device))

    groups = [*backbone, {"params": list(head.parameters()), "lr_scale": settings.head_lr / settings.lr}]
    tuned.train()
    try:
        return optimise(groups, schedule, loss_at, progress=progress, description=f"detector ({settings.tuning})")
    finally:
        tuned.eval()


def rebuild_detector(saved: Saved) -> Head:
    visual = {name.removeprefix("visual."): tensor for name, tensor in saved.tensors.items() if name.startswith("visual.")}
    tuned = None
    if visual:
        tuned = copy.deepcopy(saved.model).float().eval()
        unknown = set(visual) - set(tuned.visual.state_dict())
        if unknown:
            raise KeyError(f"image-tower tensor {sorted(unknown)[0]!r} is not in this model")
        tuned.visual.load_state_dict(visual, strict=False)
    return DetectorHead(saved.tensors["head.weight"], saved.tensors["head.bias"], tuned)


def _refuse_few_shot_fit(*_: Any) -> Any:
    raise ConfigError("detector trains on --data, not on few shots: clipforge adapt detector --data ...")


DETECTOR = Method("detector", "head", DetectorSettings, _refuse_few_shot_fit, rebuild_detector,
                  "real-vs-altered head on normalised image features, LN/LoRA/full tuning (Yermakov et al. 2025; DeeCLIP)")
