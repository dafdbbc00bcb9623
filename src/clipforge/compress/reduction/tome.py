"""ToMe: token merging by bipartite soft matching (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023).

In every block, between the attention residual and the MLP, the tokens are split alternately into sets A and
B; each A token finds its most similar B token (cosine similarity of the keys averaged over heads), and the
``r`` best of these edges are merged. Merged tokens are size-weighted averages, each token carries its size
(how many input patches it stands for), and proportional attention adds ``log(size)`` to the attention logits
so a merged token keeps its share of the softmax. The class token is never merged. Follows the official code
(facebookresearch/ToMe af95e4b: ``tome/merge.py::bipartite_soft_matching, merge_wavg, merge_source``,
``tome/patch/timm.py``), including the cap of ``r`` at half the non-protected tokens of each layer. One
difference: the merge itself is a product with the 0/1 assignment matrix (``merge_by_destination``) instead of
the official gather and ``scatter_reduce``; the result is the same up to float rounding, and exported graphs
run it faster.

``TokenMerging`` holds what ToMe and PiToMe share: size tracking, proportional attention, source tracking.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable, Sequence

import torch

from clipforge.compress.reduction.schedules import ScheduledReduction, merge_schedule
from clipforge.layers.attention import AttentionOutput
from clipforge.layers.token_reduction import AttentionRequest, TokenState

Merge = Callable[[torch.Tensor], torch.Tensor]
"""``merge(t)``: reduce per-token rows ``t`` [B, N, C] to [B, N', C], summing the rows that merge into one."""


def tome_merge_count(tokens: int, r: int, protected: int) -> int:
    """Tokens ToMe actually merges away: ``r``, capped at half the non-protected tokens."""
    return max(0, min(r, (tokens - protected) // 2))


def merge_by_destination(destination: torch.Tensor, tokens_out: int) -> Merge:
    """The merge that sends input token ``j`` to output row ``destination[b, j]`` (an int map [B, N]).

    It multiplies by the 0/1 assignment matrix [B, N', N] instead of gathering and scattering rows: one batched
    matrix product, which OpenVINO runs like any other, where its gather and scatter kernels with broadcast
    indices cost 14 ms of a 96 ms ViT-B-32 batch (int8, PiToMe at half the FLOPs); eager PyTorch is no slower.
    """
    rows = torch.arange(tokens_out, device=destination.device)
    assignment = destination[:, None, :] == rows[None, :, None]

    def merge(x: torch.Tensor) -> torch.Tensor:
        return assignment.to(x.dtype) @ x

    return merge


def bipartite_destinations(metric: torch.Tensor, r: int, class_token: bool = True) -> tuple[torch.Tensor, int] | None:
    """ToMe's matching on ``metric`` [B, N, C] as each token's output row [B, N] and the output token count,
    or None when nothing merges.

    The output is ``[unmerged A tokens, all B tokens]`` (A: even positions, B: odd), with the unmerged A tokens
    in ascending order when ``class_token`` (so the class token stays at index 0), else in descending order of
    their best similarity, exactly as the official code; each merged A token goes to its most similar B token.
    """
    r = tome_merge_count(metric.shape[1], r, int(class_token))
    if r == 0:
        return None
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)
        if class_token:
            scores[:, 0, :] = -math.inf
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)
        unmerged_idx, src_idx = edge_idx[:, r:], edge_idx[:, :r]
        if class_token:
            unmerged_idx = unmerged_idx.sort(dim=1).values
        batch, count_a, count_b = scores.shape
        kept_a = count_a - r
        b_rows = kept_a + torch.arange(count_b, device=metric.device).expand(batch, -1)
        a_rows = torch.empty_like(node_idx).scatter_(1, src_idx, kept_a + node_idx.gather(dim=1, index=src_idx))
        if kept_a:  # (empty tensors are left out: OpenVINO fails to compile some of them at static shapes)
            a_rows.scatter_(1, unmerged_idx, torch.arange(kept_a, device=metric.device).expand(batch, -1))
        # interleave back to token order: A at even positions, B at odd ones, and A's last one when N is odd
        destination = torch.stack([a_rows[:, :count_b], b_rows], dim=-1).flatten(1)
        if count_a > count_b:
            destination = torch.cat([destination, a_rows[:, count_b:]], dim=1)
    return destination, kept_a + count_b


def bipartite_soft_matching(metric: torch.Tensor, r: int, class_token: bool = True) -> Merge | None:
    """ToMe's matching on ``metric`` [B, N, C] (``bipartite_destinations``); returns the merge function, or None
    when nothing merges."""
    found = bipartite_destinations(metric, r, class_token)
    return None if found is None else merge_by_destination(*found)


def merge_wavg(merge: Merge, x: torch.Tensor, size: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge tokens ``x`` [B, N, C] as size-weighted averages; returns them and their new sizes [B, N', 1]."""
    if size is None:
        size = torch.ones_like(x[..., :1])
    x = merge(x * size)
    size = merge(size)
    return x / size, size


def merge_source(merge: Merge, source: torch.Tensor) -> torch.Tensor:
    """Carry the 0/1 map [B, N, N0] of which input tokens each current token holds through a merge (tokens hold
    disjoint sets of patches, so the sum of merged rows is their union)."""
    return merge(source)


def proportional_attention_bias(size: torch.Tensor) -> torch.Tensor:
    """``log(size)`` per key token, shaped [B, 1, 1, N] to add to attention logits [B, H, N, N]."""
    return size.log()[:, None, None, :, 0]


class TokenMerging(ScheduledReduction):
    """Size-weighted merging with proportional attention and optional source tracking (ToMe, PiToMe).

    With ``trace_source`` the state's ``extra["source"]`` is a 0/1 map [B, N, N0] from the current tokens
    to the tokens entering the first block (class token first): which patches each token holds.
    """

    def __init__(self, num_layers: int, prop_attn: bool, trace_source: bool) -> None:
        super().__init__(num_layers)
        self.prop_attn = prop_attn
        self.trace_source = trace_source

    @abstractmethod
    def matching(self, layer: int, x: torch.Tensor, attention: AttentionOutput) -> Merge | None:
        """The merge to apply after the attention of block ``layer``, or None."""

    def start(self, x: torch.Tensor) -> TokenState:
        if not self.trace_source:
            return TokenState()
        batch, tokens, _ = x.shape
        eye = torch.eye(tokens, dtype=x.dtype, device=x.device)
        return TokenState(extra={"source": eye.expand(batch, tokens, tokens)})

    def attention_bias(self, layer: int, state: TokenState) -> torch.Tensor | None:
        if not self.prop_attn or state.size is None:
            return None
        return proportional_attention_bias(state.size)

    def forward(
        self, layer: int, x: torch.Tensor, attention: AttentionOutput, state: TokenState
    ) -> tuple[torch.Tensor, TokenState]:
        merge = self.matching(layer, x, attention)
        if merge is None:
            return x, state
        extra = dict(state.extra)
        if "source" in extra:
            extra["source"] = merge_source(merge, extra["source"])
        x, size = merge_wavg(merge, x, state.size)
        return x, TokenState(size=size, extra=extra)


class ToMe(TokenMerging):
    """ToMe on the image tower: merge ``r`` tokens per block (see ``merge_schedule`` for ``r`` and ``inflect``).

    ``r=0`` (the default) merges nothing and leaves the model's output unchanged. ``prop_attn`` (default on,
    as the official code for off-the-shelf models) adds ``log(size)`` to the attention logits.
    """

    def __init__(
        self,
        num_layers: int,
        r: int | Sequence[int] = 0,
        inflect: float = 0.0,
        *,
        prop_attn: bool = True,
        trace_source: bool = False,
    ) -> None:
        super().__init__(num_layers, prop_attn, trace_source)
        self.r = merge_schedule(num_layers, r, inflect)

    def request(self, layer: int) -> AttentionRequest:
        return AttentionRequest(keys=self.r[layer] > 0)

    def matching(self, layer: int, x: torch.Tensor, attention: AttentionOutput) -> Merge | None:
        if self.r[layer] == 0:
            return None
        return bipartite_soft_matching(attention.keys.mean(dim=1), self.r[layer], class_token=True)

    def tokens_after(self, layer: int, tokens: int) -> int:
        return tokens - tome_merge_count(tokens, self.r[layer], protected=1)
