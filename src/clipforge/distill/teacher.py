"""What identifies a teacher: the record a distilled checkpoint and a reinforced shard carry, and its checks."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from clipforge.errors import ConfigError
from clipforge.models.clip import CLIP


def fingerprint(model: CLIP) -> str:
    """SHA-256 (first 16 hex digits) of the model's tensors in key order, as float32: the same weights give the
    same fingerprint whatever file or format they came from."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(value.detach().float().cpu().numpy()).tobytes())
    return digest.hexdigest()[:16]


def teacher_record(model: CLIP, source: str) -> dict[str, Any]:
    """The teacher as checkpoints and reinforced shards record it."""
    return {
        "source": source,
        "fingerprint": fingerprint(model),
        "embed_dim": model.config.embed_dim,
        "context_length": model.config.text.context_length,
        "vocab_size": model.config.text.vocab_size,
        "logit_scale": round(float(model.logit_scale.detach().exp()), 6),
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
    }


def check_teachers_match(records: Sequence[dict[str, Any]], given: Sequence[dict[str, Any]], where: str) -> None:
    """Refuse teachers other than the ones ``records`` (e.g. a reinforced shard's) were made with, naming the field.

    ``given`` are the offered teachers' own ``teacher_record``s, so each fingerprint is computed once per run.
    """
    if len(records) != len(given):
        raise ConfigError(f"{where}: reinforced by {len(records)} teacher(s), but {len(given)} given")
    for number, (record, offered) in enumerate(zip(records, given), start=1):
        for field, name in (
            ("embed_dim", "embedding width"),
            ("context_length", "tokenizer context_length"),
            ("vocab_size", "tokenizer vocab_size"),
        ):
            if record[field] != offered[field]:
                raise ConfigError(
                    f"{where}: teacher {number} ({record['source']}) has {name} {record[field]}, the given teacher {offered[field]}"
                )
        if record["fingerprint"] != offered["fingerprint"]:
            raise ConfigError(
                f"{where}: reinforced by teacher {record['source']} (fingerprint {record['fingerprint']}), "
                f"not by the given teacher {number}"
            )
