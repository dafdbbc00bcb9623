"""Training: config validation, the schedule, exact gradient accumulation, exact resume after SIGKILL,
and 2-process torchrun equal to 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from conftest import kill_when_written, run_cli
from safetensors.torch import load_file

import clipforge
from clipforge.errors import ConfigError
from clipforge.io.state_dict import read_tensors
from clipforge.train import step as step_module
from clipforge.train.config import OptimizerSection, ScheduleSection, load_config
from clipforge.train.losses import ClipLoss
from clipforge.train.optim import build_optimizer, learning_rate
from clipforge.train.step import ContrastiveStep, resolve_amp

MICRO = str(Path(__file__).parent / "data" / "micro-clip.json")
SRC = str(Path(__file__).resolve().parents[1] / "src")


def micro_overrides(run_dir: Path, steps: int, **extra: str) -> list[str]:
    settings = {
        "model.name": json.dumps(MICRO),
        "data.train": '"synthetic"',
        "data.image_size": "32",
        "data.workers": "0",
        "schedule.steps": str(steps),
        "schedule.warmup": "2",
        "schedule.batch_size": "16",
        "optimizer.lr": "1e-3",
        "precision.amp": '"fp32"',
        "checkpoint.every": "4",
        "run.log_every": "1",
        "run.progress": "false",
        "run.dir": json.dumps(str(run_dir)),
        **extra,
    }
    return [f"{key}={value}" for key, value in settings.items()]


def cli(*args: str, **popen: object) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def train_cli(run_dir: Path, steps: int, **extra: str) -> list[str]:
    argv = ["-m", "clipforge", "train"]
    for override in micro_overrides(run_dir, steps, **extra):
        argv += ["--set", override]
    return argv


def test_config_errors_name_the_field(tmp_path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[optimizer]\nlr = 'fast'\n")
    with pytest.raises(ConfigError, match=r"^optimizer\.lr: expected float"):
        load_config(bad)
    bad.write_text("[optimiser]\nlr = 1.0\n")
    with pytest.raises(ConfigError, match="optimiser: unknown field"):
        load_config(bad)
    with pytest.raises(ConfigError, match="schedule.batch_size"):
        load_config(None, ["schedule.batch_size=10", "schedule.accum_freq=3"])
    config = load_config(None, ["optimizer.lr=1e-3", "data.train=/data/shards/{000..009}.tar", "optimizer.grad_clip=none"])
    assert config.optimizer.lr == 1e-3 and config.data.train == "/data/shards/{000..009}.tar" and config.optimizer.grad_clip is None


def test_cosine_schedule_matches_open_clip() -> None:
    from open_clip_train.scheduler import cosine_lr

    schedule = ScheduleSection(steps=100, warmup=10)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    reference = cosine_lr(optimizer, 0.1, 10, 100)
    for step in range(100):
        reference(step)
        assert learning_rate(step, 0.1, schedule) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12)


@pytest.mark.parametrize(("power", "end_lr"), [(1.0, 0.0), (2.0, 0.01)])
def test_const_cooldown_schedule_matches_open_clip(power: float, end_lr: float) -> None:
    from open_clip_train.scheduler import const_lr_cooldown

    schedule = ScheduleSection(steps=100, warmup=10, kind="const-cooldown", cooldown=25, cooldown_power=power, cooldown_end_lr=end_lr)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    reference = const_lr_cooldown(optimizer, 0.1, 10, 100, 25, power, end_lr)
    for step in range(100):
        reference(step)
        assert learning_rate(step, 0.1, schedule) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12)


def test_const_cooldown_needs_a_cooldown_that_fits() -> None:
    for cooldown in ("0", "95"):
        with pytest.raises(ConfigError, match=rf"schedule.cooldown: must be between 1 and steps − warmup = 90 .*got {cooldown}"):
            load_config(None, ["schedule.kind=const-cooldown", "schedule.steps=100", "schedule.warmup=10", f"schedule.cooldown={cooldown}"])
    with pytest.raises(ConfigError, match="schedule.cooldown_end_lr"):
        load_config(None, ["schedule.cooldown_end_lr=-1e-4"])
    assert load_config(None, ["schedule.kind=const-cooldown", "schedule.steps=100", "schedule.warmup=10", "schedule.cooldown=90"])


def test_resume_refuses_another_configuration_but_not_fields_added_since(tmp_path: Path) -> None:
    from clipforge.train.trainer import _check_run_dir

    config = load_config(None, ["schedule.steps=600"])
    saved = config.to_dict()
    for field in ("cooldown", "cooldown_power", "cooldown_end_lr"):  # a run written before these fields existed
        del saved["schedule"][field]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    _check_run_dir(tmp_path, config, resume=True)
    with pytest.raises(ConfigError, match=r"holds a run with schedule.steps=600, not 660; .* pass --no-resume"):
        _check_run_dir(tmp_path, load_config(None, ["schedule.steps=660"]), resume=True)
    with pytest.raises(ConfigError, match=r"schedule.kind='cosine', not 'const-cooldown'"):
        _check_run_dir(tmp_path, load_config(None, ["schedule.steps=600", "schedule.kind=const-cooldown", "schedule.cooldown=100"]), resume=True)


def test_training_refuses_a_compressed_checkpoint(tmp_path: Path) -> None:
    """The trainer reads checkpoints without replaying compression (it sits below ``clipforge.compress``), so a
    checkpoint that records steps is refused rather than trained without them."""
    from clipforge.compress import apply_compression
    from clipforge.train.trainer import build_model

    merged = tmp_path / "tome.safetensors"
    clipforge.save(apply_compression(clipforge.load(MICRO), "tome", r=2), merged)
    config = load_config(None, [f"model.name={json.dumps(str(merged))}"])
    with pytest.raises(ConfigError, match=r"^model.name: .*tome.safetensors records compression steps .* uncompressed checkpoint"):
        build_model(config)
    plain = tmp_path / "plain.safetensors"
    clipforge.save(clipforge.load(MICRO), plain)
    assert build_model(load_config(None, [f"model.name={json.dumps(str(plain))}"])).training is False


def test_synthetic_world_settings_reach_the_training_data_and_are_checked(tmp_path: Path) -> None:
    """``data.world`` renders the training images of that world (here: outlines, every count equally often)."""
    from clipforge.data.synthetic import SyntheticWorld, WorldConfig
    from clipforge.train.distributed import WorldInfo
    from clipforge.train.trainer import _train_loader, build_model

    world = 'data.world={split_shifts={train="outline"}, count_weights=[1, 1, 1]}'
    config = load_config(None, [*micro_overrides(tmp_path, 1), world])
    model = build_model(config)
    source = _train_loader(config, model, WorldInfo(0, 0, 1), None, None)._loader.dataset.source
    expected = SyntheticWorld(WorldConfig(seed=0, image_size=32, split_shifts={"train": "outline"}, count_weights=(1, 1, 1)))
    plain = SyntheticWorld(WorldConfig(seed=0, image_size=32))
    for index in range(3):
        image, caption = source.load(index)
        assert image.tobytes() == expected.sample("train", index).image.tobytes() and caption == expected.sample("train", index).caption
    assert any(source.load(i)[0].tobytes() != plain.sample("train", i).image.tobytes() for i in range(3))
    for setting, message in [
        ("data.world={seed=3}", "data.world.seed: set data.world_seed instead"),
        ("data.world={colour=1}", r"data.world.colour: unknown field \(known: backgrounds, "),
        ("data.world={count_weights=[1, 1]}", r"data.world: WorldConfig.count_weights: \(1, 1\) is not 3 non-negative weights"),
        ("data.world={split_shifts={train=\"blurry\"}}", "data.world: shift: 'blurry' is not one of"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [setting])
    with pytest.raises(ConfigError, match="data.world: applies to data.train = \"synthetic\" only"):
        load_config(None, ["data.train=shards/", "data.world={few_shot_k=10}"])


def test_fine_tunes_record_the_weights_they_start_from(tmp_path: Path) -> None:
    from clipforge.io.state_dict import weights_fingerprint
    from clipforge.train.trainer import train

    start = tmp_path / "start.safetensors"
    clipforge.save(clipforge.load(MICRO), start)
    config = load_config(None, [*micro_overrides(tmp_path / "run", 2), f"model.name={json.dumps(str(start))}"])
    train(config)
    recorded = clipforge.load(tmp_path / "run" / "model.safetensors").provenance["base"]
    assert recorded == {"source": str(start), "fingerprint": weights_fingerprint(clipforge.load(start).state_dict())}


def test_weight_decay_only_on_matrices() -> None:
    model = clipforge.load(MICRO)
    decay, no_decay = build_optimizer(model, OptimizerSection(weight_decay=0.2)).param_groups
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_feature_cache_accumulation_gives_the_full_batch_gradient() -> None:
    torch.manual_seed(0)
    model = clipforge.load(MICRO).train()
    images = torch.randn(8, 3, 32, 32)
    texts = model.tokenize([f"a photo of {i} red circles" for i in range(8)])
    reference = clipforge.load(MICRO).train()
    reference.load_state_dict(model.state_dict())
    image_features, text_features, scale = reference(images, texts)
    open_clip.ClipLoss()(image_features, text_features, scale).backward()
    expected = {name: p.grad.clone() for name, p in reference.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    step = ContrastiveStep(model, ClipLoss(), optimizer, amp="fp32", accum_freq=4, grad_clip=None, device=torch.device("cpu"))
    step(images, texts)
    for name, parameter in model.named_parameters():
        scale = expected[name].abs().max()
        assert (parameter.grad - expected[name]).abs().max() <= 1e-5 * scale + 1e-9, name


# GEMM GFLOP/s (fp32, bf16) measured on two 2-core Xeons: with AMX the trainer ran 1.39x faster under bf16
# autocast; with AVX512-BF16 only it ran 17% faster in fp32 (docs/performance.md).
@pytest.mark.parametrize(("fp32", "bf16", "expected"), [(192.0, 1910.0, "bf16"), (285.0, 148.0, "fp32")])
def test_auto_precision_is_the_faster_on_this_cpu(monkeypatch, fp32: float, bf16: float, expected: str) -> None:
    measured = {"fp32": fp32, "bf16": bf16}
    monkeypatch.setattr(step_module, "gemm_gflops", lambda precision, size, repeats: measured[precision])
    step_module._cpu_prefers_bf16.cache_clear()
    try:
        assert resolve_amp("auto", torch.device("cpu")) == expected
        assert resolve_amp("fp16", torch.device("cpu")) == "fp16"  # an explicit choice is kept
        model = clipforge.load(MICRO)
        step = ContrastiveStep(model, ClipLoss(), torch.optim.SGD(model.parameters(), lr=0.0), amp="auto",
                               accum_freq=1, grad_clip=None, device=torch.device("cpu"))
        images = torch.randn(4, 3, 32, 32)
        with step.autocast():
            features = model.encode_image(images)
        assert features.dtype == (torch.bfloat16 if expected == "bf16" else torch.float32)
    finally:
        step_module._cpu_prefers_bf16.cache_clear()


def _auto_precision_on_rank(rank: int, port: int, out_dir: str) -> None:
    """Spawned rank of a 2-rank gloo group whose CPUs disagree: rank 0 has AMX, rank 1 only AVX512-BF16."""
    import torch.distributed as dist

    measured = [{"fp32": 192.0, "bf16": 1910.0}, {"fp32": 285.0, "bf16": 148.0}][rank]
    calls = []
    step_module.gemm_gflops = lambda precision, size, repeats: calls.append(precision) or measured[precision]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        answer = resolve_amp("auto", torch.device("cpu"))
    finally:
        dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"amp": answer, "measured": calls}))


def test_under_torchrun_every_rank_trains_in_rank_0s_precision(tmp_path: Path) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_auto_precision_on_rank, args=(port, str(tmp_path)), nprocs=2, join=True)
    answers = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [answer["amp"] for answer in answers] == ["bf16", "bf16"]
    assert answers[1]["measured"] == []  # only rank 0 times the GEMMs


def test_a_run_reports_the_precision_auto_chose(tmp_path: Path) -> None:
    from clipforge.train.trainer import train

    result = train(load_config(None, micro_overrides(tmp_path / "run", 2, **{"precision.amp": '"auto"'})))
    assert result.precision == resolve_amp("auto", torch.device("cpu")) and result.precision in ("bf16", "fp32")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["precision"]["amp"] == "auto"  # resumable on a machine where auto chooses otherwise


def test_non_finite_numbers_are_config_errors(tmp_path: Path) -> None:
    recipe = tmp_path / "bad.toml"
    recipe.write_text("[optimizer]\nlr = inf\n")
    with pytest.raises(ConfigError, match=r"^optimizer.lr: expected a finite number, got inf$"):
        load_config(recipe)
    with pytest.raises(ConfigError, match=r"^schedule.cooldown_power: expected a finite number, got nan$"):
        load_config(None, ["schedule.cooldown_power=nan"])


def test_a_diverging_run_stops_with_one_line_and_keeps_its_checkpoints(tmp_path: Path, capsys) -> None:
    """A loss that becomes non-finite stops training at that step (exit 2, one line naming it); the checkpoint
    already written stays as it was, and no final model is written."""
    from clipforge.cli import main

    run_dir = tmp_path / "run"
    argv = ["train"]
    for override in micro_overrides(run_dir, 12, **{"optimizer.lr": "1e30", "optimizer.grad_clip": "1e30", "schedule.warmup": "0",
                                                    "checkpoint.every": "1"}):
        argv += ["--set", override]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    step = int(err.split("step ")[1].split(":")[0])
    assert "the loss is nan" in err or "the loss is inf" in err
    assert not (run_dir / "model.safetensors").exists()
    saved = sorted(path.name for path in (run_dir / "checkpoints").glob("step_*"))
    assert saved and int(saved[-1].removeprefix("step_")) == step - 1
    weights = load_file(run_dir / "checkpoints" / saved[-1] / "model.safetensors")
    assert all(torch.isfinite(value).all() for value in weights.values())


def test_resume_after_sigkill_is_bitwise_identical(tmp_path) -> None:
    steps = 12
    reference = cli(*train_cli(tmp_path / "straight", steps))
    _, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err
    interrupted = cli(*train_cli(tmp_path / "killed", steps))
    kill_when_written(interrupted, tmp_path / "killed" / "checkpoints" / "latest")
    killed_at = json.loads((tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert killed_at < steps
    resumed = cli(*train_cli(tmp_path / "killed", steps))
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    again = load_file(tmp_path / "killed" / "model.safetensors")
    assert straight.keys() == again.keys()
    for key in straight:
        assert torch.equal(straight[key], again[key]), key
    steps_logged = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert steps_logged == list(range(1, steps + 1))


def test_rerunning_a_finished_run_reports_its_figures_and_writes_nothing(tmp_path, capsys) -> None:
    argv = train_cli(tmp_path / "run", 4, **{"eval.samples": "16", "eval.tasks": '["color"]'})[2:]  # without -m clipforge
    code, first, err = run_cli(capsys, *argv)
    assert code == 0, err
    written = {path: path.read_bytes() for path in (tmp_path / "run").rglob("*") if path.is_file() and path.name != "config.json"}
    code, again, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "holds a finished run" in again and again.strip().endswith(first.strip().removeprefix("trained "))  # the same figures
    after = {path: path.read_bytes() for path in (tmp_path / "run").rglob("*") if path.is_file() and path.name != "config.json"}
    assert after == written  # no row appended, no checkpoint or model rewritten
    (tmp_path / "run" / "model.safetensors").unlink()  # a kill between the last checkpoint and the model file
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    (tmp_path / "expected.safetensors").write_bytes(written[tmp_path / "run" / "model.safetensors"])
    restored, expected = (read_tensors(path) for path in (tmp_path / "run" / "model.safetensors", tmp_path / "expected.safetensors"))
    assert restored[1] == expected[1] and restored[0].keys() == expected[0].keys()  # safetensors orders metadata freely
    assert all(torch.equal(restored[0][key], expected[0][key]) for key in expected[0])


def test_torchrun_two_ranks_match_one_process(tmp_path) -> None:
    steps = 20
    single = cli(*train_cli(tmp_path / "one", steps))
    _, err = single.communicate(timeout=600)
    assert single.returncode == 0, err
    argv = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 1000)]
    double = cli(*argv, *train_cli(tmp_path / "two", steps))
    out, err = double.communicate(timeout=600)
    assert double.returncode == 0, err
    assert out.count(f"trained {steps} steps") == 1, out  # the summary once, not once per rank
    one = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    losses_one = [row["loss"] for row in one if "loss" in row]
    losses_two = [row["loss"] for row in two if "loss" in row]
    assert len(losses_one) == len(losses_two) == steps
    for a, b in zip(losses_one, losses_two):
        assert abs(a - b) <= 1e-4 * abs(a)


def test_shipped_recipes_are_valid() -> None:
    from clipforge.demo import recipe_path

    for name in ("synthetic-tiny.toml", "datacomp-small-vit-b-32.toml", "finetune-webdataset.toml"):
        config = load_config(recipe_path(name))
        assert clipforge.get_model_config(config.model.name).name == config.model.name


def test_train_command_evaluates_on_the_synthetic_world(tmp_path) -> None:
    from clipforge.train.metrics_log import read_metrics

    extra = {"eval.every": "2", "eval.samples": "16", "eval.tasks": '["color"]', "checkpoint.every": "0"}
    process = cli(*train_cli(tmp_path / "run", 4, **extra))
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    rows = [row for row in read_metrics(tmp_path / "run") if "acc_color" in row]
    assert [row["step"] for row in rows] == [2, 4]  # every 2 steps, then at the end
    assert all(0.0 <= row["acc_color"] <= 1.0 and "acc_shape" not in row for row in rows)
    assert not (tmp_path / "run" / "checkpoints" / "step_0000002").exists()  # checkpoint.every=0: only the last

    process = cli(*train_cli(tmp_path / "bad", 2, **{"eval.tasks": '["colour"]'}))
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 2 and "eval.tasks: 'colour' is not a synthetic-world task" in stderr
    assert "Traceback" not in stderr
