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
from dataclasses import replace
from itertools import pairwise
from typing import TYPE_CHECKING, Any

from matplotlib.axes import Axes
from matplotlib.backend_bases import FigureCanvasBase
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import FancyArrowPatch, Patch, Rectangle
from matplotlib.path import Path
from matplotlib.text import Text

from twodwalk.engine.formats import nested_tree
from twodwalk.engine.kvm.run import MmioExit
from twodwalk.engine.trace import Trace
from twodwalk.engine.units import PAGE_SIZE, size_text
from twodwalk.engine.walker import WalkRecord
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
    TimelineRow,
    TwoTrees,
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
    nested_trees,
    references,
    table_name,
    timeline_rows,
    two_trees,
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
    from twodwalk.engine.nested import NestedMachine
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
    "TwoTrees",
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
    "plot_nested_trees",
    "plot_references",
    "plot_timeline",
    "plot_two_trees",
    "plot_walk_grid",
    "references",
    "table_name",
    "timeline_rows",
    "two_trees",
    "walk_grid",
]

_TEXT_BOX = {"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.85}


class _ReleasingCanvas(FigureCanvasBase):
    """The canvas of every figure twodwalk makes. matplotlib's `Text.draw` keeps the
    renderer it drew with (`Text._renderer`), and with it the whole pixel buffer, for as long
    as the figure lives; a notebook keeps every figure it displayed in its output history,
    so a 20 x 13 inch graph would hold 17 MB after it was shown. Printing through this canvas
    lets the buffer go: a text that is measured again gets a fresh renderer."""

    def print_figure(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().print_figure(*args, **kwargs)
        finally:
            for text in self.figure.findobj(Text):
                text._renderer = None  # type: ignore[attr-defined]


def new_figure(figsize: tuple[float, float]) -> Figure:
    """A figure with constrained layout on twodwalk's canvas (not pyplot's)."""
    figure = Figure(figsize=figsize, layout="constrained")
    _ReleasingCanvas(figure)
    return figure


def figure_and_axes(ax: Axes | None, figsize: tuple[float, float] = FIGSIZE) -> tuple[Figure, Axes]:
    """The given Axes and its Figure, or a new Figure (never pyplot's current one)."""
    if ax is not None:
        figure = ax.get_figure()
        assert isinstance(figure, Figure)
        return figure, ax
    figure = new_figure(figsize)
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
    """What each run paid for translation, per access: memory references stacked by
    dimension (guest, EPT, shadow or native entries, each with its colour and hatch) and,
    in a panel below, VM exits per 1,000 accesses: shadow paging walks one dimension but
    pays in exits, and a chart of references alone would hide that. On a given `ax`, only
    the references, with the exits written under each run's name."""
    exits_ax: Axes | None = None
    height = 2.4 + 0.55 * len(results)
    if ax is None:
        figure = new_figure((FIGSIZE[0] + 2, height))
        left, exits_ax = figure.subplots(1, 2, sharey=True, width_ratios=(3, 2))
    else:
        figure, left = figure_and_axes(ax)
    names = [_run_label(r, exits=exits_ax is None) for r in results]
    totals = _stacked_references(left, names, [_per_access(r) for r in results], _trees(results))
    left.set_xlim(0, max([*totals, 0.1]) * 1.25)
    left.set_xlabel("memory references per access", fontsize=FONT)
    left.set_title("Memory references for translation")
    _legend_below(left)
    if exits_ax is not None:
        exits = [1000 * sum(r.exits.values()) / max(r.accesses, 1) for r in results]
        bars = exits_ax.barh(names, exits, color=BLACK, hatch="xx", edgecolor="white")
        exits_ax.bar_label(bars, fmt="%.1f", fontsize=FONT, padding=3)
        exits_ax.set_xlim(0, max([*exits, 1.0]) * 1.35)
        exits_ax.set_xlabel("VM exits per 1,000 accesses", fontsize=FONT)
        exits_ax.set_title("and in VM exits")
        exits_ax.tick_params(axis="both", labelsize=FONT)
    left.tick_params(axis="both", labelsize=FONT)
    left.invert_yaxis()  # the first run on top
    return figure


def plot_hit_rates(results: Sequence[WorkloadResult], ax: Axes | None = None) -> Figure:
    """How often the TLB answered and what each miss then cost: memory references per TLB
    miss, stacked by dimension, with each run's TLB hit rate under its name (one axis: the
    hit rate is a label, not a second scale)."""
    figure, ax = figure_and_axes(ax, (FIGSIZE[0], 2.4 + 0.55 * len(results)))
    names = [_run_label(r, exits=False) for r in results]
    totals = _stacked_references(ax, names, [_per_miss(r) for r in results], _trees(results))
    ax.set_xlim(0, max([*totals, 0.1]) * 1.25)
    ax.set_xlabel("memory references per TLB miss", fontsize=FONT)
    ax.set_title("TLB hits, and what each miss cost")
    _legend_below(ax)
    ax.tick_params(axis="both", labelsize=FONT)
    ax.invert_yaxis()
    return figure


def _legend_below(ax: Axes) -> None:
    """The legend under the figure, clear of every bar and label (when there is anything
    to name: a run with no reference at all draws no bar)."""
    handles, labels = ax.get_legend_handles_labels()
    figure = ax.get_figure()
    if handles and isinstance(figure, Figure):
        figure.legend(handles, labels, fontsize=FONT, loc="outside lower center", ncol=3)


def _per_access(result: WorkloadResult) -> dict[str, float]:
    return {d: n / max(result.accesses, 1) for d, n in result.references.items()}


def _per_miss(result: WorkloadResult) -> dict[str, float]:
    misses = max(result.accesses - result.tlb_hits, 1)
    return {d: n / misses for d, n in result.references.items()}


def _run_label(result: WorkloadResult, *, exits: bool) -> str:
    """A run's name with its TLB hit rate (and its VM exits, when no panel shows them)."""
    label = f"{result.name}: TLB hits {result.tlb_hit_rate:.0%}"
    if exits:
        label += f", {1000 * sum(result.exits.values()) / max(result.accesses, 1):.1f} exits/1k"
    return label


def _trees(results: Sequence[WorkloadResult]) -> str:
    """How the second dimension's references are named in a legend: "EPT", "NPT", or
    "EPT/NPT" when runs of both vendors are compared."""
    return "/".join(sorted({r.nested_tree for r in results if r.references.get("ept")})) or "EPT"


def _stacked_references(
    ax: Axes, names: list[str], per_run: list[dict[str, float]], tree: str = "EPT"
) -> list[float]:
    """Horizontal bars, one per run, stacked by hardware dimension, each total written at
    its end (a zero bar still gets its "0.00", so no run is invisible); returns the totals."""
    bottoms = [0.0] * len(names)
    for dimension in HARDWARE_DIMENSIONS:
        heights = [run.get(dimension, 0.0) for run in per_run]
        if not any(heights):
            continue
        style = DIMENSION_STYLES[dimension]
        label = f"{_entry_kind(dimension, tree)} references"
        ax.barh(
            names, heights, left=bottoms, color=style.colour, hatch=style.hatch,
            edgecolor=BLACK, label=label,
        )  # fmt: skip
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    for x, total in enumerate(bottoms):
        ax.annotate(
            f"{total:.2f}", (total, x), xytext=(3, 0), textcoords="offset points",
            ha="left", va="center", fontsize=FONT,
        )  # fmt: skip
    return bottoms


def plot_address_fields(
    address: int,
    *,
    levels: int = 4,
    space: str = "GVA",
    page_size: int = PAGE_SIZE,
    ax: Axes | None = None,
) -> Figure:
    """An address as the walk reads it, as SDM Vol 3A figures 4-8 to 4-11 draw it: a box per
    field, as wide as its bits (the level's grey and hatch), its bits in binary and its
    value under it; and below, the chain the walk follows: the root register (CR3, or the
    EPTP for a GPA) names the top table, each index picks an entry, and each entry names the
    next table, down to the page the offset lands in."""
    fields = address_fields(address, levels=levels, space=space, page_size=page_size)
    figure, ax = figure_and_axes(ax, (FIGSIZE[0] + 1.5, 5.2))
    for f in fields:
        _draw_field(ax, f)
    _draw_chain(ax, fields, "EPTP" if space == "GPA" else "CR3")
    ax.legend(
        handles=[
            Line2D([], [], color="#777777", linestyle=(0, (2, 2)), label="index picks entry"),
            Line2D([], [], color=BLACK, label="the entry (or the root) names the next table"),
        ],
        loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, fontsize=FONT,
    )  # fmt: skip
    ax.set_xlim(-0.5, 64.5)
    ax.set_ylim(4.3, -0.2)
    ax.set_axis_off()
    walk = "EPT" if space == "GPA" else "paging"
    ax.set_title(
        f"{space} {address:#x}: {levels}-level {walk}, {size_text(page_size)} page", fontsize=12
    )
    return figure


def _draw_field(ax: Axes, f: AddressField) -> None:
    """One field: its box with its name and bits, then its bits in binary and its value."""
    x, width = 63 - f.high, f.high - f.low + 1
    ax.add_patch(
        Rectangle(
            (x, 0), width, 1, facecolor=f.style.colour, hatch=f.style.hatch, edgecolor=BLACK,
            linewidth=1.5, label=f.name,
        )
    )  # fmt: skip
    name = f.name.replace(" ", "\n", 1) if width < 12 and " " in f.name else f.name
    ax.text(x + width / 2, 0.5, f"{name}\n{f.high}:{f.low}", ha="center", va="center",
            fontsize=FONT, bbox=_TEXT_BOX)  # fmt: skip
    ax.text(x + width / 2, 1.25, format(f.value, f"0{width}b"), ha="center", va="center",
            fontsize=FONT, family="monospace")  # fmt: skip
    ax.text(x + width / 2, 1.65, f.value_text, ha="center", va="center", fontsize=FONT)


def _draw_chain(ax: Axes, fields: list[AddressField], root: str) -> None:
    """The root register, a box per table under its index field, the page under the offset;
    an arrow from each to the next, labelled with the entry the index picks."""
    x_root = (63 - fields[0].high + 64 - fields[0].low) / 2
    boxes = [(x_root, root)]
    for f in fields[1:]:
        centre = (63 - f.high + 64 - f.low) / 2
        boxes.append((centre, f"{f.name}\ntable" if f.index else "the page"))
    frame = {"boxstyle": "square,pad=0.4", "facecolor": "white", "edgecolor": BLACK}
    for x, text in boxes:
        ax.text(x, 3.0, text, ha="center", va="center", fontsize=FONT, bbox=frame)
    for (x0, _), (x1, _) in pairwise(boxes):
        ax.add_patch(
            FancyArrowPatch(
                (x0 + 2.6, 3.0), (x1 - 2.6, 3.0), arrowstyle="-|>", mutation_scale=12, color=BLACK
            )
        )
    for f in fields[1:]:
        if f.index:
            centre = (63 - f.high + 64 - f.low) / 2
            ax.add_patch(
                FancyArrowPatch((centre, 1.85), (centre, 2.55), arrowstyle="-|>",
                                mutation_scale=10, color="#777777", linestyle=(0, (2, 2)))
            )  # fmt: skip
            ax.text(centre, 3.75, f"entry {f.value}", ha="center", va="center", fontsize=FONT)


def _memory_style(dimension: str, tree: str = "EPT") -> Style:
    """A memory reference's cell: its dimension's colour and hatch (no text beyond its
    number: every numbered cell is a memory reference); the second dimension is named as
    the vendor names it (`tree`: EPT or NPT)."""
    style = DIMENSION_STYLES[dimension]
    label = f"memory reference: {_entry_kind(dimension, tree)}"
    return Style(style.colour, style.hatch, "solid", label, alpha=0.8)


_ENTRY_KIND = {"guest": "guest entry", "ept": "EPT entry", "native": "shadow or native entry"}


def _entry_kind(dimension: str, tree: str = "EPT") -> str:
    """What an entry of a dimension is called: "EPT entry", or "NPT entry" on AMD."""
    return f"{tree} entry" if dimension == "ept" else _ENTRY_KIND[dimension]


_ORDER = Style("#555555", label="the order the hardware reads in")


def _cell_style(cell: GridCell | None, tree: str = "EPT") -> Style:
    if cell is None:
        return EMPTY_CELL
    if cell.dimension is not None:
        return _memory_style(cell.dimension, tree)
    return CELL_STYLES[cell.source]


def plot_walk_grid(
    trace: Trace,
    *,
    attempt: int = -1,
    highlight: int | None = None,
    ept_levels: int | None = None,
    ax: Axes | None = None,
) -> Figure:
    """The walk grid of one attempt (see `walk_grid`), drawn as Bhargava et al. draw the 2D
    walk (ASPLOS 2008): rows are the guest tables being located (gL4 at gCR3 ... and the
    data's gPA), columns the EPT levels nL4..nL1 that translate each one, then the guest
    entry. Numbered cells are memory references, joined by arrows in hardware order; a
    cache's cells are one span with its tag; a marker shows where the walk stopped.
    `highlight=n` draws reference n with a thick edge (for stepping through a walk)."""
    grid = walk_grid(trace, attempt, ept_levels=ept_levels)
    count = sum(cell.number is not None for cell in grid.cells)
    if highlight is not None:
        check_int("highlight", highlight, 1, count + 1, valid=f"a reference number, 1..{count}")
    given = ax is not None
    width = max(7.0, 1.6 + 0.95 * len(grid.cols))
    figure, ax = figure_and_axes(ax, (width, 2.6 + 0.95 * len(grid.rows)))
    _draw_grid_headers(ax, grid)
    by_place = {(cell.row, cell.col): cell for cell in grid.cells}
    styles: list[Style] = []
    for row in range(len(grid.rows)):
        for first, last, cell in _row_spans(by_place, row, len(grid.cols)):
            emphasised = cell is not None and highlight is not None and cell.number == highlight
            styles.append(_draw_span(ax, row, first, last, cell, emphasised, grid.tree))
    numbered = sorted((c for c in grid.cells if c.number is not None), key=lambda c: c.number or 0)
    for before, after in pairwise(numbered):
        _draw_order_arrow(ax, before, after)
    handles: list[Patch | Line2D] = [*legend_handles(styles)]
    if len(numbered) > 1:
        handles.append(Line2D([], [], color=_ORDER.colour, marker=">", label=_ORDER.label))
    if grid.stop is not None:
        (marker,) = ax.plot(
            [grid.stop.col + 0.84],
            [grid.stop.row + 0.18],
            marker=STOP_MARKER,
            markersize=16,
            color=BLACK,
            markeredgecolor="white",
            linestyle="none",
            label=f"walk stopped: {grid.stop.reason}",
        )
        handles.append(marker)
    if handles:
        ax.legend(
            handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), fontsize=FONT, ncol=1
        )
    if not given:  # room for the title, the grid and the legend below it
        figure.set_size_inches(width, 1.3 + 0.95 * (len(grid.rows) + 1) + 0.3 * len(handles))
    ax.set_xlim(-1.6, len(grid.cols) + 0.05)
    ax.set_ylim(len(grid.rows) + 0.05, -1.0)
    ax.set_aspect("equal")
    ax.set_axis_off()
    ax.set_title(_grid_title(grid, count), fontsize=12)
    return figure


def _grid_title(grid: WalkGrid, count: int) -> str:
    """What was walked and what it cost; for an access with no walk, why (a TLB hit)."""
    n = len(grid.rows) - 1
    cost = grid.note or references(count)
    if grid.two_dimensional:
        m = len(grid.cols) - 1
        return f"{n}-level guest walk under {m}-level {grid.tree}: {cost}"
    return f"{n}-level one-dimensional walk: {cost}"


def _draw_grid_headers(ax: Axes, grid: WalkGrid) -> None:
    """Rows: the table each row locates and where its address comes from (gL4 at gCR3, gL3
    at the gL4 entry, ..., the data at the gL1 entry); columns: the EPT level (nL4 .. nL1)
    and its entry, then the guest entry. Plain boxes: levels are labels, not colours."""
    n, guest = len(grid.rows) - 1, "g" if grid.two_dimensional else ""
    for row in range(n + 1):
        level = n - row
        what = f"{guest}L{level} table" if level else ("data (gPA)" if guest else "data")
        above = level + 1 if level else grid.leaf_level  # the data: the leaf's entry
        source = f"{guest}CR3" if row == 0 else f"{guest}L{above} entry"
        _header(ax, (-1.55, row + 0.04), (1.5, 0.92), f"{what}\nat {source}")
    for col, (name, ept_level) in enumerate(grid.cols):
        if ept_level is None:
            text = "guest\nentry" if guest else "entry"
        else:
            text = f"nL{ept_level}\n{name.removeprefix('nested ')}"  # nL already says nested
        _header(ax, (col + 0.04, -0.95), (0.92, 0.9), text)


def _header(ax: Axes, corner: tuple[float, float], size: tuple[float, float], text: str) -> None:
    ax.add_patch(Rectangle(corner, *size, facecolor="white", edgecolor=BLACK))
    centre = (corner[0] + size[0] / 2, corner[1] + size[1] / 2)
    ax.text(*centre, text, ha="center", va="center", fontsize=FONT)


def _row_spans(
    by_place: dict[tuple[int, int], GridCell], row: int, cols: int
) -> list[tuple[int, int, GridCell | None]]:
    """A row's cells left to right, with neighbouring cells one cache served merged into one
    span (first column, last column, the cell): a cache hit replaces a run of reads."""
    spans: list[tuple[int, int, GridCell | None]] = []
    for col in range(cols):
        cell = by_place.get((row, col))
        if spans and cell is not None and cell.number is None and cell.source != "data":
            first, _, previous = spans[-1]
            if previous is not None and previous.number is None and previous.source == cell.source:
                spans[-1] = (first, col, previous)
                continue
        spans.append((col, col, cell))
    return spans


def _draw_span(
    ax: Axes,
    row: int,
    first: int,
    last: int,
    cell: GridCell | None,
    emphasised: bool,
    tree: str = "EPT",
) -> Style:
    style = _cell_style(cell, tree)
    ax.add_patch(
        Rectangle(
            (first + 0.04, row + 0.04),
            last - first + 0.92,
            0.92,
            facecolor=style.face,
            hatch=style.hatch,
            edgecolor=BLACK if emphasised else "#555555",
            linewidth=4.5 if emphasised else 1.0,
            linestyle=style.linestyle,
        )
    )
    centre = (first + last + 1) / 2
    if cell is not None and cell.number is not None:
        ax.text(
            centre, row + 0.5, str(cell.number), ha="center", va="center", fontsize=14,
            fontweight="bold", bbox=_TEXT_BOX,
        )  # fmt: skip
    elif style.tag:
        ax.text(
            centre, row + 0.5, style.tag, ha="center", va="center", fontsize=FONT, bbox=_TEXT_BOX
        )
    return style


def _draw_order_arrow(ax: Axes, before: GridCell, after: GridCell) -> None:
    """Reference k to reference k + 1: along a row, or down the gap below the row to the
    next row's first reference."""
    if before.row == after.row:
        points = [(before.col + 0.96, before.row + 0.5), (after.col + 0.04, after.row + 0.5)]
    else:
        gap = before.row + 1.0
        points = [
            (before.col + 0.5, before.row + 0.96),
            (before.col + 0.5, gap),
            (after.col + 0.5, gap),
            (after.col + 0.5, after.row + 0.04),
        ]
    codes = [Path.MOVETO] + [Path.LINETO] * (len(points) - 1)
    ax.add_patch(
        FancyArrowPatch(
            path=Path(points, codes), arrowstyle="-|>", mutation_scale=10, color=_ORDER.colour,
            linewidth=1.0, zorder=3,
        )
    )  # fmt: skip


def plot_timeline(access: Trace | AccessResult, *, ax: Axes | None = None) -> Figure:
    """How one access was handled, as a swimlane sequence diagram: time runs down, one row
    per event, in the lane of whoever acted (the guest and the hardware, KVM, the host
    kernel, the VMM), each kind of event with its own marker shape and its words beside it.
    A KVM call into the host kernel brackets what it did there (`hva_to_pfn` ->
    get_user_pages -> `handle_mm_fault`); an exit to the VMM ends in the VMM's lane (given
    the `AccessResult`, not only its trace)."""
    if isinstance(access, Trace):
        rows = timeline_rows(access)
    else:
        rows = timeline_rows(access.trace, access.exit)
    figure, ax = figure_and_axes(ax, (2.7 * len(LANES), 1.6 + 0.34 * max(len(rows), 1)))
    _draw_lanes(ax, len(rows))
    for i, (before, after) in enumerate(pairwise(rows)):
        _draw_handover(ax, i, before.lane, after.lane)
    shapes = {name: marker for _, marker, name in EVENT_KINDS.values()} | {"exit": "s"}
    shapes["NPT walk (data GPA)"] = shapes["EPT walk (data GPA)"]  # AMD's name, same shape
    for i, row in enumerate(rows):
        ax.plot(
            [row.lane + 0.08], [i], marker=shapes[row.kind], markersize=9,
            color=_event_colour(row), markeredgecolor=BLACK,
            linestyle="none", label=row.kind, zorder=3,
        )  # fmt: skip
        ax.text(row.lane + 0.17, i, row.label, ha="left", va="center", fontsize=FONT, zorder=3)
        if row.inside:
            _draw_bracket(ax, row.lane, i, i + row.inside)
    ax.set_xlim(0, len(LANES))
    ax.set_ylim(len(rows) - 0.4, -1.6)
    ax.set_axis_off()
    ax.set_title("How the access was handled (time runs down)", fontsize=12)
    handles, labels = ax.get_legend_handles_labels()
    named = dict(zip(labels, handles, strict=True))
    figure.legend(
        list(named.values()), list(named), loc="outside lower center", ncol=4, fontsize=FONT
    )
    return figure


# An event's marker has the colour of what it touched, as in every figure: the guest's
# tables, EPT, a cache, KVM's software, the host's tables; exits, entries and the data
# access touch no table and stay white (their shape says what they are).
_EVENT_COLOURS = {
    "guest walk": DIMENSION_STYLES["guest"].colour,
    "EPT walk (data GPA)": DIMENSION_STYLES["ept"].colour,
    "NPT walk (data GPA)": DIMENSION_STYLES["ept"].colour,  # the same dimension, on AMD
    "one-dimensional walk": DIMENSION_STYLES["native"].colour,
    "KVM function": BLACK,
    "KVM's walk of the guest tables": DIMENSION_STYLES["kvm-walk"].colour,
    "SPTE write": BLACK,
    "host page-table walk": DIMENSION_STYLES["host"].colour,
    "host page fault": DIMENSION_STYLES["host"].colour,
}


def _event_colour(row: TimelineRow) -> str:
    """A cache hit in its cache's colour; anything else as `_EVENT_COLOURS` says."""
    if row.kind == "cache hit":
        cache = next((c for c in CELL_STYLES if row.label.startswith(c)), PSC)
        return CELL_STYLES[cache].colour
    return _EVENT_COLOURS.get(row.kind, "white")


def _draw_lanes(ax: Axes, rows: int) -> None:
    """A header per lane and a thin rule between lanes."""
    for lane, name in enumerate(LANES):
        ax.text(lane + 0.5, -1.0, name, ha="center", va="center", fontsize=FONT, weight="bold")
        if lane:
            ax.plot([lane, lane], [-1.4, rows - 0.5], color=GREY, linewidth=0.8, zorder=0)


def _draw_handover(ax: Axes, row: int, lane: int, next_lane: int) -> None:
    """From one event to the next: down its lane, across (between the rows' words, never
    through them), and down to the next event."""
    x0, x1 = lane + 0.08, next_lane + 0.08
    xs, ys = ([x0, x1], [row, row + 1]) if lane == next_lane else (
        [x0, x0, x1, x1], [row, row + 0.5, row + 0.5, row + 1]
    )  # fmt: skip
    ax.plot(xs, ys, color="#777777", linewidth=1.0, zorder=1)


def _draw_bracket(ax: Axes, lane: int, first: int, last: int) -> None:
    """The span of rows a call made (in the lanes it called into), drawn in its own lane."""
    x = lane + 0.03
    ax.plot(
        [x + 0.03, x, x, x + 0.03], [first, first, last + 0.3, last + 0.3], color=BLACK,
        linewidth=1.5, zorder=2,
    )  # fmt: skip


BOX = 0.44  # half the width of a region's box, in columns
_CAPTIONS = {
    "GVA": "the guest's mappings",
    "GPA": "KVM's memslots",
    "HVA": "the VMM's memory",
    "HPA": "frames this access used",
}
_MEETING = Style(BLACK, label="where the two routes meet")
_VMM_EXIT = Style(BLACK, "", (0, (6, 2, 1, 2)), "exit to the VMM (KVM_EXIT_MMIO)")


def plot_address_map(machine: Machine, result: AccessResult, *, ax: Axes | None = None) -> Figure:
    """The four address spaces side by side (GVA, GPA, HVA, HPA) with their regions, and
    this access's route through them: the hardware's EPT shortcut GPA -> HPA (or the shadow
    tables' GVA -> HPA) next to KVM's software route GPA -> memslot -> HVA -> host page tables
    -> HPA, and the frame where they meet; an access to a GPA in no memslot ends in an exit
    to the VMM. Regions are stacked one per row in address order, not to scale: the spaces'
    addresses differ by many orders of magnitude. The legend names every route and mark."""
    points = access_addresses(result)
    holes = {"GVA": "not mapped", "GPA": "no memslot: MMIO", "HVA": "no VMA", "HPA": "frame"}
    columns = {
        "GVA": guest_mappings(machine),
        "GPA": memslot_regions(machine),
        "HVA": [Region(v.start, v.end, v.name) for v in machine.vmm.vmas],
        "HPA": frames_touched(result.trace),
    }
    figure, ax = figure_and_axes(ax, (12.0, 6.5))
    shown = {
        space: _visible(regions, [points[space]] if space in points else [], holes[space])
        for space, regions in columns.items()
    }
    anchors: dict[str, float] = {}
    for x, space in enumerate(SPACES):
        _draw_column(ax, x, space, shown[space], points.get(space))
        anchors.update(_anchor(space, shown[space], points.get(space)))
    handles: list[Line2D] = []
    for source, target, dimension, label in EPT_ROUTES if machine.vm.tdp else SHADOW_ROUTES:
        if source in anchors and target in anchors:
            handles.append(_draw_route(ax, source, target, anchors, shown, dimension, label))
    if "HPA" in anchors:
        handles.append(_mark_meeting(ax, anchors["HPA"]))
    if isinstance(result.exit, MmioExit) and "GPA" in anchors:
        handles.append(_draw_vmm_exit(ax, anchors["GPA"], len(shown["HVA"])))
    depth = max(len(regions) for regions in shown.values()) + 1
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0), ncol=2, fontsize=FONT)
    ax.set_xlim(-0.5, len(SPACES) - 0.5)
    ax.set_ylim(depth + 0.6, -1.3)
    ax.set_axis_off()
    ax.set_title("One access through the four address spaces (regions not to scale)", fontsize=12)
    return figure


def _draw_column(ax: Axes, x: int, space: str, regions: list[Region], point: int | None) -> None:
    """The space's name, the access's address in it and what the column shows; then one box
    per region: its range first (in this column's space), then what it is."""
    address = "not reached" if point is None else f"{point:#x}"
    ax.text(x, -0.75, f"{space} {address}", ha="center", va="center", fontsize=12)
    ax.text(x, -0.3, _CAPTIONS[space], ha="center", va="center", fontsize=FONT, style="italic")
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
            f"{region.start:#x} +{size_text(region.end - region.start)}\n{region.name}",
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
    that the shortcut and the software route stay apart. The legend names it: a label on
    the arrow would sit on the boxes' edges."""
    style = DIMENSION_STYLES[dimension]
    x0, x1 = SPACES.index(source), SPACES.index(target)
    y0, y1 = anchors[source], anchors[target]
    vertices = [(x0 + BOX, y0)]
    if x1 - x0 > 1:
        lane = max(len(shown[SPACES[x]]) for x in range(x0 + 1, x1)) + 0.45
        vertices += [(x0 + 0.5, lane), (x1 - 0.5, lane)]
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


def _mark_meeting(ax: Axes, y: float) -> Line2D:
    """The HPA both routes reach: a star on the frame's left edge."""
    x = SPACES.index("HPA") - BOX
    (star,) = ax.plot(
        [x], [y], marker="*", markersize=18, color="white", markeredgecolor=_MEETING.colour,
        linestyle="none", label=_MEETING.label, zorder=4,
    )  # fmt: skip
    return star


def _draw_vmm_exit(ax: Axes, y: float, hva_rows: int) -> Line2D:
    """A GPA in no memslot has no HVA and no frame: KVM hands the access to the VMM, drawn
    as a box under the HVA column (the VMM's own space) and an arrow to it."""
    x = SPACES.index("HVA")
    row = hva_rows + 0.1
    ax.add_patch(
        Rectangle((x - BOX, row), 2 * BOX, 0.84, facecolor="white", edgecolor=BLACK, linewidth=2)
    )
    ax.text(x, row + 0.42, "the VMM emulates\nthe device (MMIO)", ha="center", va="center",
            fontsize=FONT)  # fmt: skip
    start = (SPACES.index("GPA") + BOX, y)
    ax.add_patch(
        FancyArrowPatch(
            path=Path([start, (x - 0.5, row + 0.42), (x - BOX, row + 0.42)]), arrowstyle="-|>",
            mutation_scale=18, color=_VMM_EXIT.colour, linestyle=_VMM_EXIT.linestyle,
            linewidth=2.5, label="KVM_EXIT_MMIO",
        )
    )  # fmt: skip
    return Line2D([], [], color=BLACK, linestyle=_VMM_EXIT.linestyle, linewidth=2.5,
                  label=_VMM_EXIT.label)  # fmt: skip


# --- two trees, one frame ----------------------------------------------------------------------

_TREE_X = {"ept": 2.5, "host": 13.5}  # the two trees' columns
_LEVEL_DY = 1.25


def plot_two_trees(machine: Machine, result: AccessResult, *, ax: Axes | None = None) -> Figure:
    """The answer to the question behind twodwalk, in one figure: the EPT's walk of the
    access's GPA (left, rooted at the EPTP) and the host kernel's walk of the HVA that backs
    it (right, rooted at the VMM's CR3), two trees of table pages in host memory with two
    roots, ending in the same frame; the memslot KVM used to build the EPT leaf from the
    host's as the bridge between the two roots; and the two leaf entries underneath, field by
    field, EPT format against IA-32e format."""
    trees = two_trees(machine, result)
    mmu = machine.vm.ept
    tree = nested_tree(mmu.fmt)  # "EPT" (Intel) or "NPT" (AMD), rooted at EPTP or nCR3
    root = f"nCR3\n{mmu.ncr3:#x}" if mmu.npt else f"EPTP\n{mmu.eptp.value:#x}"
    figure, ax = figure_and_axes(ax, (14.0, 10.0))
    leaves = {
        name: _draw_tree(ax, name, record, root)
        for name, record, root in (
            ("ept", trees.ept, root),
            ("host", trees.host, f"the VMM's CR3\n{trees.host.root:#x}"),
        )
    }
    y_frame = max(leaves.values()) + 1.3
    ax.text(
        8.0,
        y_frame,
        _frame_text(trees),
        ha="center",
        va="center",
        fontsize=12,
        bbox={"boxstyle": "round4,pad=0.5", "facecolor": "#DDDDDD", "edgecolor": BLACK},
    )
    for name, y_leaf in leaves.items():
        _leaf_arrow(ax, name, y_leaf, y_frame)
    _draw_bridge(ax, trees)
    nested = replace(DIMENSION_STYLES["ept"], label=f"{tree} (hardware)")
    handles: list[Line2D | Patch] = [
        Line2D([], [], color=s.colour, linestyle=s.linestyle, linewidth=2.5, label=s.label)
        for s in (nested, DIMENSION_STYLES["host"], DIMENSION_STYLES["memslot"])
    ]
    handles += [
        Patch(
            facecolor=replace(DIMENSION_STYLES[name], alpha=0.25).face, edgecolor=BLACK, label=label
        )
        for name, label in (("ept", f"{tree} table page"), ("host", "host page-table page"))
    ]
    handles.append(Patch(facecolor="#DDDDDD", edgecolor=BLACK, label="the frame both name"))
    y_rulers = y_frame + 1.4
    nested_leaf = (
        "NPT leaf (long mode, AMD APM Vol 2 5.3)" if mmu.npt else "EPT leaf (SDM Vol 3C table 29-5)"
    )
    _draw_leaf_ruler(ax, trees.ept, y_rulers, nested_leaf)
    _draw_leaf_ruler(ax, trees.host, y_rulers + 1.9, "host leaf (IA-32e, SDM Vol 3A 4.5)")
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=FONT)
    ax.set_xlim(-0.2, 16.2)
    ax.set_ylim(y_rulers + 3.1, -1.3)
    ax.set_axis_off()
    ax.set_title(
        f"Two trees, one frame: the {tree} walk and the host's walk of the same page", fontsize=12
    )
    return figure


_NESTED_X = {"kvm-walk": 2.2, "ept": 8.0, "host": 13.8}  # EPT12, EPT02, L0's host tree


def plot_nested_trees(
    nested: NestedMachine, result: AccessResult, *, ax: Axes | None = None
) -> Figure:
    """Nested EPT in one figure: for an L2 access, L1's EPT12 (left, L1 GPAs, which L0 reads
    in software), the EPT02 that L0 built from it and the CPU walks (middle, HPAs), and the
    host's walk of the HVA behind EPT12's L1 GPA (right, L0's memslot in between): EPT02's
    leaf and the host's name the same frame, EPT12's names an L1 GPA."""
    trees = nested_trees(nested, result)
    figure, ax = figure_and_axes(ax, (14.0, 9.0))
    roots = (
        ("kvm-walk", trees.ept12, f"EPTP12 (L1's)\nL1 GPA {trees.ept12.root:#x}", "L1 GPA"),
        ("ept", trees.ept02, f"EPTP02 (L0's shadow)\nHPA {trees.ept02.root:#x}", "HPA"),
        ("host", trees.host, f"the VMM's CR3\nHPA {trees.host.root:#x}", "HPA"),
    )
    leaves = {
        name: _draw_tree(ax, name, record, root, x=_NESTED_X[name], space=space, entries=False)
        for name, record, root, space in roots
    }
    ax.text(5.1, -0.7, f"L2 GPA {trees.l2_gpa:#x}", ha="center", va="center", fontsize=12)
    ax.text(_NESTED_X["host"], -0.7, f"HVA {trees.hva:#x}", ha="center", va="center", fontsize=12)
    y_frame = max(leaves.values()) + 1.4
    ax.text(
        _NESTED_X["kvm-walk"],
        y_frame,
        f"L1 GPA {trees.l1_gpa:#x}\n-> memslot {trees.memslot.id}\n-> HVA {trees.hva:#x}",
        ha="center",
        va="center",
        fontsize=FONT,
        bbox={"boxstyle": "round,pad=0.3", "facecolor": "white", "edgecolor": BLACK},
    )
    ax.text(
        (_NESTED_X["ept"] + _NESTED_X["host"]) / 2,
        y_frame,
        f"the same frame\nHPA {trees.frame:#x}" if trees.frame is not None else "no common frame",
        ha="center",
        va="center",
        fontsize=12,
        bbox={"boxstyle": "round4,pad=0.5", "facecolor": "#DDDDDD", "edgecolor": BLACK},
    )
    frame_x = (_NESTED_X["ept"] + _NESTED_X["host"]) / 2
    for name, target_x in (
        ("kvm-walk", _NESTED_X["kvm-walk"]),
        ("ept", frame_x),
        ("host", frame_x),
    ):
        style = DIMENSION_STYLES[name]
        x = _NESTED_X[name]
        ax.add_patch(
            FancyArrowPatch(
                (x, leaves[name] + 0.4),
                (target_x + (x - target_x) * 0.3, y_frame - 0.55),
                arrowstyle="-|>",
                mutation_scale=16,
                color=style.colour,
                linestyle=style.linestyle,
                linewidth=2.5,
            )
        )
    handles: list[Line2D | Patch] = [
        Line2D([], [], color=s.colour, linestyle=s.linestyle, linewidth=2.5, label=label)
        for s, label in (
            (DIMENSION_STYLES["kvm-walk"], "EPT12: L1's EPT, read by L0 (software)"),
            (DIMENSION_STYLES["ept"], "EPT02: L0's shadow, walked by the CPU"),
            (DIMENSION_STYLES["host"], "host page tables (L0's software path)"),
        )
    ]
    handles.append(Patch(facecolor="#DDDDDD", edgecolor=BLACK, label="the frame both name"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, fontsize=FONT)
    ax.set_xlim(-0.2, 16.2)
    ax.set_ylim(y_frame + 1.2, -1.3)
    ax.set_axis_off()
    ax.set_title(
        "Three trees for one L2 page: EPT12 (L1's), EPT02 (L0's shadow), the host's", fontsize=12
    )
    return figure


def _draw_tree(
    ax: Axes,
    name: str,
    record: WalkRecord,
    root: str,
    *,
    x: float | None = None,
    space: str = "HPA",
    entries: bool = True,
) -> float:
    """A tree's path from its root down: a box per table page (its address in `space`),
    the index the walk used at each level and, with `entries`, the entry it read beside it;
    returns the leaf table's height."""
    style = DIMENSION_STYLES[name]
    x = _TREE_X[name] if x is None else x
    ax.text(
        x,
        0.4,
        root,
        ha="center",
        va="center",
        fontsize=FONT,
        bbox={"boxstyle": "round,pad=0.3", "facecolor": "white", "edgecolor": BLACK},
    )
    y = 0.4
    for step in record.steps:
        y_next = y + _LEVEL_DY
        ax.add_patch(
            FancyArrowPatch(
                (x, y + 0.35),
                (x, y_next - 0.35),
                arrowstyle="-|>",
                mutation_scale=14,
                color=style.colour,
                linestyle=style.linestyle,
                linewidth=2,
            )
        )
        table = table_name(record.format.level_name(step.level))
        ax.text(
            x,
            y_next,
            f"{table} page\n{space} {step.table:#x}"
            if entries
            else f"{table} [{step.index}]\n{space} {step.table:#x}",
            ha="center",
            va="center",
            fontsize=FONT,
            bbox={
                "boxstyle": "square,pad=0.35",
                "facecolor": replace(style, alpha=0.25).face,
                "edgecolor": BLACK,
            },
        )
        if entries:
            inward = 1.55 if x < 8.0 else -1.55  # the entries between the two trees
            ax.text(
                x + inward,
                y_next,
                f"[{step.index}] = {step.value:#018x}",
                ha="left" if inward > 0 else "right",
                va="center",
                fontsize=FONT,
                family="monospace",
            )
        y = y_next
    return y


def _frame_text(trees: TwoTrees) -> str:
    """The frame both leaves name, as its page (base and size), or that they disagree."""
    translation = trees.ept.translation
    if trees.frame is None or translation is None:
        return "the leaves disagree: no common frame"
    base = trees.frame & ~(translation.page_size - 1)
    return f"the same frame\nHPA {base:#x} ({size_text(translation.page_size)})"


def _leaf_arrow(ax: Axes, name: str, y_leaf: float, y_frame: float) -> None:
    """From a tree's leaf table (at `y_leaf`) down to the frame both leaves name."""
    style = DIMENSION_STYLES[name]
    x = _TREE_X[name]
    ax.add_patch(
        FancyArrowPatch(
            (x, y_leaf + 0.4),
            (8.0 + (x - 8.0) * 0.25, y_frame - 0.45),
            arrowstyle="-|>",
            mutation_scale=16,
            color=style.colour,
            linestyle=style.linestyle,
            linewidth=2.5,
        )
    )


def _draw_bridge(ax: Axes, trees: TwoTrees) -> None:
    """GPA -> memslot -> HVA between the two roots: how KVM finds the host's entry to copy."""
    style = DIMENSION_STYLES["memslot"]
    slot = trees.memslot
    ax.text(_TREE_X["ept"], -0.7, f"GPA {trees.gpa:#x}", ha="center", va="center", fontsize=12)
    ax.text(_TREE_X["host"], -0.7, f"HVA {trees.hva:#x}", ha="center", va="center", fontsize=12)
    ax.text(
        8.0,
        -0.7,
        f"memslot {slot.id}: GPA {slot.guest_phys_addr:#x}\n-> HVA {slot.userspace_addr:#x}",
        ha="center",
        va="center",
        fontsize=FONT,
        bbox={"boxstyle": "round,pad=0.3", "facecolor": "white", "edgecolor": BLACK},
    )
    for start, end in (((4.1, -0.7), (5.6, -0.7)), ((10.4, -0.7), (11.7, -0.7))):
        ax.add_patch(
            FancyArrowPatch(
                start,
                end,
                arrowstyle="-|>",
                mutation_scale=14,
                color=style.colour,
                linestyle=style.linestyle,
                linewidth=2,
            )
        )


def _draw_leaf_ruler(ax: Axes, record: WalkRecord, y: float, title: str) -> None:
    """A leaf entry field by field, high bits first (a wide cell for the address): the
    field's name and bits above, its value inside."""
    entry = record.steps[-1].entry
    fields = sorted(entry.fields, key=lambda f: -f.field.high)
    widths = [3.0 if f.field.is_address else 1.0 for f in fields]
    unit = 16.0 / sum(widths)
    ax.text(
        0.0,
        y - 0.75,
        f"{title}: {entry.layout.name} = {entry.value:#018x}",
        ha="left",
        va="center",
        fontsize=FONT,
        weight="bold",
    )
    x = 0.0
    for f, width in zip(fields, widths, strict=True):
        w = width * unit
        ax.add_patch(Rectangle((x, y), w, 0.7, facecolor="white", edgecolor=BLACK))
        bits = f"{f.field.high}" if f.field.high == f.field.low else f"{f.field.high}:{f.field.low}"
        ax.text(
            x + w / 2,
            y - 0.25,
            f"{f.field.name} {bits}",
            ha="center",
            va="center",
            fontsize=8 if w < 1.0 else FONT,
        )
        shown = f"{f.value:#x}" if f.field.is_address else str(f.value)
        ax.text(x + w / 2, y + 0.35, shown, ha="center", va="center", fontsize=FONT)
        x += w
