"""``distill``: compress a teacher into a student in one or several stages, each a run of the one trainer.

TinyCLIP's progressive recipe (Wu et al., ICCV 2023, §3.3): stage k inherits its weights from stage k − 1's
student (the teacher for the first) and is distilled from the original teacher; 100% → 75% → 50% → 25% of the
parameters. The total ``schedule.steps`` is split evenly between the stages (equal total steps), and each stage
gets a fresh schedule (warm-up and cool-down scaled down with it), as TinyCLIP restarts its cosine schedule.

A run directory holds ``distill.json`` (the job, so a rerun with other settings is refused), one trainer run
per stage (``stage_1/``, …: ``init.safetensors`` is the inherited student, then the trainer's checkpoints and
``model.safetensors``), ``masks/`` inside a stage trained with automatic inheritance, and the final
``model.safetensors``, an ordinary clipforge checkpoint whose provenance records the teacher (and an
ensemble's others), the method and the stages. Every stage is planned and checked (schedules, the teachers
against each student) before anything is written. Rerunning the same command resumes: finished stages are kept,
an interrupted one resumes exactly, and a finished run reports its saved figures.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clipforge._util.fileio import atomic_path
from clipforge.config import ModelConfig
from clipforge.distill.auto import SIZE_TOLERANCE, auto_inherit, check_auto, mask_phase
from clipforge.distill.inherit import count_parameters, inherit
from clipforge.distill.job import DistillJob, split_steps, stage_config
from clipforge.distill.objective import Distillation, check_loss, check_teacher
from clipforge.distill.plan import plan_student
from clipforge.distill.reinforced import ReinforcedData
from clipforge.distill.teacher import teacher_record
from clipforge.errors import ConfigError
from clipforge.io.checkpoint import write_checkpoint
from clipforge.models.clip import CLIP
from clipforge.train.config import TrainConfig
from clipforge.train.objective import Objective
from clipforge.train.trainer import TrainResult, train

JOB_FILE = "distill.json"


@dataclass
class DistillResult:
    model: CLIP
    run_dir: Path
    stages: list[TrainResult]
    parameters: list[int]  # of each stage's student
    targets: list[int]  # the parameters each stage aimed at: its planned student's, R × the teacher's for auto:R
    wall_s: float  # training time of all stages (automatic-inheritance mask runs included)

    @property
    def evaluation(self) -> dict[str, float]:
        return self.stages[-1].evaluation

    @property
    def finished_earlier(self) -> bool:
        """The run directory held this finished distillation: the figures are its saved ones."""
        return all(stage.finished_earlier for stage in self.stages)

    def missed_targets(self) -> list[tuple[int, int, int]]:
        """(stage number, parameters, target) of the stages whose student is more than ``SIZE_TOLERANCE`` off."""
        return [(number, count, target) for number, (count, target) in enumerate(zip(self.parameters, self.targets), start=1)
                if abs(count / target - 1) > SIZE_TOLERANCE]


@dataclass(frozen=True)
class _Stage:
    """One stage as planned before anything is written."""

    student: ModelConfig  # the planned student (automatic inheritance learns its own widths)
    target: int  # parameters aimed at
    training: TrainConfig  # the stage's distillation run (after the mask phase for automatic inheritance)
    masks: TrainConfig | None  # automatic inheritance's mask-learning run


def distill(
    teacher: CLIP,
    teacher_source: str,
    job: DistillJob,
    config: TrainConfig,
    *,
    ensemble: Sequence[tuple[CLIP, str]] = (),
    reinforced: ReinforcedData | None = None,
    evaluator: Callable[[CLIP], dict[str, float]] | None = None,
    resume: bool = True,
) -> DistillResult:
    """Distil ``teacher`` into the student of ``job`` on ``config``'s data and schedule (see the module docstring).

    ``ensemble``: further teachers (model, source) whose affinities are averaged with ``teacher``'s after the
    softmax (MobileCLIP's ensemble of two); the student inherits from ``teacher`` alone. ``reinforced``: train
    from shards that store the teachers' embeddings (no teacher runs; the teachers are then only checked against
    their record). ``evaluator`` runs periodically and after each stage.
    """
    out = Path(config.run.dir)
    teachers = [teacher, *(model for model, _ in ensemble)]
    record = teacher_record(teacher, teacher_source)
    ensemble_records = [teacher_record(model, source) for model, source in ensemble]
    extra = {"ensemble": ensemble_records} if ensemble_records else {}
    if reinforced is not None:
        reinforced.check_teachers([record, *ensemble_records])
    stages = _plan(teacher, teachers, job, config, reinforced is None)
    _claim(out, {"teacher": record, **extra, "job": _jsonable(job), "steps": config.schedule.steps}, resume)
    previous, results, parameters, wall = teacher, [], [], 0.0
    for number, stage in enumerate(stages, start=1):
        if stage.masks is not None:
            initial, mask_result = auto_inherit(previous, teacher, stage.target, stage.masks, job, reinforced, resume)
            wall += mask_result.wall_s
        else:
            initial = _initial(previous, stage.student, job, config.run.seed)
        init_path = Path(stage.training.run.dir) / "init.safetensors"
        if not init_path.exists():
            initial.provenance = {"distill": {**_provenance(record, job, number, len(stages), reinforced is not None), **extra}}
            write_checkpoint(initial, init_path)
        stage.training.model.name = str(init_path)
        objective = _objective(stage.training, job, teachers, reinforced)
        result = train(stage.training, resume=resume, evaluator=evaluator, objective=objective)
        results.append(result)
        parameters.append(count_parameters(result.model.config))
        wall += result.wall_s
        previous = result.model
    final = out / "model.safetensors"
    if not final.exists() or not resume:
        stage_record = _provenance(record, job, len(stages), len(stages), reinforced is not None)
        provenance = {"distill": {**stage_record, **extra, "stage_parameters": parameters}}
        write_checkpoint(previous, final, provenance=provenance)
    return DistillResult(previous, out, results, parameters, [stage.target for stage in stages], wall)


def _plan(teacher: CLIP, teachers: list[CLIP], job: DistillJob, config: TrainConfig, online: bool) -> list[_Stage]:
    """Every stage's student, target and runs, with every check that needs no training (``online``: the teachers
    run on the student's batches unless λ = 0), so a job that cannot run is refused before anything is written."""
    if job.init not in ("inherit", "scratch"):
        raise ConfigError(f"init: {job.init!r} is not inherit or scratch")
    if job.student.kind == "auto":
        check_auto(config)
    configs = _stage_configs(teacher.config, job)
    stages = []
    for number, (student, steps) in enumerate(zip(configs, split_steps(config.schedule.steps, len(configs))), start=1):
        stage_dir = Path(config.run.dir) / f"stage_{number}"
        training, masks, target = stage_config(config, stage_dir, steps), None, count_parameters(student)
        if job.student.kind == "auto":
            masks = mask_phase(training, job)
            training = stage_config(config, stage_dir, steps - masks.schedule.steps)
            target = round(job.stages[number - 1] * count_parameters(teacher.config))
        stages.append(_Stage(student, target, training, masks))
    if job.student.kind == "auto" or not job.settings.plain_clip:
        check_loss(config)
    if online and job.settings.distill_weight > 0:
        for model in teachers:
            for stage in stages:
                check_teacher(model, stage.student, teacher.preprocess_cfg)
    return stages


def _objective(stage: TrainConfig, job: DistillJob, teachers: list[CLIP], reinforced: ReinforcedData | None) -> Objective:
    """The stage's objective; λ = 0 with a learned student scale is the plain CLIP recipe (no teacher runs)."""
    if job.settings.plain_clip:
        return Objective(stage.loss)
    if reinforced is not None:
        return reinforced.objective(stage, job.settings)
    if job.settings.distill_weight == 0:  # a fixed student scale, the CLIP loss: the teachers never run
        return Distillation(stage, job.settings)
    return Distillation(stage, job.settings, teachers=[copy.deepcopy(teacher) for teacher in teachers])


def _stage_configs(teacher: ModelConfig, job: DistillJob) -> list[ModelConfig]:
    if job.student.kind == "config":
        assert job.student.config is not None
        return [job.student.config]
    return [plan_student(teacher, ratio) for ratio in job.stages]


def _initial(previous: CLIP, student_config: ModelConfig, job: DistillJob, seed: int) -> CLIP:
    """The stage's starting student: the previous model's selected slices, or random weights (``scratch``)."""
    if job.init == "inherit":
        return inherit(previous, student_config, job.layers, job.order)
    torch.manual_seed(seed)
    return CLIP(student_config, dataclasses.replace(previous.preprocess_cfg)).eval()


def _provenance(record: dict[str, Any], job: DistillJob, stage: int, stages: int, reinforced: bool) -> dict[str, Any]:
    if job.init == "scratch":
        inheritance = "none (random initialisation)"
    elif job.student.kind == "auto":
        inheritance = "automatic (hard-concrete masks, L0 target)"
    else:
        inheritance = f"manual ({job.layers} layers, {job.order} order)"
    settings = job.settings
    return {
        "teacher": record,
        "method": ("affinity mimicking (TinyCLIP)" if settings.distill_weight > 0 else "CLIP loss only")
        + (", reinforced data (MobileCLIP)" if reinforced else ""),
        "inheritance": inheritance,
        "stages": job.stages,
        "stage": f"{stage}/{stages}",
        "distill_weight": settings.distill_weight,
        "teacher_scale": settings.teacher_scale,
        "student_scale": settings.student_scale,
    }


def _jsonable(job: DistillJob) -> dict[str, Any]:
    data = dataclasses.asdict(dataclasses.replace(job, student=dataclasses.replace(job.student, config=None)))
    if job.student.config is not None:
        data["student"]["config"] = job.student.config.to_dict()
    return json.loads(json.dumps(data))


def _claim(out: Path, job: dict[str, Any], resume: bool) -> None:
    """Write the job description, or refuse a run directory that holds another job (``--no-resume`` starts over)."""
    path = out / JOB_FILE
    if path.exists() and not resume:
        for stage in out.glob("stage_*"):
            shutil.rmtree(stage)
        path.unlink()
        (out / "model.safetensors").unlink(missing_ok=True)
    if path.exists():
        previous = json.loads(path.read_text())
        if previous != job:
            changed = sorted(key for key in job if previous.get(key) != job[key])
            raise ConfigError(
                f"{out} holds a distillation with another {', '.join(changed)}; choose another --out, or pass --no-resume"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(job, indent=2) + "\n")

