"""CLIP's byte-level BPE tokenizer; ids identical to open_clip's ``SimpleTokenizer`` (``clean='lower'``).

The algorithm is OpenAI CLIP's (Radford et al. 2021, "Learning Transferable Visual Models From
Natural Language Supervision"; github.com/openai/CLIP ``clip/simple_tokenizer.py``) as kept by
open_clip (``src/open_clip/tokenizer.py``): byte-pair encoding (Sennrich et al. 2016) over GPT-2's
reversible byte-to-character alphabet (Radford et al. 2019), with ``</w>`` marking the end of a word
and the 48,894 merges of ``bpe_simple_vocab_16e6.txt.gz`` (MIT License, Copyright (c) 2021 OpenAI).

A caption is cleaned (``ftfy.fix_text``, ``html.unescape`` twice, whitespace collapsed, lowercased),
split into words by CLIP's regular expression, each word is merged greedily by merge rank, and
``[sot] + ids + [eot]`` is truncated to the context length (the last kept token forced to EOT, as
open_clip does) and padded with 0. As in open_clip, the literal words ``<start_of_text>`` and
``<end_of_text>`` in a caption map to the special ids.
"""

from __future__ import annotations

import functools
import gzip
import html
import re
from collections.abc import Iterable, Sequence
from numbers import Integral
from pathlib import Path

import ftfy
import regex
import torch

from clipforge.errors import ConfigError, InputError

VOCAB_FILE = Path(__file__).parent.parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # open_clip reads lines [1, 49152 - 256 - 2 + 1) of the merges file
SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")
DEFAULT_CONTEXT_LENGTH = 77
WORD_CACHE_SIZE = 1 << 17

WORD_PATTERN = regex.compile(
    "|".join(SPECIAL_TOKENS) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
# Text made only of printable ASCII except '&', tabs and '\n' has no mojibake, HTML entity, control
# character or line break for ftfy.fix_text / html.unescape to change; cleaning skips them for it.
_MAY_NEED_FIXING = re.compile(r"[^\t\n\x20-\x25\x27-\x7e]")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters.

    Printable Latin-1 bytes map to themselves; the others (whitespace, controls) to U+0100 onwards,
    so a BPE symbol never contains whitespace. Insertion order is the order of the base vocabulary.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    byte_chars = {byte: chr(byte) for byte in printable}
    unprintable = [byte for byte in range(256) if byte not in byte_chars]
    byte_chars.update({byte: chr(256 + offset) for offset, byte in enumerate(unprintable)})
    return byte_chars


def clean_text(text: str) -> str:
    """open_clip's ``clean='lower'``: ftfy.fix_text, html.unescape twice, whitespace collapsed, lowercase."""
    if _MAY_NEED_FIXING.search(text) is not None:
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


class _BytePairEncoder:
    """The vocabulary and merge ranks of a merges file, with a bounded cache of word -> ids."""

    def __init__(self, merges_file: Path) -> None:
        lines = gzip.decompress(merges_file.read_bytes()).decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
        self.byte_chars = bytes_to_unicode()
        base = list(self.byte_chars.values())
        tokens = base + [char + "</w>" for char in base] + ["".join(merge) for merge in merges] + list(SPECIAL_TOKENS)
        self.token_ids = {token: index for index, token in enumerate(tokens)}
        self.merge_ranks = {merge: rank for rank, merge in enumerate(merges)}
        self.special_ids = {token: self.token_ids[token] for token in SPECIAL_TOKENS}
        char_bytes = {char: byte for byte, char in self.byte_chars.items()}
        self.token_bytes = tuple(bytes(char_bytes[char] for char in token) for token in tokens)
        self.word_ids = functools.lru_cache(maxsize=WORD_CACHE_SIZE)(self._merge_word)

    def _merge_word(self, word: str) -> tuple[int, ...]:
        """Repeatedly merge every occurrence of the lowest-ranked adjacent pair, left to right."""
        if word in self.special_ids:
            return (self.special_ids[word],)
        symbols = [self.byte_chars[byte] for byte in word.encode("utf-8")]
        symbols[-1] += "</w>"
        unmergeable = len(self.merge_ranks)
        while len(symbols) > 1:
            pair_ranks = [self.merge_ranks.get(pair, unmergeable) for pair in zip(symbols, symbols[1:])]
            best_rank = min(pair_ranks)
            if best_rank == unmergeable:
                break
            position = pair_ranks.index(best_rank)
            first, second = symbols[position], symbols[position + 1]
            merged: list[str] = []
            index = 0
            while index < len(symbols):
                if index + 1 < len(symbols) and symbols[index] == first and symbols[index + 1] == second:
                    merged.append(first + second)
                    index += 2
                else:
                    merged.append(symbols[index])
                    index += 1
            symbols = merged
        return tuple(self.token_ids[symbol] for symbol in symbols)


@functools.lru_cache(maxsize=1)
def _byte_pair_encoder() -> _BytePairEncoder:
    return _BytePairEncoder(VOCAB_FILE)


def _checked_context_length(context_length: int) -> int:
    if not isinstance(context_length, Integral) or isinstance(context_length, bool) or context_length < 2:
        raise ConfigError(f"context_length must be an int >= 2 (room for start and end tokens), got {context_length!r}")
    return int(context_length)


def _as_captions(texts: str | Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Iterable):
        raise InputError(f"texts must be a str or a sequence of str, got {type(texts).__name__}")
    captions = list(texts)
    for index, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise InputError(f"texts[{index}] must be a str, got {type(caption).__name__}")
    return captions


class Tokenizer:
    """CLIP BPE tokenizer: ``tokenizer(texts)`` -> LongTensor [N, context_length], like open_clip's."""

    def __init__(self, context_length: int = DEFAULT_CONTEXT_LENGTH) -> None:
        self.context_length = _checked_context_length(context_length)
        self._encoder = _byte_pair_encoder()
        self.vocab_size = len(self._encoder.token_ids)
        self.sot_token_id = self._encoder.special_ids["<start_of_text>"]
        self.eot_token_id = self._encoder.special_ids["<end_of_text>"]

    def __reduce__(self) -> tuple[type[Tokenizer], tuple[int]]:
        """Pickle (e.g. into data-loader workers) as its context length; the vocabulary reloads there."""
        return (Tokenizer, (self.context_length,))

    def _encode_clean(self, text: str) -> list[int]:
        word_ids = self._encoder.word_ids
        ids: list[int] = []
        for word in WORD_PATTERN.findall(clean_text(text)):
            ids.extend(word_ids(word))
        return ids

    def encode(self, text: str) -> list[int]:
        """BPE ids of one caption, without start/end tokens and without truncation."""
        if not isinstance(text, str):
            raise InputError(f"text must be a str, got {type(text).__name__}")
        return self._encode_clean(text)

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Text of token ids exactly as open_clip decodes them (``</w>`` -> space, bad UTF-8 -> U+FFFD)."""
        token_ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        for position, token_id in enumerate(token_ids):
            if not isinstance(token_id, Integral) or not 0 <= token_id < self.vocab_size:
                raise InputError(
                    f"token id at position {position} is {token_id!r}; expected an int in [0, {self.vocab_size})"
                )
        token_bytes = self._encoder.token_bytes
        text = b"".join(token_bytes[token_id] for token_id in token_ids).decode("utf-8", errors="replace")
        return text.replace("</w>", " ")

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """``[sot] + ids + [eot]`` per caption, truncated (last token EOT) and 0-padded to context_length."""
        length = self.context_length if context_length is None else _checked_context_length(context_length)
        captions = _as_captions(texts)
        flat_ids: list[int] = []
        lengths: list[int] = []
        for caption in captions:
            ids = self._encode_clean(caption)[: length - 2]
            flat_ids.append(self.sot_token_id)
            flat_ids.extend(ids)
            flat_ids.append(self.eot_token_id)
            lengths.append(len(ids) + 2)
        tokens = torch.zeros(len(captions), length, dtype=torch.long)
        filled = torch.arange(length) < torch.tensor(lengths, dtype=torch.long).unsqueeze(1)
        tokens[filled] = torch.tensor(flat_ids, dtype=torch.long)
        return tokens


@functools.lru_cache(maxsize=None)
def get_tokenizer(context_length: int = DEFAULT_CONTEXT_LENGTH) -> Tokenizer:
    """The shared tokenizer for a context length; the merges file is parsed once per process."""
    return Tokenizer(context_length)
