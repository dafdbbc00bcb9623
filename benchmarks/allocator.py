"""Image encoding under glibc's default allocator settings against fixed thresholds (what a user sets in the shell).

glibc's malloc gives the free memory at the top of its heap back to the system once more than ``M_TRIM_THRESHOLD``
is free, and serves blocks above ``M_MMAP_THRESHOLD`` with fresh ``mmap`` pages; by default both thresholds follow
the program's history (mallopt(3)). An inference loop frees and allocates the same activations every batch, so
the kernel may hand out and zero fresh pages on every call. Fixing the thresholds, ``MALLOC_MMAP_THRESHOLD_`` at
glibc's 64-bit maximum (32 MiB) and ``MALLOC_TRIM_THRESHOLD_`` at 1 GiB, keeps the pages, at the price of a
process that holds on to its peak memory. glibc reads them when the process starts, so each setting runs in its
own child process, the two in turn, the order swapped each round, for ``--rounds``; a child encodes one batch of
random pixels (seed 0) after 3 untimed calls and reports the median of 15 timed ones; the table gives the median
over rounds. Decided before the first run: the figure is ``fixed_over_default`` (speed-up) on the demo's
``synthetic-tiny`` config at batch 32, and on ViT-B-32 at batch 32.

    python benchmarks/allocator.py [--quick] [--model synthetic-tiny] [--batch 32] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
from _common import parser, report
from _machine import machine_limits, print_machine

import clipforge

FIXED = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


@torch.inference_mode()
def time_encoding(model_name: str, batch: int) -> float:
    """Median milliseconds of ``encode_image`` on one batch (in this process, under its allocator settings)."""
    model = clipforge.load(model_name)
    size = model.config.vision.image_size
    pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        model.encode_image(pixels)
    times = []
    for _ in range(15):
        start = time.perf_counter()
        model.encode_image(pixels)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def child_milliseconds(model_name: str, batch: int, environment: dict[str, str]) -> float:
    command = [sys.executable, __file__, "--child", "--model", model_name, "--batch", str(batch)]
    env = {name: value for name, value in os.environ.items() if name not in FIXED} | environment
    child = subprocess.run(command, env=env, capture_output=True, text=True)
    if child.returncode != 0:
        lines = child.stderr.strip().splitlines() or [f"exit status {child.returncode}"]
        sys.exit(f"allocator.py: the timing child failed: {lines[-1]}")
    return float(child.stdout.strip().splitlines()[-1])


def main() -> None:
    arguments = parser(__doc__.splitlines()[0])
    arguments.add_argument("--model", default="synthetic-tiny", help="config name or checkpoint (random weights are fine)")
    arguments.add_argument("--batch", type=int, default=32)
    arguments.add_argument("--rounds", type=int, default=5)
    arguments.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = arguments.parse_args()
    if args.batch < 1 or args.rounds < 1:
        arguments.error("--batch and --rounds must be positive")
    if args.child:
        print(f"{time_encoding(args.model, args.batch):.4f}")
        return
    limits = machine_limits(args.quick)
    print_machine(limits)
    rounds = 2 if args.quick else args.rounds
    settings = {"default": {}, "fixed": FIXED}
    milliseconds: dict[str, list[float]] = {"default": [], "fixed": []}
    for round_ in range(rounds):
        for name in ("default", "fixed") if round_ % 2 == 0 else ("fixed", "default"):
            milliseconds[name].append(child_milliseconds(args.model, args.batch, settings[name]))
    default, fixed = (statistics.median(milliseconds[name]) for name in ("default", "fixed"))
    rows = [
        ["glibc default", f"{default:.2f}", f"{1e3 * args.batch / default:.0f}", "1.00x"],
        [" ".join(f"{name}={value}" for name, value in FIXED.items()), f"{fixed:.2f}", f"{1e3 * args.batch / fixed:.0f}", f"{default / fixed:.2f}x"],
    ]
    figures = {
        "benchmark": "allocator",
        "model": args.model,
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "precision": "fp32",
        "rounds": rounds,
        "default_ms": round(default, 3),
        "fixed_ms": round(fixed, 3),
        "fixed_over_default": round(default / fixed, 3),
        "rounds_ms": {name: [round(value, 3) for value in values] for name, values in milliseconds.items()},
        "gemm_gflops": limits["gemm_gflops"],
        "cpu": limits["cpu"],
        "isa": limits["isa"],
    }
    report(f"encode_image, {args.model}, batch {args.batch}, medians of {rounds} rounds", ["allocator", "ms per batch", "images/s", "speed-up"], rows, figures)


if __name__ == "__main__":
    main()
