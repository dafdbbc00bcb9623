"""Merging (``clipforge.merge``): each method against hand-computed merges of small tensors and against the
papers' pseudo-code written out here on flattened weights (the official code's layout), the checks on the
models merged, and ``clipforge merge`` on the command line.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

import clipforge
from clipforge.cli import main
from clipforge.errors import CheckpointError, InputError
from clipforge.io.state_dict import weights_fingerprint
from clipforge.merge import (
    HeldOut,
    greedy_soup,
    opcm,
    task_arithmetic,
    ties,
    uniform_soup,
)
from clipforge.merge.opcm import linear_maps, project_out
from clipforge.merge.ties import elect_signs, trim_threshold

MICRO = str(Path(__file__).parent / "data" / "micro-clip.json")  # 32 px, 2 image blocks, 1 text block


def micro(seed: int = 0) -> clipforge.CLIP:
    torch.manual_seed(seed)
    return clipforge.load(MICRO)


def fine_tune(base: clipforge.CLIP, seed: int, scale: float = 0.01) -> clipforge.CLIP:
    """``base`` plus a seeded Gaussian task vector (every entry), as a stand-in for a fine-tune."""
    model = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return model


def flat(model: clipforge.CLIP) -> torch.Tensor:
    return torch.cat([value.flatten() for _, value in sorted(model.state_dict().items())])


def unflat(vector: torch.Tensor, like: clipforge.CLIP) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for key, value in sorted(like.state_dict().items()):
        out[key] = vector[start : start + value.numel()].view_as(value)
        start += value.numel()
    return out


def assert_weights(model: clipforge.CLIP, expected: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    state = model.state_dict()
    for key, value in expected.items():
        assert torch.allclose(state[key], value, atol=atol), key


@pytest.fixture(scope="module")
def base() -> clipforge.CLIP:
    return micro(0)


@pytest.fixture(scope="module")
def tunes(base) -> list[clipforge.CLIP]:
    return [fine_tune(base, seed) for seed in (1, 2, 3)]


# -- hand-computed merges of small tensors --


def test_uniform_soup_and_task_arithmetic_by_hand(base) -> None:
    """One matrix changed by hand in each model, everything else equal to the base."""
    a, b, c = (copy.deepcopy(base) for _ in range(3))
    theta0 = base.visual.proj.detach().clone()
    with torch.no_grad():
        a.visual.proj[0, 0] += 3.0
        b.visual.proj[0, 0] -= 1.0
        b.visual.proj[1, 2] += 2.0
        c.visual.proj[1, 2] += 4.0
    soup = uniform_soup(base, [a, b, c]).visual.proj.detach()
    expected = theta0.clone()
    expected[0, 0] += (3.0 - 1.0 + 0.0) / 3
    expected[1, 2] += (0.0 + 2.0 + 4.0) / 3
    assert torch.allclose(soup, expected, atol=1e-6)
    merged = task_arithmetic(base, [a, b, c], scaling=0.5).visual.proj.detach()
    expected = theta0.clone()
    expected[0, 0] += 0.5 * (3.0 - 1.0)
    expected[1, 2] += 0.5 * (2.0 + 4.0)
    assert torch.allclose(merged, expected, atol=1e-6)
    assert torch.equal(base.visual.proj, theta0)  # the caller's models are left alone


class ProjShift:
    """A held-out "accuracy" made up for the test: −|mean(visual.proj − θ₀'s) − 0.01|."""

    def __init__(self, base: clipforge.CLIP) -> None:
        self.theta0 = base.visual.proj.detach().clone()

    def score(self, model: clipforge.CLIP) -> float:
        return -abs(float((model.visual.proj - self.theta0).mean()) - 0.01)


def test_greedy_soup_by_hand(base) -> None:
    """Shifts 0.012, 0.008, 0.015 score −0.002, −0.002, −0.005 → order a, b (tie: given order), c; (a+b)/2
    scores 0 (kept), (a+b+c)/3 = 0.01167 scores −0.00167 (not kept)."""
    models = []
    for shift in (0.012, 0.008, 0.015):
        model = copy.deepcopy(base)
        with torch.no_grad():
            model.visual.proj.add_(shift)
        models.append(model)
    soup = greedy_soup(base, models, ProjShift(base))
    assert torch.allclose(soup.visual.proj, base.visual.proj + 0.01, atol=1e-6)
    record = soup.provenance["merge"]
    assert record["order"] == [0, 1, 2] and record["coefficients"] == [0.5, 0.5, 0.0]
    assert [item["kept"] for item in record["ingredients"]] == [True, True, False]
    assert [item["held_out_accuracy"] for item in record["ingredients"]] == pytest.approx([-0.002, -0.002, -0.005], abs=1e-6)
    assert record["held_out_accuracy"] == pytest.approx(0.0, abs=1e-6)


def test_ties_pieces_by_hand() -> None:
    vector = {"a": torch.tensor([0.1, -0.5, 0.3]), "b": torch.tensor([[2.0, -0.05]])}
    # 5 entries, keep 40%: k = 2, the threshold is the (5 − 2) = 3rd smallest magnitude, 0.3 (kept: |τ| ≥ 0.3)
    assert trim_threshold(vector, 0.4) == pytest.approx(0.3)
    assert trim_threshold(vector, 1.0) == 0.0
    signs = elect_signs({"a": torch.tensor([0.2, -1.0, 0.0]), "b": torch.tensor([[0.0, 3.0]])})
    # signs +, −, 0, 0, +: the majority (+1) fills the zeros
    assert signs["a"].tolist() == [1, -1, 1] and signs["b"].tolist() == [[1, 1]]


def test_ties_by_hand(base) -> None:
    """Three task vectors on three entries of one matrix (keep = 1: no trimming)."""
    models = [copy.deepcopy(base) for _ in range(3)]
    theta0 = base.visual.proj.detach().clone()
    deltas = [(2.0, -1.0, 0.5), (-1.0, -3.0, 0.5), (4.0, 1.0, -2.0)]
    with torch.no_grad():
        for model, delta in zip(models, deltas, strict=True):
            for column, value in enumerate(delta):
                model.visual.proj[0, column] += value
    merged = ties(base, models, keep=1.0, scaling=1.0).visual.proj.detach()
    # entry 0: sum +5 → keep 2, 4 → 3; entry 1: sum −3 → keep −1, −3 → −2; entry 2: sum −1 → keep −2 → −2
    expected = theta0.clone()
    expected[0, :3] += torch.tensor([3.0, -2.0, -2.0])
    assert torch.allclose(merged, expected, atol=1e-6)


def rotation(cos: float, sin: float, axes: tuple[int, int]) -> torch.Tensor:
    matrix = torch.eye(3)
    i, j = axes
    matrix[i, i], matrix[i, j], matrix[j, i], matrix[j, j] = cos, -sin, sin, cos
    return matrix


def test_opcm_projection_by_hand() -> None:
    """τ̄ = Q diag(3, 2, 1) Rᵀ: singular values 3, 2, 1, cumulative shares 0.5, 0.83, 1. With α = 0.6 the
    split is r = 1: the (0, 0) coordinate and (with zero_diagonal) the diagonal are removed from Qᵀ τ R."""
    q, r = rotation(0.6, 0.8, (0, 1)), rotation(0.8, 0.6, (1, 2))
    merged = q @ torch.diag(torch.tensor([3.0, 2.0, 1.0])) @ r.T
    coordinates = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    task = q @ coordinates @ r.T
    diagonal_too = torch.tensor([[0.0, 2.0, 3.0], [4.0, 0.0, 6.0], [7.0, 8.0, 0.0]])
    block_only = torch.tensor([[0.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    assert torch.allclose(project_out(merged, task, 0.6, zero_diagonal=True), q @ diagonal_too @ r.T, atol=1e-5)
    assert torch.allclose(project_out(merged, task, 0.6, zero_diagonal=False), q @ block_only @ r.T, atol=1e-5)
    # α = 0.9: r = 2, the top-left 2 × 2 block goes; α = 0.4: r = 0 (σ₁ alone passes it), only the diagonal
    block_2 = torch.tensor([[0.0, 0.0, 3.0], [0.0, 0.0, 6.0], [7.0, 8.0, 9.0]])
    assert torch.allclose(project_out(merged, task, 0.9, zero_diagonal=False), q @ block_2 @ r.T, atol=1e-5)
    assert torch.allclose(project_out(merged, task, 0.4, zero_diagonal=False), task, atol=1e-5)
    # the invariants: τ̄ itself is removed entirely; a task with only off-diagonal coordinates outside the block stays
    assert torch.allclose(project_out(merged, merged, 0.6), torch.zeros(3, 3), atol=1e-5)
    off = q @ torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 3.0, 0.0]]) @ r.T
    assert torch.allclose(project_out(merged, off, 0.6), off, atol=1e-5)


def test_opcm_rescaling_by_hand(base) -> None:
    """Two task vectors with disjoint support and no linear map touched (biases only): no projection, so
    θ⁽²⁾ = θ₀ + (τ₁ + τ₂)/λ₂ with λ₂ = ‖τ₁ + τ₂‖ / mean(‖τ₁‖, ‖τ₂‖) = 5 / 3.5 (‖τ₁‖ = 3, ‖τ₂‖ = 4)."""
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    key = "visual.ln_post.bias"
    theta0 = base.state_dict()[key].clone()
    with torch.no_grad():
        a.state_dict()[key][0] += 3.0
        b.state_dict()[key][1] += 4.0
    merged = opcm(base, [a, b])
    scaling = 5.0 / 3.5
    expected = theta0.clone()
    expected[0] += 3.0 / scaling
    expected[1] += 4.0 / scaling
    assert torch.allclose(merged.state_dict()[key], expected, atol=1e-6)
    assert merged.provenance["merge"]["coefficients"]["lambdas"] == pytest.approx([1.0, scaling])
    assert merged.provenance["merge"]["task_vector_norms"] == pytest.approx([3.0, 4.0])


# -- against the papers' pseudo-code on flattened weights --


def test_ties_matches_the_pseudo_code(base, tunes) -> None:
    theta0 = flat(base)
    vectors = torch.stack([flat(model) - theta0 for model in tunes])
    d = vectors.shape[1]
    kth = vectors.abs().kthvalue(d - int(d * 0.2), dim=1, keepdim=True).values
    vectors = vectors * (vectors.abs() >= kth)
    sign = torch.sign(vectors.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    selected = vectors * torch.where(sign > 0, vectors > 0, vectors < 0)
    merged = selected.sum(0) / (selected != 0).sum(0).clamp(min=1)
    expected = unflat(theta0 + 1.3 * merged, base)
    assert_weights(ties(base, tunes, keep=0.2, scaling=1.3), expected, atol=1e-5)


def test_opcm_matches_the_pseudo_code(base, tunes) -> None:
    """The research pseudo-code with full-matrix SVDs (the code under test uses reduced ones); q, k, v
    projected as three matrices."""
    theta0 = base.state_dict()
    maps = linear_maps(base)

    def projected(merged_tv: torch.Tensor, task_tv: torch.Tensor) -> torch.Tensor:
        u, s, vh = torch.linalg.svd(merged_tv, full_matrices=True)
        split = int(((s.cumsum(0) / s.sum()) > 0.5).float().argmax())
        coordinates = u.T @ task_tv @ vh.T
        coordinates.diagonal().fill_(0)
        coordinates[:split, :split] = 0
        return u @ coordinates @ vh

    merged = {key: value.clone() for key, value in tunes[0].state_dict().items()}
    norms = [float((flat(tunes[0]) - flat(base)).norm())]
    previous = 1.0
    for model in tunes[1:]:
        norms.append(float((flat(model) - flat(base)).norm()))
        new = {}
        for key, value in merged.items():
            merged_tv, task_tv = value - theta0[key], model.state_dict()[key] - theta0[key]
            if key in maps:
                task_tv = torch.cat([projected(m, t) for m, t in zip(merged_tv.chunk(maps[key]), task_tv.chunk(maps[key]), strict=True)])
            new[key] = previous * merged_tv + task_tv
        scaling = float(torch.cat([v.flatten() for v in new.values()]).norm()) / (sum(norms) / len(norms))
        merged = {key: theta0[key] + value / scaling for key, value in new.items()}
        previous = scaling
    result = opcm(base, tunes)
    assert_weights(result, merged, atol=1e-5)
    assert result.provenance["merge"]["coefficients"]["lambdas"][-1] == pytest.approx(previous, rel=1e-5)
    merged_norm = float((flat(result) - flat(base)).norm())
    assert merged_norm == pytest.approx(sum(norms) / len(norms), rel=1e-5)  # ‖τ̄‖ follows the mean norm
    assert sorted(maps) == sorted(
        [k for k in theta0 if k.endswith(("out_proj.weight", "c_fc.weight", "c_proj.weight", "in_proj_weight"))]
        + ["visual.proj", "text_projection"]
    )
    assert set(maps.values()) == {1, 3} and all(maps[k] == 3 for k in maps if k.endswith("in_proj_weight"))


def test_opcm_continues_an_earlier_merge(tmp_path, base, tunes) -> None:
    """Merging a, b, then the result with c equals merging a, b, c (the state travels in the checkpoint)."""
    at_once = opcm(base, tunes)
    opcm(base, tunes[:2], out=tmp_path / "ab.safetensors")
    later = opcm(base, [tmp_path / "ab.safetensors", tunes[2]])
    assert_weights(later, at_once.state_dict(), atol=1e-6)
    assert len(later.provenance["merge"]["ingredients"]) == 3
    with pytest.raises(InputError, match="alpha=0.5"):
        opcm(base, [tmp_path / "ab.safetensors", tunes[2]], alpha=0.3)


# -- checks and records --


def test_checkpoint_records_method_ingredients_and_coefficients(tmp_path, base, tunes) -> None:
    clipforge.save(base, tmp_path / "base.safetensors")
    paths = []
    for i, model in enumerate(tunes):
        paths.append(tmp_path / f"ft{i}.safetensors")
        clipforge.save(model, paths[-1])
    merged = task_arithmetic(tmp_path / "base.safetensors", paths, scaling=0.4, out=tmp_path / "ta.safetensors")
    loaded = clipforge.load(tmp_path / "ta.safetensors")
    assert_weights(loaded, merged.state_dict())
    record = loaded.provenance
    assert record["source"] == "merge:task-arithmetic"
    assert record["base"] == {"source": str(tmp_path / "base.safetensors"), "fingerprint": weights_fingerprint(base.state_dict())}
    assert record["merge"]["coefficients"] == {"scaling": 0.4}
    assert [item["source"] for item in record["merge"]["ingredients"]] == [str(p) for p in paths]
    assert [item["fingerprint"] for item in record["merge"]["ingredients"]] == [weights_fingerprint(m.state_dict()) for m in tunes]
    # a merged model comes from the same base: it can be merged again
    assert uniform_soup(tmp_path / "base.safetensors", [tmp_path / "ta.safetensors", paths[0]]).provenance["merge"]["method"] == "uniform-soup"


def test_models_in_open_clip_and_hugging_face_formats(tmp_path, base, tunes) -> None:
    """Any checkpoint ``clipforge.load`` reads: a bare open_clip state dict (read with the base's architecture)
    and a Hugging Face ``CLIPModel`` directory merge as the same weights in clipforge files do."""
    from clipforge.io.hf import save_hf

    torch.save(tunes[0].state_dict(), tmp_path / "open_clip.bin")
    save_hf(tunes[1], tmp_path / "hf")
    merged = uniform_soup(base, [tmp_path / "open_clip.bin", tmp_path / "hf"])
    expected = {key: (tunes[0].state_dict()[key] + tunes[1].state_dict()[key]) / 2 for key in tunes[0].state_dict()}
    assert_weights(merged, expected, atol=1e-6)


def test_merged_checkpoint_loads_in_open_clip(tmp_path, base, tunes) -> None:
    """The merged file holds open_clip's parameter names and shapes: open_clip loads it strictly and agrees."""
    import open_clip
    from safetensors.torch import load_file

    ties(base, tunes, out=tmp_path / "ties.safetensors")
    config = json.loads(Path(MICRO).read_text())
    reference = open_clip.CLIP(embed_dim=config["embed_dim"], vision_cfg=config["vision_cfg"], text_cfg=config["text_cfg"]).eval()
    reference.load_state_dict(load_file(tmp_path / "ties.safetensors"), strict=True)
    merged = clipforge.load(tmp_path / "ties.safetensors")
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(reference.encode_image(pixels), merged.encode_image(pixels), atol=1e-5)


def test_fingerprint_is_the_values_not_the_format(tmp_path, base) -> None:
    state = base.state_dict()
    assert weights_fingerprint(state) == weights_fingerprint(dict(reversed(list(state.items()))))
    assert weights_fingerprint({k: v.to(torch.float64) for k, v in state.items()}) == weights_fingerprint(state)
    changed = {k: v.clone() for k, v in state.items()}
    changed["logit_scale"] += 1e-6
    assert weights_fingerprint(changed) != weights_fingerprint(state)


def test_refuses_other_architectures_bases_and_bad_coefficients(tmp_path, base, tunes) -> None:
    config = json.loads(Path(MICRO).read_text())
    config["vision_cfg"]["width"] = 64
    (tmp_path / "wide.json").write_text(json.dumps(config))
    wide = clipforge.load(tmp_path / "wide.json")
    with pytest.raises(CheckpointError, match=r"model 2: another architecture than the base base model \(vision_cfg.width: 64 vs 48\)"):
        uniform_soup(base, [tunes[0], wide])
    with pytest.raises(CheckpointError, match="model 1: does not come from the base"):
        task_arithmetic(base, [micro(seed=7)], scaling=0.3)
    recorded = fine_tune(base, 5)
    recorded.provenance = {"base": {"source": "elsewhere.safetensors", "fingerprint": "0" * 64}}
    with pytest.raises(CheckpointError, match="model 1: fine-tuned from elsewhere.safetensors"):
        opcm(base, [recorded])
    with pytest.raises(InputError, match="uniform-soup: needs at least 2 models to merge, got 1"):
        uniform_soup(base, [tunes[0]])
    from clipforge.compress import apply_compression

    clipforge.save(apply_compression(copy.deepcopy(tunes[1]), "tome", r=2), tmp_path / "tome.safetensors")
    with pytest.raises(CheckpointError, match=r"tome.safetensors: records compression steps .* merge the uncompressed models"):
        uniform_soup(base, [tunes[0], tmp_path / "tome.safetensors"])
    for call, message in [
        (lambda: opcm(base, tunes, alpha=0.0), r"alpha: 0.0 is outside \(0, 1\]"),
        (lambda: ties(base, tunes, keep=1.5), r"keep: 1.5 is outside \(0, 1\]"),
        (lambda: ties(base, tunes, scaling=3.5), r"scaling: 3.5 is outside \(0, 3\]"),
        (lambda: task_arithmetic(base, tunes, scaling=-0.2), r"scaling: -0.2 is outside \(0, 1\]"),
    ]:
        with pytest.raises(InputError, match=message):
            call()


# -- the command line --


def run(capsys, *argv: object) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.fixture(scope="module")
def files(tmp_path_factory, base, tunes) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge")
    paths = {"base": root / "base.safetensors", "other": root / "other.safetensors"}
    clipforge.save(base, paths["base"])
    clipforge.save(micro(seed=7), paths["other"])
    for i, model in enumerate(tunes):
        paths[f"ft{i}"] = root / f"ft{i}.safetensors"
        clipforge.save(model, paths[f"ft{i}"])
    paths["one"] = root / "one"  # held-out data of one class
    (paths["one"] / "red").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (32, 32), (200, 20 * i, 0)).save(paths["one"] / "red" / f"{i}.png")
    return paths


def test_cli_soup_writes_the_mean_and_its_record(tmp_path, capsys, files, tunes) -> None:
    out = tmp_path / "soup.safetensors"
    code, stdout, _ = run(capsys, "merge", "soup", "--base", files["base"], "--models", files["ft0"], files["ft1"], "--out", out)
    assert code == 0 and f"wrote {out}" in stdout
    expected = {key: (tunes[0].state_dict()[key] + tunes[1].state_dict()[key]) / 2 for key in tunes[0].state_dict()}
    assert_weights(clipforge.load(out), expected)
    with safe_open(str(out), framework="pt") as handle:
        provenance = json.loads(handle.metadata()["provenance"])
    assert provenance["merge"]["method"] == "uniform-soup" and provenance["merge"]["coefficients"] == [0.5, 0.5]


def test_cli_greedy_soup_scores_on_held_out_data(tmp_path, capsys, files, base) -> None:
    out = tmp_path / "greedy.safetensors"
    argv = ["merge", "greedy-soup", "-b", files["base"], files["ft0"], files["ft1"], "-o", out]
    code, stdout, _ = run(capsys, *argv, "--data", "synthetic:color@val", "--samples", "40")
    assert code == 0 and out.is_file()
    record = clipforge.load(out).provenance["merge"]
    from clipforge.eval.datasets import load_dataset

    dataset = load_dataset("synthetic:color@val", samples=40)
    assert dataset.name == "synthetic/color@val"
    tune = clipforge.load(files["ft0"])
    assert record["ingredients"][0]["held_out_accuracy"] == pytest.approx(HeldOut([dataset]).score(tune), abs=1e-6)


@pytest.mark.parametrize("argv", [
    ["clip-lora", "--train", "synthetic:shape", "--shots", "1", "--set", "iterations_per_shot=1", "--set", "batch_size=4"],
    ["reid", "--data", "synthetic:identities", "--set", "steps=1", "--set", "samples=16", "--set", "batch_size=4"],
])
def test_cli_merges_an_adapted_checkpoint_with_its_base_only(tmp_path, capsys, base, files, argv) -> None:
    """``clipforge adapt`` checkpoints record the model they were tuned from, as ``clipforge train`` does: not the
    base that model itself records (a trained base, like the demo model, records its initialisation)."""
    trained = tmp_path / "trained.safetensors"
    clipforge.save(base, trained, provenance={"base": {"source": "random-init", "fingerprint": "0" * 64}})
    tuned = tmp_path / "tuned.safetensors"
    code, _, err = run(capsys, "adapt", *argv, "--model", trained, "--out", tuned)
    assert code == 0, err
    out = tmp_path / "soup.safetensors"
    code, _, err = run(capsys, "merge", "soup", "--base", trained, tuned, files["ft0"], "--out", out)
    assert code == 0, err
    ingredients = [clipforge.load(path).state_dict() for path in (tuned, files["ft0"])]
    assert_weights(clipforge.load(out), {key: (ingredients[0][key] + ingredients[1][key]) / 2 for key in ingredients[1]})
    refused = tmp_path / "refused.safetensors"
    code, _, err = run(capsys, "merge", "soup", "--base", files["other"], tuned, files["ft0"], "--out", refused)
    assert code == 2 and len(err.strip().splitlines()) == 1 and not refused.exists()
    assert err.strip().startswith(f"error: {tuned}: fine-tuned from {trained} (weights "), err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["soup", "--models", "{ft0}"], "uniform-soup: needs at least 2 models to merge, got 1"),
        (["soup", "{ft0}", "{other}"], "other.safetensors: does not come from the base"),
        (["soup", "{ft0}", "{missing}"], "missing.safetensors: no such file or directory"),
        (["opcm", "{ft0}", "{ft1}", "--alpha", "1.5"], "alpha: 1.5 is outside (0, 1]"),
        (["ties", "{ft0}", "--keep", "0"], "keep: 0.0 is outside (0, 1]"),
        (["task-arithmetic", "{ft0}", "--scaling", "2"], "scaling: 2.0 is outside (0, 1]"),
        (["greedy-soup", "{ft0}", "{ft1}"], "greedy-soup: --data is required"),
        (["greedy-soup", "{ft0}", "{ft1}", "--data", "synthetic:color@vall"], "split 'vall' is not one of"),
        (["greedy-soup", "{ft0}", "{ft1}", "--data", "{one}"], "one: held-out data needs at least 2 classes (found 1: red)"),
    ],
)
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, files, argv, needle) -> None:
    names = {**{k: str(v) for k, v in files.items()}, "missing": str(tmp_path / "missing.safetensors")}
    out = tmp_path / "x.safetensors"
    code, _, err = run(capsys, "merge", *[a.format(**names) for a in argv], "--base", files["base"], "--out", out)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_cli_checks_out_before_reading_held_out_data(tmp_path, capsys, files) -> None:
    """A bad --out is reported before --data is loaded (which can take minutes), whatever --data holds."""
    for method in ("ties", "task-arithmetic", "greedy-soup"):
        argv = ["merge", method, files["ft0"], files["ft1"], "--base", files["base"], "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path)]
        code, _, err = run(capsys, *argv)
        assert code == 2 and f"{tmp_path}: is a directory; give a file name" in err, (method, err)
