"""What the figures show, computed from the engine's traces and machines without drawing:
the walk grid's cells, an address's bit fields, the regions of each address space, the
frames a walk touched, the timeline's events. No matplotlib here (views/plots.py draws these),
so widget models and text views can use them alone."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from twodwalk.engine.cpuid import CpuModel
from twodwalk.engine.ept import EptAccessRules
from twodwalk.engine.formats import EntryFormat, ept_format, ia32e_format, nested_tree, npt_format
from twodwalk.engine.kvm.mmu import SHADOW_NONPRESENT_VALUE
from twodwalk.engine.trace import (
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
from twodwalk.engine.units import PAGE_SIZE, PAGE_SIZES
from twodwalk.engine.walker import Access, AccessKind, TableRead, WalkRecord
from twodwalk.engine.walker import walk as walk_tree
from twodwalk.errors import TwodwalkError, check_choice, check_int
from twodwalk.views.style import (
    GUEST_PHYSICAL,
    LEVEL_STYLES,
    PLAIN_STYLE,
    PSC,
    UNUSED_BITS_STYLE,
    Style,
)

if TYPE_CHECKING:
    from twodwalk.engine.kvm.memslots import Memslot
    from twodwalk.engine.machine import Machine
    from twodwalk.engine.nested import NestedMachine
    from twodwalk.engine.processor import AccessResult

_CPU = CpuModel()
_AMD = CpuModel(vendor="amd", la57=True)
EPT_RULES = EptAccessRules()


def level_names(space: str, levels: int, tree: str = "EPT") -> dict[int, str]:
    """Entry names per level as the manuals give them: EPT names for a GPA, which EPT
    translates (SDM Vol 3C 29.3.2), or nested names for AMD's nested page tables
    (`tree="NPT"`, APM Vol 2 15.25); IA-32e names for a GVA or an HVA (Vol 3A 4.5)."""
    fmt: EntryFormat = ia32e_format(levels, _CPU)
    if space == "GPA":
        fmt = npt_format(levels, _AMD) if tree == "NPT" else ept_format(levels, _CPU)
    return dict(fmt.level_names)


def table_name(entry_name: str) -> str:
    """The table an entry lives in: PML4E -> PML4, EPT PDE -> EPT PD."""
    return entry_name.removesuffix("E")


def references(count: int) -> str:
    """'1 memory reference', '24 memory references'."""
    return f"{count} memory reference{'' if count == 1 else 's'}"


# --- the fields of an address ------------------------------------------------------------------

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
    leaf = PAGE_SIZES.index(page_size) + 1  # the level of the leaf that maps such a page
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
    leaf_level: int = 1  # the guest level whose entry maps the data (2 or 3: a large page)
    tree: str = "EPT"  # the second dimension's name: EPT (Intel) or NPT (AMD)


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
    tree = _nested_tree(trace)
    rows, cols = _headers("GVA", n), _headers("GPA", m, tree)
    final = ("data GPA" if two_dimensional else "data", None)
    entry = ("guest entry" if two_dimensional else "entry", None)
    data = [GridCell(n, m, "data")] if any(isinstance(e, DataAccess) for e in events) else []
    if record is None:
        note = "TLB hit: no walk" if any(isinstance(e, TlbHit) for e in events) else "no walk"
        return WalkGrid((*rows, final), (*cols, entry), tuple(data), None, note, True, tree=tree)
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
    leaf = record.translation.level if record.translation is not None else 1
    return WalkGrid(
        (*rows, final), (*cols, entry), tuple(cells), stop, "", two_dimensional, leaf, tree
    )


def _row(ref: Reference, n: int) -> int:
    """Guest level n is row 0; the data GPA's row is n."""
    return n if ref.guest_level is None else n - ref.guest_level


def _col(ref: Reference, m: int) -> int:
    """EPT level m is column 0; the guest entry's column is m."""
    return m if ref.ept_level is None else m - ref.ept_level


def _headers(space: str, levels: int, tree: str = "EPT") -> tuple[tuple[str, int | None], ...]:
    """(name, level) from the root down; none for the EPT of a one-dimensional walk."""
    names = level_names(space, levels, tree) if levels else {}
    return tuple((names[level], level) for level in range(levels, 0, -1))


def _nested_tree(trace: Trace) -> str:
    """The name of the second dimension a trace's nested walks went through (EPT when it
    shows none)."""
    for ref in all_references(trace):
        if ref.dimension == "ept":
            return nested_tree(ref.step.format)
    return "EPT"


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
        for nested in step.read.nested:
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


# --- the KVM timeline --------------------------------------------------------------------------

LANES = ("guest / hardware", "KVM", "host kernel", "VMM")
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


def event_label(event: Event) -> str:
    """A few words for one event: the exit's name, the KVM function, a walk's outcome."""
    if isinstance(event, GuestWalk | EptWalk | NativeWalk | KvmWalk | HostWalk):
        fault = event.record.fault
        outcome = "ok" if fault is None else f"fault L{fault.level}"
        return f"{event_kind(event)}: {outcome}"
    if isinstance(event, VmExit):
        return event.name
    if isinstance(event, KvmStep):
        return event.function
    if isinstance(event, SpteWrite):
        zap = event.new == SHADOW_NONPRESENT_VALUE  # what KVM writes to zap an entry
        what = "zap" if zap else "leaf" if event.leaf else "link"
        return f"{event.table} L{event.level} {what}"
    if isinstance(event, CacheHit):
        return event.cache
    if isinstance(event, DataAccess):
        return f"data {event.kind}"
    if isinstance(event, HostPageFault):
        return "handle_mm_fault"
    return EVENT_KINDS[type(event)][2]


def event_kind(event: Event) -> str:
    """The kind of an event, for a legend: `EVENT_KINDS`' name, with the second dimension
    named as the vendor names it ("NPT walk (data GPA)" on AMD)."""
    kind = EVENT_KINDS[type(event)][2]
    if isinstance(event, EptWalk):
        return kind.replace("EPT", nested_tree(event.record.format))
    return kind


# A KVM function that calls into the host kernel: the host events recorded just before its
# own step happened inside it (`hva_to_pfn` -> get_user_pages -> `handle_mm_fault`).
CALLS_INTO_HOST = frozenset({"hva_to_pfn"})
VMM_LANE = 3


@dataclass(frozen=True)
class TimelineRow:
    """One row of the swimlane timeline: its lane, its words, the kind of event (its marker
    shape) and, for a call that brackets what it did, how many rows below it are inside."""

    lane: int
    label: str
    kind: str
    inside: int = 0


def timeline_rows(trace: Trace, exit_: object = None) -> list[TimelineRow]:
    """The trace in order, one row per event, with a call into the host kernel moved up to
    where it began (before the host's walks and faults it made) and bracketing them; and,
    when the access left KVM for the VMM (`exit_`, a KVM_EXIT_MMIO), a last row there."""
    rows: list[TimelineRow] = []
    for event in trace.events:
        lane = EVENT_KINDS[type(event)][0]
        row = TimelineRow(lane, event_label(event), event_kind(event))
        if isinstance(event, KvmStep) and event.function in CALLS_INTO_HOST:
            inside = _inside_the_call(rows)
            rows.insert(len(rows) - inside, replace(row, inside=inside))
        else:
            rows.append(row)
    if exit_ is not None:
        rows.append(TimelineRow(VMM_LANE, f"{type(exit_).__name__}: the VMM emulates", "exit"))
    return rows


def _inside_the_call(rows: list[TimelineRow]) -> int:
    """How many of the last rows a call into the host made: the host kernel's events and
    what its MMU notifiers had KVM do meanwhile."""
    count = 0
    for row in reversed(rows):
        notifier = row.kind == EVENT_KINDS[SpteWrite][2] or row.label.startswith("kvm_mmu_notifier")
        if row.lane != 2 and not notifier:
            break
        count += 1
    return count


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
    that are contiguous in both GVA and GPA and have the same rights (so a read-only code
    page and the writable data page after it stay two mappings, each with its own GPA)."""
    fmt = machine.guest.page_tables.fmt
    runs: list[tuple[int, int, int, int]] = []  # (gva, end, gpa, rights)
    for entry in machine.guest.page_tables.entries():
        if not entry.leaf:
            continue
        size, gpa = fmt.page_size(entry.level), fmt.output_address(entry.value, entry.level)
        rights = fmt.rights_mask(entry.value)
        if runs and runs[-1][1] == entry.virtual and runs[-1][3] == rights:
            start, end, first, _ = runs[-1]
            if first + end - start == gpa:
                runs[-1] = (start, entry.virtual + size, first, rights)
                continue
        runs.append((entry.virtual, entry.virtual + size, gpa, rights))
    return [Region(start, end, f"-> GPA {gpa:#x}") for start, end, gpa, _ in runs]


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


# --- two trees, one frame ----------------------------------------------------------------------


@dataclass(frozen=True)
class TwoTrees:
    """The answer in one picture's data: the EPT's walk of the access's GPA and the host's
    walk of the HVA that backs it, two trees with two roots, and the memslot that joins them
    (KVM built the EPT leaf from the memslot and the host's entry)."""

    gpa: int
    hva: int
    ept: WalkRecord
    host: WalkRecord
    memslot: Memslot

    @property
    def frame(self) -> int | None:
        """The frame both leaves name, if they agree (they do while KVM keeps EPT current)."""
        ept, host = self.ept.translation, self.host.translation
        if ept is None or host is None or ept.address != host.address:
            return None
        return ept.address


def two_trees(machine: Machine, result: AccessResult) -> TwoTrees:
    """Both walks of one completed access, read without changing either tree: KVM's own
    look-up of its EPT (`kvm_tdp_mmu_get_walk`) and the host's software walk of the VMM's
    page tables (`follow_page_pte`), with the memslot between."""
    if result.gpa is None or result.hva is None or not machine.vm.tdp:
        raise TwodwalkError(
            "two trees need an access that reached guest RAM under EPT: this one has no"
            f" HVA (gpa={result.gpa}, hva={result.hva}, EPT {'on' if machine.vm.tdp else 'off'})"
        )
    memslot = machine.vm.memslots.gfn_to_memslot(result.gpa >> 12)
    assert memslot is not None  # an HVA came from one
    ept = machine.vm.ept.get_walk(result.gpa)
    host = machine.host.walk(machine.vmm, result.hva, False)
    return TwoTrees(result.gpa, result.hva, ept, host, memslot)


@dataclass(frozen=True)
class NestedTrees:
    """An L2 access's three trees, read without changing any: L1's EPT12 (L2 GPA -> L1 GPA),
    the EPT02 L0 built from it (L2 GPA -> HPA), and the host's walk of the HVA behind the L1
    GPA, with L0's memslot between."""

    l2_gpa: int
    l1_gpa: int
    hva: int
    ept12: WalkRecord
    ept02: WalkRecord
    host: WalkRecord
    memslot: Memslot

    @property
    def frame(self) -> int | None:
        """The frame EPT02 and the host both name, if they agree (while L0 keeps EPT02
        current)."""
        ept02, host = self.ept02.translation, self.host.translation
        if ept02 is None or host is None or ept02.address != host.address:
            return None
        return ept02.address & ~(PAGE_SIZE - 1)


class _PagemapTables:
    """Tables at L1 GPAs read where L0's host maps them now (`Vm.gpa_to_hpa`, like
    /proc/PID/pagemap): no fault, no A/D bit."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine

    def read_entry(self, address: int, access: Access) -> tuple[int, TableRead | None]:
        hpa = self.machine.vm.gpa_to_hpa(address)
        if hpa is None:
            return 0, TableRead(0, address)
        value = self.machine.memory.read_u64(hpa)
        return value, TableRead(value, hpa)

    def write_entry(self, address: int, read: TableRead | None, value: int) -> WalkRecord | None:
        raise AssertionError("a look-up sets no A/D bits")


def nested_trees(nested: NestedMachine, result: AccessResult) -> NestedTrees:
    """The three trees of a completed L2 access (`NestedMachine.l2_vcpu.access`)."""
    if result.gpa is None or result.hpa is None:
        raise TwodwalkError("three trees need an L2 access that reached memory: this one did not")
    l0, l1 = nested.l0, nested.l1
    read = Access.of(AccessKind.READ)
    ept12 = walk_tree(
        l1.ept12.fmt,
        l1.eptp12.root,
        result.gpa,
        read,
        _PagemapTables(l0),
        EPT_RULES,
        accessed_dirty=False,
    )
    l1_gpa = l1.l1_gpa(result.gpa)
    memslot = l0.vm.memslots.gfn_to_memslot(l1_gpa >> 12)
    hva = l0.vm.gpa_to_hva(l1_gpa)
    assert memslot is not None and hva is not None  # L1's RAM is L0's memslot 0
    host = l0.host.walk(l0.vmm, hva, False)
    return NestedTrees(
        result.gpa, l1_gpa, hva, ept12, nested.nested.ept02.get_walk(result.gpa), host, memslot
    )
