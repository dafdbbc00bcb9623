"""Model merging: soups, task arithmetic, TIES and continual merging with orthogonal projections (OPCM).

    from clipforge.merge import uniform_soup, greedy_soup, task_arithmetic, ties, opcm, HeldOut
    soup = uniform_soup("base.safetensors", ["ft-a.safetensors", "ft-b.safetensors"], out="soup.safetensors")
    held_out = HeldOut([load_dataset("val/")])                     # clipforge.eval.datasets.load_dataset
    greedy = greedy_soup("base.safetensors", fine_tunes, held_out)  # a CLIP; provenance says what was kept
    merged = opcm("base.safetensors", ["task-1.safetensors", "task-2.safetensors"], alpha=0.5)

Each method takes the base and the models (checkpoint paths or ``CLIP`` models), streams the models one at
a time (memory does not grow with their number), checks that each has the base's architecture and comes
from the base (``clipforge.merge.inputs``), and returns the merged ``CLIP`` with its provenance (method,
base, ingredients with fingerprints, coefficients); ``out=`` also writes it as a clipforge checkpoint.
One module per method: ``soup`` (Wortsman et al., ICML 2022), ``task_arithmetic`` (Ilharco et al., ICLR
2023), ``ties`` (Yadav et al., NeurIPS 2023), ``opcm`` (Tang et al., NeurIPS 2025); ``held_out`` scores
models with ``clipforge.eval`` for the methods that choose on data.
"""

from clipforge.merge.held_out import HeldOut
from clipforge.merge.inputs import MergeInputs
from clipforge.merge.opcm import opcm
from clipforge.merge.soup import greedy_soup, uniform_soup
from clipforge.merge.task_arithmetic import task_arithmetic
from clipforge.merge.ties import ties

__all__ = ["HeldOut", "MergeInputs", "greedy_soup", "opcm", "task_arithmetic", "ties", "uniform_soup"]
