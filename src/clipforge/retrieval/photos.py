"""Incremental indexing of a photo folder, like rclip (yurijmikhalevich/rclip, ``rclip/main.py``).

The folder's embedding store (default ``FOLDER/.clipforge``) is a one-part clip-retrieval store whose
metadata is also the catalogue: per photo its path relative to the folder (``uid``), absolute
``path``, ``size``, ``mtime_ns`` and ``hash``. On each run:

1. the folder is walked, skipping hidden entries and rclip's excluded folders;
2. a photo whose relative path, size and modification time match a catalogue row keeps its vector;
3. otherwise its fingerprint (SHA-256 of the first MiB and the last KiB, rclip's) and size are looked
   up: the same content under the same path is a touched photo, under another path a renamed or moved one;
   both keep their vectors;
4. only the remaining photos (new ones, and changed content under an old name) are decoded and embedded;
   rows of deleted photos are dropped;
5. what could not be read is recorded in the store's ``clipforge.json`` (``unreadable``): a photo that failed
   to decode is not read again while its size and modification time stay the same, and callers can tell
   new problems from ones already reported (``PhotoUpdate.skipped_changed``).

Nothing is written when nothing changed. Otherwise the new store is written next to the old one
(``.clipforge.new``) and swapped in by two renames; a run interrupted between them is repaired by the
next. Moving the whole folder keeps every vector (paths are matched relative to it). A different
model embeds everything again.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipforge._util.imageio import is_image_path
from clipforge.data.formats.names import restore_names, table_from_rows
from clipforge.encode import Encoder, embed_images
from clipforge.errors import ConfigError, InputError, one_line
from clipforge.retrieval.embed import (
    STORE_FORMAT,
    STORE_INFO,
    store_info,
    write_store_info,
)
from clipforge.retrieval.inputs import STORE_NAMES
from clipforge.retrieval.store import EmbeddingStore, write_part

STORE_NAME = ".clipforge"
EXCLUDED_DIRS = frozenset({"@eaDir", "node_modules", ".git", "System Volume Information"})
HEAD_BYTES = 1 << 20
TAIL_BYTES = 1 << 10


@dataclass
class PhotoUpdate:
    store: Path
    embedded: int = 0  # new + modified
    new: int = 0  # paths the catalogue did not have
    modified: int = 0  # catalogued paths whose content changed
    unchanged: int = 0
    touched: int = 0  # same path and content, new modification time
    moved: int = 0  # renamed or moved photos whose vectors were kept
    removed: int = 0  # photos gone from the folder (not the old names of moved ones)
    previous_model: dict[str, Any] | None = None  # the model of a store made with another one (all re-embedded)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (photo or folder, one-line reason), known ones too
    skipped_changed: bool = False  # whether ``skipped`` differs from what the last run recorded
    changed: bool = False  # whether a new store was written


def fingerprint(path: Path, size: int) -> str:
    """SHA-256 of the first ``HEAD_BYTES`` and the last ``TAIL_BYTES`` of the file (rclip's cheap content hash)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        digest.update(handle.read(HEAD_BYTES))
        if size > HEAD_BYTES:
            handle.seek(max(HEAD_BYTES, size - TAIL_BYTES))
            digest.update(handle.read(TAIL_BYTES))
    return digest.hexdigest()


def photo_files(folder: Path, unreadable: list[tuple[str, str]], exclude_dirs: Sequence[str] = ()) -> list[Path]:
    """Image files under ``folder``, sorted, without hidden entries, ``EXCLUDED_DIRS`` or folders named in
    ``exclude_dirs`` (rclip's ``--exclude-dir``); sub-folders that cannot be read are added to ``unreadable``
    as (folder, reason)."""
    excluded = EXCLUDED_DIRS | set(exclude_dirs)

    def note(error: OSError) -> None:
        unreadable.append((str(error.filename), f"{error.filename}: cannot read folder ({error.strerror or one_line(error)})"))

    found = []
    for directory, subdirs, files in os.walk(folder, onerror=note):
        subdirs[:] = [d for d in subdirs if not d.startswith(".") and d not in excluded]
        found.extend(Path(directory) / name for name in files if not name.startswith(".") and is_image_path(name))
    return sorted(found)


def is_store(path: Path) -> bool:
    return (path / STORE_INFO).is_file() or (path / "img_emb").is_dir()


def default_store(folder: Path) -> Path:
    return folder / STORE_NAME


def _siblings(store: Path) -> tuple[Path, Path]:
    return store.with_name(store.name + ".new"), store.with_name(store.name + ".old")


def _repair(store: Path) -> None:
    """Finish or undo a swap that a crash interrupted: keep the complete store, drop the partial one."""
    new, old = _siblings(store)
    if not store.exists() and old.exists():
        os.rename(old, store)
    shutil.rmtree(new, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def _catalogue(store: Path, reference: dict[str, Any], update: PhotoUpdate) -> tuple[list[dict], np.ndarray, list[dict]]:
    """The rows, vectors and unreadable records of an existing photo store made with the same model (none
    otherwise: the other model is noted in ``update``). Any other store at that place is refused rather than replaced."""
    if not is_store(store):
        return [], np.zeros((0, 0), np.float32), []
    info = store_info(store)
    if info.get("kind") != "photos":
        raise ConfigError(f"{store}: holds an embedding store that is not a photo folder's; choose another --store")
    if info.get("model") != reference:
        update.previous_model = info.get("model")
        return [], np.zeros((0, 0), np.float32), []
    existing = EmbeddingStore(store)
    rows = [restore_names(row, STORE_NAMES) for row in existing.metadata(np.arange(existing.num_vectors))]
    return rows, existing.load_embeddings("img", mmap=False), info.get("unreadable", [])


def update_photo_store(
    folder: str | Path,
    model: Encoder,
    reference: dict[str, Any],
    store: str | Path | None = None,
    *,
    batch_size: int = 64,
    workers: int = 0,
    progress: bool = True,
    exclude_dirs: Sequence[str] = (),
) -> PhotoUpdate:
    """Bring the store of the photo folder up to date (see the module docstring); photos in folders named in
    ``exclude_dirs`` are left out (and dropped from the store)."""
    folder = Path(folder).absolute()
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder")
    store = Path(store).absolute() if store else default_store(folder)
    _repair(store)
    update = PhotoUpdate(store)
    old_rows, old_vectors, known_unreadable = _catalogue(store, reference, update)
    by_path = {row["uid"]: i for i, row in enumerate(old_rows)}
    by_content = {(row["hash"], row["size"]): i for i, row in enumerate(old_rows)}
    undecodable = {(entry["name"], entry["size"], entry["mtime_ns"]): entry for entry in known_unreadable if "size" in entry}
    rows: list[dict[str, Any]] = []
    sources: list[int | None] = []  # old row of each new row, or None to embed
    unreadable: list[tuple[str, str]] = []
    records: list[dict[str, Any]] = []  # what cannot be read: name, reason (and size, mtime_ns of undecodable photos)
    for photo in photo_files(folder, unreadable, exclude_dirs):
        try:
            stat = photo.stat()
        except OSError as error:  # e.g. a link to a file that is gone
            records.append({"name": str(photo), "reason": f"{photo}: cannot read ({one_line(error)})"})
            continue
        if known := undecodable.get((str(photo), stat.st_size, stat.st_mtime_ns)):
            records.append(known)  # failed to decode last time and unchanged since: not read again
            continue
        uid = photo.relative_to(folder).as_posix()
        old = by_path.get(uid)
        if old is not None and (old_rows[old]["size"], old_rows[old]["mtime_ns"]) == (stat.st_size, stat.st_mtime_ns):
            update.unchanged += 1
            content = old_rows[old]["hash"]
        else:
            content = fingerprint(photo, stat.st_size)
            if old is not None and (old_rows[old]["hash"], old_rows[old]["size"]) == (content, stat.st_size):
                update.touched += 1
            else:
                old = by_content.get((content, stat.st_size))
                update.moved += old is not None
        rows.append({"uid": uid, "path": str(photo), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "hash": content})
        sources.append(old)
    records += [{"name": name, "reason": reason} for name, reason in unreadable]
    # Photos inside a folder that could not be read this time are not gone: they keep their rows and vectors.
    hidden = tuple(Path(name).relative_to(folder).as_posix() + "/" for name, _ in unreadable if Path(name) != folder)
    seen = {row["uid"] for row in rows}
    kept_hidden = [index for index, row in enumerate(old_rows) if row["uid"].startswith(hidden) and row["uid"] not in seen]
    if kept_hidden:
        rows += [dict(old_rows[index]) for index in kept_hidden]
        sources += kept_hidden
        order = sorted(range(len(rows)), key=lambda i: Path(rows[i]["uid"]).parts)  # photo_files' order
        rows, sources = [rows[i] for i in order], [sources[i] for i in order]
    to_embed = [i for i, old in enumerate(sources) if old is None]
    result = embed_images(
        model, [rows[i]["path"] for i in to_embed], batch_size=batch_size, workers=workers, progress=progress and bool(to_embed)
    )
    for position, reason in result.skipped:
        row = rows[to_embed[position]]
        records.append({"name": row["path"], "reason": reason, "size": row["size"], "mtime_ns": row["mtime_ns"]})
    records.sort(key=lambda record: record["name"])
    update.skipped = [(record["name"], record["reason"]) for record in records]
    update.skipped_changed = records != known_unreadable
    update.embedded = len(result.kept)
    update.modified = sum(rows[to_embed[position]]["uid"] in by_path for position in result.kept)
    update.new = update.embedded - update.modified
    fresh = {to_embed[position]: vector for position, vector in zip(result.kept, result.embeddings)}
    keep = [i for i, old in enumerate(sources) if old is not None or i in fresh]
    present, reused = {row["uid"] for row in rows}, set(sources) - {None}
    update.removed = sum(row["uid"] not in present and index not in reused for index, row in enumerate(old_rows))
    new_rows = [rows[i] for i in keep]
    if not new_rows:
        unread = f"; {len(records)} could not be read (the first: {records[0]['reason']})" if records else ""
        raise InputError(f"{folder}: no readable images found{unread}")
    if new_rows == old_rows:
        if update.skipped_changed:
            write_store_info(store, store_info(store) | {"unreadable": records})
        return update
    vectors = np.stack([fresh[i] if sources[i] is None else old_vectors[sources[i]] for i in keep])
    _swap_in(store, new_rows, vectors, reference, folder, records)
    update.changed = True
    return update


def _swap_in(store: Path, rows: list[dict], vectors: np.ndarray, reference: dict[str, Any], folder: Path,
             unreadable: list[dict[str, Any]]) -> None:
    new, old = _siblings(store)
    write_part(new, "img", 0, vectors, table_from_rows(rows, names=STORE_NAMES))
    info = {"format": STORE_FORMAT, "kind": "photos", "model": reference, "dim": int(vectors.shape[1]), "roots": [str(folder)],
            "unreadable": unreadable}
    write_store_info(new, info)
    if store.exists():
        os.rename(store, old)
    os.rename(new, store)
    shutil.rmtree(old, ignore_errors=True)


def find_store(path: str | Path) -> Path:
    """The store at ``path``, or the store of the photo folder ``path``."""
    path = Path(path)
    if is_store(path):
        return path
    if is_store(default_store(path)):
        return default_store(path)
    raise InputError(f"{path}: no embedding store here; run `clipforge index {path}` or `clipforge embed … --out {path}` first")
