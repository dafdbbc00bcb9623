"""A model-free copy-detection descriptor for near-duplicate search: the image shrunk to 8×8 (box filter), its
three colour channels mean-centred together and L2-normalised (192 numbers), so cosine similarity is the
correlation of the two colour thumbnails.

Copies re-encoded, resized or slightly re-lit keep a correlation near 1 (a brightness factor cancels exactly
after centring and normalising, up to clipping), while different images of the same concept do not, which a
CLIP embedding cannot promise: it is built to map every picture of "a red star" to the same place. It is the
average hash (aHash, 8×8; Zauner, "Implementation and Benchmarking of Perceptual Image Hash Functions", 2010;
idealo/imagededup's ``AHash``) kept as real numbers and in colour, so that faiss can search it. Colour
matters: on the curation benchmark's calibration pool a grey thumbnail merged distinct scenes that differ only
in their objects' colours. The size matters too: at 16×16, JPEG's block noise survives the box filter and 12%
of JPEG copies fell below the correlation that 1% of distinct images reach with their nearest neighbour on
that pool (16,384 images); at 8×8, 0.2% did. DataComp used a dedicated copy-detection network instead (Yokoo's
ISC 2021 descriptor); any such model's embeddings can be given to ``dedup.near_duplicate_groups`` in its place.

``DescriptorTask`` writes the descriptors of one scanned shard to ``pixels/{position:05d}.npy`` (rows of the
scan; NaN for unreadable samples), atomically, skipping a finished shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from clipforge._util.fileio import atomic_path
from clipforge.data.curate.pool import run_task
from clipforge.data.formats.images import read_rgb_image
from clipforge.data.formats.shards import shard_index

SIDE = 8
SIZE = 3 * SIDE * SIDE


def pixel_descriptor(image: Image.Image) -> np.ndarray:
    """The 768-d unit descriptor of an image (a flat image gets the constant unit vector)."""
    pixels = np.asarray(image.convert("RGB").resize((SIDE, SIDE), Image.Resampling.BOX), dtype=np.float32).ravel()
    pixels -= pixels.mean()
    norm = float(np.linalg.norm(pixels))
    return pixels / norm if norm > 1e-6 else np.full(SIZE, 1 / np.sqrt(SIZE), dtype=np.float32)


@dataclass(frozen=True)
class DescriptorTask:
    shard: str
    position: int
    out: str

    @property
    def output(self) -> Path:
        return Path(self.out) / "pixels" / f"{self.position:05d}.npy"

    def __call__(self) -> None:
        if self.output.exists():
            return
        scan = pq.read_table(Path(self.out) / "scan" / f"{self.position:05d}.parquet", columns=["key", "error"])
        index = shard_index(Path(self.shard))
        row_of = {key: row for row, key in enumerate(index.keys)}
        vectors = np.full((len(scan), SIZE), np.nan, dtype=np.float32)
        for row, (key, error) in enumerate(zip(scan.column("key").to_pylist(), scan.column("error").to_pylist())):
            if error is None:
                vectors[row] = pixel_descriptor(read_rgb_image(index.image(row_of[key])))
        with atomic_path(self.output) as tmp, open(tmp, "wb") as stream:
            np.save(stream, vectors)


def pixel_embeddings(shards: list[Path], pool: pa.Table, out: Path, engine: Any, captions: bool = False) -> tuple[np.ndarray, None]:
    """Descriptors of the scanned pool, one row per scan row (an ``Embedder`` for ``curate_dedup``)."""
    tasks = [DescriptorTask(str(shard), position, str(out)) for position, shard in enumerate(shards)]
    engine.map(run_task, tasks)
    return np.concatenate([np.load(task.output) for task in tasks]), None
