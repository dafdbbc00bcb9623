"""DataComp subset files: the uids a curation step keeps, as DataComp's tools write and read them.

A uid is DataComp's 32-hex-digit (128-bit) sample id. A subset file is a numpy ``.npy`` array of
``np.dtype("u8,u8")`` pairs ``(int(uid[:16], 16), int(uid[16:32], 16))`` sorted lexicographically, the
format of ``baselines/apply_filter.py`` and the input of ``resharder.py -s subset.npy`` (mlfoundations/datacomp),
which tests membership with ``np.searchsorted``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from clipforge._util.fileio import atomic_path
from clipforge.errors import InputError

UID_DTYPE = np.dtype("u8,u8")
_HEX = set("0123456789abcdef")


def derived_uid(shard_name: str, key: str) -> str:
    """A uid for a sample whose ``.json`` has none: 128 bits of BLAKE2b of ``"<shard file name>/<key>"``."""
    return hashlib.blake2b(f"{shard_name}/{key}".encode(), digest_size=16).hexdigest()


def is_uid(text: object) -> bool:
    return isinstance(text, str) and len(text) == 32 and set(text.lower()) <= _HEX


def uid_pairs(uids: Iterable[str]) -> np.ndarray:
    """``np.dtype("u8,u8")`` pairs of 32-hex uids, in the given order."""
    uids = list(uids)
    for uid in uids:
        if not is_uid(uid):
            raise InputError(f"uid {uid!r}: not 32 hexadecimal digits")
    return np.array([(int(uid[:16], 16), int(uid[16:32], 16)) for uid in uids], dtype=UID_DTYPE)


def pair_uids(pairs: np.ndarray) -> list[str]:
    """The 32-hex uids of ``u8,u8`` pairs."""
    return [f"{int(high):016x}{int(low):016x}" for high, low in pairs.tolist()]


def subset_array(uids: Iterable[str]) -> np.ndarray:
    """The sorted, de-duplicated subset array of ``uids``."""
    return np.unique(uid_pairs(uids))


def save_subset(path: str | Path, uids: Iterable[str] | np.ndarray) -> np.ndarray:
    """Write the subset file (atomically) and return its array."""
    array = np.unique(uids) if isinstance(uids, np.ndarray) else subset_array(uids)
    with atomic_path(path) as tmp, open(tmp, "wb") as stream:
        np.save(stream, array.astype(UID_DTYPE, copy=False))
    return array


def load_subset(path: str | Path) -> np.ndarray:
    """A subset file; ``InputError`` naming it when it is not a sorted ``u8,u8`` array."""
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"{path}: no such subset file") from None
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: not a readable .npy subset file ({error})") from None
    if array.dtype != UID_DTYPE or array.ndim != 1:
        raise InputError(f"{path}: expected a 1-d array of dtype u8,u8 (DataComp's subset format), got {array.dtype} {array.shape}")
    if not np.array_equal(array, np.sort(array)):
        raise InputError(f"{path}: the uids are not sorted (DataComp's tools search them with np.searchsorted)")
    return array


def in_subset(pairs: np.ndarray, subset: np.ndarray) -> np.ndarray:
    """Boolean mask of ``pairs`` found in the sorted ``subset`` (``np.searchsorted``, as DataComp's resharder)."""
    if len(subset) == 0:
        return np.zeros(len(pairs), dtype=bool)
    positions = np.searchsorted(subset, pairs)
    return subset[np.minimum(positions, len(subset) - 1)] == pairs
