"""This machine's limits, so that a speed figure means the same on a 2-core laptop and on an AMX server.

``machine_limits`` measures dense matrix-multiply throughput (GFLOP/s; for int8, giga-operations per
second) at the precisions the benchmarks run in, with the threads torch uses:

- fp32: ``torch.mm`` on float32 (MKL / oneDNN's AVX-512 or AVX2 kernels);
- bf16: ``torch.mm`` on bfloat16 (oneDNN's brgemm matmul, AVX512-BF16 or AMX-BF16 where the CPU has them);
- int8: ``torch._int_mm`` (int8 × int8 → int32), which on CPU calls oneDNN's s8s8s32 GEMM and so uses
  AVX512-VNNI or AMX-INT8 where present — the instructions the int8 inference paths rely on.
  (Checked with ``ONEDNN_VERBOSE=1``: ``gemm_api ... src_s8 wei_s8 dst_s32``. A dynamically quantized
  ``nn.Linear`` goes through fbgemm/oneDNN too, but adds the activation quantization to the timing.)

Each is the median of a few warmed repeats of a square 2048 product. A benchmark then reports its
achieved GFLOP/s (its own FLOP count × items per second) and ``roofline_fraction``, that figure over the
limit of its precision — a model-FLOPs utilization in the sense of Chowdhery et al., "PaLM" (JMLR 2023).
"""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from clipforge._util.machine import PRECISIONS, gemm_gflops

GEMM_SIZE = 2048
ISA_FLAGS = ("avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
LIBRARIES = {"torch": "torch", "open_clip": "open_clip_torch", "onnxruntime": "onnxruntime", "openvino": "openvino", "nncf": "nncf"}


def _gemm_gflops(quick: bool) -> dict[str, float]:
    return {precision: round(gemm_gflops(precision, GEMM_SIZE, 3 if quick else 7), 1) for precision in PRECISIONS}


def _cpu() -> tuple[str, list[str]]:
    """The CPU's model name and which of ``ISA_FLAGS`` it reports (Linux; elsewhere the platform string)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), []
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), platform.machine())
    flags = next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())
    return name, [flag for flag in ISA_FLAGS if flag in flags]


def machine_limits(quick: bool) -> dict[str, Any]:
    """GEMM throughput per precision, the CPU, its relevant instruction sets and torch's thread count."""
    cpu, isa = _cpu()
    return {"gemm_gflops": _gemm_gflops(quick), "cpu": cpu, "isa": isa, "threads": torch.get_num_threads()}


def achieved_gflops(flops_per_item: float, items_per_s: float) -> float:
    return flops_per_item * items_per_s / 1e9


def clip_forward_flops(model: torch.nn.Module, text_tokens: float | None = None) -> float:
    """Forward matmul FLOPs per sample of a clipforge CLIP: 2 × Σ (weight-matrix parameters × tokens through them).

    The image tower's blocks see every patch plus the class token, the patch embedding every patch and the
    projection one token; the text tower's blocks see ``text_tokens`` (None: the image tower only).
    Attention scores (2·L²·width per block) are left out, as in the 6·N·D rule of Kaplan et al., "Scaling
    Laws for Neural Language Models" (2020): forward + backward is 3 × this figure.
    """
    visual = model.visual
    patches = int(visual.positional_embedding.shape[0]) - 1
    flops = _block_matrices(visual) * (patches + 1) + visual.conv1.weight.numel() * patches + visual.proj.numel()
    if text_tokens is not None:
        flops += _block_matrices(model) * text_tokens + model.text_projection.numel()
    return 2.0 * flops


def _block_matrices(tower: torch.nn.Module) -> int:
    return sum(p.numel() for p in tower.transformer.parameters() if p.dim() == 2)


def roofline_fraction(flops_per_item: float, items_per_s: float, precision: str, limits: dict[str, Any]) -> float:
    """Achieved GFLOP/s over this machine's GEMM limit at ``precision`` (fp32, bf16 or int8)."""
    return achieved_gflops(flops_per_item, items_per_s) / limits["gemm_gflops"][precision]


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries the benchmarks compare (None: not installed)."""
    versions: dict[str, str | None] = {}
    for name, distribution in {"clipforge": "clipforge", **LIBRARIES}.items():
        try:
            versions[name] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def machine_line(limits: dict[str, Any]) -> str:
    gemm = limits["gemm_gflops"]
    return (
        f"machine: {limits['cpu']}, {limits['threads']} threads, {' '.join(limits['isa']) or 'no AVX512-BF16/VNNI/AMX'}; "
        f"GEMM {GEMM_SIZE}² fp32 {gemm['fp32']:.0f}, bf16 {gemm['bf16']:.0f}, int8 {gemm['int8']:.0f} GFLOP/s"
    )


def print_machine(limits: dict[str, Any]) -> None:
    """The one-line ``machine: ...`` a speed benchmark prints before its table."""
    print(machine_line(limits), flush=True)
