"""Embeddings of a curation pool, one row per scanned sample, computed as idempotent per-shard tasks on an engine
(``clipforge.data.curate.engine``).

Images go through the resumable embedding store (``retrieval.embed``): the store's part ``p`` is the pool's
shard ``p``, and engine task ``r`` of ``R`` embeds the parts ``r, r + R, …`` (the store's rank split; a rerun
or a retried task skips the parts that have a completion record). Captions are embedded per shard by
``CaptionTask`` into ``text_emb/{shard:05d}.npy``. Both are aligned to the scan rows; rows without a readable
image or caption are NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipforge._util.fileio import atomic_path
from clipforge.data.curate.engine import Engine
from clipforge.data.curate.pool import run_task
from clipforge.encode import encode_texts
from clipforge.retrieval.embed import embed_to_store, load_model
from clipforge.retrieval.store import EmbeddingStore, embedding_path, metadata_path

STORE = "embeddings"


@dataclass(frozen=True)
class StoreTask:
    """Rank ``rank`` of ``world_size`` of an embedding-store job (``embed_to_store``), the model loaded in the worker."""

    reference: dict[str, Any]
    inputs: tuple[str, ...]
    out: str
    rank: int
    world_size: int
    batch_size: int = 64
    part_size: int = 10_000
    captions: bool = False

    def __call__(self) -> int:
        report = embed_to_store(
            load_model(self.reference), self.reference, list(self.inputs), self.out, part_size=self.part_size,
            batch_size=self.batch_size, captions=self.captions, rank=self.rank, world_size=self.world_size, progress=False,
        )
        return report.rows


def store_tasks(reference: dict[str, Any], inputs: list[str], out: str | Path, engine: Engine, **settings: Any) -> list[StoreTask]:
    world_size = engine.parallelism
    return [StoreTask(reference, tuple(inputs), str(out), rank, world_size, **settings) for rank in range(world_size)]


@dataclass(frozen=True)
class CaptionTask:
    """The captions of pool shard ``position`` (from its scan), embedded into ``text_emb/{position:05d}.npy``."""

    reference: dict[str, Any]
    out: str
    position: int

    @property
    def output(self) -> Path:
        return Path(self.out) / "text_emb" / f"{self.position:05d}.npy"

    def __call__(self) -> None:
        if self.output.exists():
            return
        scan = pq.read_table(Path(self.out) / "scan" / f"{self.position:05d}.parquet")
        captions, errors = scan.column("caption").to_pylist(), scan.column("error").to_pylist()
        rows = [row for row, (text, error) in enumerate(zip(captions, errors)) if text is not None and error is None]
        model = load_model(self.reference)
        vectors = np.full((len(captions), model.config.embed_dim), np.nan, dtype=np.float32)
        if rows:
            vectors[rows] = encode_texts(model, [captions[row] for row in rows]).numpy()
        with atomic_path(self.output) as tmp, open(tmp, "wb") as stream:
            np.save(stream, vectors)


def _aligned_images(store_root: Path, pool: pa.Table, dim: int) -> np.ndarray:
    """Store rows placed at their scan rows: part ``p`` holds shard ``p``'s readable images, by sample key."""
    EmbeddingStore(store_root)  # validates every part against its metadata
    vectors = np.full((len(pool), dim), np.nan, dtype=np.float32)
    shards, keys = pool.column("shard").to_numpy(), pool.column("key").to_pylist()
    row_of = {(int(shard), key): row for row, (shard, key) in enumerate(zip(shards, keys))}
    for shard in np.unique(shards):
        path = embedding_path(store_root, "img", int(shard))
        if not path.exists():
            continue
        sample_keys = pq.read_table(metadata_path(store_root, int(shard)), columns=["uid"]).column("uid").to_pylist()
        rows = [row_of[(int(shard), key)] for key in sample_keys]
        vectors[rows] = np.load(path).astype(np.float32)
    return vectors


def pool_embeddings(reference: dict[str, Any], shards: list[Path], pool: pa.Table, out: Path, engine: Engine,
                    *, captions: bool = True, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray | None]:
    """(image [N, d], caption [N, d] or None) embeddings of the scanned pool, NaN rows where unreadable."""
    engine.map(run_task, store_tasks(reference, [str(shard) for shard in shards], out / STORE, engine, batch_size=batch_size))
    text = None
    if captions:
        tasks = [CaptionTask(reference, str(out), position) for position in range(len(shards))]
        engine.map(run_task, tasks)
        text = np.concatenate([np.load(task.output) for task in tasks])
    dim = text.shape[1] if text is not None else load_model(reference).config.embed_dim
    image = _aligned_images(out / STORE, pool, dim)
    # Rows the scan found unreadable stay NaN even if the store decoded the image (e.g. the caption was bad).
    unreadable = np.array([error is not None for error in pool.column("error").to_pylist()], dtype=bool)
    image[unreadable] = np.nan
    return image, text
