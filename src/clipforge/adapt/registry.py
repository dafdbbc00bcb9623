"""Method name → ``Method`` (``clipforge.adapt.method``): how to fit it and how to rebuild its head from a file."""

from __future__ import annotations

from clipforge.adapt.clap import CLAP
from clipforge.adapt.coop import COOP
from clipforge.adapt.detector import DETECTOR
from clipforge.adapt.gda import GDA
from clipforge.adapt.linear_probe import LINEAR_PROBE
from clipforge.adapt.lora import LORA
from clipforge.adapt.maple import MAPLE
from clipforge.adapt.method import Method
from clipforge.adapt.svd import SVD
from clipforge.adapt.tip_adapter import TIP_ADAPTER, TIP_ADAPTER_F
from clipforge.adapt.wise_ft import WISE_FT
from clipforge.errors import ConfigError

METHODS: dict[str, Method] = {}
RECIPE_HEADS: dict[str, Method] = {DETECTOR.name: DETECTOR}
"""Heads of the task recipes (``clipforge.adapt.recipes``): trained on ``--data``, reloaded like any adapter."""
RECIPE_FILES = {
    "clipn": ("a clipn adapter", "use it with clipforge eval ood --adapter"),
    "reid": ("a reid checkpoint", "use it as --model, e.g. clipforge eval reid --model FILE"),
}
"""The task recipes whose files hold no classifier head: what such a file is, and where it is used instead."""


def register(method: Method) -> Method:
    """Add a method (issue #15's task heads use this); a second method of the same name is an error."""
    if method.name in METHODS:
        raise ConfigError(f"adaptation method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name in RECIPE_HEADS:
        return RECIPE_HEADS[name]
    if name not in METHODS:
        raise ConfigError(f"method: {name!r} is not one of {', '.join(METHODS)}")
    return METHODS[name]


for _method in (TIP_ADAPTER, GDA, TIP_ADAPTER_F, LINEAR_PROBE, CLAP, COOP, MAPLE, LORA, SVD, WISE_FT):
    register(_method)
