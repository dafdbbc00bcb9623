"""The ``clipforge`` command line: one typer app, one module per verb group.

Errors a user can act on (``ClipforgeError``) print as one red line and exit with status 2; they never
reach the user as a traceback. Help follows the usual Unix conventions (``-h``, ``--version``, placeholders
named after their option: ``--model MODEL``, arguments in capitals, flags without one).
"""

from __future__ import annotations

import sys

import click
import typer

from clipforge._util.progress import error_console, fail
from clipforge.cli import adapt as adapt_cli
from clipforge.cli import classify as classify_cli
from clipforge.cli import compress as compress_cli
from clipforge.cli import curate as curate_cli
from clipforge.cli import data as data_cli
from clipforge.cli import distill as distill_cli
from clipforge.cli import embed as embed_cli
from clipforge.cli import evaluate as evaluate_cli
from clipforge.cli import merge as merge_cli
from clipforge.cli import models as models_cli
from clipforge.cli import retrieval as retrieval_cli
from clipforge.cli import train as train_cli
from clipforge.errors import ClipforgeError, one_line

app = typer.Typer(
    name="clipforge",
    help="Train, compress, adapt, merge, evaluate, index and serve CLIP-ViT models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        from clipforge import __version__

        print(f"clipforge {__version__}")
        raise typer.Exit()


@app.callback()
def _top_level(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version, help="Print clipforge's version and exit."),
) -> None:
    """Train, compress, adapt, merge, evaluate, index and serve CLIP-ViT models."""

models_cli.register(app)
data_cli.register(app)
curate_cli.register(app)
embed_cli.register(app)
train_cli.register(app)
distill_cli.register(app)
retrieval_cli.register(app)
evaluate_cli.register(app)
classify_cli.register(app)
compress_cli.register(app)
adapt_cli.register(app)
merge_cli.register(app)


def conventional_placeholders(command: click.Command) -> click.Command:
    """Name every value placeholder after its parameter (``--labels-file LABELS_FILE``, ``IMAGES``) and give flags
    none, in ``command`` and all its subcommands (typer 0.29 labels options by Python type: ``<list[str]>``)."""
    for param in command.params:
        if param.param_type_name == "argument":
            param.metavar = param.name.upper()
        elif param.param_type_name == "option" and not param.is_flag and not param.count:
            longest = max(param.opts, key=len).lstrip("-")
            param.metavar = longest.upper().replace("-", "_")
    for sub in getattr(command, "commands", {}).values():
        conventional_placeholders(sub)
    return command


def main(argv: list[str] | None = None) -> None:
    try:
        command = conventional_placeholders(typer.main.get_command(app))
        code = command.main(args=argv, prog_name="clipforge", standalone_mode=False)
    except ClipforgeError as error:
        fail(str(error))
        sys.exit(2)
    except OSError as error:  # a file system failure the checks could not foresee (disk full, a file removed meanwhile)
        fail(f"{error.filename}: {error.strerror}" if error.filename and error.strerror else one_line(error))
        sys.exit(2)
    except typer.TyperException as error:  # usage errors (typer's own click): one line naming the option
        context = getattr(error, "ctx", None)
        if type(error).__name__ == "NoArgsIsHelpError" or not hasattr(error, "format_message"):
            error.show()  # type: ignore[attr-defined]  # a bare group: its help
        else:
            where = f" (see '{context.command_path} --help')" if context is not None else ""
            fail(f"{error.format_message()}{where}")
        sys.exit(getattr(error, "exit_code", 2))
    except typer.Abort:
        error_console.print("aborted")
        sys.exit(1)
    except KeyboardInterrupt:
        error_console.print("interrupted")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
