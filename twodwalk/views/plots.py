"""Plots of what the engine recorded (matplotlib). Each function draws on a given Axes or a
new Figure and returns the Figure, leaving no global pyplot state behind.

Colours are the Okabe-Ito palette, safe for the common colour-vision deficiencies; meaning is
also carried by hatching and by labels, never by colour alone.
"""

from __future__ import annotations

from collections.abc import Sequence

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from twodwalk.workloads import WorkloadResult

OKABE_ITO = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000")
HATCHES = ("", "//", "..", "xx", "\\\\", "++", "oo", "--")
DIMENSIONS = ("guest", "ept", "native")


def plot_references(results: Sequence[WorkloadResult], ax: Axes | None = None) -> Figure:
    """Memory references per access for each run, stacked by dimension (guest entries, EPT
    entries, native entries), each dimension with its own colour and hatch, and the TLB hit
    rate written above each bar."""
    figure, ax = _axes(ax)
    names = [r.name for r in results]
    bottoms = [0.0] * len(results)
    for i, dimension in enumerate(DIMENSIONS):
        heights = [r.references.get(dimension, 0) / max(r.accesses, 1) for r in results]
        if not any(heights):
            continue
        ax.bar(
            names,
            heights,
            bottom=bottoms,
            color=OKABE_ITO[i],
            hatch=HATCHES[i],
            edgecolor="black",
            label=f"{dimension} references",
        )
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    for x, (total, result) in enumerate(zip(bottoms, results, strict=True)):
        ax.annotate(
            f"TLB {result.tlb_hit_rate:.0%}", (x, total), ha="center", va="bottom", fontsize="small"
        )
    ax.set_ylabel("memory references per access")
    ax.set_title("Where translation went to memory")
    ax.tick_params(axis="x", labelrotation=20)
    ax.legend()
    figure.tight_layout()
    return figure


def _axes(ax: Axes | None) -> tuple[Figure, Axes]:
    if ax is not None:
        figure = ax.get_figure()
        assert isinstance(figure, Figure)
        return figure, ax
    figure = Figure(figsize=(9, 4.5))
    return figure, figure.add_subplot()
