"""The evaluation runner, its datasets, PerceptionCLIP, corruptions and reports; bad input as one line.

Fast tests run every task on a randomly initialised synthetic-tiny model and check each figure against
an independent computation (scikit-learn, scikit-image, CLIP_benchmark, loops written out here). The
``slow`` tests check the claims of issue #4 on the trained demo model: ``$CLIPFORGE_DEMO_MODEL`` or
``runs/demo/model.safetensors`` if present, else a model trained by ``clipforge.demo.run_demo``.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import color as skcolor
from sklearn import metrics as skm
from sklearn.linear_model import LogisticRegression

import clipforge
from clipforge.cli import main
from clipforge.data.synthetic.concepts import COLORS
from clipforge.errors import InputError
from clipforge.eval.datasets import (
    folder_dataset,
    load_dataset,
    read_classnames,
    read_templates,
    synthetic_task,
    table_dataset,
    webdataset_dataset,
)
from clipforge.eval.perception import (
    build_perception_classifier,
    composite_contexts,
    perception_clip,
    read_context_factors,
)
from clipforge.eval.report import write_report
from clipforge.eval.results import write_results
from clipforge.eval.robustness import (
    CORRUPTIONS,
    brightness,
    corrupt_image,
    patch_perturbation,
    shot_noise,
)
from clipforge.eval.runner import Evaluator
from clipforge.eval.zeroshot import build_zero_shot_classifier
from clipforge.explain import explain_image

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes():
    return synthetic_task("shape")


def png(color: str, size: tuple[int, int] = (40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def run(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


# -- datasets --


def test_folder_table_and_webdataset_sources_agree(tmp_path) -> None:
    colors = {"red": 3, "blue_sky": 2}
    rows = []
    for name, count in colors.items():
        (tmp_path / "folder" / name).mkdir(parents=True)
        for i in range(count):
            (tmp_path / "folder" / name / f"{i}.png").write_bytes(png(name.split("_")[0]))
            rows.append((f"folder/{name}/{i}.png", name))
    folder = folder_dataset(tmp_path / "folder")
    assert folder.classnames == ["blue sky", "red"] and folder.labels == [0, 0, 1, 1, 1]

    table = pa.table({"image": [path for path, _ in rows], "label": [name for _, name in rows]})
    pq.write_table(table, tmp_path / "set.parquet")
    parquet = table_dataset(tmp_path / "set.parquet")
    assert parquet.classnames == ["blue_sky", "red"] and parquet.labels == [1, 1, 1, 0, 0]
    assert Image.open(parquet.images[0]).getpixel((0, 0)) == (255, 0, 0)

    (tmp_path / "names.txt").write_text("red\nblue sky\n\n")
    (tmp_path / "ids.csv").write_text("path,target\n" + "".join(f"{p},{0 if n == 'red' else 1}\n" for p, n in rows))
    csv = load_dataset(str(tmp_path / "ids.csv"), classnames_file=tmp_path / "names.txt", image_column="path", label_column="target")
    assert csv.classnames == ["red", "blue sky"] and csv.labels == [0, 0, 0, 1, 1]

    with tarfile.open(tmp_path / "shard-0.tar", "w") as archive:
        for i, (path, name) in enumerate(rows):
            for extension, data in (("png", (tmp_path / path).read_bytes()), ("cls", str(int(name != "red")).encode())):
                info = tarfile.TarInfo(f"s{i:03d}.{extension}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    shards = webdataset_dataset(str(tmp_path / "shard-{0..0}.tar"), classnames=["red", "blue sky"])
    assert shards.labels == csv.labels and len(shards.images) == 5


def test_class_name_and_template_files(tmp_path) -> None:
    (tmp_path / "names.json").write_text(json.dumps(["cat", "dog"]))
    (tmp_path / "templates.txt").write_text("a photo of a {c}.\nart of the {c}.\n")
    (tmp_path / "cupl.json").write_text(json.dumps({"cat": ["a small furry pet"], "dog": ["a loyal pet", "it barks"]}))
    assert read_classnames(tmp_path / "names.json") == ["cat", "dog"]
    assert read_templates(tmp_path / "templates.txt") == ["a photo of a {c}.", "art of the {c}."]
    assert read_templates(tmp_path / "cupl.json")["dog"] == ["a loyal pet", "it barks"]


NAMES = {"names.txt": "cat\ndog\n"}


@pytest.mark.parametrize(
    ("files", "spec", "options", "message"),
    [
        ({}, "synthetic", {"classnames_file": "missing.txt"}, "class names file {tmp}/missing.txt: no such file"),
        ({"names.txt": "cat\n\ndog\n"}, "set.csv", {"classnames_file": "names.txt"}, "names.txt: line 2 is an empty class name"),
        ({"names.json": '["cat", " "]'}, "set.csv", {"classnames_file": "names.json"}, "names.json: entry 2 is an empty class name"),
        ({**NAMES, "set.csv": "image,label\na.png,0\nb.png,2\n"}, "set.csv", {"classnames_file": "names.txt"},
         "row 2 has label 2, outside the 2 classes"),
        ({**NAMES, "set.csv": "image,label\na.png,cat\nb.png,cow\n"}, "set.csv", {"classnames_file": "names.txt"},
         "row 2 has label 'cow', which is not in the class list"),
        ({"set.csv": "image,label\na.png,cat\nb.png,\n"}, "set.csv", {}, "row 2 has no label"),
        ({"names.txt": "cat\ndog\nemu\n", "set.csv": "image,label\na.png,cat\nb.png,dog\n"}, "set.csv",
         {"classnames_file": "names.txt"}, "class 'emu' has no images"),
        ({"templates.txt": "a photo of a {c}.\na photo\n"}, "synthetic", {"templates_file": "templates.txt"},
         "templates.txt: line 2 has no {c} placeholder"),
        ({"cupl.json": '{"circle": ["round"]}'}, "synthetic", {"templates_file": "cupl.json"}, "no descriptions for class 'square'"),
    ],
)
def test_bad_dataset_inputs_are_one_line_errors(tmp_path, files, spec, options, message) -> None:
    files = {"set.csv": "image,label\na.png,cat\n", **files}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    spec = spec if spec == "synthetic" else str(tmp_path / spec)
    with pytest.raises(InputError) as error:
        load_dataset(spec, samples=4, **{key: tmp_path / value for key, value in options.items()})
    assert message.replace("{tmp}", str(tmp_path)) in str(error.value) and "\n" not in str(error.value)


def test_class_folder_without_images_fails_on_the_command_line(tmp_path, capsys) -> None:
    (tmp_path / "set" / "cat").mkdir(parents=True)
    (tmp_path / "set" / "dog").mkdir()
    (tmp_path / "set" / "cat" / "0.png").write_bytes(png("red"))
    (tmp_path / "set" / "dog" / "notes.txt").write_text("no pictures here")
    code, _, err = run(capsys, "eval", "zeroshot", "--model", "synthetic-tiny", "--data", str(tmp_path / "set"), "--out", str(tmp_path / "out"))
    assert code == 2 and err.count("\n") == 1 and "class 'dog' has no images" in err and str(tmp_path / "set" / "dog") in err


def test_a_table_row_naming_a_missing_image_is_named_on_the_command_line(tmp_path, capsys) -> None:
    (tmp_path / "red.png").write_bytes(png("red"))
    (tmp_path / "set.csv").write_text("image,label\nred.png,red\nimgs/nope.png,blue\n")
    code, _, err = run(capsys, "eval", "zeroshot", "--model", "synthetic-tiny", "--data", str(tmp_path / "set.csv"),
                       "--out", str(tmp_path / "out"), "--workers", "0")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert str(tmp_path / "set.csv") in err and "row 2" in err and "imgs/nope.png: no such file" in err


def test_datasets_named_alike_keep_a_result_file_each(tmp_path, capsys) -> None:
    """A table as CSV and as parquet, and two shards of one folder: four datasets, four result files and four
    distinct names in the files and the summary; the two copies of the table score the same."""
    colors = ["red", "blue", "red", "blue"]
    for i, color in enumerate(colors):
        (tmp_path / f"{i}.png").write_bytes(png(color))
    (tmp_path / "table.csv").write_text("image,label\n" + "".join(f"{i}.png,{color}\n" for i, color in enumerate(colors)))
    pq.write_table(pa.table({"image": [f"{i}.png" for i in range(4)], "label": colors}), tmp_path / "table.parquet")
    (tmp_path / "shards").mkdir()
    for shard in range(2):
        with tarfile.open(tmp_path / "shards" / f"0000{shard}.tar", "w") as archive:
            for i, color in enumerate(colors[2 * shard : 2 * shard + 2]):
                for extension, data in (("png", png(color, (20 + shard, 20))), ("cls", color.encode())):
                    info = tarfile.TarInfo(f"s{i}.{extension}")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    specs = [tmp_path / "table.csv", tmp_path / "table.parquet", tmp_path / "shards" / "00000.tar", tmp_path / "shards" / "00001.tar"]
    code, out, err = run(capsys, "eval", "zeroshot", "--model", "synthetic-tiny", *(f"--data={spec}" for spec in specs),
                         "--out", str(tmp_path / "out"), "--workers", "0")
    assert code == 0, err
    records = [json.loads(path.read_text()) for path in sorted((tmp_path / "out").glob("*.json"))]
    names = {record["dataset"] for record in records}
    assert len(records) == len(names) == len(specs)
    summary = [line.split()[0] for line in out.splitlines() if "zeroshot_classification" in line]
    assert set(summary) == names and len(summary) == 3 * len(specs)  # acc1, acc5, mean per-class recall each
    tables = [record["metrics"] for record in records if record["dataset"].startswith("table")]
    assert len(tables) == 2 and all(tables[0][key] == tables[1][key] for key in ("acc1", "mean_per_class_recall"))


def test_eval_help_shows_json_brackets_as_written(capsys) -> None:
    code, out, _ = run(capsys, "eval", "--help")
    assert code == 0 and "[descriptions]" in out and "\\[" not in out


# -- tasks on a random model, against independent computations --


def written_out_ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    confidence, predicted = probs.max(axis=1), probs.argmax(axis=1)
    total = 0.0
    for low, high in zip(np.linspace(0, 1, bins + 1)[:-1], np.linspace(0, 1, bins + 1)[1:], strict=True):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            total += inside.mean() * abs((predicted[inside] == labels[inside]).mean() - confidence[inside].mean())
    return total


def test_zeroshot_calibration_and_ood_figures(tiny, shapes, tmp_path) -> None:
    test, val = shapes.dataset("test", 48), shapes.dataset("val", 48)
    ood_images = shapes.single_object_images("test_ood", 24)
    evaluator = Evaluator(tiny, out_dir=tmp_path, workers=0)

    def logits_of(images: list) -> torch.Tensor:
        with torch.inference_mode():
            features = F.normalize(tiny.encode_image(torch.stack([tiny.preprocess(i) for i in images])), dim=-1)
        return 100 * features @ build_zero_shot_classifier(tiny, test.classnames, test.templates)

    test_logits, val_logits = logits_of(test.images), logits_of(val.images)
    zeroshot = evaluator.zeroshot(test)
    predictions = test_logits.argmax(1).numpy()
    assert zeroshot.metrics["acc1"] == pytest.approx(skm.accuracy_score(test.labels, predictions), abs=1e-6)
    assert zeroshot.metrics["mean_per_class_recall"] == pytest.approx(skm.balanced_accuracy_score(test.labels, predictions), abs=1e-6)
    assert zeroshot.metrics["acc5"] == pytest.approx(skm.top_k_accuracy_score(test.labels, test_logits.numpy(), k=5, labels=range(8)), abs=1e-6)

    calibration = evaluator.calibration(val, test)
    temperature = calibration.metrics["temperature"]

    def val_nll(scale: float) -> float:
        return F.cross_entropy(val_logits.double() / scale, torch.tensor(val.labels)).item()

    assert val_nll(temperature) <= min(val_nll(temperature * 1.05), val_nll(temperature / 1.05)) + 1e-8  # fitted on val
    for name, scale in (("before", 1.0), ("after", temperature)):
        expected_nll = F.cross_entropy(test_logits.double() / scale, torch.tensor(test.labels)).item()
        assert calibration.metrics[f"nll_{name}"] == pytest.approx(expected_nll, rel=1e-4)
        probs = torch.softmax(test_logits.double() / scale, dim=1).numpy()
        assert calibration.metrics[f"ece_{name}"] == pytest.approx(written_out_ece(probs, np.array(test.labels)), abs=1e-5)

    ood = evaluator.ood(test, ood_images, "held-out shapes")
    concepts = build_zero_shot_classifier(tiny, test.classnames, test.templates)
    scores = [torch.softmax(logits / 100, dim=1).amax(1) for logits in (test_logits, logits_of(ood_images))]
    truth = np.r_[np.ones(len(scores[0])), np.zeros(len(scores[1]))]
    assert ood.metrics["auroc"] == pytest.approx(skm.roc_auc_score(truth, torch.cat(scores).numpy()), abs=1e-4)
    assert concepts.shape == (128, 8)

    paths = write_results([zeroshot, calibration, ood], tmp_path, "synthetic-tiny", "random-init")
    record = json.loads(paths[2].read_text())
    assert list(record)[:6] == ["dataset", "model", "pretrained", "task", "metrics", "language"]
    assert record["ood_dataset"] == "held-out shapes" and paths[0].name == "synthetic_shape_random-init_synthetic-tiny_en_zeroshot_classification.json"
    markdown, page = write_report([zeroshot, calibration, ood], tmp_path, "report")
    for plot in [*zeroshot.plots.values(), *calibration.plots.values(), *ood.plots.values()]:
        assert Image.open(plot).format == "PNG" and f"({plot.name})" in markdown.read_text() and f'src="{plot.name}"' in page.read_text()


def test_linear_probe_matches_scikit_learn_at_the_chosen_c(tiny, shapes) -> None:
    train, test = shapes.dataset("train", 80), shapes.dataset("test", 40)
    evaluator = Evaluator(tiny, workers=0)
    result = evaluator.linear_probe(train, test, c_values=(0.1, 1.0, 10.0))
    train_x, test_x = evaluator.image_features(train).double().numpy(), evaluator.image_features(test).double().numpy()
    probe = LogisticRegression(C=result.metrics["C"], max_iter=1000).fit(train_x, train.labels)
    assert result.metrics["lp_acc1"] == pytest.approx(probe.score(test_x, test.labels), abs=1e-6)


def test_the_demo_figures_are_clipforge_eval_on_the_same_images(tiny, tmp_path, capsys) -> None:
    """``SyntheticBenchmark`` (the demo's and training's figures) and ``clipforge eval --samples N`` pick the same
    images (those among the first N the task labels) and report the same accuracy as a computation by hand."""
    from clipforge.data.synthetic import SyntheticWorld
    from clipforge.eval.synthetic import SyntheticBenchmark

    samples, world = 64, SyntheticWorld()
    figures = SyntheticBenchmark(world, samples=samples, tasks=("shape", "color"), heldout_samples=0, retrieval_samples=0)(tiny)
    clipforge.save(tiny, tmp_path / "tiny.safetensors")
    code, _, err = run(capsys, "eval", "zeroshot", "--model", str(tmp_path / "tiny.safetensors"), "--data", "synthetic:shape",
                       "--data", "synthetic:color", "--samples", str(samples), "--out", str(tmp_path / "out"), "--workers", "0")
    assert code == 0, err
    for name in ("shape", "color"):
        task = world.tasks()[name]
        scenes = [world.sample("test", i) for i in range(samples)]
        kept = [(scene.image, task.label_of(scene.metadata)) for scene in scenes if task.label_of(scene.metadata) is not None]
        with torch.inference_mode():
            features = F.normalize(tiny.encode_image(torch.stack([tiny.preprocess(image) for image, _ in kept])), dim=-1)
        predictions = (features @ build_zero_shot_classifier(tiny, task.classnames, task.templates)).argmax(1)
        by_hand = (predictions == torch.tensor([label for _, label in kept])).double().mean().item()
        recorded = json.loads(next((tmp_path / "out").glob(f"synthetic_{name}_*_zeroshot_classification.json")).read_text())
        assert recorded["metrics"]["acc1"] == pytest.approx(by_hand, abs=1e-9)
        assert figures[f"acc_{name}"] == round(by_hand, 4)
    assert 0 < len(kept) < samples  # some images are left out: the task cannot label every scene


def test_perception_clip_matches_the_reference_formulas(tiny) -> None:
    """A transcription of perceptionclip_two_step.py (exp of raw logits, explicit sums) on the same embeddings."""
    factors = {"size": {"small": ["small", "tiny"], "large": ["large"]}, "place": {"any": [""], "left": ["on the left"]}}
    contexts = composite_contexts(factors)
    assert [c.descriptions for c in contexts] == [["small", "tiny"], ["small, on the left", "tiny, on the left"], ["large"], ["large, on the left"]]
    classnames = ["circle", "star", "heart"]
    features = F.normalize(torch.randn(5, 128, generator=torch.Generator().manual_seed(0)), dim=-1).double()

    def ensemble(main: str) -> torch.Tensor:
        with torch.inference_mode():
            rows = [F.normalize(tiny.encode_text(tiny.tokenize([f"{main}, {d}." for d in c.descriptions])), dim=-1).mean(0) for c in contexts]
        return torch.stack([row / row.norm() for row in rows]).double()

    logits = 20.0 * features @ torch.cat([ensemble(f"a photo of a {y}") for y in classnames]).T
    probs = logits.exp().view(5, len(classnames), len(contexts))
    probs = probs / probs.sum(dim=1, keepdim=True)
    with_class = (logits / 3.0).exp().view(5, len(classnames), len(contexts)).sum(dim=1)
    without_class = torch.softmax(20.0 * features @ ensemble("a photo of a object").T / 3.0, dim=1)
    for infer, factor_probs in (("with_class", with_class / with_class.sum(dim=1, keepdim=True)), ("without_class", without_class)):
        output = perception_clip(features.float(), build_perception_classifier(tiny, classnames, factors, infer=infer), scale=20.0, temperature=3.0)
        assert torch.allclose(output.context_probs.double(), factor_probs, atol=1e-5)
        assert torch.allclose(output.class_probs.double(), (probs * factor_probs[:, None, :]).sum(dim=2), atol=1e-5)


def test_perception_clip_through_the_runner(tiny, shapes, tmp_path) -> None:
    (tmp_path / "context.json").write_text(json.dumps({"size": {"small": ["small"], "large": ["large"]}}))
    result = Evaluator(tiny, workers=0).zeroshot(
        shapes.dataset("test", 24), method="perceptionclip", context_factors=read_context_factors(tmp_path / "context.json")
    )
    assert result.extra == {"method": "perceptionclip"} and 0 <= result.metrics["acc1"] <= 1
    (tmp_path / "bad.json").write_text(json.dumps({"size": ["small", "large"]}))
    for path, message in ((tmp_path / "missing.json", "no such file"), (tmp_path / "bad.json", "expected {factor")):
        with pytest.raises(InputError, match=message):
            read_context_factors(path)


# -- corruptions and robustness --


def test_corruptions_match_their_definitions() -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    image.putpixel((0, 0), (0, 0, 0))
    pixels = np.asarray(image) / 255
    for severity, shift in enumerate((0.1, 0.2, 0.3, 0.4, 0.5), start=1):
        hsv = skcolor.rgb2hsv(pixels)
        hsv[..., 2] = np.clip(hsv[..., 2] + shift, 0, 1)
        expected = np.round(np.clip(skcolor.hsv2rgb(hsv), 0, 1) * 255)
        assert np.abs(np.asarray(brightness(image, severity), dtype=np.float64) - expected).max() <= 1
    noisy = shot_noise(image, 4, np.random.default_rng(7))
    expected = np.round(np.clip(np.random.default_rng(7).poisson(pixels * 5) / 5, 0, 1) * 255)
    assert np.array_equal(np.asarray(noisy), expected.astype(np.uint8))

    changed = np.asarray(patch_perturbation(image, 3, np.random.default_rng(1), patch_size=8)) != np.asarray(image)
    cells = changed.any(axis=2).reshape(4, 8, 4, 8).any(axis=(1, 3))
    assert cells.sum() == round(0.2 * 16)
    for cell_row, cell_col in zip(*np.nonzero(cells), strict=True):
        assert changed[cell_row * 8 : cell_row * 8 + 8, cell_col * 8 : cell_col * 8 + 8].any(axis=2).mean() > 0.9
    for name in CORRUPTIONS:
        assert corrupt_image(image, name, 5, np.random.default_rng(0), 8).size == image.size
    with pytest.raises(InputError, match="severity: 6"):
        corrupt_image(image, "jpeg", 6, rng, 8)


def test_robustness_table_and_shifts(tiny, shapes, tmp_path) -> None:
    dataset = shapes.dataset("test", 8)
    result = Evaluator(tiny, out_dir=tmp_path, workers=0, batch_size=128).robustness(dataset, samples=8)
    rows = result.tables[0].rows
    assert [row[0] for row in rows] == list(CORRUPTIONS) and all(len(row) == 7 for row in rows)
    cells = [value for row in rows for value in row[1:6]]
    assert result.metrics["mean_corruption_acc"] == pytest.approx(np.mean(cells))
    assert all(0 <= value <= 1 for value in cells) and Image.open(result.plots["accuracy against corruption severity"]).format == "PNG"
    shift_rows = dict((name, value) for name, value in result.tables[1].rows)
    assert set(shift_rows) == {"none", "stripes", "checker", "dots", "outline", "checkerboard_background", "clutter_background"}
    assert result.metrics["acc1_clean"] == pytest.approx(Evaluator(tiny, workers=0).zeroshot(dataset).metrics["acc1"])


# -- the claims of issue #4 on the trained demo model --


@pytest.mark.slow
def test_demo_corruption_accuracy_falls_with_severity(demo_model, shapes) -> None:
    result = Evaluator(demo_model).robustness(shapes.dataset("test", 300), samples=300)
    for row in result.tables[0].rows:
        print(row)
    for name, *accuracy, _ in result.tables[0].rows:
        assert accuracy[0] >= accuracy[-1] + 0.02, name
        assert all(later <= earlier + 0.05 for earlier, later in zip(accuracy, accuracy[1:])), name
    assert result.metrics["mean_corruption_acc"] < result.metrics["acc1_clean"]


@pytest.mark.slow
def test_demo_mcm_detects_held_out_shapes_and_temperature_scaling_helps(demo_model, shapes) -> None:
    evaluator = Evaluator(demo_model)
    test = shapes.dataset("test", 600)
    ood = evaluator.ood(test, shapes.single_object_images("test_ood", 600), "synthetic/test_ood")
    calibration = evaluator.calibration(shapes.dataset("val", 600), test)
    print("MCM on held-out shapes:", ood.metrics, "calibration:", calibration.metrics)
    assert ood.metrics["auroc"] > 0.6
    assert calibration.metrics["ece_after"] <= calibration.metrics["ece_before"]


def object_mask(image: Image.Image, metadata: dict) -> np.ndarray:
    """Pixels of the first object: inside its boxes and close to its color (computed from the rendering)."""
    pixels = np.asarray(image, dtype=np.int32)
    near = np.abs(pixels - np.array(COLORS[metadata["color"]])).sum(axis=2) < 60
    inside = np.zeros(near.shape, dtype=bool)
    for x0, y0, x1, y1 in metadata["boxes"]:
        inside[y0:y1, x0:x1] = True
    return near & inside


def object_gaps(model: clipforge.CLIP, count: int) -> np.ndarray:
    """Mean Score-CAM value inside minus outside the object, for ``count`` single-object test images."""
    world = synthetic_task("shape").world
    samples = (world.sample("test", i) for i in range(20 * count))
    singles = [s for s in samples if s.metadata["second_shape"] is None][:count]
    gaps = []
    for sample in singles:
        meta = sample.metadata
        _, heatmap = explain_image(model, sample.image, f"a photo of a {meta['color']} {meta['shape']}.")
        mask = object_mask(sample.image, meta)
        assert heatmap.shape == mask.shape and mask.any() and (~mask).any()
        gaps.append(float(heatmap.numpy()[mask].mean() - heatmap.numpy()[~mask].mean()))
    return np.array(gaps)


def test_object_region_code_path_on_a_random_model(tiny) -> None:
    gaps = object_gaps(tiny, 1)
    assert np.isfinite(gaps).all() and (np.abs(gaps) <= 1).all()


@pytest.mark.slow
def test_demo_score_cam_highlights_the_object(demo_model) -> None:
    gaps = object_gaps(demo_model, 24)
    print("Score-CAM mean inside minus outside the object:", gaps.mean(), "positive in", (gaps > 0).mean())
    assert gaps.mean() > 0 and (gaps > 0).mean() > 0.5


def test_synthetic_spec_names_a_split_and_a_shift() -> None:
    """``synthetic:TASK@SPLIT+SHIFT``: the task's labels on that split's samples, rendered under the shift."""
    from clipforge.data.synthetic import SyntheticWorld, WorldConfig
    from clipforge.eval.datasets import load_dataset

    dataset = load_dataset("synthetic:shape@val+outline", samples=20)
    world = SyntheticWorld(WorldConfig())
    task = world.tasks()["shape"]
    scenes = [world.sample("val", i, shift="outline") for i in range(20)]
    kept = [scene for scene in scenes if task.label_of(scene.metadata) is not None]
    assert dataset.name == "synthetic/shape@val+outline"
    assert [image.tobytes() for image in dataset.images] == [scene.image.tobytes() for scene in kept]
    assert dataset.labels == [task.label_of(scene.metadata) for scene in kept]
    for spec, message in [("synthetic:shape@nope", "split 'nope' is not one of"), ("synthetic:shape+blurry", "shift 'blurry' is not one of")]:
        with pytest.raises(InputError, match=message):
            load_dataset(spec, samples=5)
