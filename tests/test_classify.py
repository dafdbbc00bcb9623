"""``clipforge classify``: open_clip's zero-shot probabilities on the same weights, as a table at 80 columns
and as JSON; bad labels and unreadable images as one line."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
from conftest import run_cli as run
from PIL import Image
from test_clip_benchmark_parity import open_clip_tokenize, open_clip_twins

import clipforge
import clipforge.eval.classify

LABELS = ["a red circle", "a blue square", "a photo of a dog"]


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    reference, ours = open_clip_twins()
    folder = tmp_path_factory.mktemp("classify")
    checkpoint = folder / "micro.safetensors"
    clipforge.save(ours, checkpoint)
    rng = np.random.default_rng(0)
    images = []
    for number in range(3):
        path = folder / "photos" / f"picture_with_a_rather_long_file_name_{number}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(path)
        images.append(path)
    return reference, ours, checkpoint, images


def open_clip_probabilities(reference: open_clip.CLIP, preprocess, images, labels: list[str]) -> np.ndarray:
    """open_clip README's zero-shot recipe, verbatim in spirit: normalise, 100 · image @ text.T, softmax."""
    with torch.no_grad():
        image_features = reference.encode_image(torch.stack([preprocess(Image.open(path)) for path in images]))
        text_features = reference.encode_text(open_clip_tokenize(labels))
        image_features /= image_features.norm(dim=-1, keepdim=True)
        text_features /= text_features.norm(dim=-1, keepdim=True)
        return (100.0 * image_features @ text_features.T).softmax(dim=-1).numpy()



def test_json_probabilities_equal_open_clip(twins, capsys) -> None:
    reference, ours, checkpoint, images = twins
    preprocess = open_clip.image_transform(ours.config.vision.image_size, is_train=False)
    expected = open_clip_probabilities(reference, preprocess, images, LABELS)
    code, out, _ = run(capsys, "classify", *map(str, images), "--model", str(checkpoint), "--labels", ",".join(LABELS), "--top", "3", "--json")
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [row["image"] for row in rows] == [str(path) for path in images]
    for row, want in zip(rows, expected):
        order = np.argsort(-want)
        assert row["labels"] == [LABELS[i] for i in order]
        np.testing.assert_allclose(row["probabilities"], want[order], atol=1e-5)


def test_table_is_readable_at_80_columns(twins, capsys, monkeypatch) -> None:
    _, _, checkpoint, images = twins
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = run(capsys, "classify", str(images[0].parent), "-m", str(checkpoint), "-l", ",".join(LABELS), "-k", "2")
    assert code == 0
    lines = out.splitlines()
    assert max(map(len, lines)) <= 80 and "…" not in out  # nothing cut
    folded = "".join(line.split("│")[1].strip() for line in lines if line.startswith("│"))  # the image column
    for path in images:
        assert str(path) in folded  # the whole path, folded over lines
    best = clipforge.eval.classify.classify(clipforge.load(checkpoint), images[:1], LABELS, progress=False).top(0, 2)
    first = lines.index(next(line for line in lines if line.startswith("│ /")))
    for (label, probability), line in zip(best, lines[first : first + 2]):
        assert label in line and f"{probability:.3f}" in line
    assert "3 images classified over 3 labels" in out


@pytest.mark.parametrize(
    ("labels", "message"),
    [("dog", "at least two labels"), ("dog,,cat", "label 2 is empty"), ("dog,cat,dog", "label 3 repeats label 1")],
)
def test_bad_labels_are_one_line(twins, capsys, labels: str, message: str) -> None:
    _, _, checkpoint, images = twins
    code, out, err = run(capsys, "classify", str(images[0]), "-m", str(checkpoint), "--labels", labels)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and not out


def test_unreadable_image_is_skipped_and_counted(twins, capsys, tmp_path) -> None:
    _, _, checkpoint, images = twins
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a picture")
    code, out, err = run(capsys, "classify", str(images[0]), str(broken), "-m", str(checkpoint), "-l", "dog,cat")
    assert code == 0
    assert "broken.png" in err and "1 images classified over 2 labels; 1 skipped" in out
