"""Zero-shot classification heads from class names and prompt templates (Radford et al. 2021, §3.1.4).

Each class is the mean of its normalised prompt embeddings, renormalised — exactly open_clip's
``build_zero_shot_classifier``. Templates are ``str.format`` strings with a ``{c}`` placeholder or callables.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from clipforge.encode import Encoder, encode_texts
from clipforge.errors import InputError
from clipforge.eval.perception import ensemble_text_embeddings

Template = str | Callable[[str], str]


def fill_template(template: Template, classname: str) -> str:
    return template(classname) if callable(template) else template.format(c=classname)


def build_zero_shot_classifier(
    model: Encoder,
    classnames: Sequence[str],
    templates: Sequence[Template],
    *,
    num_classes_per_batch: int = 10,
) -> torch.Tensor:
    """Class weights [embed_dim, num_classes] (float32, on the CPU)."""
    if not classnames:
        raise InputError("zero-shot classifier: no class names")
    if not templates:
        raise InputError("zero-shot classifier: no prompt templates")
    columns = []
    for start in range(0, len(classnames), num_classes_per_batch):
        batch = classnames[start : start + num_classes_per_batch]
        prompts = [fill_template(t, c) for c in batch for t in templates]
        embeddings = encode_texts(model, prompts, batch_size=len(prompts))
        embeddings = embeddings.reshape(len(batch), len(templates), -1).mean(dim=1)
        columns.append(F.normalize(embeddings, dim=-1))
    return torch.cat(columns).T


def zero_shot_head(
    model: Encoder, classnames: Sequence[str], templates: Sequence[Template] | Mapping[str, Sequence[str]]
) -> torch.Tensor:
    """Class weights [embed_dim, num_classes] (float32, CPU): the template ensemble, or the renormalised mean of
    per-class descriptions (CuPL) when ``templates`` maps class names to descriptions."""
    if isinstance(templates, Mapping):
        return ensemble_text_embeddings(model, [templates[c] for c in classnames]).T.float().cpu()
    return build_zero_shot_classifier(model, classnames, templates).float().cpu()


def zero_shot_logits(image_features: torch.Tensor, classifier: torch.Tensor, scale: float = 100.0) -> torch.Tensor:
    """``scale · normalise(image) @ W`` (CLIP_benchmark and open_clip evaluate with a fixed scale of 100)."""
    return scale * F.normalize(image_features.float(), dim=-1) @ classifier
