"""Options shared by the ``clipforge`` commands, and the one way a command loads a model.

Each ``Annotated`` type is one option as users see it (flag, short flag, help); a command declares it as
``config: ConfigOption = None`` and gives the default in its own signature. Options one command alone takes
stay in that command. Nothing here imports torch or the model code at import time, so ``clipforge --help``
stays fast.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

ModelOption = Annotated[str, typer.Option("--model", "-m", help="Checkpoint, Hugging Face or export directory, or config name.")]
ConfigOption = Annotated[str | None, typer.Option(help="Config for a bare state dict.")]
PretrainedOption = Annotated[str | None, typer.Option(help="open_clip pretrained tag when --model is a config name.")]
PrecisionOption = Annotated[str, typer.Option(help="fp32 | bf16 | fp16.")]
def resolve_device(device: str) -> str:
    """``auto``: this process's GPU (its torchrun rank's, ``LOCAL_RANK``) when there is one, else ``cpu``."""
    if device != "auto":
        return device
    import torch

    return f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"


DeviceOption = Annotated[
    str, typer.Option(callback=resolve_device, help="cpu, cuda, cuda:1, ... or auto: the GPU if there is one, else cpu.")
]
CheckpointOut = Annotated[Path, typer.Option("--out", "-o", help="Output .safetensors checkpoint (records the method).")]
SetOption = Annotated[list[str] | None, typer.Option("--set", help="Any setting of the method: --set key=value (JSON values; repeatable).")]
TrainSetOption = Annotated[list[str] | None, typer.Option("--set", help="Override a training field: --set optimizer.lr=1e-3 (repeatable).")]
BatchSizeOption = Annotated[int, typer.Option(min=1)]
WorkersOption = Annotated[int | None, typer.Option(min=0, help="Decoding processes (default: cores - 1, at most 4).")]
SamplesOption = Annotated[int, typer.Option(min=1, help="Images per synthetic split.")]
TomeOption = Annotated[int | None, typer.Option("--tome", min=0, help="ToMe token merging: merge R tokens per image block.")]
CompressOption = Annotated[
    list[str] | None,
    typer.Option("--compress", help="A compression step, e.g. pitome:keep_ratio=0.9, bf16, int8 (repeatable; see clipforge compress)."),
]


def compression_options(tome: int | None, compress: list[str] | None) -> list[dict[str, Any]]:
    """The steps of ``--tome R`` and each ``--compress SPEC``, in that order."""
    from clipforge.compress.records import make_step, parse_step

    return ([make_step("tome", r=tome)] if tome else []) + [parse_step(spec) for spec in compress or []]


def load_model(
    model: str,
    config: str | None = None,
    pretrained: str | None = None,
    precision: str = "fp32",
    device: str = "cpu",
    steps: Sequence[dict[str, Any]] = (),
) -> Any:
    """``clipforge.load`` of ``--model`` (with ``--config``, ``--pretrained``, ``--precision``), then the
    compression ``steps`` (``compression_options``) on top of those the checkpoint records. An export
    directory (``clipforge compress onnx|openvino``) loads on the CPU."""
    import clipforge
    from clipforge.compress.exported import is_export_dir
    from clipforge.compress.records import apply_steps

    if is_export_dir(model):
        device = "cpu"  # onnxruntime and OpenVINO exports run on the CPU whatever --device auto found
    loaded = clipforge.load(model, config=config, precision=precision, pretrained=pretrained, device=device)
    return apply_steps(loaded, steps)


def checked_output(
    path: Path, *, directory: bool = False, option: str = "--out", inputs: Sequence[str | os.PathLike[str] | None] = ()
) -> str:
    """Check, before any work starts, that the command can write ``path``; return a note for its summary line.

    Refused with a ``ConfigError`` naming ``option``: the path of one of the ``inputs`` (the result would replace
    its own source), a directory where a file goes or a file where a directory goes, and a place this process
    cannot write (tried with a temporary file, so a read-only mount is caught too). An existing file is replaced
    (atomically, when the work is done): the note says so, for the command to print.
    """
    from clipforge.errors import ConfigError

    target = path.expanduser()
    for given in inputs:
        if given is not None and Path(given).exists() and Path(given).resolve() == target.resolve():
            raise ConfigError(f"{option} {path}: is also the input {given}; write the result to another path")
    if directory and target.exists() and not target.is_dir():
        raise ConfigError(f"{option} {path}: is a file; give a directory")
    if not directory and target.is_dir():
        raise ConfigError(f"{option} {path}: is a directory; give a file name")
    ancestor = next(p for p in (target if directory else target.parent, *target.parents) if p.exists())
    if not ancestor.is_dir():
        raise ConfigError(f"{option} {path}: {ancestor} is a file, so nothing can be written under it")
    try:
        handle, probe = tempfile.mkstemp(dir=ancestor, prefix=".clipforge-write-check-")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise ConfigError(f"{option} {path}: cannot write in {ancestor} ({error.strerror or error})") from None
    return " (replaced the existing file)" if not directory and target.is_file() else ""


def checked_checkpoint(path: Path, option: str = "--out", inputs: Sequence[str] = ()) -> str:
    """``checked_output`` of a file clipforge writes as safetensors (a checkpoint, an adapter, exit heads), which
    must be named ``*.safetensors``: named otherwise it passes for another format (``.json`` loads as a model
    config, ``.pt``/``.onnx`` mislead every other tool)."""
    from clipforge.errors import ConfigError

    note = checked_output(path, option=option, inputs=inputs)
    if path.suffix != ".safetensors":
        raise ConfigError(f"{option} {path}: clipforge writes a .safetensors file here; end the name with .safetensors")
    return note


def on_first_rank() -> bool:
    """False in every process of a ``torchrun`` job but rank 0, so that a job's summary is printed once."""
    from clipforge.train.distributed import world_info_from_env

    return world_info_from_env().rank == 0
