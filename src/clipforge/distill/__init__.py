"""Distillation: TinyCLIP (affinity mimicking, manual and automatic weight inheritance, progressive stages) and
MobileCLIP (reinforced datasets), on the one trainer.

    import clipforge
    from clipforge.distill import DistillJob, distill, parse_student, parse_stages
    from clipforge.train.config import load_config

    teacher = clipforge.load("teacher.safetensors")
    student = parse_student("inherit")                                   # or inherit:0.5, auto:0.5, a config
    job = DistillJob(student, parse_stages("0.75,0.5,0.25", student))
    result = distill(teacher, "teacher.safetensors", job, load_config("run.toml"))
    result.model                                                         # an ordinary clipforge CLIP

Modules: ``losses`` (``AffinityMimickingLoss``), ``inherit`` (manual inheritance), ``masks`` and ``auto``
(automatic inheritance), ``plan`` (students from ratios), ``objective`` (``Distillation``, the trainer's
objective), ``reinforce`` and ``reinforced`` (MobileCLIP's shards: writing and training), ``runner`` (stages).
"""

from clipforge.distill.inherit import count_parameters, inherit, selections
from clipforge.distill.job import AutoSettings, DistillJob
from clipforge.distill.losses import AffinityMimickingLoss
from clipforge.distill.objective import Distillation, DistillSettings
from clipforge.distill.plan import parse_stages, parse_student, plan_student
from clipforge.distill.reinforce import reinforce
from clipforge.distill.reinforced import ReinforcedData
from clipforge.distill.runner import DistillResult, distill

__all__ = [
    "AffinityMimickingLoss",
    "AutoSettings",
    "DistillJob",
    "DistillResult",
    "DistillSettings",
    "Distillation",
    "ReinforcedData",
    "count_parameters",
    "distill",
    "inherit",
    "parse_stages",
    "parse_student",
    "plan_student",
    "reinforce",
    "selections",
]
