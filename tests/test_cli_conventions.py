"""Help and version follow the Unix conventions users expect, for every verb, at 80 columns."""

from __future__ import annotations

import importlib.metadata

import pytest
import typer
from conftest import run_cli as run

from clipforge.cli import app, main


def verbs(command=None, prefix=()) -> list[tuple[str, ...]]:
    """Every runnable command path: ("eval",), ("merge", "soup"), ..."""
    command = command or typer.main.get_command(app)
    found = []
    for name, sub in getattr(command, "commands", {}).items():
        path = (*prefix, name)
        found.extend(verbs(sub, path) if hasattr(sub, "commands") else [path])
    return found



def test_version_is_the_installed_distributions(capsys) -> None:
    assert run(capsys, "--version")[:2] == (0, f"clipforge {importlib.metadata.version('clipforge')}\n")


@pytest.mark.parametrize("path", verbs(), ids="-".join)
def test_help_of_every_verb_is_conventional_at_80_columns(capsys, monkeypatch, path: tuple[str, ...]) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    code, short, _ = run(capsys, *path, "-h")
    assert code == 0 and short == run(capsys, *path, "--help")[1]
    lines = short.splitlines()
    assert max(map(len, lines)) <= 80, "a help line is wider than 80 columns"
    options = short[short.index("Options:") :]
    for label in ("<bool>", "<str>", "<int", "<path>", "<float", "<list"):
        assert label not in options, f"{' '.join(path)}: option placeholder {label}"
    assert "…" not in short


# ---------------------------------------------------------------- errors that name their fix


@pytest.fixture(scope="module")
def store_without_index(tmp_path_factory):
    import numpy as np
    import torch
    from PIL import Image

    import clipforge

    root = tmp_path_factory.mktemp("store")
    torch.manual_seed(0)
    clipforge.save(clipforge.load("synthetic-tiny"), root / "tiny.safetensors")
    (root / "photos").mkdir()
    for number in range(3):
        Image.fromarray(np.full((32, 32, 3), 60 * number, np.uint8)).save(root / "photos" / f"{number}.png")
    with pytest.raises(SystemExit) as exit_info:
        main(["embed", str(root / "photos"), "-m", str(root / "tiny.safetensors"), "-o", str(root / "store")])
    assert exit_info.value.code == 0
    return root


@pytest.mark.parametrize(
    ("argv", "fix"),
    [
        (["search", "a dog", "--index", "{store}"], "build it with clipforge index {store}"),
        (["search", "a dog", "--index", "{store}", "--kind", "text"], "embed the captions too (clipforge embed ... --captions), then run clipforge index {store} --kind text"),
        (["serve", "--index", "{store}"], "build it with clipforge index {store}"),
        (["index", "{photos}", "--model", "synthetic-tiny"], "clipforge convert SOURCE model.safetensors"),
    ],
)
def test_errors_name_the_command_that_fixes_them(store_without_index, capsys, argv: list[str], fix: str) -> None:
    places = {"store": store_without_index / "store", "photos": store_without_index / "photos"}
    with pytest.raises(SystemExit) as exit_info:
        main([part.format(**places) for part in argv])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and not captured.out.strip()  # serve announces nothing
    assert captured.err.count("\n") == 1 and fix.format(**places) in captured.err


def test_linear_probe_without_training_images_fails_before_encoding(store_without_index, capsys, tmp_path) -> None:
    """The test images include an unreadable one: encoding them first would fail on it instead."""
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "broken.png").write_bytes(b"not an image")
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "linear-probe", "-m", str(store_without_index / "tiny.safetensors"), "--data", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "give the training images with --train-data" in err


# ---------------------------------------------------------------- offline --pretrained


@pytest.mark.parametrize("how", ["no route to the Hub", "HF_HUB_OFFLINE"])
def test_offline_pretrained_request_fails_at_once_naming_the_file(tmp_path, monkeypatch, how: str) -> None:
    import socket
    import time

    import huggingface_hub

    import clipforge
    from clipforge.errors import CheckpointError

    monkeypatch.setenv("CLIPFORGE_CACHE", str(tmp_path / "clipforge"))
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    if how == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def unreachable(*args, **kwargs):
        raise OSError(101, "Network is unreachable")

    def must_not_download(*args, **kwargs):
        raise AssertionError("the Hub client was asked to download while offline")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", must_not_download)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *args, **kwargs: None)  # nothing cached here
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match="weights not cached and .*fetch https://huggingface.co/.*open_clip"):
        clipforge.load("ViT-B-32", pretrained="laion2b_s34b_b79k")
    assert time.perf_counter() - started < 5


# ---------------------------------------------------------------- tables at 80 columns


@pytest.mark.parametrize(
    "argv",
    [
        ["models"],
        ["models", "--pretrained"],
        ["eval", "zeroshot,retrieval", "-m", "synthetic-tiny", "--data", "synthetic:shape_color", "--samples", "32", "-o", "{tmp}"],
    ],
    ids=["models", "models-pretrained", "eval"],
)
def test_tables_are_whole_at_80_columns(capsys, monkeypatch, tmp_path, argv: list[str]) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = run(capsys, *(part.format(tmp=tmp_path) for part in argv))
    assert code == 0
    shown = [line for line in out.splitlines() if not line.startswith("results: ")]  # a path to copy stays whole
    assert max(map(len, shown)) <= 80 and "…" not in out
    if argv[0] == "eval":
        assert "image_retrieval_recall@1" in out  # the longest metric name, whole
