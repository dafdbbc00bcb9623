"""Process-group set-up and the feature exchanges the contrastive losses need across ranks.

Environment handling and ``gather_features`` follow open_clip (``open_clip_train/distributed.py`` and
``open_clip/loss.py``); the autograd-aware neighbour exchange is the ring used by open_clip's SigLipLoss
(``NeighbourExchange`` / ``NeighbourExchangeBidir``), after Zhai et al. 2023, "Sigmoid Loss for Language
Image Pre-Training", §3.3 (chunked implementation).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.distributed.nn as dist_nn

from clipforge.errors import ConfigError

# First variable found wins, as in open_clip: torchrun, Intel MPI / PMI, SLURM, Open MPI.
_LOCAL_RANK_VARS = ("LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK")
_RANK_VARS = ("RANK", "PMI_RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK")
_WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


class WorldInfo(NamedTuple):
    local_rank: int
    rank: int
    world_size: int


def _int_from_env(names: Sequence[str], default: int) -> int:
    for name in names:
        if name in os.environ:
            try:
                return int(os.environ[name])
            except ValueError:
                raise ConfigError(f"environment variable {name}={os.environ[name]!r} is not an integer") from None
    return default


def world_info_from_env() -> WorldInfo:
    """(local_rank, rank, world_size) from torchrun, MPI/PMI, SLURM or Open MPI variables; (0, 0, 1) if none."""
    return WorldInfo(
        local_rank=_int_from_env(_LOCAL_RANK_VARS, 0),
        rank=_int_from_env(_RANK_VARS, 0),
        world_size=_int_from_env(_WORLD_SIZE_VARS, 1),
    )


def init_distributed(backend: str | None = None) -> WorldInfo:
    """Join the process group described by the environment; a no-op for a single process.

    ``backend`` defaults to nccl when CUDA is available and gloo otherwise. On CUDA the current device
    becomes ``cuda:<local_rank>``. The rendezvous address comes from ``MASTER_ADDR`` / ``MASTER_PORT``
    (set by torchrun; export them yourself under SLURM or MPI). Calling it again once joined is harmless.
    """
    info = world_info_from_env()
    if info.world_size == 1 or (dist.is_available() and dist.is_initialized()):
        return info
    if not dist.is_available():
        raise ConfigError(f"WORLD_SIZE={info.world_size} but this torch build has no torch.distributed")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if not dist.is_backend_available(backend):
        raise ConfigError(f"distributed backend {backend!r} is not available in this torch build (try 'gloo')")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ConfigError(f"{' and '.join(missing)} not set: launch with torchrun or export the rendezvous address")
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend=backend, init_method="env://", rank=info.rank, world_size=info.world_size)
    return info


def rank_and_world_size() -> tuple[int, int]:
    """This process's rank and the world size of the default group; (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """True on global rank 0 (and in a single process): the rank that logs and writes checkpoints."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return world_info_from_env().rank == 0


def gather_features(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    *,
    local_loss: bool,
    gather_with_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate every rank's features along the batch, rank order, as open_clip's ``gather_features``.

    With ``gather_with_grad`` the gather is autograd-aware (``torch.distributed.nn.all_gather``: the
    backward sums each shard's gradient from all ranks back to its owner). Otherwise remote shards carry
    no gradient; unless ``local_loss`` the local shard is re-inserted so gradients reach this rank's own
    features. Every rank must pass the same shapes. Single process: the inputs are returned unchanged.
    """
    rank, world_size = rank_and_world_size()
    if world_size == 1:
        return image_features, text_features

    def gather(features: torch.Tensor) -> torch.Tensor:
        if gather_with_grad:
            return torch.cat(dist_nn.all_gather(features), dim=0)
        shards = [torch.empty_like(features) for _ in range(world_size)]
        with torch.no_grad():
            dist.all_gather(shards, features.contiguous())
        if not local_loss:
            shards[rank] = features
        return torch.cat(shards, dim=0)

    return gather(image_features), gather(text_features)


def _send_and_receive(tensors: Sequence[torch.Tensor], shifts: Sequence[int]) -> list[torch.Tensor]:
    """Send ``tensors[i]`` to rank ``rank + shifts[i]`` and receive its counterpart from ``rank - shifts[i]``."""
    rank, world_size = rank_and_world_size()
    received = [torch.empty_like(tensor) for tensor in tensors]
    ops = []
    for tag, (tensor, buffer, shift) in enumerate(zip(tensors, received, shifts)):
        ops.append(dist.P2POp(dist.isend, tensor.contiguous(), (rank + shift) % world_size, tag=tag))
        ops.append(dist.P2POp(dist.irecv, buffer, (rank - shift) % world_size, tag=tag))
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


class _NeighbourExchange(torch.autograd.Function):
    """Ring shift with gradients: the backward sends each gradient back the way its tensor came."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, shifts: tuple[int, ...], *tensors: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        ctx.shifts = shifts
        return tuple(_send_and_receive(tensors, shifts))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> tuple[None | torch.Tensor, ...]:  # type: ignore[override]
        return (None, *_send_and_receive(grads, [-shift for shift in ctx.shifts]))


def other_ranks_blocks(features: torch.Tensor) -> Iterator[torch.Tensor]:
    """Yield every other rank's ``features`` one block at a time, passed around the ring in both directions.

    Each step talks only to the two neighbours, and the caller computes one block's loss at a time instead
    of one over a gathered batch; gradients flow back to the owning rank. All ranks must consume the
    iterator to the end (it is a sequence of collective calls) with same-shaped ``features``. Yields
    nothing in a single process.
    """
    _, world_size = rank_and_world_size()
    to_right = to_left = features
    for _ in range((world_size - 1) // 2):
        from_left, from_right = _NeighbourExchange.apply((1, -1), to_right, to_left)
        yield from_left
        yield from_right
        to_right, to_left = from_left, from_right
    if (world_size - 1) % 2:
        (from_left,) = _NeighbourExchange.apply((1,), to_right)
        yield from_left
