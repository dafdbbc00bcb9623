"""THE image reader: a PIL image, an image file, encoded bytes or a shard member, decoded one way.

Decoding is ``clipforge._util.imageio.open_image``: the whole image is loaded up front, decompression
bombs are refused, and every failure is one ``InputError`` line naming the file (or the shard member,
``<shard>:<key>``). The image keeps its stored mode; ``read_rgb_image`` converts, for the callers that
work on pixels themselves (``model.preprocess`` converts on its own, as open_clip's transforms do).
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from clipforge._util.imageio import open_image
from clipforge.data.formats.shards import ShardMember

ImageSource = Image.Image | str | Path | bytes | ShardMember


def read_image(source: ImageSource, name: str | None = None) -> Image.Image:
    """``source`` decoded (a PIL image is returned as it is); ``name`` labels it in error messages
    (default: the path, the shard member's ``<shard>:<key>``, or ``<image bytes>``)."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, ShardMember):
        return open_image(source.read(), name=name or source.label)
    return open_image(source, name=name)


def read_rgb_image(source: ImageSource) -> Image.Image:
    """``read_image(source)`` in RGB."""
    return read_image(source).convert("RGB")
