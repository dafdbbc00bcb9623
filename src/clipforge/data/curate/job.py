"""The Python API of the curation steps: scan the pool (per-shard tasks), decide on the driver, write the outputs.

    from clipforge.data.curate.job import curate_filter, curate_balance, curate_dedup, curate_reshard, curate_rewrite
    summary = curate_filter(["pool/"], "out/filter", FilterSettings(clip_fraction=0.3), embed=embedder)

``embed(shards, pool, out, engine) -> (image [N, d], caption [N, d])`` supplies the pool's embeddings (rows
aligned with the scan, NaN where unreadable); ``clipforge.retrieval.pool_embeddings.pool_embeddings`` with a
model reference is the one the command line uses (it goes through the resumable embedding store).
Every output is written atomically and every task skips finished work, so rerunning a killed job redoes only
what was left; the same inputs and settings give byte-identical outputs on either engine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from clipforge.data.curate import steps
from clipforge.data.curate.engine import Engine
from clipforge.data.curate.pool import (
    claim_job,
    pool_shards,
    pool_uids,
    run_task,
    scan_pool,
)
from clipforge.data.curate.reshard import reshard
from clipforge.data.curate.rewrite import RewriteTask
from clipforge.data.curate.subset import in_subset, load_subset, uid_pairs
from clipforge.errors import ConfigError, InputError

Embedder = Callable[..., tuple[np.ndarray, np.ndarray | None]]  # (shards, pool, out, engine, *, captions=True)


def _prepare(inputs: Sequence[str | Path], out: str | Path, step: str, settings: dict[str, Any], engine: Engine | None,
             subset: str | Path | None) -> tuple[list[Path], pa.Table, Path, Engine, np.ndarray]:
    shards, out, engine = pool_shards(inputs), Path(out), engine or Engine()
    subset_array = load_subset(subset) if subset is not None else None
    if subset_array is not None and not in_subset(uid_pairs(pool_uids(shards)), subset_array).any():
        raise InputError(f"{subset}: none of its {len(subset_array)} uids is a sample of this pool; "
                         "give the subset.npy of a step run on these shards")
    claim_job(out, {"step": step, "shards": [str(shard.absolute()) for shard in shards], "settings": settings,
                    "subset": str(Path(subset).absolute()) if subset is not None else None})
    pool = scan_pool(shards, out, engine)
    return shards, pool, out, engine, steps.input_mask(pool, subset_array)


def curate_filter(inputs: Sequence[str | Path], out: str | Path, settings: steps.FilterSettings, *, embed: Embedder | None = None,
                  targets: np.ndarray | None = None, engine: Engine | None = None, subset: str | Path | None = None) -> dict[str, Any]:
    """DataComp's filters (``steps.FilterSettings``); ``targets``: embeddings of the image filter's target set."""
    settings.check()
    shards, pool, out, engine, active = _prepare(inputs, out, "filter", asdict(settings), engine, subset)
    image = text = None
    if settings.needs_embeddings:
        if embed is None:
            raise ConfigError("curate filter: the CLIP score and image filters need a model (--model)")
        image, text = embed(shards, pool, out, engine)
    decision = steps.filter_pool(pool, settings, active, image, text, targets)
    return steps.write_step(out, "filter", pool, active, decision, settings=settings)


def curate_balance(inputs: Sequence[str | Path], out: str | Path, entries: Sequence[str], *, t: float | None = None,
                   tail_share: float = 0.06, seed: int = 0, engine: Engine | None = None, subset: str | Path | None = None) -> dict[str, Any]:
    """MetaCLIP balancing against the metadata ``entries`` (``t`` given, or from ``tail_share``)."""
    record = {"entries": list(entries), "t": t, "tail_share": tail_share, "seed": seed}
    _, pool, out, _, active = _prepare(inputs, out, "balance", record, engine, subset)
    decision = steps.balance_pool(pool, entries, active, t=t, tail_share=tail_share, seed=seed)
    return steps.write_step(out, "balance", pool, active, decision)


def curate_dedup(inputs: Sequence[str | Path], out: str | Path, *, threshold: float | None = None, embed: Embedder | None = None,
                 evaluation: np.ndarray | None = None, evaluation_threshold: float = 0.95, engine: Engine | None = None,
                 subset: str | Path | None = None) -> dict[str, Any]:
    """Exact duplicates always; near-duplicates with ``threshold``; near copies of ``evaluation`` embeddings."""
    record = {"threshold": threshold, "evaluation": evaluation is not None, "evaluation_threshold": evaluation_threshold}
    shards, pool, out, engine, active = _prepare(inputs, out, "dedup", record, engine, subset)
    image = None
    if threshold is not None or evaluation is not None:
        if embed is None:
            raise ConfigError("curate dedup: near-duplicate detection needs a model (--model)")
        image, _ = embed(shards, pool, out, engine, captions=False)
    decision = steps.dedup_pool(pool, active, image, threshold=threshold, evaluation=evaluation, evaluation_threshold=evaluation_threshold)
    return steps.write_step(out, "dedup", pool, active, decision)


def curate_reshard(inputs: Sequence[str | Path], subset: str | Path, out: str | Path, *, shard_size: int = 10_000,
                   engine: Engine | None = None) -> dict[str, int]:
    """The subset's samples rewritten as shards of ``shard_size`` (DataComp's resharder)."""
    shards, pool, out, engine, _ = _prepare(inputs, Path(out) / ".curate", "reshard", {"shard_size": shard_size}, engine, subset)
    return reshard(shards, pool, load_subset(subset), out.parent, engine, shard_size)


def curate_rewrite(inputs: Sequence[str | Path], out: str | Path, rewriter: Callable[[list[str]], list[list[str]]], *,
                   engine: Engine | None = None) -> list[Path]:
    """Every shard copied with a ``captions.json`` member of rewrites per sample (multi-caption samples)."""
    shards, out, engine = pool_shards(inputs), Path(out), engine or Engine()
    claim_job(out / ".curate", {"step": "rewrite", "shards": [str(shard.absolute()) for shard in shards], "rewriter": repr(rewriter)})
    tasks = [RewriteTask(str(shard), position, str(out), rewriter) for position, shard in enumerate(shards)]
    engine.map(run_task, tasks)
    return [task.output for task in tasks]
