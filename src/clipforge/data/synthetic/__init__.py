"""The synthetic image-caption world: clipforge's built-in data source (issue #3).

Procedural images of colored shapes (8 in-distribution shapes plus 4 reserved for OOD and few-shot
work, 8 colors, 2 sizes, 5 positions, counts 1–3, an optional second object in a spatial relation)
on muted plain, noisy or gradient backgrounds, with paraphrased captions.

    from clipforge.data.synthetic import SyntheticWorld, WorldConfig, write_shards
    world = SyntheticWorld(WorldConfig(seed=0))
    sample = world.sample("train", 12)         # .image (PIL RGB), .caption, .metadata
    tasks = world.tasks()                      # zero-shot tasks: shape, color, shape_color, count, position
    write_shards(world, "train", 10_000, "shards/")

Defaults (``WorldConfig``): 64 px images, a second object in 25% of scenes, counts 1/2/3 with
weights 0.6/0.2/0.2, half the objects small; train holds out circle/green, star/blue, heart/yellow
and triangle/white, never shows crescent or ring, and shows arrow and pentagon 5 times each.

This module is the world's public face: code outside ``clipforge.data.synthetic`` imports from here,
never from its modules (``world``, ``config``, ``concepts``, ``scene``, ``render``, ``captions``,
``tasks``, ``shards``, ``torch_datasets``). The PyTorch datasets (``SyntheticStream``, ``SyntheticDataset``)
are imported on first use, so the world itself loads without torch.
"""

from typing import Any

from clipforge.data.synthetic.alterations import ALTERATIONS, real_or_altered
from clipforge.data.synthetic.config import SHIFTS, SPLITS, Shift, WorldConfig
from clipforge.data.synthetic.identities import Identity, identities, identity_view
from clipforge.data.synthetic.render import CORRUPTIONS, corrupt
from clipforge.data.synthetic.shards import IMAGE_FORMATS, write_shards
from clipforge.data.synthetic.tasks import CONTEXT_FACTORS, ZeroShotTask
from clipforge.data.synthetic.world import RetrievalSet, Sample, SyntheticWorld

__all__ = [
    "ALTERATIONS",
    "CONTEXT_FACTORS",
    "CORRUPTIONS",
    "IMAGE_FORMATS",
    "Identity",
    "SHIFTS",
    "SPLITS",
    "RetrievalSet",
    "Sample",
    "Shift",
    "SyntheticDataset",
    "SyntheticStream",
    "SyntheticWorld",
    "WorldConfig",
    "ZeroShotTask",
    "corrupt",
    "identities",
    "identity_view",
    "real_or_altered",
    "write_shards",
]


def __getattr__(name: str) -> Any:
    if name in ("SyntheticDataset", "SyntheticStream"):
        from clipforge.data.synthetic import torch_datasets

        return getattr(torch_datasets, name)
    raise AttributeError(f"module 'clipforge.data.synthetic' has no attribute {name!r}")
