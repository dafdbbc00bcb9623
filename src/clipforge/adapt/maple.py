"""MaPLe: coupled vision-language prompts in the first blocks of both towers.

Khattak et al., "MaPLe: Multi-modal Prompt Learning", CVPR 2023; official code muzairkhattak/multimodal-prompt-
learning (``trainers/maple.py``, ``clip/model.py``, ``configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml``).

- Text, block 1: the first ``n_ctx`` = 2 words of ``"a photo of a {class}."`` are learned vectors (initialised
  from "a photo"). Blocks 2..J: new learned vectors P_i (N(0, 0.02²)) replace those positions.
- Image: the coupling ``Linear(text width → image width)`` maps the block-1 context to 2 tokens appended after
  the position embedding; before blocks 2..J, ``Linear_i(P_i)`` replaces them (one coupling layer per depth,
  all initialised alike). Later blocks carry the prompt tokens along.
- J = ``depth`` = 9, SGD lr 0.0035 (momentum 0.9, weight decay 5e-4), batch 4, 5 epochs, cosine after one
  warm-up epoch at 1e-5; CE on ``exp(logit_scale) · cos``; everything else frozen.

Both towers take the prompts through their prompt hooks (``clipforge.layers.prompts``). A fitted head
classifies with a copy of the model whose image tower carries the prompts.

Differences: J is capped at the number of blocks of the shallower tower (the 2-block text tower of
``synthetic-tiny`` gets J = 2); class embeddings are computed with the same prompt for every template
(MaPLe's single prompt); fp32 unless ``amp`` (the official code trains in fp16).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from clipforge.adapt.features import Augmentation
from clipforge.adapt.method import (
    AT_LEAST_ONE,
    NON_NEGATIVE,
    POSITIVE,
    FitInputs,
    Fitted,
    Head,
    Method,
    Range,
    Saved,
)
from clipforge.adapt.optim import Schedule
from clipforge.adapt.selection import clip_logits
from clipforge.adapt.tuning import (
    Loop,
    context_init,
    frozen,
    prompt_tokens,
    prompts_installed,
    train_classifier,
)
from clipforge.encode import model_device
from clipforge.errors import ConfigError
from clipforge.layers.prompts import PromptTokens


@dataclass(frozen=True)
class MapleSettings:
    n_ctx: int = 2
    depth: int = 9
    ctx_init: str = "a photo of a"
    epochs: int = 5
    batch_size: int = 4
    lr: float = 0.0035
    weight_decay: float = 5e-4
    crop_scale: tuple[float, float] = (0.08, 1.0)
    flip: bool = True
    amp: bool = False

    RANGES: ClassVar[dict[str, Range]] = {
        "n_ctx": AT_LEAST_ONE, "depth": AT_LEAST_ONE, "epochs": AT_LEAST_ONE, "batch_size": AT_LEAST_ONE, "lr": POSITIVE,
        "weight_decay": NON_NEGATIVE,
    }


class MaplePrompts(nn.Module):
    """The learned parameters: the block-1 text context, its coupling, and per deeper block a context and coupling."""

    def __init__(self, context: torch.Tensor, image_width: int, depth: int) -> None:
        super().__init__()
        count, text_width = context.shape
        self.context = nn.Parameter(context.clone())
        self.coupling = nn.Linear(text_width, image_width)
        self.deep_context = nn.ParameterList(nn.Parameter(torch.randn(count, text_width) * 0.02) for _ in range(depth - 1))
        self.deep_coupling = nn.ModuleList(copy.deepcopy(self.coupling) for _ in range(depth - 1))

    @property
    def depth(self) -> int:
        return len(self.deep_context) + 1


class MapleText(PromptTokens):
    def __init__(self, prompts: MaplePrompts) -> None:
        super().__init__()
        self.prompts = prompts

    def _put(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, :1], context.to(x.dtype).expand(len(x), -1, -1), x[:, 1 + len(context) :]], dim=1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self._put(x, self.prompts.context)

    def before_block(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self._put(x, self.prompts.deep_context[layer - 1]) if 1 <= layer < self.prompts.depth else x


class MapleImage(PromptTokens):
    def __init__(self, prompts: MaplePrompts) -> None:
        super().__init__()
        self.prompts = prompts
        self.appended = len(prompts.context)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.prompts.coupling(self.prompts.context).to(x.dtype)
        return torch.cat([x, tokens.expand(len(x), -1, -1)], dim=1)

    def before_block(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        if not 1 <= layer < self.prompts.depth:
            return x
        tokens = self.prompts.deep_coupling[layer - 1](self.prompts.deep_context[layer - 1]).to(x.dtype)
        return torch.cat([x[:, : -self.appended], tokens.expand(len(x), -1, -1)], dim=1)


def _prompted_text(model: Any, prompts: MaplePrompts, tokens: torch.Tensor) -> torch.Tensor:
    with prompts_installed(model, text=MapleText(prompts), image=model.visual.prompts):
        return model(None, tokens.to(model_device(model)))[1].float()


def fit_maple(inputs: FitInputs, settings: MapleSettings) -> Fitted:
    model, train = inputs.model, inputs.shots.train
    if model.visual.token_reduction is not None:
        raise ConfigError("maple: image prompts need every token; use a model without token reduction")
    depth = min(settings.depth, model.text_cfg.layers, model.visual.cfg.layers)
    prompts = MaplePrompts(context_init(model, settings.ctx_init, settings.n_ctx), model.visual.cfg.width, depth)
    prompts = prompts.to(model_device(model))
    tokens = prompt_tokens(model, settings.ctx_init, train.classnames)
    per_epoch = len(train) // settings.batch_size if len(train) >= settings.batch_size else 1
    loop = Loop(settings.epochs * per_epoch, settings.batch_size, Augmentation(settings.crop_scale, settings.flip),
                inputs.shots.seed, settings.amp)
    schedule = Schedule("sgd", settings.lr, loop.steps, weight_decay=settings.weight_decay, warmup=per_epoch)
    with frozen(model), prompts_installed(model, image=MapleImage(prompts)):
        loss = train_classifier(model, list(prompts.parameters()), train, loop, schedule,
                                lambda: _prompted_text(model, prompts, tokens), progress=inputs.progress,
                                description="MaPLe")
    extra = {"depth": depth, "final_loss": loss, "steps": loop.steps}
    return Fitted({key: value.detach().cpu() for key, value in prompts.state_dict().items()}, extra)


class MapleHead(Head):
    """Class embeddings of the learned text prompts; images are read by a copy of the model carrying the image prompts."""

    def __init__(self, prompts: MaplePrompts, text: torch.Tensor) -> None:
        super().__init__()
        self.prompts = prompts
        self.register_buffer("text", text.float().cpu())

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return clip_logits(features, self.text)

    def image_model(self, model: Any) -> Any:
        prompted = copy.deepcopy(model)
        prompted.visual.prompts = MapleImage(copy.deepcopy(self.prompts))
        return prompted


def rebuild(saved: Saved) -> Head:
    model, settings = saved.model, saved.settings
    context = saved.tensors["context"]
    prompts = MaplePrompts(context, model.visual.cfg.width, int(saved.extra["depth"]))
    prompts.load_state_dict(dict(saved.tensors))
    prompts = prompts.to(model_device(model))
    with torch.no_grad():
        text = _prompted_text(model, prompts, prompt_tokens(model, settings.ctx_init, saved.classnames))
    return MapleHead(prompts, text)


MAPLE = Method("maple", "prompts", MapleSettings, fit_maple, rebuild,
               "coupled vision-language prompts in the first blocks (Khattak et al., CVPR 2023)")
