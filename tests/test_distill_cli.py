"""``clipforge distill`` and ``clipforge data reinforce``: runs, provenance, exact resume after SIGKILL, bad input as one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import kill_when_written
from safetensors.torch import load_file

import clipforge
from clipforge.cli import main
from clipforge.data.synthetic import SyntheticWorld, WorldConfig, write_shards

MICRO = Path(__file__).parent / "data" / "micro-clip.json"
pytestmark = pytest.mark.usefixtures("one_thread")
SRC = str(Path(__file__).resolve().parents[1] / "src")
SMALL_RUN = ["schedule.batch_size=16", "schedule.warmup=1", "schedule.cooldown=1", "data.workers=0", "run.progress=false",
             "run.log_every=1", "eval.samples=16", 'eval.tasks=["color"]']


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distill-cli")
    spec = json.loads(MICRO.read_text())
    spec["vision_cfg"]["width"], spec["text_cfg"]["width"], spec["text_cfg"]["heads"] = 64, 64, 4
    (root / "teacher.json").write_text(json.dumps(spec))
    torch.manual_seed(2)
    clipforge.save(clipforge.load(str(root / "teacher.json")), root / "teacher.safetensors")
    write_shards(SyntheticWorld(WorldConfig(image_size=32)), "train", 64, root / "shards", shard_size=32)
    return {"root": root, "teacher": root / "teacher.safetensors", "shards": root / "shards"}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def distill_argv(setup, out: Path, steps: int, *extra: str) -> list[str]:
    argv = ["distill", "--teacher", str(setup["teacher"]), "--data", str(setup["shards"]), "--out", str(out), *extra]
    for override in [*SMALL_RUN, f"schedule.steps={steps}", "checkpoint.every=2"]:
        argv += ["--set", override]
    return argv


def test_distill_writes_a_student_that_records_its_teacher(tmp_path, setup, capsys) -> None:
    code, out, err = run(capsys, *distill_argv(setup, tmp_path / "run", 4, "--student", "inherit", "--stages", "0.75,0.5"))
    assert code == 0, err
    assert "acc_color" in out and "stage" in out  # evaluated on the world the shards came from
    student = clipforge.load(str(tmp_path / "run" / "model.safetensors"))
    record = student.provenance["distill"]
    assert record["stages"] == [0.75, 0.5] and record["method"].startswith("affinity mimicking")
    assert record["teacher"]["source"] == str(setup["teacher"]) and len(record["stage_parameters"]) == 2
    assert student.config.vision.width < 64
    code, out, _ = run(capsys, "info", str(tmp_path / "run" / "model.safetensors"))
    assert code == 0 and "affinity mimicking" in out


def test_data_reinforce_then_distill_without_the_teacher_running(tmp_path, setup, capsys) -> None:
    out = tmp_path / "reinforced"
    argv = ["data", "reinforce", str(setup["shards"]), "--teacher", str(setup["teacher"]), "--out", str(out),
            "--augmentations", "2", "--caption-count", "2"]
    code, printed, err = run(capsys, *argv)
    assert code == 0 and "64 samples in 2 shards written" in printed, err
    code, printed, _ = run(capsys, *argv)
    assert code == 0 and "0 shards written" in printed and "2 already complete" in printed
    code, printed, err = run(capsys, *distill_argv({**setup, "shards": out}, tmp_path / "run", 2, "--student", "inherit:0.5"))
    assert code == 0, err
    other = tmp_path / "other.safetensors"
    clipforge.save(clipforge.load(str(setup["root"] / "teacher.json")), other)  # same shape, other weights
    code, _, err = run(capsys, "distill", "--teacher", str(other), "--student", "inherit:0.5", "--data", str(out), "--out", str(tmp_path / "x"))
    assert code == 2 and "reinforced by teacher" in err and "not by the given teacher 1" in err and len(err.strip().splitlines()) == 1


def test_an_ensemble_reinforces_and_distils_with_every_teacher_named(tmp_path, setup, capsys) -> None:
    second = tmp_path / "second.safetensors"
    clipforge.save(clipforge.load(str(setup["root"] / "teacher.json")), second)  # same shape, other weights
    out = tmp_path / "reinforced"
    code, _, err = run(capsys, "data", "reinforce", str(setup["shards"]), "--teacher", str(setup["teacher"]), "--teacher", str(second),
                       "--out", str(out), "--augmentations", "2", "--caption-count", "1")
    assert code == 0, err
    code, _, err = run(capsys, *distill_argv({**setup, "shards": out}, tmp_path / "one", 2, "--student", "inherit:0.5"))
    assert code == 2 and "reinforced by 2 teacher(s), but 1 given" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, *distill_argv({**setup, "shards": out}, tmp_path / "both", 2, "--student", "inherit:0.5", "--teacher", str(second)))
    assert code == 0, err
    record = clipforge.load(str(tmp_path / "both" / "model.safetensors")).provenance["distill"]
    assert record["teacher"]["source"] == str(setup["teacher"]) and [t["source"] for t in record["ensemble"]] == [str(second)]


@pytest.mark.parametrize("extra, needle", [
    (["--student", "inherit:1.5"], "--student inherit:1.5: 1.5 is outside (0, 1)"),
    (["--student", "synthetic-tiny", "--stages", "0.5"], "--stages needs --student inherit or auto"),
    (["--student", "inherit:0.5", "--teacher-scale", "hot"], "--teacher-scale 'hot': expected a number or 'own'"),
    (["--student", "inherit:0.5", "--distill-weight", "2"], "distill_weight: 2.0 is outside [0, 1]"),
])
def test_bad_input_is_one_line(tmp_path, setup, capsys, extra, needle) -> None:
    code, _, err = run(capsys, "distill", "--teacher", str(setup["teacher"]), "--data", "synthetic", "--out", str(tmp_path / "r"), *extra)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("extra, needle", [
    (["--student", "ViT-S-32", "--init", "scratch"], "teacher image size 32 differs from the student's 224"),
    (["--student", "auto:0.5", "--set", "schedule.accum_freq=2"], "schedule.accum_freq: automatic inheritance samples one mask"),
])
def test_a_job_that_cannot_run_is_refused_before_anything_is_written(tmp_path, setup, capsys, extra, needle) -> None:
    code, _, err = run(capsys, *distill_argv(setup, tmp_path / "run", 4, *extra))
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_rerunning_a_finished_distillation_reports_its_figures_and_writes_nothing(tmp_path, setup, capsys) -> None:
    argv = distill_argv(setup, tmp_path / "run", 4, "--student", "inherit:0.5")
    code, first, err = run(capsys, *argv)
    assert code == 0, err
    written = {path: path.read_bytes() for path in (tmp_path / "run").rglob("*") if path.is_file() and path.name != "config.json"}
    code, again, err = run(capsys, *argv)
    assert code == 0, err
    assert "holds a finished distillation" in again and again.strip().endswith(first.strip())  # the same table and time
    after = {path: path.read_bytes() for path in (tmp_path / "run").rglob("*") if path.is_file() and path.name != "config.json"}
    assert after == written  # no metrics row appended, nothing rewritten


def test_a_student_off_its_target_size_is_reported_with_both_figures(tmp_path, setup, capsys) -> None:
    """auto:0.5 with a one-step mask phase cannot shrink the teacher: the command says so, with both counts."""
    code, _, err = run(capsys, *distill_argv(setup, tmp_path / "run", 4, "--student", "auto:0.5"))
    assert code == 0, err
    student, teacher = clipforge.load(str(tmp_path / "run" / "model.safetensors")), clipforge.load(str(setup["teacher"]))
    count, target = sum(p.numel() for p in student.parameters()), round(0.5 * sum(p.numel() for p in teacher.parameters()))
    assert count > 1.02 * target
    warnings = [line for line in err.splitlines() if line.startswith("size:")]
    assert len(warnings) == 1 and f"{count:,}" in warnings[0] and f"{target:,}" in warnings[0]


def test_progressive_distillation_resumes_bitwise_after_sigkill(tmp_path, setup) -> None:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}

    def start(out: Path) -> subprocess.Popen:
        argv = distill_argv(setup, out, 8, "--student", "inherit", "--stages", "0.75,0.5")
        return subprocess.Popen([sys.executable, "-m", "clipforge", *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    straight = start(tmp_path / "straight")
    assert straight.wait(timeout=600) == 0, straight.stderr.read()
    killed = start(tmp_path / "killed")
    kill_when_written(killed, tmp_path / "killed" / "stage_2" / "checkpoints" / "latest")
    assert not (tmp_path / "killed" / "model.safetensors").exists()
    resumed = start(tmp_path / "killed")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "killed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_two_ranks_distil_like_one_process(tmp_path, setup) -> None:
    """Under torchrun each rank runs the teacher on its half of the batch and the affinities are gathered: the
    logged losses (and their two parts) match one process's."""
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    options = ("--student", "inherit:0.5", "--distill-weight", "0.5", "--set", "precision.amp=fp32")  # bf16 rounds per batch shape
    argv = ["-m", "clipforge", *distill_argv(setup, tmp_path / "one", 4, *options)]
    assert subprocess.run([sys.executable, *argv], env=env, capture_output=True, timeout=600).returncode == 0
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 1000 + 7)]
    argv = ["-m", "clipforge", *distill_argv(setup, tmp_path / "two", 4, *options)]
    double = subprocess.run([sys.executable, *launcher, *argv], env=env, capture_output=True, text=True, timeout=600)
    assert double.returncode == 0, double.stderr[-2000:]
    assert double.stdout.count("student: ") == 1, double.stdout  # the summary once, not once per rank
    rows = {}
    for name in ("one", "two"):
        lines = (tmp_path / name / "stage_1" / "metrics.jsonl").read_text().splitlines()
        rows[name] = [json.loads(line) for line in lines if '"loss"' in line]
    assert len(rows["one"]) == len(rows["two"]) == 4
    for a, b in zip(rows["one"], rows["two"]):
        for key in ("loss", "loss_clip", "loss_distill"):
            assert abs(a[key] - b[key]) <= 1e-4 * abs(a[key]), (key, a, b)
