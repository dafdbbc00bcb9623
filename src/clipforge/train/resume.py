"""Atomic training checkpoints with exact resume: weights, optimizer, step, RNG and data position.

Layout of a run directory::

    run/checkpoints/step_000200/model.safetensors   # a normal clipforge checkpoint (loadable anywhere)
    run/checkpoints/step_000200/state.pt            # optimizer, step, torch RNG, data position, objective state
    run/checkpoints/step_000600/result.json         # the last step's only: the finished run's figures
    run/checkpoints/latest                          # name of the newest complete checkpoint

A checkpoint directory is written under a temporary name and renamed into place, and ``latest`` is
replaced atomically afterwards, so a kill at any moment leaves the previous checkpoint usable. The last
step's checkpoint is written after the final evaluation, with the run's figures (``result.json``), so it marks
the run finished: rerunning a finished run reports them and trains and evaluates nothing again.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clipforge._util.fileio import atomic_path
from clipforge.errors import CheckpointError, one_line
from clipforge.io.checkpoint import write_checkpoint
from clipforge.models.clip import CLIP

RESULT_FILE = "result.json"


@dataclass
class ResumeState:
    step: int
    optimizer: dict[str, Any]
    data_position: dict[str, Any]
    rng: dict[str, torch.Tensor]
    model_path: Path
    objective: dict[str, Any]  # the training objective's own state (``Objective.state_dict``)
    result: dict[str, Any] | None  # the finished run's figures, in its last checkpoint only


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: CLIP,
    optimizer: torch.optim.Optimizer,
    data_position: dict[str, Any],
    keep: int,
    objective: dict[str, Any] | None = None,
    result: dict[str, Any] | None = None,
) -> Path:
    """Write the checkpoint of ``step``; ``result`` (the figures of a finished run) marks it as the run's end."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}."))
    try:
        write_checkpoint(model, staging / "model.safetensors", provenance={"trained_steps": step})
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "data_position": data_position,
            "rng": _rng_state(),
            "objective": objective or {},
        }
        torch.save(state, staging / "state.pt")
        if result is not None:
            (staging / RESULT_FILE).write_text(json.dumps(result, indent=1) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    with atomic_path(root / "latest") as tmp:
        tmp.write_text(final.name + "\n")
    _prune(root, keep)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / "state.pt").is_file() else None


def load_resume_state(checkpoint_dir: Path) -> ResumeState:
    try:
        state = torch.load(checkpoint_dir / "state.pt", map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure means the same thing to the user
        raise CheckpointError(f"{checkpoint_dir / 'state.pt'}: unreadable training state ({type(error).__name__})") from None
    result = checkpoint_dir / RESULT_FILE
    try:
        figures = json.loads(result.read_text()) if result.is_file() else None
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{result}: unreadable figures of a finished run ({one_line(error)}); --no-resume trains it again") from None
    return ResumeState(
        state["step"], state["optimizer"], state["data_position"], state["rng"], checkpoint_dir / "model.safetensors",
        state.get("objective", {}), figures,
    )


def restore_rng(rng: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(rng["cuda"]))


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def _prune(root: Path, keep: int) -> None:
    for old in sorted(root.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
