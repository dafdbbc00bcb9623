"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

import clipforge


@pytest.fixture(scope="module")
def tiny() -> clipforge.CLIP:
    """The demo's ``synthetic-tiny`` config with seeded random weights (eval mode), one per test module."""
    torch.manual_seed(0)
    return clipforge.load("synthetic-tiny")


@pytest.fixture(scope="module")
def one_thread():
    """Micro models train several times faster on one thread than on a busy machine's cores (use per module)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def kill_when_written(process: subprocess.Popen, path: Path, timeout: float = 300) -> None:
    """SIGKILL ``process`` as soon as ``path`` exists (it must still be running then)."""
    deadline = time.time() + timeout
    while not path.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()


def run_cli(capsys, *argv: object) -> tuple[int, str, str]:
    """``clipforge ARGV...`` in this process: its exit code, stdout and stderr."""
    from clipforge.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory) -> clipforge.CLIP:
    """The trained demo model (slow tests): ``$CLIPFORGE_DEMO_MODEL``, else ``runs/demo/model.safetensors``, else
    trained here with ``clipforge demo`` (several minutes)."""
    default = Path(__file__).resolve().parents[1] / "runs" / "demo" / "model.safetensors"
    checkpoint = Path(os.environ.get("CLIPFORGE_DEMO_MODEL", default))
    if not checkpoint.is_file():
        from clipforge.demo import run_demo

        checkpoint = Path(run_demo(tmp_path_factory.mktemp("demo"))["run_dir"]) / "model.safetensors"
    return clipforge.load(checkpoint)
