"""KVM's shadow MMU (EPT off): shadow page tables that map GVA -> HPA directly.

Without EPT the CPU walks only one tree, so KVM builds it: a shadow table per guest table,
mapping guest-virtual addresses straight to host frames (arch/x86/kvm/mmu/paging_tmpl.h). A
#PF in the guest exits to KVM, which walks the guest's own tables in software
(`FNAME(walk_addr_generic)`, each entry read through memslot -> HVA -> host page), injects the
#PF if the guest's tables say so, and otherwise writes shadow entries (`FNAME(fetch)`).
To keep the shadow in sync, KVM write-protects every guest page-table page it shadows: a guest
write to its own page table traps, is emulated, and zaps the shadow entries derived from the
entry written (`kvm_mmu_track_write` -> `kvm_mmu_pte_write`). A clean guest PTE (D=0) is
shadowed read-only so the first write traps and KVM can set the guest's D bit
(`FNAME(protect_clean_gpte)`).

Shadow SPTEs carry KVM's software bits (spte.h): SPTE_MMU_PRESENT (bit 11), host-writable
(bit 9) and MMU-writable (bit 10); a zapped or never-filled SPTE is SHADOW_NONPRESENT_VALUE.

Simplifications, said once: shadow leaves are always 4 KiB; there are no unsync pages (every
guest page-table write traps); KVM keeps PKU off without EPT, so CR4.PKE is rejected here.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from twodwalk.engine.cpuid import CpuModel
from twodwalk.engine.exits import ShadowExits
from twodwalk.engine.formats import (
    ENTRY_SIZE,
    PTE_ACCESSED,
    PTE_DIRTY,
    EntryFormat,
    Ia32eFormat,
    Rights,
    bits,
    ia32e_format,
)
from twodwalk.engine.host import HostKernel, Process
from twodwalk.engine.kvm.memslots import Memslot, Memslots
from twodwalk.engine.kvm.mmu import (
    PT_USER_MASK,
    PT_WRITABLE_MASK,
    SHADOW_NONPRESENT_VALUE,
    EmulateMmio,
    Fixed,
    KvmMmu,
    RetPfRetry,
    is_shadow_present_pte,
    mmio_spte_generation,
    x86_spte_masks,
)
from twodwalk.engine.pagetables import table_slot
from twodwalk.engine.paging import (
    PFERR_PRESENT,
    PFERR_WRITE,
    GeneralProtection,
    PageFault,
    PagingControls,
    exception_for,
)
from twodwalk.engine.tables import MemslotTables
from twodwalk.engine.trace import KvmStep, KvmWalk, SpteWrite, Trace
from twodwalk.engine.units import PAGE_SHIFT, hex_repr
from twodwalk.engine.walker import Access, TableMemory, WalkRecord, WalkStart, walk
from twodwalk.errors import TwodwalkError


@dataclass(frozen=True)
class InjectFault:
    """KVM's software walk of the guest tables faulted: the guest gets this exception."""

    exception: PageFault | GeneralProtection


@hex_repr
@dataclass(frozen=True)
class EmulateWrite:
    """A guest write to one of its own (write-protected) page tables: KVM emulates it
    (`ShadowMmu.emulate_write`)."""

    gpa: int


ShadowResolution = Fixed | EmulateMmio | InjectFault | EmulateWrite | RetPfRetry
# spte.h: SPTE_MMU_PRESENT (bit 11), DEFAULT_SPTE_MMU_WRITABLE (10), DEFAULT_SPTE_HOST_WRITABLE
# (9), as values of the IA-32e AVL field (bits 11:9)
_AVL_MMU_PRESENT, _AVL_MMU_WRITABLE, _AVL_HOST_WRITABLE = 0b100, 0b010, 0b001


class ShadowMmu(KvmMmu):
    """Shadow page tables for one VM, in host memory, walked by the CPU instead of EPT."""

    def __init__(self, host: HostKernel, vmm: Process, memslots: Memslots, cpu: CpuModel) -> None:
        super().__init__(host, vmm, memslots)
        self.cpu = cpu
        self.roots: dict[tuple[int, int, bool], int] = {}
        self.shadowed: dict[int, dict[int, int]] = {}  # guest table gfn -> {shadow: level}
        self.rmap: dict[int, set[int]] = {}
        self.spte_gfn: dict[int, int] = {}
        self.masks = x86_spte_masks(cpu.maxphyaddr)  # `kvm_mmu_reset_all_pte_masks`

    def root_for(self, guest_root: int, fmt: Ia32eFormat, cr0_wp: bool = True) -> int:
        """`kvm_mmu_new_pgd`: the shadow root for a guest CR3, one per root, depth and guest
        CR0.WP (part of the shadow page's role, `kvm_mmu_page_role.cr0_wp`: entries made to
        emulate WP=0 must not serve WP=1)."""
        key = (guest_root, fmt.levels, cr0_wp)
        if key not in self.roots:
            self.roots[key] = self._alloc_table()
            self.shadowed.setdefault(guest_root >> PAGE_SHIFT, {})[self.roots[key]] = fmt.levels
        return self.roots[key]

    def walk(
        self,
        root: int,
        gva: int,
        access: Access,
        controls: PagingControls,
        start: WalkStart | None = None,
        tables: TableMemory | None = None,
    ) -> WalkRecord:
        """The CPU's walk of the shadow tables (native paging, host memory), from `start`
        when a paging-structure cache supplied the upper levels, reading them through
        `tables` (default: straight from host memory)."""
        return walk(
            controls.format(self.cpu),
            root,
            gva,
            access,
            tables or self.host.physical_tables,
            controls.rules,
            start,
        )

    def page_fault(
        self,
        gva: int,
        access: Access,
        controls: PagingControls,
        guest_root: int,
        hardware: WalkRecord,
        trace: Trace,
    ) -> ShadowResolution:
        """`FNAME(page_fault)`: MMIO fast path, software walk of the guest tables, inject or
        emulate or build the shadow entries."""
        mmio = self._mmio_fast_path(hardware, trace)
        if mmio is not None:
            return mmio
        fmt = controls.format(self.cpu)
        guest = walk(
            fmt,
            guest_root,
            gva,
            access,
            MemslotTables(self, self.host.memory, trace),
            controls.rules,
        )
        trace.add(KvmWalk(guest))
        exception = exception_for(guest, controls)
        if exception is not None:
            trace.add(
                KvmStep(
                    "kvm_inject_emulated_page_fault",
                    f"the guest's own tables fault:"
                    f" inject {type(exception).__name__} into the guest",
                )
            )
            return InjectFault(exception)
        assert guest.translation is not None
        gpa = guest.translation.address
        gfn = gpa >> PAGE_SHIFT
        memslot = self.memslots.gfn_to_memslot(gfn)
        if memslot is None or (access.is_write and memslot.readonly):
            trace.add(
                KvmStep("kvm_faultin_pfn", "no RAM behind this GPA: emulate as MMIO", gfn=gfn)
            )
            if memslot is None:
                self._install_mmio(hardware, gpa, guest.translation.rights, trace)
            return EmulateMmio(gpa, access.is_write)
        if access.is_write and gfn in self.shadowed:
            trace.add(
                KvmStep(
                    "kvm_mmu_track_write",
                    f"GFN {gfn:#x} holds a guest page table"
                    " that KVM shadows: the write traps and is emulated",
                    gfn=gfn,
                )
            )
            return EmulateWrite(gpa)
        mmu_seq = self._faultin_seq(gfn, trace)
        if mmu_seq is None:
            return RetPfRetry()
        if memslot.gmem_only:  # __kvm_mmu_faultin_pfn: the shadow MMU's faults too
            hpa: int | None = self.gmem_pfn(memslot, gfn, trace) | gpa & 0xFFF
        else:
            hpa = self.gpa_to_hpa(gpa, access.is_write, trace)
        if hpa is None:
            return EmulateMmio(gpa, access.is_write)
        if self._page_fault_stale(mmu_seq, gfn, trace):
            return RetPfRetry()
        rights = _emulated_wp(guest.translation.rights, access, controls)
        self._fetch(guest, rights, hardware.root, hpa & ~0xFFF, access, trace)
        return Fixed()

    def _mmio_fast_path(self, hardware: WalkRecord, trace: Trace) -> EmulateMmio | None:
        """`handle_mmio_page_fault`: a #PF with RSVD on a cached MMIO entry; one of an old
        memslot generation (`check_mmio_spte`) is zapped and the fault takes the slow path."""
        if not hardware.steps:
            return None
        spte = hardware.steps[-1].value
        if not self.is_mmio_spte(spte):
            return None
        last = hardware.steps[-1]
        if mmio_spte_generation(spte) == self._mmio_gen():
            gpa = (spte & bits(self.cpu.maxphyaddr - 1, 12)) | (hardware.address & 0xFFF)
            trace.add(
                KvmStep(
                    "handle_mmio_page_fault",
                    "RSVD fault on an MMIO entry of the current generation: fast MMIO path",
                    gfn=gpa >> PAGE_SHIFT,
                )
            )
            return EmulateMmio(gpa, hardware.access.is_write)
        self._write(last.entry_address, 1, SHADOW_NONPRESENT_VALUE, trace)
        return None

    def is_mmio_spte(self, spte: int) -> bool:
        """spte.h `is_mmio_spte`: bit 51 and P here; false for everything when MMIO caching
        is off (MAXPHYADDR 52)."""
        return self.masks.is_mmio_spte(spte)

    def make_mmio_spte(self, gpa: int, rights: Rights) -> int:
        """spte.c `make_mmio_spte` with shadow paging: the guest's W and U rights are kept
        (`shadow_mmio_access_mask` = ACC_WRITE_MASK | ACC_USER_MASK)."""
        access = (PT_WRITABLE_MASK if Rights.W in rights else 0) | (
            PT_USER_MASK if Rights.U in rights else 0
        )
        return self.masks.make_mmio_spte(gpa, self._mmio_gen(), access)

    def _install_mmio(self, hardware: WalkRecord, gpa: int, rights: Rights, trace: Trace) -> None:
        """`mmu_set_spte` -> `mark_mmio_spte` for a GFN in no memslot, when MMIO caching is on."""
        slot = self._leaf_slot(hardware.format, hardware.root, hardware.address, trace)
        if self.masks.mmio_value:
            self._write(slot, 1, self.make_mmio_spte(gpa, rights), trace)

    def _fetch(
        self,
        guest: WalkRecord,
        rights: Rights,
        root: int,
        hpa: int,
        access: Access,
        trace: Trace,
    ) -> None:
        """`FNAME(fetch)`: write-protect and link a shadow table for each guest table on the
        walk, then the 4 KiB leaf with the rights the guest walk accumulated. Below a guest
        large page KVM links direct shadow tables down to level 1, so the shadow leaf is
        always 4 KiB here (KVM maps huge only when the host page is huge too). Shadow
        entries are in the format the hardware walks them in: EFER.NX is 1 under shadow
        paging whatever the guest set (`Processor.forces_wp_nx`)."""
        fmt = ia32e_format(guest.format.levels, self.cpu, nxe=True)
        assert guest.translation is not None
        table = root
        leaf = guest.steps[-1]
        for step in guest.steps:
            self._shadow_table(table, step.table >> PAGE_SHIFT, step.level, trace)
            if step is leaf:
                break
            table = self._child(fmt, table, guest.address, step.level, trace)
        for level in range(leaf.level - 1, 0, -1):
            table = self._child(fmt, table, guest.address, level + 1, trace)
        gfn = guest.translation.address >> PAGE_SHIFT
        host_writable = self._host_writable(gfn)
        writable = host_writable and self._leaf_writable(guest, rights, gfn, access)
        spte = fmt.encode(
            1,
            True,
            address=hpa,
            p=1,
            rw=int(writable),
            us=int(Rights.U in rights),
            xd=int(Rights.X not in rights),
            a=1,
            d=int(writable and access.is_write),
            avl=_AVL_MMU_PRESENT
            | (_AVL_MMU_WRITABLE if writable else 0)
            | (_AVL_HOST_WRITABLE if host_writable else 0),
        )
        slot = table + ENTRY_SIZE * fmt.index(guest.address, 1)
        self._write(slot, 1, spte, trace)
        self.rmap.setdefault(gfn, set()).add(slot)
        self.spte_gfn[slot] = gfn
        memslot = self.memslots.gfn_to_memslot(gfn)
        if writable and memslot is not None:
            memslot.mark_dirty(gfn)
        trace.add(
            KvmStep(
                "FNAME(fetch)",
                f"shadow leaf GVA {guest.address & ~0xFFF:#x} -> HPA"
                f" {hpa:#x} ({'writable' if writable else 'read-only'})",
                gfn=gfn,
                hpa=hpa,
                level=1,
            )
        )

    def _host_writable(self, gfn: int) -> bool:
        """Whether the host maps the page behind the GFN writable (`hva_to_pfn`'s answer,
        kept in the SPTE as host-writable)."""
        memslot = self.memslots.gfn_to_memslot(gfn)
        if memslot is None or memslot.readonly:
            return False
        if memslot.gmem_only:  # kvm_mmu_faultin_pfn_gmem: map_writable = !READONLY
            return True
        host = self.host.get_user_page(self.vmm, memslot.gfn_to_hva(gfn), False, fault_in=False)
        return host is not None and host.writable

    def _leaf_writable(self, guest: WalkRecord, rights: Rights, gfn: int, access: Access) -> bool:
        """W in the shadow leaf (of a host-writable page) only if the guest allows writes,
        the guest PTE is already dirty (`FNAME(protect_clean_gpte)`), the page holds no
        shadowed guest table, and dirty logging does not want to see the first write."""
        memslot = self.memslots.gfn_to_memslot(gfn)
        return (
            memslot is not None
            and Rights.W in rights
            and bool(guest.leaf & PTE_DIRTY)
            and gfn not in self.shadowed
            and not (memslot.dirty_logging and not access.is_write)
        )

    def _shadow_table(self, shadow: int, gfn: int, level: int, trace: Trace) -> None:
        """Note that `shadow` shadows the level-`level` guest table at `gfn`, and
        write-protect that gfn everywhere it is mapped (`account_shadowed` ->
        `kvm_mmu_slot_gfn_write_protect`)."""
        self.shadowed.setdefault(gfn, {})[shadow] = level
        protected = False
        for slot in self.rmap.get(gfn, set()):
            spte = self.host.memory.read_u64(slot)
            if spte & PT_WRITABLE_MASK:
                self._write(slot, 1, spte & ~PT_WRITABLE_MASK, trace)
                protected = True
        if protected:
            self.flush_remote_tlbs()

    def _child(self, fmt: EntryFormat, table: int, gva: int, level: int, trace: Trace) -> int:
        """The shadow table below `table` (a level-`level` table) for `gva`, allocated and
        linked if missing."""
        return self._slot_below(fmt, table, gva, level, level - 1, trace) & ~0xFFF

    def _leaf_slot(self, fmt: EntryFormat, root: int, gva: int, trace: Trace) -> int:
        return self._slot_below(fmt, root, gva, fmt.levels, 1, trace)

    def _slot_below(
        self, fmt: EntryFormat, table: int, gva: int, top: int, level: int, trace: Trace
    ) -> int:
        """The level-`level` shadow entry for `gva` below `table`, linking shadow pages on
        the way (`kvm_mmu_get_child_sp`, `link_shadow_page`)."""

        def needs_table(value: int, lv: int) -> bool:
            return not is_shadow_present_pte(value)

        def link(slot: int, lv: int) -> int:
            child = self._alloc_table()
            spte = fmt.encode(lv, False, address=child, p=1, rw=1, us=1, a=1, avl=_AVL_MMU_PRESENT)
            self._write(slot, lv, spte, trace)
            return child

        memory = self.host.memory
        slot = table_slot(memory, fmt, table, gva, level, needs_table, link, top)
        assert slot is not None  # `link` makes every missing table
        return slot

    def _write(self, address: int, level: int, new: int, trace: Trace | None) -> None:
        """Write a shadow entry, the one way every change to one is made, recording it in the
        trace when there is one (callers flush TLBs, once per batch)."""
        old = self.host.memory.read_u64(address)
        self.host.memory.write_u64(address, new)
        if trace is not None:
            trace.add(SpteWrite("shadow", level, address, old, new, level == 1))

    def emulate_write(self, gpa: int, data: bytes, trace: Trace | None) -> int:
        """x86.c `emulator_write_phys`: the emulated store goes to guest memory as KVM's own
        write (`kvm_vcpu_write_guest`: copy-on-write broken, page marked dirty), then the
        write tracker sees it (`kvm_page_track_write` -> `kvm_mmu_track_write`). Returns
        the HPA written."""
        hpa = self.write_guest(gpa, data, trace)
        if hpa is None:
            raise TwodwalkError(f"gpa={gpa:#x}: KVM cannot write guest memory there (EFAULT)")
        for entry in range(gpa & ~7, gpa + len(data), 8):
            self.track_write(entry, trace)
        return hpa

    def guest_store(self, gpa: int, data: bytes, trace: Trace | None = None) -> None:
        """A guest store under shadow paging: to a page-table page KVM shadows it meets a
        read-only shadow entry, so it exits with a #PF (the exception bitmap intercepts #PF
        without EPT), and KVM emulates it (`kvm_mmu_page_fault` -> `x86_emulate_instruction`
        -> `emulate_write`); anywhere else it lands as under EPT. The model's guest kernel
        stores by GPA, not through its direct map, so the exit carries no linear address."""
        if gpa >> PAGE_SHIFT not in self.shadowed:
            super().guest_store(gpa, data, trace)
            return
        if trace is not None:  # a supervisor write to a present, read-only shadow entry
            code = PFERR_PRESENT | PFERR_WRITE
            trace.add(ShadowExits(self.cpu.vendor).page_fault(None, code))
        self.emulate_write(gpa, data, trace)

    def track_write(self, gpa: int, trace: Trace | None) -> int:
        """`kvm_mmu_pte_write`: after an emulated write to a guest page table, zap the shadow
        entry at the same index in every shadow table of that page. Returns how many."""
        zapped = 0
        for shadow, level in self.shadowed.get(gpa >> PAGE_SHIFT, {}).items():
            slot = shadow + (gpa & 0xFF8)
            spte = self.host.memory.read_u64(slot)
            if is_shadow_present_pte(spte) or self.is_mmio_spte(spte):  # `mmu_page_zap_pte`
                self._write(slot, level, SHADOW_NONPRESENT_VALUE, trace)
                zapped += 1
        step = KvmStep(
            "kvm_mmu_pte_write",
            f"guest wrote its page table at GPA {gpa:#x}:"
            f" zapped {zapped} shadow entries derived from it",
            gfn=gpa >> PAGE_SHIFT,
        )
        self._step(trace, step)
        if zapped:
            self.flush_remote_tlbs()
        return zapped

    def zap_all(self) -> int:
        """Forget every shadow table: the next access per CR3 builds a new root."""
        zapped = sum(len(slots) for slots in self.rmap.values())
        self.roots.clear()
        self.shadowed.clear()
        self.rmap.clear()
        self.spte_gfn.clear()
        self.flush_remote_tlbs()
        return zapped

    def unmap_gfn_range(self, start: int, end: int, trace: Trace | None = None) -> int:
        """`kvm_unmap_gfn_range` -> `kvm_rmap_unmap_gfn_range`: zap the shadow leaves that
        map a GFN in [start, end), found through the rmap."""
        zapped = 0
        for gfn in [g for g in self.rmap if start <= g < end]:
            for slot in self.rmap.pop(gfn):
                if is_shadow_present_pte(self.host.memory.read_u64(slot)):
                    self._write(slot, 1, SHADOW_NONPRESENT_VALUE, trace)
                    zapped += 1
        if zapped:
            self.flush_remote_tlbs()
        return zapped

    def age_gfn_range(self, start: int, end: int, trace: Trace | None) -> bool:
        """`kvm_rmap_age_gfn_range`: shadow entries carry A/D in the x86 positions
        (`shadow_accessed_mask` is PT_ACCESSED_MASK without EPT): clear A in each leaf the
        rmap lists for a GFN in [start, end)."""
        young = False
        for gfn in [g for g in self.rmap if start <= g < end]:
            for slot in self.rmap[gfn]:
                spte = self.host.memory.read_u64(slot)
                if is_shadow_present_pte(spte) and spte & PTE_ACCESSED:
                    self._write(slot, 1, spte & ~PTE_ACCESSED, trace)
                    young = True
        return young

    def write_protect(self, gfns: Collection[int], levels: range) -> int:
        """Dirty logging: clear W (only W) in the shadow leaves of the GFNs, found through
        the rmap (`kvm_mmu_slot_remove_write_access`, `kvm_mmu_write_protect_pt_masked` ->
        `rmap_write_protect`), so the next write faults and is logged. Shadow leaves are
        4 KiB, so only level 1 applies."""
        if 1 not in levels:
            return 0
        count = 0
        for gfn in [g for g in self.rmap if g in gfns]:
            for slot in self.rmap[gfn]:
                spte = self.host.memory.read_u64(slot)
                if spte & PT_WRITABLE_MASK:
                    self._write(slot, 1, spte & ~PT_WRITABLE_MASK, None)
                    count += 1
        if count:
            self.flush_remote_tlbs()
        return count

    def split_huge_pages(self, gfns: range) -> int:
        """Nothing to split: shadow leaves are 4 KiB here (`kvm_shadow_mmu_try_split_huge_pages`
        splits only huge direct mappings)."""
        return 0

    def recover_huge_pages(self, memslot: Memslot) -> int:
        """`kvm_rmap_zap_collapsible_sptes` zaps 4 KiB leaves of direct shadow pages that
        could map huge; shadow leaves are always 4 KiB here, so there is none to recover."""
        return 0


def _emulated_wp(rights: Rights, access: Access, controls: PagingControls) -> Rights:
    """paging_tmpl.h `FNAME(page_fault)`: hardware CR0.WP is 1 under shadow paging, so a
    supervisor write the guest's WP=0 allows to a read-only page gets a writable,
    supervisor-only shadow entry (not executable under SMEP, or the kernel could run what
    it may write to a user page); user accesses to it fault again and are re-shadowed."""
    if not access.is_write or Rights.W in rights or controls.cr0_wp or access.user:
        return rights
    rights = (rights | Rights.W) & ~Rights.U
    return rights & ~Rights.X if controls.cr4_smep else rights
