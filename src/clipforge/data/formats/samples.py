"""What a bad sample is, and the one caption decoder every reader uses.

A bad sample raises ``SampleError`` (an ``InputError``) whose message is one line,
``"<key>: <reason> (<detail>)"``; ``reason`` is one of the fixed phrases below so that skips can be
counted by reason (``clipforge.data.loader``). Text fields add ``missing <field>``, ``<field> is not
UTF-8`` and ``empty <field>`` (``missing caption``, ...).

``decode_caption`` is how clipforge reads a caption wherever it comes from (a ``.txt`` sidecar, a
shard's ``.txt`` member, a table cell): bytes are UTF-8 with an optional byte-order mark (Python's
``utf-8-sig``, what editors on Windows write), the text is stripped, and a missing or blank caption is
an error. ``decode_text`` applies the same rules to other text fields (a shard's ``.cls`` class name).
"""

from __future__ import annotations

from clipforge.errors import InputError

UNREADABLE_IMAGE = "unreadable image"
MISSING_IMAGE = "missing image"
UNREADABLE_CAPTION = "unreadable caption file"
EMPTY_SHARD = "empty shard"
TRUNCATED_SHARD = "truncated shard"


class SampleError(InputError):
    """One bad sample: ``key`` names it, ``reason`` is a fixed phrase to count by, ``detail`` says more."""

    def __init__(self, key: str, reason: str, detail: str = "") -> None:
        super().__init__(f"{key}: {reason}" + (f" ({detail})" if detail else ""))
        self.key, self.reason, self.detail = key, reason, detail


def decode_text(raw: bytes | str | None, key: str, what: str, missing: str = "") -> str:
    """The text of field ``what`` of sample ``key``, stripped; ``SampleError`` when it is missing
    (``missing`` says where it was looked for), not UTF-8 or blank."""
    if raw is None:
        raise SampleError(key, f"missing {what}", missing)
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            raise SampleError(key, f"{what} is not UTF-8", f"invalid byte at position {error.start}") from error
    text = raw.strip()
    if not text:
        raise SampleError(key, f"empty {what}")
    return text


def decode_caption(raw: bytes | str | None, key: str, missing: str = "") -> str:
    """The caption of sample ``key`` by the ``decode_text`` rules."""
    return decode_text(raw, key, "caption", missing)
