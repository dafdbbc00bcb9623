"""Retrieval: the vector index on 1M vectors, and embedding JPEGs from disk, clipforge vs open_clip.

Index figures (build time, memory, p50/p99 single-query latency, recall@10 against exact search) come
from ``benchmarks/retrieval_index.py``, run as it is. Embedding: N synthetic 256-px JPEGs (5,000;
``--quick``: 500) in a folder, embedded by

- open_clip as a user writes it: ViT-B-32 with random weights, its eval preprocess in a ``Dataset``,
  a ``DataLoader`` with worker processes, fp32 ``encode_image`` under ``torch.no_grad``;
- ``clipforge embed FOLDER --out STORE --precision bf16`` on the same weights (saved to a checkpoint)
  with the same number of decoding workers, writing the clip-retrieval store (model loading included);
- the same command on an int8-dynamic checkpoint of those weights (``clipforge compress int8``, issue
  #5), which embeds in fp32 with int8 linear layers.

The ratios are open_clip's time over clipforge's; the mean cosine between the sets of embeddings
shows how close each is to open_clip's fp32 computation.

    python benchmarks/retrieval.py [--quick]
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch and faiss: see retrieval_index.py

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import typer  # noqa: E402
from _common import interleaved_medians, parser, report  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

import clipforge  # noqa: E402
from clipforge.cli import embed as embed_cli  # noqa: E402
from clipforge.compress.records import apply_compression  # noqa: E402
from clipforge.data.synthetic import SyntheticWorld, WorldConfig  # noqa: E402
from clipforge.encode import default_workers  # noqa: E402
from clipforge.retrieval import EmbeddingStore  # noqa: E402

BATCH_SIZE = 64
IMAGE_SIZE = 256


def index_figures(quick: bool) -> dict:
    """The last line (JSON) of ``retrieval_index.py``; its own table goes to our stderr."""
    script = Path(__file__).with_name("retrieval_index.py")
    result = subprocess.run(
        [sys.executable, str(script)] + (["--quick"] if quick else []), capture_output=True, text=True, check=True
    )
    print(result.stdout.rsplit("\n", 2)[0], file=sys.stderr)
    return json.loads(result.stdout.strip().splitlines()[-1])


def write_jpegs(folder: Path, count: int) -> list[Path]:
    world = SyntheticWorld(WorldConfig(image_size=IMAGE_SIZE))
    paths = []
    for index in range(count):
        path = folder / f"{index:05d}.jpg"
        world.sample("train", index).image.save(path, quality=90)
        paths.append(path)
    return paths


class OpenClipFiles(Dataset):
    def __init__(self, paths: list[Path], preprocess) -> None:
        self.paths, self.preprocess = paths, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.preprocess(Image.open(self.paths[index]).convert("RGB"))


def main() -> None:
    arguments = parser(__doc__.splitlines()[0])
    arguments.add_argument("--images", type=int, help="default 5,000 (500 with --quick)")
    arguments.add_argument("--workers", type=int, default=default_workers(), help="decoding processes, both sides")
    args = arguments.parse_args()
    count = args.images or (500 if args.quick else 5000)
    index = index_figures(args.quick)

    import open_clip

    torch.manual_seed(0)
    reference, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32")
    reference.eval()
    with tempfile.TemporaryDirectory(prefix="clipforge-retrieval-bench-") as folder:
        figures, rows = embedding_figures(Path(folder), reference, preprocess, count, args.workers)
    figures = {
        "benchmark": "retrieval",
        "num_vectors": index["num_vectors"],
        "index": index["index"],
        "build_s": index["build_s"],
        "memory_mb": index["memory_mb"],
        "p50_ms": index["p50_ms"],
        "p99_ms": index["p99_ms"],
        "recall_at_10": index["recall_at_10"],
        **figures,
    }
    rows = [
        ["index", f"{index['index']} over {index['num_vectors']:,} vectors"],
        ["index build (s)", index["build_s"]],
        ["index memory (MB)", index["memory_mb"]],
        ["query p50 / p99 (ms)", f"{index['p50_ms']} / {index['p99_ms']}"],
        ["recall@10", index["recall_at_10"]],
        *rows,
    ]
    report("Retrieval: index and embedding", ["figure", "value"], rows, figures)


def embedding_figures(work: Path, reference, preprocess, count: int, workers: int) -> tuple[dict, list]:
    """Time the embedding pipelines on the same JPEGs, in turn; figures and table rows."""
    ours = clipforge.load("ViT-B-32")
    ours.load_state_dict(reference.state_dict())
    clipforge.save(ours, work / "vit-b-32.safetensors")
    clipforge.save(apply_compression(ours, "int8-dynamic"), work / "vit-b-32-int8.safetensors")
    (work / "images").mkdir()
    paths = write_jpegs(work / "images", count)
    cli = typer.Typer()
    cli.callback()(lambda: None)
    embed_cli.register(cli)
    runs = itertools.count()
    outputs: dict[str, object] = {}

    def openclip_loop() -> None:
        loader = DataLoader(OpenClipFiles(paths, preprocess), batch_size=BATCH_SIZE, num_workers=workers)
        features = []
        with torch.no_grad():
            for pixels in loader:
                features.append(F.normalize(reference.encode_image(pixels), dim=-1))
        outputs["open_clip"] = torch.cat(features).numpy()

    def clipforge_embed(name: str, checkpoint: str, precision: str) -> None:
        out = work / f"store-{next(runs)}"
        argv = ["embed", str(work / "images"), "--model", str(work / checkpoint), "--out", str(out),
                "--precision", precision, "--workers", str(workers), "--batch-size", str(BATCH_SIZE)]
        with contextlib.redirect_stdout(sys.stderr):  # its summary line; stdout is the table and the JSON line
            cli(argv, standalone_mode=False)
        outputs[name] = out

    pipelines = {
        "open_clip": openclip_loop,
        "clipforge": lambda: clipforge_embed("clipforge", "vit-b-32.safetensors", "bf16"),
        "clipforge_int8": lambda: clipforge_embed("clipforge_int8", "vit-b-32-int8.safetensors", "fp32"),
    }
    seconds = interleaved_medians(pipelines, repeats=1, warmup=0)

    def cosine(name: str) -> float:
        stored = EmbeddingStore(outputs[name]).load_embeddings("img")
        return round(float(np.mean(np.sum(stored * outputs["open_clip"], axis=1))), 4)

    figures = {
        "images": count,
        "workers": workers,
        "openclip_img_s": round(count / seconds["open_clip"], 1),
        "clipforge_img_s": round(count / seconds["clipforge"], 1),
        "embed_vs_openclip": round(seconds["open_clip"] / seconds["clipforge"], 2),
        "mean_cosine": cosine("clipforge"),
        "clipforge_int8_img_s": round(count / seconds["clipforge_int8"], 1),
        "embed_int8_vs_openclip": round(seconds["open_clip"] / seconds["clipforge_int8"], 2),
        "int8_mean_cosine": cosine("clipforge_int8"),
    }
    rows = [
        [f"open_clip fp32 loop, {count} JPEGs, {workers} workers (img/s)", figures["openclip_img_s"]],
        ["clipforge embed, bf16 (img/s)", figures["clipforge_img_s"]],
        ["embedding speed ratio", figures["embed_vs_openclip"]],
        ["mean cosine, clipforge vs open_clip", figures["mean_cosine"]],
        ["clipforge embed, int8-dynamic checkpoint (img/s)", figures["clipforge_int8_img_s"]],
        ["embedding speed ratio, int8", figures["embed_int8_vs_openclip"]],
        ["mean cosine, int8 vs open_clip", figures["int8_mean_cosine"]],
    ]
    return figures, rows


if __name__ == "__main__":
    main()
