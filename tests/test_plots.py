"""Plots are checked by the artists they draw, not by pixels."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from collections.abc import Iterable

import numpy as np
import pytest
from matplotlib._pylab_helpers import Gcf
from matplotlib.axes import Axes
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import FancyArrowPatch, Rectangle
from matplotlib.text import Text
from support import mapped_machine

import twodwalk as tw
from twodwalk.views.plots import (
    CELL_STYLES,
    DIMENSION_STYLES,
    EVENT_KINDS,
    LANES,
    LEVEL_STYLES,
    PSC,
    address_fields,
    plot_address_fields,
    plot_address_map,
    plot_hit_rates,
    plot_references,
    plot_timeline,
    plot_two_trees,
    plot_walk_grid,
    timeline_rows,
    two_trees,
    walk_grid,
)
from twodwalk.workloads import WorkloadResult

MIB = 1 << 20
GVA = 0x40_0008
DATA_GPA = 0x20_0000


def machine(guest_levels: int = 4, ept_levels: int = 4, *, thp: bool = False) -> tw.Machine:
    """A VM whose guest maps two 4 KiB pages at 0x400000 (as tests/test_two_dimensional_walk)."""
    return mapped_machine(
        GVA & ~0xFFF,
        DATA_GPA,
        0x2000,
        guest_ram=32 * MIB,
        guest_levels=guest_levels,
        ept_levels=ept_levels,
        maxphyaddr=52 if 5 in (guest_levels, ept_levels) else 48,
        gbpages=False,
        thp=thp,
    )


def full_walk(m: tw.Machine, gva: int = GVA) -> tw.AccessResult:
    """With the caches off, the second access walks every level of both dimensions."""
    m.vcpu.caches.off()
    m.vcpu.access(gva, "read")
    return m.vcpu.access(gva, "read")


def numbered_cells(figure: Figure) -> dict[int, tuple[int, int]]:
    """Reference number -> (row, col) of the grid's numbered cells."""
    texts = figure.axes[0].texts
    return {
        int(t.get_text()): (int(t.get_position()[1]), int(t.get_position()[0]))
        for t in texts
        if t.get_text().isdigit()
    }


def tags(figure: Figure) -> Counter[str]:
    return Counter(t.get_text() for t in figure.axes[0].texts)


def legend_labels(ax: Axes) -> list[str]:
    legend = ax.get_legend()
    assert legend is not None
    return [t.get_text() for t in legend.get_texts()]


def stop_markers(figure: Figure) -> list[Line2D]:
    return [line for line in figure.axes[0].lines if line.get_marker() == "X"]


def ys(line: Line2D) -> list[float]:
    return [float(y) for y in np.asarray(line.get_ydata(), dtype=float)]


def cell_of(marker: Line2D) -> tuple[int, int]:
    """(row, col) of the grid cell a marker sits in."""
    x = np.asarray(marker.get_xdata(), dtype=float)
    return int(ys(marker)[0]), int(x[0])


def readable(texts: Iterable[Text]) -> bool:
    return all(float(t.get_fontsize()) >= 10 for t in texts)


# --- workload costs ----------------------------------------------------------------------------

EPT_RUN = WorkloadResult("EPT", accesses=10, references={"guest": 10, "ept": 40}, tlb_hits=5)
SHADOW_RUN = WorkloadResult("shadow", accesses=10, references={"native": 10}, tlb_hits=8)


def figure_legend_labels(figure: Figure) -> list[str]:
    (legend,) = figure.legends
    return [t.get_text() for t in legend.get_texts()]


def test_reference_bars_stack_by_dimension_beside_the_exits_they_cost() -> None:
    exiting = WorkloadResult("shadow", accesses=10, references={"native": 10}, exits={"0": 3})
    figure = plot_references([EPT_RUN, exiting])
    refs, exits = figure.axes
    bars = [p for p in refs.patches if isinstance(p, Rectangle) and p.get_width() > 0]
    assert sorted(round(b.get_width(), 6) for b in bars) == [1.0, 1.0, 4.0]
    dims = ("guest", "ept", "native")
    assert {b.get_hatch() or "" for b in bars} == {DIMENSION_STYLES[d].hatch for d in dims}
    colours = {to_hex(b.get_facecolor()) for b in bars}
    assert colours == {DIMENSION_STYLES[d].colour.lower() for d in dims}
    assert figure_legend_labels(figure) == [
        "guest entry references",
        "EPT entry references",
        "shadow or native entry references",
    ]
    assert {a.get_text() for a in refs.texts} == {"5.00", "1.00"}
    assert [t.get_text() for t in refs.get_yticklabels()] == [
        "EPT: TLB hits 50%",
        "shadow: TLB hits 0%",
    ]
    # Shadow paging's cost in exits has its own panel: 3 exits in 10 accesses = 300 per 1,000.
    exit_bars = [p.get_width() for p in exits.patches if isinstance(p, Rectangle)]
    assert exit_bars == pytest.approx([0.0, 300.0])


def test_hit_rates_show_what_each_miss_costs_on_one_axis() -> None:
    figure = plot_hit_rates([EPT_RUN, SHADOW_RUN])
    (ax,) = figure.axes
    # EPT: 50 references over 5 misses; shadow: 10 references over 2 misses.
    totals = {a.get_text() for a in ax.texts}
    assert totals == {"10.00", "5.00"}
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["EPT: TLB hits 50%", "shadow: TLB hits 80%"]
    assert ax.get_xlabel() == "memory references per TLB miss"


# --- address fields ----------------------------------------------------------------------------


def test_address_fields_split_a_gva_into_indices_and_offset() -> None:
    figure = plot_address_fields(0x7F00_1234_5ABC)
    ax = figure.axes[0]
    boxes = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert [b.get_label() for b in boxes] == [
        "sign extension",
        "PML4",
        "PDPT",
        "PD",
        "PT",
        "offset",
    ]
    assert [b.get_width() for b in boxes] == [16, 9, 9, 9, 9, 12]
    texts = [t.get_text() for t in ax.texts]
    assert "PML4\n47:39" in texts and "0x0fe = 254" in texts and "011111110" in texts
    assert "PT\n20:12" in texts and "0x145 = 325" in texts and "101000101" in texts
    assert "offset\n11:0" in texts and "0xabc" in texts and "101010111100" in texts
    # The chain under the fields, as SDM figure 4-8 draws it: CR3, the tables, the page.
    assert [t for t in texts if t == "CR3" or t.endswith("\ntable") or t == "the page"] == [
        "CR3",
        "PML4\ntable",
        "PDPT\ntable",
        "PD\ntable",
        "PT\ntable",
        "the page",
    ]
    assert "entry 254" in texts and "entry 325" in texts
    levels = [LEVEL_STYLES[lv] for lv in (4, 3, 2, 1)]
    assert [b.get_hatch() for b in boxes[1:5]] == [s.hatch for s in levels]
    assert [to_hex(b.get_facecolor()) for b in boxes[1:5]] == [s.colour.lower() for s in levels]
    assert readable(ax.texts)


def test_address_fields_of_a_gpa_use_ept_names_and_stop_at_a_large_page() -> None:
    fields = address_fields(0x4020_1008, levels=5, space="GPA", page_size=2 * MIB)
    names = [f.name for f in fields]
    assert names == ["must be 0", "EPT PML5", "EPT PML4", "EPT PDPT", "EPT PD", "offset"]
    assert (fields[-1].high, fields[-1].low, fields[-1].value) == (20, 0, 0x1008)
    assert (fields[0].high, fields[0].low) == (63, 57)
    assert [f.value for f in fields[1:-1]] == [0, 0, 1, 1]


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"address": -1}, "address"),
        ({"address": "0x1000"}, "address"),
        ({"address": 1 << 64}, "address"),
        ({"levels": 3}, "levels"),
        ({"levels": True}, "levels"),
        ({"space": "HPA"}, "space"),
        ({"page_size": 8192}, "page_size"),
        ({"page_size": "4096"}, "page_size"),
    ],
)
def test_address_fields_reject_bad_input_naming_the_field(
    options: dict[str, object], field: str
) -> None:
    arguments: dict[str, object] = {"address": 0x1000, **options}
    with pytest.raises(tw.TwodwalkError, match=field):
        plot_address_fields(**arguments)  # type: ignore[arg-type]


# --- the walk grid -----------------------------------------------------------------------------

GRID_CASES = [
    pytest.param(4, 4, id="4x4"),
    pytest.param(4, 5, id="4x5"),
    pytest.param(5, 4, id="5x4"),
    pytest.param(5, 5, id="5x5"),
]


@pytest.mark.parametrize(("guest_levels", "ept_levels"), GRID_CASES)
def test_full_walk_numbers_every_cell_in_hardware_order(guest_levels: int, ept_levels: int) -> None:
    result = full_walk(machine(guest_levels, ept_levels))
    figure = plot_walk_grid(result.trace)
    count = (guest_levels + 1) * (ept_levels + 1) - 1
    width = ept_levels + 1  # EPT columns, then the guest entry
    assert numbered_cells(figure) == {k: divmod(k - 1, width) for k in range(1, count + 1)}, (
        "row = guest level (then the data GPA), column = EPT level (then the guest entry)"
    )
    assert tags(figure)["mem"] == 0, "a number says it is a memory reference; no cell repeats it"
    title = figure.axes[0].get_title()
    assert title == (
        f"{guest_levels}-level guest walk under {ept_levels}-level EPT: {count} memory references"
    )
    labels = legend_labels(figure.axes[0])
    assert "memory reference: guest entry" in labels and "memory reference: EPT entry" in labels
    assert "the order the hardware reads in" in labels
    arrows = [p for p in figure.axes[0].patches if isinstance(p, FancyArrowPatch)]
    assert len(arrows) == count - 1, "one arrow from each reference to the next"
    # Bhargava et al.'s labels: the table each row locates, the EPT level of each column.
    assert f"gL{guest_levels} table\nat gCR3" in tags(figure)
    assert "data (gPA)\nat gL1 entry" in tags(figure)
    assert f"nL{ept_levels}\nEPT PML{ept_levels}E" in tags(figure)
    assert stop_markers(figure) == []


def test_grid_cells_are_coloured_and_hatched_by_what_served_them() -> None:
    m = machine()
    m.vcpu.access(GVA, "read")
    m.vcpu.invlpg(GVA)  # drops the TLB and paging-structure caches; guest-physical stays
    figure = plot_walk_grid(m.vcpu.access(GVA, "read").trace)
    assert sorted(numbered_cells(figure)) == [1, 2, 3, 4]
    assert set(numbered_cells(figure).values()) == {(row, 4) for row in range(4)}
    # One GPM span per row (the four guest tables and the data GPA), across the four EPT
    # columns the mapping made unnecessary.
    assert tags(figure)["GPM"] == 5 and tags(figure)["mem"] == 0
    gpm = CELL_STYLES["guest-physical"].hatch
    spans = [p for p in figure.axes[0].patches if isinstance(p, Rectangle) and p.get_hatch() == gpm]
    assert len(spans) == 5 and all(round(p.get_width(), 2) == 3.92 for p in spans)
    assert CELL_STYLES["guest-physical"].label in legend_labels(figure.axes[0])


def test_paging_structure_cache_skips_rows_and_is_labelled() -> None:
    m = machine()
    m.vcpu.access(GVA, "read")
    result = m.vcpu.access(GVA + 0x1000, "read")  # same page table: the PDE cache hits
    grid = walk_grid(result.trace)
    sources = Counter(cell.source for cell in grid.cells)
    # Rows gL4..gL2 (15 cells) and the PT's EPT cells (4) from the guest PDE cache; the data
    # GPA's EPT PML4E, PDPTE and PDE (3) from the EPT's PDE cache: the PTE and the EPT PTE
    # are the only memory references.
    assert sources["memory"] == 2 and sources[PSC] == 22
    assert {(c.row, c.col) for c in grid.cells if c.source == PSC} >= {(0, 4), (1, 4), (2, 4)}
    assert {(c.row, c.col) for c in grid.cells if c.source == "memory"} == {(3, 4), (4, 3)}
    figure = plot_walk_grid(result.trace)
    # Spans: rows gL4..gL2 whole (3), the PT row's EPT columns (1), the data row's first
    # three EPT columns (1).
    assert tags(figure)["PSC"] == 5
    assert CELL_STYLES[PSC].label in legend_labels(figure.axes[0])


def test_unmapped_gva_marks_the_guest_fault() -> None:
    m = machine()
    m.vcpu.caches.off()
    m.vcpu.access(GVA, "read")
    result = m.vcpu.access(0x80_0008, "read")  # no PDE for this 2 MiB region
    assert isinstance(result.fault, tw.PageFault)
    figure = plot_walk_grid(result.trace)
    (marker,) = stop_markers(figure)
    assert marker.get_label() == "walk stopped: walk fault: entry not present"
    assert cell_of(marker) == (2, 4)  # the PDE
    assert marker.get_label() in legend_labels(figure.axes[0])


def test_gpa_outside_memslots_marks_the_ept_exit_in_the_data_row() -> None:
    m = machine()
    m.guest.map(0x50_0000, 0x4000_0000, 0x1000, rw=1, us=1)  # beyond guest RAM: MMIO
    m.vcpu.caches.off()
    m.vcpu.access(GVA, "read")
    result = m.vcpu.access(0x50_0008, "read")
    assert isinstance(result.exit, tw.MmioExit)
    grid = walk_grid(result.trace)
    assert grid.stop is not None
    assert (grid.stop.row, grid.stop.reason) == (4, "EPT_VIOLATION")
    (marker,) = stop_markers(plot_walk_grid(result.trace))
    assert marker.get_label() == "walk stopped: EPT_VIOLATION"


def test_first_attempt_of_a_cold_access_stops_in_the_nested_walk() -> None:
    m = machine()
    m.vcpu.caches.off()
    trace = m.vcpu.access(GVA, "write", 1).trace
    figure = plot_walk_grid(trace, attempt=0)
    assert numbered_cells(figure) == {1: (0, 0)}  # EPT PML4E for the guest root: not present
    (marker,) = stop_markers(figure)
    assert cell_of(marker) == (0, 0)
    assert marker.get_label() == "walk stopped: EPT_VIOLATION"


def test_highlight_draws_one_cell_with_a_thick_edge() -> None:
    trace = full_walk(machine()).trace
    ax = plot_walk_grid(trace, highlight=7).axes[0]
    widths = Counter(p.get_linewidth() for p in ax.patches if isinstance(p, Rectangle))
    assert widths[4.5] == 1
    (thick,) = [p for p in ax.patches if isinstance(p, Rectangle) and p.get_linewidth() == 4.5]
    assert (int(thick.get_y()), int(thick.get_x())) == (1, 1)  # reference 7: row 1, column 1
    for bad in (0, 25, "7"):
        with pytest.raises(tw.TwodwalkError, match="highlight"):
            plot_walk_grid(trace, highlight=bad)  # type: ignore[arg-type]


def test_large_pages_use_fewer_rows_and_columns() -> None:
    m = machine(thp=True)
    m.guest.map(0x60_0000, 0x40_0000, 2 * MIB, page_size=2 * MIB, rw=1, us=1)
    cells = numbered_cells(plot_walk_grid(full_walk(m, 0x60_0008).trace))
    assert len(cells) == 15  # 3 guest levels, each and the data GPA through 3 EPT levels
    assert {row for row, _ in cells.values()} == {0, 1, 2, 4}, "no PTE row"
    assert {col for _, col in cells.values()} == {0, 1, 2, 4}, "no EPT PTE column"


def test_shadow_paging_draws_one_column() -> None:
    m = tw.Machine(guest_ram=32 * MIB, tdp=False)
    m.guest.map(GVA & ~0xFFF, DATA_GPA, 0x1000, rw=1, us=1)
    result = m.vcpu.access(GVA, "read")
    grid = walk_grid(result.trace)
    assert grid.cols == (("entry", None),) and not grid.two_dimensional
    figure = plot_walk_grid(result.trace)
    assert numbered_cells(figure) == {k: (k - 1, 0) for k in range(1, 5)}
    assert "one-dimensional" in figure.axes[0].get_title()
    first = plot_walk_grid(result.trace, attempt=0)
    (marker,) = stop_markers(first)
    assert marker.get_label() == "walk stopped: EXCEPTION_NMI (#PF)"


def test_tlb_hit_draws_an_empty_grid_that_says_so() -> None:
    m = machine()
    m.vcpu.access(GVA, "read")
    figure = plot_walk_grid(m.vcpu.access(GVA, "read").trace)
    assert numbered_cells(figure) == {}
    assert figure.axes[0].get_title().endswith(": TLB hit: no walk")


def test_grid_rejects_an_attempt_the_trace_does_not_have() -> None:
    trace = full_walk(machine()).trace
    with pytest.raises(tw.TwodwalkError, match="attempt"):
        plot_walk_grid(trace, attempt=1)


def test_grid_without_any_ept_walk_takes_the_given_depth() -> None:
    m = machine(ept_levels=5)
    m.vcpu.access(GVA, "read")
    m.vcpu.invlpg(GVA)
    result = m.vcpu.access(GVA, "read")  # every GPA from a guest-physical mapping
    assert len(walk_grid(result.trace).cols) == 5, "four EPT columns by default"
    assert len(walk_grid(result.trace, ept_levels=5).cols) == 6
    with pytest.raises(tw.TwodwalkError, match="ept_levels"):
        walk_grid(result.trace, ept_levels=3)


# --- the timeline ------------------------------------------------------------------------------


def test_timeline_is_a_swimlane_diagram_with_a_shape_per_kind() -> None:
    m = machine()
    result = m.vcpu.access(GVA, "write", 7)  # a first touch: EPT violations, KVM, a host fault
    figure = plot_timeline(result)
    (ax,) = figure.axes
    markers = [line for line in ax.lines if line.get_linestyle() == "None"]
    assert len(markers) == len(result.trace.events), "one row per event"
    # Time runs down: row i at y = i, in the lane (x) of whoever acted.
    rows = timeline_rows(result.trace)
    assert [float(ys(line)[0]) for line in markers] == list(range(len(rows)))
    assert [round(float(np.asarray(line.get_xdata())[0])) for line in markers] == [
        row.lane for row in rows
    ]
    assert len({kind[1] for kind in EVENT_KINDS.values()}) == len(EVENT_KINDS)
    texts = Counter(t.get_text() for t in ax.texts)
    assert all(texts[lane] == 1 for lane in LANES), "a header per lane"
    for label in ("EPT_VIOLATION", "__gfn_to_hva_memslot", "hva_to_pfn", "handle_mm_fault"):
        assert texts[label] >= 1
    assert texts["VM entry (retry)"] == len(result.trace.attempts()) - 1
    assert texts["data write"] == 1
    (legend,) = figure.legends
    assert {"VM exit", "KVM function", "host page fault"} <= {
        t.get_text() for t in legend.get_texts()
    }


def test_timeline_draws_hva_to_pfn_before_the_host_work_it_does() -> None:
    """KVM's `hva_to_pfn` records its step after get_user_pages returns; the diagram moves
    the call up to where it began and brackets the host's walk and fault inside it."""
    m = machine()
    rows = timeline_rows(m.vcpu.access(GVA, "write", 7).trace)
    call = next(i for i, row in enumerate(rows) if row.label == "hva_to_pfn" and row.inside)
    inside = rows[call + 1 : call + 1 + rows[call].inside]
    # The VMM's page was never touched: no PT for it yet, so the host walk stops at the PDE.
    assert [row.label for row in inside][:2] == [
        "host page-table walk: fault L2",
        "handle_mm_fault",
    ]
    assert all(row.lane == 2 for row in inside)


def test_an_exit_to_the_vmm_ends_in_the_vmm_lane() -> None:
    m = machine()
    m.guest.map(0x50_0000, 0x4000_0000, 0x1000, rw=1, us=1)  # beyond guest RAM: MMIO
    result = m.vcpu.access(0x50_0008, "write", 1)
    rows = timeline_rows(result.trace, result.exit)
    assert (rows[-1].lane, LANES[rows[-1].lane]) == (3, "VMM")
    assert rows[-1].label == "MmioExit: the VMM emulates"


# --- the address map ---------------------------------------------------------------------------


def route_arrows(ax: Axes) -> dict[str, FancyArrowPatch]:
    return {str(p.get_label()): p for p in ax.patches if isinstance(p, FancyArrowPatch)}


def test_address_map_shows_both_routes_side_by_side() -> None:
    m = machine()
    result = m.vcpu.access(GVA, "write", 7)
    ax = plot_address_map(m, result).axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert f"GVA {GVA:#x}" in texts and f"HPA {result.hpa:#x}" in texts
    assert "frames this access used" in texts, "the HPA column says what its boxes are"
    assert "0x0 +32 MiB\nmemslot 0" in texts
    assert any(t.endswith("\nguest RAM") for t in texts)
    assert any(t.endswith("\ndata") for t in texts)
    assert "where the two routes meet" in legend_labels(ax)
    arrows = route_arrows(ax)
    assert set(arrows) == {"guest page tables", "EPT", "memslot", "host page tables"}
    styles = {(to_hex(a.get_edgecolor()), str(a.get_linestyle())) for a in arrows.values()}
    assert len(styles) == 4, "each route has its own colour and line style"
    assert {"EPT (hardware)", "KVM memslot lookup (software)"} <= set(legend_labels(ax))
    hva_rows = 1  # the VMM has one VMA, guest RAM
    ept = np.asarray(arrows["EPT"].get_path().vertices, dtype=float)
    under_hva = ept[(ept[:, 0] >= 1.5) & (ept[:, 0] <= 2.5), 1]
    assert under_hva.min() > hva_rows, "the shortcut runs under the HVA column's boxes"


def test_address_map_of_an_mmio_access_ends_at_the_gpa() -> None:
    m = machine()
    m.guest.map(0x50_0000, 0x4000_0000, 0x1000, rw=1, us=1)
    result = m.vcpu.access(0x50_0008, "read")
    ax = plot_address_map(m, result).axes[0]
    assert set(route_arrows(ax)) == {"guest page tables", "KVM_EXIT_MMIO"}
    texts = [t.get_text() for t in ax.texts]
    assert "0x40000000 +4 KiB\nno memslot: MMIO" in texts
    assert "HVA not reached" in texts and "the VMM emulates\nthe device (MMIO)" in texts
    assert "exit to the VMM (KVM_EXIT_MMIO)" in legend_labels(ax)
    assert "where the two routes meet" not in legend_labels(ax)


def test_address_map_keeps_mappings_with_different_rights_apart() -> None:
    """The toy's read-only code page and its writable data page are contiguous in GVA and
    GPA; one box for both would say "-> GPA 0x5000" for an access to GPA 0x6008."""
    from twodwalk.scenarios import TOY_GVA, scenario

    m = scenario("toy").build()
    ax = plot_address_map(m, m.vcpu.access(TOY_GVA + 0x1008, "read")).axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert f"{TOY_GVA:#x} +4 KiB\n-> GPA 0x5000" in texts
    assert f"{TOY_GVA + 0x1000:#x} +4 KiB\n-> GPA 0x6000" in texts


def test_address_map_with_shadow_paging_draws_the_shadow_shortcut() -> None:
    m = tw.Machine(guest_ram=32 * MIB, tdp=False)
    m.guest.map(GVA & ~0xFFF, DATA_GPA, 0x1000, rw=1, us=1)
    ax = plot_address_map(m, m.vcpu.access(GVA, "read")).axes[0]
    assert {"shadow page tables", "memslot", "host page tables"} <= set(route_arrows(ax))
    assert "EPT" not in route_arrows(ax)


# --- all plots ---------------------------------------------------------------------------------


def test_plots_draw_on_a_given_axes_and_leave_no_pyplot_state() -> None:
    m = machine()
    result = m.vcpu.access(GVA, "read")
    figure = Figure()
    axes = figure.subplots(2, 3).flatten()
    drawn = [
        plot_address_fields(GVA, ax=axes[0]),
        plot_walk_grid(result.trace, ax=axes[1]),
        plot_timeline(result.trace, ax=axes[2]),
        plot_address_map(m, result, ax=axes[3]),
        plot_references([EPT_RUN], ax=axes[4]),
        plot_hit_rates([EPT_RUN], ax=axes[5]),
    ]
    assert all(f is figure for f in drawn)
    assert all(ax.has_data() or ax.texts for ax in axes)
    assert Gcf.get_num_fig_managers() == 0
    assert all(readable(ax.texts) for ax in axes)


def test_readouts_and_styles_load_without_matplotlib() -> None:
    """Widget models and text views read the grid, the regions and the styles without paying
    for matplotlib: only views/plots.py and views/graph.py draw."""
    code = (
        "import sys, twodwalk.views.readouts, twodwalk.views.style;"
        " sys.exit('matplotlib' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# --- two trees, one frame ----------------------------------------------------------------------


def test_two_trees_have_two_roots_and_end_in_one_frame() -> None:
    """The qemu scenario's heap write: EPT rooted at the EPTP, the host's tables at the VMM's
    CR3, a 2 MiB leaf in each (THP in the host, so KVM maps 2 MiB too), one frame."""
    from twodwalk.scenarios import scenario

    sc = scenario("qemu")
    m = sc.build()
    heap = sc.run(m)[1]
    trees = two_trees(m, heap)
    assert trees.ept.root == m.vm.ept.eptp.root and trees.host.root == m.vmm.tables.root
    assert trees.ept.root != trees.host.root, "two trees, two roots"
    assert {s.table for s in trees.ept.steps}.isdisjoint({s.table for s in trees.host.steps})
    assert heap.hpa is not None and trees.frame == heap.hpa
    assert (trees.memslot.id, trees.gpa, trees.hva) == (1, heap.gpa, heap.hva)
    ax = plot_two_trees(m, heap).axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert f"the same frame\nHPA {heap.hpa & ~0x1F_FFFF:#x} (2 MiB)" in texts
    assert any(t.startswith("EPT leaf (SDM Vol 3C") for t in texts)
    assert any(t.startswith("host leaf (IA-32e") for t in texts)
    # The two formats, field by field: EPT's R/W/X against IA-32e's P, R/W, U/S.
    assert {"R 0", "W 1", "X 2", "MT 5:3", "IPAT 6"} <= set(texts)
    assert {"P 0", "R/W 1", "U/S 2", "XD 63"} <= set(texts)
    assert "memslot 1: GPA 0x4000000\n-> HVA " + f"{trees.memslot.userspace_addr:#x}" in texts


def test_two_trees_needs_an_access_that_reached_guest_ram_under_ept() -> None:
    from twodwalk.scenarios import scenario

    m = scenario("qemu").build()
    mmio = m.vcpu.access(0xFFFF_C900_0000_0010, "write", 1)
    with pytest.raises(tw.TwodwalkError, match="two trees need an access that reached guest RAM"):
        plot_two_trees(m, mmio)


def test_the_data_row_names_the_entry_that_maps_a_large_page() -> None:
    """With a 2 MiB guest page the walk ends at the guest PDE: the data's GPA comes from the
    gL2 entry, and the gL1 row is never read."""
    m = tw.Machine(guest_ram=32 * MIB, maxphyaddr=48, gbpages=False)
    m.guest.map(0x4000_0000, 0x20_0000, 2 * MIB, page_size=2 * MIB, rw=1)
    m.vcpu.caches.off()
    m.vcpu.access(0x4000_0008, "read")
    figure = plot_walk_grid(m.vcpu.access(0x4000_0008, "read").trace)
    assert "data (gPA)\nat gL2 entry" in tags(figure)


def test_a_printed_figure_lets_its_pixel_buffer_go() -> None:
    """Notebooks keep every displayed figure; matplotlib's texts keep the renderer they were
    drawn with. twodwalk's canvas drops it after printing (the bench's kernel-memory row)."""
    import io

    from matplotlib.backends.backend_agg import RendererAgg

    result = full_walk(machine())
    figure = plot_walk_grid(result.trace)
    for _ in range(2):  # and it prints again after letting go
        figure.savefig(io.BytesIO(), format="png")
        texts = figure.findobj(Text)
        held = [t for t in texts if isinstance(getattr(t, "_renderer", None), RendererAgg)]
        assert texts and held == []
