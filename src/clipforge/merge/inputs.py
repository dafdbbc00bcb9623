"""The base and the models to merge: read one at a time, checked against the base, recorded in the result.

Every merging method streams its models through ``MergeInputs``: a model is read when the method needs
it and dropped after, so memory holds the base, the method's running state and one model, whatever the
number of models. Each model read is checked before it is used (nothing is written before every model
has been read):

- same architecture as the base (the model configs agree, field by field);
- same base (``clipforge.io.lineage.check_origin``): the base the model records, else weights near the base's;
- no compression steps (merge the uncompressed models, then compress the result).

The merged model's provenance records the method, the base (source, fingerprint), each model (source,
fingerprint) and the coefficients, and names the base again under ``base``, so a merged model can itself
be merged with other fine-tunes of the same base.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clipforge._util.progress import progress_bar
from clipforge.config import ModelConfig
from clipforge.errors import CheckpointError, InputError
from clipforge.io.checkpoint import read_checkpoint, read_weights, write_checkpoint
from clipforge.io.lineage import check_origin
from clipforge.io.state_dict import check_state_dict, weights_fingerprint
from clipforge.models.clip import CLIP

Source = str | os.PathLike[str] | CLIP
State = dict[str, torch.Tensor]


@dataclass
class Weights:
    """One model's float weights (float32, CPU, owned by the caller), what identifies it and its provenance."""

    name: str
    state: State
    fingerprint: str
    provenance: dict[str, Any]

    @property
    def record(self) -> dict[str, str]:
        return {"source": self.name, "fingerprint": self.fingerprint}


class MergeInputs:
    """The base (loaded once) and the models, read one at a time by ``read``/``each`` and checked."""

    def __init__(self, base: Source, models: Sequence[Source], *, method: str, min_models: int = 1, progress: bool = False) -> None:
        if isinstance(models, str | os.PathLike):
            raise InputError(f"{method}: models must be a list of checkpoints, got the single path {os.fspath(models)!r}")
        if len(models) < min_models:
            raise InputError(f"{method}: needs at least {min_models} models to merge, got {len(models)}")
        self.method, self.sources, self.progress = method, list(models), progress
        self.names = [_name(source, f"model {i + 1}") for i, source in enumerate(self.sources)]
        for source, name in zip([base, *self.sources], ["base", *self.names], strict=True):
            if not isinstance(source, CLIP) and not Path(source).exists():
                raise CheckpointError(f"{os.fspath(source)}: no such file or directory ({name if name == 'base' else 'a model to merge'})")
        self.base_name = _name(base, "base model")
        self.template = _read_model(base, self.base_name)
        if isinstance(base, CLIP):  # the merged weights end up in the template: never in the caller's model
            self.template = copy.deepcopy(self.template)
        self.base: State = {key: value.detach().float().cpu() for key, value in self.template.state_dict().items()}
        self.keys = [key for key, value in self.template.state_dict().items() if value.is_floating_point()]
        self.base_fingerprint = weights_fingerprint(self.base)
        self._config = _architecture(self.template.config)

    def __len__(self) -> int:
        return len(self.sources)

    def read(self, index: int) -> Weights:
        """Model ``index``, checked against the base (architecture, origin, no compression)."""
        name, source = self.names[index], self.sources[index]
        if isinstance(source, CLIP):
            _refuse_compression(getattr(source, "compression", None), name)
            config, stored, provenance = source.config, source.state_dict(), source.provenance
        else:
            config, stored, provenance, compression = read_weights(source, self.template.config)
            _refuse_compression(compression, name)
        self._check_architecture(config, name)
        check_state_dict(self.base, stored, name)
        # copies: never write into the caller's model, nor into a file's memory map (copy-on-write would hold both)
        state = {key: stored[key].detach().to("cpu", torch.float32, copy=True) for key in self.keys}
        del stored
        check_origin(provenance, state, name, self.base, self.base_fingerprint, self.base_name)
        return Weights(name, state, weights_fingerprint(state), dict(provenance))

    def each(self, description: str, order: Sequence[int] | None = None) -> Iterator[Weights]:
        """The models in ``order`` (default: as given), one at a time, under a progress bar.

        A model's ``state`` is emptied when the next one is asked for, so two are never held at once: keep
        the tensors you need (in a dict of your own) before moving on.
        """
        order = range(len(self.sources)) if order is None else order
        with progress_bar(disable=not self.progress, transient=True) as bar:
            task = bar.add_task(description, total=len(order), unit="model")
            for index in order:
                weights = self.read(index)
                yield weights
                weights.state.clear()
                bar.advance(task)

    def probe(self, device: str | torch.device = "cpu") -> CLIP:
        """A model of the base's architecture to load candidate weights into (for held-out evaluation)."""
        return copy.deepcopy(self.template).to(device).eval()

    def finish(self, weights: State | CLIP, merge: dict[str, Any], out: str | os.PathLike[str] | None) -> CLIP:
        """The merged model (eval mode) with its provenance; written to ``out`` (atomically) when given."""
        if isinstance(weights, CLIP):
            model = weights
        else:
            model = self.template
            load_weights(model, weights)
        model.provenance = {
            "source": f"merge:{self.method}",
            "base": {"source": self.base_name, "fingerprint": self.base_fingerprint},
            "merge": {"method": self.method, "base": self.base_name, **merge},
        }
        if out is not None:
            write_checkpoint(model, out)
        return model.eval()

    def _check_architecture(self, config: ModelConfig, name: str) -> None:
        config = _architecture(config)
        if config != self._config:
            field, ours, theirs = _first_difference(self._config, config)
            raise CheckpointError(f"{name}: another architecture than the base {self.base_name} ({field}: {theirs} vs {ours})")


@torch.no_grad()
def load_weights(model: CLIP, state: State) -> None:
    """Copy ``state`` into the model's parameters and buffers (in place, on the model's device and dtype)."""
    own = model.state_dict()
    for key, value in state.items():
        own[key].copy_(value)


def task_vector_norm(state: State, base: State) -> float:
    """``‖θ − θ₀‖`` over every merged entry, as one vector."""
    return sum(float((value - base[key]).pow(2).sum()) for key, value in state.items()) ** 0.5


def check_range(value: float, low: float, high: float, name: str, *, low_open: bool = True) -> float:
    """``value`` if it lies in (low, high] (or [low, high]); otherwise a one-line ``InputError`` naming ``name``."""
    inside = (low < value if low_open else low <= value) and value <= high
    if not inside:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise InputError(f"{name}: {value!r} is outside {interval}")
    return float(value)


def _name(source: Source, fallback: str) -> str:
    return fallback if isinstance(source, CLIP) else os.fspath(source)


def _read_model(source: Source, name: str) -> CLIP:
    if isinstance(source, CLIP):
        _refuse_compression(getattr(source, "compression", None), name)
        return source
    model, compression = read_checkpoint(source)
    _refuse_compression(compression, name)
    return model


def _refuse_compression(compression: Any, name: str) -> None:
    if compression:
        raise CheckpointError(f"{name}: records compression steps (see `clipforge info`); merge the uncompressed models, then compress the result")


def _architecture(config: ModelConfig) -> dict[str, Any]:
    fields = config.to_dict()
    fields.pop("name", None)
    return fields


def _first_difference(ours: Mapping[str, Any], theirs: Mapping[str, Any], prefix: str = "") -> tuple[str, Any, Any]:
    for key in sorted(set(ours) | set(theirs)):
        mine, other = ours.get(key), theirs.get(key)
        if isinstance(mine, Mapping) and isinstance(other, Mapping):
            if mine != other:
                return _first_difference(mine, other, f"{prefix}{key}.")
        elif mine != other:
            return f"{prefix}{key}", mine, other
    return prefix.rstrip(".") or "config", ours, theirs
