"""Training throughput: clipforge's trainer vs a plain open_clip loop, same tiny model, batch and data.

Both train `synthetic-tiny` from the same random weights on the synthetic world with the CLIP loss and
AdamW at the same batch size. open_clip runs as its README's minimal loop is written: fp32, its
``preprocess_train`` and tokenizer in a DataLoader, ``ClipLoss``, ``AdamW``. clipforge runs its trainer
with the demo recipe's settings (bf16 autocast, text up to the last end token, no augmentation on the
endless synthetic stream). Throughput is the median of windows of `WINDOW` steps after a warm-up.

    python benchmarks/train.py [--quick]
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import parser, report
from torch.utils.data import DataLoader

import clipforge
from clipforge.data.synthetic import SyntheticStream, SyntheticWorld, WorldConfig
from clipforge.demo import recipe_path
from clipforge.train.config import load_config
from clipforge.train.metrics_log import read_metrics
from clipforge.train.trainer import train

WINDOW = 5


def open_clip_config(tmp: Path) -> str:
    """Register synthetic-tiny with open_clip under its own name (open_clip's JSON layout)."""
    import open_clip

    cfg = clipforge.get_model_config("synthetic-tiny").to_dict()
    vision = {k: cfg["vision_cfg"][k] for k in ("image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio")}
    text = {k: cfg["text_cfg"][k] for k in ("context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio")}
    (tmp / "synthetic-tiny-openclip.json").write_text(json.dumps({"embed_dim": cfg["embed_dim"], "vision_cfg": vision, "text_cfg": text}))
    open_clip.add_model_config(tmp / "synthetic-tiny-openclip.json")
    return "synthetic-tiny-openclip"


def open_clip_samples_per_s(name: str, state: dict, batch: int, steps: int, lr: float) -> list[float]:
    import open_clip

    model, preprocess_train, _ = open_clip.create_model_and_transforms(name)
    model.load_state_dict(state)
    model.train()
    tokenizer = open_clip.get_tokenizer(name)
    world = SyntheticWorld(WorldConfig(image_size=64))
    stream = SyntheticStream(world, "train", image_transform=preprocess_train)
    loader = DataLoader(stream, batch_size=batch, num_workers=1, collate_fn=lambda items: (torch.stack([i for i, _ in items]), tokenizer([c for _, c in items])))
    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    rates, window_start = [], time.perf_counter()
    for step, (images, texts) in enumerate(loader, start=1):
        image_features, text_features, scale = model(images, texts)
        loss = loss_fn(image_features, text_features, scale)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % WINDOW == 0:
            now = time.perf_counter()
            rates.append(WINDOW * batch / (now - window_start))
            window_start = now
        if step == steps:
            break
    return rates[1:]  # the first window holds worker start-up


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    steps = 15 if args.quick else 40
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(
            recipe_path("synthetic-tiny.toml"),
            # A few dozen steps time the trainer; the schedule's shape does not matter (the demo's cool-down would not fit)
            [f"schedule.steps={steps}", "schedule.kind=cosine", f"run.log_every={WINDOW}", "run.progress=false", f"run.dir={json.dumps(tmp + '/run')}", "checkpoint.every=100000"],
        )
        torch.manual_seed(0)
        state = clipforge.load("synthetic-tiny").state_dict()
        name = open_clip_config(Path(tmp))
        reference = open_clip_samples_per_s(name, state, config.schedule.batch_size, steps, config.optimizer.lr)
        train(config, resume=False)
        ours = [row["samples_per_s"] for row in read_metrics(Path(tmp) / "run") if "samples_per_s" in row][1:]
    ours_s, reference_s = statistics.median(ours), statistics.median(reference)
    figures = {
        "benchmark": "train",
        "model": "synthetic-tiny",
        "batch_size": config.schedule.batch_size,
        "samples_per_s_clipforge": round(ours_s, 1),
        "samples_per_s_openclip": round(reference_s, 1),
        "train_vs_openclip": round(ours_s / reference_s, 3),
    }
    report(
        f"Training throughput (synthetic-tiny, batch {config.schedule.batch_size}, medians of {WINDOW}-step windows)",
        ["loop", "samples/s", "ratio"],
        [["open_clip (fp32, plain loop)", reference_s, 1.0], ["clipforge trainer (demo recipe)", ours_s, ours_s / reference_s]],
        figures,
    )


if __name__ == "__main__":
    main()
