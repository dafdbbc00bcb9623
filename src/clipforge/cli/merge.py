"""``clipforge merge``: soups, task arithmetic, TIES and OPCM over fine-tunes of one base (``clipforge.merge``).

    clipforge merge soup --base base.safetensors --models a.safetensors b.safetensors --out soup.safetensors

``--models`` may be left out (the models are the command's arguments); the base and every model are any
checkpoint ``clipforge.load`` reads. Held-out data (``--data``, any ``clipforge eval`` form; for the
synthetic world a validation split such as ``synthetic:shape@val``) chooses greedy soup's ingredients and
the scaling of task arithmetic and TIES.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from clipforge._util.progress import console
from clipforge.cli.options import (
    CheckpointOut,
    DeviceOption,
    SamplesOption,
    checked_checkpoint,
)
from clipforge.cli.tables import table as table_of

merge_app = typer.Typer(
    help="Merge fine-tunes of one base: model soups, task arithmetic, TIES, OPCM (continual).",
    no_args_is_help=True,
)

BaseOption = Annotated[str, typer.Option("--base", "-b", help="The checkpoint the models were fine-tuned from.")]
ModelsArgument = Annotated[list[str], typer.Argument(help="The fine-tuned checkpoints (in order of arrival for opcm).", show_default=False)]
ModelsMarker = Annotated[bool, typer.Option("--models", help="Optional marker before the models: --models A B C.")]
DataOption = Annotated[
    list[str] | None,
    typer.Option("--data", "-d", help="Held-out data: synthetic:TASK@val, a class-per-folder directory, a table or .tar shards (repeatable; scores are averaged)."),
]
ScalingOption = Annotated[float | None, typer.Option(help="λ; default: chosen on --data, else the method's default.")]


def register(app: typer.Typer) -> None:
    app.add_typer(merge_app, name="merge")


def _held_out(data: list[str] | None, samples: int, device: str) -> Any:
    """``clipforge.merge.HeldOut`` over the ``--data`` datasets, or None without any."""
    if not data:
        return None
    from clipforge.eval.datasets import load_dataset
    from clipforge.merge import HeldOut

    return HeldOut([load_dataset(spec, samples=samples) for spec in data], device=device)


def _merge(
    method: Any, base: str, models: list[str], out: Path, held_out: tuple[list[str] | None, int, str] | None = None, **settings: Any
) -> None:
    """Check ``--out`` before any model or data is read (it may be one of the models: OPCM continues a merge
    in place), read the held-out data of a method that takes it (``held_out``: --data, --samples, --device),
    run ``method`` and print its provenance."""
    note = checked_checkpoint(out, inputs=[base])
    if held_out is not None:
        settings["held_out"] = _held_out(*held_out)
    _summarise(method(base, models, out=out, progress=True, **settings), out, note)


def _summarise(model: Any, out: Path, note: str) -> None:
    """What was merged, and how, from the merged model's provenance."""
    merge = model.provenance["merge"]
    table = table_of("model", "fingerprint", *(["held-out acc", "kept"] if "order" in merge else []), title=f"{merge['method']} of {merge['base']}")
    for item in merge["ingredients"]:
        extra = [f"{item['held_out_accuracy']:.4f}", "yes" if item["kept"] else "no"] if "order" in merge else []
        table.add_row(item["source"], item["fingerprint"][:12], *extra)
    console.print(table)
    console.print(f"coefficients: {json.dumps(merge['coefficients'])}", soft_wrap=True, highlight=False)
    if "held_out_scores" in merge:
        console.print(f"held-out score per λ: {json.dumps(merge['held_out_scores'])}", soft_wrap=True, highlight=False)
    console.print(f"wrote {out}{note}", soft_wrap=True, highlight=False)


@merge_app.command("soup")
def soup_command(models: ModelsArgument, base: BaseOption, out: CheckpointOut, _marker: ModelsMarker = False) -> None:
    """Uniform soup (Wortsman et al., ICML 2022): the mean of two or more fine-tunes."""
    from clipforge.merge import uniform_soup

    _merge(uniform_soup, base, models, out)


@merge_app.command("greedy-soup")
def greedy_soup_command(
    models: ModelsArgument,
    base: BaseOption,
    out: CheckpointOut,
    data: DataOption = None,
    samples: SamplesOption = 1000,
    device: DeviceOption = "auto",
    _marker: ModelsMarker = False,
) -> None:
    """Greedy soup (Wortsman et al., ICML 2022): add fine-tunes, best first, while held-out accuracy does not drop."""
    from clipforge.errors import InputError
    from clipforge.merge import greedy_soup

    if not data:
        raise InputError("greedy-soup: --data is required (held-out data to choose the ingredients on)")
    _merge(greedy_soup, base, models, out, held_out=(data, samples, device), device=device)


@merge_app.command("task-arithmetic")
def task_arithmetic_command(
    models: ModelsArgument,
    base: BaseOption,
    out: CheckpointOut,
    scaling: ScalingOption = None,
    data: DataOption = None,
    samples: SamplesOption = 1000,
    device: DeviceOption = "auto",
    _marker: ModelsMarker = False,
) -> None:
    """Task arithmetic (Ilharco et al., ICLR 2023): θ₀ + λ Σ τᵢ, λ in (0, 1] chosen on --data (else 0.3)."""
    from clipforge.merge import task_arithmetic

    _merge(task_arithmetic, base, models, out, held_out=(data, samples, device), scaling=scaling)


@merge_app.command("ties")
def ties_command(
    models: ModelsArgument,
    base: BaseOption,
    out: CheckpointOut,
    keep: Annotated[float, typer.Option(help="Share of each task vector kept by magnitude, in (0, 1].")] = 0.2,
    scaling: ScalingOption = None,
    data: DataOption = None,
    samples: SamplesOption = 1000,
    device: DeviceOption = "auto",
    _marker: ModelsMarker = False,
) -> None:
    """TIES-merging (Yadav et al., NeurIPS 2023): trim, elect signs, disjoint mean; λ in (0, 3] chosen on --data (else 1)."""
    from clipforge.merge import ties

    _merge(ties, base, models, out, held_out=(data, samples, device), keep=keep, scaling=scaling)


@merge_app.command("opcm")
def opcm_command(
    models: ModelsArgument,
    base: BaseOption,
    out: CheckpointOut,
    alpha: Annotated[float, typer.Option(help="Share of the singular values whose directions count as the merged model's dominant subspace, in (0, 1].")] = 0.5,
    zero_diagonal: Annotated[bool, typer.Option(help="Also remove the components along each singular pair (fusion_bench since March 2025; off: the paper's first release).")] = True,
    device: DeviceOption = "auto",
    _marker: ModelsMarker = False,
) -> None:
    """OPCM (Tang et al., NeurIPS 2025): merge the models one at a time, in the order given, by orthogonal projection."""
    from clipforge.merge import opcm

    _merge(opcm, base, models, out, alpha=alpha, zero_diagonal=zero_diagonal, device=device)
