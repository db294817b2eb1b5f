"""Plots of what the engine recorded (matplotlib). Each function draws on a given Axes or a
new Figure and returns the Figure, leaving no global pyplot state behind.

Colours are the Okabe-Ito palette, safe for the common colour-vision deficiencies; meaning is
also carried by hatching, line styles, marker shapes and labels, never by colour alone. One
style per paging level (`LEVEL_STYLES`) and per dimension (`DIMENSION_STYLES`) is shared by
every plot here and by the walk graph (views/graph.py), so a level or a dimension looks the
same wherever it appears. Text is at least 10 points, for a lecture projector.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from matplotlib.axes import Axes
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import FancyArrowPatch, Patch, Rectangle
from matplotlib.path import Path
from matplotlib.typing import LineStyleType

from twodwalk.cpumodel import PAGE_SIZE, CpuModel, size_text
from twodwalk.errors import TwodwalkError, check_choice, check_int
from twodwalk.formats import EntryFormat, ept_format, ia32e_format
from twodwalk.trace import (
    PAGE_WALK_CACHE,
    CacheHit,
    DataAccess,
    EptWalk,
    Event,
    GuestWalk,
    HostPageFault,
    HostWalk,
    KvmStep,
    KvmWalk,
    NativeWalk,
    Reference,
    Retry,
    SpteWrite,
    TlbHit,
    Trace,
    VmExit,
)
from twodwalk.walker import WalkRecord
from twodwalk.workloads import WorkloadResult

if TYPE_CHECKING:
    from twodwalk.machine import Machine
    from twodwalk.processor import AccessResult

OKABE_ITO = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000")
ORANGE, SKY_BLUE, GREEN, YELLOW, BLUE, VERMILLION, PURPLE, BLACK = OKABE_ITO
GREY = "#BBBBBB"
FONT = 10  # the smallest text size: readable on a lecture projector
FIGSIZE = (9.0, 5.0)


@dataclass(frozen=True)
class Style:
    """How one category is drawn: colour, hatch, line style and label each carry the meaning;
    `tag` is the short text written inside a cell."""

    colour: str
    hatch: str = ""
    linestyle: LineStyleType = "solid"
    label: str = ""
    tag: str = ""
    alpha: float = 1.0

    @property
    def face(self) -> tuple[float, float, float, float]:
        """The fill colour with its transparency."""
        return to_rgba(self.colour, self.alpha)


# One style per paging level, the same in every space: level 4 is the PML4 of the guest, of
# the host and of EPT alike, so the address fields, the grid and the graph match.
LEVEL_STYLES = {
    5: Style(PURPLE, "oo"),
    4: Style(ORANGE, "//"),
    3: Style(SKY_BLUE, "\\\\"),
    2: Style(GREEN, ".."),
    1: Style(YELLOW, "xx"),
}
PLAIN_STYLE = Style("#FFFFFF")  # what belongs to no level: the page offset, the data row
UNUSED_BITS_STYLE = Style(GREY)

# The hardware dimensions, and KVM's software path that fills EPT in (views/graph.py too).
DIMENSION_STYLES = {
    "guest": Style(BLUE, "", "solid", "guest page tables (hardware)"),
    "ept": Style(VERMILLION, "//", "dashed", "EPT (hardware)"),
    "native": Style(PURPLE, "..", (0, (8, 2)), "shadow or native tables (hardware)"),
    "memslot": Style(BLACK, "", "dashdot", "KVM memslot lookup (software)"),
    "host": Style(GREEN, "", "dotted", "host page tables (KVM software path)"),
    "kvm-walk": Style(BLACK, "", (0, (3, 1, 1, 1, 1, 1)), "guest tables read by KVM (software)"),
    "link": Style("#777777", "", (0, (1, 3)), "CR3, EPTP or a cache: no memory reference"),
}
HARDWARE_DIMENSIONS = ("guest", "ept", "native")

# What served a cell of the walk grid besides memory (the names `TableRead.cached` uses).
GUEST_PHYSICAL = "guest-physical"
PSC = "paging-structure cache"
CELL_STYLES = {
    GUEST_PHYSICAL: Style(GREY, "++", label="GPM: guest-physical mapping, no EPT walk", tag="GPM"),
    PSC: Style(GREY, "--", label="PSC: paging-structure cache, read skipped", tag="PSC"),
    PAGE_WALK_CACHE: Style(
        GREY, "oo", label="PWC: page-walk cache (AMD-style), no memory read", tag="PWC"
    ),
    "data": Style("#FFFFFF", "", "dashed", "the data access (not a walk reference)", "data"),
}
EMPTY_CELL = Style("#FFFFFF", "", "dotted")
STOP_MARKER = "X"
_TEXT_BOX = {"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.85}
_CPU = CpuModel()


def figure_and_axes(ax: Axes | None, figsize: tuple[float, float] = FIGSIZE) -> tuple[Figure, Axes]:
    """The given Axes and its Figure, or a new Figure (never pyplot's current one)."""
    if ax is not None:
        figure = ax.get_figure()
        assert isinstance(figure, Figure)
        return figure, ax
    figure = Figure(figsize=figsize, layout="constrained")
    return figure, figure.add_subplot()


def level_names(space: str, levels: int) -> dict[int, str]:
    """Entry names per level as the SDM gives them: EPT names for a GPA, which EPT translates
    (SDM Vol 3C 29.3.2), IA-32e names for a GVA or an HVA (Vol 3A 4.5)."""
    fmt: EntryFormat = ept_format(levels, _CPU) if space == "GPA" else ia32e_format(levels, _CPU)
    return dict(fmt.level_names)


def table_name(entry_name: str) -> str:
    """The table an entry lives in: PML4E -> PML4, EPT PDE -> EPT PD."""
    return entry_name.removesuffix("E")


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


def references(count: int) -> str:
    """'1 memory reference', '24 memory references'."""
    return f"{count} memory reference{'' if count == 1 else 's'}"


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


# --- the fields of an address ------------------------------------------------------------------

PAGE_SIZES = {PAGE_SIZE: 1, 2 << 20: 2, 1 << 30: 3}  # page size -> level of its leaf entry
SPACES = ("GVA", "GPA", "HVA", "HPA")


@dataclass(frozen=True)
class AddressField:
    """One field of an address: its name, bit range, value and how it is drawn."""

    name: str
    high: int
    low: int
    value: int
    style: Style
    index: bool = False

    @property
    def value_text(self) -> str:
        """An index in hex and decimal, as a learner checks it by hand; other fields in hex."""
        return f"{self.value:#05x} = {self.value}" if self.index else f"{self.value:#x}"


def address_fields(
    address: int, *, levels: int = 4, space: str = "GVA", page_size: int = PAGE_SIZE
) -> list[AddressField]:
    """The fields a walk cuts an address into, high bits first (SDM Vol 3A figures 4-8..4-11,
    Vol 3C 29.3.2 for a GPA under EPT): the bits above the walk, one 9-bit index per level
    down to the leaf, then the page offset. Bad input raises `TwodwalkError`."""
    check_int("address", address, 0, 1 << 64, valid="0 <= address < 2**64")
    check_int("levels", levels, 4, 6, valid="4 or 5")
    check_choice("space", space, SPACES[:3])
    check_int("page_size", page_size, 1, 1 << 64, valid="4096, 2 MiB or 1 GiB")
    check_choice("page_size", str(page_size), tuple(str(size) for size in PAGE_SIZES))
    names = level_names(space, levels)
    leaf = PAGE_SIZES[page_size]
    top = EntryFormat.shift(levels) + 9
    # Bits above the walk: a GVA or HVA repeats bit top-1 (canonical form, SDM 3.3.7.1);
    # a GPA beyond what EPT translates cannot be used at all (SDM 29.3.2).
    upper = "sign extension" if space != "GPA" else "must be 0"
    fields = [AddressField(upper, 63, top, address >> top, UNUSED_BITS_STYLE)]
    for level in range(levels, leaf - 1, -1):
        low = EntryFormat.shift(level)
        fields.append(
            AddressField(
                table_name(names[level]),
                low + 8,
                low,
                address >> low & 0x1FF,
                LEVEL_STYLES[level],
                index=True,
            )
        )
    offset_bits = EntryFormat.shift(leaf)
    fields.append(
        AddressField("offset", offset_bits - 1, 0, address & (page_size - 1), PLAIN_STYLE)
    )
    return fields


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


# --- the two-dimensional walk grid -------------------------------------------------------------


@dataclass(frozen=True)
class GridCell:
    """One cell of the walk grid: where it is, what served it ("memory", a cache name or
    "data") and, for a memory reference, its number and dimension."""

    row: int
    col: int
    source: str
    number: int | None = None
    dimension: str | None = None


@dataclass(frozen=True)
class GridStop:
    """The cell where the walk stopped, and why (the VM exit, or the walk's fault)."""

    row: int
    col: int
    reason: str


@dataclass(frozen=True)
class WalkGrid:
    """One attempt's walk as a grid: rows are guest levels n..1 then the data GPA, columns
    EPT levels m..1 then the guest entry itself, so reference (i, j) sits where the SDM's
    nested walk makes it (Vol 3C 29.3.2). A one-dimensional walk has m = 0: one column.
    Rows and columns are (label, level); the final row and column have level None."""

    rows: tuple[tuple[str, int | None], ...]
    cols: tuple[tuple[str, int | None], ...]
    cells: tuple[GridCell, ...]
    stop: GridStop | None
    note: str
    two_dimensional: bool


def attempt_events(trace: Trace, attempt: int) -> list[Event]:
    """The events of one attempt, rejecting an attempt the trace does not have."""
    attempts = trace.attempts()
    count = len(attempts)
    check_int("attempt", attempt, -count, count, valid=f"-{count}..{count - 1} ({count} attempts)")
    return attempts[attempt]


def all_references(trace: Trace) -> Iterator[Reference]:
    """The hardware references of every attempt, attempt by attempt."""
    for attempt in range(len(trace.attempts())):
        yield from trace.memory_references(attempt)


def walk_grid(trace: Trace, attempt: int = -1, *, ept_levels: int | None = None) -> WalkGrid:
    """The grid of one attempt, read from the trace: each reference in its cell, the cells a
    cache served, and where the walk stopped. `ept_levels` is only used when no EPT walk in
    the trace shows the EPT depth (every GPA came from a cache, or a TLB hit)."""
    events = attempt_events(trace, attempt)
    record = next((e.record for e in events if isinstance(e, GuestWalk | NativeWalk)), None)
    two_dimensional = record is None or any(isinstance(e, GuestWalk) for e in events)
    m = _ept_depth(trace, ept_levels) if two_dimensional else 0
    n = 4 if record is None else record.format.levels
    rows, cols = _headers("GVA", n), _headers("GPA", m)
    final = ("data GPA" if two_dimensional else "data", None)
    entry = ("guest entry" if two_dimensional else "entry", None)
    data = [GridCell(n, m, "data")] if any(isinstance(e, DataAccess) for e in events) else []
    if record is None:
        note = "TLB hit: no walk" if any(isinstance(e, TlbHit) for e in events) else "no walk"
        return WalkGrid((*rows, final), (*cols, entry), tuple(data), None, note, True)
    cells = [
        GridCell(_row(ref, n), _col(ref, m), "memory", ref.number, ref.dimension)
        for ref in trace.memory_references(attempt)
    ]
    cells += [
        GridCell(_row(ref, n), _col(ref, m), PAGE_WALK_CACHE)
        for ref in trace.page_walk_cache_reads(attempt)
    ]
    cells += _cached_cells(record, events, n, m) + data
    stop = _grid_stop(record, events, n, m)
    return WalkGrid((*rows, final), (*cols, entry), tuple(cells), stop, "", two_dimensional)


def _row(ref: Reference, n: int) -> int:
    """Guest level n is row 0; the data GPA's row is n."""
    return n if ref.guest_level is None else n - ref.guest_level


def _col(ref: Reference, m: int) -> int:
    """EPT level m is column 0; the guest entry's column is m."""
    return m if ref.ept_level is None else m - ref.ept_level


def _headers(space: str, levels: int) -> tuple[tuple[str, int | None], ...]:
    """(name, level) from the root down; none for the EPT of a one-dimensional walk."""
    names = level_names(space, levels) if levels else {}
    return tuple((names[level], level) for level in range(levels, 0, -1))


def _ept_depth(trace: Trace, ept_levels: int | None) -> int:
    """The EPT depth an EPT walk in the trace shows, else `ept_levels` (default 4)."""
    for ref in all_references(trace):
        if ref.dimension == "ept":
            return ref.step.format.levels
    if ept_levels is None:
        return 4
    return check_int("ept_levels", ept_levels, 4, 6, valid="4 or 5")


def _cached_cells(record: WalkRecord, events: list[Event], n: int, m: int) -> list[GridCell]:
    """Cells a cache served instead of memory: whole rows above where a paging-structure
    cache let the walk start (SDM Vol 3A 4.10.3), a row's EPT cells when the table's HPA came
    from a cache (`TableRead.cached`), and the data GPA's when a guest-physical mapping gave
    it (Vol 3C 29.4.2; a `CacheHit` event)."""
    first = n if record.start is None else record.start.level
    cells = [GridCell(n - lv, col, PSC) for lv in range(n, first, -1) for col in range(m + 1)]
    for step in record.steps:
        if step.read.cached is not None:
            cells += [GridCell(n - step.level, col, step.read.cached) for col in range(m)]
        for nested in (*step.read.nested, *filter(None, [step.read.failed])):
            cells += _ept_cache_cells(nested, n - step.level, m)
    if any(isinstance(e, CacheHit) and e.cache == GUEST_PHYSICAL for e in events):
        cells += [GridCell(n, col, GUEST_PHYSICAL) for col in range(m)]
    final = next((e.record for e in events if isinstance(e, EptWalk)), None)
    if final is not None:
        cells += _ept_cache_cells(final, n, m)
    return cells


def _ept_cache_cells(record: WalkRecord, row: int, m: int) -> list[GridCell]:
    """The EPT cells of one row that the EPT's paging-structure caches served: the levels
    above where that EPT walk started (SDM Vol 3C 29.4.3)."""
    if record.start is None:
        return []
    return [GridCell(row, m - lv, PSC) for lv in range(m, record.start.level, -1)]


def _grid_stop(record: WalkRecord, events: list[Event], n: int, m: int) -> GridStop | None:
    """Where the walk stopped: the guest entry that faulted, the EPT entry of a nested walk
    that faulted (`WalkFault.nested`), or the EPT entry of the data GPA's walk."""
    final = next((e.record for e in events if isinstance(e, EptWalk)), None)
    fault = record.fault
    if fault is not None:
        row = 0 if fault.level is None else n - fault.level
        nested = None if fault.nested is None else fault.nested.fault
        col = m if fault.nested is None else _column(nested.level if nested else None, m)
    elif final is not None and final.fault is not None:
        fault = final.fault
        row, col = n, _column(fault.level, m)
    else:
        return None
    exit_ = next((e.name for e in events if isinstance(e, VmExit)), None)
    return GridStop(row, col, exit_ or f"walk fault: {fault.kind.value}")


def _column(ept_level: int | None, m: int) -> int:
    return 0 if ept_level is None else m - ept_level


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


# --- the KVM timeline --------------------------------------------------------------------------

LANES = ("guest / hardware", "KVM", "host kernel")
# Event kind -> (lane, marker shape, legend name).
EVENT_KINDS: dict[type, tuple[int, str, str]] = {
    GuestWalk: (0, ">", "guest walk"),
    EptWalk: (0, "<", "EPT walk (data GPA)"),
    NativeWalk: (0, "d", "one-dimensional walk"),
    TlbHit: (0, "*", "TLB hit"),
    CacheHit: (0, "P", "cache hit"),
    VmExit: (0, "v", "VM exit"),
    Retry: (0, "^", "VM entry (retry)"),
    DataAccess: (0, "o", "data access"),
    KvmStep: (1, "s", "KVM function"),
    KvmWalk: (1, "h", "KVM's walk of the guest tables"),
    SpteWrite: (1, "D", "SPTE write"),
    HostWalk: (2, "p", "host page-table walk"),
    HostPageFault: (2, "X", "host page fault"),
}
LANE_COLOURS = (BLUE, VERMILLION, GREEN)


def event_label(event: Event) -> str:
    """A few words for one event: the exit's name, the KVM function, a walk's outcome."""
    if isinstance(event, GuestWalk | EptWalk | NativeWalk | KvmWalk | HostWalk):
        fault = event.record.fault
        outcome = "ok" if fault is None else f"fault L{fault.level}"
        return f"{EVENT_KINDS[type(event)][2]}: {outcome}"
    if isinstance(event, VmExit):
        return event.name
    if isinstance(event, KvmStep):
        return event.function
    if isinstance(event, SpteWrite):
        what = "zap" if event.new == 0 else "leaf" if event.leaf else "link"
        return f"{event.table} L{event.level} {what}"
    if isinstance(event, CacheHit):
        return event.cache
    if isinstance(event, DataAccess):
        return f"data {event.kind}"
    if isinstance(event, HostPageFault):
        return "handle_mm_fault"
    return EVENT_KINDS[type(event)][2]


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


# --- the address map ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Region:
    """A range of one address space, named for what it is (a memslot, a VMA, ...)."""

    start: int
    end: int
    name: str

    def contains(self, address: int) -> bool:
        return self.start <= address < self.end


MAX_REGIONS = 8  # per column; more would not be readable
BOX = 0.36  # half the width of a region's box, in columns
# (from, to, dimension, label) of each route drawn: the hardware's shortcut (EPT, or KVM's
# shadow tables with EPT off) and KVM's software route through the memslot and host tables.
SOFTWARE_ROUTES = (
    ("GPA", "HVA", "memslot", "memslot"),
    ("HVA", "HPA", "host", "host page tables"),
)
EPT_ROUTES = (
    ("GVA", "GPA", "guest", "guest page tables"),
    ("GPA", "HPA", "ept", "EPT"),
    *SOFTWARE_ROUTES,
)
SHADOW_ROUTES = (
    ("GVA", "GPA", "kvm-walk", "guest page tables"),
    ("GVA", "HPA", "native", "shadow page tables"),
    *SOFTWARE_ROUTES,
)
_FRAME_KINDS = {"guest": "guest table", "ept": "EPT table", "native": "shadow table"}


def access_addresses(result: AccessResult) -> dict[str, int]:
    """The access's address in each space the trace and the result record."""
    addresses = {"GPA": result.gpa, "HVA": result.hva, "HPA": result.hpa}
    return {"GVA": access_gva(result)} | {k: v for k, v in addresses.items() if v is not None}


def access_gva(result: AccessResult) -> int:
    """The GVA as recorded: a walk's address, or a TLB hit's page plus the offset."""
    for event in result.trace:
        if isinstance(event, GuestWalk | NativeWalk | KvmWalk):
            return event.record.address
        if isinstance(event, TlbHit) and result.hpa is not None:
            return event.page + result.hpa - event.frame
    raise TwodwalkError("the trace records no guest-virtual address for this access")


def guest_mappings(machine: Machine) -> list[Region]:
    """The guest's mappings, from the leaf entries of its page tables, merged into runs
    that are contiguous in both GVA and GPA."""
    fmt = machine.guest.page_tables.fmt
    runs: list[tuple[int, int, int]] = []  # (gva, end, gpa)
    for entry in machine.guest.page_tables.entries():
        if not entry.leaf:
            continue
        size, gpa = fmt.page_size(entry.level), fmt.output_address(entry.value, entry.level)
        if runs and runs[-1][1] == entry.virtual and runs[-1][2] + runs[-1][1] - runs[-1][0] == gpa:
            runs[-1] = (runs[-1][0], entry.virtual + size, runs[-1][2])
        else:
            runs.append((entry.virtual, entry.virtual + size, gpa))
    return [Region(start, end, f"-> GPA {gpa:#x}") for start, end, gpa in runs]


def memslot_regions(machine: Machine) -> list[Region]:
    """The VM's memslots (address space 0): the GPA ranges KVM backs with the VMM's memory."""
    return [
        Region(
            slot.guest_phys_addr,
            slot.guest_phys_addr + slot.memory_size,
            f"memslot {slot.id}" + (" (read-only)" if slot.readonly else ""),
        )
        for slot in machine.vm.memslots.slots.values()
        if slot.as_id == 0
    ]


def frames_touched(trace: Trace) -> list[Region]:
    """Host frames this access touched, by what they hold: tables read by the hardware,
    tables read by the host walks, and the data page; adjacent frames of a kind merge."""
    kinds: dict[int, str] = {}
    for ref in all_references(trace):
        kinds.setdefault(ref.address & ~0xFFF, _FRAME_KINDS[ref.dimension])
    for walk in trace.of_type(HostWalk):
        for step in walk.record.steps:
            kinds.setdefault(step.read.physical & ~0xFFF, "host table")
    for access in trace.of_type(DataAccess):
        kinds.setdefault(access.hpa & ~0xFFF, "data")
    regions: list[Region] = []
    for page in sorted(kinds):
        last = regions[-1] if regions else None
        if last is not None and last.end == page and last.name == kinds[page]:
            regions[-1] = Region(last.start, page + PAGE_SIZE, last.name)
        else:
            regions.append(Region(page, page + PAGE_SIZE, kinds[page]))
    return regions


def _visible(regions: list[Region], points: list[int], hole: str) -> list[Region]:
    """The regions a column shows, in address order: those holding the access's address
    (or a one-page `hole` region where none does) and the first others, up to
    `MAX_REGIONS`."""
    regions = sorted(regions, key=lambda r: r.start)
    for point in points:
        if not any(r.contains(point) for r in regions):
            regions.append(Region(point & ~0xFFF, (point & ~0xFFF) + PAGE_SIZE, hole))
    keep = [r for r in regions if any(r.contains(p) for p in points)]
    others = [r for r in regions if r not in keep][: max(MAX_REGIONS - len(keep), 0)]
    return sorted(keep + others, key=lambda r: r.start)


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
