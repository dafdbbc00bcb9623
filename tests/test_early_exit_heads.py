"""Early exit's heads (LGViT adapted to CLIP) against hand computations: local perception and global sparse
attention heads written out with plain torch ops, LGViT's token sampler as torch's ``AvgPool2d(1, s)``, the
inference copies with folded BatchNorms against PyTorch's eval-mode modules, and LGViT's default placement."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from early_exit_helpers import perturbed_heads, sample_pixels, tokens_after
from torch import nn

import clipforge
from clipforge.compress.early_exit import (
    ExitHeads,
    FoldedLocalPerception,
    GlobalSparseAttention,
    fold_batch_norms,
    subsample_grid,
)


@pytest.fixture(scope="module")
def pixels(tiny) -> torch.Tensor:
    return sample_pixels(tiny)


def batch_norm_by_hand(x: torch.Tensor, norm: nn.BatchNorm2d) -> torch.Tensor:
    shape = (1, -1, 1, 1)
    scaled = (x - norm.running_mean.view(shape)) / torch.sqrt(norm.running_var.view(shape) + norm.eps)
    return scaled * norm.weight.view(shape) + norm.bias.view(shape)


def pool_and_project_by_hand(mixed: torch.Tensor, tokens: torch.Tensor, head: nn.Module) -> torch.Tensor:
    pooled = mixed.mean(1) + tokens[:, 0]
    normed = (pooled - pooled.mean(-1, keepdim=True)) / torch.sqrt(pooled.var(-1, unbiased=False, keepdim=True) + 1e-5)
    return (normed * head.ln.weight + head.ln.bias) @ head.proj


@torch.no_grad()
def test_local_perception_heads_by_hand(tiny, pixels) -> None:
    heads = perturbed_heads(tiny, layers=[0, 1], kinds=["local", "local-pointwise"])
    gelu = nn.GELU()
    for layer in (0, 1):
        head = heads.exits[str(layer)]
        tokens = tokens_after(tiny, pixels[:4], layer)
        patches = tokens[:, 1:]
        grid = int(math.sqrt(patches.shape[1]))
        x = patches.transpose(1, 2).reshape(4, -1, grid, grid)
        conv1, conv2 = head.mixer.conv1[0], head.mixer.conv2[0]
        x = batch_norm_by_hand(gelu(F.conv2d(x, conv1.weight, conv1.bias)), head.mixer.conv1[2])
        if layer == 0:  # the 3×3 depthwise stage of LGViT's conv1_1
            depthwise = head.mixer.depthwise[0]
            x = F.conv2d(x, depthwise.weight, depthwise.bias, padding=1, groups=x.shape[1])
            x = batch_norm_by_hand(gelu(x), head.mixer.depthwise[2])
        x = batch_norm_by_hand(F.conv2d(x, conv2.weight, conv2.bias), head.mixer.conv2[1])
        mixed = x.flatten(2).transpose(1, 2) + patches
        embedding, head_tokens = heads(layer, tokens)
        torch.testing.assert_close(head_tokens, mixed, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(embedding, pool_and_project_by_hand(mixed, tokens, head), atol=1e-5, rtol=1e-5)


def test_local_perception_trains_as_its_convolutions_on_the_grid(tiny, pixels) -> None:
    """In training mode (BatchNorm on batch statistics) the token-layout forward is LGViT's stages run as the
    modules they are, on the NCHW grid: same output, running statistics and gradients."""
    mixer = perturbed_heads(tiny, layers=[0], kinds=["local"]).exits["0"].mixer.train()
    reference = copy.deepcopy(mixer)
    patches = tokens_after(tiny, pixels[:4], 0)[:, 1:].detach()
    ours, theirs = patches.clone().requires_grad_(), patches.clone().requires_grad_()
    grid = int(math.sqrt(patches.shape[1]))
    expected = reference.conv2(reference.depthwise(reference.conv1(theirs.transpose(1, 2).reshape(4, -1, grid, grid))))
    expected = expected.flatten(2).transpose(1, 2) + theirs
    out = mixer(ours)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    expected.square().sum().backward()
    torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-4, rtol=1e-4)
    # float32 sums in another order; a BatchNorm bias before a batch-normalised 1×1 convolution has a zero gradient
    scale = max(twin.grad.abs().max().item() for twin in reference.parameters())
    for (name, parameter), twin in zip(mixer.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(parameter.grad, twin.grad, atol=1e-5 * scale, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    for (name, buffer), twin in zip(mixer.named_buffers(), reference.buffers(), strict=True):
        torch.testing.assert_close(buffer, twin, msg=lambda m: f"{name}: {m}")


@torch.no_grad()
def test_folded_heads_answer_as_the_eval_mode_heads_and_leave_them_untouched(tiny, pixels) -> None:
    """BatchNorms folded into the convolutions (``fold_batch_norms``) against PyTorch's own eval-mode modules, on
    every head kind; the zero-padded depthwise stage makes the folded bias differ at the grid's border."""
    heads = perturbed_heads(tiny, kinds=["local", "local-pointwise", "global-s2"]).train()
    before = {name: tensor.clone() for name, tensor in heads.state_dict().items()}
    folded = fold_batch_norms(heads, tiny.visual.grid_size)
    assert heads.training and all(torch.equal(before[name], t) for name, t in heads.state_dict().items())
    assert not folded.training and not any(parameter.requires_grad for parameter in folded.parameters())
    assert [type(head.mixer) for head in folded.exits.values()] == [FoldedLocalPerception] * 2 + [GlobalSparseAttention]
    bias = folded.exits["0"].mixer.depthwise_bias
    assert not torch.allclose(bias[:, 0, 0], bias[:, 1, 1])  # a corner tap reads padding, an inner one the shift
    heads.eval()
    for layer in heads.layers:
        tokens = tokens_after(tiny, pixels, layer)
        for ours, reference in zip(folded(layer, tokens), heads(layer, tokens), strict=True):
            torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_global_sparse_attention_head_by_hand(tiny, pixels) -> None:
    heads = perturbed_heads(tiny, layers=[2], kinds=["global-s2"])
    head = heads.exits["2"]
    tokens = tokens_after(tiny, pixels[:3], 2)
    grid = tiny.visual.grid_size
    kept = [row * grid + col for row in range(0, grid, 2) for col in range(0, grid, 2)]
    x = tokens[:, 1:][:, kept]
    count, width, num_heads = len(kept), x.shape[-1], tiny.config.vision.heads
    q, k, v = (x @ head.mixer.qkv.weight.T).split(width, dim=-1)
    split = lambda t: t.reshape(3, count, num_heads, width // num_heads).transpose(1, 2)  # noqa: E731
    weights = (split(q) @ split(k).transpose(-1, -2) / math.sqrt(width // num_heads)).softmax(-1)
    attended = (weights @ split(v)).transpose(1, 2).reshape(3, count, width)
    mixed = attended @ head.mixer.proj.weight.T + head.mixer.proj.bias
    embedding, head_tokens = heads(2, tokens)
    torch.testing.assert_close(head_tokens, mixed, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(embedding, pool_and_project_by_hand(mixed, tokens, head), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("grid", "stride"), [(8, 2), (8, 3), (7, 3), (14, 2)])
def test_subsampling_is_lgvits_avgpool_with_kernel_one(grid: int, stride: int) -> None:
    patches = torch.randn(2, grid * grid, 5)
    image = patches.transpose(1, 2).reshape(2, 5, grid, grid)
    reference = nn.AvgPool2d(1, stride)(image).flatten(2).transpose(1, 2)
    assert torch.equal(subsample_grid(patches, stride), reference)


def test_default_placement_and_kinds_are_lgvits_for_twelve_blocks(tiny) -> None:
    config = clipforge.ModelConfig.from_dict(
        {
            "embed_dim": 16,
            "activation": "gelu",
            "vision_cfg": {"image_size": 32, "layers": 12, "width": 32, "patch_size": 8, "head_width": 16},
            "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1},
        },
        name="twelve",
    )
    heads = ExitHeads(clipforge.CLIP(config))
    assert heads.layers == [3, 4, 5, 6, 7, 8, 9, 10]  # LGViT position_exits [4..11], 1-based
    assert heads.kinds == ["local"] * 2 + ["local-pointwise"] * 2 + ["global-s2"] * 2 + ["global-s3"] * 2
    assert ExitHeads(tiny).layers == [0, 1, 2]
