"""Token merging (ToMe, PiToMe) and pruning (EViT) in the image tower.

Matching and merging are checked against plain loop re-implementations of the papers' algorithms written
here (python loops over tokens, float64), proportional attention against hand-computed softmaxes, token
counts against hand arithmetic and FLOPs against torch's FlopCounterMode.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import clipforge
from clipforge.compress import (
    EViT,
    PiToMe,
    ToMe,
    apply_token_reduction,
    bipartite_soft_matching,
    estimate_flops,
    keep_ratio_schedule,
    margin_schedule,
    merge_schedule,
    merge_source,
    merge_wavg,
    pitome_matching,
    remove_token_reduction,
    token_counts,
)
from clipforge.errors import ConfigError
from clipforge.layers.attention import Attention, AttentionOutput
from clipforge.layers.token_reduction import TokenState

# ---------------------------------------------------------------- loop references


def loop_cosine(metric: torch.Tensor) -> list[list[float]]:
    """Cosine similarity of every pair of rows of ``metric`` [N, C], in python floats."""
    rows = metric.double().tolist()
    norms = [math.sqrt(sum(v * v for v in row)) for row in rows]
    return [
        [sum(a * b for a, b in zip(rows[i], rows[j])) / (norms[i] * norms[j]) for j in range(len(rows))]
        for i in range(len(rows))
    ]


def loop_best_edges(cosine, set_a, set_b):
    """For each A token its most similar B token: [(similarity, a, b)], best edges first."""
    edges = []
    for a in set_a:
        best_b = set_b[0]
        for b in set_b:
            if cosine[a][b] > cosine[a][best_b]:
                best_b = b
        edges.append((cosine[a][best_b], a, best_b))
    return sorted(edges, key=lambda edge: -edge[0])


def loop_groups(tokens, merges):
    """Groups of input tokens after merging each (a, b) in ``merges`` into b."""
    groups = {t: {t} for t in tokens}
    for a, b in merges:
        groups[b] |= groups.pop(a)
    return [frozenset(group) for group in groups.values()]


def loop_tome(metric: torch.Tensor, r: int, class_token: bool):
    """ToMe's bipartite soft matching for one image: groups of input tokens that become one token."""
    cosine = loop_cosine(metric)
    n = len(cosine)
    set_a = [t for t in range(0, n, 2) if not (class_token and t == 0)]
    set_b = list(range(1, n, 2))
    r = min(r, (n - (1 if class_token else 0)) // 2)
    edges = loop_best_edges(cosine, set_a, set_b)
    return loop_groups(range(n), [(a, b) for _, a, b in edges[:r]])


def loop_pitome(metric: torch.Tensor, ratio: float, margin: float, alpha: float, class_token: bool, bsm: bool):
    """PiToMe for one image: energy ordering, protection of low energy, bipartite merging of the rest."""
    n = metric.shape[0]
    patches = list(range(1 if class_token else 0, n))
    cosine = loop_cosine(metric)
    count = len(patches)
    k = min(math.floor(count - count * ratio), count // 2)
    energy = {}
    for i in patches:
        total = 0.0
        for j in patches:
            s = cosine[i][j] - margin
            total += s if s > 0 else alpha * (math.exp(s) - 1.0)
        energy[i] = total / count
    order = sorted(patches, key=lambda t: -energy[t])
    if k == 0:
        return loop_groups(range(n), [])
    if bsm:
        edges = loop_best_edges(cosine, order[0::2], order[1::2])[:k]
    else:
        candidates = order[: 2 * k]
        edges = loop_best_edges(cosine, candidates[0::2], candidates[1::2])
        assert len(edges) == k
    return loop_groups(range(n), [(a, b) for _, a, b in edges])


def loop_merged_values(x: torch.Tensor, size: torch.Tensor, groups):
    """{group: (size-weighted average of the group's tokens, total size)} for one image."""
    rows, sizes = x.double().tolist(), size[:, 0].double().tolist()
    result = {}
    for group in groups:
        total = sum(sizes[t] for t in group)
        value = [sum(sizes[t] * rows[t][c] for t in group) / total for c in range(len(rows[0]))]
        result[group] = (value, total)
    return result


def check_against_loop(source, merged, merged_size, x, size, expected_groups, class_token):
    """Merged tokens hold the loop's groups (``source`` rows), with its averages and sizes; class token first."""
    for image in range(x.shape[0]):
        groups = [frozenset(torch.nonzero(row).flatten().tolist()) for row in source[image]]
        assert sorted(groups, key=sorted) == sorted(expected_groups[image], key=sorted)
        reference = loop_merged_values(x[image], size[image], expected_groups[image])
        for row, group in enumerate(groups):
            value, total = reference[group]
            torch.testing.assert_close(merged[image, row].double(), torch.tensor(value, dtype=torch.float64))
            assert merged_size[image, row, 0].item() == total
        if class_token:
            assert groups[0] == frozenset({0})


def check_merge_against_loop(merge, x, size, expected_groups, class_token):
    batch, tokens, _ = x.shape
    source = merge_source(merge, torch.eye(tokens).expand(batch, tokens, tokens))
    merged, merged_size = merge_wavg(merge, x, size)
    check_against_loop(source, merged, merged_size, x, size, expected_groups, class_token)


def random_tokens(seed: int, batch: int, tokens: int, channels: int = 6):
    generator = torch.Generator().manual_seed(seed)
    metric = torch.randn(batch, tokens, 8, generator=generator)
    x = torch.randn(batch, tokens, channels, generator=generator)
    size = torch.randint(1, 5, (batch, tokens, 1), generator=generator).float()
    return metric, x, size


# ---------------------------------------------------------------- matching and merging vs loops


@pytest.mark.parametrize("class_token", [True, False])
@pytest.mark.parametrize(("tokens", "r"), [(9, 1), (9, 3), (10, 4), (17, 5), (17, 8), (16, 20), (21, 7)])
def test_tome_matches_loop_reference(tokens, r, class_token):
    metric, x, size = random_tokens(tokens * 100 + r, batch=3, tokens=tokens)
    merge = bipartite_soft_matching(metric, r, class_token=class_token)
    expected = [loop_tome(metric[image], r, class_token) for image in range(3)]
    assert len(expected[0]) == tokens - min(r, (tokens - int(class_token)) // 2)
    check_merge_against_loop(merge, x, size, expected, class_token)


def test_tome_merges_nothing_at_r0_or_too_few_tokens():
    metric, _, _ = random_tokens(0, batch=1, tokens=2)
    assert bipartite_soft_matching(metric, 0) is None
    assert bipartite_soft_matching(metric, 3, class_token=True) is None  # (2 - 1) // 2 = 0 merges allowed


@pytest.mark.parametrize("bsm", [False, True])
@pytest.mark.parametrize("class_token", [True, False])
@pytest.mark.parametrize(
    ("tokens", "ratio", "margin"), [(11, 0.9, 0.75), (17, 0.75, 0.5), (17, 0.6, 0.0), (21, 0.3, 0.9)]
)
def test_pitome_matches_loop_reference(tokens, ratio, margin, class_token, bsm):
    metric, x, size = random_tokens(tokens * 7 + int(ratio * 100), batch=3, tokens=tokens)
    alpha = 1.0 if margin else 0.5
    merge = pitome_matching(metric, ratio, margin, alpha=alpha, class_token=class_token, bsm=bsm)
    expected = [loop_pitome(metric[image], ratio, margin, alpha, class_token, bsm) for image in range(3)]
    check_merge_against_loop(merge, x, size, expected, class_token)


def test_pitome_protects_the_lowest_energy_tokens():
    """Four near-identical tokens (high energy) and four mutually orthogonal ones (low energy): only the
    cluster merges, the isolated tokens stay alone."""
    noise = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    cluster = torch.tensor([1.0, 0, 0, 0, 0, 0]) + 0.01 * noise
    isolated = torch.eye(6)[1:5] * torch.tensor([1.0, -1.0, 1.0, -1.0])[:, None]
    metric = torch.cat([torch.zeros(1, 6) + 1.0, isolated[:2], cluster, isolated[2:]])[None]
    merge = pitome_matching(metric, keep_ratio=0.75, margin=0.5, class_token=True)
    source = merge_source(merge, torch.eye(9)[None])
    groups = [frozenset(torch.nonzero(row).flatten().tolist()) for row in source[0]]
    assert len(groups) == 7  # k = floor(8 - 8 * 0.75) = 2 merges
    assert set().union(*(group for group in groups if len(group) > 1)) <= {3, 4, 5, 6}
    assert {frozenset({t}) for t in (0, 1, 2, 7, 8)} <= set(groups)


@pytest.mark.parametrize("layer", [1, 2])
def test_merging_modules_use_head_averaged_keys_sizes_and_depth_schedules(layer):
    """ToMe / PiToMe blocks: keys averaged over heads, the layer's r / margin / variant, sizes carried on."""
    generator = torch.Generator().manual_seed(layer)
    keys = torch.randn(2, 4, 17, 8, generator=generator)
    _, x, size = random_tokens(layer, batch=2, tokens=17)
    state = TokenState(size=size, extra={"source": torch.eye(17).expand(2, 17, 17)})
    attention = AttentionOutput(torch.zeros_like(x), keys, None)
    metric = keys.mean(dim=1)
    tome = ToMe(3, r=[0, 2, 5])
    merged, merged_state = tome(layer, x, attention, state)
    expected = [loop_tome(metric[image], [0, 2, 5][layer], class_token=True) for image in range(2)]
    check_against_loop(merged_state.extra["source"], merged, merged_state.size, x, size, expected, True)
    pitome = PiToMe(4, keep_ratio=0.75, margin=0.8, bsm_layers=2)  # margins 0.8, 0.6, 0.4, 0.2
    merged, merged_state = pitome(layer, x, attention, state)
    margin, bsm = [0.8, 0.6, 0.4, 0.2][layer], layer < 2
    expected = [loop_pitome(metric[image], 0.75, margin, 1.0, True, bsm) for image in range(2)]
    check_against_loop(merged_state.extra["source"], merged, merged_state.size, x, size, expected, True)


@pytest.mark.parametrize("fuse_token", [True, False])
@pytest.mark.parametrize(("tokens", "keep_rate"), [(10, 0.5), (17, 0.7), (17, 0.95), (26, 0.3)])
def test_evit_matches_loop_reference(tokens, keep_rate, fuse_token):
    generator = torch.Generator().manual_seed(tokens)
    x = torch.randn(2, tokens, 5, generator=generator)
    weights = torch.randn(2, 3, tokens, tokens, generator=generator).softmax(dim=-1)
    evit = EViT(1, [keep_rate], fuse_token=fuse_token)
    out, state = evit(0, x, AttentionOutput(torch.zeros_like(x), None, weights), TokenState())
    for image in range(2):
        rows, w = x[image].double().tolist(), weights[image].double().tolist()
        attention = [sum(w[h][0][j] for h in range(3)) / 3 for j in range(1, tokens)]
        ranked = sorted(range(tokens - 1), key=lambda j: -attention[j])
        keep = math.ceil(keep_rate * (tokens - 1))
        expected = rows if keep == tokens - 1 else [rows[0]] + [rows[1 + j] for j in ranked[:keep]]
        if fuse_token and keep < tokens - 1:
            expected.append([sum(attention[j] * rows[1 + j][c] for j in ranked[keep:]) for c in range(5)])
        torch.testing.assert_close(out[image].double(), torch.tensor(expected, dtype=torch.float64))
    assert state.size is None
    assert evit.tokens_after(0, tokens) == out.shape[1]


# ---------------------------------------------------------------- proportional attention


def test_proportional_attention_bias_is_zero_for_unit_sizes():
    bias = ToMe(1, r=1).attention_bias(0, TokenState(size=torch.ones(2, 7, 1)))
    assert bias.shape == (2, 1, 1, 7) and torch.equal(bias, torch.zeros_like(bias))
    assert ToMe(1, r=1).attention_bias(0, TokenState()) is None
    assert ToMe(1, r=1, prop_attn=False).attention_bias(0, TokenState(size=torch.full((1, 3, 1), 2.0))) is None


def test_proportional_attention_two_tokens_by_hand():
    """One head, identity q/k/v/out projections, tokens x0=(1,0) size 1 and x1=(0,2) size 3."""
    attention = Attention(2, 1)
    with torch.no_grad():
        attention.in_proj_weight.copy_(torch.cat([torch.eye(2)] * 3))
        attention.out_proj.weight.copy_(torch.eye(2))
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    bias = PiToMe(1, 0.5).attention_bias(0, TokenState(size=torch.tensor([[[1.0], [3.0]]])))
    # logits q_i.k_j / sqrt(2) + log(size_j); softmax(l)_j = size_j e^{q.k_j/sqrt2} / sum
    row0 = [math.exp(1 / math.sqrt(2)), 3 * math.exp(0.0)]
    row1 = [math.exp(0.0), 3 * math.exp(4 / math.sqrt(2))]
    weights = [[v / sum(row0) for v in row0], [v / sum(row1) for v in row1]]
    expected_out = [[weights[0][0], 2 * weights[0][1]], [weights[1][0], 2 * weights[1][1]]]
    fused = attention(x, bias)
    explicit = attention(x, bias, return_weights=True)
    torch.testing.assert_close(explicit.weights[0, 0], torch.tensor(weights))
    torch.testing.assert_close(fused.out[0], torch.tensor(expected_out))
    torch.testing.assert_close(explicit.out[0], torch.tensor(expected_out))


def test_proportional_attention_equals_attention_over_duplicated_tokens():
    """A token of size 2 attended with log(2) added acts as two copies of itself (ToMe §3)."""
    attention = Attention(16, 4)
    x = torch.randn(1, 3, 16, generator=torch.Generator().manual_seed(3))
    bias = ToMe(1, r=1).attention_bias(0, TokenState(size=torch.tensor([[[1.0], [2.0], [1.0]]])))
    duplicated = x[:, [0, 1, 1, 2]]
    torch.testing.assert_close(attention(x, bias).out, attention(duplicated).out[:, [0, 1, 3]])


# ---------------------------------------------------------------- schedules


def test_schedules_by_hand():
    assert merge_schedule(12, 8) == [8] * 12
    # (16, -1): from 2r = 32 down to 0 in steps of -32/11, truncated
    assert merge_schedule(12, 16, inflect=-1.0) == [32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0]
    # (10, 0.5): from int(10 * 0.5) = 5 up to 15 in steps of 10/3
    assert merge_schedule(4, 10, inflect=0.5) == [5, 8, 11, 15]
    assert merge_schedule(5, [4, 3]) == [4, 3, 0, 0, 0]
    assert margin_schedule(4, 0.8) == pytest.approx([0.8, 0.6, 0.4, 0.2])
    assert keep_ratio_schedule(4, 0.7, layers=[1, 3]) == [1.0, 0.7, 1.0, 0.7]
    assert keep_ratio_schedule(4, [0.9, 0.8]) == [0.9, 0.8, 1.0, 1.0]


@pytest.mark.parametrize(
    ("method", "settings", "field"),
    [
        ("tome", {"r": -1}, "'r'"),
        ("tome", {"r": 8.0}, "'r'"),
        ("tome", {"r": 4, "inflect": 2.0}, "'inflect'"),
        ("tome", {"r": [1] * 13}, "'r'"),
        ("tome", {"ratio": 0.5}, "'ratio'"),
        ("pitome", {"keep_ratio": 0.0}, "'keep_ratio'"),
        ("pitome", {"keep_ratio": "most"}, "'keep_ratio'"),
        ("pitome", {"keep_ratio": 0.9, "metric": "values"}, "'metric'"),
        ("pitome", {"keep_ratio": 0.9, "margin": 1.5}, "'margin'"),
        ("evit", {"keep_rate": 0.7, "layers": [12]}, "'layers'"),
        ("evit", {"keep_rate": [0.5, 0.5], "layers": [1]}, "'layers'"),
        ("merge", {}, "'merge'"),
    ],
)
def test_bad_settings_raise_config_error(vit_b32, method, settings, field):
    with pytest.raises(ConfigError, match=field):
        apply_token_reduction(vit_b32, method, **settings)
    assert vit_b32.visual.token_reduction is None


# ---------------------------------------------------------------- the model


@pytest.fixture(scope="module")
def vit_b32():
    torch.manual_seed(0)
    return clipforge.load("ViT-B-32").eval()


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def run_blocks(visual, pixels):
    """Tokens leaving each block, the image features and the final state, in one pass."""
    counts = []
    with torch.no_grad():
        for _, x, state in visual.transformer.iterate(visual.embed(pixels), reduction=visual.token_reduction):
            counts.append(x.shape[1])
        return counts, visual.head(x, state), state


@pytest.fixture(scope="module")
def base_features(vit_b32, pixels):
    with torch.no_grad():
        return vit_b32.encode_image(pixels)


def test_reduction_off_leaves_outputs_identical(vit_b32, pixels, base_features):
    off = [("tome", {"r": 0}), ("pitome", {"keep_ratio": 1.0}), ("evit", {"keep_rate": 1.0}), ("evit", {"layers": []})]
    with torch.no_grad():
        for method, settings in off:
            apply_token_reduction(vit_b32, method, **settings)
            assert (vit_b32.encode_image(pixels) - base_features).abs().max().item() <= 1e-6, method
        remove_token_reduction(vit_b32)
        assert torch.equal(vit_b32.encode_image(pixels), base_features)
    assert vit_b32.visual.token_reduction is None and not hasattr(vit_b32, "compression")


def pitome_counts(tokens, ratio, layers):
    counts = [tokens]
    for _ in range(layers):
        patches = counts[-1] - 1
        counts.append(counts[-1] - min(math.floor(patches - patches * ratio), patches // 2))
    return counts


SCHEDULES = [
    # 50 tokens, r=8, each layer capped at (N - 1) // 2: 18 -> 10 (8), 10 -> 6 (4), 6 -> 4 (2), 4 -> 3, 3 -> 2, 2 -> 2
    ("tome", {"r": 8}, [50, 42, 34, 26, 18, 10, 6, 4, 3, 2, 2, 2, 2]),
    # decreasing schedule 32, 29, 26, ...: 50 -> 26 (cap 24), 26 -> 14 (cap 12), 14 -> 8, 8 -> 5, 5 -> 3, 3 -> 2
    ("tome", {"r": 16, "inflect": -1.0}, [50, 26, 14, 8, 5, 3, 2, 2, 2, 2, 2, 2, 2]),
    ("tome", {"r": [0, 5, 0, 5]}, [50, 50, 45, 45, 40] + [40] * 8),
    ("pitome", {"keep_ratio": 0.9}, pitome_counts(50, 0.9, 12)),
    ("pitome", {"keep_ratio": 0.8, "metric": "tokens", "bsm_layers": 6}, pitome_counts(50, 0.8, 12)),
    # keep ceil(0.7 * 49) = 35 (+ class + fused) at block 3, ceil(0.7 * 36) = 26 at 6, ceil(0.7 * 27) = 19 at 9
    ("evit", {"keep_rate": 0.7}, [50, 50, 50, 50, 37, 37, 37, 28, 28, 28, 21, 21, 21]),
    ("evit", {"keep_rate": 0.5, "layers": [0], "fuse_token": False}, [50, 26] + [26] * 11),
]


@pytest.mark.parametrize(("method", "settings", "expected"), SCHEDULES)
def test_token_counts_follow_the_schedule(vit_b32, pixels, method, settings, expected):
    apply_token_reduction(vit_b32, method, **settings)
    try:
        counts, features, state = run_blocks(vit_b32.visual, pixels)
        assert [50] + counts == expected == token_counts(vit_b32)
        assert token_counts(vit_b32, method, **settings) == expected
        assert torch.isfinite(features).all()
        if method != "evit":
            assert state.size.shape == (2, expected[-1], 1)
            assert (state.size.sum(dim=1) == 50).all()
    finally:
        remove_token_reduction(vit_b32)


def test_source_tracking_partitions_the_patches(vit_b32, pixels):
    apply_token_reduction(vit_b32, "tome", r=8, trace_source=True)
    try:
        _, _, state = run_blocks(vit_b32.visual, pixels)
    finally:
        remove_token_reduction(vit_b32)
    source = state.extra["source"]
    assert source.shape == (2, 2, 50)
    assert torch.equal(source.sum(dim=1), torch.ones(2, 50))  # every input token is in exactly one token
    assert torch.equal(source.sum(dim=2, keepdim=True), state.size)
    assert source[:, 0, 0].eq(1).all() and source[:, 0].sum(-1).eq(1).all()  # the class token is alone


def test_bfloat16_works(vit_b32, pixels):
    visual = copy.deepcopy(vit_b32.visual).to(torch.bfloat16)
    for method, settings in [("tome", {"r": 8}), ("pitome", {"keep_ratio": 0.9}), ("evit", {})]:
        apply_token_reduction(visual, method, **settings)
        counts, features, _ = run_blocks(visual, pixels[:1].to(torch.bfloat16))
        assert features.dtype == torch.bfloat16 and torch.isfinite(features).all(), method
        assert [50] + counts == token_counts(visual)


def test_compression_record_round_trips_through_json(vit_b32, pixels):
    apply_token_reduction(vit_b32, "pitome", keep_ratio=[0.9] * 6, margin=0.95, metric="tokens")
    record = json.loads(json.dumps(vit_b32.compression))
    assert record == {
        "method": "pitome",
        "settings": {
            "keep_ratio": [0.9] * 6, "margin": 0.95, "alpha": 1.0, "metric": "tokens",
            "bsm_layers": 0, "prop_attn": True, "trace_source": False,
        },
    }
    with torch.no_grad():
        first = vit_b32.encode_image(pixels[:1])
        remove_token_reduction(vit_b32)
        apply_token_reduction(vit_b32, record["method"], **record["settings"])
        second = vit_b32.encode_image(pixels[:1])
    remove_token_reduction(vit_b32)
    assert torch.equal(first, second)


def counted_macs(visual, pixels):
    """Multiply-accumulates of the blocks as torch counts them (math SDPA, so attention matmuls count)."""
    with torch.no_grad():
        tokens = visual.embed(pixels)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            visual.transformer(tokens, reduction=visual.token_reduction)
    return counter.get_total_flops() // 2


def test_estimate_flops_matches_flop_counter(vit_b32, pixels):
    visual, one = vit_b32.visual, pixels[:1]
    assert estimate_flops(vit_b32) == counted_macs(visual, one) == 12 * (12 * 50 * 768**2 + 2 * 50**2 * 768)
    apply_token_reduction(vit_b32, "evit", keep_rate=0.7)
    try:
        assert estimate_flops(vit_b32) == counted_macs(visual, one)
        apply_token_reduction(vit_b32, "tome", r=8)
        counts = token_counts(vit_b32)
        # where it merges, ToMe's matching adds one |A| x |B| similarity matmul over the 64-wide mean key, and the
        # merge multiplies the tokens (768 wide) and their sizes (1 wide) by the [m, n] assignment matrix
        matching = sum(math.ceil(n / 2) * (n // 2) * 64 + m * n * (768 + 1) for n, m in zip(counts, counts[1:]) if m < n)
        assert estimate_flops(vit_b32) + matching == counted_macs(visual, one)
        assert estimate_flops(vit_b32, "tome", r=0) == 12 * (12 * 50 * 768**2 + 2 * 50**2 * 768)
    finally:
        remove_token_reduction(vit_b32)
