"""The guest OS: its page tables, written as real entries into guest RAM.

A guest kernel keeps its page tables in its own RAM, at guest-physical addresses, and edits
them with ordinary stores. Every write here is such a guest store (`Machine.guest_store`), so
it meets what a store meets in the real system: under EPT the page is logged by dirty logging
and copy-on-write is broken; under shadow paging a store to a page table KVM shadows traps, is
emulated and zaps the shadow entries derived from it (`kvm_mmu_track_write`). Edits do not
flush the TLB: as on real hardware, the guest invalidates with INVLPG or a CR3 load.
Page-table pages are taken from the top of guest RAM downward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from twodwalk.engine.cpuid import CpuModel
from twodwalk.engine.formats import ia32e_format
from twodwalk.engine.pagetables import PageTables
from twodwalk.engine.paging import PFERR_PRESENT, PFERR_RSVD, PFERR_WRITE, PageFault
from twodwalk.engine.trace import Trace
from twodwalk.engine.units import PAGE_SIZE
from twodwalk.errors import TwodwalkError, check_aligned, check_int


class GuestMemory(Protocol):
    """What a guest kernel's memory is to this model: a VM's (`Vm`), or a nested guest's
    (`nested.L2Memory`), read as its VMM reads it and written with guest stores."""

    @property
    def cpu(self) -> CpuModel: ...

    def read_gpa(self, gpa: int, size: int) -> bytes: ...

    def guest_store(self, gpa: int, data: bytes, trace: Trace | None = None) -> None: ...


class GuestRam:
    """Guest RAM as the guest kernel sees it: 8-byte entries at GPAs (a `PhysicalSpace`),
    read as the VMM would read them and written with guest stores (`Vm.guest_store`).
    While `trace` is set, what the stores cost (under shadow paging, an exit each to a
    shadowed table) is recorded there."""

    def __init__(self, vm: GuestMemory) -> None:
        self.vm = vm
        self.trace: Trace | None = None

    def read_u64(self, address: int) -> int:
        return int.from_bytes(self.vm.read_gpa(address, 8), "little")

    def write_u64(self, address: int, value: int) -> None:
        self.vm.guest_store(address, value.to_bytes(8, "little"), self.trace)


class GuestOS:
    """The guest kernel's page-table code (arch/x86/mm in a Linux guest, say)."""

    def __init__(self, vm: GuestMemory, levels: int, ram_top: int) -> None:
        self.vm = vm
        self.format = ia32e_format(levels, vm.cpu, nxe=True)
        self._next_table = ram_top
        self._next_frame = 0  # the next data frame demand paging hands out (upward)
        self._demand_page_size = 0  # 0: no demand paging (`enable_demand_paging`)
        self._ram = GuestRam(vm)
        self.page_tables = PageTables(self.format, self._ram, self.alloc_table)

    def alloc_table(self) -> int:
        """A zeroed page for a new page table, from the top of guest RAM down."""
        if self._next_table - PAGE_SIZE < self._next_frame:
            raise _ram_full(self._next_frame)
        self._next_table -= PAGE_SIZE
        self.vm.guest_store(self._next_table, bytes(PAGE_SIZE))
        return self._next_table

    def map(
        self, gva: int, gpa: int, size: int, *, page_size: int = PAGE_SIZE, **fields: int
    ) -> None:
        """Map [gva, gva+size) to [gpa, ...) in the guest's tables (e.g. rw=1, us=1, xd=1)."""
        self.page_tables.map(gva, gpa, size, page_size=page_size, **fields)

    def unmap(self, gva: int, size: int) -> None:
        self.page_tables.unmap(gva, size)

    def protect(self, gva: int, size: int, *, trace: Trace | None = None, **fields: int) -> None:
        """Rewrite leaf fields of every page in the range (mprotect, or fork write-protecting
        the parent's PTEs in `copy_present_pte`); `trace` gets what the stores cost."""
        with self._stores_into(trace):
            self.page_tables.protect(gva, size, **fields)

    def enable_demand_paging(self, first_gpa: int, page_size: int = PAGE_SIZE) -> None:
        """Map guest RAM on the first touch of any unmapped address, as Linux maps anonymous
        memory in `do_anonymous_page` (or `do_huge_pmd_anonymous_page` for 2 MiB): for a
        replayed trace, whose process's mappings the model does not know, every page is
        writable, user and executable. Frames come from `first_gpa` upward, page tables
        from the top of RAM downward."""
        check_aligned(
            "first_gpa", check_int("first_gpa", first_gpa, 0, self._next_table), page_size
        )
        self._next_frame = first_gpa
        self._demand_page_size = page_size

    def handle_page_fault(self, fault: PageFault, trace: Trace | None = None) -> bool:
        """The guest kernel's #PF handler for the faults this model resolves: a write to a
        page a fork write-protected, and, with demand paging on, a first touch. True if
        handled: the guest then retries the access."""
        return self.handle_write_protect_fault(fault, trace) or self._demand_page(fault, trace)

    def _demand_page(self, fault: PageFault, trace: Trace | None) -> bool:
        size = self._demand_page_size
        if not size or fault.error_code & (PFERR_PRESENT | PFERR_RSVD):
            return False
        gpa = self._next_frame
        if gpa + size > self._next_table - 8 * PAGE_SIZE:  # room for a few more tables
            raise _ram_full(gpa)
        self._next_frame = gpa + size
        with self._stores_into(trace):
            self.map(fault.address & ~(size - 1), gpa, size, page_size=size, rw=1, us=1, xd=0)
        return True

    def handle_write_protect_fault(self, fault: PageFault, trace: Trace | None = None) -> bool:
        """mm/memory.c `do_wp_page` for a page this process alone maps again (its fork's
        child has exec'd or exited): `wp_page_reuse` makes the PTE young, dirty and
        writable (`ptep_set_access_flags`, no TLB flush: x86 leaves a stale read-only entry
        to a spurious fault). True if `fault` was such a write to a present read-only page
        and is handled; the guest then retries the store."""
        wants = PFERR_PRESENT | PFERR_WRITE
        if fault.error_code & (wants | PFERR_RSVD) != wants:
            return False
        leaf = self.page_tables.find_leaf(fault.address)
        if leaf is None or leaf.level != 1:
            return False
        if self.format.layout(1, True).field("rw").extract(self._ram.read_u64(leaf.slot)):
            return False  # the PTE allows the write: a directory above refused it
        page = fault.address & ~(PAGE_SIZE - 1)
        self.protect(page, PAGE_SIZE, trace=trace, a=1, d=1, rw=1)
        return True

    @contextmanager
    def _stores_into(self, trace: Trace | None) -> Iterator[None]:
        """Record the guest stores made inside the block into `trace`."""
        self._ram.trace = trace
        try:
            yield
        finally:
            self._ram.trace = None


def _ram_full(used: int) -> TwodwalkError:
    return TwodwalkError(
        f"guest RAM is full: demand paging has handed out {used:#x} bytes and the page tables"
        " need the rest; give the machine more guest_ram"
    )
