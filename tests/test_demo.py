"""``clipforge demo`` as a first-time user meets it (a few steps instead of 600): a report that explains itself,
example queries that have answers with hits marked, plain progress lines when piped, and a rerun of a
finished demo that changes nothing."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import run_cli as run

from clipforge.data.synthetic import SyntheticWorld
from clipforge.demo import POOL, example_queries

FEW_STEPS = [
    "schedule.steps=4", "schedule.warmup=1", "schedule.cooldown=1", "schedule.batch_size=32",
    "run.log_every=2", "eval.samples=64",
]



def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(path.relative_to(folder)): (path.read_bytes(), path.stat().st_mtime_ns) for path in folder.rglob("*") if path.is_file()}


def test_example_queries_all_have_several_matches_in_the_pool() -> None:
    scenes = [SyntheticWorld().sample("test", index).metadata for index in range(POOL)]
    queries = example_queries(scenes)
    assert len(queries) == 4 and len(set(queries)) == 4
    for query in queries:
        _, color, shape = query.split(" ")
        matches = sum(
            (scene["color"], scene["shape"]) == (color, shape) or (scene["second_color"], scene["second_shape"]) == (color, shape)
            for scene in scenes
        )
        assert matches >= 5, f"{query!r} has {matches} matching images"


def test_demo_reports_logs_plain_lines_and_a_rerun_changes_nothing(tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    overrides = [item for pair in (("--set", value) for value in FEW_STEPS) for item in pair]
    code, stdout, stderr = run(capsys, "demo", "--out", str(out), *overrides)
    assert code == 0
    lines = re.findall(r"step (\d)/4 · loss \d+\.\d{4} · \d+ samples/s · ETA \d+:\d\d", stderr)
    assert lines == ["2", "4"]  # stderr is not a terminal here: one line per metrics row
    report = (out / "report.md").read_text()
    for expected in ("| 1/64 = 1.6% |", "| 1/8 = 12.5% |", "samples/s on this machine", "is the harder attribute", "| query | recall@5 |"):
        assert expected in report
    assert (out / "retrievals.png").stat().st_size > 0 and (out / "model.safetensors").is_file()
    assert not (out / "checkpoints").exists()  # a finished run needs none to resume
    before = snapshot(out)
    code, stdout, _ = run(capsys, "demo", "--out", str(out), *overrides)
    assert code == 0 and "holds a finished demo" in stdout and "acc_shape_color" in stdout
    assert snapshot(out) == before
