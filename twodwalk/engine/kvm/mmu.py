"""KVM's MMU with EPT (the TDP MMU): how EPT entries come to exist, and how they go away.

EPT starts empty. A guest access to a GPA with no EPT translation causes an EPT violation;
KVM (arch/x86/kvm/mmu/mmu.c `kvm_mmu_page_fault` -> `kvm_tdp_page_fault`) finds the memslot,
turns the GFN into an HVA, asks the host for the page behind it (`hva_to_pfn`, a software walk
of the VMM's page tables that may fault the page in), picks the mapping level
(`kvm_mmu_hugepage_adjust`) and writes EPT entries (tdp_mmu.c `kvm_tdp_mmu_map`, spte.c
`make_spte`). The hardware walks only the EPT; the memslot and host tables are KVM's
software path. MMU notifiers and memslot changes zap entries, so the next access faults again.

SPTE layouts are Linux 6.18's (arch/x86/kvm/mmu/spte.h): every shadow-present SPTE has KVM's
SPTE_MMU_PRESENT bit 11; an EPT SPTE also has the suppress-#VE bit 63, part of
`shadow_present_mask` (`kvm_mmu_set_ept_masks`); a zapped or never-filled SPTE holds
SHADOW_NONPRESENT_VALUE, bit 63 alone (x86-64, since Linux 6.10), and new table pages are filled
with it. An MMIO SPTE keeps the memslot generation in bits 10:3 and 62:52.
"""

from __future__ import annotations

import errno
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass

from twodwalk.engine.ept import (
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
    qualification_names,
)
from twodwalk.engine.formats import EPT_MEMTYPE_WB, EptFormat, Ia32eFormat
from twodwalk.engine.host import HostKernel, Process
from twodwalk.engine.kvm.memslots import BoundFile, KvmError, Memslot, Memslots
from twodwalk.engine.npt import NPT_RULES, exit_info1_names
from twodwalk.engine.pagetables import Leaf, PageTables, TreeEntry, table_slot
from twodwalk.engine.paging import (
    PFERR_FETCH,
    PFERR_PRESENT,
    PFERR_RSVD,
    PFERR_USER,
    PFERR_WRITE,
    bit_names,
)
from twodwalk.engine.tables import PmlLogging
from twodwalk.engine.trace import KvmStep, SpteWrite, Trace
from twodwalk.engine.units import PAGE_SHIFT, PAGE_SIZE, hex_repr, size_text
from twodwalk.engine.walker import (
    Access,
    AccessRules,
    TableMemory,
    WalkRecord,
    WalkStart,
    walk,
)
from twodwalk.errors import TwodwalkError

_EPT_RULES = EptAccessRules()
PFERR_GUEST_FINAL = 1 << 32
PFERR_GUEST_PAGE = 1 << 33

# The bits of the page-fault code KVM derives from an EPT violation, by their names in
# arch/x86/include/asm/kvm_host.h (PFERR_*_MASK), and what a set bit says there.
KVM_EPT_ERROR_CODE_BITS: tuple[tuple[int, str, str], ...] = (
    (PFERR_PRESENT, "PFERR_PRESENT_MASK", "the EPT entries allowed some of R, W, X"),
    (PFERR_WRITE, "PFERR_WRITE_MASK", "the access was a write"),
    (PFERR_USER, "PFERR_USER_MASK", "the access was a read (KVM marks EPT-violation reads so)"),
    (PFERR_FETCH, "PFERR_FETCH_MASK", "the access was an instruction fetch"),
    (PFERR_GUEST_FINAL, "PFERR_GUEST_FINAL_MASK", "to the final GPA (qualification bit 8)"),
    (PFERR_GUEST_PAGE, "PFERR_GUEST_PAGE_MASK", "to a guest page-table entry (bit 7, not 8)"),
)
MMIO_SPTE_VALUE = 0b110  # VMX_EPT_MISCONFIG_WX_VALUE: write+execute without read
MMIO_GEN_LOW = (3, 10)  # spte.h MMIO_SPTE_GEN_LOW_START/END
MMIO_GEN_HIGH = (52, 62)  # spte.h MMIO_SPTE_GEN_HIGH_START/END
MMIO_SPTE_GEN_MASK = (1 << 19) - 1  # 8 low + 11 high generation bits
SHADOW_NONPRESENT_VALUE = 1 << 63  # spte.h, x86-64 since Linux 6.10
SPTE_MMU_PRESENT_MASK = 1 << 11  # spte.h: set in every shadow-present SPTE
VMX_EPT_SUPPRESS_VE_BIT = 1 << 63  # in EPT shadow_present_mask and shadow_mmio_mask
EPT_MMIO_MASK = 0b111 | VMX_EPT_SUPPRESS_VE_BIT  # kvm_mmu_set_ept_masks: RWX | SUPPRESS_VE
EPT_SPTE_MMU_WRITABLE = 1 << 58
PT_WRITABLE_MASK = 1 << 1  # W in x86 PTEs, and in EPT entries
PT_USER_MASK = 1 << 2
PT_PAGE_SIZE_MASK = 1 << 7
VMX_EPT_ACCESS_BIT = 1 << 8  # vmx.h: EPT A and D, with EPTP bit 6 (SDM Vol 3C 29.3.5)
VMX_EPT_DIRTY_BIT = 1 << 9
PML_LOG_NR_ENTRIES = 512  # the PML buffer: one 4 KiB page of GPAs (SDM 29.3.6)
ALL_LEVELS = range(1, 6)
PG_LEVEL_4K = range(1, 2)
HUGE_LEVELS = range(2, 6)  # PG_LEVEL_2M and up


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


@hex_repr
@dataclass(frozen=True)
class EmulateMmio:
    """No RAM behind the GPA (a hole, or a write to a READONLY slot): KVM emulates the access,
    which becomes a KVM_EXIT_MMIO to userspace."""

    gpa: int
    write: bool


@dataclass(frozen=True)
class RetPfRetry:
    """RET_PF_RETRY: KVM installed nothing (a host invalidation raced with the fault);
    re-entering the guest repeats the access, which faults again."""


Resolution = Fixed | EmulateMmio | RetPfRetry


def is_shadow_present_pte(spte: int) -> bool:
    """spte.h `is_shadow_present_pte`: KVM's own bit 11, not the hardware's present bits (an
    MMIO SPTE and SHADOW_NONPRESENT_VALUE lack it)."""
    return bool(spte & SPTE_MMU_PRESENT_MASK)


def mmio_generation_bits(generation: int) -> int:
    """spte.c `generation_mmio_spte_mask`: the memslot generation (19 bits) spread over
    bits 10:3 and 62:52 of an MMIO SPTE."""
    low_bits = MMIO_GEN_LOW[1] - MMIO_GEN_LOW[0] + 1
    gen = generation & MMIO_SPTE_GEN_MASK
    return (gen & ((1 << low_bits) - 1)) << MMIO_GEN_LOW[0] | (gen >> low_bits) << MMIO_GEN_HIGH[0]


@dataclass(frozen=True)
class SpteMasks:
    """spte.h's masks, which KVM sets once for the whole host: `kvm_mmu_set_ept_masks` on
    VMX with EPT, the x86 defaults of `kvm_mmu_reset_all_pte_masks` otherwise (SVM's NPT,
    and shadow paging on either vendor). `make_spte`, `make_nonleaf_spte`, the MMIO SPTE and
    every bit KVM later tests or clears come from here, so one TDP MMU serves both formats.
    `rights` are the hardware permission bits whose loss must flush TLBs; `tree` names the
    tree in traces."""

    tree: str
    present: int  # shadow_present_mask
    user: int  # shadow_user_mask
    x: int  # shadow_x_mask
    nx: int  # shadow_nx_mask
    accessed: int  # shadow_accessed_mask
    dirty: int  # shadow_dirty_mask
    host_writable: int  # shadow_host_writable_mask
    mmu_writable: int  # shadow_mmu_writable_mask
    memtype: int  # what `get_mt_mask` adds (VMX only)
    rights: int
    mmio_value: int  # shadow_mmio_value (0: MMIO caching off)
    mmio_mask: int  # shadow_mmio_mask
    mmio_access: int  # shadow_mmio_access_mask, in SPTE bit positions

    def make_mmio_spte(self, gpa: int, generation: int, access: int) -> int:
        """spte.c `make_mmio_spte`: the MMIO value, the access bits the mask keeps, the GPA,
        and the memslot generation in bits 10:3 and 62:52. (No L1TF bits:
        `shadow_nonpresent_or_rsvd_mask` is 0 on an unaffected CPU.)"""
        address = gpa & ~0xFFF & ((1 << 52) - 1)
        gen = mmio_generation_bits(generation)
        return self.mmio_value | (access & self.mmio_access) | gen | address

    def is_mmio_spte(self, spte: int) -> bool:
        """spte.h `is_mmio_spte`: the MMIO mask gives the MMIO value; never when MMIO
        caching is off."""
        return bool(self.mmio_value) and spte & self.mmio_mask == self.mmio_value


def ept_spte_masks(ad: bool) -> SpteMasks:
    """vmx.c `vmx_hardware_setup` -> `kvm_mmu_set_ept_masks(enable_ept_ad_bits, ...)` on a
    CPU without execute-only pages in use: R in the present mask, suppress-#VE, X; A and D
    only with EPT A/D; KVM's host- and MMU-writable bits 57 and 58; WB with IPAT
    (`vmx_get_mt_mask` for RAM); MMIO SPTEs are W+X without R, a deliberate
    misconfiguration (`kvm_mmu_set_mmio_spte_mask(VMX_EPT_MISCONFIG_WX_VALUE, ...)`)."""
    return SpteMasks(
        tree="ept",
        present=1 | VMX_EPT_SUPPRESS_VE_BIT,
        user=1,  # VMX_EPT_READABLE_MASK: EPT has no U/S, KVM maps ACC_USER to R
        x=1 << 2,
        nx=0,
        accessed=VMX_EPT_ACCESS_BIT if ad else 0,
        dirty=VMX_EPT_DIRTY_BIT if ad else 0,
        host_writable=1 << 57,
        mmu_writable=EPT_SPTE_MMU_WRITABLE,
        memtype=EPT_MEMTYPE_WB << 3 | 1 << 6,
        rights=0b111,
        mmio_value=MMIO_SPTE_VALUE,
        mmio_mask=EPT_MMIO_MASK,
        mmio_access=0,
    )


def x86_spte_masks(maxphyaddr: int) -> SpteMasks:
    """spte.c `kvm_mmu_reset_all_pte_masks`, the masks of SVM's NPT and of shadow paging:
    P, U/S, NX (for a page that may not execute), A and D in their long-mode places, KVM's
    host- and MMU-writable bits 9 and 10, no memory type (SVM has no `get_mt_mask`). MMIO
    SPTEs set reserved bit 51 and P, so the walk faults with RSVD; with MAXPHYADDR 52 no bit
    is reserved and MMIO is not cached (svm.c `svm_adjust_mmio_mask` changes nothing without
    memory encryption)."""
    mmio = (1 << 51 | 1) if maxphyaddr < 52 else 0
    return SpteMasks(
        tree="npt",
        present=1,
        user=PT_USER_MASK,
        x=0,
        nx=1 << 63,
        accessed=1 << 5,
        dirty=1 << 6,
        host_writable=1 << 9,
        mmu_writable=1 << 10,
        memtype=0,
        rights=0b111,
        mmio_value=mmio,
        mmio_mask=mmio,
        mmio_access=PT_WRITABLE_MASK | PT_USER_MASK,
    )


def _overlaps(first: int, pages: int, gfns: Collection[int]) -> bool:
    """Whether the GFNs [first, first + pages) of one mapping meet `gfns`."""
    if isinstance(gfns, range):
        return first < gfns.stop and gfns.start < first + pages
    return any(first <= gfn < first + pages for gfn in gfns)


class KvmMmu(ABC):
    """What KVM's MMU does the same way with EPT and with shadow paging: register for MMU
    notifiers, find the host page behind a GFN, retry a fault that raced with the host, and
    zap or protect what the host, a memslot change or dirty logging asks for."""

    def __init__(self, host: HostKernel, vmm: Process, memslots: Memslots) -> None:
        self.host = host
        self.vmm = vmm
        self.memslots = memslots
        self.log: list[KvmStep] = []
        self.tlb_flushers: list[Callable[[], None]] = []
        # struct kvm: the MMU-notifier sequence count, invalidations running, and the GFN
        # range they cover (kvm_mmu_invalidate_begin / _range_add / _end)
        self.mmu_invalidate_seq = 0
        self.mmu_invalidate_in_progress = 0
        self.mmu_invalidate_range: tuple[int, int] | None = None
        # what-if: runs once between hva_to_pfn and the install (a racing host change)
        self.race_after_hva_to_pfn: Callable[[], None] | None = None
        host.notifiers.append(self)

    def flush_remote_tlbs(self) -> None:
        """`kvm_flush_remote_tlbs`: after a zap or a write-protect, no vCPU may keep using
        a translation cached from the old entries."""
        for flush in self.tlb_flushers:
            flush()

    def _alloc_table(self) -> int:
        """A new shadow or EPT table page, every entry SHADOW_NONPRESENT_VALUE (the page
        caches' `init_value`, mmu.c `kvm_mmu_create`)."""
        table = self.host.frames.alloc()
        self.host.memory.write(table, SHADOW_NONPRESENT_VALUE.to_bytes(8, "little") * 512)
        return table

    def _step(self, trace: Trace | None, step: KvmStep) -> None:
        """A KVM step goes to the access's trace, or to `log` when no access caused it."""
        if trace is None:
            self.log.append(step)
        else:
            trace.add(step)

    @abstractmethod
    def unmap_gfn_range(self, start: int, end: int, trace: Trace | None = None) -> int:
        """`kvm_unmap_gfn_range`: clear every leaf mapping a GFN in [start, end); return how
        many were cleared. The cleared entries go to `trace` when an access caused the zap."""

    @abstractmethod
    def zap_all(self) -> int:
        """`kvm_mmu_zap_all_fast`: drop every translation KVM built; return how many."""

    @abstractmethod
    def write_protect(self, gfns: Collection[int], levels: range) -> int:
        """Clear W (only W: KVM's MMU-writable bit stays, so `fast_page_fault` can restore
        it) in the leaves of `levels` that map a GFN in `gfns`; return how many."""

    @abstractmethod
    def split_huge_pages(self, gfns: range) -> int:
        """Eager page split (`kvm_mmu_try_split_huge_pages`): map [gfns] with 4 KiB leaves;
        return how many huge leaves were split."""

    @abstractmethod
    def recover_huge_pages(self, memslot: Memslot) -> int:
        """`kvm_mmu_recover_huge_pages` after dirty logging stops: map huge again what may be
        mapped huge; return how many huge mappings were recovered."""

    # --- MMU notifiers (virt/kvm/kvm_main.c) ------------------------------------------------

    def _slot_ranges(self, process: Process, start: int, end: int) -> list[tuple[int, int, int]]:
        """(first GFN, end GFN, lowest HVA) of every memslot part whose HVA lies in
        [start, end) of the VMM (`kvm_handle_hva_range`)."""
        if process is not self.vmm:
            return []
        out = []
        for memslot in self.memslots.slots.values():
            lo = max(start, memslot.userspace_addr)
            hi = min(end, memslot.userspace_addr + memslot.memory_size)
            if lo < hi:
                out.append((memslot.hva_to_gfn(lo), memslot.hva_to_gfn(hi - 1) + 1, lo))
        return out

    def invalidate_range_start(
        self, process: Process, start: int, end: int, reason: str, trace: Trace | None = None
    ) -> None:
        """`kvm_mmu_notifier_invalidate_range_start`: for the memslots behind [start, end),
        `kvm_mmu_invalidate_begin` (one more invalidation in progress), add their GFNs to the
        invalidated range, and `kvm_unmap_gfn_range`, so the next access faults and sees the
        change. It is part of `trace` when an access's own fault changed the mapping."""
        ranges = self._slot_ranges(process, start, end)
        if ranges:
            self.mmu_invalidate_in_progress += 1
        for first, stop, hva in ranges:
            old = self.mmu_invalidate_range or (first, stop)
            self.mmu_invalidate_range = (min(old[0], first), max(old[1], stop))
            zapped = self.unmap_gfn_range(first, stop, trace)
            step = KvmStep(
                "kvm_mmu_notifier_invalidate_range_start",
                f"{reason}: HVA [{max(start, hva):#x}, ...) is GFN [{first:#x}, {stop:#x});"
                f" kvm_unmap_gfn_range zapped {zapped} entries",
                gfn=first,
                hva=hva,
            )
            self._step(trace, step)

    def invalidate_range_end(self, process: Process, start: int, end: int) -> None:
        """`kvm_mmu_notifier_invalidate_range_end` -> `kvm_mmu_invalidate_end`: bump
        `mmu_invalidate_seq` (a fault that looked up a PFN before now must not install it),
        then one invalidation fewer in progress."""
        if not self._slot_ranges(process, start, end):
            return
        self.mmu_invalidate_seq += 1
        self.mmu_invalidate_in_progress -= 1
        if not self.mmu_invalidate_in_progress:
            self.mmu_invalidate_range = None

    def gmem_invalidate(self, file: BoundFile, first: int, end: int) -> None:
        """guest_memfd.c `kvm_gmem_invalidate_begin`/`_end` around a punched hole: for each
        memslot bound to file pages [first, end), zap the GFNs they back
        (`kvm_mmu_unmap_gfn_range`) inside one invalidation, so a racing fault retries."""
        bound = [s for s in file.bindings if s.gmem_pgoff < end and first < s.gmem_pgoff + s.npages]
        if not bound:
            return
        self.mmu_invalidate_in_progress += 1
        for memslot in bound:
            start = memslot.base_gfn + max(memslot.gmem_pgoff, first) - memslot.gmem_pgoff
            stop = (
                memslot.base_gfn
                + min(memslot.gmem_pgoff + memslot.npages, end)
                - memslot.gmem_pgoff
            )
            old = self.mmu_invalidate_range or (start, stop)
            self.mmu_invalidate_range = (min(old[0], start), max(old[1], stop))
            zapped = self.unmap_gfn_range(start, stop)
            self._step(
                None,
                KvmStep(
                    "kvm_gmem_invalidate_begin",
                    f"guest_memfd {file.fd} pages [{first:#x}, {end:#x}) back GFN"
                    f" [{start:#x}, {stop:#x}) of memslot {memslot.id}: zapped {zapped} entries",
                    gfn=start,
                ),
            )
        self.mmu_invalidate_seq += 1  # kvm_gmem_invalidate_end -> kvm_mmu_invalidate_end
        self.mmu_invalidate_in_progress -= 1
        if not self.mmu_invalidate_in_progress:
            self.mmu_invalidate_range = None

    def clear_flush_young(
        self, process: Process, start: int, end: int, trace: Trace | None = None
    ) -> bool:
        """`kvm_mmu_notifier_clear_flush_young` -> `kvm_age_gfn`: for the memslots behind
        [start, end), clear the A bit of every leaf that has it and say whether one did (the
        page is young). x86 selects KVM_ELIDE_TLB_FLUSH_IF_YOUNG: no TLB flush, so a
        translation the CPU still caches can keep a hot page looking idle for a while."""
        young = False
        for first, stop, hva in self._slot_ranges(process, start, end):
            aged = self.age_gfn_range(first, stop, trace)
            young |= aged
            detail = "young: A cleared" if aged else "not young: no leaf has A set"
            step = KvmStep(
                "kvm_mmu_notifier_clear_flush_young",
                f"HVA {hva:#x} is GFN [{first:#x}, {stop:#x}): {detail}",
                gfn=first,
                hva=hva,
            )
            self._step(trace, step)
        return young

    @abstractmethod
    def age_gfn_range(self, start: int, end: int, trace: Trace | None) -> bool:
        """`kvm_age_gfn`: clear A in the leaves that map GFNs in [start, end); True when one
        had it."""

    def mmu_invalidate_retry_gfn(self, mmu_seq: int, gfn: int) -> bool:
        """include/linux/kvm_host.h `mmu_invalidate_retry_gfn`: an invalidation covering the
        GFN is in progress, or one ended since `mmu_seq` was sampled."""
        span = self.mmu_invalidate_range
        if self.mmu_invalidate_in_progress and span is not None and span[0] <= gfn < span[1]:
            return True
        return self.mmu_invalidate_seq != mmu_seq

    def _faultin_seq(self, gfn: int, trace: Trace) -> int | None:
        """mmu.c `kvm_mmu_faultin_pfn`: sample `mmu_invalidate_seq` before asking the host
        for the page; None (RET_PF_RETRY) when an invalidation of the GFN is already running
        (`mmu_invalidate_retry_gfn_unsafe`)."""
        mmu_seq = self.mmu_invalidate_seq
        if not self.mmu_invalidate_retry_gfn(mmu_seq, gfn):
            return mmu_seq
        trace.add(
            KvmStep(
                "kvm_mmu_faultin_pfn",
                "an MMU-notifier invalidation of this GFN is in progress: RET_PF_RETRY",
                gfn=gfn,
            )
        )
        return None

    def _page_fault_stale(self, mmu_seq: int, gfn: int, trace: Trace) -> bool:
        """mmu.c `is_page_fault_stale`, under mmu_lock just before the install: the PFN from
        `hva_to_pfn` may be gone if the host invalidated the GFN meanwhile (RET_PF_RETRY).
        The what-if `race_after_hva_to_pfn` runs first, once: the racing host change."""
        race, self.race_after_hva_to_pfn = self.race_after_hva_to_pfn, None
        if race is not None:
            race()
        if not self.mmu_invalidate_retry_gfn(mmu_seq, gfn):
            return False
        trace.add(
            KvmStep(
                "is_page_fault_stale",
                f"mmu_invalidate_retry_gfn: the host invalidated GFN {gfn:#x} after hva_to_pfn"
                f" (mmu_invalidate_seq {mmu_seq} -> {self.mmu_invalidate_seq}):"
                " RET_PF_RETRY, nothing installed",
                gfn=gfn,
            )
        )
        return True

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
        own = page.hpa + (hva & (page.page_size - 1) & ~(PAGE_SIZE - 1))  # the pfn returned
        within = "" if page.page_size == PAGE_SIZE else f" at HPA {page.hpa:#x}"
        trace.add(
            KvmStep(
                "hva_to_pfn",
                f"HVA {hva & ~0xFFF:#x} -> HPA {own:#x}, in the {size_text(page.page_size)}"
                f" host page{within} ({'writable' if page.writable else 'read-only'})",
                hva=hva & ~0xFFF,
                hpa=own,
            )
        )
        return page.hpa, page.writable, page.page_size

    def gmem_pfn(self, memslot: Memslot, gfn: int, trace: Trace) -> int:
        """guest_memfd.c `kvm_gmem_get_pfn`: the file page at index gfn - base_gfn + pgoff,
        allocated and zeroed on first use; no HVA, no walk of the VMM's page tables."""
        file = memslot.gmem
        assert file is not None
        index = memslot.gmem_index(gfn)
        new = index not in file.folios
        hpa = file.get_folio(index)
        trace.add(
            KvmStep(
                "kvm_gmem_get_pfn",
                f"memslot {memslot.id}: GFN {gfn:#x} -> guest_memfd {file.fd} offset"
                f" {index << PAGE_SHIFT:#x} -> HPA {hpa:#x}"
                + (" (a new zeroed page)" if new else "")
                + "; no HVA, no host page-table walk",
                gfn=gfn,
                hpa=hpa,
            )
        )
        return hpa

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

    def guest_store(self, gpa: int, data: bytes, trace: Trace | None = None) -> None:
        """What a guest kernel's store to `gpa` (within one page) leaves behind once KVM has
        handled the exits it causes: the bytes in the page behind the GPA (copy-on-write
        broken), the page in the dirty log. Under EPT the store would exit only if the EPT
        refused it (`handle_ept_violation` then maps the page writable and logs it); the
        shadow MMU adds its write tracking (`ShadowMmu.guest_store`)."""
        if self.write_guest(gpa, data, trace) is None:
            memslot = self.memslots.gfn_to_memslot(gpa >> PAGE_SHIFT)
            where = "is in no memslot" if memslot is None else "is in a KVM_MEM_READONLY memslot"
            raise TwodwalkError(f"gpa={gpa:#x} {where}: the guest has no RAM to store to there")

    def _mmio_gen(self) -> int:
        """The generation an MMIO SPTE records (`make_mmio_spte`: masked to 19 bits)."""
        return self.memslots.generation & MMIO_SPTE_GEN_MASK

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


class TdpMmu(KvmMmu):
    """KVM's TDP MMU for one VM (tdp_mmu.c): the nested tables' root, the page fault path,
    zaps, dirty-log protection and the PML buffer. With an `EptFormat` it builds Intel's
    EPT (root in the EPTP); with an `Ia32eFormat` AMD's nested page tables (root in the
    VMCB's nCR3), in the long-mode format: the same code with the other SPTE masks
    (`SpteMasks`), as in KVM."""

    def __init__(
        self, host: HostKernel, vmm: Process, memslots: Memslots, fmt: EptFormat | Ia32eFormat
    ) -> None:
        super().__init__(host, vmm, memslots)
        self.fmt = fmt
        self.tables = PageTables(fmt, host.memory, self._alloc_table)
        self._eptp: Eptp | None = None
        self.rules: AccessRules
        if isinstance(fmt, EptFormat):
            self.masks = ept_spte_masks(fmt.ad)
            self.rules = _EPT_RULES
            self._eptp = Eptp(self.tables.root, fmt.levels, fmt.ad)
        else:
            self.masks = x86_spte_masks(fmt.maxphyaddr)
            self.rules = NPT_RULES
        self._tables = host.physical_tables
        self.pml = False  # kvm_intel.enable_pml: set by `Vm.set_dirty_log_mode`
        self.cpu_dirty_logging_count = 0  # memslots logging dirty pages
        self.pml_buffer: list[int] = []  # GPAs, in the order the CPU logged them
        # The path after `fast_page_fault` (`kvm_tdp_mmu_page_fault`): KVM's own, the
        # reader's in the handler lab (`exercises.handler`), or, for a nested guest's EPT02,
        # L0's shadowing of L1's EPT (`engine.nested`), run on the same exits.
        self.page_fault_handler: Callable[[int, int, Trace], Resolution] = self._tdp_page_fault

    @property
    def npt(self) -> bool:
        """Whether these are AMD's nested page tables rather than Intel's EPT."""
        return self._eptp is None

    @property
    def eptp(self) -> Eptp:
        """The EPT pointer (Intel); an NPT VM has none: its root is `ncr3`."""
        if self._eptp is None:
            raise TwodwalkError("this VM uses AMD nested paging: its nested root is mmu.ncr3")
        return self._eptp

    @property
    def ncr3(self) -> int:
        """The VMCB's nCR3 (AMD): the host-physical address of the nested PML4 (or PML5)."""
        if self._eptp is not None:
            raise TwodwalkError("this VM uses Intel's EPT: its nested root is mmu.eptp")
        return self.tables.root

    @property
    def nested_tag(self) -> int:
        """The EP4TA that tags translations cached from EPT (SDM Vol 3C 29.4.1); 0 with NPT,
        whose cached translations are tagged by the vCPU's ASID alone (APM Vol 2 15.16), so
        KVM flushes the ASID when the nested tables change (`TLB_CONTROL`)."""
        return 0 if self._eptp is None else self._eptp.ep4ta

    @property
    def ad(self) -> bool:
        """Whether the CPU sets A and D in the nested entries: EPT with EPTP bit 6; NPT
        always (APM Vol 2 15.25.5)."""
        return self._eptp is None or self._eptp.ad

    @property
    def pml_enabled(self) -> bool:
        """`vmx_update_cpu_dirty_logging`: the VMCS enables PML while a memslot logs dirty
        pages (`kvm_mmu_update_cpu_dirty_logging`)."""
        return self.pml and self.cpu_dirty_logging_count > 0

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
        guest-physical paging-structure cache named a table below the root. With PML on,
        the walk logs the GPA when it sets an EPT D bit (SDM 29.3.6)."""
        tables = tables or self._tables
        if self.pml and self.cpu_dirty_logging_count:  # `pml_enabled`, inline: a hot path
            tables = PmlLogging(
                tables, self.host.memory, VMX_EPT_DIRTY_BIT, lambda: self.pml_log(gpa)
            )
        return walk(self.fmt, self.tables.root, gpa, access, tables, self.rules, start)

    def get_walk(self, gpa: int) -> WalkRecord:
        """The EPT entries on the path to `gpa`, read as KVM reads its own tables
        (tdp_mmu.c `kvm_tdp_mmu_get_walk`): a software look-up that sets no A/D bit, for
        views that show the tree without changing it."""
        access = Access.of("read", cpl=3 if self.npt else 0)
        return walk(
            self.fmt, self.tables.root, gpa, access, self._tables, self.rules, accessed_dirty=False
        )

    def pml_log(self, gpa: int) -> None:
        """SDM 29.3.6 (page-modification logging): the CPU set an EPT D bit 0 -> 1, so it
        writes the 4 KiB-aligned GPA to the PML buffer at the PML index (511 down to 0).
        With the buffer full the write first causes a "PML log full" VM exit (reason 62),
        where KVM empties it (`handle_pml_full`, after the flush every exit does)."""
        if not self.pml_enabled:
            return
        if len(self.pml_buffer) == PML_LOG_NR_ENTRIES:
            self.log.append(
                KvmStep("handle_pml_full", "PML log full (exit reason 62): buffer flushed")
            )
            self.flush_pml_buffer()
        self.pml_buffer.append(gpa & ~(PAGE_SIZE - 1))

    def flush_pml_buffer(self, trace: Trace | None = None) -> int:
        """`vmx_flush_pml_buffer` (`kvm_flush_pml_buffer` once x86.c shares it with SVM): on
        every VM exit, and before userspace reads the log (`kvm_arch_sync_dirty_log` kicks
        the vCPUs out), mark each logged GFN dirty (`kvm_vcpu_mark_page_dirty`) in the order
        the CPU logged them, and reset the PML index. Returns how many entries there were."""
        logged, self.pml_buffer = self.pml_buffer, []
        for gpa in logged:
            memslot = self.memslots.gfn_to_memslot(gpa >> PAGE_SHIFT)
            if memslot is not None:
                memslot.mark_dirty(gpa >> PAGE_SHIFT)
        if logged:
            self._step(
                trace,
                KvmStep("vmx_flush_pml_buffer", f"{len(logged)} GPAs from the PML buffer"),
            )
        return len(logged)

    # --- exits ------------------------------------------------------------------------------

    def handle_ept_violation(self, gpa: int, qualification: int, trace: Trace) -> Resolution:
        """vmx `handle_ept_violation` -> `kvm_mmu_page_fault` -> `kvm_tdp_page_fault`."""
        code = ept_violation_error_code(qualification)
        trace.add(
            KvmStep(
                "__vmx_handle_ept_violation",
                f"error code {code:#x} ({' | '.join(bit_names(code, KVM_EPT_ERROR_CODE_BITS))})"
                f" from exit qualification {qualification:#x}"
                f" ({', '.join(qualification_names(qualification))})",
            )
        )
        if self._fast_page_fault(gpa, code, trace):
            return Fixed()
        return self.page_fault_handler(gpa, code, trace)

    def _tdp_page_fault(self, gpa: int, code: int, trace: Trace) -> Resolution:
        """`kvm_tdp_page_fault`, from KVM's page-fault error code."""
        return self._direct_page_fault(gpa, bool(code & PFERR_WRITE), trace)

    def handle_npf(self, gpa: int, exit_info1: int, trace: Trace) -> Resolution:
        """svm.c `npf_interception` -> `kvm_mmu_page_fault(gpa, EXITINFO1)`: the error code
        is the hardware's own; a RSVD fault is a cached MMIO entry (`handle_mmio_page_fault`),
        anything else takes the page fault path."""
        trace.add(
            KvmStep(
                "npf_interception",
                f"EXITINFO1 {exit_info1:#x} ({', '.join(exit_info1_names(exit_info1))}),"
                f" EXITINFO2 (GPA) {gpa:#x}",
            )
        )
        if exit_info1 & PFERR_RSVD:
            return self._mmio_page_fault(gpa, trace)
        if self._fast_page_fault(gpa, exit_info1, trace):
            return Fixed()
        return self.page_fault_handler(gpa, exit_info1, trace)

    def handle_ept_misconfig(self, gpa: int, trace: Trace) -> Resolution:
        """vmx.c `handle_ept_misconfig` -> `handle_mmio_page_fault`."""
        return self._mmio_page_fault(gpa, trace)

    def _mmio_page_fault(self, gpa: int, trace: Trace) -> Resolution:
        """mmu.c `handle_mmio_page_fault`: a cached MMIO entry of the current memslot
        generation goes straight to MMIO emulation; a stale one is dropped and the fault
        takes the normal path."""
        found = self.tables.find_leaf(gpa)
        spte = self.host.memory.read_u64(found[0]) if found else SHADOW_NONPRESENT_VALUE
        gen = self._mmio_gen()
        if found and self.masks.is_mmio_spte(spte) and mmio_spte_generation(spte) == gen:
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
            self._set_spte(found[0], 1, SHADOW_NONPRESENT_VALUE, trace)
        return self._direct_page_fault(gpa, False, trace)

    # --- the page fault path ----------------------------------------------------------------

    def _fast_page_fault(self, gpa: int, code: int, trace: Trace) -> bool:
        """mmu.c `fast_page_fault`: a write to a present entry that KVM write-protected
        only for dirty logging (MMU-writable set) is fixed in place: set W (the CPU sets D
        when the write retries), mark the page dirty. Not for a huge leaf of a slot that
        logs: only its first page would be logged, so the slow path maps 4 KiB."""
        if not code & PFERR_WRITE or not code & PFERR_PRESENT:
            return False
        found = self.tables.find_leaf(gpa)
        if found is None:
            return False
        slot_address, level = found
        spte = self.host.memory.read_u64(slot_address)
        if not spte & self.masks.mmu_writable or spte & PT_WRITABLE_MASK:
            return False
        memslot = self.memslots.gfn_to_memslot(gpa >> PAGE_SHIFT)
        if level > 1 and memslot is not None and memslot.dirty_logging:
            return False
        self._set_spte(slot_address, level, spte | PT_WRITABLE_MASK, trace)
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
            if self.masks.mmio_value:  # `mark_mmio_spte`, when MMIO caching is on
                access = PT_WRITABLE_MASK | PT_USER_MASK  # ACC_ALL, in SPTE positions
                self._map(gfn, 1, self.masks.make_mmio_spte(gpa, self._mmio_gen(), access), trace)
            return EmulateMmio(gpa, write)
        if memslot.gmem_only:  # __kvm_mmu_faultin_pfn: is_private || kvm_memslot_is_gmem_only
            return self._gmem_page_fault(memslot, gfn, trace)
        hva = memslot.gfn_to_hva(gfn) + (gpa & (PAGE_SIZE - 1))
        trace.add(
            KvmStep(
                "__gfn_to_hva_memslot",
                f"memslot {memslot.id}: GFN {gfn:#x} -> HVA {hva & ~0xFFF:#x}",
                gfn=gfn,
                hva=hva & ~0xFFF,
            )
        )
        mmu_seq = self._faultin_seq(gfn, trace)
        if mmu_seq is None:
            return RetPfRetry()
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
        if self._page_fault_stale(mmu_seq, gfn, trace):
            return RetPfRetry()
        writable = page[1] and not memslot.readonly
        level = self._mapping_level(memslot, gfn, hva, page[2], trace)
        size = self.fmt.page_size(level)
        hpa = (page[0] + (hva & (page[2] - 1))) & ~(size - 1)
        self._map(gfn, level, self._make_spte(hpa, level, writable), trace)
        if writable:
            memslot.mark_dirty(gfn)
        return Fixed()

    def _gmem_page_fault(self, memslot: Memslot, gfn: int, trace: Trace) -> Resolution:
        """mmu.c `kvm_mmu_faultin_pfn_gmem`: the page comes from the guest_memfd
        (`gmem_pfn`); writable unless the slot is read-only (never, for guest_memfd); 4 KiB,
        since 6.18's guest_memfd folios have order 0."""
        mmu_seq = self._faultin_seq(gfn, trace)
        if mmu_seq is None:
            return RetPfRetry()
        hpa = self.gmem_pfn(memslot, gfn, trace)
        if self._page_fault_stale(mmu_seq, gfn, trace):
            return RetPfRetry()
        trace.add(
            KvmStep(
                "kvm_mmu_hugepage_adjust",
                "map at level 1 (4 KiB): guest_memfd pages are 4 KiB folios (max_order 0)",
                gfn=gfn,
                level=1,
            )
        )
        self._map(gfn, 1, self._make_spte(hpa, 1, not memslot.readonly), trace)
        return Fixed()

    def _max_mapping_level(
        self, memslot: Memslot, gfn: int, hva: int, host_size: int
    ) -> tuple[int, list[str]]:
        """mmu.c `kvm_mmu_max_mapping_level`: the largest level allowed by EPT, the host
        mapping, the slot's bounds and GFN/HVA alignment, and dirty logging; with the
        reasons each larger level was refused."""
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
        return level, reasons

    def _mapping_level(
        self, memslot: Memslot, gfn: int, hva: int, host_size: int, trace: Trace
    ) -> int:
        """`kvm_mmu_hugepage_adjust`: the level the fault maps at."""
        level, reasons = self._max_mapping_level(memslot, gfn, hva, host_size)
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
        """spte.c `make_spte` for a TDP fault (every access allowed, ACC_ALL): KVM's
        SPTE_MMU_PRESENT, the present, accessed, exec and user masks, PS above 4 KiB, the
        memory type (EPT: WB with IPAT, `vmx_get_mt_mask`), the frame; W, MMU-writable,
        host-writable and dirty when the host page is writable."""
        m = self.masks
        spte = SPTE_MMU_PRESENT_MASK | m.present | m.accessed | m.x | m.user | m.memtype | hpa
        if level > 1:
            spte |= PT_PAGE_SIZE_MASK
        if writable:
            spte |= PT_WRITABLE_MASK | m.mmu_writable | m.host_writable | m.dirty
        return spte

    def _make_nonleaf_spte(self, level: int, child: int) -> int:
        """spte.c `make_nonleaf_spte`: SPTE_MMU_PRESENT, the present mask, W, the user and
        exec masks and A (EPT: R, W, X, A and suppress-#VE; NPT: P, R/W, U/S, A)."""
        del level  # the same at every level
        m = self.masks
        return (
            SPTE_MMU_PRESENT_MASK | m.present | PT_WRITABLE_MASK | m.user | m.x | m.accessed | child
        )

    def _map(self, gfn: int, level: int, spte: int, trace: Trace) -> None:
        """tdp_mmu.c `kvm_tdp_mmu_map`: link missing tables down to `level`, replacing a huge
        entry in the way, then write the leaf."""

        def needs_table(value: int, lv: int) -> bool:
            return not is_shadow_present_pte(value) or self.fmt.is_leaf(value, lv)

        def link(slot: int, lv: int) -> int:
            child = self._alloc_table()
            self._set_spte(slot, lv, self._make_nonleaf_spte(lv, child), trace)
            return child

        memory, gpa = self.host.memory, gfn << PAGE_SHIFT
        slot = table_slot(memory, self.fmt, self.tables.root, gpa, level, needs_table, link)
        assert slot is not None  # `link` makes every missing table
        self._set_spte(slot, level, spte, trace)

    def _set_spte(
        self, address: int, level: int, new: int, trace: Trace | None, flush: bool = True
    ) -> bool:
        """Write an EPT entry, the one way every change to one is made: record it in the
        trace when there is one, and say whether it took away a translation or a right that a
        vCPU may have cached (`mmu_spte_update` returning "flush"); flush then, unless the
        caller batches the flush (`flush=False`: zaps and write-protection flush once)."""
        old = self.host.memory.read_u64(address)
        self.host.memory.write_u64(address, new)
        stale = False
        if is_shadow_present_pte(old):
            moved = self.fmt.output_address(old, level) != self.fmt.output_address(new, level)
            lost = (old & ~new & self.masks.rights) | (new & ~old & self.masks.nx)
            stale = moved or bool(lost) or not is_shadow_present_pte(new)
            if stale and flush:
                self.flush_remote_tlbs()
        leaf = not is_shadow_present_pte(new) or self.fmt.is_leaf(new, level)
        if trace is not None:
            trace.add(SpteWrite(self.masks.tree, level, address, old, new, leaf))
        return stale

    # --- zaps: MMU notifiers, memslot changes -----------------------------------------------

    def unmap_gfn_range(self, start: int, end: int, trace: Trace | None = None) -> int:
        """`kvm_tdp_mmu_unmap_gfn_range` -> `kvm_tdp_mmu_zap_leafs`: set every leaf mapping a
        GFN in [start, end) to SHADOW_NONPRESENT_VALUE; a huge leaf that overlaps the range
        goes whole. Returns how many entries were cleared."""
        zapped = 0
        for found in self._leaves_between(start, end):
            self._set_spte(found.slot, found.level, SHADOW_NONPRESENT_VALUE, trace, False)
            zapped += 1
        if zapped:
            self.flush_remote_tlbs()
        return zapped

    def _leaves_between(self, start: int, end: int) -> Iterator[Leaf]:
        """Each leaf that maps a GFN in [start, end), once, in GFN order: a huge leaf is
        found by its first GFN in the range and skipped past whole
        (`tdp_root_for_each_leaf_pte`)."""
        gfn = start
        while gfn < end:
            found = self.tables.find_leaf(gfn << PAGE_SHIFT)
            pages = 1
            if found is not None:
                pages = 1 << (self.fmt.shift(found.level) - PAGE_SHIFT)
                yield found
            gfn = (gfn & ~(pages - 1)) + pages

    def age_gfn_range(self, start: int, end: int, trace: Trace | None) -> bool:
        """`kvm_tdp_mmu_age_gfn_range` -> `kvm_tdp_mmu_age_spte`: with EPT A/D on, clear the
        A bit of each accessed leaf (`tdp_mmu_clear_spte_bits_atomic`). Without A/D, KVM
        instead marks the entry for access tracking (`mark_spte_for_access_track`), which
        this model does not have."""
        if not self.ad:
            raise TwodwalkError(
                "aging without EPT A/D bits (mark_spte_for_access_track) is not modelled:"
                " use a Machine with ept_ad=True"
            )
        young = False
        for found in self._leaves_between(start, end):
            spte = self.host.memory.read_u64(found.slot)
            if is_shadow_present_pte(spte) and spte & self.masks.accessed:
                self._set_spte(found.slot, found.level, spte & ~self.masks.accessed, trace)
                young = True
        return young

    def zap_all(self) -> int:
        zapped = 0
        for entry in list(self.tables.entries()):
            if entry.leaf:
                self._set_spte(
                    entry.entry_address, entry.level, SHADOW_NONPRESENT_VALUE, None, False
                )
                zapped += 1
        self.flush_remote_tlbs()
        return zapped

    # --- dirty logging ----------------------------------------------------------------------

    def _leaves(self, gfns: Collection[int], levels: range) -> list[TreeEntry]:
        """The shadow-present leaves of `levels` that map a GFN in `gfns`."""
        return [
            entry
            for entry in self.tables.entries()
            if entry.leaf
            and entry.level in levels
            and is_shadow_present_pte(entry.value)
            and _overlaps(
                entry.virtual >> PAGE_SHIFT,
                1 << (self.fmt.shift(entry.level) - PAGE_SHIFT),
                gfns,
            )
        ]

    def _clear_bit(self, gfns: Collection[int], levels: range, bit: int) -> int:
        """Clear one bit in the leaves that have it; one TLB flush if any changed."""
        count = 0
        for entry in self._leaves(gfns, levels):
            if entry.value & bit:
                self._set_spte(entry.entry_address, entry.level, entry.value & ~bit, None, False)
                count += 1
        if count:
            self.flush_remote_tlbs()
        return count

    def write_protect(self, gfns: Collection[int], levels: range) -> int:
        """`kvm_mmu_slot_remove_write_access` (a whole slot, from a minimum level) and
        `kvm_mmu_write_protect_pt_masked` (chosen 4 KiB pages): clear W only; the EPT D bit
        is the CPU's and stays."""
        return self._clear_bit(gfns, levels, PT_WRITABLE_MASK)

    def clear_dirty(self, gfns: Collection[int], levels: range) -> int:
        """PML: `kvm_mmu_slot_leaf_clear_dirty` (`kvm_tdp_mmu_clear_dirty_slot`, every leaf
        of a slot) and `kvm_mmu_clear_dirty_pt_masked` (chosen 4 KiB pages): clear the EPT D
        bit, so the CPU's next write sets it again and logs the page."""
        return self._clear_bit(gfns, levels, self.masks.dirty)

    def split_huge_pages(self, gfns: range) -> int:
        """tdp_mmu.c `kvm_tdp_mmu_try_split_huge_pages` to 4 KiB: each huge leaf becomes a
        table of 512 leaves one level down with the same rights (`make_huge_page_split_spte`),
        until only 4 KiB leaves map the range."""
        count = 0
        huge = self._leaves(gfns, HUGE_LEVELS)
        while huge:
            for entry in huge:
                self._split(entry.entry_address, entry.level)
            count += len(huge)
            huge = self._leaves(gfns, HUGE_LEVELS)
        return count

    def _split(self, slot_address: int, level: int) -> None:
        """Replace a huge leaf by a table of 512 leaves one level down, same rights."""
        spte = self.host.memory.read_u64(slot_address)
        base = self.fmt.output_address(spte, level)
        flags = spte & ~self.fmt.address_mask(level, True)
        if level - 1 == 1:
            flags &= ~PT_PAGE_SIZE_MASK
        child = self.host.frames.alloc()
        small = self.fmt.page_size(level - 1)
        for i in range(512):  # filling the new table before it is linked: no SPTE changes yet
            self.host.memory.write_u64(child + 8 * i, flags | (base + i * small))
        self._set_spte(slot_address, level, self._make_nonleaf_spte(level, child), None, False)

    def recover_huge_pages(self, memslot: Memslot) -> int:
        """tdp_mmu.c `kvm_tdp_mmu_recover_huge_pages` (Linux 6.13+; before, the zap of
        `kvm_tdp_mmu_zap_collapsible_sptes`): a table entry of the slot that could map huge
        (`kvm_mmu_max_mapping_level`) is replaced in place by a huge leaf made from a present
        leaf below it (`make_huge_spte`), so no fault is needed. Returns how many."""
        first, end = memslot.base_gfn, memslot.base_gfn + memslot.npages
        done: list[range] = []
        for entry in list(self.tables.entries()):
            gfn = entry.virtual >> PAGE_SHIFT
            if (
                entry.leaf
                or entry.level not in self.fmt.leaf_levels
                or not first <= gfn < end
                or any(gfn in span for span in done)
            ):
                continue
            huge = self._make_huge_spte(memslot, entry)
            if huge is not None:
                self._set_spte(entry.entry_address, entry.level, huge, None, False)
                done.append(range(gfn, gfn + (1 << (self.fmt.shift(entry.level) - PAGE_SHIFT))))
        if done:
            self.flush_remote_tlbs()
            self.log.append(
                KvmStep(
                    "kvm_mmu_recover_huge_pages",
                    f"memslot {memslot.id}: {len(done)} huge mappings recovered in place",
                    gfn=memslot.base_gfn,
                )
            )
        return len(done)

    def _make_huge_spte(self, memslot: Memslot, table: TreeEntry) -> int | None:
        """`tdp_mmu_make_huge_spte`: if the host and the slot allow a `table.level` mapping
        here, the huge leaf made from the first present leaf below (`make_huge_spte`: set PS,
        drop the address bits below the huge page); else None."""
        gfn = table.virtual >> PAGE_SHIFT
        hva = memslot.gfn_to_hva(gfn)
        host = self.host.get_user_page(self.vmm, hva, False, fault_in=False)
        if host is None:
            return None
        if self._max_mapping_level(memslot, gfn, hva, host.page_size)[0] < table.level:
            return None
        pages = range(gfn, gfn + (1 << (self.fmt.shift(table.level) - PAGE_SHIFT)))
        below = next((e for e in self._leaves(pages, ALL_LEVELS) if e.level < table.level), None)
        if below is None:
            return None
        low = (1 << self.fmt.shift(table.level)) - 1
        return (below.value | PT_PAGE_SIZE_MASK) & ~(low & ~(PAGE_SIZE - 1))


def make_mmio_spte(gpa: int, generation: int) -> int:
    """spte.c `make_mmio_spte` for EPT: W+X without R (a deliberate misconfiguration), the
    GPA, and the memslot generation in bits 10:3 and 62:52."""
    return ept_spte_masks(True).make_mmio_spte(gpa, generation, 0)


def is_mmio_spte(spte: int) -> bool:
    """spte.h `is_mmio_spte` for EPT: `shadow_mmio_mask` (RWX and suppress-#VE) gives the
    MMIO value, W+X without R and bit 63 clear (no real mapping, nor the non-present value,
    looks like it)."""
    return ept_spte_masks(True).is_mmio_spte(spte)


def mmio_spte_generation(spte: int) -> int:
    """spte.h `get_mmio_spte_generation`."""
    low_bits = MMIO_GEN_LOW[1] - MMIO_GEN_LOW[0] + 1
    low = spte >> MMIO_GEN_LOW[0] & ((1 << low_bits) - 1)
    high = spte >> MMIO_GEN_HIGH[0] & ((1 << (MMIO_GEN_HIGH[1] - MMIO_GEN_HIGH[0] + 1)) - 1)
    return low | high << low_bits
