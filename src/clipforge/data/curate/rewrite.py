"""Caption rewrites for multi-caption samples (LaCLIP: Fan et al., "Improving CLIP Training with Language
Rewrites", NeurIPS 2023; LijieFan/LaCLIP). A rewriter maps a batch of captions to a list of rewrites each;
``RewriteTask`` copies a shard with one ``{key}.captions.json`` member added per sample,
``{"original": [caption], "rewrites": {<rewriter name>: [...]}}`` (the multi-caption layout the trainer reads,
``clipforge.data.sources``), written atomically with fixed tar metadata; a finished shard is skipped.

Rewriters:

- ``rules``: meaning-preserving rewrites of the synthetic world's captions (another caption frame, size
  synonyms, relations said from the other object); LaCLIP rewrites with LLaMA in-context learning instead;
- ``python:module:function``: ``function(captions: list[str]) -> list[list[str]]``, imported in the worker;
- ``command:CMD``: a shell command given one caption per line on stdin, printing one JSON list of rewrites
  per line (an LLM behind a script).

A rewriter that fails (raises, exits non-zero, prints something else) stops the job with one line naming the
rewriter, the sample (``<shard>:<key>``) and the error.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from clipforge.data.curate.tarfiles import sample_members, write_tar
from clipforge.data.formats.samples import SampleError
from clipforge.data.formats.shards import ShardIndex, shard_index
from clipforge.data.sources import MULTI_CAPTION_FIELD as CAPTIONS_FIELD
from clipforge.data.synthetic.concepts import RELATION_PHRASES, RELATIONS
from clipforge.errors import ConfigError, InputError, one_line

FRAMES = ("{}", "a photo of {}", "a picture of {}", "an image of {}", "there is {}", "a rendering of {}", "{}, a photo")
_FRAME_PREFIX = re.compile(r"^(a photo of |a picture of |an image of |there is |there are |a photo of [a-z ]+: )")
SYNONYMS = {"small": "little", "large": "big", "little": "small", "big": "large"}


def _said_from_the_other_object() -> dict[str, str]:
    """Each relation phrase of the world → the same phrasing of the reverse relation, longest phrases first so
    "to the left of" is swapped whole ("A to the left of B" → "B to the right of A"), never as "left of"."""
    reverse = {relation: other for relation, sides in RELATIONS.items() for other, own in RELATIONS.items() if own == sides[::-1]}
    swaps = {}
    for relation, phrases in RELATION_PHRASES.items():
        reversed_phrases = RELATION_PHRASES[reverse[relation]]
        for number, phrase in enumerate(phrases):
            swaps[phrase] = reversed_phrases[min(number, len(reversed_phrases) - 1)]
    return dict(sorted(swaps.items(), key=lambda item: -len(item[0])))


OPPOSITE = _said_from_the_other_object()


@dataclass(frozen=True)
class RuleRewriter:
    """``count`` rewrites per caption by rules for the synthetic world, each a pure function of the caption."""

    count: int = 3
    name: str = "rules"

    def _one(self, caption: str, number: int) -> str:
        draw = hashlib.blake2b(f"{number}:{caption}".encode(), digest_size=8).digest()
        core = _FRAME_PREFIX.sub("", caption)
        words = [SYNONYMS.get(word, word) if draw[0] % 2 else word for word in core.split(" ")]
        core = " ".join(words)
        for phrase, opposite in OPPOSITE.items():
            parts = core.split(f" {phrase} ")
            if len(parts) == 2 and draw[1] % 2 and parts[0].startswith("a ") and parts[1].startswith("a "):
                core = f"{parts[1]} {opposite} {parts[0]}"
                break
        return FRAMES[draw[2] % len(FRAMES)].format(core)

    def __call__(self, captions: list[str]) -> list[list[str]]:
        rewrites = [dict.fromkeys(self._one(caption, number) for number in range(self.count)) for caption in captions]
        return [[text for text in texts if text != caption] for texts, caption in zip(rewrites, captions)]


@dataclass(frozen=True)
class PythonRewriter:
    """A user's ``module:function`` (imported where the task runs)."""

    target: str
    name: str = "python"

    def __call__(self, captions: list[str]) -> list[list[str]]:
        module, _, function = self.target.partition(":")
        try:
            rewrite = getattr(importlib.import_module(module), function)
        except (ImportError, AttributeError, ValueError) as error:
            raise ConfigError(f"--rewriter python:{self.target}: cannot import ({one_line(error)})") from None
        try:
            rewrites = rewrite(captions)
        except Exception as error:  # the user's code: any failure is theirs to fix, reported as one line
            raise InputError(f"--rewriter python:{self.target}: raised {type(error).__name__}: {one_line(error)}") from None
        return _checked(rewrites, len(captions), f"python:{self.target}")


@dataclass(frozen=True)
class CommandRewriter:
    """A shell command: captions one per line on stdin, one JSON list of rewrites per line on stdout."""

    command: str
    name: str = "command"

    def __call__(self, captions: list[str]) -> list[list[str]]:
        text = "".join(caption.replace("\n", " ") + "\n" for caption in captions)
        result = subprocess.run(self.command, shell=True, input=text, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            stderr = one_line(result.stderr) if result.stderr.strip() else "nothing on stderr"
            raise InputError(f"--rewriter command:{self.command}: exit status {result.returncode} ({stderr})")
        try:
            rewrites = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
        except ValueError as error:
            raise InputError(f"--rewriter command:{self.command}: output is not one JSON list per line ({error})") from None
        return _checked(rewrites, len(captions), f"command:{self.command}")


def _checked(rewrites: object, count: int, name: str) -> list[list[str]]:
    if not isinstance(rewrites, list) or len(rewrites) != count or not all(
        isinstance(item, list) and all(isinstance(text, str) for text in item) for item in rewrites
    ):
        raise InputError(f"--rewriter {name}: must return one list of strings per caption ({count} captions)")
    return [[text.strip() for text in item if text.strip()] for item in rewrites]


def parse_rewriter(spec: str, count: int = 3) -> Callable[[list[str]], list[list[str]]]:
    """``rules`` | ``python:module:function`` | ``command:CMD``."""
    if spec == "rules":
        return RuleRewriter(count)
    kind, _, target = spec.partition(":")
    if kind == "python" and ":" in target:
        return PythonRewriter(target)
    if kind == "command" and target.strip():
        return CommandRewriter(target)
    raise ConfigError(f"--rewriter {spec!r}: expected rules, python:module:function or command:CMD")


@dataclass(frozen=True)
class RewriteTask:
    """Shard ``shard`` copied to ``out/{position:05d}.tar`` with a ``captions.json`` member per captioned sample."""

    shard: str
    position: int
    out: str
    rewriter: Callable[[list[str]], list[list[str]]]

    @property
    def output(self) -> Path:
        return Path(self.out) / f"{self.position:05d}.tar"

    def __call__(self) -> int:
        if self.output.exists():
            return 0
        index = shard_index(Path(self.shard))
        captions: dict[int, str] = {}
        for row in range(len(index)):
            try:
                captions[row] = index.caption(row)
            except SampleError:
                continue  # copied as it is; the curation scan counts it
        rewrites = dict(zip(captions, self._rewrites(index, captions)))
        name = getattr(self.rewriter, "name", "rewrites")

        def samples():
            for row, key in enumerate(index.keys):
                members = [(field, data) for field, data in sample_members(index, row) if field != CAPTIONS_FIELD]
                if row in captions:
                    record = {"original": [captions[row]], "rewrites": {name: rewrites[row]}}
                    members.append((CAPTIONS_FIELD, json.dumps(record, ensure_ascii=False).encode()))
                yield key, members

        return write_tar(self.output, samples())

    def _rewrites(self, index: ShardIndex, captions: dict[int, str]) -> list[list[str]]:
        """The rewrites of the shard's captions, rewritten together. When the rewriter fails (``InputError``), the
        captions are retried one at a time up to the first that fails alone, and the error names that sample
        (``<shard>:<key>``), or the shard when each caption alone passes."""
        try:
            return self.rewriter(list(captions.values()))
        except InputError as error:
            failure = f"{self.shard}: {error} (on its {len(captions)} captions together; each alone passes)"
        for row, caption in captions.items():
            try:
                self.rewriter([caption])
            except InputError as error:
                failure = f"{index.label(row)}: {error}"
                break
        raise InputError(failure)
