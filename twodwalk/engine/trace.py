"""The trace: what happened during one access, in order. The engine writes it; views read it.

Every view (text, plots, graphs, widgets, notebooks) consumes these events and nothing else;
none of them walks or translates again. Hardware walks are kept whole as `WalkRecord`s, so the
two-dimensional walk's references (guest level i, EPT level j) fall out of the data:
`memory_references()` flattens them in the order the hardware makes them.
The events every access makes (walks, hits, the data access, retries) are slotted dataclasses,
not frozen ones, because a frozen dataclass costs several times as much to make on the hot
path: read them, never change them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from twodwalk.engine.units import hex_repr
from twodwalk.engine.walker import ROW_LEVEL, ROW_READ, WalkRecord, WalkStep


@dataclass(slots=True)
class GuestWalk:
    """The hardware walk of the guest tables (each table GPA translated through EPT first)."""

    record: WalkRecord


@dataclass(slots=True)
class EptWalk:
    """The hardware EPT walk of the final guest-physical address."""

    record: WalkRecord


@dataclass(slots=True)
class NativeWalk:
    """A one-dimensional hardware walk: shadow tables (EPT off) or the host's own tables."""

    record: WalkRecord


@hex_repr
@dataclass(slots=True)
class TlbHit:
    """The TLB held the translation: no walk, no memory reference for it."""

    page: int
    page_size: int
    frame: int


@hex_repr
@dataclass(slots=True)
class CacheHit:
    """A translation cache answered part of the walk: `cache` names it ("paging-structure
    cache L2", "guest-physical"), `address` is what was looked up, `result` what it gave."""

    cache: str
    address: int
    result: int


@hex_repr
@dataclass(frozen=True)
class VmExit:
    """A VM exit to KVM: reason number and name, qualification and guest-physical address."""

    reason: int
    name: str
    qualification: int | None = None
    gpa: int | None = None
    gva: int | None = None


@hex_repr
@dataclass(frozen=True)
class KvmStep:
    """One software step of KVM or the host kernel, named after the function that does it."""

    function: str
    detail: str
    gfn: int | None = None
    hva: int | None = None
    hpa: int | None = None
    level: int | None = None


@dataclass(frozen=True)
class HostWalk:
    """KVM's software walk of the VMM's host page tables (hva_to_pfn -> get_user_pages)."""

    record: WalkRecord


@hex_repr
@dataclass(frozen=True)
class HostPageFault:
    """A host page fault taken on the VMM's behalf (mm/memory.c `handle_mm_fault`)."""

    hva: int
    write: bool
    resolution: str
    hpa: int


@dataclass(frozen=True)
class KvmWalk:
    """KVM's software walk of the guest's page tables (shadow paging, paging_tmpl.h)."""

    record: WalkRecord


@hex_repr
@dataclass(frozen=True)
class SpteWrite:
    """KVM wrote an entry of its own tables: `table` is "ept" or "shadow" (KVM calls both
    kinds of entry an SPTE). A zero `new` is a zap."""

    table: str
    level: int
    entry_address: int
    old: int
    new: int
    leaf: bool


@dataclass(slots=True)
class Retry:
    """KVM re-entered the guest, which retries the access from the start."""

    attempt: int


@hex_repr
@dataclass(slots=True)
class DataAccess:
    """The access itself reached memory."""

    hpa: int
    kind: str
    value: int


Event = (
    GuestWalk
    | EptWalk
    | NativeWalk
    | TlbHit
    | CacheHit
    | VmExit
    | KvmStep
    | HostWalk
    | HostPageFault
    | SpteWrite
    | KvmWalk
    | Retry
    | DataAccess
)


T = TypeVar("T")


@hex_repr
@dataclass(frozen=True)
class Reference:
    """One hardware memory reference of a walk: which dimension, which level, where, what.

    guest_level is None for references of the final EPT walk; ept_level is None for the
    guest entry read itself. `number` counts references from 1 within one attempt.
    """

    number: int
    dimension: str
    guest_level: int | None
    ept_level: int | None
    address: int
    value: int
    step: WalkStep = field(repr=False, compare=False)


@dataclass
class Trace:
    """The ordered events of one access."""

    events: list[Event] = field(default_factory=list)

    def add(self, event: Event) -> None:
        self.events.append(event)

    def __iter__(self) -> Iterator[Event]:
        return iter(self.events)

    def of_type(self, kind: type[T]) -> list[T]:
        return [e for e in self.events if isinstance(e, kind)]

    def refused_gpa(self) -> int | None:
        """The GPA the guest's translation reached when its own rights refused the access
        (a protection #PF: the leaf maps a page, SDM Vol 3A 4.7), from the last walk of the
        guest's tables, the hardware's or KVM's; None when the walk found no page."""
        walks = [e.record for e in self.events if isinstance(e, GuestWalk | KvmWalk)]
        fault = walks[-1].fault if walks else None
        return None if fault is None else fault.reached

    def attempts(self) -> list[list[Event]]:
        """The events split at each `Retry`: one list per attempt of the access."""
        out: list[list[Event]] = [[]]
        for event in self.events:
            if isinstance(event, Retry):
                out.append([])
            out[-1].append(event)
        return out

    def memory_references(self, attempt: int = -1) -> list[Reference]:
        """The hardware references of one attempt (default: the last), in hardware order."""
        return self._entry_reads(attempt, memory=True)

    def page_walk_cache_reads(self, attempt: int = -1) -> list[Reference]:
        """The entries of one attempt's walks that a page-walk cache gave instead of memory
        (AMD-style model), in walk order, numbered 0: they are not references."""
        return self._entry_reads(attempt, memory=False)

    def _entry_reads(self, attempt: int, memory: bool) -> list[Reference]:
        out: list[Reference] = []
        for dimension, guest, ept, record, row in _references(self.attempts()[attempt], memory):
            step = record.steps[row]
            number = len(out) + 1 if memory else 0
            out.append(
                Reference(number, dimension, guest, ept, step.read.physical, step.value, step)
            )
        return out

    def reference_counts(self) -> dict[str, int]:
        """References of every attempt counted by dimension ("guest", "ept", "native"),
        without building `Reference` values: what the workload simulator adds up."""
        counts: dict[str, int] = {}
        for dimension, _, _, _, _ in _references(self.events):
            counts[dimension] = counts.get(dimension, 0) + 1
        return counts


class Counts(Trace):
    """A trace sink that keeps no events, only the totals the workload simulator reports:
    references by dimension, TLB and cache hits, VM exits by name, host page faults. The
    engine writes to it exactly as to a `Trace`, so a counts-only run takes the same path
    through the same walker; it just records nothing to look at afterwards."""

    def __init__(self) -> None:
        super().__init__()
        self.references: dict[str, int] = {}
        self.cache_hits: dict[str, int] = {}
        self.exits: dict[str, int] = {}
        self.tlb_hits = 0
        self.host_page_faults = 0

    def add(self, event: Event) -> None:
        kind = type(event)  # the exact class: a chain of isinstance tests cost a fifth
        if kind is TlbHit:
            self.tlb_hits += 1
        elif kind is GuestWalk:
            assert isinstance(event, GuestWalk)
            self._count("guest", event.record)
            for _, nested in _nested_walks(event.record):
                self._count("ept", nested)
        elif kind is EptWalk or kind is NativeWalk:
            assert isinstance(event, EptWalk | NativeWalk)
            self._count("ept" if kind is EptWalk else "native", event.record)
        elif kind is CacheHit:
            assert isinstance(event, CacheHit)
            family = _CACHE_FAMILIES.get(event.cache)
            if family is None:  # "paging-structure cache L2" counts as "paging-structure cache"
                family = _CACHE_FAMILIES[event.cache] = event.cache.split(" L")[0]
            self.cache_hits[family] = self.cache_hits.get(family, 0) + 1
        elif kind is VmExit:
            assert isinstance(event, VmExit)
            self.exits[event.name] = self.exits.get(event.name, 0) + 1
        elif kind is HostPageFault:
            self.host_page_faults += 1

    def _count(self, dimension: str, record: WalkRecord) -> None:
        """Add one walk's entries read from memory to `dimension`, and those a page-walk
        cache gave to its hits."""
        cached = 0
        for row in record.rows:
            read = row[ROW_READ]
            if read is not None and read.pwc:
                cached += 1
        references = self.references
        references[dimension] = references.get(dimension, 0) + len(record.rows) - cached
        if cached:
            self.cache_hits[PAGE_WALK_CACHE] = self.cache_hits.get(PAGE_WALK_CACHE, 0) + cached


PAGE_WALK_CACHE = "page-walk cache"
_CACHE_FAMILIES: dict[str, str] = {}


Ref = tuple[str, int | None, int | None, WalkRecord, int]
"""(dimension, guest level, EPT level, the walk, the index of the entry read in its rows)."""


def _references(events: Iterable[Event], memory: bool = True) -> Iterator[Ref]:
    """Each entry read that went to memory (or, `memory=False`, that a page-walk cache
    gave), in order. An EPT entry carries the guest level whose table it translated (None:
    the final GPA)."""
    for event in events:
        if isinstance(event, GuestWalk):
            yield from _guest_walk_references(event.record, memory)
        elif isinstance(event, EptWalk):
            yield from _walk_references(event.record, "ept", None, memory)
        elif isinstance(event, NativeWalk):
            yield from _walk_references(event.record, "native", None, memory)


def _walk_references(
    record: WalkRecord, dimension: str, guest_level: int | None, memory: bool
) -> Iterator[Ref]:
    for i, row in enumerate(record.rows):
        read = row[ROW_READ]
        if (read is not None and read.pwc) == memory:
            continue
        if dimension == "ept":
            yield "ept", guest_level, row[ROW_LEVEL], record, i
        else:
            yield dimension, row[ROW_LEVEL], None, record, i


def _guest_walk_references(record: WalkRecord, memory: bool) -> Iterator[Ref]:
    nested = _nested_walks(record)
    pending = next(nested, None)
    for i, row in enumerate(record.rows):
        while pending is not None and pending[0] == i:
            yield from _walk_references(pending[1], "ept", row[ROW_LEVEL], memory)
            pending = next(nested, None)
        read = row[ROW_READ]
        if (read is not None and read.pwc) != memory:
            yield "guest", row[ROW_LEVEL], None, record, i
    fault = record.fault
    if pending is not None and fault is not None:
        yield from _walk_references(pending[1], "ept", fault.level, memory)


def _nested_walks(record: WalkRecord) -> Iterator[tuple[int, WalkRecord]]:
    """The EPT walks a guest walk made, in order, each with the index of the row it
    translated the table address for (len(rows): the walk that faulted before a row)."""
    for i, row in enumerate(record.rows):
        read = row[ROW_READ]
        for nested in () if read is None else read.nested:
            yield i, nested
    fault = record.fault
    if fault is not None and fault.nested is not None:
        yield len(record.rows), fault.nested
