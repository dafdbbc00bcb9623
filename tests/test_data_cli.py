"""``clipforge data synth`` and ``clipforge data reinforce`` from the command line: settings refused before anything
is written (so the corrected rerun works), help that lists what is accepted, every sample counted and named."""

from __future__ import annotations

import json
import re
import shutil
import tarfile

import pytest
import typer
from conftest import run_cli
from curate_helpers import add_member

import clipforge
from clipforge.cli import app
from clipforge.data.synthetic import SyntheticWorld, WorldConfig, write_shards


def synth_help(option: str) -> str:
    """The help text of ``clipforge data synth``'s ``option``."""
    command = typer.main.get_command(app).commands["data"].commands["synth"]
    return next(param.help for param in command.params if option in param.opts)


def refused_values(capsys, tmp_path, option: str) -> set[str]:
    """The values ``clipforge data synth`` names as accepted when ``option`` gets a bogus one."""
    code, _, err = run_cli(capsys, "data", "synth", "--out", tmp_path / "bogus", "--n", "1", option, "bogus")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    return set(err.strip().rsplit("is not one of ", 1)[1].split(", "))


def test_synth_refuses_a_bad_setting_before_writing_so_the_rerun_works(tmp_path, capsys):
    out = tmp_path / "d"
    for option, value in (("--shift", "bogus"), ("--split", "bogus"), ("--format", "webp")):
        code, _, err = run_cli(capsys, "data", "synth", "--out", out, "--n", "5", option, value)
        assert code == 2 and value in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()
    code, _, err = run_cli(capsys, "data", "synth", "--out", out, "--n", "5", "--image-size", "32")
    assert code == 0, err
    assert len(tarfile.open(out / "00000.tar").getnames()) == 15  # png, txt and json of 5 samples


@pytest.mark.parametrize("option", ["--shift", "--format"])
def test_synth_help_lists_exactly_the_accepted_values(tmp_path, capsys, option):
    listed = set(re.split(r", | \| ", synth_help(option).rstrip(".").split(": ")[-1]))  # "a | b." or "...: a, b."
    assert listed == refused_values(capsys, tmp_path, option)
    for value in sorted(listed):
        code, _, err = run_cli(capsys, "data", "synth", "--out", tmp_path / value, "--n", "1", "--image-size", "32", option, value)
        assert code == 0, (value, err)


@pytest.fixture(scope="module")
def reinforce_setup(tmp_path_factory, tiny):
    root = tmp_path_factory.mktemp("reinforce")
    clipforge.save(tiny, root / "teacher.safetensors")
    write_shards(SyntheticWorld(WorldConfig(image_size=32)), "train", 6, root / "synth", shard_size=6)
    return root


def reinforce(capsys, setup, shards, out, *extra):
    return run_cli(capsys, "data", "reinforce", shards, "--teacher", setup / "teacher.safetensors", "--out", out,
                   "--augmentations", "1", "--caption-count", "1", *extra)


def test_reinforce_refuses_settings_that_write_nothing_and_leaves_nothing(tmp_path, reinforce_setup, capsys):
    plain = tmp_path / "plain"  # shards without the world.json of clipforge data synth
    plain.mkdir()
    shutil.copy(reinforce_setup / "synth" / "00000.tar", plain)
    out = tmp_path / "r"
    code, _, err = reinforce(capsys, reinforce_setup, plain, out)
    assert code == 2 and str(plain / "world.json") in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
    code, _, err = reinforce(capsys, reinforce_setup, reinforce_setup / "synth", out, "--captions", "json:nosuchfield")
    assert code == 2 and str(reinforce_setup / "synth" / "00000.tar") in err and "nosuchfield" in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
    code, printed, err = reinforce(capsys, reinforce_setup, plain, out, "--captions", "none")  # the corrected rerun
    assert code == 0 and "6 samples in 1 shards written" in printed, err


def test_reinforce_counts_every_sample_and_reads_json_only_when_used(tmp_path, reinforce_setup, capsys):
    with tarfile.open(reinforce_setup / "synth" / "00000.tar") as source:
        members = [(member.name, source.extractfile(member).read()) for member in source.getmembers()]
    good = sorted({name.split(".")[0] for name, _ in members})
    template = {name.split(".", 1)[1]: data for name, data in members if name.startswith(f"{good[0]}.")}
    planted = {
        "badjson": {**template, "json": b"{'not': json"},
        "noimage": {field: data for field, data in template.items() if field != "png"},
        "corrupt": {**template, "png": b"not a png"},
    }
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "mixed.tar", "w") as archive:
        for name, data in members:
            add_member(archive, name, data)
        for key, fields in planted.items():
            for field, data in fields.items():
                add_member(archive, f"{key}.{field}", data)
    code, printed, err = reinforce(capsys, reinforce_setup, shards, tmp_path / "none", "--captions", "none")
    assert code == 0, err
    assert f"{len(good) + 1} samples in 1 shards written" in printed and "2 samples skipped" in printed  # + badjson
    assert f"{shards / 'mixed.tar'}:noimage" in err and f"{shards / 'mixed.tar'}:corrupt" in err
    with tarfile.open(tmp_path / "none" / "mixed.tar") as written:
        assert {name.split(".")[0] for name in written.getnames()} - {"__reinforce__"} == {*good, "badjson"}
    assert json.loads(template["json"])["caption"]  # the field json:caption reads
    code, printed, err = reinforce(capsys, reinforce_setup, shards, tmp_path / "json", "--captions", "json:caption")
    assert code == 0 and f"{len(good)} samples in 1 shards written" in printed and "3 samples skipped" in printed, err
    assert f"{shards / 'mixed.tar'}:badjson: .json is not valid JSON" in err
