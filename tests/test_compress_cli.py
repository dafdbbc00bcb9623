"""``clipforge compress``, and ``--tome``/``--compress`` in ``embed`` and ``eval``, on a 2-block micro model.

References: the methods applied directly (``apply_token_reduction``, ``quantize_dynamic_int8``) to the same
weights, embeddings and zero-shot accuracy computed in the test from ``encode_image`` and a hand-built
classifier, onnxruntime outputs against PyTorch, and settings written out by hand.
"""

from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_reliability import one_error_line

import clipforge
from clipforge.cli import main
from clipforge.cli.compress import early_exit_command
from clipforge.compress.early_exit import (
    FIT_STEPS,
    SYNTHETIC_FIT_IMAGES,
    fit_exit_heads,
    load_exit_heads,
)
from clipforge.compress.quant.int8 import quantize_dynamic_int8
from clipforge.compress.records import describe_steps, parse_steps
from clipforge.compress.reduction.registry import apply_token_reduction, estimate_flops
from clipforge.compress.study import Variant, keep_ratio_for_flops
from clipforge.errors import ConfigError
from clipforge.eval.datasets import load_dataset
from clipforge.retrieval.inputs import read_embeddings

MICRO = str(Path(__file__).parent / "data" / "micro-clip.json")  # 32 px, patch 8: 17 tokens, 2 blocks
TOME_4 = {"method": "tome", "settings": {"r": 4, "inflect": 0.0, "prop_attn": True, "trace_source": False}}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.fixture(scope="module")
def base() -> clipforge.CLIP:
    torch.manual_seed(0)
    return clipforge.load(MICRO)


@pytest.fixture(scope="module")
def checkpoint(base, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("micro") / "micro.safetensors"
    clipforge.save(base, path)
    return path


def image_embeddings(model: clipforge.CLIP, images: list, batch_size: int = 8) -> torch.Tensor:
    """In batches of 8, as the report runs them: int8-dynamic quantizes activations with each batch's range."""
    with torch.inference_mode():
        pixels = torch.stack([model.preprocess(image) for image in images])
        return torch.cat([model.encode_image(batch, normalize=True).float() for batch in pixels.split(batch_size)])


def tome(model: clipforge.CLIP, r: int = 4) -> clipforge.CLIP:
    model = copy.deepcopy(model)
    apply_token_reduction(model, "tome", r=r)
    return model


PIXELS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_compress_writes_checkpoints_that_load_compressed_and_stack(tmp_path, capsys, base, checkpoint) -> None:
    code, out, err = run(capsys, "compress", "tome", "-m", checkpoint, "-o", tmp_path / "tome.safetensors", "--r", "4")
    assert code == 0, err
    assert "[17, 13]" in out  # tokens entering the two blocks: 17, then 17 - 4
    loaded = clipforge.load(tmp_path / "tome.safetensors")
    assert loaded.compression == TOME_4
    with torch.inference_mode():
        assert torch.equal(loaded.encode_image(PIXELS), tome(base).encode_image(PIXELS))
    code, _, err = run(capsys, "compress", "int8", "-m", tmp_path / "tome.safetensors", "-o", tmp_path / "tome_int8.safetensors")
    assert code == 0, err
    stacked = clipforge.load(tmp_path / "tome_int8.safetensors")
    assert stacked.compression == {"steps": [TOME_4, {"method": "int8-dynamic", "settings": {"per_channel": True}}]}
    with torch.inference_mode():
        assert torch.equal(stacked.encode_image(PIXELS), quantize_dynamic_int8(tome(base)).encode_image(PIXELS))


def test_options_and_set_make_the_same_settings(tmp_path, capsys, checkpoint) -> None:
    argv = ("compress", "pitome", "-m", checkpoint, "-o", tmp_path / "p.safetensors", "--keep-ratio", "0.8", "--set", "margin=0.5", "--set", "metric=tokens")
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    settings = clipforge.load(tmp_path / "p.safetensors").compression["settings"]
    assert (settings["keep_ratio"], settings["margin"], settings["metric"]) == (0.8, 0.5, "tokens")


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["compress", "tome", "--r", "2", "--set", "r=3"], "--set r: also given as --r"),
        (["compress", "tome"], "remove no tokens"),
        (["compress", "pitome", "--set", "keep_ratio=nope"], "'keep_ratio' must be a number"),
        (["compress", "evit", "--set", "layers=[5]"], "out of range"),
        (["compress", "evit", "--set", "layers=[1]"], "remove no tokens before the last image block"),
        (["compress", "tome", "--r", "2", "--set", "speed"], "expected key=value"),
        (["compress", "evit", "--set", "fuse_token=maybe"], "evit setting 'fuse_token' must be true or false (or 1, 0), got 'maybe'"),
        (["compress", "evit", "--set", "layers=x"], "evit setting 'layers' must be a list of ints (e.g. 3,6,9) or null, got 'x'"),
        (["compress", "pitome", "--keep-ratio", "0.8", "--set", "alpha=x"], "pitome setting 'alpha' must be a number, got 'x'"),
        (["compress", "pitome", "--keep-ratio", "0.8", "--set", "margin=x"], "pitome setting 'margin' must be a number, got 'x'"),
        (["compress", "pitome", "--keep-ratio", "0.8", "--set", "bsm_layers=x"], "pitome setting 'bsm_layers' must be an int, got 'x'"),
        (["compress", "tome", "--r", "2", "--set", "inflect=x"], "tome setting 'inflect' must be a number, got 'x'"),
        (["compress", "tome", "--r", "2", "--set", "prop-attn=maybe"], "tome setting 'prop_attn' must be true or false (or 1, 0), got 'maybe'"),
    ],
)
def test_bad_settings_are_one_line_errors(tmp_path, capsys, checkpoint, argv, needle) -> None:
    code, _, err = run(capsys, *argv, "-m", checkpoint, "-o", tmp_path / "x.safetensors")
    assert code == 2 and needle in one_error_line(err)
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize(
    "method,argv,settings",
    [
        ("evit", ["--set", "fuse_token=False"], {"fuse_token": False}),
        ("evit", ["--keep-rate", "0.5", "--set", "layers=0"], {"keep_rate": 0.5, "layers": [0]}),
        ("evit", ["--keep-rate", "0.5", "--set", "layers=0,1"], {"keep_rate": 0.5, "layers": [0, 1]}),
        ("tome", ["--r", "4", "--set", "prop_attn=False"], {"r": 4, "prop_attn": False}),
        ("pitome", ["--keep-ratio", "0.8", "--set", "prop-attn=0", "--set", "margin=0.5"], {"keep_ratio": 0.8, "prop_attn": False, "margin": 0.5}),
    ],
)
def test_set_values_are_read_as_the_settings_types(tmp_path, capsys, base, checkpoint, method, argv, settings) -> None:
    """``--set`` text gives the model the method gets from the same settings as Python values."""
    code, _, err = run(capsys, "compress", method, *argv, "-m", checkpoint, "-o", tmp_path / "x.safetensors")
    assert code == 0, err
    loaded = clipforge.load(tmp_path / "x.safetensors")
    recorded = loaded.compression["settings"]
    assert all(recorded[key] == value and type(recorded[key]) is type(value) for key, value in settings.items()), recorded
    reference = copy.deepcopy(base)
    apply_token_reduction(reference, method, **settings)
    with torch.inference_mode():
        assert torch.equal(loaded.encode_image(PIXELS), reference.encode_image(PIXELS))


def test_a_second_token_reduction_is_refused(tmp_path, capsys, checkpoint) -> None:
    run(capsys, "compress", "tome", "-m", checkpoint, "-o", tmp_path / "tome.safetensors", "--r", "2")
    code, _, err = run(capsys, "compress", "pitome", "-m", tmp_path / "tome.safetensors", "-o", tmp_path / "x.safetensors", "--keep-ratio", "0.8")
    assert code == 2 and "already has the token reduction tome" in err


def test_embed_with_tome_and_compress_matches_the_method_applied_directly(tmp_path, capsys, base, checkpoint) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(3)]
    for index, image in enumerate(images):
        image.save(folder / f"{index}.png")
    reloaded = [Image.open(folder / f"{index}.png").convert("RGB") for index in range(3)]
    pitome = copy.deepcopy(base)
    apply_token_reduction(pitome, "pitome", keep_ratio=0.8)
    for options, reference in ((["--tome", "4"], tome(base)), (["--compress", "pitome:keep_ratio=0.8"], pitome)):
        out = tmp_path / "e.parquet"
        code, _, err = run(capsys, "embed", folder, "-m", checkpoint, "-o", out, "--workers", "0", *options)
        assert code == 0, err
        sources, vectors = read_embeddings(out)
        assert [Path(source).name for source in sources] == ["0.png", "1.png", "2.png"]
        assert np.allclose(vectors, image_embeddings(reference, reloaded).numpy(), atol=1e-6)
    assert not np.allclose(vectors, image_embeddings(base, reloaded).numpy(), atol=1e-4)
    code, _, err = run(capsys, "embed", folder, "-m", checkpoint, "-o", tmp_path / "store", "--tome", "4")
    assert code == 2 and "compressed checkpoint first" in err


def test_eval_with_tome_names_the_compression_and_scores_the_merged_model(tmp_path, capsys, base, checkpoint) -> None:
    argv = ("eval", "zeroshot", "-m", checkpoint, "-d", "synthetic:color", "--samples", "24", "--workers", "0", "-o", tmp_path, "--tome", "4")
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    [result_file] = tmp_path.glob("*zeroshot_classification.json")
    result = json.loads(result_file.read_text())
    assert result["model"] == "micro-clip+tome:r=4"
    dataset = load_dataset("synthetic:color", samples=24)
    merged = tome(base)
    with torch.inference_mode():
        prompts = [[template.format(c=name) for template in dataset.templates] for name in dataset.classnames]
        classes = torch.stack([F.normalize(F.normalize(merged.encode_text(merged.tokenize(p)), dim=-1).mean(0), dim=0) for p in prompts])
    predictions = (image_embeddings(merged, dataset.images) @ classes.T).argmax(1)
    assert result["metrics"]["acc1"] == pytest.approx((predictions == torch.tensor(dataset.labels)).float().mean().item())


def test_eval_titles_a_bf16_checkpoint_with_the_format_it_runs_in(tmp_path, capsys, checkpoint) -> None:
    code, _, err = run(capsys, "compress", "bf16", "-m", checkpoint, "-o", tmp_path / "bf16.safetensors")
    assert code == 0, err
    argv = ("eval", "zeroshot", "-m", tmp_path / "bf16.safetensors", "-d", "synthetic:color", "--samples", "8", "--workers", "0", "-o", tmp_path / "e")
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert "clipforge eval (bf16)" in out and "(fp32)" not in out


@pytest.mark.parametrize("engine", ["onnx", "openvino"])
def test_exports_load_as_models_and_embed_like_pytorch(tmp_path, capsys, base, checkpoint, engine) -> None:
    code, out, err = run(capsys, "compress", engine, "-m", checkpoint, "-o", tmp_path / "export", "--tome", "2")
    assert code == 0, err
    assert "fp32: max |export - torch|" in out and "tome:r=2" in out
    merged = copy.deepcopy(base)
    apply_token_reduction(merged, "tome", r=2)
    with torch.inference_mode():
        expected = merged.encode_image(PIXELS)
    assert (clipforge.load(tmp_path / "export").encode_image(PIXELS) - expected).abs().max() <= 1e-4
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    reloaded = [Image.open(folder / f"{index}.png").convert("RGB") for index in range(3)]
    code, _, err = run(capsys, "embed", folder, "-m", tmp_path / "export", "-o", tmp_path / "e.parquet", "--workers", "0")
    assert code == 0, err
    _, vectors = read_embeddings(tmp_path / "e.parquet")
    expected_vectors = image_embeddings(merged, reloaded).numpy()
    assert np.abs(vectors - expected_vectors).max() <= 1e-4
    run(capsys, "embed", folder, "-m", tmp_path / "export", "-o", tmp_path / "store", "--workers", "0")
    run(capsys, "index", tmp_path / "store")
    code, out, err = run(capsys, "search", "a red circle", "--index", tmp_path / "store", "-k", "3", "--json")
    assert code == 0, err
    with torch.inference_mode():
        query = F.normalize(merged.encode_text(merged.tokenize(["a red circle"])), dim=-1).numpy()[0]
    scores = sorted(expected_vectors @ query, reverse=True)
    np.testing.assert_allclose([hit["score"] for hit in json.loads(out)], scores, atol=1e-4)
    run(capsys, "compress", "int8", "-m", checkpoint, "-o", tmp_path / "int8.safetensors")
    code, _, err = run(capsys, "compress", engine, "-m", tmp_path / "int8.safetensors", "-o", tmp_path / "export2")
    assert code == 2 and "cannot be exported" in err


def test_openvino_int8_needs_readable_calibration_data(tmp_path, capsys, checkpoint) -> None:
    code, _, err = run(capsys, "compress", "openvino", "-m", checkpoint, "-o", tmp_path / "a", "--int8")
    assert code == 2 and "--calibration" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "compress", "openvino", "-m", checkpoint, "-o", tmp_path / "b", "--int8", "--calibration", tmp_path / "none")
    assert code == 2 and "none" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "compress", "openvino", "-m", checkpoint, "-o", tmp_path / "c", "--calibration", "synthetic:shape")
    assert code == 2 and "--calibration: only int8 export calibrates" in one_error_line(err)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("engine", ["onnx", "openvino"])
def test_evit_checkpoints_export_like_pytorch(tmp_path, capsys, base, checkpoint, engine) -> None:
    code, _, err = run(capsys, "compress", "evit", "-m", checkpoint, "-o", tmp_path / "evit.safetensors", "--keep-rate", "0.5")
    assert code == 0, err
    code, out, err = run(capsys, "compress", engine, "-m", tmp_path / "evit.safetensors", "-o", tmp_path / "export")
    assert code == 0, err
    pruned = copy.deepcopy(base)
    apply_token_reduction(pruned, "evit", keep_rate=0.5)
    with torch.inference_mode():
        expected, full = pruned.encode_image(PIXELS), base.encode_image(PIXELS)
    found = clipforge.load(tmp_path / "export").encode_image(PIXELS)
    assert (found - expected).abs().max() <= 1e-4 < (found - full).abs().max()


@pytest.mark.parametrize("engine,name", [("onnx", "ONNX"), ("openvino", "OpenVINO")])
def test_info_describes_an_export_and_other_verbs_refuse_it_in_one_line(tmp_path, capsys, base, checkpoint, engine, name) -> None:
    export = tmp_path / "export"
    assert run(capsys, "compress", engine, "-m", checkpoint, "-o", export, "--tome", "2")[0] == 0
    code, out, err = run(capsys, "info", export)
    assert code == 0, err
    described = json.loads(out)
    with torch.inference_mode():
        width = base.encode_image(PIXELS).shape[-1]
    assert described["export"] == {"engine": "onnxruntime" if engine == "onnx" else "openvino", "runs": "fp32", "variants": ["fp32"], "embed_dim": width}
    assert described["compression"] == "tome:r=2" and described["config"]["name"] == base.config.name
    refusals = {
        "convert": ["convert", export, tmp_path / "out" / "x.safetensors"],
        "convert --to hf": ["convert", export, tmp_path / "out" / "hf", "--to", "hf"],
        "compress bf16": ["compress", "bf16", "-m", export, "-o", tmp_path / "out" / "x.safetensors"],
    }
    for argv in refusals.values():
        code, _, err = run(capsys, *argv)
        command = "compress" if argv[0] == "compress" else "convert"
        assert code == 2 and one_error_line(err) == f"error: {export} is an {name} export: {command} needs the PyTorch checkpoint it was made from"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("opset", ["too high", "99"])
def test_onnx_opsets_are_bounded_by_the_installed_exporter(tmp_path, capsys, checkpoint, opset) -> None:
    """The highest opset torch's TorchScript exporter supports exports; one more (or 99) is one line, nothing written."""
    import onnx
    from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET as highest

    opset = str(highest + 1) if opset == "too high" else opset
    code, _, err = run(capsys, "compress", "onnx", "-m", checkpoint, "-o", tmp_path / "new" / "export", "--opset", opset)
    assert code == 2 and one_error_line(err) == f"error: opset {opset}: torch {torch.__version__}'s ONNX exporter writes opsets 14 to {highest}"
    assert not (tmp_path / "new").exists()
    code, _, err = run(capsys, "compress", "onnx", "-m", checkpoint, "-o", tmp_path / "export", "--opset", highest)
    assert code == 0, err
    assert [entry.version for entry in onnx.load(tmp_path / "export" / "image_encoder.onnx").opset_import if entry.domain == ""] == [highest]


def test_a_failed_export_leaves_no_directory(tmp_path, capsys, monkeypatch, checkpoint) -> None:
    """The float graphs are written, then int8 quantization fails: the directories the command made go again."""
    from clipforge.compress import export_onnx

    def failing(source, target):
        raise ConfigError(f"{target}: quantization failed")

    monkeypatch.setattr(export_onnx, "quantize_onnx_int8", failing)
    code, _, err = run(capsys, "compress", "onnx", "-m", checkpoint, "-o", tmp_path / "new" / "export", "--int8")
    assert code == 2 and "quantization failed" in one_error_line(err)
    assert not (tmp_path / "new").exists()


def test_outputs_that_would_not_load_back_are_refused(tmp_path, capsys, checkpoint) -> None:
    """Checkpoints named otherwise than .safetensors, and a compressed checkpoint as a Hugging Face directory."""
    code, _, err = run(capsys, "compress", "bf16", "-m", checkpoint, "-o", tmp_path / "y.onnx")
    assert code == 2 and one_error_line(err) == f"error: --out {tmp_path / 'y.onnx'}: clipforge writes a .safetensors file here; end the name with .safetensors"
    for argv in (("merge", "soup", checkpoint, checkpoint, "--base", checkpoint, "-o", tmp_path / "m.json"),
                 ("adapt", "tip-adapter", "-m", checkpoint, "--train", "synthetic:color", "--shots", "1", "-o", tmp_path / "a.pt")):
        code, _, err = run(capsys, *argv)
        assert code == 2 and "end the name with .safetensors" in one_error_line(err)
    code, _, err = run(capsys, "convert", checkpoint, tmp_path / "out_noext")
    assert code == 2 and "DESTINATION" in one_error_line(err) and "end the name with .safetensors" in err
    assert run(capsys, "compress", "tome", "-m", checkpoint, "-o", tmp_path / "tome.safetensors", "--r", "2")[0] == 0
    code, _, err = run(capsys, "convert", tmp_path / "tome.safetensors", tmp_path / "hf", "--to", "hf")
    assert code == 2 and "records tome:r=2, which a Hugging Face directory cannot hold" in one_error_line(err)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tome.safetensors"]


def test_early_exit_trains_and_saves_heads(tmp_path, capsys, base, checkpoint) -> None:
    argv = ("compress", "early-exit", "-m", checkpoint, "-o", tmp_path / "heads.safetensors", "--steps", "3", "--samples", "16",
            "--train-samples", "16", "--repeats", "1", "--batch-size", "8", "--threshold", "0.5", "-d", "synthetic:color")
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert "blocks run" in out and "wall time" in out
    heads, threshold = load_exit_heads(tmp_path / "heads.safetensors", base)
    assert threshold == 0.5 and heads.layers == [0]


def test_early_exit_command_defaults_are_the_librarys_training_budget() -> None:
    """The command's defaults are the budget the slow claim test and the benchmark run (``fit_exit_heads``')."""
    defaults = {name: p.default for name, p in inspect.signature(early_exit_command).parameters.items()}
    assert (defaults["steps"], defaults["train_samples"]) == (FIT_STEPS, SYNTHETIC_FIT_IMAGES)
    assert inspect.signature(fit_exit_heads).parameters["steps"].default == FIT_STEPS


def test_report_rows_match_a_hand_computation(tmp_path, capsys, base, checkpoint) -> None:
    argv = ("compress", "report", "-m", checkpoint, "--task", "color", "--samples", "16", "--batch-size", "8", "--repeats", "1",
            "--variant", "tome:r=4", "--variant", "int8", "-o", tmp_path)
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    assert (tmp_path / "speed_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    rows = {row["name"]: row for row in report["variants"]}
    assert list(rows) == ["base", "tome:r=4", "int8-dynamic"]
    dataset = load_dataset("synthetic:color", samples=16)
    base_features = image_embeddings(base, dataset.images)
    for name, model in (("tome:r=4", tome(base)), ("int8-dynamic", quantize_dynamic_int8(base))):
        cosine = F.cosine_similarity(image_embeddings(model, dataset.images), base_features).mean().item()
        assert rows[name]["cosine"] == pytest.approx(cosine, abs=1e-5)
    assert rows["tome:r=4"]["relative_flops"] == pytest.approx(flops_by_hand([17, 13, 9]) / flops_by_hand([17, 17, 17]))
    assert rows["base"]["agreement"] == 1.0 and rows["int8-dynamic"]["relative_flops"] == 1.0


def flops_by_hand(counts: list[int], width: int = 48, hidden: int = 192) -> int:
    """PiToMe's per-block count: attention 4NC² + 2N²C on the tokens entering, MLP 2N'C·hidden on those leaving."""
    return sum(4 * n * width**2 + 2 * n * n * width + 2 * m * width * hidden for n, m in zip(counts, counts[1:]))


def test_pitome_keep_ratio_for_equal_flops_is_the_closest_on_its_grid(base) -> None:
    target = estimate_flops(base, "tome", r=4)
    ratio = keep_ratio_for_flops(base, target)
    gap = abs(estimate_flops(base, "pitome", keep_ratio=ratio) - target)
    assert all(gap <= abs(estimate_flops(base, "pitome", keep_ratio=k / 200) - target) for k in range(100, 201))


def test_variant_specs_round_trip_and_refuse_two_reductions() -> None:
    variant = Variant.parse("bf16+tome:r=8,inflect=-1")
    assert variant.name == "bf16+tome:r=8,inflect=-1" and variant.number_format == "bf16" and variant.reduction["settings"]["r"] == 8
    assert list(parse_steps(describe_steps(variant.steps))) == list(variant.steps)
    assert Variant.parse("base").steps == ()
    assert Variant.parse("evit:fuse_token=False").name == "evit:fuse_token=false"
    with pytest.raises(ConfigError, match="takes one token reduction"):
        Variant.parse("tome:r=2+pitome")


def test_speed_accuracy_plot_names_every_variant_without_overlap(tmp_path, monkeypatch) -> None:
    """Close points with long names (the report's usual case): every name stays whole, inside the picture, apart."""
    import matplotlib.pyplot as plt

    from clipforge.compress.study import VariantResult, write_report

    names = ["base", "bf16", "tome:r=1", "tome:r=3", "tome:r=5", "pitome:keep_ratio=0.8125", "evit", "int8", "bf16+tome:r=3"]
    results = [VariantResult(name, 100 + i, 1.0, 1.0, 0.5 + 0.001 * i, 1.0, 1.0) for i, name in enumerate(names)]
    kept = []
    monkeypatch.setattr(plt, "close", kept.append)
    write_report(results, tmp_path, title="t")
    figure = kept[0]
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    legend_texts = figure.legends[0].get_texts()
    assert [text.get_text().split(None, 1)[1] for text in legend_texts] == names
    boxes = [text.get_window_extent(renderer) for text in legend_texts]
    inside = figure.bbox
    assert all(inside.x0 <= b.x0 and b.x1 <= inside.x1 and inside.y0 <= b.y0 and b.y1 <= inside.y1 for b in boxes)
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
