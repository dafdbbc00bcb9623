"""Distillation on the one trainer: λ = 0 is bitwise plain CLIP training, automatic inheritance meets its size target,
and reinforced shards hold what MobileCLIP stores (checked against the teacher run here), train without a teacher,
resume per shard and refuse other teachers."""

from __future__ import annotations

import copy
import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import clipforge
from clipforge.data.formats.shards import shard_index
from clipforge.data.synthetic import SyntheticWorld, WorldConfig, write_shards
from clipforge.distill.auto import fused_config
from clipforge.distill.inherit import count_parameters
from clipforge.distill.job import AutoSettings, DistillJob
from clipforge.distill.masks import StructureMasks
from clipforge.distill.objective import Distillation, DistillSettings
from clipforge.distill.plan import parse_student
from clipforge.distill.reinforce import reinforce
from clipforge.distill.reinforced import ReinforcedData
from clipforge.distill.runner import distill
from clipforge.distill.teacher import teacher_record
from clipforge.errors import ConfigError, InputError
from clipforge.preprocess.transforms import TrainTransform
from clipforge.train.config import load_config
from clipforge.train.trainer import train

MICRO = str(Path(__file__).parent / "data" / "micro-clip.json")
pytestmark = pytest.mark.usefixtures("one_thread")


def config(run_dir: Path, steps: int, data: str = "synthetic", **extra: str):
    settings = {
        "model.name": json.dumps(MICRO), "data.train": json.dumps(data), "data.image_size": "32", "data.workers": "0",
        "schedule.steps": str(steps), "schedule.warmup": "2", "schedule.batch_size": "16", "optimizer.lr": "1e-3",
        "checkpoint.every": "3", "run.log_every": "1", "run.progress": "false", "run.dir": json.dumps(str(run_dir)), **extra,
    }
    return load_config(None, [f"{key}={value}" for key, value in settings.items()])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> clipforge.CLIP:
    """A micro CLIP widened to 64 channels per tower (seeded random weights)."""
    spec = json.loads(Path(MICRO).read_text())
    spec["vision_cfg"]["width"], spec["text_cfg"]["width"], spec["text_cfg"]["heads"] = 64, 64, 4
    path = tmp_path_factory.mktemp("teacher") / "teacher.json"
    path.write_text(json.dumps(spec))
    torch.manual_seed(1)
    return clipforge.load(str(path))


def test_lambda_zero_is_bitwise_the_plain_clip_recipe(tmp_path, teacher) -> None:
    train(config(tmp_path / "plain", 6), resume=False)
    distilled = config(tmp_path / "lambda0", 6)
    small_teacher = clipforge.load(MICRO)
    objective = Distillation(distilled, DistillSettings(0.0, teacher_scale=50.0, student_scale=None), teachers=[small_teacher])
    teacher_calls = []
    small_teacher.register_forward_pre_hook(lambda *_: teacher_calls.append(1))
    train(distilled, resume=False, objective=objective)
    assert not teacher_calls  # λ = 0 needs no teacher
    Distillation(distilled, DistillSettings(0.0))  # and may be given none
    with pytest.raises(ConfigError, match="needs teachers to run or reinforced data"):
        Distillation(distilled, DistillSettings(0.5))
    plain, zero = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "lambda0" / "model.safetensors")
    assert plain.keys() == zero.keys() and all(torch.equal(plain[k], zero[k]) for k in plain)
    rows = [json.loads(line) for line in (tmp_path / "lambda0" / "metrics.jsonl").read_text().splitlines()]
    assert all(row["loss"] == row["loss_clip"] for row in rows)  # logged parts: λ = 0 leaves the CLIP term


def test_automatic_inheritance_reaches_its_target_size(tmp_path, teacher) -> None:
    job = DistillJob(parse_student("auto:0.5"), [0.5], auto=AutoSettings(mask_share=0.5, mask_lr=0.3, lagrangian_lr=0.3))
    result = distill(teacher, "teacher.json", job, config(tmp_path / "auto", 160, **{"checkpoint.every": "0", "run.log_every": "10"}))
    share = count_parameters(result.model.config) / count_parameters(teacher.config)
    assert abs(share / 0.5 - 1) <= 0.02, share
    assert result.model.config.vision.width < 64 and result.model.config.text.width < 64
    saved = clipforge.load(str(tmp_path / "auto" / "model.safetensors"))
    assert saved.provenance["distill"]["inheritance"].startswith("automatic")
    assert saved.provenance["distill"]["teacher"]["parameters"] == count_parameters(teacher.config)


def test_fusion_keeps_the_expected_width_when_whole_heads_can_make_it(teacher) -> None:
    """27 open text channels (of 64: 4 heads of 16) fuse into 27 channels, 3 heads of 9, not into 28 (2 × 14)."""
    masks = StructureMasks(teacher.config)
    with torch.no_grad():
        masks.width_log_alpha["text"].fill_(-50.0)  # closed for sure
        masks.width_log_alpha["text"][torch.randperm(64, generator=torch.Generator().manual_seed(0))[:27]] = 50.0  # open
    text = fused_config(teacher.config, masks).text
    assert (text.width, text.heads) == (27, 3)


def test_an_ensemble_averages_its_teachers_distributions(tmp_path, teacher) -> None:
    """MobileCLIP averages the teachers' distributions after the softmax: a teacher twice is the teacher once,
    bitwise ((p + p) / 2 = p), while a second, different teacher changes the student."""
    job = DistillJob(parse_student("inherit:0.5"), [0.5])
    steps = {"checkpoint.every": "0"}
    alone = distill(teacher, "teacher.json", job, config(tmp_path / "alone", 4, **steps))
    twice = distill(teacher, "teacher.json", job, config(tmp_path / "twice", 4, **steps), ensemble=[(teacher, "again.json")])
    other = copy.deepcopy(teacher)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(7)))
    mixed = distill(teacher, "teacher.json", job, config(tmp_path / "mixed", 4, **steps), ensemble=[(other, "other.json")])
    first, second, third = (run.model.state_dict() for run in (alone, twice, mixed))
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert not all(torch.equal(first[key], third[key]) for key in first)
    recorded = clipforge.load(str(tmp_path / "mixed" / "model.safetensors")).provenance["distill"]
    assert [entry["source"] for entry in recorded["ensemble"]] == ["other.json"] and recorded["teacher"]["source"] == "teacher.json"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards(SyntheticWorld(WorldConfig(image_size=32)), "train", 48, out, shard_size=24)
    return out


def test_reinforced_shards_store_the_teachers_view_of_each_crop_and_caption(tmp_path, shards, teacher) -> None:
    out = tmp_path / "reinforced"
    report = reinforce([teacher], ["teacher.json"], [shards], out, augmentations=3, caption_count=2, progress=False)
    assert report.samples == 48 and len(report.written) == 2
    index = shard_index(out / "00000.tar")
    row = index.keys.index(shard_index(shards / "00000.tar").keys[5])
    crops = json.loads(index.read(row, "paug.json"))["crops"]
    captions = [index.caption(row), *json.loads(index.read(row, "syn.json"))["captions"]]
    stored = np.frombuffer(index.read(row, "emb.f16"), dtype="<f2").copy().reshape(3 + len(captions), 32)  # the documented layout
    stored = {"image": stored[:3], "text": stored[3:]}
    world = SyntheticWorld(WorldConfig(image_size=32))
    metadata = json.loads(index.read(row, "json"))
    assert captions == world.retrieval_set("train", metadata["index"] + 1, 3).captions[-1]  # the sample's paraphrases
    image = world.sample("train", metadata["index"]).image
    assert index.read(row, "png") == shard_index(shards / "00000.tar").read(5, "png")  # the image, copied as it was
    with torch.no_grad():
        pixels = torch.stack([TrainTransform(teacher.preprocess_cfg).augment(image, tuple(c)) for c in crops])
        expected_images = F.normalize(teacher.encode_image(pixels), dim=-1)
        expected_texts = F.normalize(teacher.encode_text(teacher.tokenize(captions)), dim=-1)
    assert len(crops) == 3 and all(0 <= c[0] and 0 <= c[1] and c[0] + c[2] <= 32 and c[1] + c[3] <= 32 for c in crops)
    torch.testing.assert_close(torch.from_numpy(stored["image"]).float(), expected_images, atol=2e-3, rtol=0)
    torch.testing.assert_close(torch.from_numpy(stored["text"]).float(), expected_texts, atol=2e-3, rtol=0)

    again = reinforce([teacher], ["teacher.json"], [shards], out, augmentations=3, caption_count=2, progress=False)
    assert again.written == [] and len(again.already_done) == 2  # resumable per shard
    with pytest.raises(ConfigError, match=r"holds a reinforcement with other augmentations"):
        reinforce([teacher], ["teacher.json"], [shards], out, augmentations=4, caption_count=2, progress=False)

    data = ReinforcedData(str(out / "{00000..00001}.tar"))
    run = config(tmp_path / "run", 4, data=str(out / "{00000..00001}.tar"))
    train(run, resume=False, objective=data.objective(run, DistillSettings(0.75, teacher_scale=None, student_scale=None)))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert all(row["loss"] == pytest.approx(0.25 * row["loss_clip"] + 0.75 * row["loss_distill"], rel=1e-4) for row in rows)


def test_reinforced_shards_refuse_other_teachers_and_other_jobs(tmp_path, shards, teacher) -> None:
    out = tmp_path / "reinforced"
    reinforce([teacher], ["teacher.json"], [shards / "00000.tar"], out, augmentations=2, caption_count=1, progress=False)
    data = ReinforcedData(str(out / "00000.tar"))
    data.check_teachers([teacher_record(teacher, "teacher.json")])
    for change, message in (
        ({"embed_dim": 48}, "has embedding width 32, the given teacher 48"),
        ({"context_length": 16}, "has tokenizer context_length 24, the given teacher 16"),
    ):
        with pytest.raises(ConfigError, match=rf"00000.tar: teacher 1 \(teacher.json\) {message}$"):
            data.check_teachers([teacher_record(_variant(teacher, tmp_path, **change), "variant")])
    with pytest.raises(ConfigError, match=r"00000.tar: reinforced by teacher teacher.json \(fingerprint [0-9a-f]{16}\), not by the given teacher 1"):
        data.check_teachers([teacher_record(_same_shape_copy(teacher), "copy")])

    second = tmp_path / "second"
    reinforce([teacher], ["teacher.json"], [shards / "00001.tar"], second, augmentations=3, caption_count=1, progress=False)
    shutil.copy(second / "00001.tar", out / "00001.tar")
    with pytest.raises(ConfigError, match=r"00001.tar: its teacher record differs from .*00000.tar's"):
        ReinforcedData(str(out / "{00000..00001}.tar"))


def test_damaged_or_older_reinforced_shards_are_one_line_errors(tmp_path, shards, teacher) -> None:
    out = tmp_path / "reinforced"
    reinforce([teacher], ["teacher.json"], [shards / "00000.tar"], out, augmentations=2, caption_count=1, progress=False)
    key = shard_index(out / "00000.tar").keys[3]
    _rewrite_member(out / "00000.tar", f"{key}.emb.f16", lambda data: data[:-2])  # one value short
    source = ReinforcedData(str(out / "00000.tar")).source
    generator = torch.Generator().manual_seed(0)
    transform = TrainTransform(teacher.preprocess_cfg)
    source.load_train(0, transform, generator)  # an intact sample reads
    damaged = next(index for index in range(len(source)) if source.key(index).endswith(key))
    expected = "2 crops and 2 captions need 4 embeddings of 32 values, but emb.f16 holds 127 values"
    with pytest.raises(InputError, match=rf"^{re.escape(source.key(damaged))}: {expected}$"):
        source.load_train(damaged, transform, generator)

    record = (out / "00000.tar").read_bytes()
    _rewrite_member(out / "00000.tar", "__reinforce__.json", lambda data: json.dumps({**json.loads(data), "teachers": [{}]}).encode())
    with pytest.raises(InputError, match=r"00000.tar: __reinforce__.json lists no teachers with their embedding widths$"):
        ReinforcedData(str(out / "00000.tar"))
    (out / "00000.tar").write_bytes(record)

    older = lambda data: json.dumps({**json.loads(data), "format": 1}).encode()  # noqa: E731
    _rewrite_member(out / "00000.tar", "__reinforce__.json", older)
    with pytest.raises(InputError, match=r"00000.tar: reinforced in format 1, this clipforge reads format 2; rerun"):
        ReinforcedData(str(out / "00000.tar"))


def _rewrite_member(shard: Path, name: str, change) -> None:
    """Rewrite one member of a tar shard through ``change`` (bytes → bytes), keeping the others as they are."""
    with tarfile.open(shard) as source:
        members = [(info, source.extractfile(info).read()) for info in source.getmembers()]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as target:
        for info, data in members:
            data = change(data) if info.name == name else data
            info.size = len(data)
            target.addfile(info, io.BytesIO(data))


def _same_shape_copy(model: clipforge.CLIP) -> clipforge.CLIP:
    copy = clipforge.CLIP(model.config)
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        copy.logit_scale.add_(0.5)
    return copy


def _variant(model: clipforge.CLIP, tmp_path: Path, embed_dim: int | None = None, context_length: int | None = None) -> clipforge.CLIP:
    spec = model.config.to_dict()
    spec["embed_dim"] = embed_dim or spec["embed_dim"]
    spec["text_cfg"]["context_length"] = context_length or spec["text_cfg"]["context_length"]
    path = tmp_path / "variant.json"
    path.write_text(json.dumps(spec))
    return clipforge.load(str(path))
