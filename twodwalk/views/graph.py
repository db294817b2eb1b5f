"""One access as a graph (networkx): the table pages and addresses it went through, in layers
by address space, and every memory reference as an edge in hardware order.

The hardware's references come from the last attempt of the trace (the walk that finished
the access); KVM's software path comes from every attempt: the memslot lookup
(`__gfn_to_hva_memslot`), the host page-table walks (`hva_to_pfn` -> `get_user_pages`) and,
with EPT off, KVM's own walk of the guest tables (paging_tmpl.h `walk_addr_generic`). Nothing
is translated here: every node and edge is read from the trace and the access's result.

An EPT table appears once per nested walk that reads it (as in the walk grid's rows), so the
24 references of a cold 4x4 walk are 24 distinct edges of a `DiGraph`. The layout is layered
and deterministic: the GVA on top, the guest tables (GPAs) in a row, each with its EPT walk
hanging below it down to the host frame that holds it, and the HVAs and host walks beside.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import networkx as nx
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from twodwalk.engine.formats import EntryFormat
from twodwalk.engine.trace import (
    CacheHit,
    EptWalk,
    GuestWalk,
    HostWalk,
    KvmStep,
    KvmWalk,
    NativeWalk,
    TlbHit,
)
from twodwalk.engine.units import PAGE_SIZE
from twodwalk.engine.walker import TableRead, WalkRecord
from twodwalk.errors import check_int
from twodwalk.views.plots import figure_and_axes
from twodwalk.views.readouts import access_gva, all_references, table_name
from twodwalk.views.style import (
    BLACK,
    CELL_STYLES,
    DIMENSION_STYLES,
    FONT,
    GUEST_PHYSICAL,
    HARDWARE_DIMENSIONS,
    STOP_MARKER,
)

if TYPE_CHECKING:
    from twodwalk.engine.processor import AccessResult

Place = Callable[[int], tuple[float, float]]  # a table's level -> its position
GVA_Y, GPA_Y, HVA_Y, TABLES_Y = 0.0, -1.0, -2.0, -3.0  # the layers, top to bottom
EPT_DX, HOST_DX = -0.22, 0.5  # EPT walks hang left of their column, host walks right
PAGE_MASK = ~(PAGE_SIZE - 1)
_LABEL_BOX = {"boxstyle": "round,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.8}


def walk_graph(result: AccessResult) -> nx.DiGraph:
    """The access as a `networkx.DiGraph`. Nodes carry `space` (GVA, GPA, HVA, HPA), `kind`
    (address, guest/EPT/host/native table, frame, page, fault), `address`, `level`, `label`
    and `pos`; edges carry `dimension` (guest, ept, native for the hardware; memslot, host,
    kvm-walk for KVM's software path; link for CR3, EPTP and cache hits), `order` (the
    hardware reference number, None otherwise), `value` (the entry read) and `label`."""
    builder = _Builder(result)
    builder.hardware()
    builder.software()
    return builder.graph


class _Builder:
    """Adds nodes and edges while reading the trace in order."""

    def __init__(self, result: AccessResult) -> None:
        self.graph = nx.DiGraph()
        self.result = result
        trace = result.trace
        self.last = trace.attempts()[-1]
        self.numbers = {id(ref.step): ref.number for ref in trace.memory_references()}
        walks = [e.record for e in self.last if isinstance(e, GuestWalk | NativeWalk)]
        self.levels = walks[0].format.levels if walks else 4
        self.ept_levels = next(
            (r.step.format.levels for r in all_references(trace) if r.dimension == "ept"), 0
        )
        self.bottom = TABLES_Y - max(self.ept_levels, 4) - 1.0
        self.spare = float(self.levels + 2)  # the next free column, for pages off the walk

    # --- nodes and edges ----------------------------------------------------------------------

    def node(self, key: str, pos: tuple[float, float], **attributes: Any) -> str:
        if key not in self.graph:
            self.graph.add_node(key, pos=pos, **{"level": None, **attributes})
        return key

    def edge(
        self,
        source: str,
        target: str,
        dimension: str,
        label: str,
        order: int | None = None,
        value: int | None = None,
    ) -> None:
        self.graph.add_edge(
            source, target, dimension=dimension, order=order, value=value, label=label
        )

    def x(self, key: str) -> float:
        return float(self.graph.nodes[key]["pos"][0])

    def take_spare(self) -> float:
        self.spare += 1
        return self.spare - 1

    def column(self, level: int) -> float:
        """Guest level n is column 1, level 1 column n, the data GPA column n + 1."""
        return float(self.levels - level + 1)

    def address(self, space: str, address: int, pos: tuple[float, float]) -> str:
        """The access's own address in one space (a node per page)."""
        return self.node(
            f"{space} {address & PAGE_MASK:#x}",
            pos,
            space=space,
            kind="address",
            address=address,
            label=f"{space}\n{address:#x}",
        )

    def page(self, space: str, address: int, kind: str, pos: tuple[float, float]) -> str:
        """Another page of a space: a guest table's frame, an HVA a fault was fixed for."""
        page = address & PAGE_MASK
        label = f"{space}\n{page:#x}"
        return self.node(
            f"{space} {page:#x}", pos, space=space, kind=kind, address=page, label=label
        )

    def frame(self, hpa: int, x: float) -> str:
        """The host frame holding a guest table or data, at the foot of its column."""
        return self.page("HPA", hpa, "frame", (x, self.bottom))

    def data(self, hpa: int) -> str:
        return self.address("HPA", hpa, (self.column(0), self.bottom))

    def final_gpa(self, gpa: int) -> str:
        return self.address("GPA", gpa, (self.column(0), GPA_Y))

    def gva(self, gva: int) -> str:
        return self.address("GVA", gva, (0.0, GVA_Y))

    def gpa_page(self, gpa: int) -> str:
        """A guest table or the data page if the walk had it, else a page in a spare column
        (one an earlier attempt faulted on)."""
        key = f"GPA {gpa & PAGE_MASK:#x}"
        return (
            key if key in self.graph else self.page("GPA", gpa, "page", (self.take_spare(), GPA_Y))
        )

    def hva(self, hva: int, x: float) -> str:
        own = self.result.hva
        if own is not None and own & PAGE_MASK == hva & PAGE_MASK:
            return self.address("HVA", own, (x, HVA_Y))
        return self.page("HVA", hva, "page", (x, HVA_Y))

    def table(
        self,
        fmt: EntryFormat,
        level: int,
        table: int,
        space: str,
        kind: str,
        place: Place,
        tag: str,
    ) -> str:
        return self.node(
            f"{space} {table:#x}{tag}",
            place(level),
            space=space,
            kind=kind,
            address=table,
            level=level,
            label=f"{table_name(fmt.level_name(level))}\n{table:#x}",
        )

    def fault(self, record: WalkRecord, space: str, place: Place, tag: str) -> str:
        """Where a walk stopped: beside and below the table whose entry faulted."""
        fault = record.fault
        assert fault is not None
        x, y = place(record.format.levels if fault.level is None else fault.level)
        return self.node(
            f"fault {space} {record.address:#x}{tag}",
            (x + 0.35, y - 0.8),
            space=space,
            kind="fault",
            address=record.address,
            label=f"stop: {fault.kind.name.lower().replace('_', ' ')}",
        )

    # --- walks --------------------------------------------------------------------------------

    def walk(
        self,
        record: WalkRecord,
        origin: tuple[str, str],
        end: str | None,
        *,
        dimension: str,
        space: str,
        kind: str,
        place: Place,
        tag: str = "",
    ) -> None:
        """One walk, entry by entry: `origin` (a node and how it names the root: CR3, EPTP,
        a cache) points at the first table read; each entry read is an edge from its table
        to what it names, the last one to `end`, or to a fault node if `end` is None."""
        fmt = record.format
        tables = [self.table(fmt, s.level, s.table, space, kind, place, tag) for s in record.steps]
        chain = [*tables, end if end is not None else self.fault(record, space, place, tag)]
        self.edge(origin[0], chain[0], "link", origin[1])
        hardware = dimension in HARDWARE_DIMENSIONS
        for step, source, target in zip(record.steps, chain[:-1], chain[1:], strict=True):
            order = self.numbers.get(id(step)) if hardware else None
            label = f"{step.value:#x}" if order is None else f"{order}: {step.value:#x}"
            self.edge(source, target, dimension, label, order, step.value)

    def ept(self, record: WalkRecord, origin: str, x: float, end: str | None) -> None:
        """An EPT walk hanging below the GPA node it translates (SDM Vol 3C 29.3.2)."""
        self.walk(
            record,
            (origin, "EPTP"),
            end,
            dimension="ept",
            space="HPA",
            kind="EPT table",
            place=lambda level: (x + EPT_DX, TABLES_Y - (self.ept_levels - level)),
            tag=f" (EPT walk of column {x:g})",
        )

    def table_read(self, table: str, read: TableRead, x: float) -> None:
        """How a guest table's GPA became an HPA: its EPT walk, or the cache that knew it.
        The frame says which guest table it holds: the same page, seen from the host."""
        frame = self.frame(read.physical, x)
        holds = str(self.graph.nodes[table]["label"]).split("\n")[0]
        self.graph.nodes[frame]["label"] = f"HPA\n{read.physical & PAGE_MASK:#x}\n= guest {holds}"
        if read.cached is not None:
            self.edge(table, frame, "link", CELL_STYLES[read.cached].tag)
        for nested in read.nested:
            self.ept(nested, table, x, frame)

    def guest_walk(self, record: WalkRecord) -> None:
        """The guest dimension along the GPA row, each table with its EPT walk below; a
        nested fault ends the row at the table whose GPA did not translate."""
        fault = record.fault

        def place(level: int) -> tuple[float, float]:
            return self.column(level), GPA_Y

        end = None
        if record.translation is not None:
            end = self.final_gpa(record.translation.address)
        elif fault is not None and fault.nested is not None and fault.level is not None:
            table = fault.nested.address & PAGE_MASK
            end = self.table(record.format, fault.level, table, "GPA", "guest table", place, "")
            self.ept(fault.nested, end, self.column(fault.level), None)
        root = "PSC" if record.start is not None else "CR3"
        self.walk(
            record,
            (self.gva(record.address), root),
            end,
            dimension="guest",
            space="GPA",
            kind="guest table",
            place=place,
        )
        for step in record.steps:
            self.table_read(f"GPA {step.table:#x}", step.read, self.column(step.level))

    def native_walk(self, record: WalkRecord) -> None:
        """A one-dimensional walk (shadow tables, or a process on bare metal): GVA -> HPA."""
        translation = record.translation
        self.walk(
            record,
            (self.gva(record.address), "PSC" if record.start is not None else "CR3"),
            self.data(translation.address) if translation is not None else None,
            dimension="native",
            space="HPA",
            kind="native table",
            place=lambda level: (self.column(level), TABLES_Y),
        )

    def hardware(self) -> None:
        """The last attempt: its guest (or one-dimensional) walk, then the data GPA's EPT
        walk or guest-physical mapping; or the TLB hit that made a walk unnecessary."""
        for event in self.last:
            if isinstance(event, GuestWalk):
                self.guest_walk(event.record)
            elif isinstance(event, NativeWalk):
                self.native_walk(event.record)
            elif isinstance(event, EptWalk):
                translation = event.record.translation
                end = None if translation is None else self.data(translation.address)
                self.ept(event.record, self.final_gpa(event.record.address), self.column(0), end)
            elif isinstance(event, CacheHit) and event.cache == GUEST_PHYSICAL:
                tag = CELL_STYLES[GUEST_PHYSICAL].tag
                self.edge(self.final_gpa(event.address), self.data(event.result), "link", tag)
            elif isinstance(event, TlbHit) and self.result.hpa is not None:
                gva = self.gva(access_gva(self.result))
                self.edge(gva, self.data(self.result.hpa), "link", "TLB")

    # --- KVM's software path ------------------------------------------------------------------

    def software(self) -> None:
        """Every attempt's memslot lookups, host walks and KVM walks of the guest tables."""
        walked: set[int] = set()
        for event in self.result.trace:
            if isinstance(event, HostWalk):
                self.host_walk(event.record)
                walked.add(event.record.address & PAGE_MASK)
            elif isinstance(event, KvmWalk):
                self.kvm_walk(event.record)
            elif isinstance(event, KvmStep):
                self.kvm_step(event, walked)

    def kvm_step(self, step: KvmStep, walked: set[int]) -> None:
        """The steps that name both ends of a hop: `__gfn_to_hva_memslot` (GPA -> HVA) and
        `hva_to_pfn` (HVA -> HPA), the latter only when the trace has no walk of that HVA
        (KVM's fast path, `hva_to_pfn_fast`, records none)."""
        if step.function == "__gfn_to_hva_memslot" and step.gfn is not None and step.hva:
            gpa = self.gpa_page(step.gfn * PAGE_SIZE)
            self.edge(gpa, self.hva(step.hva, self.x(gpa) + HOST_DX), "memslot", "memslot")
        elif step.function == "hva_to_pfn" and step.hva is not None and step.hpa is not None:
            hva = self.hva_of_walk(step.hva)
            if step.hva & PAGE_MASK not in walked:
                self.edge(hva, self.frame(step.hpa, self.x(hva)), "host", "hva_to_pfn")

    def hva_of_walk(self, hva: int) -> str:
        """The HVA a host walk starts from. With EPT off no memslot step is traced, so the
        access's own HVA is linked to its GPA here (KVM's `gfn_to_hva` in `FNAME(page_fault)`)."""
        key = f"HVA {hva & PAGE_MASK:#x}"
        if key in self.graph:
            return key
        gpa, own = self.result.gpa, self.result.hva
        if gpa is None or own is None or own & PAGE_MASK != hva & PAGE_MASK:
            return self.hva(hva, self.take_spare())
        source = self.final_gpa(gpa)
        node = self.hva(hva, self.x(source) + HOST_DX)
        self.edge(source, node, "memslot", "memslot")
        return node

    def host_walk(self, record: WalkRecord) -> None:
        """KVM's walk of the VMM's page tables for an HVA (`hva_to_pfn` -> gup)."""
        hva = self.hva_of_walk(record.address)
        x = self.x(hva)
        translation = record.translation
        levels = record.format.levels
        self.walk(
            record,
            (hva, "CR3 (VMM)"),
            self.frame(translation.address, x) if translation is not None else None,
            dimension="host",
            space="HPA",
            kind="host table",
            place=lambda level: (x, TABLES_Y - 0.5 - (levels - level)),  # labels clear EPT's
            tag=f" (host walk of HVA {record.address & PAGE_MASK:#x})",
        )

    def kvm_walk(self, record: WalkRecord) -> None:
        """With EPT off, KVM walks the guest's tables in software (`FNAME(walk_addr)`)."""
        translation = record.translation
        self.walk(
            record,
            (self.gva(record.address), "CR3"),
            self.final_gpa(translation.address) if translation is not None else None,
            dimension="kvm-walk",
            space="GPA",
            kind="guest table",
            place=lambda level: (self.column(level), GPA_Y),
        )


# --- drawing -----------------------------------------------------------------------------------


def plot_walk_graph(
    result: AccessResult, *, highlight: int | None = None, ax: Axes | None = None
) -> Figure:
    """The walk graph (see `walk_graph`) in its layered layout: the guest dimension, EPT and
    KVM's software path each with its own colour and line style, entry values on the edges;
    each node a box that holds its whole name, shaded by the tree it belongs to (guest, EPT,
    host or shadow tables), the host frames naming the guest table they hold. `highlight=n`
    draws reference n thick, its label boxed in black (the WalkStepper's current step)."""
    graph = walk_graph(result)
    orders = [d["order"] for _, _, d in graph.edges(data=True) if d["order"] is not None]
    if highlight is not None:
        check_int("highlight", highlight, 1, len(orders) + 1, valid=f"1..{len(orders)}")
    pos = nx.get_node_attributes(graph, "pos")
    xs, ys = [x for x, _ in pos.values()], [y for _, y in pos.values()]
    width, height = max(xs) - min(xs) + 1.6, max(ys) - min(ys) + 1.0
    figure, ax = figure_and_axes(ax, (3.0 * width, 1.25 * height + 2.0))
    _draw_edges(ax, graph, pos, highlight)
    _draw_nodes(ax, graph, pos)
    ax.set_xlim(min(xs) - 0.5, max(xs) + 1.1)  # room for the labels beside the last column
    ax.set_ylim(min(ys) - 0.6, max(ys) + 0.4)
    handles = _legend(graph)
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0), ncol=3, fontsize=FONT)
    ax.set_title("The access as a graph: every table read, in hardware order", fontsize=12)
    ax.set_axis_off()
    return figure


# What each kind of node is: its shade (the tree it belongs to: one meaning per colour, as in
# every figure), its box shape and its legend text.
_NODE_STYLES = {
    "guest table": ("guest", "square,pad=0.35", "guest table (a page of guest memory)"),
    "EPT table": ("ept", "square,pad=0.35", "EPT table"),
    "host table": ("host", "square,pad=0.35", "host page table of the VMM"),
    "native table": ("native", "square,pad=0.35", "shadow or native table"),
    "address": (None, "round,pad=0.4", "the access's address in a space"),
    "frame": (None, "round4,pad=0.35", "host frame of a guest table"),
    "page": (None, "round4,pad=0.35", "another page"),
}


def _node_face(kind: str) -> tuple[float, float, float, float]:
    dimension = _NODE_STYLES[kind][0]
    if dimension is None:
        return (0.87, 0.87, 0.87, 1.0) if kind in ("frame", "page") else (1.0, 1.0, 1.0, 1.0)
    colour = DIMENSION_STYLES[dimension].colour
    return replace(DIMENSION_STYLES[dimension], colour=colour, alpha=0.25).face


def _draw_nodes(ax: Axes, graph: nx.DiGraph, pos: dict[str, tuple[float, float]]) -> None:
    """Each node as a box around its name, so a name never spills out of its node; a fault
    as the stop marker with its words under it."""
    for node, data in graph.nodes(data=True):
        x, y = pos[node]
        if data["kind"] == "fault":
            ax.plot([x], [y], marker=STOP_MARKER, markersize=18, color=BLACK, linestyle="none",
                    zorder=4)  # fmt: skip
            ax.text(x, y - 0.22, data["label"], ha="center", va="top", fontsize=FONT, zorder=4)
            continue
        _, shape, _ = _NODE_STYLES[data["kind"]]
        ax.text(
            x, y, data["label"], ha="center", va="center", fontsize=FONT, zorder=4,
            bbox={"boxstyle": shape, "facecolor": _node_face(data["kind"]), "edgecolor": BLACK},
        )  # fmt: skip


def _draw_edges(
    ax: Axes, graph: nx.DiGraph, pos: dict[str, tuple[float, float]], highlight: int | None
) -> None:
    """Edges by dimension, each with its colour and line style; labels in white boxes, the
    highlighted reference's boxed in black and bold."""
    for dimension, style in DIMENSION_STYLES.items():
        edges = [(u, v) for u, v, d in graph.edges(data=True) if d["dimension"] == dimension]
        if not edges:
            continue
        emphasised = [highlight is not None and graph.edges[e]["order"] == highlight for e in edges]
        nx.draw_networkx_edges(
            graph,
            pos,
            edgelist=edges,
            edge_color=style.colour,
            style=[style.linestyle] * len(edges),
            width=[6.0 if e else 1.8 for e in emphasised],
            arrows=True,
            arrowsize=14,
            node_size=0,
            min_source_margin=18,
            min_target_margin=24,
            ax=ax,
        )
    groups: dict[tuple[str, bool], dict[tuple[str, str], str]] = {}
    for u, v, d in graph.edges(data=True):
        hop = d["dimension"] == "host" and d["value"] is None  # hva_to_pfn, no entry read
        align = _label_alignment(pos[u], pos[v], hop=hop)
        text = _edge_text(d)
        if align is not None and text:
            current = highlight is not None and d["order"] == highlight
            groups.setdefault((align, current), {})[(u, v)] = f" {text}"
    for (align, current), labels in groups.items():
        box = {**_LABEL_BOX, "edgecolor": BLACK, "linewidth": 2.0} if current else _LABEL_BOX
        nx.draw_networkx_edge_labels(
            graph,
            pos,
            edge_labels=labels,
            font_size=FONT,
            font_weight="bold" if current else "normal",
            rotate=False,
            bbox=box,
            horizontalalignment=align,
            node_size=0,
            ax=ax,
        )


def _edge_text(edge: dict[str, Any]) -> str:
    """What an edge says: a guest (or one-dimensional) reference its number and the entry it
    read, where the row leaves room; an EPT reference, hanging in a narrow column, only its
    number (the grid and the dumps give every value); an entry KVM's software read, nothing
    (its line style says whose walk it is); CR3, EPTP, a memslot or a cache, its name."""
    if edge["order"] is not None:
        return str(edge["order"]) if edge["dimension"] == "ept" else str(edge["label"])
    if edge["value"] is not None:
        return ""
    return str(edge["label"])


def _label_alignment(
    source: tuple[float, float], target: tuple[float, float], *, hop: bool
) -> str | None:
    """How an edge's label is placed: beside a downward edge, so the line stays visible;
    centred on the others; none on a long `hva_to_pfn` hop across the EPT walks, where it
    would cover their labels (the legend names it; the graph keeps it)."""
    dx, dy = abs(target[0] - source[0]), abs(target[1] - source[1])
    if hop and dy > 2.5:
        return None
    return "left" if dy > dx else "center"


def _legend(graph: nx.DiGraph) -> list[Line2D | Patch]:
    """The dimensions drawn (colour and line style) and the kinds of node (shade)."""
    dimensions = {d["dimension"] for _, _, d in graph.edges(data=True)}
    kinds = {d["kind"] for _, d in graph.nodes(data=True)} - {"fault"}
    handles: list[Line2D | Patch] = [
        Line2D([], [], color=s.colour, linestyle=s.linestyle, linewidth=2, label=s.label)
        for name, s in DIMENSION_STYLES.items()
        if name in dimensions
    ]
    handles += [
        Patch(facecolor=_node_face(kind), edgecolor=BLACK, label=_NODE_STYLES[kind][2])
        for kind in _NODE_STYLES
        if kind in kinds
    ]
    if any(d["kind"] == "fault" for _, d in graph.nodes(data=True)):
        handles.append(
            Line2D(
                [],
                [],
                marker=STOP_MARKER,
                color=BLACK,
                linestyle="none",
                markersize=12,
                label="where a walk stopped",
            )
        )
    return handles
