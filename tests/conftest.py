"""Fixtures shared by the test modules."""

from __future__ import annotations

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
