"""The CLIP BPE tokenizer gives exactly open_clip's ids and decodings on generated, messy captions."""

from __future__ import annotations

import html
import pickle
import random

import ftfy
import numpy as np
import open_clip
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clipforge.errors import ConfigError, InputError
from clipforge.preprocess.tokenizer import Tokenizer, get_tokenizer

NUM_GENERATED = 6000
CONTEXT_LENGTHS = (16, 32, 77)

WORDS = (
    "a an the of on in under with and photo picture sketch painting rendering close-up dog cat bird car "
    "tree house man woman child red blue green small large left right two three sitting running playing "
    "beach city street sky ball park night snow bright dark old new tiny huge cartoon origami tattoo"
).split()
SCRIPT_RANGES = (
    (0xC0, 0xFF), (0x100, 0x17F), (0x391, 0x3C9), (0x410, 0x44F), (0x531, 0x556), (0x5D0, 0x5EA),
    (0x627, 0x64A), (0x905, 0x94C), (0xB85, 0xBB9), (0xE01, 0xE2E), (0x10D0, 0x10F0), (0x1200, 0x1250),
    (0x3041, 0x3096), (0x30A1, 0x30FA), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0xFF21, 0xFF5A),
    (0x1D400, 0x1D4FF), (0x300, 0x36F),
)
EMOJI = ("😀", "👍🏽", "👨‍👩‍👧", "🇫🇷", "❤️", "🐶", "✔", "☃", "🤖", "🍕🍕🍕")
ENTITIES = (
    "&amp;", "&#39;", "&lt;", "&gt;", "&quot;", "&nbsp;", "&#x2019;", "&hellip;", "&amp;amp;", "&amp;#39;",
    "&EACUTE;", "&eacute;", "&copy", "&", "&#128512;", "&#xZZ;", "&lt;b&gt;", "<b>", "</w>", "&amp;lt;",
)
SEPARATORS = (
    " ", " ", " ", "  ", "\t", "\n", "\r\n", "\r", "\xa0", "\u2003", "\u3000", "\u2028", "\x0b", "\x0c",
    "\x85", "\u200b", "",
)
NUMBERS = ("3.14", "1,000,000", "٣٤٥", "²", "½", "Ⅻ", "१२", "0", "007", "1e-9")
CONTRACTIONS = ("it's", "don't", "they're", "we've", "I'm", "you'll", "he'd", "O'Neil", "'s", "’s", "DON'T")
SPECIALS = ("<start_of_text>", "<end_of_text>", "<START_OF_TEXT>", "<ſtart_of_text>", "<|endoftext|>")
CONTROLS = (
    "\x00", "\x1b[31m", "\x1b[0m", "\x7f", "\x08", "\ufeff", "\u200d", "\ud83d", "\ud83d\ude00", "\x9d",
)
FIXABLE_MOJIBAKE = (
    "cafÃ©", "âœ” No problems", "Ã¼ber", "ÃƒÂ©", "â€œquotedâ€\x9d", "&macr;\\_(ã\x83\x84)_/&macr;",
)
FANCY = ("ﬁne", "ﬂubberiﬁc", "ＬＯＵＤ", "“curly”", "‘single’", "—", "…", "ß", "İstanbul", "ǅ", "Å", "Å")
PUNCTUATION = "!?.,;:-_'\"()[]{}<>/\\|@#$%^*+=~`"


def _word(rng: random.Random) -> str:
    return rng.choice((str.lower, str.upper, str.title))(rng.choice(WORDS))


def _script_word(rng: random.Random) -> str:
    low, high = rng.choice(SCRIPT_RANGES)
    return "".join(chr(rng.randint(low, high)) for _ in range(rng.randint(1, 9)))


def _generated_mojibake(rng: random.Random) -> str:
    text = rng.choice((_script_word(rng), rng.choice(EMOJI), rng.choice(FANCY), "naïve café"))
    return text.encode("utf-8").decode(rng.choice(("latin-1", "cp1252")), errors="ignore")


PIECES = (
    _word, _word, _word, _word, _script_word, _generated_mojibake,
    lambda rng: rng.choice(EMOJI),
    lambda rng: rng.choice(ENTITIES),
    lambda rng: rng.choice(NUMBERS),
    lambda rng: str(rng.randint(0, 10 ** rng.randint(1, 12))),
    lambda rng: "".join(rng.choice(PUNCTUATION) for _ in range(rng.randint(1, 8))),
    lambda rng: rng.choice(CONTRACTIONS),
    lambda rng: rng.choice(SPECIALS),
    lambda rng: rng.choice(CONTROLS),
    lambda rng: rng.choice(FIXABLE_MOJIBAKE),
    lambda rng: rng.choice(FANCY),
    lambda rng: rng.choice(PUNCTUATION),
)


def random_caption(rng: random.Random) -> str:
    """A caption of 0 to 90 pieces (words, scripts, emoji, entities, junk) with odd separators."""
    num_pieces = rng.choice((0, 1, 2, 4, 6, 8, 10, 12, 16, 25, 40, 90))
    text = ""
    for _ in range(num_pieces):
        text += rng.choice(PIECES)(rng) + rng.choice(SEPARATORS)
    return text if rng.random() < 0.8 else rng.choice(SEPARATORS) + text


@pytest.fixture(scope="module")
def reference() -> open_clip.tokenizer.SimpleTokenizer:
    return open_clip.get_tokenizer("ViT-B-32")


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return get_tokenizer()


@pytest.fixture(scope="module")
def captions() -> list[str]:
    rng = random.Random(20260428)
    generated = [random_caption(rng) for _ in range(NUM_GENERATED)]
    generated.append("a" * 1000)
    generated.append("".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(300)))
    return generated


@pytest.fixture(scope="module")
def reference_ids(captions: list[str], reference) -> list[list[int]]:
    return [reference.encode(text) for text in captions]


def test_generated_captions_cover_what_they_claim(captions: list[str], reference_ids: list[list[int]]) -> None:
    fixed_by_ftfy = sum(ftfy.fix_text(text) != text for text in captions)
    assert fixed_by_ftfy > 500
    assert sum(text == "" for text in captions) > 100
    assert sum(len(ids) > 77 for ids in reference_ids) > 300
    assert len({text for text in captions if text.isascii() and "&" not in text}) > 100


def test_encode_matches_open_clip(captions: list[str], reference_ids: list[list[int]], tokenizer: Tokenizer) -> None:
    for text, expected in zip(captions, reference_ids, strict=True):
        assert tokenizer.encode(text) == expected, repr(text)


@pytest.mark.parametrize(("context_length", "stride"), [(77, 1), (32, 3), (16, 3)])
def test_batch_ids_match_open_clip(
    captions: list[str], tokenizer: Tokenizer, reference, context_length: int, stride: int
) -> None:
    """All captions at 77; every third one at the shorter lengths, to keep the suite fast."""
    texts = captions[::stride]
    ours = tokenizer(texts, context_length=context_length)
    expected = reference(texts, context_length=context_length)
    assert ours.dtype == torch.long and ours.shape == (len(texts), context_length)
    assert torch.equal(ours, expected)


def test_default_and_per_call_context_length(reference) -> None:
    text = "a photo of " + "very " * 40 + "big dog"
    short = Tokenizer(context_length=16)
    assert torch.equal(short(text), reference(text, context_length=16))
    assert torch.equal(short(text, context_length=77), reference(text, context_length=77))
    assert torch.equal(get_tokenizer(32)([text, "x"]), reference([text, "x"], context_length=32))


def test_truncation_keeps_start_and_forces_end_token(tokenizer: Tokenizer) -> None:
    text = " ".join(["dog"] * 100)
    row = tokenizer(text, context_length=16)[0].tolist()
    dog = tokenizer.encode("dog")
    assert len(dog) == 1
    assert row == [49406] + dog * 14 + [49407]


def test_empty_caption_and_empty_batch(tokenizer: Tokenizer, reference) -> None:
    assert tokenizer("")[0].tolist() == [49406, 49407] + [0] * 75
    assert torch.equal(tokenizer(["", " \t\n"]), reference(["", " \t\n"]))
    assert tokenizer([]).shape == (0, 77)
    assert tokenizer.encode("") == []


def test_attributes_match_open_clip(tokenizer: Tokenizer, reference) -> None:
    assert (tokenizer.sot_token_id, tokenizer.eot_token_id, tokenizer.vocab_size) == (49406, 49407, 49408)
    assert tokenizer.vocab_size == reference.vocab_size
    assert (tokenizer.sot_token_id, tokenizer.eot_token_id) == (reference.sot_token_id, reference.eot_token_id)
    assert tokenizer.context_length == 77


def test_every_token_decodes_like_open_clip(tokenizer: Tokenizer, reference) -> None:
    for token_id in range(reference.vocab_size):
        assert tokenizer.decode([token_id]) == reference.decode([token_id]), token_id


def test_decode_round_trip_matches_open_clip(captions: list[str], tokenizer: Tokenizer, reference) -> None:
    for text in captions[:2000]:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == reference.decode(ids), repr(text)
    rows = tokenizer(captions[:200])
    for row in rows:
        assert tokenizer.decode(row) == reference.decode(row.tolist())


def test_decode_random_ids_with_broken_utf8_like_open_clip(tokenizer: Tokenizer, reference) -> None:
    rng = random.Random(7)
    for _ in range(500):
        ids = [rng.randrange(reference.vocab_size) for _ in range(rng.randint(0, 30))]
        assert tokenizer.decode(ids) == reference.decode(ids)
    assert tokenizer.decode(np.array([320, 1929, 49407])) == reference.decode([320, 1929, 49407])


@settings(max_examples=300, deadline=None)
@given(
    texts=st.lists(st.text(alphabet=st.characters(exclude_categories=()), max_size=120), min_size=1, max_size=4),
    context_length=st.sampled_from(CONTEXT_LENGTHS),
)
def test_any_unicode_matches_open_clip(texts: list[str], context_length: int) -> None:
    expected = open_clip.tokenize(texts, context_length=context_length)
    assert torch.equal(get_tokenizer()(texts, context_length=context_length), expected)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from([chr(c) for c in range(0x20, 0x7F) if chr(c) != "&"] + ["\t", "\n"])))
def test_ftfy_and_html_leave_plain_ascii_unchanged(text: str) -> None:
    """The cleaning fast path (skip ftfy/html for this alphabet) relies on exactly this."""
    assert ftfy.fix_text(text) == text
    assert html.unescape(text) == text


def test_inputs_other_than_str_name_the_bad_item(tokenizer: Tokenizer) -> None:
    with pytest.raises(InputError, match=r"texts\[2\].*NoneType"):
        tokenizer(["a dog", "a cat", None])
    with pytest.raises(InputError, match=r"texts\[1\].*bytes"):
        tokenizer(["a dog", b"a cat"])
    with pytest.raises(InputError, match="bytes"):
        tokenizer(b"a dog")
    with pytest.raises(InputError, match="NoneType"):
        tokenizer(None)
    with pytest.raises(InputError, match="int"):
        tokenizer.encode(3)


def test_bad_ids_and_context_lengths_are_rejected(tokenizer: Tokenizer) -> None:
    with pytest.raises(InputError, match="position 1"):
        tokenizer.decode([320, 49408])
    with pytest.raises(InputError, match="position 0"):
        tokenizer.decode([-1])
    for bad_length in (0, 1, 2.5, True):
        with pytest.raises(ConfigError, match="context_length"):
            tokenizer("a dog", context_length=bad_length)
    with pytest.raises(ConfigError, match="context_length"):
        Tokenizer(context_length=1)


def test_sequences_of_str_and_pickling(tokenizer: Tokenizer, reference) -> None:
    texts = ("a dog", "two cats")
    expected = reference(list(texts))
    assert torch.equal(tokenizer(texts), expected)
    assert torch.equal(tokenizer(np.array(texts)), expected)
    restored = pickle.loads(pickle.dumps(Tokenizer(context_length=32)))
    assert restored.context_length == 32
    assert torch.equal(restored(list(texts)), reference(list(texts), context_length=32))


def test_get_tokenizer_is_shared() -> None:
    assert get_tokenizer() is get_tokenizer()
    assert get_tokenizer(16).context_length == 16
