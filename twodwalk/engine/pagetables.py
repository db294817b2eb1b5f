"""Building page tables as an operating system does: map, unmap, protect, in real entries.

A guest OS edits its tables in guest RAM, the host kernel edits the VMM's tables in host memory,
KVM edits EPT tables: all of them allocate a zeroed 4 KiB page for a missing table, write a
non-leaf entry pointing at it, and write 8-byte leaf entries (Linux mm/memory.c
`__pte_alloc`, `set_pte_at`). The builder writes through a `PhysicalSpace`, so the same code
serves any of those address spaces; reading the result back is the walker's job, not this one's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from twodwalk.engine.formats import ENTRIES_PER_TABLE, ENTRY_SIZE, EntryFormat
from twodwalk.engine.units import PAGE_SIZE, hex_repr
from twodwalk.errors import AddressError, TwodwalkError, check_aligned, check_int


class PhysicalSpace(Protocol):
    """Anything that holds 8-byte entries at physical addresses (host or guest-physical)."""

    def read_u64(self, address: int) -> int: ...

    def write_u64(self, address: int, value: int) -> None: ...


@hex_repr
@dataclass(frozen=True)
class TreeEntry:
    """A present entry found by walking the whole tree: where it is and what it covers."""

    level: int
    virtual: int
    entry_address: int
    value: int
    leaf: bool


@hex_repr
class Leaf(NamedTuple):
    """Where a present leaf entry is: the entry's address (in the tables' own space) and its
    level (1: a 4 KiB page; 2 or 3: a large page)."""

    slot: int
    level: int


def table_slot(
    space: PhysicalSpace,
    fmt: EntryFormat,
    root: int,
    address: int,
    level: int,
    needs_table: Callable[[int, int], bool],
    link: Callable[[int, int], int] | None,
    top: int | None = None,
) -> int | None:
    """Where the level-`level` entry for `address` lives in the tree at `root` (a table of
    level `top`, the root level by default): walk down, and where an entry `needs_table`
    (value, level), call `link(slot, level)` to make the table below and write the entry
    that links it. The one way every builder here reaches an entry: a guest OS or the host
    kernel (Linux `pud_alloc`, `pmd_alloc`, `pte_alloc`), KVM's EPT (`kvm_tdp_mmu_map`) and
    shadow tables (`FNAME(fetch)` -> `kvm_mmu_get_child_sp`, `link_shadow_page`). Without
    `link`, a missing table gives None."""
    table = root
    for lv in range(fmt.levels if top is None else top, level, -1):
        slot = table + ENTRY_SIZE * fmt.index(address, lv)
        value = space.read_u64(slot)
        if needs_table(value, lv):
            if link is None:
                return None
            table = link(slot, lv)
        else:
            table = fmt.output_address(value, lv)
    return table + ENTRY_SIZE * fmt.index(address, level)


class PageTables:
    """A radix tree of paging structures in `space`, rooted at `root` (allocated if None)."""

    def __init__(
        self,
        fmt: EntryFormat,
        space: PhysicalSpace,
        alloc_table: Callable[[], int],
        root: int | None = None,
        table_fields: Mapping[str, int] | None = None,
    ) -> None:
        """`table_fields`: fields for new non-leaf entries beyond the format's defaults (Linux
        writes host tables with A set: `_PAGE_TABLE`)."""
        self.fmt = fmt
        self.space = space
        self.alloc_table = alloc_table
        self.table_fields = {**fmt.table_defaults, **(table_fields or {})}
        self.root = alloc_table() if root is None else root
        check_aligned("root", check_int("root", self.root, 0, 1 << fmt.maxphyaddr), PAGE_SIZE)

    def map(
        self, virtual: int, physical: int, size: int, *, page_size: int = PAGE_SIZE, **fields: int
    ) -> None:
        """Map [virtual, virtual+size) to [physical, ...) with leaves of `page_size` and the
        given leaf fields (e.g. rw=1, us=1, xd=1 for IA-32e; r=1, w=1, x=1, mt=6 for EPT)."""
        level = self.fmt.level_for_size(page_size)
        self._check_range(virtual, size, page_size)
        check_aligned(
            "physical", check_int("physical", physical, 0, 1 << self.fmt.maxphyaddr), page_size
        )
        check_int(
            "physical + size",
            physical + size,
            1,
            (1 << self.fmt.maxphyaddr) + 1,
            valid=f"physical + size <= {1 << self.fmt.maxphyaddr:#x} (MAXPHYADDR)",
        )
        layout = self.fmt.layout(level, level != 1)
        for key in fields:
            if key == "address" or layout.field(key).key == "ps":
                raise TwodwalkError(f"{key} is set by map() itself: give the leaf's other fields")
        leaves = [(virtual + off, physical + off) for off in range(0, size, page_size)]
        for va, _ in leaves:
            slot = self._slot(va, level, create=False)
            if slot is not None and self.fmt.is_present(self.space.read_u64(slot)):
                raise TwodwalkError(f"virtual={va:#x} is already mapped: unmap it first")
        for va, pa in leaves:
            entry = self.fmt.encode(level, True, address=pa, **{**self.fmt.leaf_defaults, **fields})
            slot = self._slot(va, level, create=True)
            assert slot is not None
            self.space.write_u64(slot, entry)

    def unmap(self, virtual: int, size: int) -> None:
        """Clear the leaves covering [virtual, virtual+size); each must be wholly inside."""
        for slot, _ in list(self._leaves_in(virtual, size)):
            self.space.write_u64(slot, 0)

    def protect(self, virtual: int, size: int, **fields: int) -> None:
        """Rewrite leaf fields (rw, us, xd, pk, ...) of every page in the range, keeping the
        address: what mprotect() does to the PTEs (mm/mprotect.c `change_pte_range`)."""
        for slot, level in list(self._leaves_in(virtual, size)):
            value = self.space.read_u64(slot)
            layout = self.fmt.layout(level, level != 1)
            for key, field_value in fields.items():
                value = layout.field(key).insert(value, field_value)
            self.space.write_u64(slot, value)

    def entry_address(self, virtual: int, level: int, *, create: bool = False) -> int | None:
        """Where the level-`level` entry for `virtual` lives; None if a table on the way is
        missing, unless `create` allocates it (Linux `pte_alloc`, `pmd_alloc`)."""
        self.fmt.decode(0, level)
        return self._slot(virtual, level, create=create)

    def entries(self) -> Iterator[TreeEntry]:
        """Every present entry, depth first in address order: the tree as `dump` shows it."""
        yield from self._entries(self.root, self.fmt.levels, 0)

    def _entries(self, table: int, level: int, base: int) -> Iterator[TreeEntry]:
        for index in range(ENTRIES_PER_TABLE):
            address = table + ENTRY_SIZE * index
            value = self.space.read_u64(address)
            if not self.fmt.is_present(value):
                continue
            virtual = _sign_extend(base | index << self.fmt.shift(level), self.fmt.input_bits)
            leaf = self.fmt.is_leaf(value, level)
            yield TreeEntry(level, virtual, address, value, leaf)
            if not leaf and self.fmt.problem(value, level) is None:
                yield from self._entries(
                    self.fmt.output_address(value, level),
                    level - 1,
                    base | index << self.fmt.shift(level),
                )

    def _check_range(self, virtual: int, size: int, page_size: int) -> None:
        check_int("virtual", virtual, 0, 1 << 64, valid="0 <= virtual < 2**64")
        reason = self.fmt.check_address(virtual)
        if reason is not None:
            raise AddressError(f"virtual: {reason}")
        check_aligned("virtual", virtual, page_size)
        check_int("size", size, 1, 1 << 64, valid="a positive number of bytes")
        check_aligned("size", size, page_size)
        last = virtual + size - 1
        if self.fmt.check_address(last) is not None or (last ^ virtual) >> 63:
            raise AddressError(
                f"virtual + size = {virtual + size:#x} runs past the end of the"
                " canonical half it starts in"
            )

    def _slot(self, virtual: int, level: int, *, create: bool) -> int | None:
        """Address of the level-`level` entry for `virtual`, allocating tables on the way."""

        def needs_table(value: int, lv: int) -> bool:
            if not self.fmt.is_present(value):
                return True
            if self.fmt.is_leaf(value, lv):
                raise TwodwalkError(
                    f"virtual={virtual:#x} lies in a {self.fmt.page_size(lv):#x}-byte page mapped"
                    f" at level {lv}: unmap it before mapping smaller pages there"
                )
            return False

        def link(slot: int, lv: int) -> int:
            table = self.alloc_table()
            self.space.write_u64(
                slot, self.fmt.encode(lv, False, address=table, **self.table_fields)
            )
            return table

        return table_slot(
            self.space, self.fmt, self.root, virtual, level, needs_table, link if create else None
        )

    def _leaves_in(self, virtual: int, size: int) -> Iterator[tuple[int, int]]:
        """(entry address, level) of each present leaf in the range, checked to fit in it."""
        self._check_range(virtual, size, PAGE_SIZE)
        end = virtual + size
        va = virtual
        while va < end:
            found = self.find_leaf(va)
            if found is None:
                va += PAGE_SIZE
                continue
            slot, level = found.slot, found.level
            page = self.fmt.page_size(level)
            if va % page or va + page > end:
                raise TwodwalkError(
                    f"[{virtual:#x}, {end:#x}) covers part of a {page:#x}-byte page at"
                    f" {va - va % page:#x}: give a range that covers whole pages"
                )
            yield slot, level
            va += page

    def find_leaf(self, virtual: int) -> Leaf | None:
        """The present leaf entry mapping `virtual` (where it is, at which level), or None."""
        table = self.root
        for level in range(self.fmt.levels, 0, -1):
            slot = table + ENTRY_SIZE * self.fmt.index(virtual, level)
            value = self.space.read_u64(slot)
            if not self.fmt.is_present(value):
                return None
            if self.fmt.is_leaf(value, level):
                return Leaf(slot, level)
            table = self.fmt.output_address(value, level)
        return None


def _sign_extend(address: int, width: int) -> int:
    """Canonical form of an address `width` bits wide (SDM 3.3.7.1)."""
    if address >> (width - 1) & 1:
        return address | ((1 << 64) - (1 << width))
    return address
