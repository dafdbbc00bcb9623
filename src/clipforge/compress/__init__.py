"""Make a model smaller and faster: token merging and pruning in the image tower, bf16 and int8.

    from clipforge.compress import apply_token_reduction, estimate_flops
    apply_token_reduction(model, "tome", r=8)                # ToMe (Bolya et al., ICLR 2023)
    apply_token_reduction(model, "pitome", keep_ratio=0.9)   # PiToMe (Tran et al., NeurIPS 2024)
    apply_token_reduction(model, "evit", keep_rate=0.7)      # EViT (Liang et al., ICLR 2022)
    estimate_flops(model), model.compression                 # block FLOPs; the settings, for checkpoints

Each method is a ``TokenReduction`` hook that the image blocks call between attention and MLP; with its
reduction off (``r=0``, ``keep_ratio=1``, ``keep_rate=1``) the model's output is unchanged.

    from clipforge.compress import apply_compression, apply_steps, parse_steps
    model = apply_compression(model, "int8")                 # any step; recorded, so clipforge.save/load keep it
    model = apply_steps(model, parse_steps("bf16+tome:r=8")) # steps as data (``records``)

Also: ``quantize`` (torch.ao int8), ``simquant`` and ``mixed_precision`` (simulated PTQ), ``export_onnx`` and
``export_openvino`` (directories ``clipforge.load`` runs in onnxruntime or OpenVINO: ``exported``),
``early_exit`` (LGViT exit heads) and ``report`` (speed and accuracy of variants side by side).
"""

from clipforge.compress.records import (
    apply_compression,
    apply_steps,
    compression_steps,
    describe_steps,
    make_step,
    parse_step,
    parse_steps,
)
from clipforge.compress.reduction.evit import EViT, keep_attentive_tokens
from clipforge.compress.reduction.pitome import PiToMe, energy_scores, pitome_matching
from clipforge.compress.reduction.registry import (
    METHODS,
    apply_token_reduction,
    build_token_reduction,
    estimate_flops,
    remove_token_reduction,
    token_counts,
)
from clipforge.compress.reduction.schedules import (
    ScheduledReduction,
    keep_ratio_schedule,
    margin_schedule,
    merge_schedule,
)
from clipforge.compress.reduction.tome import (
    TokenMerging,
    ToMe,
    bipartite_soft_matching,
    merge_source,
    merge_wavg,
    proportional_attention_bias,
)

__all__ = [
    "METHODS",
    "EViT",
    "PiToMe",
    "ScheduledReduction",
    "ToMe",
    "TokenMerging",
    "apply_compression",
    "apply_steps",
    "apply_token_reduction",
    "bipartite_soft_matching",
    "build_token_reduction",
    "compression_steps",
    "describe_steps",
    "energy_scores",
    "estimate_flops",
    "keep_attentive_tokens",
    "keep_ratio_schedule",
    "make_step",
    "margin_schedule",
    "merge_schedule",
    "merge_source",
    "merge_wavg",
    "parse_step",
    "parse_steps",
    "pitome_matching",
    "proportional_attention_bias",
    "remove_token_reduction",
    "token_counts",
]
