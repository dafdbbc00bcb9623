"""Early exit for the CLIP image tower: LGViT's exit heads, self-distilled, adapted to zero-shot classification.

LGViT (Xu et al., "LGViT: Dynamic Early Exiting for Accelerating Vision Transformer", ACM MM 2023; official code
falcon-xu/LGViT 3147fb8, ``models/deit_highway/highway.py`` and ``modeling_highway_deit.py``) attaches exit heads
to intermediate blocks, trains them with the backbone frozen by distilling the final prediction, and at inference
stops at the first exit whose maximum softmax probability exceeds a threshold. Faithful parts:

- Heads (``DeiTHighway_v2``): *local perception* heads run convolutions on the patch grid (``conv1_1``: 1×1 conv →
  GELU → BN → 3×3 depthwise → GELU → BN → 1×1 conv → BN, plus the input; ``conv2_1`` without the depthwise
  stage); *global aggregation* heads (``GlobalSparseAttn``) keep every s-th patch in each direction
  (``AvgPool2d(1, s)``) and run multi-head attention over those. The exit pools ``mean(head tokens) + class token``.
  Placement: after blocks 4..11 (1-based) of 12; the first half of the exits local, the second half global.
- Exit rule (``DeiTEncoder.forward``, ``confidence``): after each exit block, exit if ``max softmax > threshold``.
- Training (``distillation_LGViT``): backbone frozen, per exit a prediction term mixing a hard target and
  ``α·KL_T(exit ‖ final)·T²`` (summed, divided by the logits' element count, α=0.3, T=2), plus 0.01× heterogeneous
  feature distillation (channel-softmax KL from the first and last exit of each kind to the last block's patch
  tokens, subsampled to the head's stride) and 0.01× homogeneous distillation (MSE of each exit's tokens to the
  last exit of its kind; Gram matrices for the global heads). AdamW with linearly decaying lr (Hugging Face
  ``Trainer`` defaults used by ``run_distillation_deit.py``).

Adaptation to CLIP (ours): a head ends in ``LayerNorm`` and a projection to the shared
embedding space, initialised from the tower's ``ln_post`` and ``proj`` (LGViT copies the backbone's pooler into its
heads), so an exit emits an *image embedding*. The hard target becomes the final embedding itself (``1 − cosine``),
and the KL compares zero-shot distributions over a text bank (class embeddings) at the model's logit scale;
without a text bank only the cosine term is used. At inference the exit's zero-shot prediction against the class
text embeddings decides. This serves classification against a fixed prompt bank, not retrieval. Deviations:
global heads use the tower's head count (LGViT: 8), and the layer placement and head kinds generalise LGViT's
12-block tables (they match them for 2, 4 and 8 exits).

Modules: ``heads`` (the head modules, ``ExitHeads``, placement defaults and checks), ``train`` (the loss,
``train_exit_heads`` and ``fit_exit_heads`` on a dataset), ``fold`` (inference copies of the heads with their
BatchNorms folded), ``classify`` (``EarlyExitClassifier`` and
``evaluate_early_exit`` against the full model), ``heads_file`` (``save_exit_heads``/``load_exit_heads``,
format ``clipforge-exit-heads``) and ``batches`` (a dataset's images as pixel batches).

    heads = fit_exit_heads(model, train_set, classifier, progress=True)  # 4000 steps
    result = evaluate_early_exit(model, heads, test_set, classifier, threshold=0.8)
    save_exit_heads(heads, "exits.safetensors", threshold=0.8)
    heads, threshold = load_exit_heads("exits.safetensors", model)
    EarlyExitClassifier(model, heads, classifier, threshold)(pixels).predictions
"""

from clipforge.compress.early_exit.batches import pixel_batches
from clipforge.compress.early_exit.classify import (
    EarlyExitClassifier,
    EarlyExitEvaluation,
    EarlyExitResult,
    evaluate_early_exit,
)
from clipforge.compress.early_exit.fold import FoldedLocalPerception, fold_batch_norms
from clipforge.compress.early_exit.heads import (
    EXIT_KINDS,
    ExitHead,
    ExitHeads,
    GlobalSparseAttention,
    LocalPerception,
    check_exit_kinds,
    check_exit_layers,
    default_exit_kinds,
    default_exit_layers,
    patch_grid,
    subsample_grid,
)
from clipforge.compress.early_exit.heads_file import (
    FORMAT,
    load_exit_heads,
    save_exit_heads,
)
from clipforge.compress.early_exit.train import (
    FIT_STEPS,
    SYNTHETIC_FIT_IMAGES,
    exit_distillation_loss,
    fit_exit_heads,
    train_exit_heads,
)

__all__ = [
    "EXIT_KINDS",
    "FIT_STEPS",
    "FORMAT",
    "EarlyExitClassifier",
    "EarlyExitEvaluation",
    "EarlyExitResult",
    "ExitHead",
    "ExitHeads",
    "FoldedLocalPerception",
    "GlobalSparseAttention",
    "LocalPerception",
    "SYNTHETIC_FIT_IMAGES",
    "check_exit_kinds",
    "check_exit_layers",
    "default_exit_kinds",
    "default_exit_layers",
    "evaluate_early_exit",
    "exit_distillation_loss",
    "fit_exit_heads",
    "fold_batch_norms",
    "load_exit_heads",
    "patch_grid",
    "pixel_batches",
    "save_exit_heads",
    "subsample_grid",
    "train_exit_heads",
]
