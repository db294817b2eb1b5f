"""How a walk reads and writes its tables: the one walker (walker.py) with pluggable readers,
as KVM's paging_tmpl.h is one walker compiled for several formats. Each reader here is a
`TableMemory`; the walker does not know which one it has.

- `PhysicalTables`: tables at their own addresses in physical memory (the host's page tables,
  EPT, KVM's shadow tables, bare metal).
- `PageWalkCacheTables`: the same, through an AMD-style page-walk cache.
- `EptTables`: the guest's tables at guest-physical addresses, each table's GPA translated
  through EPT first (the hardware's two-dimensional walk, SDM Vol 3C 29.3.2).
- `MemslotTables`: the guest's tables read by KVM's software walker, GPA -> memslot -> HVA
  -> host page (paging_tmpl.h `FNAME(walk_addr_generic)` under shadow paging).
- `PmlLogging`: an EPT walk that logs its GPA when it sets an EPT dirty bit (PML).

Every A/D update a walk makes goes back through the same reader (`write_entry`), so that a
write made on the guest's behalf passes the second dimension's write check.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from twodwalk.engine.formats import Rights
from twodwalk.engine.memory import PhysicalMemory
from twodwalk.engine.tlb import PageWalkCache
from twodwalk.engine.trace import Trace
from twodwalk.engine.units import hex_repr
from twodwalk.engine.walker import Access, NestedFault, TableMemory, TableRead, WalkRecord


class PhysicalTables:
    """Tables that sit in physical memory at their own addresses (native or host paging)."""

    def __init__(self, memory: PhysicalMemory) -> None:
        self.memory = memory
        self.read_entry: Callable[[int, Access], tuple[int, TableRead | None]] = (
            memory.entry_reader()
        )

    def write_entry(self, address: int, read: TableRead | None, value: int) -> WalkRecord | None:
        self.memory.write_u64(address if read is None else read.physical, value)
        return None


class PageWalkCacheTables:
    """Tables in physical memory read through a page-walk cache: a hit answers without a
    memory reference (`TableRead.pwc`)."""

    def __init__(self, tables: TableMemory, pwc: PageWalkCache) -> None:
        self.tables = tables
        self.pwc = pwc

    def read_entry(
        self, address: int, access: Access
    ) -> tuple[int, TableRead | NestedFault | None]:
        value = self.pwc.lookup(address)
        if value is not None:
            return value, TableRead(value, address, pwc=True)
        return self.tables.read_entry(address, access)

    def write_entry(self, address: int, read: TableRead | None, value: int) -> WalkRecord | None:
        return self.tables.write_entry(address, read, value)


@hex_repr
@dataclass(slots=True)
class GpaTranslation:
    """A GPA's translation: the HPA, the EPT page size and rights, and the EPT walk that
    found it (None when a guest-physical mapping answered); hpa None: the walk failed."""

    hpa: int | None
    page_size: int
    rights: Rights
    record: WalkRecord | None


class GpaPath(Protocol):
    """How the CPU turns a GPA into an HPA under EPT (the vCPU's `GpaTranslator`)."""

    pwc: PageWalkCache | None

    def translate(self, gpa: int, access: Access) -> GpaTranslation: ...


_WRITE = Access.of("write")


class EptTables:
    """Guest tables read through EPT: each table GPA is translated first, by a
    paging-structure cache that already knows the table (`known`: GPA page -> HPA page and
    EPT rights), by a guest-physical mapping, or by an EPT walk. `table_access` is how EPT
    sees the reads: writes with EPT A/D on (SDM 29.3.5); the A/D updates the walk makes are
    writes in any case (`write_entry`)."""

    def __init__(
        self,
        gpa: GpaPath,
        memory: PhysicalMemory,
        known: dict[int, tuple[int, Rights | None]],
        table_access: Access,
    ) -> None:
        self.gpa = gpa
        self.memory = memory
        self.known = known
        self.pwc = gpa.pwc
        self.access = table_access

    def read_entry(self, address: int, access: Access) -> tuple[int, TableRead | NestedFault]:
        page = address & ~0xFFF
        if page in self.known:
            frame, rights = self.known[page]
            hpa = frame | (address & 0xFFF)
            value = self.memory.read_u64(hpa)
            return value, TableRead(value, hpa, cached="paging-structure cache", ept_rights=rights)
        found = self.gpa.translate(address, self.access)
        if found.hpa is None:
            assert found.record is not None
            return 0, NestedFault(found.record)
        cached = None if self.pwc is None else self.pwc.lookup(found.hpa)
        value = self.memory.read_u64(found.hpa) if cached is None else cached
        nested = () if found.record is None else (found.record,)
        how = "guest-physical" if found.record is None else None
        return value, TableRead(value, found.hpa, nested, how, cached is not None, found.rights)

    def write_entry(self, address: int, read: TableRead | None, value: int) -> WalkRecord | None:
        """The processor's A/D update of a guest paging-structure entry is a data write for
        EPT (SDM Vol 3C 29.3.3.2; exit qualification bit 8 = 0), a user write for NPT
        (`table_access`): it needs W in the nested rights of the table's page. Without it,
        the nested walk of the write is the violation (a page KVM maps read-only: dirty
        logging, the zero page, a KSM-merged frame)."""
        assert read is not None
        if read.ept_rights is not None and Rights.W in read.ept_rights:
            self.memory.write_u64(read.physical, value)
            return None
        write = self.gpa.translate(address, self.access if self.access.is_write else _WRITE)
        if write.hpa is None:
            assert write.record is not None
            return write.record
        self.memory.write_u64(write.hpa, value)
        return None


class KvmGuestMemory(Protocol):
    """How KVM reaches guest memory itself (`KvmMmu`): memslot -> HVA -> host page."""

    def gpa_to_hpa(self, gpa: int, write: bool, trace: Trace | None = None) -> int | None: ...

    def write_guest(self, gpa: int, data: bytes, trace: Trace | None = None) -> int | None: ...


class MemslotTables:
    """How KVM's software walker reads guest tables: GPA -> memslot -> HVA -> host page.
    A table in no memslot reads as a not-present entry (`walk_addr_generic` error path)."""

    def __init__(
        self, kvm: KvmGuestMemory, memory: PhysicalMemory, trace: Trace | None = None
    ) -> None:
        self.kvm = kvm
        self.memory = memory
        self.trace = trace

    def read_entry(self, address: int, access: Access) -> tuple[int, TableRead]:
        hpa = self.kvm.gpa_to_hpa(address, write=False)
        if hpa is None:
            return 0, TableRead(0, address)
        value = self.memory.read_u64(hpa)
        return value, TableRead(value, hpa)

    def write_entry(self, address: int, read: TableRead | None, value: int) -> WalkRecord | None:
        """`FNAME(update_accessed_dirty_bits)`: the A/D bits go through the HVA
        (`__try_cmpxchg_user`, a user write that breaks copy-on-write), then the table's GFN
        is marked dirty (`kvm_vcpu_mark_page_dirty`); in a read-only slot they stay unset."""
        self.kvm.write_guest(address, value.to_bytes(8, "little"), self.trace)
        return None


class PmlLogging:
    """The CPU's EPT walk with PML on (SDM 29.3.6): an A/D update that sets an EPT leaf's D
    bit (`dirty_bit`) also logs the walk's GPA (`log`, KVM's `TdpMmu.pml_log` for it)."""

    def __init__(
        self,
        tables: TableMemory,
        memory: PhysicalMemory,
        dirty_bit: int,
        log: Callable[[], None],
    ) -> None:
        self.tables = tables
        self.memory = memory
        self.dirty_bit = dirty_bit
        self.log = log

    def read_entry(
        self, address: int, access: Access
    ) -> tuple[int, TableRead | NestedFault | None]:
        return self.tables.read_entry(address, access)

    def write_entry(self, address: int, read: TableRead | None, value: int) -> WalkRecord | None:
        old = self.memory.read_u64(address if read is None else read.physical)
        refused = self.tables.write_entry(address, read, value)
        if refused is None and value & self.dirty_bit and not old & self.dirty_bit:
            self.log()
        return refused
