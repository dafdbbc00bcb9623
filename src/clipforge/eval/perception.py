"""Prompt ensembles of arbitrary size and PerceptionCLIP's two-step zero-shot classification.

``ensemble_text_embeddings`` is CLIP's prompt ensembling (Radford et al. 2021, §3.1.4) for groups of
any size: normalise each prompt embedding, average per group, renormalise. With per-class LLM
descriptions as the groups it is CuPL (Pratt et al., ICCV 2023).

PerceptionCLIP: An, Zhu, Xu, Ding, Huang, Feizi, Shen, "More Context, Less Distraction: Zero-shot
Visual Classification by Inferring and Conditioning on Contextual Attributes", ICLR 2024
(umd-huang-lab/perceptionCLIP, ``perceptionclip_two_step.py``, ``compose_template``). Contextual
factors (background, orientation, quality, ...) map values to descriptions; their Cartesian product
gives composite contexts z, each described by one description per factor joined with ", ". With
E[y, z] the ensemble of the prompts ``"<main(y)>, <description>."`` (``"<main(y)>."`` when empty) and
F = s · f Eᵀ (f normalised, s the logit scale):

1. infer the context: p(z|x) = softmax_z(logsumexp_y F / τ) ("w/ y", the default), or
   p(z|x) = softmax_z(s · f E_obj[z]ᵀ / τ) with prompts ``"a photo of a object, <description>."`` ("w/o y");
2. classify conditioned on it and marginalise: p(y|x) = Σ_z softmax_y(F)[y, z] · p(z|x).

The reference code exponentiates raw logits; logsumexp/softmax here give the same values stably.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from clipforge.encode import Encoder, encode_texts
from clipforge.errors import InputError, one_line

ContextFactors = Mapping[str, Mapping[str, Sequence[str]]]
"""factor name → factor value → descriptions (an empty description means "say nothing")."""


def ensemble_text_embeddings(
    model: Encoder, prompt_groups: Sequence[Sequence[str]], batch_size: int = 256, *, normalize: bool = True
) -> torch.Tensor:
    """One embedding per group (G, D): normalise → mean over the group's prompts → renormalise; with
    ``normalize=False`` the plain mean of the text tower's raw embeddings (CLAP's text base)."""
    sizes = [len(group) for group in prompt_groups]
    if not sizes or min(sizes) == 0:
        raise InputError("prompt ensemble: every class needs at least one prompt")
    prompts = [prompt for group in prompt_groups for prompt in group]
    embeddings = encode_texts(model, prompts, batch_size=batch_size, normalize=normalize)
    counts = torch.tensor(sizes, device=embeddings.device)
    owner = torch.repeat_interleave(torch.arange(len(sizes), device=embeddings.device), counts)
    means = torch.zeros(len(sizes), embeddings.shape[1], device=embeddings.device).index_add_(0, owner, embeddings) / counts[:, None]
    return F.normalize(means, dim=-1) if normalize else means


def read_context_factors(path: str | Path) -> ContextFactors:
    """Contextual factors from a JSON file ``{factor: {value: [descriptions]}}`` (checked when used)."""
    try:
        factors = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"context factors file {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"context factors file {path}: not readable JSON ({one_line(error)})") from None
    if not isinstance(factors, dict) or not all(isinstance(values, dict) for values in factors.values()):
        raise InputError(f"context factors file {path}: expected {{factor: {{value: [descriptions]}}}}")
    return factors


@dataclass(frozen=True)
class Context:
    """A composite context z: one value per factor, and the descriptions that say it."""

    values: dict[str, str]
    descriptions: list[str]


def composite_contexts(factors: ContextFactors) -> list[Context]:
    """The Cartesian product of the factors' values, each with its joined descriptions (PerceptionCLIP's
    ``compose_template``): one description per factor, empty ones left out, joined with ", "."""
    if not factors:
        raise InputError("PerceptionCLIP: no contextual factors given")
    for factor, values in factors.items():
        if not values:
            raise InputError(f"PerceptionCLIP factor {factor!r}: has no values")
        for value, descriptions in values.items():
            if not descriptions or not all(isinstance(d, str) for d in descriptions):
                raise InputError(f"PerceptionCLIP factor {factor!r} value {value!r}: needs a list of descriptions")
    contexts = []
    for choice in itertools.product(*(values.items() for values in factors.values())):
        joined: list[str] = []
        for parts in itertools.product(*(descriptions for _, descriptions in choice)):
            text = ", ".join(part.strip() for part in parts if part.strip())
            if text not in joined:
                joined.append(text)
        contexts.append(Context(dict(zip(factors, (value for value, _ in choice), strict=True)), joined))
    return contexts


def context_prompt(main_template: str, classname: str, description: str) -> str:
    """``"<main>, <description>."``, or ``"<main>."`` without a description."""
    main = main_template.format(c=classname)
    return f"{main}, {description}." if description else f"{main}."


@dataclass(frozen=True)
class PerceptionClassifier:
    """Text side of PerceptionCLIP: E[y, z] (C, Z, D) and, for inference without y, E_obj[z] (Z, D)."""

    class_context: torch.Tensor
    object_context: torch.Tensor | None
    contexts: list[Context]


def build_perception_classifier(
    model: Encoder,
    classnames: Sequence[str],
    factors: ContextFactors,
    *,
    main_template: str = "a photo of a {c}",
    infer: Literal["with_class", "without_class"] = "with_class",
    object_word: str = "object",
) -> PerceptionClassifier:
    """Embed every (class, context) prompt ensemble; ``main_template`` has a ``{c}`` and no final period."""
    if "{c}" not in main_template:
        raise InputError(f"PerceptionCLIP main template {main_template!r}: has no {{c}} placeholder")
    if infer not in ("with_class", "without_class"):
        raise InputError(f"PerceptionCLIP infer: {infer!r} is not 'with_class' or 'without_class'")
    contexts = composite_contexts(factors)
    groups = [[context_prompt(main_template, name, d) for d in c.descriptions] for name in classnames for c in contexts]
    class_context = ensemble_text_embeddings(model, groups).view(len(classnames), len(contexts), -1)
    object_context = None
    if infer == "without_class":
        object_groups = [[context_prompt(main_template, object_word, d) for d in c.descriptions] for c in contexts]
        object_context = ensemble_text_embeddings(model, object_groups)
    return PerceptionClassifier(class_context, object_context, contexts)


class PerceptionOutput(NamedTuple):
    class_probs: torch.Tensor  # (B, C): p(y|x) marginalised over the contexts
    context_probs: torch.Tensor  # (B, Z): the inferred p(z|x)


def perception_clip(
    image_features: torch.Tensor, classifier: PerceptionClassifier, scale: float = 100.0, temperature: float = 1.0
) -> PerceptionOutput:
    """Two-step PerceptionCLIP on image features (B, D): infer p(z|x), then p(y|x) = Σ_z p(y|x, z) p(z|x)."""
    if temperature <= 0:
        raise InputError(f"PerceptionCLIP temperature: expected a positive number, got {temperature}")
    features = F.normalize(image_features.float(), dim=-1)
    classes, contexts, dim = classifier.class_context.shape
    logits = (scale * features @ classifier.class_context.reshape(classes * contexts, dim).T).view(-1, classes, contexts)
    if classifier.object_context is None:
        context_probs = torch.softmax(torch.logsumexp(logits / temperature, dim=1), dim=-1)
    else:
        context_probs = torch.softmax(scale * features @ classifier.object_context.T / temperature, dim=-1)
    class_probs = (torch.softmax(logits, dim=1) * context_probs[:, None, :]).sum(dim=-1)
    return PerceptionOutput(class_probs, context_probs)
