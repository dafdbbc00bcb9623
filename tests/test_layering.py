"""The package's layering, read from the source with ``ast`` (nothing is imported or run).

``ALLOWED`` is the table of ``docs/architecture.md``: which packages each package may import. Every import
counts, at module level or inside a function (a function-level import is no way around the table), and so
does every ``TYPE_CHECKING`` import. A new package must get a row here before it can land.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "clipforge"

BASE = {"errors"}
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "_util": BASE,
    "config": BASE,
    "layers": BASE,
    "preprocess": BASE | {"_util"},
    "models": BASE | {"config", "layers", "preprocess"},
    "io": BASE | {"_util", "config", "layers", "models", "preprocess"},
    "data.synthetic": BASE | {"_util"},
    "data.formats": BASE | {"_util"},
    "data": BASE | {"_util", "config", "preprocess", "data.formats", "data.synthetic"},
    "encode": BASE | {"_util", "data", "data.formats"},
    "data.curate": BASE | {"_util", "config", "preprocess", "data", "data.formats", "data.synthetic", "encode"},
    "train": BASE | {"_util", "config", "layers", "models", "preprocess", "io", "data", "data.formats", "data.synthetic"},
    "distill": BASE | {"_util", "config", "layers", "models", "preprocess", "io", "data", "data.formats", "data.synthetic",
                       "encode", "train"},
    "eval": BASE | {"_util", "config", "layers", "models", "preprocess", "data", "data.formats", "data.synthetic", "encode"},
    "compress": BASE | {"_util", "config", "layers", "models", "preprocess", "io", "data", "data.formats", "data.synthetic",
                        "encode", "eval"},
    "merge": BASE | {"_util", "config", "layers", "models", "preprocess", "io", "data", "data.formats", "data.synthetic",
                     "encode", "eval"},
    "api": BASE | {"config", "io", "models", "compress"},
    "explain": BASE | {"_util", "layers", "models", "encode"},
    "adapt": BASE | {"_util", "config", "layers", "models", "preprocess", "io", "data", "data.formats", "data.synthetic",
                     "encode", "eval", "compress", "api"},
    "retrieval": BASE | {"_util", "config", "models", "data", "data.formats", "data.curate", "encode", "api"},
    "serve": BASE | {"_util", "data.formats", "encode", "retrieval", "api"},
    "demo": BASE | {"_util", "config", "data.synthetic", "encode", "eval", "io", "train", "api"},
    "cli": None,  # the top floor: anything
    "__main__": {"cli"},
    "": {"api", "config", "errors", "models"},  # the package's lazy face (clipforge/__init__.py)
}
LOW = ("io", "models", "layers", "data", "data.formats", "data.synthetic", "train")
HIGH = {"compress", "eval", "merge", "retrieval", "serve", "cli", "api", "explain", "demo", "adapt", ""}
SUBPACKAGES = ("data.synthetic", "data.formats", "data.curate")


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts).removesuffix(".__init__")


def unit(module: str) -> str | None:
    """The table row of a ``clipforge.…`` module: its top package, or data's sub-packages on their own."""
    if module != "clipforge" and not module.startswith("clipforge."):
        return None
    inner = module.removeprefix("clipforge").removeprefix(".")
    for sub in SUBPACKAGES:
        if inner == sub or inner.startswith(sub + "."):
            return sub
    return inner.split(".")[0]


def imported_modules(path: Path) -> set[str]:
    """Every ``clipforge`` module an import statement in the file names (``from a import b`` names ``a`` and ``a.b``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if unit(name) is not None}


SOURCES = sorted(SRC.rglob("*.py"))
MODULES = {module_name(path): imported_modules(path) for path in SOURCES}


def test_the_table_knows_every_package() -> None:
    rows = {unit(module) for module in MODULES}
    assert rows <= set(ALLOWED), f"packages without a row in ALLOWED: {sorted(rows - set(ALLOWED))}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_follow_the_table(module: str) -> None:
    here = unit(module)
    allowed = ALLOWED[here]
    if allowed is None:
        return
    wrong = sorted(name for name in MODULES[module] if name in MODULES and unit(name) not in allowed | {here})
    assert not wrong, f"{module} ({here or 'clipforge'}) may import {sorted(allowed)}, not {wrong}"


def test_low_floors_never_reach_high_ones() -> None:
    """The rule of docs/architecture.md in its own words, independent of the table's details."""
    for module, names in MODULES.items():
        if unit(module) in LOW:
            reached = sorted(name for name in names if unit(name) in HIGH and name in MODULES)
            assert not reached, f"{module} imports {reached}"


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for module, names in MODULES.items():
        graph[module] |= {name for name in names if name in MODULES and name != module}
    return graph


def test_no_import_circles() -> None:
    """Tarjan's strongly connected components of the module graph: every one is a single module."""
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(MODULES):
        if node not in index:
            visit(node)
    assert not circles, f"import circles: {circles}"


def test_the_checks_can_fail(tmp_path: Path) -> None:
    """The reader sees function-level and TYPE_CHECKING imports, so neither hides a wrong import."""
    source = tmp_path / "sneaky.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from clipforge.eval.runner import Evaluator\n"
        "def f():\n    import clipforge.api\n    from clipforge.compress import records\n"
    )
    assert imported_modules(source) >= {"clipforge.eval.runner", "clipforge.api", "clipforge.compress.records"}
    assert unit("clipforge.data.synthetic.world") == "data.synthetic" and unit("clipforge.data.loader") == "data"


ENCODER_CALLS = {"encode_image", "encode_text"}
ENCODER_EXCEPTIONS = {
    # module: functions that call the towers directly, and why encode.py does not serve them
    "clipforge.compress.study": {"_images_per_second"},  # times the tower itself: no transfer, no normalisation
    "clipforge.compress.quant.int8": {"quantize_static_int8"},  # calibration passes feed observers, no embeddings
    "clipforge.compress.quant.simulated": {"_calibrate"},  # calibration passes, as above
    "clipforge.compress.quant.mixed_precision": {"block_relevance"},  # needs gradients (encode.py runs without)
    "clipforge.compress.exported": {"forward"},  # the graphs traced for ONNX and OpenVINO
}


def _encoder_calls(path: Path) -> set[str]:
    """Names of the functions in which the file calls ``….encode_image(…)``/``….encode_text(…)``."""
    found = set()

    class Visitor(ast.NodeVisitor):
        def __init__(self) -> None:
            self.function = "<module>"

        def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
            outer, self.function = self.function, node.name
            self.generic_visit(node)
            self.function = outer

        def visit_Call(self, node: ast.Call) -> None:
            if isinstance(node.func, ast.Attribute) and node.func.attr in ENCODER_CALLS:
                found.add(self.function)
            self.generic_visit(node)

    Visitor().visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def test_one_encoder() -> None:
    """Outside ``models/`` (the towers) and ``encode.py``, only the documented exceptions call the towers."""
    calls = {}
    for path in SOURCES:
        module = module_name(path)
        if module.startswith("clipforge.models") or module == "clipforge.encode":
            continue
        if found := _encoder_calls(path):
            calls[module] = found
    assert calls == ENCODER_EXCEPTIONS, f"calls the towers directly: {calls}"
