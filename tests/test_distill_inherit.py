"""Weight inheritance: TinyCLIP's official rule (written out here) for leading slices, planted importance checked by
index, the query rescaling of narrower heads, the planner's ratios and the masks' size formula against real models."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

from clipforge.config import ModelConfig
from clipforge.distill.inherit import (
    count_parameters,
    inherit,
    selections,
    tower_shapes,
)
from clipforge.distill.masks import model_size
from clipforge.distill.plan import parse_stages, parse_student, plan_student
from clipforge.errors import ConfigError
from clipforge.models.clip import CLIP

TEACHER = ModelConfig.from_dict({
    "embed_dim": 24, "activation": "gelu",
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 4, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}, name="teacher")


def student_config(vision_width=32, vision_layers=2, text_width=32, text_heads=2, text_layers=1, embed_dim=16, mlp_ratio=4.0):
    return dataclasses.replace(
        TEACHER,
        embed_dim=embed_dim,
        vision=dataclasses.replace(TEACHER.vision, width=vision_width, layers=vision_layers, mlp_ratio=mlp_ratio),
        text=dataclasses.replace(TEACHER.text, width=text_width, heads=text_heads, layers=text_layers, context_length=12, mlp_ratio=mlp_ratio),
        name="student",
    )


@pytest.fixture(scope="module")
def teacher() -> CLIP:
    torch.manual_seed(0)
    model = CLIP(TEACHER)
    with torch.no_grad():  # non-trivial norms and biases, so a wrong slice of them shows
        for name, parameter in model.named_parameters():
            if parameter.ndim == 1:
                parameter.add_(torch.randn_like(parameter))
    return model.eval()


def tinyclip_weight_inherit(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], head_dim: dict[str, int]) -> dict[str, torch.Tensor]:
    """microsoft/Cream TinyCLIP/src/open_clip/weight_inherit.py::weight_inherit, restated: blocks by "interval_front",
    ``in_proj`` through its (3, H, head_dim, in) view, every other tensor by its leading slice."""
    out = {}
    depth = {prefix: 1 + max(int(m.group(1)) for k in keys if (m := re.match(rf"{re.escape(prefix)}transformer\.resblocks\.(\d+)\.", k)))
             for prefix, keys in (("visual.", student), ("", student))}
    teacher_depth = {prefix: 1 + max(int(m.group(1)) for k in teacher if (m := re.match(rf"{re.escape(prefix)}transformer\.resblocks\.(\d+)\.", k)))
                     for prefix in depth}
    for key, value in student.items():
        source = key
        match = re.match(r"(visual\.|)transformer\.resblocks\.(\d+)\.(.*)$", key)
        if match:
            prefix, index, rest = match.groups()
            step = teacher_depth[prefix] // depth[prefix]
            source = f"{prefix}transformer.resblocks.{list(range(0, depth[prefix] * step, step))[int(index)]}.{rest}"
        big = teacher[source]
        if match and rest.startswith("attn.in_proj_"):
            dim = head_dim[match.group(1)]
            heads_t, heads_s = big.shape[0] // (3 * dim), value.shape[0] // (3 * dim)
            if rest.endswith("weight"):
                out[key] = big.view(3, heads_t, dim, big.shape[1])[:, :heads_s, :, : value.shape[1]].reshape(value.shape)
            else:
                out[key] = big.view(3, heads_t, dim)[:, :heads_s].reshape(-1)
        else:
            out[key] = big[tuple(slice(0, size) for size in value.shape)] if big.numel() > 1 else big
    return out


def test_leading_order_is_tinyclips_official_rule(teacher) -> None:
    config = student_config()
    student = inherit(teacher, config, layers="uniform", order="leading")
    expected = tinyclip_weight_inherit(CLIP(config).state_dict(), teacher.state_dict(), {"visual.": 16, "": 16})
    got = student.state_dict()
    assert got.keys() == expected.keys()
    for key in got:
        assert torch.equal(got[key], expected[key]), key


def test_inherited_shapes_are_the_configs(teacher) -> None:
    for config in (student_config(), student_config(vision_width=48, text_width=48, text_heads=3, mlp_ratio=2.0)):
        student = inherit(teacher, config)
        reference = CLIP(config).state_dict()
        assert {k: v.shape for k, v in student.state_dict().items()} == {k: v.shape for k, v in reference.items()}
        assert student.config == config


def test_importance_picks_the_planted_structures_and_slices_them_by_index(teacher) -> None:
    model = CLIP(TEACHER)
    model.load_state_dict(teacher.state_dict())
    block = model.visual.transformer.resblocks[2]  # student block 1 under "uniform" (4 → 2: blocks 0 and 2)
    with torch.no_grad():
        for head in (1, 3):  # heads 1 and 3: ten times the value and output weights
            block.attn.in_proj_weight[128 + 16 * head : 128 + 16 * (head + 1)] *= 10
            block.attn.out_proj.weight[:, 16 * head : 16 * (head + 1)] *= 10
        block.mlp.c_fc.weight[[5, 77, 200]] *= 10
        block.mlp.c_proj.weight[:, [5, 77, 200]] *= 10
        for other in model.visual.transformer.resblocks:
            other.attn.out_proj.weight[[7, 50]] *= 10  # residual channels 7 and 50 written loudly everywhere
            other.mlp.c_proj.weight[[7, 50]] *= 10
    config = student_config()
    chosen = selections(model, config)["vision"]
    assert chosen.layers == [0, 2]
    assert chosen.heads[1].tolist() == [1, 3]
    assert {5, 77, 200} <= set(chosen.neurons[1].tolist())
    assert {7, 50} <= set(chosen.hidden.tolist())
    student = inherit(model, config).state_dict()
    teacher_state = model.state_dict()
    hidden, neurons = chosen.hidden, chosen.neurons[1]
    rows = torch.tensor([h * 16 + d for h in (1, 3) for d in range(16)])
    prefix_s, prefix_t = "visual.transformer.resblocks.1.", "visual.transformer.resblocks.2."
    assert torch.equal(student[prefix_s + "mlp.c_fc.weight"], teacher_state[prefix_t + "mlp.c_fc.weight"][neurons][:, hidden])
    assert torch.equal(student[prefix_s + "mlp.c_proj.weight"], teacher_state[prefix_t + "mlp.c_proj.weight"][hidden][:, neurons])
    assert torch.equal(student[prefix_s + "attn.out_proj.weight"], teacher_state[prefix_t + "attn.out_proj.weight"][hidden][:, rows])
    for part in range(3):  # q, k and v rows of the kept heads, columns of the kept channels
        expected = teacher_state[prefix_t + "attn.in_proj_weight"][part * 64 + rows][:, hidden]
        assert torch.equal(student[prefix_s + "attn.in_proj_weight"][part * 32 : (part + 1) * 32], expected)
    assert torch.equal(student["visual.ln_post.bias"], teacher_state["visual.ln_post.bias"][hidden])
    assert torch.equal(student["visual.positional_embedding"], teacher_state["visual.positional_embedding"][:, hidden])


def test_narrower_heads_keep_their_attention_logits(teacher) -> None:
    config = student_config(text_width=32, text_heads=4)  # text heads of 8 dims, from heads of 16
    chosen = selections(teacher, config)["text"]
    student = inherit(teacher, config).state_dict()["transformer.resblocks.0.attn.in_proj_weight"]
    big = teacher.state_dict()[f"transformer.resblocks.{chosen.layers[0]}.attn.in_proj_weight"]
    rows = torch.cat([head * 16 + dims for head, dims in zip(chosen.heads[0].tolist(), chosen.head_dims[0])])
    hidden = chosen.hidden
    torch.testing.assert_close(student[:32], big[rows][:, hidden] * math.sqrt(8 / 16), rtol=0, atol=1e-7)
    assert torch.equal(student[32:64], big[64 + rows][:, hidden]) and torch.equal(student[64:], big[128 + rows][:, hidden])


def test_a_student_never_exceeds_its_teacher(teacher) -> None:
    with pytest.raises(ConfigError, match=r"^student vision_cfg.width: 80 exceeds the teacher's 64"):
        inherit(teacher, student_config(vision_width=80))
    other = dataclasses.replace(student_config(), vision=dataclasses.replace(student_config().vision, image_size=64))
    with pytest.raises(ConfigError, match=r"^student vision_cfg.image_size: 64 differs from the teacher's 32"):
        inherit(teacher, other)


def test_planned_students_approach_their_ratio() -> None:
    total = count_parameters(TEACHER)
    for ratio in (0.75, 0.5, 0.25):
        planned = plan_student(TEACHER, ratio)
        real = sum(p.numel() for p in CLIP(planned).parameters())
        assert count_parameters(planned) == real
        assert abs(real / total - ratio) < 0.08, (ratio, real / total)
    widths = [plan_student(TEACHER, r).vision.width for r in (0.75, 0.5, 0.25)]
    assert widths == sorted(widths, reverse=True)


def test_the_masks_size_formula_counts_real_models() -> None:
    for config in (TEACHER, student_config(), student_config(vision_width=48, text_width=40, text_heads=5, mlp_ratio=2.5)):
        shapes = tower_shapes(config)
        widths = {t: torch.tensor(float(s.width)) for t, s in shapes.items()}
        neurons = {t: torch.full((s.layers,), float(s.mlp)) for t, s in shapes.items()}
        assert int(model_size(config, widths, neurons)) == sum(p.numel() for p in CLIP(config).parameters())


@pytest.mark.parametrize("text, message", [
    ("inherit:1.5", r"--student inherit:1.5: 1.5 is outside \(0, 1\)"),
    ("inherit:0", r"--student inherit:0: 0.0 is outside \(0, 1\)"),
    ("auto:half", r"--student auto:half: 'half' is not a number"),
])
def test_bad_ratios_are_one_line_errors(text, message) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_student(text)


def test_stages_must_shrink_and_end_at_the_ratio() -> None:
    assert parse_stages("0.75,0.5,0.25", parse_student("inherit")) == [0.75, 0.5, 0.25]
    with pytest.raises(ConfigError, match="each stage must be smaller"):
        parse_stages("0.5,0.75", parse_student("inherit"))
    with pytest.raises(ConfigError, match=r"outside \(0, 1\)"):
        parse_stages("1.0,0.5", parse_student("auto"))
    with pytest.raises(ConfigError, match="the last of --stages 0.75,0.5 is 0.5"):
        parse_stages("0.75,0.5", parse_student("inherit:0.25"))
