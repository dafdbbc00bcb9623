"""The README quickstart runs offline, as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_starts_with_install_and_test_commands() -> None:
    lines = README.read_text().splitlines()
    commands = [line.strip() for line in lines[:5] if line.strip().startswith("$ ")]
    assert commands == ['$ pip install -e ".[dev]"', "$ pytest"]


def test_quickstart_runs(tmp_path, monkeypatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python quickstart"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace: dict = {}
    exec(compile(blocks[0], "README quickstart", "exec"), namespace)
    assert (tmp_path / "model.safetensors").is_file()
    assert namespace["probs"].shape == (1, 2)
