"""THE folder reader: image files under a folder, their sidecar captions, and class-per-folder layouts.

- Image files are found recursively (``IMAGE_EXTENSIONS``, case-insensitive) and sorted by path.
- A caption is the ``.txt`` file with the image's path minus its extension (``a/b.x.jpg`` →
  ``a/b.x.txt``), decoded by ``decode_caption``. Pairing by path-without-extension avoids
  clip-retrieval's ``files`` reader bug, where keys with extensions never pair (rom1504/clip-retrieval ``clip_retrieval/clip_inference/reader.py``).
- Class-per-folder follows torchvision's ``ImageFolder``: ``root/<class>/**/<image>``, one class per
  (non-hidden) sub-folder in sorted order.
"""

from __future__ import annotations

import os
from pathlib import Path

from clipforge._util.imageio import IMAGE_EXTENSIONS, is_image_path
from clipforge.data.formats.samples import (
    UNREADABLE_CAPTION,
    SampleError,
    decode_caption,
)
from clipforge.errors import InputError, one_line

Problems = list[tuple[str, str]]
"""(folder, one-line reason) of sub-folders a walk could not read."""


def image_files(folder: Path, unreadable: Problems | None = None) -> list[Path]:
    """The image files under ``folder``, recursively, sorted by path.

    A sub-folder that cannot be listed (no permission, removed meanwhile) is appended to ``unreadable`` as
    ``(folder, reason)`` when that list is given, so the caller can count and report it as it does unreadable
    files; without it, the first one is an ``InputError`` naming it. It is never skipped silently.
    """
    problems: Problems = []

    def note(error: OSError) -> None:
        problems.append((str(error.filename), f"{error.filename}: cannot read folder ({error.strerror or one_line(error)})"))

    found = [
        Path(directory) / name
        for directory, _, names in os.walk(folder, onerror=note)
        for name in names
        if is_image_path(name) and (Path(directory) / name).is_file()
    ]
    if problems and unreadable is None:
        raise InputError(problems[0][1])
    if unreadable is not None:
        unreadable.extend(problems)
    return sorted(found)


def sidecar_caption(image: Path, key: str) -> str:
    """The caption of ``image`` from the ``.txt`` file beside it; ``SampleError`` naming ``key`` when it is
    missing, unreadable, not UTF-8 or blank."""
    caption_path = image.with_suffix(".txt")
    try:
        raw = caption_path.read_bytes()
    except FileNotFoundError:
        raw = None
    except OSError as error:
        raise SampleError(key, UNREADABLE_CAPTION, one_line(error)) from error
    return decode_caption(raw, key, f"no {caption_path.name}")


def class_folders(root: Path) -> list[tuple[Path, list[Path]]]:
    """Each class folder of ``root`` (sorted, hidden ones skipped) with its image files; a root without
    class folders, or a class without images, is an ``InputError`` naming it."""
    folders = sorted(path for path in root.iterdir() if path.is_dir() and not path.name.startswith("."))
    if not folders:
        raise InputError(f"{root}: no class folders (expected {root}/<class>/<image files>)")
    classes = [(folder, image_files(folder)) for folder in folders]
    for folder, files in classes:
        if not files:
            raise InputError(f"{folder}: class {folder.name!r} has no images ({', '.join(IMAGE_EXTENSIONS)})")
    return classes
