"""Weighted multi-term queries: ``"2:golden retriever + ./pool.jpg - night"``.

The query syntax of rclip (yurijmikhalevich/rclip, ``rclip/main.py``): terms joined by ``+`` or ``-`` (as separate
words, so "t-shirt" stays one term), each a text or a local image path (starting with ``./``, ``../``,
``/`` or ``~/``), each with an optional weight prefix such as ``2:``, ``0.5:`` or ``1e-3:`` (a negative weight
subtracts the term; one that is not a finite number, such as ``nan:``, ``inf:`` or ``1e400:``, is refused).
The query vector is Σ wᵢ·eᵢ over positive terms minus the same over negative terms, of L2-normalised
embeddings eᵢ. rclip leaves the sum unnormalised; here it is normalised, which keeps the ranking and makes
every score a cosine similarity, comparable between queries.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipforge.encode import Encoder, embed_images, encode_texts
from clipforge.errors import InputError

_OPERATOR = re.compile(r"\s+([+-])(?=\s|$)")
# A number as ``float`` spells it, the non-finite ones included, so that they are refused rather than read as text
_WEIGHT = re.compile(r"^([+-]?(?:(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?|nan|inf(?:inity)?)):(.*)$", re.DOTALL | re.IGNORECASE)
_IMAGE_PREFIXES = ("./", "../", "/", "~/")
MIN_QUERY_NORM = 1e-6


@dataclass(frozen=True)
class QueryTerm:
    """One term of a query: a weight (negative for ``-`` terms) and a text, an image path or a PIL image."""

    weight: float
    text: str | None = None
    image: Path | Any | None = None


def parse_query(query: str, allow_images: bool = True) -> list[QueryTerm]:
    """The terms of ``query``; with ``allow_images=False`` (a server) path-like terms stay text."""
    if not query.strip():
        raise InputError("empty query")
    pieces = _OPERATOR.split(" " + query)
    signed = list(zip(["+", *pieces[1::2]], pieces[0::2]))
    if len(signed) > 1 and not signed[0][1].strip():
        signed = signed[1:]  # the query starts with an operator
    terms = []
    for sign, raw in signed:
        raw = raw.strip()
        weight, body = 1.0, raw
        match = _WEIGHT.match(raw)
        if match:
            weight, body = float(match.group(1)), match.group(2).strip()
            if not math.isfinite(weight):
                raise InputError(f"query term {raw!r}: its weight {match.group(1)} is not a finite number")
        if not body:
            raise InputError(f"query {query!r}: empty term {raw!r}")
        weight = -weight if sign == "-" else weight
        if allow_images and body.startswith(_IMAGE_PREFIXES):
            terms.append(QueryTerm(weight, image=Path(body).expanduser()))
        else:
            terms.append(QueryTerm(weight, text=body))
    return terms


def query_vector(model: Encoder, terms: list[QueryTerm]) -> np.ndarray:
    """The normalised weighted sum of the terms' embeddings, float32 [embed_dim]."""
    if not terms:
        raise InputError("empty query")
    if bad := next((t.weight for t in terms if not math.isfinite(t.weight)), None):
        raise InputError(f"query weight {bad}: not a finite number")
    largest = max(abs(t.weight) for t in terms)
    if largest == 0:
        raise InputError("the query's terms cancel out (every weight is zero)")
    texts = [term for term in terms if term.text is not None]
    images = [term for term in terms if term.text is None]
    total = torch.zeros(model.config.embed_dim, dtype=torch.float64)
    # Only the direction of the sum matters (it is normalised), so weights are scaled to at most 1: a huge
    # weight cannot overflow float32, and the others keep their proportions.
    if texts:
        total += torch.tensor([t.weight / largest for t in texts], dtype=torch.float64) @ encode_texts(model, [t.text for t in texts]).double()
    if images:
        embedded = embed_images(model, [t.image for t in images], workers=0, strict=True, progress=False)
        total += torch.tensor([t.weight / largest for t in images], dtype=torch.float64) @ torch.from_numpy(embedded.embeddings).double()
    norm = float(total.norm())
    if norm < MIN_QUERY_NORM:
        raise InputError("the query's terms cancel out (their weighted sum is zero)")
    return (total / norm).float().numpy()
