"""The task recipes through the CLI: train, save, reload and evaluate; bad input as one line.

References: the CLI's figures against ones computed here with scikit-learn from the reloaded files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import sklearn.metrics as skm
import torch
from conftest import run_cli as run
from PIL import Image

import clipforge
from clipforge.adapt import load_adapter, model_fingerprint
from clipforge.adapt.clipn import load_no_encoder
from clipforge.adapt.recipes import RECIPES
from clipforge.cli.adapt import RECIPE_NAMES
from clipforge.data.synthetic import SyntheticWorld, real_or_altered
from clipforge.encode import embed_images
from clipforge.errors import CheckpointError
from clipforge.eval.datasets import load_dataset, synthetic_task
from clipforge.eval.ood_scores import atd_score
from clipforge.eval.zeroshot import zero_shot_head, zero_shot_logits

MICRO = str(Path(__file__).parent / "data" / "micro-clip.json")



@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recipes")
    torch.manual_seed(0)
    clipforge.save(clipforge.load(MICRO), root / "micro.safetensors")
    torch.manual_seed(1)
    clipforge.save(clipforge.load(MICRO), root / "other.safetensors")
    return {"model": root / "micro.safetensors", "other": root / "other.safetensors", "root": root}


def test_the_cli_lists_every_recipe() -> None:
    assert list(RECIPE_NAMES) == list(RECIPES)


def test_clipn_trains_then_scores_ood_from_the_cli(files, capsys) -> None:
    out = files["root"] / "clipn.safetensors"
    code, stdout, _ = run(capsys, "adapt", "clipn", "--model", files["model"], "--data", "synthetic", "--out", out,
                          "--set", "steps=3", "--set", "samples=24", "--set", "batch_size=8")
    assert code == 0 and "wrote adapter" in stdout
    eval_dir = files["root"] / "eval"
    code, _, _ = run(capsys, "eval", "ood", "--model", files["model"], "--data", "synthetic:shape", "--samples", 16,
                     "--adapter", out, "--out", eval_dir, "--workers", 0)
    assert code == 0
    record = json.loads(next(eval_dir.glob("*ood_detection.json")).read_text())
    model = clipforge.load(files["model"])
    no_encoder = load_no_encoder(load_adapter(out).record, model)
    task = synthetic_task("shape")
    dataset = task.dataset("test", 16)
    head, no_head = (zero_shot_head(encoder, dataset.classnames, dataset.templates) for encoder in (model, no_encoder))
    scores = []
    for images in (dataset.images, task.single_object_images("test_ood", 16)):
        features = torch.from_numpy(embed_images(model, images, workers=0, progress=False).embeddings)
        scores.append(atd_score(zero_shot_logits(features, head), zero_shot_logits(features, no_head)).numpy())
    labels = np.r_[np.ones(len(scores[0])), np.zeros(len(scores[1]))]
    assert record["metrics"]["auroc_atd"] == pytest.approx(skm.roc_auc_score(labels, np.r_[scores[0], scores[1]]), abs=1e-6)
    code, _, err = run(capsys, "eval", "ood", "--model", files["other"], "--data", "synthetic:shape", "--samples", 8,
                       "--adapter", out, "--out", eval_dir, "--workers", 0)
    assert code == 2 and "fitted on another model" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "eval", "zeroshot", "--model", files["model"], "--data", "synthetic:shape", "--samples", 8,
                       "--adapter", out, "--out", eval_dir, "--workers", 0)
    assert code == 2 and "OOD detection only" in err
    with pytest.raises(CheckpointError) as refused:
        load_adapter(out)(model)
    assert str(refused.value) == f"{out}: a clipn adapter, not a few-shot adapter: use it with clipforge eval ood --adapter"


def test_recipes_refuse_missing_data(files, capsys) -> None:
    code, _, err = run(capsys, "adapt", "clipn", "--model", files["model"], "--out", files["root"] / "x.safetensors")
    assert code == 2 and "--data" in err and len(err.strip().splitlines()) == 1


def test_detector_trains_then_evaluates_from_the_cli(files, capsys) -> None:
    out = files["root"] / "detector.safetensors"
    code, stdout, _ = run(capsys, "adapt", "detector", "--model", files["model"], "--data", "synthetic:altered",
                          "--out", out, "--set", "tuning=ln", "--set", "steps=3", "--set", "samples=16",
                          "--set", "batch_size=8")
    assert code == 0 and "wrote adapter" in stdout
    eval_dir = files["root"] / "eval-detector"
    code, _, _ = run(capsys, "eval", "detection", "--model", files["model"], "--data", "synthetic:altered@val+double_jpeg",
                     "--samples", 20, "--adapter", out, "--out", eval_dir, "--workers", 0)
    assert code == 0
    record = json.loads(next(eval_dir.glob("*altered_image_detection.json")).read_text())
    classifier = load_adapter(out)(clipforge.load(files["model"]))
    dataset = load_dataset("synthetic:altered@val+double_jpeg", samples=20)
    logits = classifier.classify(dataset.images, workers=0).logits
    expected = skm.roc_auc_score(dataset.labels, (logits[:, 1] - logits[:, 0]).numpy())
    assert record["metrics"]["auroc"] == pytest.approx(expected, abs=1e-6)
    code, _, err = run(capsys, "eval", "detection", "--model", files["other"], "--data", "synthetic:altered",
                       "--samples", 8, "--adapter", out, "--out", eval_dir, "--workers", 0)
    assert code == 2 and "fitted on another model" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "adapt", "detector", "--model", files["model"], "--data", "synthetic:altered+sepia",
                       "--out", files["root"] / "bad.safetensors", "--set", "families=sepia")
    assert code == 2 and "sepia" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(("recipe", "data", "message"), [
    ("detector", "synthetic:altered+double_jpeg",
     "synthetic:altered+double_jpeg: the training data takes no +double_jpeg; set the families with --set families=double_jpeg"),
    ("reid", "synthetic:identities+outline", "synthetic:identities+outline: the training data takes no +outline"),
])
def test_training_data_refuses_the_evaluation_suffix(files, capsys, recipe, data, message) -> None:
    """``+FAMILY`` / ``+SHIFT`` belong to evaluation sets; in training data they used to fall through to the
    evaluation reader, which trained on the test split."""
    out = files["root"] / "suffix.safetensors"
    code, _, err = run(capsys, "adapt", recipe, "--model", files["model"], "--data", data, "--out", out,
                       "--set", "steps=1", "--set", "samples=8")
    assert code == 2 and err.strip() == f"error: {message}" and err.count("\n") == 1 and not out.exists()


def test_a_folder_detector_scores_another_folder_with_a_real_class(files, capsys) -> None:
    """Trained on real/ + fake/ (as docs/recipes.md shows), evaluated on real/ + generated/: the AUROC of the
    reloaded detector's altered − real logit, with the labels read from the folder names here."""
    world = SyntheticWorld()
    for name, altered, split in (("photos", "fake", "train"), ("others", "generated", "val")):
        for index in range(12):
            image, label, _ = real_or_altered(world, split, index, ["checkerboard", "seam"])
            folder = files["root"] / name / ("real" if label == 0 else altered)
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{index}.png")
    out = files["root"] / "folder-detector.safetensors"
    code, _, _ = run(capsys, "adapt", "detector", "--model", files["model"], "--data", files["root"] / "photos", "--out", out,
                     "--set", "tuning=head", "--set", "steps=2", "--set", "batch_size=4")
    assert code == 0
    eval_dir = files["root"] / "eval-folder-detector"
    code, _, err = run(capsys, "eval", "detection", "--model", files["model"], "--data", files["root"] / "others",
                       "--adapter", out, "--out", eval_dir, "--workers", 0)
    assert code == 0, err
    record = json.loads(next(eval_dir.glob("*altered_image_detection.json")).read_text())
    images = sorted((files["root"] / "others").glob("*/*.png"))
    logits = load_adapter(out)(clipforge.load(files["model"])).classify(images, workers=0).logits  # real, altered
    labels = [image.parent.name == "generated" for image in images]
    assert record["metrics"]["auroc"] == pytest.approx(skm.roc_auc_score(labels, (logits[:, 1] - logits[:, 0]).numpy()), abs=1e-6)


def test_reid_fine_tunes_then_ranks_from_the_cli(files, capsys) -> None:
    out = files["root"] / "reid.safetensors"
    code, stdout, _ = run(capsys, "adapt", "reid", "--model", files["model"], "--data", "synthetic:identities", "--out", out,
                          "--set", "steps=2", "--set", "samples=32", "--set", "batch_size=4")
    assert code == 0 and f"wrote checkpoint {out}" in stdout
    eval_dir = files["root"] / "eval-reid"
    code, _, _ = run(capsys, "eval", "reid", "--model", out, "--data", "synthetic:identities@test", "--samples", 16,
                     "--out", eval_dir, "--workers", 0)
    assert code == 0
    record = json.loads(next(eval_dir.glob("*reidentification.json")).read_text())
    dataset = load_dataset("synthetic:identities@test", samples=16)
    features = embed_images(clipforge.load(out), dataset.images, workers=0, progress=False).embeddings
    queries = [0, 4, 8, 12]
    gallery = [row for row in range(16) if row not in queries]
    similarity = features[queries] @ features[gallery].T
    labels = np.asarray(dataset.labels)
    expected = np.mean([skm.average_precision_score(labels[gallery] == labels[q], similarity[i]) for i, q in enumerate(queries)])
    assert record["metrics"]["map"] == pytest.approx(expected, abs=1e-6)
    assert load_adapter(out).record.base_model == model_fingerprint(clipforge.load(files["model"]))
    code, _, err = run(capsys, "eval", "zeroshot", "--model", files["model"], "--data", "synthetic:shape", "--samples", 8,
                       "--adapter", out, "--out", eval_dir, "--workers", 0)
    assert code == 2 and err.strip() == (f"error: {out}: a reid checkpoint, not a few-shot adapter: use it as --model, "
                                         "e.g. clipforge eval reid --model FILE")
    lonely = files["root"] / "one-identity" / "alice"
    lonely.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(lonely / f"{i}.png")
    code, _, err = run(capsys, "adapt", "reid", "--model", files["model"], "--data", lonely.parent,
                       "--out", files["root"] / "x.safetensors")
    assert code == 2 and "at least two identities" in err and len(err.strip().splitlines()) == 1
