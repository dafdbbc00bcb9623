"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import clipforge


@pytest.fixture(scope="module")
def tiny() -> clipforge.CLIP:
    """The demo's ``synthetic-tiny`` config with seeded random weights (eval mode), one per test module."""
    torch.manual_seed(0)
    return clipforge.load("synthetic-tiny")


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
