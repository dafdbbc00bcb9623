"""The ``clipforge`` command line: one typer app, one module per verb group.

Errors a user can act on (``ClipforgeError``) print as one red line and exit with status 2; they never
reach the user as a traceback.
"""

from __future__ import annotations

import sys

import typer

from clipforge._util.progress import error_console, fail
from clipforge.cli import adapt as adapt_cli
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
    rich_markup_mode="rich",
)
models_cli.register(app)
data_cli.register(app)
curate_cli.register(app)
embed_cli.register(app)
train_cli.register(app)
distill_cli.register(app)
retrieval_cli.register(app)
evaluate_cli.register(app)
compress_cli.register(app)
adapt_cli.register(app)
merge_cli.register(app)


def main(argv: list[str] | None = None) -> None:
    try:
        code = app(args=argv, prog_name="clipforge", standalone_mode=False)
    except ClipforgeError as error:
        fail(str(error))
        sys.exit(2)
    except OSError as error:  # a file system failure the checks could not foresee (disk full, a file removed meanwhile)
        fail(f"{error.filename}: {error.strerror}" if error.filename and error.strerror else one_line(error))
        sys.exit(2)
    except typer.TyperException as error:  # usage errors (typer's own click): a usage line, not a traceback
        error.show()  # type: ignore[attr-defined]
        sys.exit(getattr(error, "exit_code", 2))
    except typer.Abort:
        error_console.print("aborted")
        sys.exit(1)
    except KeyboardInterrupt:
        error_console.print("interrupted")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
