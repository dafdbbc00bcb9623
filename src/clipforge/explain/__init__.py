"""Explanations of a CLIP image tower: attention rollout (``rollout``), Score-CAM for an image–text
pair (``scorecam``) and PNG overlays (``overlay``). ``explain_image`` runs one of them on a PIL image."""

from __future__ import annotations

import torch
from PIL import Image

from clipforge.encode import Encoder, encode_texts, model_input_image
from clipforge.errors import InputError
from clipforge.explain.rollout import attention_rollout
from clipforge.explain.scorecam import DEFAULT_WEIGHTING, score_cam

METHODS = ("scorecam", "rollout")


def explain_image(
    model: Encoder, image: Image.Image, text: str | None = None, method: str = "scorecam", weighting: str = DEFAULT_WEIGHTING
) -> tuple[Image.Image, torch.Tensor]:
    """The image as the model sees it and a [0, 1] map over it (Score-CAM needs ``text`` and takes a channel
    ``weighting``, see ``clipforge.explain.scorecam``; rollout ignores both)."""
    if method not in METHODS:
        raise InputError(f"explanation method: {method!r} is not one of {', '.join(METHODS)}")
    pixels = model.preprocess(image)[None]
    if method == "rollout":
        return model_input_image(model, image), attention_rollout(model, pixels)[0]
    if not text or not text.strip():
        raise InputError("Score-CAM explains an image-text pair: give a non-empty text")
    return model_input_image(model, image), score_cam(model, pixels, encode_texts(model, [text]), weighting=weighting)[0]
