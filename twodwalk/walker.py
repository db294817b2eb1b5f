"""The page-miss handler: one radix-tree walk for every format (guest, host and EPT tables).

The loop is the hardware's (SDM Vol 3A 4.5.4 for IA-32e, Vol 3C 29.3.2 for EPT) and KVM's
software walker (arch/x86/kvm/mmu/paging_tmpl.h `walk_addr_generic`): from the root, read the
entry that the address's index selects, stop if it is not present or has a reserved bit set,
AND its rights into the walk's, and go down until a leaf. Then check the access against the
accumulated rights, and only then set the A bits (and D on the leaf for a write), as KVM's
`update_accessed_dirty_bits` does after the permission check: a faulting walk sets nothing.

The walk returns a `WalkRecord`, KVM's `struct guest_walker` made visible: every entry read,
where it was read from, the rights so far, and the outcome (a translation or a fault *value*).
The record's classes are slotted dataclasses, not frozen ones, because the walk is the engine's
hot path; treat them as read-only values once `walk` has returned them.
Reading a table goes through a `TableMemory`, so that a guest table at a guest-physical address
can be read through a nested (EPT) walk without the loop knowing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

from twodwalk.errors import check_aligned, check_choice, check_int
from twodwalk.formats import ENTRY_SIZE, RIGHTS_BY_MASK, DecodedEntry, EntryFormat, Rights
from twodwalk.memory import U64_LIMIT, PhysicalMemory


class AccessKind(enum.Enum):
    """What the access does with the byte it reaches (SDM 4.6: data read, data write, fetch)."""

    READ = "read"
    WRITE = "write"
    FETCH = "fetch"


@dataclass(frozen=True)
class Access:
    """The access that started a walk, as one immutable value.

    user: a user-mode access (CPL=3 and not implicit). implicit: a supervisor access the CPU
    makes for itself whatever the CPL (GDT/LDT/IDT/TSS, SDM 4.6.1).
    """

    kind: AccessKind
    user: bool = False
    implicit: bool = False

    @classmethod
    def of(cls, kind: AccessKind | str, cpl: int = 0, implicit: bool = False) -> Access:
        """Build an access from a kind name and a CPL, rejecting anything else clearly."""
        known = _ACCESSES.get((kind, cpl, implicit)) if type(cpl) is int else None
        if known is not None:
            return known
        check_int("cpl", cpl, 0, 4, valid="0, 1, 2 or 3")
        return cls(access_kind(kind), user=cpl == 3 and not implicit, implicit=implicit)

    @property
    def is_write(self) -> bool:
        return self.kind is AccessKind.WRITE

    @property
    def is_fetch(self) -> bool:
        return self.kind is AccessKind.FETCH


def access_kind(kind: AccessKind | str) -> AccessKind:
    """`AccessKind` from itself or its name ("read", "write", "fetch")."""
    if isinstance(kind, AccessKind):
        return kind
    return AccessKind(check_choice("kind", kind, tuple(k.value for k in AccessKind)))


_ACCESSES = {
    (name, cpl, implicit): Access(kind, user=cpl == 3 and not implicit, implicit=implicit)
    for kind in AccessKind
    for name in (kind, kind.value)
    for cpl in range(4)
    for implicit in (False, True)
}


class FaultKind(enum.Enum):
    """Why a walk stopped without a translation."""

    NON_CANONICAL = "address cannot be translated (non-canonical)"
    NOT_PRESENT = "entry not present"
    RESERVED = "reserved bit set or entry misconfigured"
    PERMISSION = "access not allowed by the accumulated rights"
    NESTED = "a table address did not translate in the other dimension"


@dataclass(slots=True)
class WalkFault:
    """A fault as a value: what went wrong, at which level (None: before the walk)."""

    kind: FaultKind
    level: int | None
    address: int
    detail: str
    protection_key: bool = False
    nested: WalkRecord | None = None


@dataclass(slots=True)
class Translation:
    """A successful walk: the physical address, the page it lies in and the rights."""

    address: int
    page_size: int
    level: int
    rights: Rights


@dataclass(slots=True)
class TableRead:
    """How one entry was read: its value and the physical address it came from, with the
    nested walk that translated the table's address when the tables live in guest memory,
    or the cache that supplied that translation instead (`cached`)."""

    value: int
    physical: int
    nested: tuple[WalkRecord, ...] = ()
    failed: WalkRecord | None = None
    cached: str | None = None


@dataclass(frozen=True)
class WalkStart:
    """Where a walk begins when a paging-structure cache supplied its upper levels (SDM Vol
    3A 4.10.3): the level of the first table read, its address, the rights above it."""

    level: int
    table: int
    rights: Rights


class TableMemory(Protocol):
    """Where the walker reads and writes entries (host memory directly, or through EPT)."""

    def read_entry(self, address: int, access: Access) -> TableRead: ...

    def write_entry(self, read: TableRead, value: int) -> None: ...


class PhysicalTables:
    """Tables that sit in physical memory at their own addresses (native or host paging)."""

    def __init__(self, memory: PhysicalMemory) -> None:
        self.memory = memory

    def read_entry(self, address: int, access: Access) -> TableRead:
        return TableRead(self.memory.read_u64(address), address)

    def write_entry(self, read: TableRead, value: int) -> None:
        self.memory.write_u64(read.physical, value)


@dataclass(frozen=True)
class Violation:
    """A permission violation found by the access rules, with its explanation."""

    detail: str
    protection_key: bool = False


class AccessRules(Protocol):
    """The format's access-rights check after a complete walk (SDM 4.6 for IA-32e paging,
    Vol 3C 29.3.3.2 for EPT; KVM `permission_fault`)."""

    def violation(self, access: Access, rights: Rights, leaf: int) -> Violation | None: ...


@dataclass(slots=True)
class WalkStep:
    """One entry read during a walk: a row of a hand calculation."""

    level: int
    table: int
    index: int
    entry_address: int
    value: int
    rights: Rights
    read: TableRead
    format: EntryFormat = field(repr=False, compare=False)
    written: int | None = None

    @property
    def entry(self) -> DecodedEntry:
        return self.format.decode(self.value, self.level)


@dataclass(slots=True)
class WalkRecord:
    """Everything a walk did, in order, and how it ended."""

    format: EntryFormat = field(repr=False)
    root: int
    address: int
    access: Access
    steps: tuple[WalkStep, ...]
    outcome: Translation | WalkFault
    start: WalkStart | None = None

    @property
    def fault(self) -> WalkFault | None:
        return self.outcome if isinstance(self.outcome, WalkFault) else None

    @property
    def translation(self) -> Translation | None:
        return self.outcome if isinstance(self.outcome, Translation) else None


def walk(
    fmt: EntryFormat,
    root: int,
    address: int,
    access: Access,
    tables: TableMemory,
    rules: AccessRules,
    start: WalkStart | None = None,
) -> WalkRecord:
    """Translate `address` through the tree rooted at `root`; faults come back as values.
    `start` skips the levels a paging-structure cache already resolved."""
    if type(root) is not int or root & 0xFFF or not 0 <= root < 1 << fmt.maxphyaddr:
        check_aligned("root", check_int("root", root, 0, 1 << fmt.maxphyaddr), 4096)
    if type(address) is not int or not 0 <= address < U64_LIMIT:
        check_int("address", address, 0, U64_LIMIT, valid="0 <= address < 2**64")
    record = _Recorder(fmt, root, address, access, start)
    steps = record.steps
    reason = fmt.check_address(address)
    if reason is not None:
        return record.fault(FaultKind.NON_CANONICAL, None, reason)
    mask = int(fmt.all_rights if start is None else start.rights)
    table = root if start is None else start.table
    shapes, present_bits, bad_mt_xwr = fmt.shapes, fmt.present_bits, fmt.bad_mt_xwr
    for level in range(fmt.levels if start is None else start.level, 0, -1):
        shape = shapes[level]
        index = (address >> shape.shift) & 0x1FF
        read = tables.read_entry(table + ENTRY_SIZE * index, access)
        if read.failed is not None:
            return record.fault(
                FaultKind.NESTED, level, "reading the table entry faulted", nested=read.failed
            )
        value = read.value
        present = value & present_bits
        if present:
            mask &= int(fmt.rights(value))
        rights = RIGHTS_BY_MASK[mask]
        steps.append(
            WalkStep(level, table, index, table + ENTRY_SIZE * index, value, rights, read, fmt)
        )
        if not present:
            return record.fault(
                FaultKind.NOT_PRESENT,
                level,
                f"{fmt.level_name(level)} at {read.physical:#x} is not present",
            )
        large = value & 0x80
        reserved = value & (shape.reserved_large if large else shape.reserved_small)
        if reserved or bad_mt_xwr >> (value & 0x3F) & 1:
            return record.fault(FaultKind.RESERVED, level, fmt.problem(value, level) or "")
        if level == 1 or (large and shape.large_ok):
            break
        table = value & shape.table_mask
    violation = rules.violation(access, rights, value)
    if violation is not None:
        return record.fault(
            FaultKind.PERMISSION, level, violation.detail, protection_key=violation.protection_key
        )
    _set_accessed_dirty(fmt, record, access, tables)
    page_size = 1 << shape.shift
    physical = (value & shape.leaf_mask) | (address & (page_size - 1))
    return record.finish(Translation(physical, page_size, level, rights))


def _set_accessed_dirty(
    fmt: EntryFormat, record: _Recorder, access: Access, tables: TableMemory
) -> None:
    """Set A in every entry used and D in the leaf on a write (SDM 4.8; KVM
    `update_accessed_dirty_bits`); an entry that already has them is not written."""
    if fmt.accessed_bit is None:
        return
    last = len(record.steps) - 1
    for i, step in enumerate(record.steps):
        new = step.value | 1 << fmt.accessed_bit
        if i == last and access.is_write and fmt.dirty_bit is not None:
            new |= 1 << fmt.dirty_bit
        if new != step.value:
            tables.write_entry(step.read, new)
            step.written = new


class _Recorder:
    """Collects the steps of one walk and seals them into a `WalkRecord`."""

    def __init__(
        self, fmt: EntryFormat, root: int, address: int, access: Access, start: WalkStart | None
    ) -> None:
        self.fmt, self.root, self.address, self.access = fmt, root, address, access
        self.start = start
        self.steps: list[WalkStep] = []

    def fault(
        self,
        kind: FaultKind,
        level: int | None,
        detail: str,
        *,
        protection_key: bool = False,
        nested: WalkRecord | None = None,
    ) -> WalkRecord:
        return self.finish(WalkFault(kind, level, self.address, detail, protection_key, nested))

    def finish(self, outcome: Translation | WalkFault) -> WalkRecord:
        return WalkRecord(
            self.fmt, self.root, self.address, self.access, tuple(self.steps), outcome, self.start
        )
