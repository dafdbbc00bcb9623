"""The curation report of one step's output folder: ``report.md`` and ``report.html`` with the input samples
each criterion passes and drops, the unreadable samples by reason, concept histograms before and after
(``histogram.png``; by default the most frequent caption words but for ``STOP_WORDS``) and example kept and
dropped pairs as an image grid (``grid.png``)."""

from __future__ import annotations

import html
import json
import textwrap
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from clipforge._util.fileio import atomic_path
from clipforge.data.curate.balance import Matcher, normalize
from clipforge.data.curate.pool import JOB_RECORD
from clipforge.data.curate.steps import DECISIONS, SUMMARY
from clipforge.data.formats.images import read_rgb_image
from clipforge.data.formats.shards import shard_index
from clipforge.errors import InputError

EXAMPLES = 6
TOP_CONCEPTS = 20
STOP_WORDS = frozenset(
    "a an the and or of in on at to by for from with as is are be been it its this that there these those".split()
)
"""Words the default histogram leaves out: articles, conjunctions, prepositions, forms of "to be", pronouns."""


def _concept_counts(captions: Sequence[str | None], concepts: Sequence[str]) -> np.ndarray:
    matcher = Matcher(concepts)
    counts = np.zeros(len(concepts), dtype=np.int64)
    for text in captions:
        counts[matcher.match(text)] += 1
    return counts


def _default_concepts(captions: Sequence[str | None]) -> list[str]:
    """The ``TOP_CONCEPTS`` words in most captions (split as the matcher splits them), stop words left out."""
    words = Counter(word for text in captions if text for word in set(normalize(text).split())
                    if word.isalpha() and word.lower() not in STOP_WORDS)
    return [word for word, _ in words.most_common(TOP_CONCEPTS)] or ["photo"]


def _histogram(path: Path, concepts: list[str], before: np.ndarray, after: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(10, 3.5))
    positions = np.arange(len(concepts))
    axis.bar(positions - 0.2, before, 0.4, label="input")
    axis.bar(positions + 0.2, after, 0.4, label="kept")
    axis.set_xticks(positions, concepts, rotation=60, ha="right", fontsize=8)
    axis.set_ylabel("captions")
    axis.legend()
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=90)
    plt.close(figure)


def _grid(path: Path, shards: list[str], rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, EXAMPLES, figsize=(2.2 * EXAMPLES, 5.2), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for line, kept in enumerate((True, False)):
        chosen = [row for row in rows if row["kept"] == kept][:EXAMPLES]
        for column, row in enumerate(chosen):
            index = shard_index(Path(shards[row["shard"]]))
            member = index.image(index.keys.index(row["key"]))
            axes[line][column].imshow(read_rgb_image(member))
            axes[line][column].set_title(textwrap.fill(("kept: " if kept else "dropped: ") + (row["caption"] or ""), 28), fontsize=7)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=90)
    plt.close(figure)


def write_report(step_dir: str | Path, out: str | Path, concepts: Sequence[str] | None = None) -> dict[str, Any]:
    """Write the report of ``step_dir`` (a curate filter/balance/dedup output) into ``out``; returns its figures."""
    step_dir, out = Path(step_dir), Path(out)
    try:
        summary = json.loads((step_dir / SUMMARY).read_text())
        shards = json.loads((step_dir / JOB_RECORD).read_text())["shards"]
        table = pq.read_table(step_dir / DECISIONS)
    except (OSError, ValueError, KeyError) as error:
        raise InputError(f"{step_dir}: not the output of a curate step ({error})") from None
    if "dropped" not in summary:
        raise InputError(f"{step_dir / SUMMARY}: written by an older clipforge; rerun the step (it reuses its scan)")
    rows = [row for row in table.select(["shard", "key", "caption", "input", "kept"]).to_pylist() if row["input"]]
    before_captions = [row["caption"] for row in rows]
    after_captions = [row["caption"] for row in rows if row["kept"]]
    concepts = list(concepts) if concepts else _default_concepts(before_captions)
    before, after = _concept_counts(before_captions, concepts), _concept_counts(after_captions, concepts)
    _histogram(out / "histogram.png", concepts, before, after)
    _grid(out / "grid.png", shards, rows)
    lines = [f"# Curation report: {summary['step']}", "",
             f"{summary['pool']} samples in the pool, {summary['unreadable']} unreadable, {summary['input']} in the input, "
             f"**{summary['kept']} kept** ({summary['kept'] / max(summary['input'], 1):.1%}).", "",
             "Each criterion on its own (a sample can fail several):", "",
             "| criterion | passed | dropped |", "|---|---|---|"]
    lines += [f"| {name} | {count} | {summary['dropped'][name]} |" for name, count in summary["passed"].items()]
    if summary["unreadable_reasons"]:
        lines += ["", "| unreadable: reason | samples |", "|---|---|"]
        lines += [f"| {reason} | {count} |" for reason, count in summary["unreadable_reasons"].items()]
    lines += ["", "| concept | input | kept |", "|---|---|---|"]
    lines += [f"| {concept} | {b} | {a} |" for concept, b, a in zip(concepts, before, after)]
    lines += ["", "![concepts before and after](histogram.png)", "", "![kept (top) and dropped (bottom) examples](grid.png)", ""]
    markdown = "\n".join(lines)
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(markdown)
    with atomic_path(out / "report.html") as tmp:
        tmp.write_text(_html(markdown))
    return {"kept": summary["kept"], "input": summary["input"], "unreadable": summary["unreadable"],
            "concepts": dict(zip(concepts, zip(before.tolist(), after.tolist())))}


def _html(markdown: str) -> str:
    """The markdown report as a plain HTML page (tables, images, paragraphs)."""
    body: list[str] = []
    table: list[list[str]] = []
    for line in [*markdown.splitlines(), ""]:
        if line.startswith("|"):
            if not set(line) <= set("|-"):
                table.append([html.escape(cell.strip()) for cell in line.strip("|").split("|")])
            continue
        if table:
            head, *rest = table
            body.append("<table><tr>" + "".join(f"<th>{c}</th>" for c in head) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rest) + "</table>")
            table = []
        if line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("!["):
            alt, _, src = line[2:].partition("](")
            body.append(f'<img alt="{html.escape(alt)}" src="{html.escape(src.rstrip(")"))}">')
        elif line:
            body.append(f"<p>{html.escape(line).replace('**', '')}</p>")
    return "<!doctype html><meta charset='utf-8'><title>curation report</title>\n" + "\n".join(body) + "\n"
