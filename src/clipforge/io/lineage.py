"""Whether a checkpoint is a fine-tune of a given base, as ``clipforge merge`` and WiSE-FT's given endpoint need.

A model trained by ``clipforge train`` (or written by a weight-changing ``clipforge adapt`` method) records the
fingerprint of the weights it started from (``provenance["base"]``), which must be the base's. A model without
that record (an open_clip or Hugging Face fine-tune) must lie near the base: ``‖θ − θ₀‖ / ‖θ₀‖`` over its weight
matrices below 1. Fine-tunes stay well below (the merge benchmark's are under 0.2); models from another
initialisation sit near √2 (the weights of two independent initialisations are uncorrelated), and averaging or
interpolating those collapses (Wortsman et al., "Model soups", ICML 2022, §3).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from clipforge.errors import CheckpointError

State = dict[str, torch.Tensor]

MAX_RELATIVE_DISTANCE = 1.0


def check_origin(provenance: Mapping[str, Any], state: State, name: str, base: State, base_fingerprint: str,
                 base_name: str) -> None:
    """A one-line ``CheckpointError`` unless model ``name`` (its provenance, its float32 weights ``state``) comes from
    the base ``base_name`` (its float32 weights ``base`` and their ``weights_fingerprint``): the base its provenance
    records, or without that record, weights near the base's (see the module docstring)."""
    recorded = provenance.get("base", {}).get("fingerprint") if isinstance(provenance.get("base"), Mapping) else None
    if recorded is not None:
        if recorded != base_fingerprint:
            origin = provenance["base"].get("source", "another model")
            raise CheckpointError(
                f"{name}: fine-tuned from {origin} (weights {recorded[:12]}), not from the base {base_name} "
                f"(weights {base_fingerprint[:12]})"
            )
        return
    distance = relative_distance(state, base)
    if distance >= MAX_RELATIVE_DISTANCE:
        raise CheckpointError(
            f"{name}: does not come from the base {base_name}: its weight matrices lie {distance:.2f} × the "
            f"base's norm away from it (fine-tunes of a base stay below {MAX_RELATIVE_DISTANCE})"
        )


def relative_distance(state: State, base: State) -> float:
    """``‖θ − θ₀‖ / ‖θ₀‖`` over the weight matrices (tensors of two or more dimensions)."""
    squared_distance = squared_norm = 0.0
    for key, value in state.items():
        if value.dim() >= 2:
            squared_distance += float((value - base[key]).pow(2).sum())
            squared_norm += float(base[key].pow(2).sum())
    return (squared_distance / squared_norm) ** 0.5 if squared_norm > 0 else float("inf")
