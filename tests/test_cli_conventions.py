"""Help and version follow the Unix conventions users expect, for every verb, at 80 columns."""

from __future__ import annotations

import importlib.metadata

import pytest
import typer

from clipforge.cli import app, main


def verbs(command=None, prefix=()) -> list[tuple[str, ...]]:
    """Every runnable command path: ("eval",), ("merge", "soup"), ..."""
    command = command or typer.main.get_command(app)
    found = []
    for name, sub in getattr(command, "commands", {}).items():
        path = (*prefix, name)
        found.extend(verbs(sub, path) if hasattr(sub, "commands") else [path])
    return found


def run(capsys, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    return exit_info.value.code, capsys.readouterr().out


def test_version_is_the_installed_distributions(capsys) -> None:
    assert run(capsys, "--version") == (0, f"clipforge {importlib.metadata.version('clipforge')}\n")


@pytest.mark.parametrize("path", verbs(), ids="-".join)
def test_help_of_every_verb_is_conventional_at_80_columns(capsys, monkeypatch, path: tuple[str, ...]) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    code, short = run(capsys, *path, "-h")
    assert code == 0 and short == run(capsys, *path, "--help")[1]
    lines = short.splitlines()
    assert max(map(len, lines)) <= 80, "a help line is wider than 80 columns"
    options = short[short.index("Options:") :]
    for label in ("<bool>", "<str>", "<int", "<path>", "<float", "<list"):
        assert label not in options, f"{' '.join(path)}: option placeholder {label}"
    assert "…" not in short
