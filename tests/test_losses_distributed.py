"""The contrastive losses in a real process group (gloo on CPU, spawned ranks) against open_clip.

Each rank holds a slice of one global batch. Values and gradients are compared with open_clip's
single-process losses on the full batch and with open_clip's own distributed losses run in the same
processes. open_clip is imported lazily so that ranks which do not need it start faster.
"""

from __future__ import annotations

import importlib
import os
import socket
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from clipforge.distill.losses import AffinityMimickingLoss
from clipforge.errors import ConfigError
from clipforge.train.distributed import (
    init_distributed,
    is_main_process,
    world_info_from_env,
)
from clipforge.train.losses import ClipLoss, SigLipLoss

LOCAL_BATCH, DIM = 4, 8
CLIP_MODES = [(False, False), (True, True), (False, True), (True, False)]  # (local_loss, gather_with_grad)
AFFINITY_WEIGHT = 0.4  # λ of (1 − λ)·CLIP + λ·affinity mimicking
ENV_VARS = [
    "LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK",
    "RANK", "PMI_RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK",
    "WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
    "MASTER_ADDR", "MASTER_PORT",
]  # fmt: skip


def open_clip_loss():
    return importlib.import_module("open_clip.loss")


def global_inputs(world_size: int, seed: int) -> dict[str, torch.Tensor]:
    """One global batch (float64, unit-norm features) plus scalar scale and bias; identical on every rank."""
    generator = torch.Generator().manual_seed(seed)
    batch = LOCAL_BATCH * world_size
    return {
        "image_features": F.normalize(torch.randn(batch, DIM, generator=generator, dtype=torch.float64), dim=-1),
        "text_features": F.normalize(torch.randn(batch, DIM, generator=generator, dtype=torch.float64), dim=-1),
        "logit_scale": torch.tensor(11.0, dtype=torch.float64),
        "logit_bias": torch.tensor(-2.5, dtype=torch.float64),
    }


def rank_slice(inputs: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    return {name: t[rows] if t.ndim else t for name, t in inputs.items()}


def value_and_grads(loss_fn, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Loss value and the gradient w.r.t. every input, from fresh leaves."""
    leaves = {name: t.detach().clone().requires_grad_() for name, t in inputs.items()}
    loss = loss_fn(**leaves)
    loss.backward()
    return {"loss": loss.detach(), **{name: leaf.grad for name, leaf in leaves.items()}}


def open_clip_distill_part(loss, teacher: dict[str, torch.Tensor], part: str):
    def call(**kw):
        teacher_kw = {f"dist_{name}": t for name, t in teacher.items() if name != "logit_bias"}
        return loss(**kw, **teacher_kw, output_dict=True)[part]

    return call


def affinity_part(teacher: dict[str, torch.Tensor], distill_weight: float, local_loss: bool):
    """Our loss at λ = 0 (the contrastive part) or 1 (the distillation part), teacher features as keywords."""
    loss = AffinityMimickingLoss(distill_weight, [float(teacher["logit_scale"])], local_loss=local_loss, gather_with_grad=True)

    def call(**kw):
        return loss(**kw, teacher_image_features=teacher["image_features"], teacher_text_features=teacher["text_features"])

    return call


def run_world(rank: int, world_size: int, port: int, out_dir: str, with_open_clip: bool) -> None:
    """One rank of one process group: every loss, ours and (optionally) open_clip's, on this rank's slice."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    info = init_distributed("gloo")
    results: dict[str, object] = {"world_info": tuple(info), "is_main": is_main_process()}
    inputs = rank_slice(global_inputs(world_size, seed=0), rank)
    teacher_scale = torch.tensor(23.0, dtype=torch.float64)
    teacher = rank_slice(global_inputs(world_size, seed=1), rank) | {"logit_scale": teacher_scale}
    oc = open_clip_loss() if with_open_clip else None
    for local_loss, gather_with_grad in CLIP_MODES:
        key = f"clip-{local_loss}-{gather_with_grad}"
        results[f"{key}-ours"] = value_and_grads(ClipLoss(local_loss, gather_with_grad), inputs)
        if oc:
            reference = oc.ClipLoss(local_loss, gather_with_grad, rank=rank, world_size=world_size)
            results[f"{key}-open_clip"] = value_and_grads(reference, inputs)
    results["siglip-ours"] = value_and_grads(SigLipLoss(), inputs)
    student = {name: t for name, t in inputs.items() if name != "logit_bias"}
    results["affinity-ours"] = value_and_grads(affinity_part(teacher, AFFINITY_WEIGHT, True), student)
    if oc:
        results["siglip-open_clip"] = value_and_grads(oc.SigLipLoss(rank=rank, world_size=world_size), inputs)
        for part, weight in (("contrastive_loss", 0.0), ("distill_loss", 1.0)):
            reference = oc.DistillClipLoss(True, True, rank=rank, world_size=world_size)
            results[f"distill-{part}-ours"] = value_and_grads(affinity_part(teacher, weight, True), student)
            results[f"distill-{part}-open_clip"] = value_and_grads(open_clip_distill_part(reference, teacher, part), student)
    torch.save(results, Path(out_dir) / f"world{world_size}-rank{rank}.pt")
    dist.destroy_process_group()


def run_rank(rank: int, ports: tuple[int, int], out_dir: str) -> None:
    """Spawned process: a 3-rank group (ours only: the bidirectional SigLIP ring), then ranks 0-1 as a
    2-rank group with open_clip's losses alongside. One spawn for both keeps process start-up to one."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.distributed.nn.all_gather's deprecation
    run_world(rank, 3, ports[0], out_dir, with_open_clip=False)
    if rank < 2:
        run_world(rank, 2, ports[1], out_dir, with_open_clip=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict[int, list[dict]]:
    """Per world size (2 and 3), each rank's results."""
    out_dir = tmp_path_factory.mktemp("ranks")
    context = mp.spawn(run_rank, args=((free_port(), free_port()), str(out_dir)), nprocs=3, join=False)
    open_clip_loss()  # import the full-batch reference while the ranks run
    deadline = time.monotonic() + 180
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the spawned ranks did not finish within 180 s")
    return {ws: [torch.load(out_dir / f"world{ws}-rank{rank}.pt") for rank in range(ws)] for ws in (2, 3)}


def full_batch_reference(world_size: int, loss_name: str) -> dict[str, torch.Tensor]:
    oc = open_clip_loss()
    reference = oc.ClipLoss() if loss_name == "clip" else oc.SigLipLoss()
    return value_and_grads(reference, global_inputs(world_size, seed=0))


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-12)


def assert_matches_full_batch(per_rank: list[dict], full: dict[str, torch.Tensor], feature_grad_factor: int) -> None:
    """Mean loss and mean scale/bias gradient over ranks equal the full batch's (what DDP averaging sees);
    each rank's feature gradients equal ``feature_grad_factor`` × its rows of the full-batch gradient."""
    close(torch.stack([r["loss"] for r in per_rank]).mean(), full["loss"])
    for name in ("logit_scale", "logit_bias"):
        close(torch.stack([r[name] for r in per_rank]).mean(), full[name])
    for rank, result in enumerate(per_rank):
        expected = rank_slice(full, rank)
        for name in ("image_features", "text_features"):
            close(result[name], feature_grad_factor * expected[name])


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("local_loss, gather_with_grad", CLIP_MODES[:3])
def test_clip_loss_across_ranks_equals_full_batch(ranks, world_size, local_loss, gather_with_grad) -> None:
    per_rank = [r[f"clip-{local_loss}-{gather_with_grad}-ours"] for r in ranks[world_size]]
    full = full_batch_reference(world_size, "clip")
    # With gather_with_grad every rank's loss reaches every shard (W× gradient, undone by DDP's mean);
    # without it, as in open_clip, each rank's features get only the gradient of its own copy of the loss.
    assert_matches_full_batch(per_rank, full, feature_grad_factor=world_size if gather_with_grad else 1)
    if not local_loss:
        for result in per_rank:
            close(result["loss"], full["loss"])


@pytest.mark.parametrize("world_size", [2, 3])
def test_siglip_loss_across_ranks_equals_full_batch(ranks, world_size) -> None:
    per_rank = [r["siglip-ours"] for r in ranks[world_size]]
    assert_matches_full_batch(per_rank, full_batch_reference(world_size, "siglip"), feature_grad_factor=world_size)


@pytest.mark.parametrize("world_size", [2, 3])
def test_affinity_loss_across_ranks_equals_the_papers_full_batch_loss(ranks, world_size) -> None:
    """TinyCLIP's loss under torchrun: each rank's rows against every rank's columns; the mean over ranks is
    the paper's equations on the whole batch (written out in tests/test_distill_losses.py)."""
    from test_distill_losses import paper_loss

    student = {k: v for k, v in global_inputs(world_size, seed=0).items() if k != "logit_bias"}
    teacher = global_inputs(world_size, seed=1)

    def full_batch(image_features, text_features, logit_scale):
        return paper_loss(image_features, text_features, logit_scale, teacher["image_features"],
                          teacher["text_features"], 23.0, AFFINITY_WEIGHT)

    full = value_and_grads(full_batch, student)
    per_rank = [r["affinity-ours"] for r in ranks[world_size]]
    close(torch.stack([r["loss"] for r in per_rank]).mean(), full["loss"])
    close(torch.stack([r["logit_scale"] for r in per_rank]).mean(), full["logit_scale"])
    for rank, result in enumerate(per_rank):
        for name in ("image_features", "text_features"):
            close(result[name], world_size * rank_slice(full, rank)[name])


@pytest.mark.parametrize(
    "key",
    [f"clip-{ll}-{gg}" for ll, gg in CLIP_MODES]
    + ["siglip", "distill-contrastive_loss", "distill-distill_loss"],
)
def test_two_ranks_match_open_clip_in_same_processes(ranks, key) -> None:
    for result in ranks[2]:
        ours, reference = result[f"{key}-ours"], result[f"{key}-open_clip"]
        assert ours.keys() == reference.keys()
        for name in ours:
            close(ours[name], reference[name])


def test_spawned_ranks_see_their_world(ranks) -> None:
    for world_size, per_rank in ranks.items():
        assert [r["world_info"] for r in per_rank] == [(rank, rank, world_size) for rank in range(world_size)]
        assert [r["is_main"] for r in per_rank] == [rank == 0 for rank in range(world_size)]


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"LOCAL_RANK": "1", "RANK": "5", "WORLD_SIZE": "8"},
        {"SLURM_LOCALID": "2", "SLURM_PROCID": "6", "SLURM_NTASKS": "16"},
        {"OMPI_COMM_WORLD_LOCAL_RANK": "3", "OMPI_COMM_WORLD_RANK": "7", "OMPI_COMM_WORLD_SIZE": "12"},
        {"MPI_LOCALRANKID": "0", "PMI_RANK": "4", "PMI_SIZE": "8", "SLURM_PROCID": "9", "SLURM_NTASKS": "32"},
    ],
)
def test_world_info_from_env_matches_open_clip(monkeypatch, env) -> None:
    from open_clip_train.distributed import world_info_from_env as open_clip_world_info

    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert tuple(world_info_from_env()) == open_clip_world_info()
    assert is_main_process() == (open_clip_world_info()[1] == 0)


def test_bad_environment_is_reported(monkeypatch) -> None:
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    assert tuple(init_distributed()) == (0, 0, 1) and not dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE='two' is not an integer"):
        world_info_from_env()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="MASTER_ADDR and MASTER_PORT not set"):
        init_distributed("gloo")
