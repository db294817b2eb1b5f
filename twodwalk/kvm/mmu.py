"""KVM's MMU with EPT (the TDP MMU): how EPT entries come to exist, and how they go away.

EPT starts empty. A guest access to a GPA with no EPT translation causes an EPT violation;
KVM (arch/x86/kvm/mmu/mmu.c `kvm_mmu_page_fault` -> `kvm_tdp_page_fault`) finds the memslot,
turns the GFN into an HVA, asks the host for the page behind it (`hva_to_pfn`, a software walk
of the VMM's page tables that may fault the page in), picks the mapping level
(`kvm_mmu_hugepage_adjust`) and writes EPT entries (tdp_mmu.c `kvm_tdp_mmu_map`, spte.c
`make_spte`). The hardware walks only the EPT; the memslot and host tables are KVM's
software path. MMU notifiers and memslot changes zap entries, so the next access faults again.
"""

from __future__ import annotations

import errno
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from twodwalk.cpumodel import PAGE_SHIFT, PAGE_SIZE, size_text
from twodwalk.ept import (
    EPT_VIOLATION_ACC_INSTR,
    EPT_VIOLATION_ACC_READ,
    EPT_VIOLATION_ACC_WRITE,
    EPT_VIOLATION_EXECUTABLE,
    EPT_VIOLATION_GVA_IS_VALID,
    EPT_VIOLATION_GVA_TRANSLATED,
    EPT_VIOLATION_READABLE,
    EPT_VIOLATION_WRITABLE,
    EptAccessRules,
    Eptp,
)
from twodwalk.errors import TwodwalkError
from twodwalk.formats import ENTRY_SIZE, EPT_MEMTYPE_WB, EptFormat
from twodwalk.host import HostKernel, Process
from twodwalk.kvm.memslots import KvmError, Memslot, Memslots
from twodwalk.pagetables import PageTables
from twodwalk.paging import PFERR_FETCH, PFERR_PRESENT, PFERR_USER, PFERR_WRITE
from twodwalk.trace import KvmStep, SpteWrite, Trace
from twodwalk.walker import Access, TableMemory, WalkRecord, WalkStart, walk

_EPT_RULES = EptAccessRules()
PFERR_GUEST_FINAL = 1 << 32
PFERR_GUEST_PAGE = 1 << 33
MMIO_SPTE_VALUE = 0b110  # VMX_EPT_MISCONFIG_WX_VALUE: write+execute without read
MMIO_GEN_LOW = (3, 10)  # spte.h MMIO_SPTE_GEN_LOW_START/END
MMIO_GEN_HIGH = (52, 62)  # spte.h MMIO_SPTE_GEN_HIGH_START/END


def ept_violation_error_code(qualification: int) -> int:
    """vmx/common.h `__vmx_handle_ept_violation`: the page-fault code KVM derives from the
    exit qualification (a read is reported with the USER bit, as KVM does)."""
    code = PFERR_USER if qualification & EPT_VIOLATION_ACC_READ else 0
    code |= PFERR_WRITE if qualification & EPT_VIOLATION_ACC_WRITE else 0
    code |= PFERR_FETCH if qualification & EPT_VIOLATION_ACC_INSTR else 0
    rwx = EPT_VIOLATION_READABLE | EPT_VIOLATION_WRITABLE | EPT_VIOLATION_EXECUTABLE
    code |= PFERR_PRESENT if qualification & rwx else 0
    if qualification & EPT_VIOLATION_GVA_IS_VALID:
        final = qualification & EPT_VIOLATION_GVA_TRANSLATED
        code |= PFERR_GUEST_FINAL if final else PFERR_GUEST_PAGE
    return code


@dataclass(frozen=True)
class Fixed:
    """KVM fixed the EPT; re-entering the guest retries the access."""


@dataclass(frozen=True)
class EmulateMmio:
    """No RAM behind the GPA (a hole, or a write to a READONLY slot): KVM emulates the access,
    which becomes a KVM_EXIT_MMIO to userspace."""

    gpa: int
    write: bool


Resolution = Fixed | EmulateMmio


class KvmMmu(ABC):
    """What KVM's MMU does the same way with EPT and with shadow paging: register for MMU
    notifiers, find the host page behind a GFN, and zap what the host or a memslot change
    made stale."""

    def __init__(self, host: HostKernel, vmm: Process, memslots: Memslots) -> None:
        self.host = host
        self.vmm = vmm
        self.memslots = memslots
        self.log: list[KvmStep] = []
        self.tlb_flushers: list[Callable[[], None]] = []
        host.notifiers.append(self)

    def flush_remote_tlbs(self) -> None:
        """`kvm_flush_remote_tlbs`: after a zap or a write-protect, no vCPU may keep using
        a translation cached from the old entries."""
        for flush in self.tlb_flushers:
            flush()

    @abstractmethod
    def zap_gfn_range(self, start: int, end: int) -> int:
        """Clear every leaf mapping a GFN in [start, end); return how many were cleared."""

    def _hva_to_pfn(self, hva: int, write: bool, trace: Trace) -> tuple[int, bool, int]:
        """virt/kvm/kvm_main.c `hva_to_pfn`: try a writable page without faulting (the fast
        path), else get_user_pages for the access, then see if it happens to be writable."""
        page = self.host.get_user_page(self.vmm, hva, True, fault_in=False)
        if page is None or not page.writable:
            page = self.host.get_user_page(self.vmm, hva, write, trace)
            if page is None:
                trace.add(
                    KvmStep("hva_to_pfn", "HVA not backed by any VMA: KVM_RUN fails", hva=hva)
                )
                raise KvmError(
                    errno.EFAULT,
                    f"KVM_RUN: guest memory at HVA {hva:#x} is not mapped in the VMM (munmapped?)",
                )
        else:
            trace.add(KvmStep("hva_to_pfn_fast", "host page present and writable", hva=hva))
        trace.add(
            KvmStep(
                "hva_to_pfn",
                f"HVA {hva & ~0xFFF:#x} -> HPA {page.hpa:#x}"
                f" ({size_text(page.page_size)} host page,"
                f" {'writable' if page.writable else 'read-only'})",
                hva=hva & ~0xFFF,
                hpa=page.hpa,
            )
        )
        return page.hpa, page.writable, page.page_size

    def gpa_to_hpa(self, gpa: int, write: bool, trace: Trace | None = None) -> int | None:
        """memslot -> HVA -> host page, as KVM reaches guest memory itself (its software
        walker, its emulator); None for a hole or an HVA in no VMA."""
        memslot = self.memslots.gfn_to_memslot(gpa >> PAGE_SHIFT)
        if memslot is None:
            return None
        hva = memslot.gfn_to_hva(gpa >> PAGE_SHIFT)
        page = self.host.get_user_page(self.vmm, hva, write, trace)
        if page is None:
            return None
        return page.hpa + (hva & (page.page_size - 1)) + (gpa & (PAGE_SIZE - 1))

    def write_guest(self, gpa: int, data: bytes, trace: Trace | None = None) -> int | None:
        """virt/kvm/kvm_main.c `kvm_vcpu_write_guest`: KVM writes guest memory through the
        VMM's mapping (a user write: the host page is faulted in writable, which breaks
        copy-on-write), then `mark_page_dirty_in_slot`. Returns the HPA written; None where
        no memslot, or a read-only one, covers the GPA (KVM's -EFAULT)."""
        if (gpa & (PAGE_SIZE - 1)) + len(data) > PAGE_SIZE:
            raise TwodwalkError(f"gpa={gpa:#x}: a write of {len(data)} bytes crosses a page")
        memslot = self.memslots.gfn_to_memslot(gpa >> PAGE_SHIFT)
        if memslot is None or memslot.readonly:
            return None
        hpa = self.gpa_to_hpa(gpa, True, trace)
        if hpa is None:
            return None
        self.host.memory.write(hpa, data)
        memslot.mark_dirty(gpa >> PAGE_SHIFT)
        return hpa

    def guest_store(self, gpa: int, data: bytes) -> None:
        """What a guest kernel's store to `gpa` (within one page) leaves behind once KVM has
        handled the exits it causes: the bytes in the page behind the GPA (copy-on-write
        broken), the page in the dirty log. Under EPT the store would exit only if the EPT
        refused it (`handle_ept_violation` then maps the page writable and logs it); the
        shadow MMU adds its write tracking (`ShadowMmu.guest_store`)."""
        if self.write_guest(gpa, data) is None:
            memslot = self.memslots.gfn_to_memslot(gpa >> PAGE_SHIFT)
            where = "is in no memslot" if memslot is None else "is in a KVM_MEM_READONLY memslot"
            raise TwodwalkError(f"gpa={gpa:#x} {where}: the guest has no RAM to store to there")

    def _mmio_gen(self) -> int:
        return self.memslots.generation & ((1 << 19) - 1)

    def invalidate_range(self, process: Process, start: int, end: int, reason: str) -> None:
        """`kvm_mmu_notifier_invalidate_range_start`: zap the EPT entries of every GFN whose
        HVA lies in [start, end) of the VMM, so the next access faults and sees the change."""
        if process is not self.vmm:
            return
        for memslot in self.memslots.slots.values():
            lo = max(start, memslot.userspace_addr)
            hi = min(end, memslot.userspace_addr + memslot.memory_size)
            if lo < hi:
                first, last = memslot.hva_to_gfn(lo), memslot.hva_to_gfn(hi - 1)
                zapped = self.zap_gfn_range(first, last + 1)
                self.log.append(
                    KvmStep(
                        "kvm_mmu_notifier_invalidate_range_start",
                        f"{reason}: HVA [{lo:#x}, {hi:#x}) is GFN [{first:#x},"
                        f" {last + 1:#x}); zapped {zapped} EPT entries",
                        gfn=first,
                        hva=lo,
                    )
                )

    def zap_memslot(self, memslot: Memslot) -> int:
        """`kvm_arch_flush_shadow_memslot` before a slot is deleted or moved: with
        KVM_X86_QUIRK_SLOT_ZAP_ALL (on by default) KVM zaps every entry of the VM
        (`kvm_mmu_zap_all_fast`), not only the slot's."""
        zapped = self.zap_all()
        self.log.append(
            KvmStep(
                "kvm_arch_flush_shadow_memslot",
                f"memslot {memslot.id} changes: zapped all {zapped} entries (SLOT_ZAP_ALL quirk)",
                gfn=memslot.base_gfn,
            )
        )
        return zapped

    @abstractmethod
    def zap_all(self) -> int:
        """`kvm_mmu_zap_all_fast`: drop every translation KVM built; return how many."""


class TdpMmu(KvmMmu):
    """KVM's EPT for one VM: the root, the page fault path, zaps, and dirty-log protection."""

    def __init__(self, host: HostKernel, vmm: Process, memslots: Memslots, fmt: EptFormat) -> None:
        super().__init__(host, vmm, memslots)
        self.fmt = fmt
        self.tables = PageTables(fmt, host.memory, host.frames.alloc)
        self.eptp = Eptp(self.tables.root, fmt.levels, fmt.ad)
        self._tables = host.physical_tables

    # --- what the hardware does -------------------------------------------------------------

    def walk(
        self,
        gpa: int,
        access: Access,
        tables: TableMemory | None = None,
        start: WalkStart | None = None,
    ) -> WalkRecord:
        """The CPU's EPT walk of one guest-physical address (SDM 29.3.2), reading the EPT
        through `tables` (default: straight from host memory), from `start` when a
        guest-physical paging-structure cache named a table below the root."""
        tables = tables or self._tables
        return walk(self.fmt, self.eptp.root, gpa, access, tables, _EPT_RULES, start)

    # --- exits ------------------------------------------------------------------------------

    def handle_ept_violation(self, gpa: int, qualification: int, trace: Trace) -> Resolution:
        """vmx `handle_ept_violation` -> `kvm_mmu_page_fault` -> `kvm_tdp_page_fault`."""
        code = ept_violation_error_code(qualification)
        trace.add(
            KvmStep(
                "__vmx_handle_ept_violation",
                f"error code {code:#x} from exit qualification {qualification:#x}",
            )
        )
        if self._fast_page_fault(gpa, code, trace):
            return Fixed()
        return self._direct_page_fault(gpa, bool(code & PFERR_WRITE), trace)

    def handle_ept_misconfig(self, gpa: int, trace: Trace) -> Resolution:
        """`handle_ept_misconfig` -> `handle_mmio_page_fault`: a cached MMIO entry of the
        current memslot generation goes straight to MMIO emulation; a stale one is dropped
        and the fault takes the normal path."""
        found = self.tables.find_leaf(gpa)
        spte = self.host.memory.read_u64(found[0]) if found else 0
        if found and is_mmio_spte(spte) and mmio_spte_generation(spte) == self._mmio_gen():
            trace.add(
                KvmStep(
                    "handle_mmio_page_fault",
                    "MMIO entry of the current generation:"
                    " fast MMIO path, no walk of memslots or host tables",
                    gfn=gpa >> 12,
                )
            )
            return EmulateMmio(gpa, write=False)
        trace.add(
            KvmStep(
                "handle_mmio_page_fault",
                "MMIO entry of an old memslot generation: zap it and take the page fault path",
                gfn=gpa >> 12,
            )
        )
        if found:
            self._set_spte(found[0], 1, 0, trace)
        return self._direct_page_fault(gpa, False, trace)

    # --- the page fault path ----------------------------------------------------------------

    def _fast_page_fault(self, gpa: int, code: int, trace: Trace) -> bool:
        """mmu.c `fast_page_fault`: a write to a present entry that KVM write-protected
        only for dirty logging (MMU-writable set) is fixed in place: set W, mark dirty."""
        if not code & PFERR_WRITE or not code & PFERR_PRESENT:
            return False
        found = self.tables.find_leaf(gpa)
        if found is None:
            return False
        slot_address, level = found
        spte = self.host.memory.read_u64(slot_address)
        if not spte >> 58 & 1 or spte & 2:
            return False
        new = spte | 2 | ((1 << 9) if self.fmt.ad else 0)
        self._set_spte(slot_address, level, new, trace)
        memslot = self.memslots.gfn_to_memslot(gpa >> PAGE_SHIFT)
        if memslot is not None:
            memslot.mark_dirty(gpa >> PAGE_SHIFT)
        trace.add(
            KvmStep(
                "fast_page_fault",
                "write-protected for dirty logging: made writable again and marked dirty",
                gfn=gpa >> PAGE_SHIFT,
            )
        )
        return True

    def _direct_page_fault(self, gpa: int, write: bool, trace: Trace) -> Resolution:
        gfn = gpa >> PAGE_SHIFT
        memslot = self.memslots.gfn_to_memslot(gfn)
        if memslot is None:
            trace.add(KvmStep("kvm_faultin_pfn", "no memslot covers this GFN: MMIO", gfn=gfn))
            self._map(gfn, 1, make_mmio_spte(gpa, self._mmio_gen()), trace)
            return EmulateMmio(gpa, write)
        hva = memslot.gfn_to_hva(gfn) + (gpa & (PAGE_SIZE - 1))
        trace.add(
            KvmStep(
                "__gfn_to_hva_memslot",
                f"memslot {memslot.id}: GFN {gfn:#x} -> HVA {hva & ~0xFFF:#x}",
                gfn=gfn,
                hva=hva & ~0xFFF,
            )
        )
        if write and memslot.readonly:
            trace.add(
                KvmStep(
                    "kvm_handle_error_pfn",
                    "write to a KVM_MEM_READONLY slot: emulate it as an MMIO write",
                    gfn=gfn,
                )
            )
            return EmulateMmio(gpa, True)
        page = self._hva_to_pfn(hva, write, trace)
        writable = page[1] and not memslot.readonly
        level = self._mapping_level(memslot, gfn, hva, page[2], trace)
        size = self.fmt.page_size(level)
        hpa = (page[0] + (hva & (page[2] - 1))) & ~(size - 1)
        self._map(gfn, level, self._make_spte(hpa, level, writable), trace)
        if writable:
            memslot.mark_dirty(gfn)
        return Fixed()

    def _mapping_level(
        self, memslot: Memslot, gfn: int, hva: int, host_size: int, trace: Trace
    ) -> int:
        """`kvm_mmu_hugepage_adjust`: the largest level allowed by EPT, the host mapping,
        the slot's bounds and GFN/HVA alignment, and dirty logging."""
        reasons = []
        level = max(self.fmt.leaf_levels)
        while level > 1:
            pages = 1 << (self.fmt.shift(level) - PAGE_SHIFT)
            head = gfn & ~(pages - 1)
            if self.fmt.page_size(level) > host_size:
                reasons.append(f"{size_text(self.fmt.page_size(level))}: host page is smaller")
            elif memslot.dirty_logging:
                reasons.append("dirty logging maps 4 KiB pages")
            elif head < memslot.base_gfn or head + pages > memslot.base_gfn + memslot.npages:
                reasons.append(f"{size_text(self.fmt.page_size(level))}: crosses the slot edge")
            elif (gfn ^ (hva >> PAGE_SHIFT)) & (pages - 1):
                reasons.append(f"{size_text(self.fmt.page_size(level))}: GFN and HVA misaligned")
            else:
                break
            level -= 1
        trace.add(
            KvmStep(
                "kvm_mmu_hugepage_adjust",
                f"map at level {level}"
                f" ({size_text(self.fmt.page_size(level))})"
                + (f"; not larger: {'; '.join(reasons)}" if reasons else ""),
                gfn=gfn,
                level=level,
            )
        )
        return level

    def _make_spte(self, hpa: int, level: int, writable: bool) -> int:
        """spte.c `make_spte` for EPT: RX, W if writable, WB memory type with IPAT
        (`vmx_get_mt_mask`), A (and D when writable) with EPT A/D, KVM's software bits."""
        fields = {
            "r": 1,
            "x": 1,
            "w": int(writable),
            "mt": EPT_MEMTYPE_WB,
            "ipat": 1,
            "sw": 1,
            "hw": int(writable),
            "mw": int(writable),
            "address": hpa,
        }
        if self.fmt.ad:
            fields.update(a=1, d=int(writable))
        return self.fmt.encode(level, True, **fields)

    def _map(self, gfn: int, level: int, spte: int, trace: Trace) -> None:
        """tdp_mmu.c `kvm_tdp_mmu_map`: link missing tables down to `level`, replacing a huge
        entry in the way, then write the leaf."""
        gpa = gfn << PAGE_SHIFT
        table = self.eptp.root
        for lv in range(self.fmt.levels, level, -1):
            slot = table + ENTRY_SIZE * self.fmt.index(gpa, lv)
            value = self.host.memory.read_u64(slot)
            if not self.fmt.is_present(value) or self.fmt.is_leaf(value, lv) or is_mmio_spte(value):
                child = self.host.frames.alloc()
                link = self.fmt.encode(
                    lv, False, address=child, r=1, w=1, x=1, sw=1, a=int(self.fmt.ad)
                )
                self._set_spte(slot, lv, link, trace)
                value = link
            table = self.fmt.output_address(value, lv)
        self._set_spte(table + ENTRY_SIZE * self.fmt.index(gpa, level), level, spte, trace)

    def _set_spte(self, address: int, level: int, new: int, trace: Trace | None) -> None:
        """Write an EPT entry; flush TLBs when it took away a translation or a right that
        a vCPU may have cached (`mmu_spte_update` returning "flush")."""
        old = self.host.memory.read_u64(address)
        self.host.memory.write_u64(address, new)
        if self.fmt.is_present(old) and not is_mmio_spte(old):
            moved = self.fmt.output_address(old, level) != self.fmt.output_address(new, level)
            if moved or (old & 7) & ~(new & 7):
                self.flush_remote_tlbs()
        leaf = new == 0 or is_mmio_spte(new) or self.fmt.is_leaf(new, level)
        event = SpteWrite("ept", level, address, old, new, leaf)
        if trace is not None:
            trace.add(event)

    # --- zaps: MMU notifiers, memslot changes, dirty logging ----------------------------------

    def zap_gfn_range(self, start: int, end: int) -> int:
        """`kvm_tdp_mmu_zap_leafs`: clear every leaf mapping a GFN in [start, end); a huge
        leaf that overlaps the range goes whole. Returns how many entries were cleared."""
        zapped = 0
        gfn = start
        while gfn < end:
            found = self.tables.find_leaf(gfn << PAGE_SHIFT)
            pages = 1
            if found is not None:
                pages = 1 << (self.fmt.shift(found[1]) - PAGE_SHIFT)
                self.host.memory.write_u64(found[0], 0)
                zapped += 1
            gfn = (gfn & ~(pages - 1)) + pages
        if zapped:
            self.flush_remote_tlbs()
        return zapped

    def zap_all(self) -> int:
        zapped = 0
        for entry in list(self.tables.entries()):
            if entry.leaf and self.host.memory.read_u64(entry.entry_address):
                self.host.memory.write_u64(entry.entry_address, 0)
                zapped += 1
        self.flush_remote_tlbs()
        return zapped

    def write_protect(self, memslot: Memslot, gfns: range | None = None) -> int:
        """Dirty logging: split huge leaves of the slot into 4 KiB leaves (eager page split,
        `kvm_mmu_slot_try_split_huge_pages`) and clear W in the 4 KiB leaves, keeping KVM's
        MMU-writable bit so a write can be fixed fast (`kvm_mmu_slot_remove_write_access`)."""
        gfns = gfns or range(memslot.base_gfn, memslot.base_gfn + memslot.npages)
        count = 0
        for gfn in gfns:
            found = self.tables.find_leaf(gfn << PAGE_SHIFT)
            if found is None or is_mmio_spte(self.host.memory.read_u64(found[0])):
                continue
            if found[1] > 1:
                self._split(*found)
                found = self.tables.find_leaf(gfn << PAGE_SHIFT)
                assert found is not None
            spte = self.host.memory.read_u64(found[0])
            if spte & 2:
                self.host.memory.write_u64(found[0], spte & ~2 & ~(1 << 9))
                count += 1
        if count:
            self.flush_remote_tlbs()
        return count

    def _split(self, slot_address: int, level: int) -> None:
        """Replace a huge leaf by a table of 512 leaves one level down, same rights."""
        spte = self.host.memory.read_u64(slot_address)
        base = self.fmt.output_address(spte, level)
        flags = spte & ~self.fmt.address_mask(level, True)
        if level - 1 == 1:
            flags &= ~(1 << 7)
        child = self.host.frames.alloc()
        small = self.fmt.page_size(level - 1)
        for i in range(512):
            self.host.memory.write_u64(child + 8 * i, flags | (base + i * small))
        link = self.fmt.encode(level, False, address=child, r=1, w=1, x=1, sw=1, a=int(self.fmt.ad))
        self.host.memory.write_u64(slot_address, link)


def make_mmio_spte(gpa: int, generation: int) -> int:
    """spte.c `make_mmio_spte` for EPT: W+X without R (a deliberate misconfiguration), the
    GPA, and the memslot generation in bits 10:3 and 62:52."""
    low_bits = MMIO_GEN_LOW[1] - MMIO_GEN_LOW[0] + 1
    gen = (generation & ((1 << low_bits) - 1)) << MMIO_GEN_LOW[0]
    gen |= (generation >> low_bits) << MMIO_GEN_HIGH[0]
    return MMIO_SPTE_VALUE | gen | (gpa & ~0xFFF & ((1 << 52) - 1))


def is_mmio_spte(spte: int) -> bool:
    """`is_mmio_spte`: the MMIO value in bits 2:0 (R=0, so no real mapping looks like it)."""
    return spte & 7 == MMIO_SPTE_VALUE


def mmio_spte_generation(spte: int) -> int:
    """`get_mmio_spte_generation`."""
    low_bits = MMIO_GEN_LOW[1] - MMIO_GEN_LOW[0] + 1
    low = spte >> MMIO_GEN_LOW[0] & ((1 << low_bits) - 1)
    high = spte >> MMIO_GEN_HIGH[0] & ((1 << (MMIO_GEN_HIGH[1] - MMIO_GEN_HIGH[0] + 1)) - 1)
    return low | high << low_bits
