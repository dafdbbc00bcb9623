"""Student architectures: a teacher's config cut to a parameter ratio, and the ``--student``/``--stages`` grammar.

``plan_student(teacher, 0.5)`` narrows both towers by one factor (whole heads of the teacher's head width, MLP
ratio and depth kept) and picks the factor whose model is closest to half the teacher's parameters. TinyCLIP
shrinks the image tower's width too (ViT-40M/32: 12 × 512 from 12 × 768) but its text tower's depth; with a
49,408-token embedding table, most of a small text tower is its width, so here both towers narrow.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from clipforge.config import ModelConfig, get_model_config
from clipforge.distill.inherit import count_parameters
from clipforge.errors import ConfigError

STUDENT_KINDS = ("inherit", "auto")


def check_ratio(ratio: float, name: str = "ratio") -> float:
    if not 0.0 < ratio < 1.0:
        raise ConfigError(f"{name}: {ratio} is outside (0, 1); it is the student's share of the teacher's parameters")
    return float(ratio)


def narrowed(teacher: ModelConfig, factor: float) -> ModelConfig:
    """Both towers at ``factor`` of their width, in whole heads of the teacher's head width (at least one)."""
    vision, text = teacher.vision, teacher.text
    text_head = text.width // text.heads
    vision_heads = max(1, round(vision.heads * factor))
    text_heads = max(1, round(text.heads * factor))
    return dataclasses.replace(
        teacher,
        vision=dataclasses.replace(vision, width=vision_heads * vision.head_width),
        text=dataclasses.replace(text, width=text_heads * text_head, heads=text_heads),
        name=None,
    )


def plan_student(teacher: ModelConfig, ratio: float) -> ModelConfig:
    """The narrowed teacher whose parameter count is closest to ``ratio`` × the teacher's."""
    ratio = check_ratio(ratio)
    total = count_parameters(teacher)
    candidates = {}
    for step in range(1, 101):
        config = narrowed(teacher, step / 100)
        key = (config.vision.width, config.text.width)
        candidates.setdefault(key, config)
    best = min(candidates.values(), key=lambda config: abs(count_parameters(config) / total - ratio))
    share = count_parameters(best) / total
    return dataclasses.replace(best, name=f"{teacher.name or 'teacher'}-inherit-{share:.2f}")


@dataclass(frozen=True)
class StudentSpec:
    """``--student``: a config (``kind="config"``), or ``inherit:R`` / ``auto:R`` (a share R of the teacher)."""

    kind: str
    ratio: float | None = None
    config: ModelConfig | None = None


def parse_student(text: str) -> StudentSpec:
    """``inherit:0.5``, ``auto:0.5``, ``inherit``/``auto`` (with ``--stages``), or a config name or JSON file."""
    kind, _, value = text.partition(":")
    if kind in STUDENT_KINDS:
        if not value:
            return StudentSpec(kind)
        try:
            ratio = float(value)
        except ValueError:
            raise ConfigError(f"--student {text}: {value!r} is not a number (e.g. inherit:0.5)") from None
        return StudentSpec(kind, check_ratio(ratio, f"--student {text}"))
    return StudentSpec("config", config=get_model_config(text))


def parse_stages(text: str | None, student: StudentSpec) -> list[float]:
    """The shares of the teacher each stage compresses to: ``--stages 0.75,0.5,0.25``, or the one ratio."""
    if text is None:
        if student.kind != "config" and student.ratio is None:
            raise ConfigError(f"--student {student.kind}: give a ratio ({student.kind}:0.5) or --stages")
        return [student.ratio] if student.ratio is not None else []
    try:
        stages = [float(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"--stages {text}: expected ratios separated by commas, e.g. 0.75,0.5,0.25") from None
    for ratio in stages:
        check_ratio(ratio, f"--stages {text}")
    if student.kind == "config":
        raise ConfigError("--stages needs --student inherit or auto (each stage is planned from the previous one)")
    if any(later >= earlier for earlier, later in zip(stages, stages[1:])):
        raise ConfigError(f"--stages {text}: each stage must be smaller than the one before")
    if student.ratio is not None and abs(student.ratio - stages[-1]) > 1e-9:
        raise ConfigError(f"--student {student.kind}:{student.ratio} but the last of --stages {text} is {stages[-1]}")
    return stages
