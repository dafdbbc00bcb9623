"""Embedding jobs into a clip-retrieval store: inputs, parts, captions, rank split, resume after SIGKILL.

Every stored vector is checked against the model run directly on the decoded image (``model.preprocess``
then ``encode_image``), every caption vector against ``encode_text``.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from PIL import Image

import clipforge
from clipforge.cli import embed as embed_cli
from clipforge.data.synthetic import SyntheticWorld
from clipforge.errors import ConfigError, InputError
from clipforge.retrieval import EmbeddingStore
from clipforge.retrieval.embed import (
    embed_to_store,
    load_model,
    model_reference,
    plan_parts,
    record_path,
    store_info,
)

FLOAT16_TOLERANCE = 2e-3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, clipforge.CLIP]:
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    torch.manual_seed(0)
    clipforge.save(clipforge.load("synthetic-tiny"), path)
    return path, clipforge.load(path)


def write_images(folder: Path, count: int, start: int = 0, captions: bool = False) -> list[Path]:
    """Synthetic-world pictures ``start … start+count-1`` as PNG files (with their captions as .txt)."""
    world = SyntheticWorld()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(start, start + count):
        sample = world.sample("train", index)
        path = folder / f"img{index:03d}.png"
        sample.image.save(path)
        if captions:
            path.with_suffix(".txt").write_text(sample.caption)
        paths.append(path)
    return paths


def write_shard(shard: Path, first: int, count: int) -> list:
    """A webdataset shard of synthetic-world samples ``first, …`` (``s0000.jpg`` + ``s0000.txt``, …); the samples."""
    samples = [SyntheticWorld().sample("train", first + i) for i in range(count)]
    shard.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(shard, "w") as tar:
        for i, sample in enumerate(samples):
            buffer = io.BytesIO()
            sample.image.save(buffer, format="JPEG", quality=90)
            for name, data in ((f"s{i:04d}.jpg", buffer.getvalue()), (f"s{i:04d}.txt", sample.caption.encode())):
                member = tarfile.TarInfo(name)
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    return samples


def expected_image_vectors(model: clipforge.CLIP, images: list[Image.Image]) -> np.ndarray:
    with torch.no_grad():
        return model.encode_image(torch.stack([model.preprocess(image) for image in images]), normalize=True).numpy()


def expected_text_vectors(model: clipforge.CLIP, texts: list[str]) -> np.ndarray:
    with torch.no_grad():
        return model.encode_text(model.tokenize(texts), normalize=True).numpy()


def reference(model_path: Path) -> dict:
    return model_reference(str(model_path), None, None, "fp32")


def test_folder_manifest_and_shard_with_captions(tmp_path, tiny):
    model_path, model = tiny
    folder_images = write_images(tmp_path / "folder", 5, captions=True)
    (tmp_path / "folder" / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "folder" / "broken.txt").write_text("a broken picture")
    manifest_images = write_images(tmp_path / "listed" / "pics", 3, start=10)
    manifest_captions = ["first listed", "second listed", "third listed"]
    manifest = tmp_path / "listed" / "list.csv"
    manifest.write_text("image,caption\n" + "".join(f"pics/{p.name},{c}\n" for p, c in zip(manifest_images, manifest_captions)))
    shard = tmp_path / "shards" / "00000.tar"
    shard_samples = write_shard(shard, first=20, count=4)

    out = tmp_path / "store"
    report = embed_to_store(
        model, reference(model_path), [tmp_path / "folder", manifest, shard], out,
        part_size=2, batch_size=2, workers=0, captions=True, progress=False,
    )
    # folder: 6 files → parts 0-2; manifest: 3 rows → parts 3-4; the shard is part 5
    assert report.num_parts == 6 and report.written == list(range(6)) and report.rows == 12
    assert [Path(image).name for image, _ in report.skipped] == ["broken.png"]
    assert json.loads(record_path(out, 0).read_text())["skipped"][0]["image"].endswith("broken.png")

    store = EmbeddingStore(out)
    assert store.kinds == ("img", "text") and store.num_vectors == 12
    rows = store.metadata(np.arange(12))
    shard_images = [Image.open(io.BytesIO(tar_bytes)) for tar_bytes in _shard_images(shard)]
    images = [Image.open(p) for p in folder_images + manifest_images] + shard_images
    captions = [p.with_suffix(".txt").read_text() for p in folder_images] + manifest_captions + [s.caption for s in shard_samples]
    assert [row["caption"] for row in rows] == captions
    assert [row["path"] for row in rows[:8]] == [str(p.absolute()) for p in folder_images + manifest_images]
    assert [row["uid"] for row in rows[8:]] == [f"s{i:04d}" for i in range(4)]
    assert all(row["path"] == str(shard.absolute()) for row in rows[8:])
    np.testing.assert_allclose(store.load_embeddings("img"), expected_image_vectors(model, images), atol=FLOAT16_TOLERANCE)
    np.testing.assert_allclose(store.load_embeddings("text"), expected_text_vectors(model, captions), atol=FLOAT16_TOLERANCE)
    info = store_info(out)
    assert info["model"]["source"] == str(model_path) and info["dim"] == 128
    assert set(info["roots"]) == {str(tmp_path / "folder"), str(tmp_path / "listed"), str(tmp_path / "shards")}


def test_a_folder_of_shards_stands_for_its_shards(tmp_path):
    for number in (1, 0):  # written out of order: parts follow the names
        write_shard(tmp_path / "shards" / f"{number:05d}.tar", first=10 * number, count=2)
    listed = [(part.number, part.load()) for part in plan_parts([tmp_path / "shards"], captions=True)]
    given = [(part.number, part.load()) for part in plan_parts([tmp_path / "shards" / "{00000..00001}.tar"], captions=True)]
    assert listed == given and [len(items) for _, items in listed] == [2, 2]
    assert all(item.path == str((tmp_path / "shards" / "00000.tar").absolute()) for item in listed[0][1])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty: no images found \(nor .tar shards\)"):
        plan_parts([tmp_path / "empty"])


def _shard_images(shard: Path) -> list[bytes]:
    with tarfile.open(shard) as tar:
        return [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]


def test_ranks_split_the_parts_and_together_match_one_process(tmp_path, tiny):
    model_path, model = tiny
    write_images(tmp_path / "images", 7)
    single, split = tmp_path / "single", tmp_path / "split"
    embed_to_store(model, reference(model_path), [tmp_path / "images"], single, part_size=2, workers=0, progress=False)
    written_by = {}
    for rank in range(2):
        report = embed_to_store(
            model, reference(model_path), [tmp_path / "images"], split, part_size=2, workers=0, rank=rank, world_size=2, progress=False
        )
        written_by[rank] = report.written
    assert written_by == {0: [0, 2], 1: [1, 3]}
    assert _tree(single) == _tree(split)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


KILLABLE_JOB = """
import sys, time
from clipforge.retrieval.embed import embed_to_store, load_model, model_reference
model_path, folder, out = sys.argv[1:4]
reference = model_reference(model_path, None, None, "fp32")
model = load_model(reference)
encode = model.encode_image
def slow_encode(*args, **kwargs):
    time.sleep(0.25)
    return encode(*args, **kwargs)
model.encode_image = slow_encode
embed_to_store(model, reference, [folder], out, part_size=3, batch_size=2, workers=1, progress=False)
"""
JOB_SETTINGS = {"part_size": 3, "batch_size": 2, "workers": 0, "progress": False}  # the bytes do not depend on workers


def finished_parts(out: Path) -> list[int]:
    return sorted(int(p.stem.split("_")[1]) for p in (out / "parts").glob("part_*.json")) if (out / "parts").is_dir() else []


def test_job_killed_with_sigkill_resumes_to_the_same_files_without_rewriting_parts(tmp_path, tiny):
    model_path, model = tiny
    folder = tmp_path / "images"
    write_images(folder, 16)  # 6 parts of up to 3 images, 2 batches each
    killed = subprocess.Popen(
        [sys.executable, "-c", KILLABLE_JOB, str(model_path), str(folder), str(tmp_path / "resumed")],
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while len(finished_parts(tmp_path / "resumed")) < 2 and time.monotonic() < deadline and killed.poll() is None:
        time.sleep(0.02)
    os.killpg(killed.pid, signal.SIGKILL)  # the job and its decoding worker
    assert killed.wait() == -signal.SIGKILL, killed.stderr.read()
    done_before = finished_parts(tmp_path / "resumed")
    assert 2 <= len(done_before) < 6, "the job must be killed in the middle"
    survivors = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (tmp_path / "resumed").rglob("*") if p.is_file()}

    rerun = embed_to_store(model, reference(model_path), [folder], tmp_path / "resumed", **JOB_SETTINGS)
    assert rerun.already_done == done_before
    assert sorted(rerun.written) == sorted(set(range(6)) - set(done_before))  # each part written exactly once
    for path, (inode, mtime) in survivors.items():
        if not path.name.endswith(".tmp"):  # what the kill left half-written is removed
            assert path.exists() and (path.stat().st_ino, path.stat().st_mtime_ns) == (inode, mtime), f"{path} was rewritten"
    embed_to_store(model, reference(model_path), [folder], tmp_path / "uninterrupted", **JOB_SETTINGS)
    assert _tree(tmp_path / "resumed") == _tree(tmp_path / "uninterrupted")


def test_a_store_holding_another_job_is_refused(tmp_path, tiny):
    model_path, model = tiny
    write_images(tmp_path / "images", 3)
    embed_to_store(model, reference(model_path), [tmp_path / "images"], tmp_path / "store", part_size=2, workers=0, progress=False)
    with pytest.raises(ConfigError, match="part_size"):
        embed_to_store(model, reference(model_path), [tmp_path / "images"], tmp_path / "store", part_size=5, workers=0, progress=False)


def test_strict_fails_on_the_first_bad_image_and_random_weights_are_refused(tmp_path, tiny):
    model_path, model = tiny
    write_images(tmp_path / "images", 2)
    (tmp_path / "images" / "zz_bad.jpg").write_bytes(b"\xff\xd8\xff junk")
    with pytest.raises(InputError, match="zz_bad.jpg"):
        embed_to_store(model, reference(model_path), [tmp_path / "images"], tmp_path / "store", strict=True, workers=0, progress=False)
    with pytest.raises(ConfigError, match="random"):
        load_model(model_reference("synthetic-tiny", None, None, "fp32"))


def test_cli_writes_a_store_and_a_rerun_does_nothing(tmp_path, tiny, capsys):
    model_path, model = tiny
    images = write_images(tmp_path / "images", 3)
    app = typer.Typer()
    app.callback()(lambda: None)  # a command group, as in ``clipforge.cli``
    embed_cli.register(app)
    argv = ["embed", str(tmp_path / "images"), "--model", str(model_path), "--out", str(tmp_path / "store"), "--workers", "0", "--part-size", "2"]
    app(argv, standalone_mode=False)
    assert "wrote 3 embeddings in 2 parts" in capsys.readouterr().out
    app(argv, standalone_mode=False)
    assert "wrote 0 embeddings in 0 parts" in capsys.readouterr().out
    stored = EmbeddingStore(tmp_path / "store").load_embeddings("img")
    np.testing.assert_allclose(stored, expected_image_vectors(model, [Image.open(p) for p in images]), atol=FLOAT16_TOLERANCE)
    with pytest.raises(ConfigError, match="--text"):
        app(["embed", "--text", "a cat", "--model", str(model_path), "--out", str(tmp_path / "texts")], standalone_mode=False)
