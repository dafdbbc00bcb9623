"""The prompt hook of both towers (``clipforge.layers.prompts``): off or identity, outputs are unchanged; on,
the towers compute what the blocks run by hand compute with the tokens replaced."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

import clipforge
from clipforge.layers.prompts import PromptTokens

MICRO = str(Path(__file__).parent / "data" / "micro-clip.json")


class Deep(PromptTokens):
    """Appends two tokens to the image sequence and replaces them before block 1 (MaPLe's layout)."""

    appended = 2

    def __init__(self, width: int) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.first, self.second = torch.randn(2, width), torch.randn(2, width)

    def embed(self, x):
        return torch.cat([x, self.first.expand(len(x), -1, -1)], dim=1)

    def before_block(self, layer, x):
        if layer != 1:
            return x
        return torch.cat([x[:, :-2], self.second.expand(len(x), -1, -1)], dim=1)


def test_identity_prompts_change_nothing() -> None:
    torch.manual_seed(0)
    model = clipforge.load(MICRO)
    pixels, tokens = torch.randn(3, 3, 32, 32), model.tokenize(["a red box", "two blue circles"])
    with torch.no_grad():
        image, text, _ = model(pixels, tokens)
        model.visual.prompts, model.text_prompts = PromptTokens(), PromptTokens()
        image_hooked, text_hooked, _ = model(pixels, tokens)
    assert torch.equal(image, image_hooked) and torch.equal(text, text_hooked)


def test_image_prompts_are_the_tokens_replaced_by_hand() -> None:
    torch.manual_seed(0)
    model = clipforge.load(MICRO).visual
    pixels = torch.randn(2, 3, 32, 32)
    hook = Deep(model.cfg.width)
    with torch.no_grad():
        x = model.conv1(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([model.class_embedding.expand(2, 1, -1), x], dim=1) + model.positional_embedding
        x = model.ln_pre(torch.cat([x, hook.first.expand(2, -1, -1)], dim=1))
        x, _ = model.transformer.resblocks[0](x)
        x, _ = model.transformer.resblocks[1](torch.cat([x[:, :-2], hook.second.expand(2, -1, -1)], dim=1))
        expected = model.ln_post(x)[:, 0] @ model.proj
        model.prompts = hook
        torch.testing.assert_close(model(pixels), expected, rtol=1e-5, atol=1e-5)


def test_text_prompts_take_the_place_of_word_embeddings() -> None:
    torch.manual_seed(0)
    model = clipforge.load(MICRO)
    tokens = model.tokenize(["x x a red box"])
    context = torch.randn(2, model.text_cfg.width)

    class Context(PromptTokens):
        def embed(self, x):
            return torch.cat([x[:, :1], context.expand(len(x), -1, -1), x[:, 3:]], dim=1)

    with torch.no_grad():
        embedded = model.token_embedding(tokens)
        embedded = torch.cat([embedded[:, :1], context[None], embedded[:, 3:]], dim=1) + model.positional_embedding
        x, _ = model.transformer(embedded, is_causal=True)
        expected = F.normalize(model.ln_final(x[0, tokens[0].argmax()]) @ model.text_projection, dim=-1)
        model.text_prompts = Context()
        torch.testing.assert_close(model(None, tokens)[1][0], expected, rtol=1e-5, atol=1e-5)
