"""Plots of what the engine recorded (matplotlib). Each function draws on a given Axes or a
new Figure and returns the Figure, leaving no global pyplot state behind.

Colours are the Okabe-Ito palette, safe for the common colour-vision deficiencies; meaning is
also carried by hatching, line styles, marker shapes and labels, never by colour alone. One
style per paging level (`LEVEL_STYLES`) and per dimension (`DIMENSION_STYLES`) is shared by
every plot here and by the walk graph (views/graph.py), so a level or a dimension looks the
same wherever it appears. Text is at least 10 points, for a lecture projector.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import FancyArrowPatch, Patch, Rectangle
from matplotlib.path import Path

from twodwalk.engine.trace import Trace
from twodwalk.engine.units import PAGE_SIZE, size_text
from twodwalk.errors import check_int
from twodwalk.views.readouts import (
    EPT_ROUTES,
    EVENT_KINDS,
    LANES,
    MAX_REGIONS,
    SHADOW_ROUTES,
    SOFTWARE_ROUTES,
    SPACES,
    AddressField,
    GridCell,
    GridStop,
    Region,
    WalkGrid,
    _visible,
    access_addresses,
    access_gva,
    address_fields,
    all_references,
    attempt_events,
    event_label,
    frames_touched,
    guest_mappings,
    level_names,
    memslot_regions,
    references,
    table_name,
    walk_grid,
)
from twodwalk.views.style import (
    BLACK,
    BLUE,
    CELL_STYLES,
    DIMENSION_STYLES,
    EMPTY_CELL,
    FIGSIZE,
    FONT,
    GREEN,
    GREY,
    GUEST_PHYSICAL,
    HARDWARE_DIMENSIONS,
    LANE_COLOURS,
    LEVEL_STYLES,
    OKABE_ITO,
    ORANGE,
    PLAIN_STYLE,
    PSC,
    PURPLE,
    SKY_BLUE,
    STOP_MARKER,
    UNUSED_BITS_STYLE,
    VERMILLION,
    YELLOW,
    Style,
)
from twodwalk.workloads import WorkloadResult

if TYPE_CHECKING:
    from twodwalk.engine.machine import Machine
    from twodwalk.engine.processor import AccessResult

__all__ = [
    "BLACK",
    "BLUE",
    "BOX",
    "CELL_STYLES",
    "DIMENSION_STYLES",
    "EMPTY_CELL",
    "EPT_ROUTES",
    "EVENT_KINDS",
    "FIGSIZE",
    "FONT",
    "GREEN",
    "GREY",
    "GUEST_PHYSICAL",
    "HARDWARE_DIMENSIONS",
    "LANES",
    "LANE_COLOURS",
    "LEVEL_STYLES",
    "MAX_REGIONS",
    "OKABE_ITO",
    "ORANGE",
    "PLAIN_STYLE",
    "PSC",
    "PURPLE",
    "SHADOW_ROUTES",
    "SKY_BLUE",
    "SOFTWARE_ROUTES",
    "SPACES",
    "STOP_MARKER",
    "UNUSED_BITS_STYLE",
    "VERMILLION",
    "YELLOW",
    "AddressField",
    "GridCell",
    "GridStop",
    "Region",
    "Style",
    "WalkGrid",
    "access_addresses",
    "access_gva",
    "address_fields",
    "all_references",
    "attempt_events",
    "event_label",
    "figure_and_axes",
    "frames_touched",
    "guest_mappings",
    "legend_handles",
    "level_names",
    "memslot_regions",
    "plot_address_fields",
    "plot_address_map",
    "plot_hit_rates",
    "plot_references",
    "plot_timeline",
    "plot_walk_grid",
    "references",
    "table_name",
    "walk_grid",
]

_TEXT_BOX = {"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.85}


def figure_and_axes(ax: Axes | None, figsize: tuple[float, float] = FIGSIZE) -> tuple[Figure, Axes]:
    """The given Axes and its Figure, or a new Figure (never pyplot's current one)."""
    if ax is not None:
        figure = ax.get_figure()
        assert isinstance(figure, Figure)
        return figure, ax
    figure = Figure(figsize=figsize, layout="constrained")
    return figure, figure.add_subplot()


def legend_handles(styles: Iterable[Style]) -> list[Patch]:
    """Legend boxes with colour, hatch and label, one per distinct label."""
    seen: dict[str, Style] = {}
    for style in styles:
        seen.setdefault(style.label, style)
    return [
        Patch(
            facecolor=s.face, hatch=s.hatch, edgecolor=BLACK, linestyle=s.linestyle, label=s.label
        )
        for s in seen.values()
    ]


# --- workload costs ----------------------------------------------------------------------------


def plot_references(results: Sequence[WorkloadResult], ax: Axes | None = None) -> Figure:
    """Memory references per access for each run, stacked by dimension (guest entries, EPT
    entries, native entries), each dimension with its own colour and hatch, and the TLB hit
    rate written above each bar."""
    figure, ax = figure_and_axes(ax)
    names = [r.name for r in results]
    bottoms = [0.0] * len(results)
    for dimension in HARDWARE_DIMENSIONS:
        heights = [r.references.get(dimension, 0) / max(r.accesses, 1) for r in results]
        if not any(heights):
            continue
        style = DIMENSION_STYLES[dimension]
        ax.bar(
            names,
            heights,
            bottom=bottoms,
            color=style.colour,
            hatch=style.hatch,
            edgecolor=BLACK,
            label=f"{dimension} references",
        )
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    for x, (total, result) in enumerate(zip(bottoms, results, strict=True)):
        ax.annotate(
            f"TLB {result.tlb_hit_rate:.0%}", (x, total), ha="center", va="bottom", fontsize=FONT
        )
    ax.margins(y=0.15)  # room above the tallest bar for its TLB label
    ax.set_ylabel("memory references per access", fontsize=FONT)
    ax.set_title("Where translation went to memory")
    ax.tick_params(axis="x", labelrotation=20, labelsize=FONT)
    ax.legend(fontsize=FONT)
    return figure


def plot_hit_rates(results: Sequence[WorkloadResult], ax: Axes | None = None) -> Figure:
    """The TLB hit rate (left axis) beside the memory references per access (right axis) of
    each run: how often the caches answer, next to what the misses cost."""
    figure, ax = figure_and_axes(ax)
    xs = range(len(results))
    width = 0.38
    hit = Style(SKY_BLUE, "..", label="TLB hit rate (%)")
    cost = Style(VERMILLION, "//", label="memory references per access")
    hits = ax.bar(
        [x - width / 2 for x in xs],
        [100 * r.tlb_hit_rate for r in results],
        width,
        color=hit.colour,
        hatch=hit.hatch,
        edgecolor=BLACK,
        label=hit.label,
    )
    right = ax.twinx()
    refs = right.bar(
        [x + width / 2 for x in xs],
        [r.references_per_access for r in results],
        width,
        color=cost.colour,
        hatch=cost.hatch,
        edgecolor=BLACK,
        label=cost.label,
    )
    ax.bar_label(hits, fmt="%.0f%%", fontsize=FONT)
    right.bar_label(refs, fmt="%.2f", fontsize=FONT)
    ax.set_xticks(list(xs), [r.name for r in results], rotation=20, ha="right", fontsize=FONT)
    ax.set_ylim(0, 115)
    ax.set_ylabel(hit.label, fontsize=FONT)
    right.set_ylabel(cost.label, fontsize=FONT)
    right.set_ylim(0, max([r.references_per_access for r in results] + [1.0]) * 1.2)
    ax.legend(
        handles=[hits, refs], loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=FONT
    )
    ax.set_title("TLB hits and what the misses cost")
    return figure


def plot_address_fields(
    address: int,
    *,
    levels: int = 4,
    space: str = "GVA",
    page_size: int = PAGE_SIZE,
    ax: Axes | None = None,
) -> Figure:
    """An address as the walk reads it: a box per field, as wide as its bits, with the
    table it indexes (in that level's colour and hatch), the bit range and the value."""
    fields = address_fields(address, levels=levels, space=space, page_size=page_size)
    figure, ax = figure_and_axes(ax, (FIGSIZE[0], 3.0))
    for f in fields:
        x, width = 63 - f.high, f.high - f.low + 1
        ax.add_patch(
            Rectangle(
                (x, 0),
                width,
                1,
                facecolor=f.style.colour,
                hatch=f.style.hatch,
                edgecolor=BLACK,
                linewidth=1.5,
                label=f.name,
            )
        )
        ax.text(
            x + width / 2,
            0.5,
            f"{f.name}\nbits {f.high}:{f.low}\n{f.value_text}",
            ha="center",
            va="center",
            fontsize=FONT,
            bbox=_TEXT_BOX,
        )
    ax.set_xlim(-0.5, 64.5)
    ax.set_ylim(-0.1, 1.1)
    ax.set_axis_off()
    walk = "EPT" if space == "GPA" else "paging"
    ax.set_title(
        f"{space} {address:#x}: {levels}-level {walk}, {size_text(page_size)} page", fontsize=12
    )
    return figure


def _memory_style(dimension: str) -> Style:
    colour = DIMENSION_STYLES[dimension].colour
    return Style(colour, "", "solid", f"memory: {dimension} entry", "mem", alpha=0.55)


def _cell_style(cell: GridCell | None) -> Style:
    if cell is None:
        return EMPTY_CELL
    if cell.dimension is not None:
        return _memory_style(cell.dimension)
    return CELL_STYLES[cell.source]


def plot_walk_grid(
    trace: Trace,
    *,
    attempt: int = -1,
    highlight: int | None = None,
    ept_levels: int | None = None,
    ax: Axes | None = None,
) -> Figure:
    """The walk grid of one attempt (see `walk_grid`): numbered cells in hardware order,
    what served each one by colour, hatch and tag, and a marker where the walk stopped.
    `highlight=n` draws reference n with a thick edge (for stepping through a walk)."""
    grid = walk_grid(trace, attempt, ept_levels=ept_levels)
    count = sum(cell.number is not None for cell in grid.cells)
    if highlight is not None:
        check_int("highlight", highlight, 1, count + 1, valid=f"a reference number, 1..{count}")
    figure, ax = figure_and_axes(ax)
    _draw_grid_headers(ax, grid)
    by_place = {(cell.row, cell.col): cell for cell in grid.cells}
    for row in range(len(grid.rows)):
        for col in range(len(grid.cols)):
            cell = by_place.get((row, col))
            emphasised = cell is not None and highlight is not None and cell.number == highlight
            _draw_cell(ax, row, col, cell, emphasised)
    handles: list[Patch | Line2D] = [*legend_handles(_cell_style(c) for c in grid.cells)]
    if grid.stop is not None:
        (marker,) = ax.plot(
            [grid.stop.col + 0.8],
            [grid.stop.row + 0.25],
            marker=STOP_MARKER,
            markersize=20,
            color=BLACK,
            markeredgecolor="white",
            linestyle="none",
            label=f"walk stopped: {grid.stop.reason}",
        )
        handles.append(marker)
    if grid.note:
        ax.text(
            len(grid.cols) / 2,
            len(grid.rows) / 2,
            grid.note,
            ha="center",
            va="center",
            fontsize=16,
            bbox={**_TEXT_BOX, "edgecolor": BLACK},
        )
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=FONT)
    ax.set_xlim(-1.6, len(grid.cols) + 0.1)
    ax.set_ylim(len(grid.rows) + 0.1, -1.0)
    ax.set_axis_off()
    ax.set_title(_grid_title(grid, count), fontsize=12)
    return figure


def _grid_title(grid: WalkGrid, count: int) -> str:
    n = len(grid.rows) - 1
    if grid.two_dimensional:
        m = len(grid.cols) - 1
        return f"{n}-level guest walk under {m}-level EPT: {references(count)}"
    return f"{n}-level one-dimensional walk: {references(count)}"


def _draw_grid_headers(ax: Axes, grid: WalkGrid) -> None:
    """Row and column headers in their level's colour and hatch (the data row and the
    guest-entry column are plain)."""
    for row, (name, level) in enumerate(grid.rows):
        _header(ax, (-1.55, row + 0.04), (1.5, 0.92), name, level)
    for col, (name, level) in enumerate(grid.cols):
        _header(ax, (col + 0.04, -0.95), (0.92, 0.9), name.replace(" ", "\n", 1), level)


def _header(
    ax: Axes, corner: tuple[float, float], size: tuple[float, float], text: str, level: int | None
) -> None:
    style = LEVEL_STYLES[level] if level is not None else PLAIN_STYLE
    ax.add_patch(
        Rectangle(corner, *size, facecolor=style.colour, hatch=style.hatch, edgecolor=BLACK)
    )
    centre = (corner[0] + size[0] / 2, corner[1] + size[1] / 2)
    ax.text(*centre, text, ha="center", va="center", fontsize=FONT, bbox=_TEXT_BOX)


def _draw_cell(ax: Axes, row: int, col: int, cell: GridCell | None, emphasised: bool) -> None:
    style = _cell_style(cell)
    ax.add_patch(
        Rectangle(
            (col + 0.04, row + 0.04),
            0.92,
            0.92,
            facecolor=style.face,
            hatch=style.hatch,
            edgecolor=BLACK if emphasised else "#555555",
            linewidth=4.5 if emphasised else 1.0,
            linestyle=style.linestyle,
        )
    )
    if cell is not None and cell.number is not None:
        ax.text(
            col + 0.5,
            row + 0.4,
            str(cell.number),
            ha="center",
            va="center",
            fontsize=14,
            fontweight="bold",
            bbox=_TEXT_BOX,
        )
    if style.tag:
        y = row + 0.78 if cell is not None and cell.number is not None else row + 0.5
        ax.text(col + 0.5, y, style.tag, ha="center", va="center", fontsize=FONT, bbox=_TEXT_BOX)


def plot_timeline(trace: Trace, *, ax: Axes | None = None) -> Figure:
    """How one access was handled, event by event: hardware, KVM and the host kernel in
    three lanes, each kind of event with its own marker shape and a label (the exit's name,
    KVM's function), from the first walk to the data access (vmx.c `handle_ept_violation`
    -> mmu.c `kvm_tdp_page_fault` -> `hva_to_pfn` -> mm `handle_mm_fault`)."""
    events = trace.events
    figure, ax = figure_and_axes(ax, (max(FIGSIZE[0], 0.25 * len(events) + 3), 7.0))
    lanes = [-EVENT_KINDS[type(e)][0] for e in events]
    ax.plot(range(len(events)), lanes, color=GREY, linewidth=1, zorder=0)
    for kind, (lane, marker, name) in EVENT_KINDS.items():
        xs = [x for x, e in enumerate(events) if type(e) is kind]
        if xs:
            ax.plot(
                xs,
                [-lane] * len(xs),
                marker=marker,
                markersize=11,
                color=LANE_COLOURS[lane],
                markeredgecolor=BLACK,
                linestyle="none",
                label=name,
            )
    for x, event in enumerate(events):
        ax.annotate(
            event_label(event),
            (x, lanes[x]),
            xytext=(0, 9),
            textcoords="offset points",
            rotation=90,
            ha="center",
            va="bottom",
            fontsize=FONT,
        )
    ax.set_yticks([0, -1, -2], LANES, fontsize=FONT)
    ax.set_ylim(-2.4, 2.2)
    ax.set_xlim(-0.7, max(len(events), 1) - 0.3)
    ax.set_xlabel("events in order", fontsize=FONT)
    ax.tick_params(axis="x", labelsize=FONT)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=FONT)
    ax.set_title("How the access was handled", fontsize=12)
    return figure


BOX = 0.36  # half the width of a region's box, in columns


def plot_address_map(machine: Machine, result: AccessResult, *, ax: Axes | None = None) -> Figure:
    """The four address spaces side by side (GVA, GPA, HVA, HPA) with their regions, and
    this access's route through them: the hardware's EPT shortcut GPA -> HPA (or the shadow
    tables' GVA -> HPA) next to KVM's software route GPA -> memslot -> HVA -> host page tables
    -> HPA. Regions are stacked one per row in address order, not to scale: the spaces'
    addresses differ by many orders of magnitude."""
    points = access_addresses(result)
    holes = {"GVA": "not mapped", "GPA": "no memslot: MMIO", "HVA": "no VMA", "HPA": "frame"}
    columns = {
        "GVA": guest_mappings(machine),
        "GPA": memslot_regions(machine),
        "HVA": [Region(v.start, v.end, v.name) for v in machine.vmm.vmas],
        "HPA": frames_touched(result.trace),
    }
    figure, ax = figure_and_axes(ax, (11.0, 6.0))
    shown = {
        space: _visible(regions, [points[space]] if space in points else [], holes[space])
        for space, regions in columns.items()
    }
    anchors: dict[str, float] = {}
    for x, space in enumerate(SPACES):
        _draw_column(ax, x, space, shown[space], points.get(space))
        anchors.update(_anchor(space, shown[space], points.get(space)))
    handles = []
    for source, target, dimension, label in EPT_ROUTES if machine.vm.tdp else SHADOW_ROUTES:
        if source in anchors and target in anchors:
            handles.append(_draw_route(ax, source, target, anchors, shown, dimension, label))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0), ncol=2, fontsize=FONT)
    depth = max(len(regions) for regions in shown.values())
    ax.set_xlim(-0.5, len(SPACES) - 0.5)
    ax.set_ylim(depth + 1.2, -1.0)
    ax.set_axis_off()
    ax.set_title("One access through the four address spaces (regions not to scale)", fontsize=12)
    return figure


def _draw_column(ax: Axes, x: int, space: str, regions: list[Region], point: int | None) -> None:
    address = "-" if point is None else f"{point:#x}"
    ax.text(x, -0.5, f"{space}\n{address}", ha="center", va="center", fontsize=12)
    for row, region in enumerate(regions):
        touched = point is not None and region.contains(point)
        ax.add_patch(
            Rectangle(
                (x - BOX, row + 0.08),
                2 * BOX,
                0.84,
                facecolor="#F2F2F2" if touched else "white",
                edgecolor=BLACK,
                linewidth=2.0 if touched else 1.0,
            )
        )
        ax.text(
            x,
            row + 0.5,
            f"{region.name}\n{region.start:#x} +{size_text(region.end - region.start)}",
            ha="center",
            va="center",
            fontsize=FONT,
        )


def _anchor(space: str, regions: list[Region], point: int | None) -> dict[str, float]:
    """The height of the access's address in its region: its fraction of the region."""
    for row, region in enumerate(regions):
        if point is not None and region.contains(point):
            fraction = (point - region.start) / (region.end - region.start)
            return {space: row + 0.2 + 0.6 * fraction}  # clear of the box's edges
    return {}


def _draw_route(
    ax: Axes,
    source: str,
    target: str,
    anchors: dict[str, float],
    shown: dict[str, list[Region]],
    dimension: str,
    label: str,
) -> Line2D:
    """An arrow between adjacent columns, or one that runs under the columns it skips, so
    that the shortcut and the software route stay apart."""
    style = DIMENSION_STYLES[dimension]
    x0, x1 = SPACES.index(source), SPACES.index(target)
    y0, y1 = anchors[source], anchors[target]
    vertices = [(x0 + BOX, y0)]
    if x1 - x0 > 1:
        lane = max(len(shown[SPACES[x]]) for x in range(x0 + 1, x1)) + 0.45
        vertices += [(x0 + 0.5, lane), (x1 - 0.5, lane)]
        ax.text((x0 + x1) / 2, lane, label, ha="center", va="bottom", fontsize=FONT)
    else:
        ax.text((x0 + x1) / 2, (y0 + y1) / 2, label, ha="center", va="bottom", fontsize=FONT)
    vertices.append((x1 - BOX, y1))
    ax.add_patch(
        FancyArrowPatch(
            path=Path(vertices),
            arrowstyle="-|>",
            mutation_scale=18,
            color=style.colour,
            linestyle=style.linestyle,
            linewidth=2.5,
            label=label,
        )
    )
    return Line2D(
        [], [], color=style.colour, linestyle=style.linestyle, linewidth=2.5, label=style.label
    )
