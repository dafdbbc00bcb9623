"""Fixtures shared by the test modules."""

from __future__ import annotations

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
