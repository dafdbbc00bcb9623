"""One optimisation step of contrastive training, with open_clip's feature-cache gradient accumulation.

With ``accum_freq`` k the batch is split into k micro-batches. All features are first computed without
gradients; then each micro-batch is recomputed with gradients and its features replace its cached
ones in the full-batch loss. Every sample therefore still sees all B−1 negatives, and the gradient is
that of the full batch, at the memory of one micro-batch (open_clip ``--accum-freq``; Cui et al.,
"Contrastive Vision-Language Pre-training with Limited Resources", 2022). Unlike open_clip, the logit
scale and bias receive their gradient once per step, not once per micro-batch, so the step is exact.
"""

from __future__ import annotations

import functools
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from clipforge._util.machine import gemm_gflops
from clipforge.train.distributed import rank_and_world_size

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
BF16_GAIN_NEEDED = 1.5  # bf16 GEMMs must beat fp32 by this much to pay for autocast's casts


def resolve_amp(amp: str, device: torch.device) -> str:
    """The autocast precision to train in: ``amp`` itself, or for ``auto`` the fastest on ``device``.

    ``auto`` on CUDA is bf16 where the GPU supports it, else fp16; on a CPU it is bf16 when a bf16 GEMM
    runs ≥ 1.5x as fast as an fp32 one (AMX, or AVX512-BF16 on AMD Zen 4), else fp32 (AVX512-BF16 on
    some Xeons runs bf16 at half the fp32 rate; measured there, the trainer is 17% faster in fp32). The
    CPU's answer is measured once per process, in about 0.1 s; under torchrun rank 0 measures and every rank
    takes its answer, so ranks near the threshold cannot train in different precisions.
    """
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu":
        return "bf16" if _cpu_prefers_bf16() else "fp32"
    return "fp32"


@functools.cache
def _cpu_prefers_bf16() -> bool:
    rank, world_size = rank_and_world_size()
    faster = rank == 0 and gemm_gflops("bf16", 1024, 5) >= BF16_GAIN_NEEDED * gemm_gflops("fp32", 1024, 5)
    if world_size == 1:
        return faster
    answer = torch.tensor([float(faster)])
    dist.broadcast(answer, src=0)
    return bool(answer.item())


class ContrastiveStep:
    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        amp: str,
        accum_freq: int,
        grad_clip: float | None,
        device: torch.device,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.accum_freq = accum_freq
        self.grad_clip = grad_clip
        self.device = device
        self.amp = resolve_amp(amp, device)
        self.amp_dtype = AMP_DTYPES[self.amp]
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp == "fp16")

    def autocast(self) -> Any:
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def __call__(self, images: torch.Tensor, texts: torch.Tensor, targets: dict[str, Any] | None = None) -> torch.Tensor:
        """Run forward, backward and the optimizer update; return the (detached) batch loss.

        ``targets`` are extra keyword arguments of the loss for the whole batch (a teacher's features).
        """
        targets = targets or {}
        images = images.to(self.device, non_blocking=True)
        texts = texts.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        if self.accum_freq == 1:
            with self.autocast():
                image_features, text_features, *head = self.model(images, texts)
            loss = self.loss_fn(image_features.float(), text_features.float(), *head, **targets)
            self.scaler.scale(loss).backward()
        else:
            loss = self._accumulated(images.chunk(self.accum_freq), texts.chunk(self.accum_freq), targets)
        if self.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()

    def _accumulated(
        self, images: tuple[torch.Tensor, ...], texts: tuple[torch.Tensor, ...], targets: dict[str, Any]
    ) -> torch.Tensor:
        with torch.no_grad(), self.autocast():
            cached = [self.model(i, t)[:2] for i, t in zip(images, texts)]
        cached_images = [c[0].float() for c in cached]
        cached_texts = [c[1].float() for c in cached]
        loss = torch.zeros(())
        for j, (micro_images, micro_texts) in enumerate(zip(images, texts)):
            last = j == len(images) - 1
            sync = nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
            with sync:
                with self.autocast():
                    image_features, text_features, *head = self.model(micro_images, micro_texts)
                if j > 0:  # the scale and bias get their full-batch gradient once, from micro-batch 0
                    head = [h.detach() for h in head]
                all_images = torch.cat(cached_images[:j] + [image_features.float()] + cached_images[j + 1 :])
                all_texts = torch.cat(cached_texts[:j] + [text_features.float()] + cached_texts[j + 1 :])
                loss = self.loss_fn(all_images, all_texts, *head, **targets)
                self.scaler.scale(loss).backward()
        return loss
