"""Where per-shard tasks run: a local process pool (default) or a Ray cluster.

The scale-out pattern of img2dataset and MetaCLIP's curation (rom1504/img2dataset ``distributor.py``;
facebookresearch/MetaCLIP ``metaclip/curation``): a deterministic task list, each task writing its own output
atomically and returning at once when that output already exists, so a task retried after a killed worker,
or a whole job rerun after a killed driver, redoes only unfinished work. Global reductions (score quantiles,
entry counts, duplicate groups) run on the driver over the tasks' small outputs.

``Engine("ray", address="HOST:PORT")`` joins a running cluster (``ray start --head`` on one machine,
``ray start --address HOST:PORT`` on the others); without an address it joins the cluster named by
``RAY_ADDRESS`` or starts a local one. Every node needs clipforge installed (``pip install clipforge[scale]``)
and the data on a path all nodes see. A task whose worker dies is retried (``max_retries``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

from clipforge.errors import ConfigError

ENGINES = ("local", "ray")
RAY_RETRIES = 3


def default_workers() -> int:
    return max(1, (os.cpu_count() or 1) - 1)


class Engine:
    """Runs ``task(item)`` for every item, results in item order; tasks must be idempotent (see the module docstring)."""

    def __init__(self, kind: str = "local", *, address: str | None = None, workers: int | None = None) -> None:
        if kind not in ENGINES:
            raise ConfigError(f"--engine {kind!r} is not one of {', '.join(ENGINES)}")
        if address is not None and kind != "ray":
            raise ConfigError("--address is the address of a Ray cluster; it needs --engine ray")
        if workers is not None and workers < 0:
            raise ConfigError(f"--workers {workers} is negative")
        self.kind, self.address = kind, address
        self.workers = default_workers() if workers is None else workers

    @property
    def parallelism(self) -> int:
        """How many tasks can run at once (Ray: the cluster's CPUs)."""
        if self.kind == "ray":
            return max(1, int(self._ray().cluster_resources().get("CPU", 1)))
        return max(1, self.workers)

    def _ray(self) -> Any:
        try:
            import ray
        except ImportError:
            raise ConfigError("--engine ray needs Ray: pip install 'clipforge[scale]'") from None
        if not ray.is_initialized():
            ray.init(address=self.address, ignore_reinit_error=True, log_to_driver=False, include_dashboard=False)
        return ray

    def map(self, task: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        items = list(items)
        if not items:
            return []
        if self.kind == "ray":
            ray = self._ray()
            remote = ray.remote(max_retries=RAY_RETRIES)(task)
            return ray.get([remote.remote(item) for item in items])
        if self.workers <= 1 or len(items) == 1:
            return [task(item) for item in items]
        context = get_context("spawn")  # fork deadlocks once the parent has run torch (OpenMP state)
        with ProcessPoolExecutor(max_workers=min(self.workers, len(items)), mp_context=context) as pool:
            return list(pool.map(task, items))
