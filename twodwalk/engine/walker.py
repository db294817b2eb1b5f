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
hot path (a record keeps compact rows and spells them out as steps on demand); treat them as
read-only values once `walk` has returned them.
Reading a table goes through a `TableMemory`, so that a guest table at a guest-physical address
can be read through a nested (EPT) walk without the loop knowing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Final, Protocol

from twodwalk.engine.formats import ENTRY_SIZE, RIGHTS_BY_MASK, DecodedEntry, EntryFormat, Rights
from twodwalk.engine.memory import U64_LIMIT
from twodwalk.engine.units import hex_repr
from twodwalk.errors import check_aligned, check_choice, check_int


class AccessKind(enum.Enum):
    """What the access does with the byte it reaches (SDM 4.6: data read, data write, fetch)."""

    READ = "read"
    WRITE = "write"
    FETCH = "fetch"


_KIND_CODES = {AccessKind.READ: 0, AccessKind.WRITE: 1, AccessKind.FETCH: 2}


@dataclass(frozen=True)
class Access:
    """The access that started a walk, as one immutable value.

    user: a user-mode access (CPL=3 and not implicit). implicit: a supervisor access the CPU
    makes for itself whatever the CPL (GDT/LDT/IDT/TSS, SDM 4.6.1).
    """

    kind: AccessKind
    user: bool = False
    implicit: bool = False
    code: int = field(init=False, repr=False, compare=False)  # the fields as a 4-bit int

    def __post_init__(self) -> None:
        kind = _KIND_CODES[self.kind]
        object.__setattr__(self, "code", kind | self.user << 2 | self.implicit << 3)

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


@hex_repr
@dataclass(slots=True)
class WalkFault:
    """A fault as a value: what went wrong, at which level (None: before the walk)."""

    kind: FaultKind
    level: int | None
    address: int
    detail: str
    protection_key: bool = False
    nested: WalkRecord | None = None
    reached: int | None = None  # a PERMISSION fault: where the leaf led, had it been allowed


@hex_repr
@dataclass(slots=True)
class Translation:
    """A successful walk: the physical address, the page it lies in and the rights."""

    address: int
    page_size: int
    level: int
    rights: Rights


@hex_repr
@dataclass(slots=True)
class TableRead:
    """How one entry was read: its value and the physical address it came from, with the
    nested walk that translated the table's address when the tables live in guest memory,
    or the cache that supplied that translation instead (`cached`)."""

    value: int
    physical: int
    nested: tuple[WalkRecord, ...] = ()
    cached: str | None = None
    pwc: bool = False  # the entry itself came from a page-walk cache: no memory reference
    ept_rights: Rights | None = None  # EPT rights of the table's page: may the CPU write A/D?


@dataclass(frozen=True, slots=True)
class NestedFault:
    """A table whose address did not translate in the other dimension (an EPT violation or
    misconfiguration on a guest table's GPA): the failed walk, in place of a read."""

    record: WalkRecord


@hex_repr
@dataclass(slots=True)
class WalkStart:
    """Where a walk begins when a paging-structure cache supplied its upper levels (SDM Vol
    3A 4.10.3): the level of the first table read, its address, the rights above it."""

    level: int
    table: int
    rights: Rights


class TableMemory(Protocol):
    """Where the walker reads and writes entries: the readers are side by side in tables.py.

    `read_entry` gives the value and, when the entry was not simply read at `address` in
    physical memory, how it was read (a `TableRead`), or a `NestedFault` when the table's
    address did not translate. `write_entry` writes an A/D update back to the entry at
    `address` (in the walk's own space) that was read as `read`: a write the processor or
    KVM makes on the guest's behalf, so it passes the second dimension's write check; a
    refused write comes back as the failed nested walk (an EPT violation)."""

    def read_entry(
        self, address: int, access: Access
    ) -> tuple[int, TableRead | NestedFault | None]: ...

    def write_entry(
        self, address: int, read: TableRead | None, value: int
    ) -> WalkRecord | None: ...


@dataclass(frozen=True)
class Violation:
    """A permission violation found by the access rules, with its explanation."""

    detail: str
    protection_key: bool = False


class AccessRules(Protocol):
    """The format's access-rights check after a complete walk (SDM 4.6 for IA-32e paging,
    Vol 3C 29.3.3.2 for EPT; KVM `permission_fault`)."""

    def violation(self, access: Access, rights: Rights, leaf: int) -> Violation | None: ...


@hex_repr
@dataclass(frozen=True, slots=True)
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


Row = tuple[int, int, int, int, int, "TableRead | None"]
"""One entry read, as the walker keeps it on its hot path: a plain tuple, because building a
NamedTuple for each of a 2D walk's 24 reads cost a fifth of the cold walk. Read its fields by
name with the indices below (`WalkRecord.steps` spells rows out as `WalkStep`s)."""
ROW_LEVEL: Final = 0
ROW_TABLE: Final = 1  # the table's address in the walk's own space
ROW_INDEX: Final = 2  # the address's index field at this level: the entry is table[index]
ROW_VALUE: Final = 3
ROW_RIGHTS: Final = 4  # the `Rights` mask accumulated down to this entry
ROW_READ: Final = 5  # how it was read (None: at table + 8 * index in physical memory)


@hex_repr
@dataclass(slots=True)
class WalkRecord:
    """Everything a walk did, in order, and how it ended.

    The walker keeps each entry read as a compact `Row` (the walk is the engine's hot path);
    `steps` spells the rows out as `WalkStep`s the first time someone looks."""

    format: EntryFormat = field(repr=False)
    root: int
    address: int
    access: Access
    rows: tuple[Row, ...] = field(repr=False)
    outcome: Translation | WalkFault
    start: WalkStart | None = None
    written: tuple[int | None, ...] | None = field(default=None, repr=False)
    _steps: tuple[WalkStep, ...] | None = field(default=None, repr=False, compare=False)

    @property
    def steps(self) -> tuple[WalkStep, ...]:
        """The entries read, in order, with what the walk wrote back into each."""
        if self._steps is None:
            fmt, written = self.format, self.written or (None,) * len(self.rows)
            self._steps = tuple(
                WalkStep(
                    level,
                    table,
                    index,
                    table + ENTRY_SIZE * index,
                    value,
                    RIGHTS_BY_MASK[mask],
                    TableRead(value, table + ENTRY_SIZE * index) if read is None else read,
                    fmt,
                    wrote,
                )
                for (level, table, index, value, mask, read), wrote in zip(
                    self.rows, written, strict=True
                )
            )
        return self._steps

    @property
    def leaf(self) -> int:
        """The last entry read as it is now in memory (with any A/D bits the walk set)."""
        wrote = self.written[-1] if self.written else None
        return self.rows[-1][ROW_VALUE] if wrote is None else wrote

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
    *,
    accessed_dirty: bool = True,
) -> WalkRecord:
    """Translate `address` through the tree rooted at `root`; faults come back as values.
    `start` skips the levels a paging-structure cache already resolved. `accessed_dirty`
    False: a software look-up that reads entries and writes none, as Linux's
    get_user_pages (mm/gup.c `follow_page_pte`) or QEMU's debug walk do."""
    if type(root) is not int or root & 0xFFF or not 0 <= root < 1 << fmt.maxphyaddr:
        check_aligned("root", check_int("root", root, 0, 1 << fmt.maxphyaddr), 4096)
    if type(address) is not int or not 0 <= address < U64_LIMIT:
        check_int("address", address, 0, U64_LIMIT, valid="0 <= address < 2**64")
    rows: list[Row] = []
    levels, top_shift, valid_tops, all_rights, shapes, present_bits, bad_mt_xwr, rights_by_bits = (
        fmt.walk_constants
    )
    if address >> top_shift not in valid_tops:
        return _fault(fmt, root, address, access, start, rows, FaultKind.NON_CANONICAL, None)
    if start is None:
        mask, table, level = all_rights, root, levels
    else:
        mask, table, level = int(start.rights), start.table, start.level
    read_entry = tables.read_entry
    while True:
        shift, reserved_small, reserved_large, large_ok, table_mask, leaf_mask = shapes[level]
        index = (address >> shift) & 0x1FF
        value, read = read_entry(table + ENTRY_SIZE * index, access)
        if read is not None and isinstance(read, NestedFault):  # None: the common case
            return _fault(
                fmt, root, address, access, start, rows, FaultKind.NESTED, level, read.record
            )
        present = value & present_bits
        if present:
            mask &= rights_by_bits[value & 7 | value >> 60 & 8]  # `fmt.rights_mask(value)`
        rows.append((level, table, index, value, mask, read))
        if not present:
            return _fault(fmt, root, address, access, start, rows, FaultKind.NOT_PRESENT, level)
        large = value & 0x80
        if value & (reserved_large if large else reserved_small) or (
            bad_mt_xwr >> (value & 0x3F) & 1
        ):
            return _fault(fmt, root, address, access, start, rows, FaultKind.RESERVED, level)
        if level == 1 or (large and large_ok):
            break
        table = value & table_mask
        level -= 1
    rights = RIGHTS_BY_MASK[mask]
    page_size = 1 << shift
    physical = (value & leaf_mask) | (address & (page_size - 1))
    violation = rules.violation(access, rights, value)
    if violation is not None:
        fault = WalkFault(
            FaultKind.PERMISSION,
            level,
            address,
            violation.detail,
            violation.protection_key,
            reached=physical,
        )
        return WalkRecord(fmt, root, address, access, tuple(rows), fault, start)
    written = _set_accessed_dirty(fmt, rows, access, tables) if accessed_dirty else None
    if written is not None and isinstance(written, WalkRecord):  # an update was refused
        level = next(
            r[ROW_LEVEL]
            for r in rows
            if r[ROW_TABLE] + ENTRY_SIZE * r[ROW_INDEX] == written.address
        )
        return _fault(
            fmt, root, address, access, start, rows, FaultKind.NESTED, level, written, True
        )
    translation = Translation(physical, page_size, level, rights)
    return WalkRecord(fmt, root, address, access, tuple(rows), translation, start, written)


def _set_accessed_dirty(
    fmt: EntryFormat, rows: list[Row], access: Access, tables: TableMemory
) -> tuple[int | None, ...] | WalkRecord | None:
    """Set A in every entry used and D in the leaf on a write (SDM 4.8; KVM
    `update_accessed_dirty_bits`); an entry that already has them is not written. Returns
    what was written to each row's entry (None where nothing), None if nothing was, or the
    failed nested walk of an update the second dimension refused (SDM Vol 3C 29.3.3.2:
    A/D updates to guest paging structures are data writes for EPT)."""
    if fmt.accessed_bit is None:
        return None
    accessed = 1 << fmt.accessed_bit
    dirty = 0
    if access.kind is AccessKind.WRITE and fmt.dirty_bit is not None:
        dirty = 1 << fmt.dirty_bit
    last = len(rows) - 1
    for row in rows:
        if not row[ROW_VALUE] & accessed:
            break
    else:
        if rows[last][ROW_VALUE] & dirty == dirty:
            return None  # the usual case once a page has been used: nothing to write
    written: list[int | None] | None = None
    for i, (_, table, index, value, _, read) in enumerate(rows):
        new = value | accessed | (dirty if i == last else 0)
        if new != value:
            refused = tables.write_entry(table + ENTRY_SIZE * index, read, new)
            if refused is not None:
                return refused
            written = written or [None] * len(rows)
            written[i] = new
    return None if written is None else tuple(written)


def _fault(
    fmt: EntryFormat,
    root: int,
    address: int,
    access: Access,
    start: WalkStart | None,
    rows: list[Row],
    kind: FaultKind,
    level: int | None,
    nested: WalkRecord | None = None,
    updating: bool = False,
) -> WalkRecord:
    """Seal a walk that stopped: the fault value says why, in words a learner can check.
    `updating`: the nested fault came from writing an A/D update, not from a read."""
    detail = _fault_detail(fmt, address, rows, kind, nested if updating else None)
    fault = WalkFault(kind, level, address, detail, False, nested)
    return WalkRecord(fmt, root, address, access, tuple(rows), fault, start)


def _fault_detail(
    fmt: EntryFormat,
    address: int,
    rows: list[Row],
    kind: FaultKind,
    update: WalkRecord | None = None,
) -> str:
    if kind is FaultKind.NON_CANONICAL:
        return fmt.check_address(address) or ""
    if update is not None:
        return (
            f"setting the accessed/dirty flags of the entry at {update.address:#x} needs a"
            " write there, which the other dimension refused"
        )
    if kind is FaultKind.NESTED:
        return "reading the table entry faulted"
    level, table, index, value, _, _ = rows[-1]
    if kind is FaultKind.NOT_PRESENT:  # the entry's address in the walk's own space
        return f"{fmt.level_name(level)} at {table + ENTRY_SIZE * index:#x} is not present"
    return fmt.problem(value, level) or ""
