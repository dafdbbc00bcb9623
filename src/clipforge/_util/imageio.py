"""Safe image loading: every unreadable input becomes one ``InputError`` line that names the file.

``open_image`` decodes the whole image up front (``Image.load()``), so a truncated or corrupt file
fails here, with its name, rather than later inside a data-loader worker. It refuses images with more
than ``max_pixels`` pixels before allocating them (decompression-bomb guard) and never lets PIL's
``DecompressionBombWarning``/``DecompressionBombError`` escape.

EXIF orientation: open_clip does not apply it (its transforms receive whatever ``Image.open`` gives,
so a phone photo stored sideways is embedded sideways). ``exif_transpose=False`` keeps that parity;
pass ``True`` to rotate/flip the pixels upright as the EXIF ``Orientation`` tag says.
"""

from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from clipforge.errors import InputError, one_line

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# What PIL's decoders raise on damaged data (found by fuzzing truncated and byte-flipped JPEG, PNG,
# WebP, BMP, GIF and TIFF files: OSError covers "image file is truncated" and UnidentifiedImageError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)


def is_image_path(path: str | Path) -> bool:
    """True when the file name ends with one of ``IMAGE_EXTENSIONS`` (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def open_image(
    source: str | Path | bytes,
    name: str | None = None,
    max_pixels: int = 178_956_970,
    exif_transpose: bool = False,
) -> Image.Image:
    """Decode a file path or encoded bytes into a fully loaded PIL image, in its stored mode.

    ``name`` labels the image in error messages (default: the path, or ``<image bytes>``).
    ``max_pixels`` defaults to PIL's own hard limit (2 × ``Image.MAX_IMAGE_PIXELS``); PIL still
    refuses anything above that limit, so raise ``PIL.Image.MAX_IMAGE_PIXELS`` too to go higher.
    """
    is_bytes = isinstance(source, (bytes, bytearray))
    label = name or ("<image bytes>" if is_bytes else str(source))
    data = bytes(source) if is_bytes else _read_file(Path(source), label)
    if not data:
        raise InputError(f"{label}: empty file (0 bytes), not an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            _check_pixel_count(image, label, max_pixels)
            image.load()
            if exif_transpose:
                image = ImageOps.exif_transpose(image)
    except Image.DecompressionBombError as exc:
        raise InputError(f"{label}: refused as a possible decompression bomb ({one_line(exc)})") from exc
    except UnidentifiedImageError as exc:
        raise InputError(f"{label}: not a readable image (unknown format, or zero width or height)") from exc
    except _DECODE_ERRORS as exc:
        raise InputError(f"{label}: truncated or corrupt image data ({one_line(exc)})") from exc
    if image.width == 0 or image.height == 0:
        raise InputError(f"{label}: image has zero size ({image.width}x{image.height})")
    return image


def _read_file(path: Path, label: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise InputError(f"{label}: no such file") from exc
    except IsADirectoryError as exc:
        raise InputError(f"{label}: is a directory, not an image file") from exc
    except OSError as exc:
        raise InputError(f"{label}: cannot read file ({exc.strerror or one_line(exc)})") from exc


def _check_pixel_count(image: Image.Image, label: str, max_pixels: int) -> None:
    """Reject before decoding: the size is known from the header, the pixels are not allocated yet."""
    pixels = image.width * image.height
    if pixels > max_pixels:
        raise InputError(
            f"{label}: {image.width}x{image.height} = {pixels} pixels is more than max_pixels={max_pixels} "
            "(possible decompression bomb)"
        )
