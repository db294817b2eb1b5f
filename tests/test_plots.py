"""Plots are checked by the artists they draw, not by pixels."""

from __future__ import annotations

from matplotlib.colors import to_hex
from matplotlib.patches import Rectangle

from twodwalk.views.plots import HATCHES, OKABE_ITO, plot_references
from twodwalk.workloads import WorkloadResult


def test_reference_bars_stack_by_dimension_with_colour_and_hatch() -> None:
    ept = WorkloadResult("EPT", accesses=10, references={"guest": 10, "ept": 40}, tlb_hits=5)
    shadow = WorkloadResult("shadow", accesses=10, references={"native": 10}, tlb_hits=5)
    figure = plot_references([ept, shadow])
    ax = figure.axes[0]
    bars = [p for p in ax.patches if isinstance(p, Rectangle)]
    heights = sorted(round(b.get_height(), 6) for b in bars if b.get_height() > 0)
    assert heights == [1.0, 1.0, 4.0]
    hatches = {b.get_hatch() or "" for b in bars if b.get_height() > 0}
    assert hatches == {HATCHES[0], HATCHES[1], HATCHES[2]}
    legend_box = ax.get_legend()
    assert legend_box is not None
    legend = [t.get_text() for t in legend_box.get_texts()]
    assert legend == ["guest references", "ept references", "native references"]
    assert {a.get_text() for a in ax.texts} == {"TLB 50%"}
    colours = {to_hex(b.get_facecolor()) for b in bars if b.get_height() > 0}
    assert len(colours) == 3, "each dimension has its own Okabe-Ito colour"
    assert colours == {c.lower() for c in OKABE_ITO[:3]}
