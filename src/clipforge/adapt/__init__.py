"""Few-shot adaptation of a CLIP model to a classification task.

    import clipforge
    from clipforge import adapt
    model = clipforge.load("runs/demo/model.safetensors")
    adapter = adapt.fit("gda", model, "synthetic:shape_all", shots=16, seed=1)   # or a folder, table, shards
    adapter.save("shapes.safetensors")
    adapt.load_adapter("shapes.safetensors")(model).classify(images).names

Methods (``clipforge.adapt.registry.METHODS``), each in its own module citing its paper and official code:
training-free Tip-Adapter and GDA; fitted heads: linear probe, CLAP, Tip-Adapter-F; prompt learning: CoOp,
MaPLe; weight-changing: CLIP-LoRA, CLIP-SVD, WiSE-FT (these write a checkpoint). Few shots are drawn by
``clipforge.adapt.fewshot``; features are cached by ``clipforge.adapt.features``; files are described in
``clipforge.adapt.adapter_file``.
"""

from clipforge.adapt.adapter import (
    AdaptedClassifier,
    Adapter,
    Classification,
    fit,
    load_adapter,
)
from clipforge.adapt.adapter_file import AdapterRecord, model_fingerprint
from clipforge.adapt.features import FeatureCache
from clipforge.adapt.fewshot import FewShotSet, sample_few_shot
from clipforge.adapt.registry import METHODS, get_method, register

__all__ = [
    "METHODS",
    "AdaptedClassifier",
    "Adapter",
    "AdapterRecord",
    "Classification",
    "FeatureCache",
    "FewShotSet",
    "fit",
    "get_method",
    "load_adapter",
    "model_fingerprint",
    "register",
    "sample_few_shot",
]
