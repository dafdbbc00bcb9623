"""Learned structure masks for automatic inheritance: hard-concrete gates, their L0 size, and the hooks that apply them.

TinyCLIP's automatic inheritance (Wu et al., ICCV 2023, §3.2; microsoft/Cream ``TinyCLIP/src/open_clip/
l0module.py``, adapted from CoFi, Xia et al., ACL 2022, itself on Louizos et al., ICLR 2018) gates the residual
width ("hidden") of each tower and the MLP neurons ("intermediate") of each block with hard-concrete variables:
``z = hardtanh(sigmoid((log u − log(1 − u) + log α)/β)·(r − l) + l, 0, 1)`` with β = 2/3, (l, r) = (−0.1, 1.1),
log α initialised at the clamp's top, log 100, and clamped to [log 0.01, log 100]. A gate is open with probability
``sigmoid(log α − β·log(−l/r))``, which makes the expected parameter count differentiable.

What differs: TinyCLIP also gates heads. Here a tower's attention width is its residual width (open_clip's
configs), so the number of heads follows the learned width and which heads stay is decided at fusion by the
importance of manual inheritance; and the expected size counted is the whole model's (embeddings included: a
49,408-token table is most of a small text tower), as the ordinary model the masks fuse into will count it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.config import ModelConfig
from clipforge.distill.inherit import tower_shapes
from clipforge.models.clip import CLIP

BETA, LIMIT_LOW, LIMIT_HIGH, EPSILON = 2.0 / 3.0, -0.1, 1.1, 1e-6
LOG_ALPHA_RANGE = (math.log(1e-2), math.log(1e2))


def sample_gates(log_alpha: torch.Tensor) -> torch.Tensor:
    """One draw of the stretched, clipped hard-concrete gates (differentiable in ``log_alpha``)."""
    u = torch.empty_like(log_alpha).uniform_(EPSILON, 1 - EPSILON)
    soft = torch.sigmoid((torch.log(u) - torch.log(1 - u) + log_alpha) / BETA)
    return F.hardtanh(soft * (LIMIT_HIGH - LIMIT_LOW) + LIMIT_LOW, 0.0, 1.0)


def open_probability(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z > 0) = 1 − Q(0): the expected share of a gate that stays."""
    return torch.sigmoid(log_alpha - BETA * math.log(-LIMIT_LOW / LIMIT_HIGH))


def deterministic_gates(log_alpha: torch.Tensor) -> torch.Tensor:
    """The gates at evaluation: the expected number of them (rounded) open, those with the largest log α."""
    kept = int(round(float(open_probability(log_alpha).sum())))
    gates = torch.zeros_like(log_alpha)
    gates[log_alpha.topk(kept).indices] = 1.0
    return gates


def tower_size(config: ModelConfig, tower: str, width: torch.Tensor, neurons: torch.Tensor) -> torch.Tensor:
    """The parameter count of one tower at residual ``width`` and per-block MLP widths ``neurons`` (reals)."""
    d, e = width, config.embed_dim
    if tower == "vision":
        cfg = config.vision
        embeddings = 3 * cfg.patch_size**2 * d + d + (cfg.grid_size**2 + 1) * d + 4 * d + d * e
        layer_scale = cfg.ls_init_value is not None
    else:
        cfg = config.text
        embeddings = (cfg.vocab_size + cfg.context_length) * d + 2 * d + d * e
        layer_scale = cfg.ls_init_value is not None
    blocks = cfg.layers * (4 * d * d + 9 * d + (2 * d if layer_scale else 0)) + (2 * d + 1) * neurons.sum()
    return embeddings + blocks


def model_size(config: ModelConfig, widths: dict[str, torch.Tensor], neurons: dict[str, torch.Tensor]) -> torch.Tensor:
    """Both towers plus the logit scale (and bias): ``count_parameters`` as a function of real widths."""
    head = 1 + (config.init_logit_bias is not None)
    return head + sum(tower_size(config, tower, widths[tower], neurons[tower]) for tower in widths)


class StructureMasks(nn.Module):
    """log α of every tower's residual channels and every block's MLP neurons, and the hooks that apply them.

    ``attach(model)`` registers forward hooks that multiply the residual stream (its input, every attention
    and MLP output, every LayerNorm output) by the tower's width gates and each MLP's hidden activations by its
    neuron gates: sampled once per step in training (``resample``), the deterministic gates in evaluation.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        shapes = tower_shapes(config)
        self.width_log_alpha = nn.ParameterDict(
            {tower: nn.Parameter(torch.full((shape.width,), LOG_ALPHA_RANGE[1])) for tower, shape in shapes.items()}
        )
        self.neuron_log_alpha = nn.ParameterDict(
            {tower: nn.Parameter(torch.full((shape.layers, shape.mlp), LOG_ALPHA_RANGE[1])) for tower, shape in shapes.items()}
        )
        self._gates: dict[str, torch.Tensor] = {}
        self._attached: list[CLIP] = []  # the gated model (in a list: not a submodule of the masks)

    def expected_size(self) -> torch.Tensor:
        widths = {tower: open_probability(log_alpha).sum() for tower, log_alpha in self.width_log_alpha.items()}
        neurons = {tower: open_probability(log_alpha).sum(1) for tower, log_alpha in self.neuron_log_alpha.items()}
        return model_size(self.config, widths, neurons)

    def clamp(self) -> None:
        with torch.no_grad():
            for log_alpha in [*self.width_log_alpha.values(), *self.neuron_log_alpha.values()]:
                log_alpha.clamp_(*LOG_ALPHA_RANGE)

    def resample(self) -> None:
        """New training gates for the next forward pass (one draw per step, as TinyCLIP)."""
        self._gates = {f"width.{t}": sample_gates(a) for t, a in self.width_log_alpha.items()}
        self._gates |= {f"neurons.{t}": sample_gates(a) for t, a in self.neuron_log_alpha.items()}

    def gates(self, name: str) -> torch.Tensor:
        kind, tower = name.split(".")
        if self._attached and self._attached[0].training and name in self._gates:
            return self._gates[name]
        table = self.width_log_alpha if kind == "width" else self.neuron_log_alpha
        log_alpha = table[tower].detach()
        return deterministic_gates(log_alpha) if kind == "width" else torch.stack([deterministic_gates(row) for row in log_alpha])

    def attach(self, model: CLIP) -> list[torch.utils.hooks.RemovableHandle]:
        """Register the gating hooks on ``model`` (a model of ``self.config``); returns their handles."""
        self._attached = [model]
        handles = []
        towers = {"vision": model.visual, "text": model}
        finals = {"vision": model.visual.ln_post, "text": model.ln_final}
        for tower, module in towers.items():
            width = f"width.{tower}"
            handles.append(module.transformer.register_forward_pre_hook(self._scale_input(width)))
            handles.append(finals[tower].register_forward_hook(self._scale_output(width)))
            for layer, block in enumerate(module.transformer.resblocks):
                for part in (block.ln_1, block.ln_2, block.attn.out_proj, block.mlp.c_proj):
                    handles.append(part.register_forward_hook(self._scale_output(width)))
                handles.append(block.mlp.c_proj.register_forward_pre_hook(self._scale_input(f"neurons.{tower}", layer)))
        return handles

    def _scale_input(self, name: str, layer: int | None = None):  # noqa: ANN202 - a hook
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            gates = self.gates(name) if layer is None else self.gates(name)[layer]
            return (args[0] * gates.to(args[0].dtype), *args[1:])

        return hook

    def _scale_output(self, name: str):  # noqa: ANN202 - a hook
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            return output * self.gates(name).to(output.dtype)

        return hook
