"""Per-layer schedules shared by token merging (ToMe, PiToMe) and pruning (EViT), their token arithmetic, and
their row gather (``take_rows``).

- ``merge_schedule``: ToMe's tokens-removed-per-layer ``r`` (Bolya et al., ICLR 2023; ``tome/utils.py::parse_r``).
- ``keep_ratio_schedule``: the fraction of patch tokens kept per layer (PiToMe's ``ratio``, Tran et al.,
  NeurIPS 2024; EViT's ``keep_rate``, Liang et al., ICLR 2022), everywhere or at chosen layers only.
- ``margin_schedule``: PiToMe's energy margin, decaying linearly to zero with depth (``m_l = m0 - m0 * l / L``).
- ``ScheduledReduction``: a token reduction whose output token count depends only on the layer and its input
  count, so token counts and FLOPs per layer are known before running the model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from clipforge.errors import ConfigError
from clipforge.layers.token_reduction import TokenReduction


def merge_schedule(num_layers: int, r: int | Sequence[int], inflect: float = 0.0) -> list[int]:
    """Tokens to merge away in each of ``num_layers`` blocks (ToMe's ``parse_r``).

    ``r`` an int with ``inflect=0``: ``r`` in every layer. With ``inflect`` in [-1, 1]: a linear schedule from
    ``int(r * (1 - inflect))`` to ``2r`` minus that, same total; ``inflect=-1`` is the paper's decreasing
    schedule (2r down to 0). ``r`` a list: an explicit per-layer r, padded with zeros.
    """
    if not isinstance(r, (int, list, tuple)):
        raise ConfigError(f"tome setting 'r' must be an int or a list of ints, got {r!r}")
    if not isinstance(r, int):
        per_layer = list(r)
        if inflect != 0.0:
            raise ConfigError("tome setting 'inflect' applies to a constant r, not to a per-layer list")
        if len(per_layer) > num_layers or any(not isinstance(v, int) or v < 0 for v in per_layer):
            raise ConfigError(f"tome setting 'r' must list at most {num_layers} non-negative ints, got {per_layer}")
        return per_layer + [0] * (num_layers - len(per_layer))
    if r < 0:
        raise ConfigError(f"tome setting 'r' must be >= 0, got {r}")
    if not -1.0 <= inflect <= 1.0:
        raise ConfigError(f"tome setting 'inflect' must be in [-1, 1], got {inflect}")
    if num_layers == 1:
        return [r]
    low = int(r * (1.0 - inflect))
    high = 2 * r - low
    step = (high - low) / (num_layers - 1)
    return [int(low + step * layer) for layer in range(num_layers)]


def keep_ratio_schedule(
    num_layers: int,
    ratio: float | Sequence[float],
    layers: Sequence[int] | None = None,
    *,
    name: str = "keep_ratio",
) -> list[float]:
    """The fraction of patch tokens kept in each block; 1.0 means the block reduces nothing.

    ``ratio`` a float: that ratio in every block, or only in ``layers`` (0-indexed) when given. ``ratio`` a
    list: an explicit per-layer ratio, padded with 1.0. ``name`` is the setting named in errors.
    """
    numbers = ratio if isinstance(ratio, (list, tuple)) else [ratio]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
        raise ConfigError(f"'{name}' must be a number or a list of numbers, got {ratio!r}")
    if isinstance(ratio, (int, float)):
        chosen = range(num_layers) if layers is None else _check_layers(num_layers, layers)
        ratios = [float(ratio) if layer in chosen else 1.0 for layer in range(num_layers)]
    else:
        if layers is not None:
            raise ConfigError(f"give either a per-layer '{name}' list or 'layers', not both")
        ratios = [float(value) for value in ratio]
        if len(ratios) > num_layers:
            raise ConfigError(f"'{name}' lists {len(ratios)} layers but the image tower has {num_layers}")
        ratios += [1.0] * (num_layers - len(ratios))
    bad = [value for value in ratios if not 0.0 < value <= 1.0]
    if bad:
        raise ConfigError(f"'{name}' must be in (0, 1], got {bad[0]}")
    return ratios


def margin_schedule(num_layers: int, margin: float) -> list[float]:
    """PiToMe's margin per block: ``m0 - m0 * l / L`` (``algo/pitome/patch/*.py::apply_patch``)."""
    if not 0.0 <= margin < 1.0:
        raise ConfigError(f"pitome setting 'margin' must be in [0, 1), got {margin}")
    return [margin - margin * layer / num_layers for layer in range(num_layers)]


def _check_layers(num_layers: int, layers: Sequence[int]) -> set[int]:
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad:
        raise ConfigError(f"'layers' entry {bad[0]} is out of range 0..{num_layers - 1}")
    return set(layers)


class ScheduledReduction(TokenReduction, ABC):
    """A reduction whose output token count is a function of the layer and its input token count."""

    def __init__(self, num_layers: int) -> None:
        super().__init__()
        self.num_layers = num_layers

    @abstractmethod
    def tokens_after(self, layer: int, tokens: int) -> int:
        """How many tokens (class token included) leave block ``layer`` when ``tokens`` enter it."""

    def token_counts(self, tokens: int) -> list[int]:
        """Tokens entering each block, then the count leaving the last one (``num_layers + 1`` numbers)."""
        counts = [tokens]
        for layer in range(self.num_layers):
            counts.append(self.tokens_after(layer, counts[-1]))
        return counts


def take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` [B, K] of ``x`` [B, N, ...] → [B, K, ...], by one gather on the flattened batch
    (a plain gather, where ``gather`` with broadcast indices is a slow node in exported graphs)."""
    batch, tokens = x.shape[:2]
    offsets = torch.arange(batch, device=index.device)[:, None] * tokens
    return x.flatten(0, 1)[index + offsets]
