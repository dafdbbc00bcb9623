"""PiToMe: energy-protected token merging (Tran et al., "Accelerating Transformers with Spectrum-Preserving
Token Merging", NeurIPS 2024).

Per block, on the patch tokens (the class token is always kept, first): build the cosine-similarity graph
``S`` of the metric, give each token the energy ``E_i = mean_j ELU(S_ij - m_l, alpha)`` (self-similarity
included), and sort the tokens by energy, highest first. To remove ``k = floor(T - T * keep_ratio)`` of the
``T`` patch tokens, only the ``2k`` highest-energy tokens (large clusters of similar tokens) may merge; the
low-energy rest (isolated, informative tokens) is protected. The candidates are split alternately in energy
order into A and B, and every A token merges into its most similar B token. Sizes, size-weighted averages
and proportional attention are ToMe's. Output order: ``[class token, protected tokens by descending energy,
B tokens]``. Official code: hchautran/PiToMe 550b5de, ``algo/pitome/merge.py::pitome_vision, pitome,
pitome_bsm``; ``algo/pitome/patch/{timm,deit,clip}.py``.

``bsm_layers`` leading blocks use the official ``pitome_bsm`` variant instead: every token is a candidate,
split alternately in energy order, and ToMe's top-``k`` edges merge. The official patches differ; to match one:

- timm/DeiT (``patch/deit.py``): ``metric="keys", margin=0.75, bsm_layers=ceil(L/2), prop_attn=False``;
- LAVIS CLIP, used for the paper's retrieval table (``patch/clip.py``): ``metric="tokens", margin=0.95,
  bsm_layers=0, prop_attn=False``.

The defaults here are the timm metric and margin with the paper's algorithm in every layer, and ToMe's
proportional attention (the official blocks never pass sizes to the attention, so theirs is off).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from clipforge.compress.reduction.schedules import (
    keep_ratio_schedule,
    margin_schedule,
    take_rows,
)
from clipforge.compress.reduction.tome import (
    Merge,
    TokenMerging,
    bipartite_destinations,
    merge_by_destination,
)
from clipforge.errors import ConfigError
from clipforge.layers.attention import AttentionOutput
from clipforge.layers.token_reduction import AttentionRequest

METRICS = ("keys", "tokens")


def pitome_merge_count(patch_tokens: int, keep_ratio: float) -> int:
    """Patch tokens PiToMe merges away: ``floor(T - T * ratio)`` as the official code, capped at ``T // 2``.

    The official code fails below a ratio of 0.5 (it needs ``2k <= T`` candidates); here the cap holds instead.
    """
    return min(math.floor(patch_tokens - patch_tokens * keep_ratio), patch_tokens // 2)


def energy_scores(metric: torch.Tensor, margin: float, alpha: float = 1.0) -> torch.Tensor:
    """Each token's energy [B, T]: ``mean_j ELU(cos(m_i, m_j) - margin, alpha)`` over ``metric`` [B, T, C]
    (PiToMe Eq. 4; ``j`` includes ``i``)."""
    normed = F.normalize(metric, p=2, dim=-1)
    return F.elu(normed @ normed.transpose(-1, -2) - margin, alpha=alpha).mean(dim=-1)


def pitome_matching(
    metric: torch.Tensor,
    keep_ratio: float,
    margin: float,
    *,
    alpha: float = 1.0,
    class_token: bool = True,
    bsm: bool = False,
) -> Merge | None:
    """PiToMe's matching on ``metric`` [B, N, C]; returns the merge function, or None when nothing merges.

    Both variants are ToMe's bipartite matching (``bipartite_destinations`` without a class token) run on
    tokens sorted by descending energy: on the ``2k`` highest-energy tokens with ``r = k`` (every A token
    merges: ``pitome``), or on all tokens with ``r = k`` (``bsm``: ``pitome_bsm``).
    """
    prefix = int(class_token)
    with torch.no_grad():
        patches = metric[:, prefix:]
        merges = pitome_merge_count(patches.shape[1], keep_ratio)
        if merges == 0:
            return None
        order = energy_scores(patches, margin, alpha).argsort(dim=-1, descending=True)
        candidates = order if bsm else order[:, : 2 * merges]
        inner, inner_out = bipartite_destinations(take_rows(patches, candidates), merges, class_token=False)
        # output rows: [class token, protected tokens in energy order, the candidates' merge]
        batch, protected = patches.shape[0], patches.shape[1] - candidates.shape[1]
        rows = prefix + protected + inner  # for the tokens of ``order``; the protected ones follow the candidates
        if protected:  # (no empty tensors: OpenVINO fails to compile some of them at static shapes)
            rows = torch.cat([rows, prefix + torch.arange(protected, device=metric.device).expand(batch, -1)], dim=1)
        destination = torch.empty_like(order).scatter_(1, order, rows)
        if prefix:
            destination = torch.cat([order.new_zeros(batch, prefix), destination], dim=1)
    return merge_by_destination(destination, prefix + protected + inner_out)


class PiToMe(TokenMerging):
    """PiToMe on the image tower.

    ``keep_ratio``: the fraction of patch tokens kept in every block (a float, the official semantics, so the
    count decays geometrically) or per block (a list, padded with 1.0); 1.0 (the default) merges nothing.
    ``margin``: ``m0`` of the margin schedule ``m0 - m0 * l / L``. ``alpha``: the ELU's negative-side scale.
    ``metric``: ``"keys"`` (head-averaged attention keys, timm patch) or ``"tokens"`` (the hidden states after
    the attention residual, LAVIS CLIP patch). ``bsm_layers``: how many leading blocks use ``pitome_bsm``.
    """

    def __init__(
        self,
        num_layers: int,
        keep_ratio: float | Sequence[float] = 1.0,
        *,
        margin: float = 0.75,
        alpha: float = 1.0,
        metric: str = "keys",
        bsm_layers: int = 0,
        prop_attn: bool = True,
        trace_source: bool = False,
    ) -> None:
        super().__init__(num_layers, prop_attn, trace_source)
        if metric not in METRICS:
            raise ConfigError(f"pitome setting 'metric' must be one of {METRICS}, got {metric!r}")
        if not 0 <= bsm_layers <= num_layers:
            raise ConfigError(f"pitome setting 'bsm_layers' must be in 0..{num_layers}, got {bsm_layers}")
        if alpha <= 0:
            raise ConfigError(f"pitome setting 'alpha' must be > 0, got {alpha}")
        self.keep_ratio = keep_ratio_schedule(num_layers, keep_ratio, name="keep_ratio")
        self.margin = margin_schedule(num_layers, margin)
        self.alpha = alpha
        self.metric = metric
        self.bsm_layers = bsm_layers

    def request(self, layer: int) -> AttentionRequest:
        return AttentionRequest(keys=self.metric == "keys" and self.keep_ratio[layer] < 1.0)

    def matching(self, layer: int, x: torch.Tensor, attention: AttentionOutput) -> Merge | None:
        if self.keep_ratio[layer] == 1.0:
            return None
        metric = attention.keys.mean(dim=1) if self.metric == "keys" else x
        return pitome_matching(
            metric,
            self.keep_ratio[layer],
            self.margin[layer],
            alpha=self.alpha,
            class_token=True,
            bsm=layer < self.bsm_layers,
        )

    def tokens_after(self, layer: int, tokens: int) -> int:
        return tokens - pitome_merge_count(tokens - 1, self.keep_ratio[layer])

