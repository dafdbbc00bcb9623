"""A small noisy pool for the curation tests: synthetic shards with exact duplicates, planted near-duplicates
(JPEG re-encodings), a corrupt image and a sample without caption; a task killer; byte-for-byte comparisons."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from PIL import Image

from clipforge.data.synthetic import SyntheticWorld, WorldConfig, write_shards

WORLD = WorldConfig(image_size=32, duplicate_rate=0.25, caption_noise_rate=0.3, zipf_exponent=1.0)


def add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    """Member ``name`` holding ``data``, appended to ``archive``."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def build_pool(root: Path, n: int = 60, shard_size: int = 20, near_copies: int = 8) -> dict:
    """Shards 0.. from the world, plus one shard of near-duplicates and bad samples; returns what was planted."""
    world = SyntheticWorld(WORLD)
    write_shards(world, "train", n, root, shard_size=shard_size)
    metadata = [world.describe("train", i)[1] for i in range(n)]
    exact = [i for i, m in enumerate(metadata) if m["duplicate_of"] is not None]
    sources = [i for i in range(n) if metadata[i]["duplicate_of"] is None][:near_copies]
    extra = root / f"{(n + shard_size - 1) // shard_size:05d}.tar"
    with tarfile.open(extra, "w", format=tarfile.USTAR_FORMAT) as archive:
        for number, source in enumerate(sources):
            image = world.sample("train", source).image
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=90)
            add_member(archive, f"near{number:03d}.jpg", buffer.getvalue())
            add_member(archive, f"near{number:03d}.txt", world.sample("train", source).caption.encode())
        add_member(archive, "corrupt.png", b"\x89PNG not really an image")
        add_member(archive, "corrupt.txt", b"a red star")
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), "white").save(buffer, format="PNG")
        add_member(archive, "nocaption.png", buffer.getvalue())
    return {"n": n, "exact": exact, "duplicate_of": [m["duplicate_of"] for m in metadata], "near_sources": sources,
            "extra": extra}


class KillOnce:
    """A task wrapper that SIGKILLs its own process ``delay`` seconds into the first attempt (``marker`` records
    that it happened), as a crashed or pre-empted worker would die mid-task."""

    def __init__(self, task, marker: str, delay: float = 0.05) -> None:
        self.task, self.marker, self.delay = task, marker, delay

    def __call__(self):
        import os
        import signal
        import threading

        if not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            threading.Timer(self.delay, os.kill, (os.getpid(), signal.SIGKILL)).start()
        return self.task()


def same_files(first: Path, second: Path, patterns: tuple[str, ...]) -> list[str]:
    """Relative paths under ``first`` matching ``patterns``; asserts each is byte-identical under ``second``."""
    names = sorted({path.relative_to(first) for pattern in patterns for path in first.glob(pattern)})
    assert names, f"nothing matched {patterns} under {first}"
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), f"{name} differs"
    return [str(name) for name in names]
