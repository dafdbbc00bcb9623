"""What this machine multiplies fastest: dense-GEMM throughput per precision.

``gemm_gflops`` times ``torch.mm`` (fp32, bf16) or ``torch._int_mm`` (int8 × int8 → int32, oneDNN's
VNNI/AMX kernels) on square matrices with the threads torch uses; the training recipes choose their
autocast precision from it (``clipforge.train.step.resolve_amp``) and the benchmarks print it beside
their ratios. The flags a CPU reports do not settle the question: AVX512-BF16 without AMX runs bf16
GEMMs at 2.5x fp32 on AMD Zen 4 and at half of fp32 on some Intel Xeons.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

PRECISIONS = ("fp32", "bf16", "int8")


def median_seconds(run: Callable[[], Any], repeats: int) -> float:
    """Median wall time of ``repeats`` calls after two warm-up calls (which JIT oneDNN's kernels)."""
    run()
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gemm_gflops(precision: str, size: int, repeats: int) -> float:
    """Throughput of a ``size``² × ``size``² product in ``precision`` (fp32, bf16 or int8), GFLOP/s."""
    generator = torch.Generator().manual_seed(0)
    if precision == "int8":
        a, b = (torch.randint(-128, 128, (size, size), dtype=torch.int8, generator=generator) for _ in range(2))
        product: Callable[[], Any] = lambda: torch._int_mm(a, b)  # noqa: E731
    elif precision in ("fp32", "bf16"):
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        a, b = (torch.randn(size, size, generator=generator).to(dtype) for _ in range(2))
        product = lambda: torch.mm(a, b)  # noqa: E731
    else:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return 2 * size**3 / median_seconds(product, repeats) / 1e9
