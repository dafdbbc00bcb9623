"""Incremental photo-folder indexing (rclip's rules): unchanged photos skipped by size and mtime, renamed or
moved ones recognised by content, deleted ones dropped; vectors checked against the model run directly."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from conftest import run_cli
from PIL import Image

import clipforge
from clipforge.cli import retrieval as retrieval_cli
from clipforge.data.synthetic import SyntheticWorld
from clipforge.errors import ConfigError, InputError
from clipforge.retrieval import EmbeddingStore
from clipforge.retrieval.embed import model_reference, store_info
from clipforge.retrieval.photos import update_photo_store

FLOAT16_TOLERANCE = 2e-3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, clipforge.CLIP]:
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    torch.manual_seed(2)
    clipforge.save(clipforge.load("synthetic-tiny"), path)
    return path, clipforge.load(path)


class CountingModel:
    """The model, counting the images it encodes."""

    def __init__(self, model: clipforge.CLIP) -> None:
        self.model, self.encoded = model, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def encode_image(self, pixels, normalize=False):
        self.encoded += len(pixels)
        return self.model.encode_image(pixels, normalize=normalize)


def picture(index: int) -> Image.Image:
    return SyntheticWorld().sample("train", index).image


def make_folder(root: Path) -> Path:
    """Six photos (two in a subfolder), plus photos in a hidden and an excluded folder that must be ignored."""
    for name, index in [("a.png", 0), ("b.png", 1), ("c.png", 2), ("d.png", 3), ("trip/e.png", 4), ("trip/f.png", 5),
                        (".hidden/x.png", 6), ("@eaDir/y.png", 7)]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        picture(index).save(root / name)
    return root


def stored(store: Path) -> dict[str, np.ndarray]:
    """Relative path → stored vector."""
    existing = EmbeddingStore(store)
    rows = existing.metadata(np.arange(existing.num_vectors))
    return dict(zip([row["uid"] for row in rows], existing.load_embeddings("img")))


def direct(model: clipforge.CLIP, path: Path) -> np.ndarray:
    with torch.no_grad():
        return model.encode_image(model.preprocess(Image.open(path))[None], normalize=True).numpy()[0]


def test_incremental_updates_embed_only_new_content(tmp_path, tiny):
    model_path, model = tiny
    reference = model_reference(str(model_path), None, None, "fp32")
    folder = make_folder(tmp_path / "Photos")
    counting = CountingModel(model)

    first = update_photo_store(folder, counting, reference, workers=0, progress=False)
    store = folder / ".clipforge"
    assert first.changed and counting.encoded == 6 and first.embedded == 6
    vectors = stored(store)
    assert sorted(vectors) == ["a.png", "b.png", "c.png", "d.png", "trip/e.png", "trip/f.png"]
    for name, vector in vectors.items():
        np.testing.assert_allclose(vector, direct(model, folder / name), atol=FLOAT16_TOLERANCE)
    assert store_info(store)["roots"] == [str(folder)]

    metadata_file = store / "metadata" / "metadata_0.parquet"
    stamp = (metadata_file.stat().st_ino, metadata_file.stat().st_mtime_ns)
    again = update_photo_store(folder, counting, reference, workers=0, progress=False)
    assert counting.encoded == 6 and not again.changed and again.unchanged == 6
    assert (metadata_file.stat().st_ino, metadata_file.stat().st_mtime_ns) == stamp  # nothing rewritten

    (folder / "trip" / "sub").mkdir()
    os.rename(folder / "a.png", folder / "trip" / "sub" / "renamed.png")
    os.utime(folder / "b.png", ns=(1, 1))  # touched: same content, new mtime
    picture(10).save(folder / "c.png")  # new content under an old name
    (folder / "d.png").unlink()
    picture(11).save(folder / "g.png")
    changed = update_photo_store(folder, counting, reference, workers=0, progress=False)
    assert counting.encoded == 8 and changed.embedded == 2  # c.png and g.png only
    counts = (changed.new, changed.modified, changed.unchanged, changed.touched, changed.moved, changed.removed)
    assert counts == (1, 1, 2, 1, 1, 1)  # g; c; e, f; b; a → renamed; d
    now = stored(store)
    assert sorted(now) == ["b.png", "c.png", "g.png", "trip/e.png", "trip/f.png", "trip/sub/renamed.png"]
    np.testing.assert_array_equal(now["trip/sub/renamed.png"], vectors["a.png"])
    np.testing.assert_array_equal(now["b.png"], vectors["b.png"])
    for name in ("c.png", "g.png"):
        np.testing.assert_allclose(now[name], direct(model, folder / name), atol=FLOAT16_TOLERANCE)

    moved = tmp_path / "Moved Photos"
    os.rename(folder, moved)
    relocated = update_photo_store(moved, counting, reference, workers=0, progress=False)
    assert counting.encoded == 8 and relocated.changed and relocated.unchanged == 6
    assert {name: v.tobytes() for name, v in stored(moved / ".clipforge").items()} == {name: v.tobytes() for name, v in now.items()}
    assert EmbeddingStore(moved / ".clipforge").metadata(np.array([0]))[0]["path"] == str(moved / "b.png")


def test_another_model_embeds_everything_again(tmp_path, tiny):
    model_path, model = tiny
    folder = make_folder(tmp_path / "Photos")
    first = model_reference(str(model_path), None, None, "fp32")
    update_photo_store(folder, model, first, workers=0, progress=False)
    counting = CountingModel(model)
    again = update_photo_store(folder, counting, model_reference(str(model_path), None, None, "bf16"), workers=0, progress=False)
    assert counting.encoded == 6 and again.previous_model == first  # the CLI says why everything is new


def test_an_interrupted_swap_is_repaired(tmp_path, tiny):
    model_path, model = tiny
    reference = model_reference(str(model_path), None, None, "fp32")
    folder = make_folder(tmp_path / "Photos")
    update_photo_store(folder, model, reference, workers=0, progress=False)
    before = stored(folder / ".clipforge")
    os.rename(folder / ".clipforge", folder / ".clipforge.old")  # killed between the two renames
    (folder / ".clipforge.new" / "img_emb").mkdir(parents=True)  # and a half-written new store
    counting = CountingModel(model)
    update = update_photo_store(folder, counting, reference, workers=0, progress=False)
    assert counting.encoded == 0 and not update.changed
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".clipforge")) == [".clipforge"]
    assert {k: v.tobytes() for k, v in stored(folder / ".clipforge").items()} == {k: v.tobytes() for k, v in before.items()}


def test_cli_index_and_search_a_photo_folder(tmp_path, tiny, capsys):
    model_path, model = tiny
    folder = make_folder(tmp_path / "Photos")
    shutil.copy(folder / "c.png", folder / "query.png")
    app = typer.Typer()
    app.callback()(lambda: None)  # a command group, as in ``clipforge.cli``
    retrieval_cli.register(app)
    app(["index", str(folder), "--model", str(model_path), "--workers", "0"], standalone_mode=False)
    assert "7 new" in capsys.readouterr().out
    app(["index", str(folder), "--workers", "0"], standalone_mode=False)  # the model recorded in the store
    out = capsys.readouterr().out
    assert "0 new, 0 changed, 7 unchanged" in out and "up to date" in out
    app(["search", str(folder / "query.png"), "--index", str(folder), "-k", "2", "--json"], standalone_mode=False)
    hits = capsys.readouterr().out
    assert sorted(Path(hit["path"]).name for hit in json.loads(hits)) == ["c.png", "query.png"]


def test_broken_links_are_listed_and_other_stores_are_never_replaced(tmp_path, tiny):
    model_path, model = tiny
    reference = model_reference(str(model_path), None, None, "fp32")
    folder = make_folder(tmp_path / "Photos")
    (folder / "gone.png").symlink_to(tmp_path / "nowhere.png")
    update = update_photo_store(folder, model, reference, workers=0, progress=False)
    assert update.embedded == 6 and [Path(photo).name for photo, _ in update.skipped] == ["gone.png"]
    other = tmp_path / "embeddings"
    other.mkdir()
    (other / "clipforge.json").write_text(json.dumps({"format": 1, "model": reference, "inputs": []}))
    with pytest.raises(ConfigError, match="not a photo folder"):
        update_photo_store(folder, model, reference, store=other, workers=0, progress=False)
    assert sorted(p.name for p in other.iterdir()) == ["clipforge.json"]


def test_search_from_a_subfolder_refreshes_first_and_answers_for_it_only(tmp_path, tiny, capsys, monkeypatch):
    """rclip's way: ``cd Photos/trip && clipforge search …`` sees moves and deletions made since the last index."""
    model_path, _ = tiny
    folder = make_folder(tmp_path / "Photos")
    app = typer.Typer()
    app.callback()(lambda: None)
    retrieval_cli.register(app)
    monkeypatch.chdir(folder / "trip")
    with pytest.raises(InputError, match="no embedding store here or in a folder above"):
        app(["search", "a red circle", "--workers", "0"], standalone_mode=False)
    app(["index", str(folder), "--model", str(model_path), "--workers", "0"], standalone_mode=False)
    capsys.readouterr()
    app(["search", "a red circle", "--workers", "0", "-f"], standalone_mode=False)  # from Photos/trip
    captured = capsys.readouterr()
    assert sorted(Path(line).name for line in captured.out.split()) == ["e.png", "f.png"] and not captured.err  # quiet: no change
    os.rename(folder / "c.png", folder / "trip" / "c.png")
    (folder / "trip" / "e.png").unlink()
    app(["search", "a red circle", "--workers", "0", "--paths-only", "-k", "10"], standalone_mode=False)
    captured = capsys.readouterr()
    assert sorted(captured.out.split()) == sorted([str(folder / "trip" / "c.png"), str(folder / "trip" / "f.png")])
    assert "0 new, 0 changed, 4 unchanged, 0 touched, 1 moved or renamed, 1 removed" in captured.err
    app(["search", "a red circle", "--index", str(folder), "--workers", "0", "-f", "--no-refresh"], standalone_mode=False)
    assert len(capsys.readouterr().out.split()) == 5  # the whole folder: a, b, d, trip/c, trip/f


def test_excluded_folders_are_left_out_and_dropped(tmp_path, tiny):
    model_path, model = tiny
    folder = make_folder(tmp_path / "Photos")
    reference = model_reference(str(model_path), None, None, "fp32")
    update_photo_store(folder, model, reference, workers=0, progress=False)
    update = update_photo_store(folder, model, reference, workers=0, progress=False, exclude_dirs=["trip"])
    assert (update.unchanged, update.removed) == (4, 2)
    assert sorted(stored(folder / ".clipforge")) == ["a.png", "b.png", "c.png", "d.png"]


def test_unreadable_photos_are_reported_once_and_not_read_again(tmp_path, tiny, capsys):
    model_path, _ = tiny
    folder = make_folder(tmp_path / "Photos")
    (folder / "corrupt.png").write_bytes(b"\x89PNG not really")
    code, _, err = run_cli(capsys, "index", folder, "--model", model_path, "--workers", "0")
    assert code == 0 and err.count("corrupt.png") == 1
    search = ("search", "a red circle", "--index", folder, "--workers", "0", "-f")
    code, out, err = run_cli(capsys, *search)
    assert code == 0 and len(out.split()) == 6 and not err  # nothing changed: quiet, and corrupt.png is not decoded again
    (folder / "worse.png").write_bytes(b"\x89PNG not either")
    code, _, err = run_cli(capsys, *search)
    assert code == 0 and "worse.png" in err and "2 unreadable" in err  # a new problem is said once
    code, _, err = run_cli(capsys, *search)
    assert code == 0 and not err
    code, _, err = run_cli(capsys, "index", folder, "--workers", "0")  # index lists them every time
    assert code == 0 and err.count("corrupt.png") == 1 and err.count("worse.png") == 1


@pytest.mark.parametrize("content", [{}, {"corrupt.png": b"\x89PNG not really"}])
def test_a_folder_without_a_readable_photo_is_refused_in_one_line(tmp_path, tiny, capsys, content):
    model_path, _ = tiny
    folder = tmp_path / "Empty"
    folder.mkdir()
    for name, data in content.items():
        (folder / name).write_bytes(data)
    code, out, err = run_cli(capsys, "index", folder, "--model", model_path, "--workers", "0")
    line = err.splitlines()[-1]  # after the progress bar of the photos it tried
    assert code == 2 and not out and err.count("error:") == 1 and line.startswith("error:")
    assert str(folder) in line and "no readable images" in line and all(name in line for name in content)
    assert sorted(path.name for path in folder.iterdir()) == sorted(content)  # no store made
