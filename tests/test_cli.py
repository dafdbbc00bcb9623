"""The command line: verbs listed, bad input as one line (exit 2), conversions that round-trip."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import run_cli as run
from PIL import Image

import clipforge
from clipforge.retrieval.inputs import read_embeddings

VERBS = ("models", "info", "convert", "embed", "train", "distill", "demo", "data", "curate", "index", "search", "serve", "eval", "explain", "compress")



def test_help_lists_the_verbs() -> None:
    result = subprocess.run([sys.executable, "-m", "clipforge", "--help"], capture_output=True, text=True, check=True)
    for verb in VERBS:
        assert verb in result.stdout


def test_the_command_line_loads_no_model_code_until_a_command_runs() -> None:
    """``clipforge --help`` stays fast: the CLI modules and their shared options (cli/options.py) import no torch."""
    code = "import sys, clipforge.cli; print([m for m in ('torch', 'clipforge.api', 'clipforge.compress') if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_models_lists_configs_and_tags(capsys) -> None:
    code, out, _ = run(capsys, "models", "--pretrained")
    assert code == 0 and "ViT-bigG-14" in out and "laion2b_s34b_b79k" in out


def test_convert_to_hf_and_back(tmp_path, capsys) -> None:
    torch.manual_seed(0)
    model = clipforge.load("synthetic-tiny")
    clipforge.save(model, tmp_path / "tiny.safetensors")
    code, _, err = run(capsys, "convert", str(tmp_path / "tiny.safetensors"), str(tmp_path / "hf"), "--to", "hf")
    assert code == 0, err
    code, _, err = run(capsys, "convert", str(tmp_path / "hf"), str(tmp_path / "back.safetensors"))
    assert code == 0, err
    back = clipforge.load(tmp_path / "back.safetensors")
    for key, value in model.state_dict().items():
        assert torch.equal(value, back.state_dict()[key]), key
    code, out, _ = run(capsys, "info", str(tmp_path / "back.safetensors"))
    assert code == 0 and '"activation": "gelu"' in out


def test_embed_images_skips_bad_files_and_strict_fails(tmp_path, capsys) -> None:
    torch.manual_seed(0)
    clipforge.save(clipforge.load("synthetic-tiny"), tmp_path / "tiny.safetensors")
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (80, 60), "red").save(folder / "red.png")
    Image.new("L", (50, 90), 128).save(folder / "gray.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    out = tmp_path / "emb.parquet"
    code, _, err = run(capsys, "embed", str(folder), "--model", str(tmp_path / "tiny.safetensors"), "--out", str(out), "--workers", "0")
    assert code == 0
    assert "broken.jpg" in err and "Traceback" not in err
    sources, vectors = read_embeddings(out)
    assert sorted(s.rsplit("/", 1)[1] for s in sources) == ["gray.jpg", "red.png"]
    assert vectors.shape == (2, 128)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    code, _, err = run(capsys, "embed", str(folder), "--model", str(tmp_path / "tiny.safetensors"), "--out", str(out), "--strict", "--workers", "0")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "broken.jpg" in errors[0] and "Traceback" not in err


def test_embed_text_matches_the_library(tmp_path, capsys) -> None:
    torch.manual_seed(0)
    model = clipforge.load("synthetic-tiny")
    clipforge.save(model, tmp_path / "tiny.safetensors")
    out = tmp_path / "text.parquet"
    code, _, err = run(capsys, "embed", "--text", "a red circle", "two blue stars", "--model", str(tmp_path / "tiny.safetensors"), "--out", str(out))
    assert code == 0, err
    sources, vectors = read_embeddings(out)
    assert sources == ["a red circle", "two blue stars"]
    with torch.no_grad():
        expected = model.encode_text(model.tokenize(sources), normalize=True)
    assert np.allclose(vectors, expected.numpy(), atol=1e-6)


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["info", "/nonexistent/model.pt"], "/nonexistent/model.pt"),
        (["convert", "synthetic-tiny", "/tmp/x", "--to", "onnx"], "--to"),
        (["embed", "/nonexistent/folder", "--model", "synthetic-tiny", "--out", "/tmp/e.parquet"], "/nonexistent/folder"),
        (["embed", "--text", "", "--model", "synthetic-tiny", "--out", "/tmp/e.parquet"], "text #0"),
    ],
)
def test_bad_input_is_one_line(capsys, argv: list[str], needle: str) -> None:
    code, _, err = run(capsys, *argv)
    assert code == 2 and needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_data_synth_writes_shards_and_resumes(tmp_path, capsys) -> None:
    import tarfile

    out = tmp_path / "shards"
    code, stdout, err = run(capsys, "data", "synth", "--out", str(out), "--n", "25", "--shard-size", "10", "--image-size", "32")
    assert code == 0, err
    shards = sorted(out.glob("*.tar"))
    assert len(shards) == 3
    with tarfile.open(shards[-1]) as tar:
        names = tar.getnames()
    assert len([n for n in names if n.endswith(".txt")]) == 5 and len([n for n in names if n.endswith(".png")]) == 5
    code, stdout, _ = run(capsys, "data", "synth", "--out", str(out), "--n", "25", "--shard-size", "10", "--image-size", "32")
    assert code == 0 and "0 written, 3 already complete" in " ".join(stdout.split())


def test_atomic_writes_have_normal_permissions(tmp_path) -> None:
    import os

    from clipforge._util.fileio import atomic_path

    with atomic_path(tmp_path / "a.txt") as tmp:
        tmp.write_text("x")
    (tmp_path / "b.txt").write_text("x")
    assert os.stat(tmp_path / "a.txt").st_mode == os.stat(tmp_path / "b.txt").st_mode


def test_usage_errors_are_a_usage_line_not_a_traceback(capsys) -> None:
    code, _, err = run(capsys, "models", "--no-such-option")
    assert code == 2 and "No such option: --no-such-option" in err and "Traceback" not in err
    code, _, err = run(capsys, "compress", "tome", "--model", "synthetic-tiny", "--out", "x.safetensors", "--r", "-1")
    assert code == 2 and "--r" in err and "Traceback" not in err
