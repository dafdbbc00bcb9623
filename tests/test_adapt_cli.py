"""Adapters through the CLI and Python: save, load, evaluate, refusal by another model, bad input.

References: the saved head's logits against the in-memory head's, ``clipforge eval --adapter``'s accuracy
against one computed here from the classifier's predictions, and messages matched whole.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli as run
from PIL import Image

import clipforge
from clipforge.adapt import (
    METHODS,
    fit,
    load_adapter,
    model_fingerprint,
    sample_few_shot,
)
from clipforge.cli.adapt import METHOD_NAMES
from clipforge.errors import CheckpointError
from clipforge.eval.datasets import folder_dataset

MICRO = str(Path(__file__).parent / "data" / "micro-clip.json")



@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapt")
    torch.manual_seed(0)
    clipforge.save(clipforge.load(MICRO), root / "micro.safetensors")
    torch.manual_seed(1)
    clipforge.save(clipforge.load(MICRO), root / "other.safetensors")
    data = root / "shapes"
    for index, name in enumerate(["red_box", "blue_box", "green_box"]):
        (data / name).mkdir(parents=True)
        for i in range(8):
            image = Image.new("RGB", (32, 32), (90, 90, 90))
            image.paste((200 if index == 0 else 0, 200 if index == 2 else 0, 200 if index == 1 else 0), (4 + i, 4, 20 + i, 20))
            image.save(data / name / f"{i}.png")
    (data / "red_box" / "broken.png").write_bytes(b"\x89PNG truncated")
    return {"model": root / "micro.safetensors", "other": root / "other.safetensors", "data": data, "root": root}


def test_the_cli_lists_every_registered_method() -> None:
    assert list(METHOD_NAMES) == list(METHODS)


def test_adapt_then_eval_with_the_adapter(files, capsys) -> None:
    out = files["root"] / "gda.safetensors"
    code, stdout, _ = run(capsys, "adapt", "gda", "--model", files["model"], "--train", files["data"], "--shots", 3,
                          "--seed", 2, "--out", out)
    assert code == 0 and "3 classes × 3 shots" in stdout and "1 unreadable images skipped" in stdout
    (files["data"] / "red_box" / "broken.png").rename(files["root"] / "broken.png")  # eval reads every image strictly
    try:
        eval_dir = files["root"] / "eval"
        code, _, _ = run(capsys, "eval", "zeroshot", "--model", files["model"], "--data", files["data"], "--adapter", out,
                         "--out", eval_dir, "--workers", 0)
        assert code == 0
        record = json.loads(next(eval_dir.glob("*zeroshot_classification.json")).read_text())
        model = clipforge.load(files["model"])
        dataset = folder_dataset(files["data"])
        predicted = load_adapter(out)(model).classify(dataset.images, workers=0).labels
        expected = sum(p == y for p, y in zip(predicted, dataset.labels, strict=True)) / len(dataset)
        assert record["metrics"]["acc1"] == pytest.approx(expected) and record["adapter"] == "gda"
    finally:
        (files["root"] / "broken.png").rename(files["data"] / "red_box" / "broken.png")


def test_an_adapter_is_refused_by_another_model(files, capsys) -> None:
    out = files["root"] / "tip.safetensors"
    assert run(capsys, "adapt", "tip-adapter", "--model", files["model"], "--train", files["data"], "--shots", 2,
               "--out", out)[0] == 0
    code, _, err = run(capsys, "eval", "zeroshot", "--model", files["other"], "--data", files["data"], "--adapter", out)
    assert code == 2 and err.count("\n") == 1
    assert f"{out} was fitted on another model (micro-clip" in err and "this one is micro-clip" in err
    with pytest.raises(CheckpointError, match="fitted on another model"):
        load_adapter(out)(clipforge.load(files["other"]))


def test_bad_input_is_one_line(files, capsys) -> None:
    base = ["--model", files["model"], "--train", files["data"], "--out", files["root"] / "x.safetensors"]
    code, _, err = run(capsys, "adapt", "nonsense", *base, "--shots", 1)
    assert code == 2 and err.strip() == f"error: method: 'nonsense' is not one of {', '.join(METHODS)}"
    code, _, err = run(capsys, "adapt", "gda", *base, "--shots", 9, "--set", "val_shots=0")
    assert code == 2 and err.strip() == (f"error: {files['data']}: class 'blue box' has 8 readable images, "
                                         "fewer than the 9 shots asked")
    code, _, err = run(capsys, "adapt", "gda", *base, "--shots", 1, "--set", "augment_epochs=3")
    assert code == 2 and err.strip() == ("error: gda: unknown setting 'augment_epochs' "
                                         "(one of augment_epoch, crop_scale, flip, default_alpha, val_shots)")
    one = files["root"] / "one" / "red box"
    one.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (32, 32), (200, 10 * i, 0)).save(one / f"{i}.png")
    code, _, err = run(capsys, "adapt", "gda", *base[:2], "--train", one.parent, "--shots", 1, *base[4:])
    assert code == 2 and err.strip() == f"error: {one.parent}: one class (red box); few-shot adaptation needs at least 2"
    code, _, err = run(capsys, "adapt", "wise-ft", *base, "--shots", 1, "--set", f"finetuned={files['other']}")
    assert code == 2 and err.count("\n") == 1  # another initialisation: blending it would give noise
    assert err.startswith(f"error: {files['other']}: does not come from the base {files['model']}: its weight matrices lie")
    code, _, err = run(capsys, "eval", "zeroshot", "--model", files["model"], "--data", files["data"],
                       "--adapter", files["model"])
    assert code == 2 and "neither an adapter file nor a checkpoint written by clipforge adapt" in err


@pytest.mark.parametrize("method", ["tip-adapter", "gda", "tip-adapter-f"])
def test_saved_adapters_classify_as_the_fitted_ones(files, tmp_path, method) -> None:
    model = clipforge.load(files["model"])
    shots = sample_few_shot(str(files["data"]), 2, seed=3, val_shots=2)
    adapter = fit(method, model, shots, settings={"augment_epoch": 2})
    path = adapter.save(tmp_path / f"{method}.safetensors")
    images = shots.val.images
    fitted, loaded = adapter(model), load_adapter(path)(model)
    features = torch.from_numpy(fitted.features(images, workers=0).embeddings)
    torch.testing.assert_close(loaded.logits(features), fitted.logits(features))
    assert loaded.classnames == ["blue box", "green box", "red box"]
    assert load_adapter(path).record.provenance["seed"] == 3


@pytest.mark.parametrize(("argv", "message"), [
    (["clip-lora", "rank=0"], "clip-lora.rank: 0 is out of range (allowed: ≥ 1)"),
    (["detector", "tuning=lora", "lora_rank=0"], "detector.lora_rank: 0 is out of range (allowed: ≥ 1)"),
    (["detector", "batch_size=0"], "detector.batch_size: 0 is out of range (allowed: ≥ 1)"),
    (["coop", "batch_size=0"], "coop.batch_size: 0 is out of range (allowed: ≥ 1)"),
    (["clip-lora", "batch_size=0"], "clip-lora.batch_size: 0 is out of range (allowed: ≥ 1)"),
    (["clip-svd", "batch_size=0"], "clip-svd.batch_size: 0 is out of range (allowed: ≥ 1)"),
    (["clap", "batch_size=0"], "clap.batch_size: 0 is out of range (allowed: ≥ 1)"),
    (["tip-adapter-f", "batch_size=0"], "tip-adapter-f.batch_size: 0 is out of range (allowed: ≥ 1)"),
    (["maple", "n_ctx=0"], "maple.n_ctx: 0 is out of range (allowed: ≥ 1)"),
    (["gda", "augment_epoch=0"], "gda.augment_epoch: 0 is out of range (allowed: ≥ 1)"),
    (["tip-adapter", "search_step=[0,0]"], "tip-adapter.search_step: [0, 0] is out of range (allowed: each ≥ 1)"),
    (["clip-lora", "dropout=2"], "clip-lora.dropout: 2.0 is out of range (allowed: [0, 1))"),
    (["reid", "label_smoothing=2"], "reid.label_smoothing: 2.0 is out of range (allowed: [0, 1))"),
    (["maple", "depth=0"], "maple.depth: 0 is out of range (allowed: ≥ 1)"),
    (["linear-probe", "max_iter=0"], "linear-probe.max_iter: 0 is out of range (allowed: ≥ 1)"),
    (["detector", "samples=1"], "detector.samples: 1 is out of range (allowed: ≥ 2)"),  # one image, one class
    (["reid", "batch_size=1"], "reid.batch_size: 1 is out of range (allowed: ≥ 2)"),  # InfoNCE over one pair: loss 0
])
def test_out_of_range_settings_are_one_line(files, capsys, argv, message) -> None:
    method, *settings = argv
    recipe_data = {"detector": "synthetic:altered", "reid": "synthetic:identities"}
    data = ["--data", recipe_data[method]] if method in recipe_data else ["--train", files["data"], "--shots", 1]
    sets = [part for setting in settings for part in ("--set", setting)]
    out = files["root"] / "out-of-range.safetensors"
    code, _, err = run(capsys, "adapt", method, "--model", files["model"], *data, *sets, "--out", out)
    assert code == 2 and err.count("\n") == 1 and err.strip() == f"error: {message}" and not out.exists()


def test_the_fingerprint_follows_the_weights_not_their_precision(files) -> None:
    fp32, bf16 = clipforge.load(files["model"]), clipforge.load(files["model"], precision="bf16")
    assert model_fingerprint(fp32) == model_fingerprint(bf16)
    assert model_fingerprint(fp32) != model_fingerprint(clipforge.load(files["other"]))
