"""Scale-out: a local Ray cluster of 2 CPUs gives byte-identical curation and embedding outputs to the local
engine, also when a worker is killed mid-task; a driver killed mid-job and rerun gives the uninterrupted output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray
from conftest import kill_when_written
from curate_helpers import KillOnce, build_pool, same_files
from typer.testing import CliRunner

import clipforge
from clipforge.cli import app
from clipforge.data.curate.engine import Engine
from clipforge.data.curate.job import (
    curate_balance,
    curate_dedup,
    curate_filter,
    curate_reshard,
)
from clipforge.data.curate.steps import FilterSettings
from clipforge.retrieval.embed import model_reference
from clipforge.retrieval.pool_embeddings import StoreTask, pool_embeddings

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"
OUTPUTS = ("subset.npy", "decisions.parquet", "summary.json", "scan/*.parquet", "text_emb/*.npy",
           "embeddings/img_emb/*.npy", "embeddings/metadata/*.parquet")


@pytest.fixture(scope="module")
def cluster():
    path = os.pathsep.join([str(SRC), str(TESTS), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def pool(tmp_path_factory, tiny):
    root = tmp_path_factory.mktemp("scale")
    build_pool(root / "pool", n=40, near_copies=4)
    clipforge.save(tiny, root / "tiny.safetensors")
    return root


class KillingEngine(Engine):
    """The Ray engine, with the first store task's worker killed mid-task (once)."""

    def __init__(self, marker: Path) -> None:
        super().__init__("ray")
        self.marker = marker

    def map(self, task, items):
        items = [KillOnce(item, str(self.marker)) if isinstance(item, StoreTask) and item.rank == 0 else item for item in items]
        return super().map(task, items)


def test_ray_matches_local_byte_for_byte(cluster, pool, tmp_path):
    reference = model_reference(str(pool / "tiny.safetensors"), None, None, "fp32")
    embed = lambda *args, **kwargs: pool_embeddings(reference, *args, **kwargs)  # noqa: E731
    settings = FilterSettings(clip_fraction=0.5, basic=True, min_side=16)
    for name, engine in (("local", Engine(workers=1)), ("ray", Engine("ray"))):
        curate_filter([pool / "pool"], tmp_path / name / "filter", settings, embed=embed, engine=engine)
        curate_balance([pool / "pool"], tmp_path / name / "balance", ["red", "blue", "star", "circle"], t=3, engine=engine,
                       subset=tmp_path / name / "filter" / "subset.npy")
        curate_reshard([pool / "pool"], tmp_path / name / "balance" / "subset.npy", tmp_path / name / "shards", shard_size=5, engine=engine)
    same_files(tmp_path / "local" / "filter", tmp_path / "ray" / "filter", OUTPUTS)
    same_files(tmp_path / "local" / "balance", tmp_path / "ray" / "balance", OUTPUTS[:4])
    assert len(same_files(tmp_path / "local" / "shards", tmp_path / "ray" / "shards", ("*.tar", "sizes.json"))) > 2
    # clipforge embed --engine ray writes the store the local engine writes.
    for name in ("local", "ray"):
        result = CliRunner().invoke(app, ["embed", str(pool / "pool"), "--model", str(pool / "tiny.safetensors"),
                                          "--out", str(tmp_path / f"store-{name}"), "--engine", name, "--workers", "1"])
        assert result.exit_code == 0, result.output
    same_files(tmp_path / "store-local", tmp_path / "store-ray", ("img_emb/*.npy", "metadata/*.parquet", "parts/*.json"))


def test_killed_ray_worker_is_retried_with_identical_output(cluster, pool, tmp_path):
    reference = model_reference(str(pool / "tiny.safetensors"), None, None, "fp32")
    embed = lambda *args, **kwargs: pool_embeddings(reference, *args, **kwargs)  # noqa: E731
    marker = tmp_path / "killed"
    curate_dedup([pool / "pool"], tmp_path / "local", threshold=0.999, embed=embed, engine=Engine(workers=1))
    curate_dedup([pool / "pool"], tmp_path / "ray", threshold=0.999, embed=embed, engine=KillingEngine(marker))
    status = Path(f"/proc/{marker.read_text()}/status")  # the first attempt's worker is gone (or a zombie)
    assert not status.exists() or "zombie" in status.read_text()
    same_files(tmp_path / "local", tmp_path / "ray", ("subset.npy", "decisions.parquet", "embeddings/img_emb/*.npy"))


def test_driver_killed_mid_job_resumes_to_the_same_output(pool, tmp_path):
    command = [sys.executable, "-m", "clipforge", "curate", "filter", str(pool / "pool"), "--model", str(pool / "tiny.safetensors"),
               "--clip-fraction", "0.4", "--workers", "1", "--out"]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([*command, str(tmp_path / "whole")], check=True, env=environment, capture_output=True)
    process = subprocess.Popen([*command, str(tmp_path / "killed")], env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when_written(process, tmp_path / "killed" / "embeddings" / "parts" / "part_0.json")
    assert not (tmp_path / "killed" / "subset.npy").exists()
    subprocess.run([*command, str(tmp_path / "killed")], check=True, env=environment, capture_output=True)
    same_files(tmp_path / "whole", tmp_path / "killed", OUTPUTS)
