"""Retrieval: the vector index on 1M vectors, and the folder-to-store embedding pipeline, clipforge vs its best peer.

Index figures (build time, memory, p50/p99 single-query latency, recall@10 against exact search) come
from ``benchmarks/retrieval_index.py``, run as it is. Embedding: N synthetic 256-px JPEGs (2,000;
``--quick``: 256) in a folder go to an embedding store in clip-retrieval's layout (float16 vectors and a
parquet of paths): listing, decoding, preprocessing, encoding and writing are all timed. The same
ViT-B-32 weights (random, seeded), batch, decoding workers and torch threads on both sides:

- the peer, open_clip as a user writes it: its eval preprocess in a ``Dataset``, a ``DataLoader`` with the
  same number of worker processes, ``encode_image`` under ``torch.no_grad``, the vectors normalised and
  saved with numpy and pyarrow; run with ``create_model_and_transforms(precision="fp32")`` and
  ``precision="bf16"`` (pixels cast to bf16);
- clipforge, the ``clipforge embed FOLDER --out STORE`` path (``retrieval.embed.embed_to_store`` on the
  model ``load_model`` gives for the store's reference) at ``--precision fp32`` (the command's default)
  and ``--precision bf16``, and on its OpenVINO int8 export (``clipforge compress openvino --int8``, NNCF
  calibrated on 4 batches of other JPEGs of the same world; ``--model DIR`` in ``embed``).

The rule, fixed before any run: each side's figure is its fastest path whose vectors keep a mean cosine
≥ 0.999 to open_clip fp32's (a user picks the faster one; bf16 is not faster on every CPU), so
``embed_vs_best_peer`` is clipforge's best over open_clip's best (``best_peer``); ``embed_default_vs_best_peer`` is clipforge at its default fp32 over
the same peer. Models are loaded before timing; each pipeline first runs once on 2 batches (kernels
compiled, workers' imports cached), then the five are timed in turn, median of 5 (``--quick``: 3).
The mean cosine of each side's stored vectors to open_clip fp32's shows the precision's cost.

    python benchmarks/retrieval.py [--quick] [--images N] [--workers W]
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch and faiss: see retrieval_index.py

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import interleaved_medians, parser, report  # noqa: E402
from _machine import (  # noqa: E402
    achieved_gflops,
    clip_forward_flops,
    library_versions,
    machine_limits,
    print_machine,
    roofline_fraction,
)
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

import clipforge  # noqa: E402
from clipforge.compress.export_openvino import export_openvino  # noqa: E402
from clipforge.data.synthetic import SyntheticWorld, WorldConfig  # noqa: E402
from clipforge.encode import default_workers  # noqa: E402
from clipforge.retrieval.embed import embed_to_store, load_model, model_reference  # noqa: E402

BATCH_SIZE = 64
IMAGE_SIZE = 256
PRECISIONS = ("fp32", "bf16")
OURS = (*PRECISIONS, "int8")
COSINE_FLOOR = 0.999
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def index_figures(quick: bool) -> dict:
    """The last line (JSON) of ``retrieval_index.py``; its own table goes to our stderr."""
    script = Path(__file__).with_name("retrieval_index.py")
    result = subprocess.run(
        [sys.executable, str(script)] + (["--quick"] if quick else []), capture_output=True, text=True, check=True
    )
    print(result.stdout.rsplit("\n", 2)[0], file=sys.stderr)
    return json.loads(result.stdout.strip().splitlines()[-1])


def write_jpegs(folder: Path, count: int) -> None:
    world = SyntheticWorld(WorldConfig(image_size=IMAGE_SIZE))
    folder.mkdir()
    for index in range(count):
        world.sample("train", index).image.save(folder / f"{index:05d}.jpg", quality=90)


class OpenClipFiles(Dataset):
    def __init__(self, paths: list[Path], preprocess) -> None:
        self.paths, self.preprocess = paths, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.preprocess(Image.open(self.paths[index]).convert("RGB"))


def main() -> None:
    arguments = parser(__doc__.splitlines()[0])
    arguments.add_argument("--images", type=int, help="default 2,000 (256 with --quick)")
    arguments.add_argument("--workers", type=int, default=default_workers(), help="decoding processes, both sides")
    args = arguments.parse_args()
    count = args.images or (256 if args.quick else 2000)
    limits = machine_limits(args.quick)
    print_machine(limits)
    index = index_figures(args.quick)
    with tempfile.TemporaryDirectory(prefix="clipforge-retrieval-bench-") as folder:
        figures, rows = embedding_figures(Path(folder), count, args.workers, 3 if args.quick else 5, limits)
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
        "versions": library_versions(),
        "machine": limits,
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


def openclip_store(model, preprocess, dtype: torch.dtype, folder: Path, out: Path, workers: int) -> None:
    """open_clip + DataLoader: the folder's JPEGs → normalised float16 vectors and their paths, on disk."""
    paths = sorted(folder.rglob("*.jpg"))
    loader = DataLoader(OpenClipFiles(paths, preprocess), batch_size=BATCH_SIZE, num_workers=workers)
    with torch.no_grad():
        features = [F.normalize(model.encode_image(pixels.to(dtype)).float(), dim=-1) for pixels in loader]
    (out / "img_emb").mkdir(parents=True)
    (out / "metadata").mkdir()
    np.save(out / "img_emb" / "img_emb_0.npy", torch.cat(features).numpy().astype(np.float16))
    pq.write_table(pa.table({"image_path": [str(path) for path in paths]}), out / "metadata" / "metadata_0.parquet")


def stored_vectors(store: Path) -> np.ndarray:
    return np.load(store / "img_emb" / "img_emb_0.npy").astype(np.float32)


def embedding_figures(work: Path, count: int, workers: int, repeats: int, limits: dict) -> tuple[dict, list]:
    """Time the five pipelines on the same JPEGs, in turn; figures and table rows."""
    import open_clip

    torch.manual_seed(0)
    peers = {p: open_clip.create_model_and_transforms("ViT-B-32", precision=p) for p in PRECISIONS}
    state = peers["fp32"][0].state_dict()
    ours = clipforge.load("ViT-B-32")
    ours.load_state_dict(state)
    clipforge.save(ours, work / "vit-b-32.safetensors")
    folders = {"warm": work / "warm", "calibration": work / "calibration", "timed": work / "images"}
    for name, images in (("warm", 2 * BATCH_SIZE), ("calibration", 4 * BATCH_SIZE), ("timed", count)):
        write_jpegs(folders[name], images)
    calibration = torch.stack([ours.preprocess(Image.open(path)) for path in sorted(folders["calibration"].iterdir())])
    export_openvino(ours, work / "vit-b-32-ov", int8=True, calibration_images=calibration, calibration_texts=["a photo of shapes"] * 8)  # only images are timed here
    references = {p: model_reference(str(work / "vit-b-32.safetensors"), None, None, p) for p in PRECISIONS}
    references["int8"] = model_reference(str(work / "vit-b-32-ov"), None, None, "fp32")
    models = {f"clipforge_{p}": load_model(references[p]) for p in OURS}
    for precision, (model, _, preprocess) in peers.items():
        model.load_state_dict(state)
        models[f"open_clip_{precision}"] = model.eval()
    runs = itertools.count()
    latest: dict[str, Path] = {}

    def pipeline(name: str, folder: Path) -> None:
        out = work / f"store-{next(runs)}"
        precision = name.rsplit("_", 1)[1]
        if name.startswith("clipforge"):
            embed_to_store(models[name], references[precision], [folder], out, batch_size=BATCH_SIZE, workers=workers, progress=False)
        else:
            openclip_store(models[name], peers[precision][2], DTYPES[precision], folder, out, workers)
        latest[name] = out

    names = [*(f"open_clip_{p}" for p in PRECISIONS), *(f"clipforge_{p}" for p in OURS)]
    for name in names:
        pipeline(name, folders["warm"])
    seconds = interleaved_medians({name: functools.partial(pipeline, name, folders["timed"]) for name in names}, repeats, warmup=0)
    rate = {name: count / seconds[name] for name in names}
    fp32 = stored_vectors(latest["open_clip_fp32"])
    cosine = {name: float(np.mean(np.sum(stored_vectors(latest[name]) * fp32, axis=1))) for name in names}
    eligible = [name for name in names if cosine[name] >= COSINE_FLOOR]
    best_peer = max((n for n in eligible if n.startswith("open_clip")), key=rate.__getitem__)
    best_ours = max((n for n in eligible if n.startswith("clipforge")), key=rate.__getitem__)
    flops = clip_forward_flops(ours)
    sides = {
        name: {
            "precision": name.rsplit("_", 1)[1],
            "threads": torch.get_num_threads(),
            "workers": workers,
            "img_s": round(rate[name], 1),
            "achieved_gflops": round(achieved_gflops(flops, rate[name]), 1),
            "roofline_fraction": round(roofline_fraction(flops, rate[name], name.rsplit("_", 1)[1], limits), 4),
            "mean_cosine_to_openclip_fp32": round(cosine[name], 5),
        }
        for name in names
    }
    figures = {
        "images": count,
        "workers": workers,
        "repeats": repeats,
        "best_peer": best_peer,
        "best_peer_img_s": sides[best_peer]["img_s"],
        "clipforge_best": best_ours,
        "clipforge_best_img_s": sides[best_ours]["img_s"],
        "embed_vs_best_peer": round(rate[best_ours] / rate[best_peer], 3),
        "embed_default_vs_best_peer": round(rate["clipforge_fp32"] / rate[best_peer], 3),
        "embed_vs_openclip_fp32": round(rate[best_ours] / rate["open_clip_fp32"], 3),
        "flops_per_image": round(flops),
        "sides": sides,
    }
    rows = [
        [f"{' '.join(name.rsplit('_', 1))}, {count} JPEGs → store (img/s; GFLOP/s, of limit; cosine to open_clip fp32)",
         f"{s['img_s']:.1f}; {s['achieved_gflops']:.1f}, {s['roofline_fraction']:.0%}; {s['mean_cosine_to_openclip_fp32']:.5f}"]
        for name, s in sides.items()
    ]
    rows += [[f"clipforge best ({best_ours}) vs best peer ({best_peer})", f"{figures['embed_vs_best_peer']:.2f}"],
             ["clipforge default (fp32) vs best peer", f"{figures['embed_default_vs_best_peer']:.2f}"]]
    return figures, rows


if __name__ == "__main__":
    main()
