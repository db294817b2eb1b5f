"""The vCPU: control registers and `access()`, with the two-dimensional walk under EPT.

With EPT on, the hardware walks two trees for one access (SDM Vol 3C 29.3.2 "EPT Translation
Mechanism"): every guest paging-structure address is a GPA and goes through the EPT walk before
the guest entry can be read, and the final GPA goes through it too. An EPT walk that fails
exits to KVM (an EPT violation, reason 48, or a misconfiguration, reason 49); KVM fixes the EPT
or hands the access to userspace as MMIO, and re-entering the guest retries the access.
A fault the guest itself must see (#PF, #GP) is delivered to the guest, never to KVM.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from twodwalk.engine.ept import (
    EXIT_REASON_EPT_MISCONFIG,
    EXIT_REASON_EPT_VIOLATION,
    ep4ta_of,
    ept_violation_qualification,
    is_misconfiguration,
)
from twodwalk.engine.exits import ShadowExits
from twodwalk.engine.formats import Rights, leaf_bit
from twodwalk.engine.kvm.mmu import EmulateMmio, TdpMmu
from twodwalk.engine.kvm.run import InternalError, MmioExit
from twodwalk.engine.kvm.shadow import EmulateWrite, InjectFault, ShadowMmu
from twodwalk.engine.npt import GUEST_TABLE_ACCESS, SVM_EXIT_NPF, nested_access, npf_exit_info1
from twodwalk.engine.paging import (
    GeneralProtection,
    PageFault,
    exception_for,
)
from twodwalk.engine.processor import ACCESS_SIZE, AccessResult, Processor
from twodwalk.engine.tables import EptTables, GpaTranslation, PageWalkCacheTables
from twodwalk.engine.tlb import (
    Tag,
    TlbEntry,
    TranslationCaches,
    deepest_table,
    fill_paging_structure_caches,
)
from twodwalk.engine.trace import (
    CacheHit,
    DataAccess,
    EptWalk,
    GuestWalk,
    KvmStep,
    NativeWalk,
    Trace,
    VmExit,
)
from twodwalk.engine.walker import (
    Access,
    AccessKind,
    FaultKind,
    WalkFault,
    WalkRecord,
    WalkStart,
    walk,
)
from twodwalk.errors import TwodwalkError, check_choice, check_int

if TYPE_CHECKING:
    from twodwalk.engine.kvm.vm import Vm

_WRITE = Access.of(AccessKind.WRITE)
PREV_ROOTS = 3  # KVM_MMU_NUM_PREV_ROOTS


class GpaTranslator:
    """GPA -> HPA as the processor does it under EPT: a guest-physical mapping from the cache
    if one allows the access, else an EPT walk, started below the root when a guest-physical
    paging-structure cache knows a table on the way; what it finds is cached (SDM Vol 3C
    29.4.2-29.4.3)."""

    def __init__(self, mmu: TdpMmu, caches: TranslationCaches) -> None:
        self.mmu = mmu
        self.caches = caches
        self.cache = caches.guest_physical
        self.psc = caches.ept_psc
        self.tag = Tag(0, 0, mmu.nested_tag)
        # the AMD-style model's page-walk cache, which EPT walks read through instead
        self.pwc = caches.pwc if caches.amd else None
        pwc = self.pwc
        self.tables = None if pwc is None else PageWalkCacheTables(mmu.host.physical_tables, pwc)
        self.walked: list[WalkRecord] = []  # EPT walks since the caches were last filled
        self.dirty_bit = leaf_bit(mmu.fmt, "d")  # EPT D, bit 9 (with EPT A/D on)

    def fill_paging_structure_caches(self) -> None:
        """Cache the upper EPT entries of the walks that completed, once the two-dimensional
        walk is over: they do not shorten the walk that fills them (when entries are cached
        is left to the processor, SDM Vol 3C 29.4.3). Guest-physical mappings are made as
        each EPT walk ends, so a later nested walk of the same walk may use one."""
        if self.walked:
            for record in self.walked:
                fill_paging_structure_caches(self.psc, self.tag, record)
            self.walked.clear()

    def current(self, mmu: TdpMmu) -> bool:
        """Whether this path still uses the VM's MMU and the vCPU's caches as they are."""
        caches = self.caches
        pwc = caches.pwc if caches.amd else None
        return (
            self.mmu is mmu
            and self.cache is caches.guest_physical
            and self.psc is caches.ept_psc
            and self.pwc is pwc
        )

    def translate(self, gpa: int, access: Access) -> GpaTranslation:
        hit = self.cache.lookup(self.tag, gpa) if self.cache.enabled else None
        if hit is not None:
            refused = self.mmu.rules.violation(access, hit.rights, 0)
            if refused is None and (hit.dirty or not access.is_write):
                offset = gpa & (hit.page_size - 1)
                return GpaTranslation(hit.frame + offset, hit.page_size, hit.rights, None)
            self.cache.invalidate(lambda e: e is not hit)
        start = None
        psc = self.psc
        # Written out, not any(...): this runs for every EPT walk of a 2D walk.
        psc_on = self.pwc is None and (
            psc[2].enabled or psc[3].enabled or psc[4].enabled or psc[5].enabled
        )
        if psc_on:
            found = deepest_table(psc, self.tag, gpa, self.mmu.fmt.levels)
            if found is not None:
                level, entry = found
                start = WalkStart(level - 1, entry.table_hpa, entry.rights)
        record = self.mmu.walk(gpa, access, self.tables, start)
        t = record.translation
        if t is None:
            return GpaTranslation(None, 0, Rights.NONE, record)
        if self.pwc is not None:
            self.pwc.fill(record)
        elif psc_on:
            self.walked.append(record)
        if not self.cache.enabled:
            return GpaTranslation(t.address, t.page_size, t.rights, record)
        leaf = record.leaf
        dirty = not self.mmu.ad or bool(leaf & self.dirty_bit)
        self.cache.insert(
            TlbEntry(
                self.tag,
                gpa & ~(t.page_size - 1),
                t.page_size,
                t.address & ~(t.page_size - 1),
                None,
                t.rights,
                None,
                leaf,
                dirty,
                False,
            )
        )
        return GpaTranslation(t.address, t.page_size, t.rights, record)


class Vcpu(Processor):
    """One virtual CPU of a VM: the two-dimensional walk (or KVM's shadow tables),
    VM exits to KVM, and the caches tagged by VPID and EPTP."""

    def __init__(self, vm: Vm) -> None:
        """A vCPU of `vm` (KVM_CREATE_VCPU): it holds its VM and the host's physical memory,
        as KVM's `vcpu->kvm` does."""
        # KVM gives each vCPU a VPID when the CPU has them (vmx.c allocate_vpid).
        super().__init__(vm.host.memory, vm.cpu, vpid=1)
        self.vm = vm
        self._gpa_path: GpaTranslator | None = None
        mmu = vm.mmu
        self._ep4ta = mmu.nested_tag if isinstance(mmu, TdpMmu) else 0  # fixed per VM
        self._shadow = isinstance(mmu, ShadowMmu)  # a VM's MMU kind never changes
        # Without EPT, KVM runs the guest with hardware CR0.WP=1 whatever the guest set
        # (vmx.c `vmx_set_cr0`, svm.c `svm_set_cr0`), so that a supervisor write through a
        # read-only shadow entry always exits and `ShadowMmu.page_fault` can emulate guest
        # WP=0; and with EFER.NX=1 (vmx.c `update_transition_efer`, svm.c `svm_set_efer`:
        # "shadow paging assumes NX"), so that the XD bit it sets in shadow entries is legal.
        self.forces_wp_nx = self._shadow
        # How the nested walk sees the CPU's reads of guest tables: writes with EPT A/D on
        # (SDM 29.3.5); under NPT user writes, always (`npt.GUEST_TABLE_ACCESS`).
        ad = isinstance(mmu, TdpMmu) and mmu.ad
        npt = isinstance(mmu, TdpMmu) and mmu.npt
        self._table_access = (
            GUEST_TABLE_ACCESS if npt else Access.of(AccessKind.WRITE if ad else AccessKind.READ)
        )
        self._prev_roots: list[int] = []  # CR3 roots, current first (`mmu->prev_roots`)
        self._exits = ShadowExits(vm.cpu.vendor)  # how this vendor reports shadow exits
        mmu.tlb_flushers.append(self._kvm_flush)

    def flush_tlb(self) -> None:
        """Flush every translation this vCPU caches: TLB (global entries too),
        paging-structure caches and guest-physical mappings (INVVPID single-context plus,
        with EPT, INVEPT single-context), so that the next access walks from scratch."""
        self.invvpid("single")
        if isinstance(self.vm.mmu, TdpMmu):
            self._flush_nested()

    def _flush_nested(self) -> None:
        """Drop what the CPU cached from the nested tables: INVEPT single-context with EPT;
        with NPT, KVM's TLB_CONTROL flush of the ASID (svm.c `svm_flush_tlb_asid`), which
        takes the nested translations of the ASID with it."""
        if self.vm.ept.npt:
            self.caches.flush_asid(self.asid)
        else:
            self.invept("single")

    @property
    def asid(self) -> int:
        """On AMD, the ASID that tags this vCPU's cached translations (the VMCB's ASID field,
        which KVM hands out from 1: ASID 0 is the host's); the model keeps it where Intel
        keeps the VPID."""
        return self.vpid

    def invlpga(self, gva: int, asid: int | None = None) -> None:
        """INVLPGA (APM Vol 3): the host drops the translation of one page for one ASID
        (default: this vCPU's), global pages too; KVM runs it for a guest's INVLPG under
        shadow paging (svm.c `svm_flush_tlb_gva`)."""
        if self.cpu_model.vendor != "amd":
            raise TwodwalkError("INVLPGA is AMD's: on Intel use invvpid('address', gva=...)")
        target = self.asid if asid is None else check_int("asid", asid, 0, 1 << 32)
        self.caches.flush_address(target, None, check_int("gva", gva, 0, 1 << 64))

    def invept(self, kind: str, eptp: int | None = None) -> None:
        """INVEPT (SDM Vol 3C 31.3): "single" drops the combined and guest-physical mappings
        tagged with one EPTP's EP4TA (default: the VM's EPTP), "global" those of every EPTP."""
        check_choice("kind", kind, ("single", "global"))
        if isinstance(self.vm.mmu, TdpMmu) and self.vm.mmu.npt:
            raise TwodwalkError("INVEPT is Intel's: an NPT vCPU flushes its ASID (flush_tlb)")
        if kind == "global":
            self.caches.flush_eptp(None)
        else:
            value = self.vm.ept.eptp.value if eptp is None else eptp
            self.caches.flush_eptp(ep4ta_of(check_int("eptp", value, 0, 1 << 64)))

    def _kvm_flush(self) -> None:
        """`kvm_flush_remote_tlbs` after KVM zaps or write-protects entries: INVEPT of the
        VM's EPTP with EPT (`ept_sync_context`), INVVPID of the vCPU's VPID without."""
        if isinstance(self.vm.mmu, TdpMmu):
            self._flush_nested()
        else:
            self.invvpid("single")

    def _hva_of(self, gpa: int) -> int | None:
        return self.vm.fault_hva(gpa)

    def _intercepted_cr3_load(self) -> Trace:
        """Without EPT, KVM sets CR3-load exiting: MOV to CR3 exits (reason 28, qualification
        3: MOV to CR3 from RAX, SDM Vol 3C table 28-3) and KVM switches shadow roots itself
        (`kvm_set_cr3` -> `kvm_mmu_new_pgd`). A root among the vCPU's previous roots
        (KVM_MMU_NUM_PREV_ROOTS = 3) is switched to at once (`fast_pgd_switch`); any other
        is found or built on the next fault (`kvm_mmu_load`). With EPT there is no exit."""
        trace = Trace()
        if not self._shadow:
            return trace
        self._vm_exit(trace, self._exits.cr3_load())
        root = self.cr3_root
        cached = root in self._prev_roots
        self._prev_roots = [root, *(r for r in self._prev_roots if r != root)][: PREV_ROOTS + 1]
        detail = (
            f"fast_pgd_switch: the shadow root for CR3 {root:#x} is one of the vCPU's"
            f" {PREV_ROOTS} previous roots"
            if cached
            else f"CR3 {root:#x} is not among the current and {PREV_ROOTS} previous roots:"
            " its shadow root is found or built on the next fault (kvm_mmu_load)"
        )
        trace.add(KvmStep("kvm_mmu_new_pgd", detail))
        return trace

    def _intercepted_invlpg(self, gva: int) -> Trace:
        """Without EPT, KVM sets INVLPG exiting: INVLPG exits (reason 14, the qualification
        is the address, SDM Vol 3C 28.2.1) and KVM invalidates the address in its shadow
        tables and in the TLB (`kvm_mmu_invlpg`, `flush_tlb_gva`); with no unsync shadow
        pages in this model there is nothing to sync. With EPT there is no exit."""
        trace = Trace()
        if self._shadow:
            self._vm_exit(trace, self._exits.invlpg(gva))
            trace.add(KvmStep("kvm_mmu_invlpg", f"flush the TLB entries of GVA {gva:#x}"))
        return trace

    def _cr0_wp_changed(self) -> None:
        """Under shadow paging CR0.WP is part of KVM's MMU role (`kvm_post_set_cr0` ->
        `kvm_mmu_reset_context`): the vCPU moves to the shadow root built for the new WP
        (`ShadowMmu.root_for`) and its TLB is flushed, so no entry made for WP=0 survives."""
        if self._shadow:
            self.flush_tlb()

    def _vm_exit(self, trace: Trace, event: VmExit) -> None:
        """A VM exit; without a VPID (vpid=0) every exit and entry flushes the linear and
        combined mappings of VPID 0 (SDM Vol 3C 29.4.3.3). With PML on, KVM empties the PML
        buffer into the dirty bitmap first thing on every exit (vmx.c `__vmx_handle_exit`
        -> `vmx_flush_pml_buffer`)."""
        trace.add(event)
        if self.vpid == 0:
            self.caches.flush_vpid(0)
        mmu = self.vm.mmu
        if isinstance(mmu, TdpMmu) and mmu.pml_enabled:
            mmu.flush_pml_buffer(trace)

    def _attempt(
        self, gva: int, access: Access, value: int | None, trace: Trace
    ) -> AccessResult | None:
        """One try of the access after a TLB miss, up to a result or a fixed exit
        (None: retry)."""
        mmu = self.vm.mmu
        if isinstance(mmu, ShadowMmu):
            return self._attempt_shadow(mmu, gva, access, value, trace)
        return self._attempt_tdp(mmu, gva, access, value, trace)

    def _guest_physical(self, mmu: TdpMmu) -> GpaTranslator:
        """The GPA -> HPA path through this vCPU's guest-physical mappings (made again only
        when someone replaced a cache or switched the cache model)."""
        path = self._gpa_path
        if path is None or not path.current(mmu):
            path = self._gpa_path = GpaTranslator(mmu, self.caches)
        return path

    def _attempt_tdp(
        self, mmu: TdpMmu, gva: int, access: Access, value: int | None, trace: Trace
    ) -> AccessResult | None:
        """With EPT: the two-dimensional hardware walk (SDM 29.3.2), helped by the
        paging-structure caches and the guest-physical mappings."""
        controls = self.controls()
        fmt = self.guest_format(controls)
        root = self.cr3_root
        start, known = self._psc_start(fmt, gva, trace)
        gpa_path = self._guest_physical(mmu)
        tables = EptTables(gpa_path, self.memory, known, self._table_access)
        guest = walk(fmt, root, gva, access, tables, controls.rules, start)
        trace.add(GuestWalk(guest))
        final = None
        translation = guest.translation
        if translation is not None:
            self._fill_psc(guest)
            # EPT has no user/supervisor distinction: the final GPA is translated as a plain
            # access of the same kind; under NPT as a user access (`npt.nested_access`).
            kind = access.kind
            nested = nested_access(kind) if mmu.npt else Access.of(kind)
            final = gpa_path.translate(translation.address, nested)
        gpa_path.fill_paging_structure_caches()  # the hardware walk is over
        if translation is None:
            fault = guest.fault
            assert fault is not None
            if fault.nested is not None:
                return self._ept_exit(guest, fault.nested, final=False, value=value, trace=trace)
            return self._result(trace, fault=exception_for(guest, controls))
        assert final is not None
        gpa = translation.address
        if final.record is not None:
            trace.add(EptWalk(final.record))
        hpa = final.hpa
        if hpa is None:
            assert final.record is not None
            return self._ept_exit(guest, final.record, final=True, value=value, trace=trace)
        if final.record is None:
            trace.add(CacheHit("guest-physical", gpa, hpa))
        page_size = min(translation.page_size, final.page_size)
        self._fill_tlb(gva, page_size, hpa, gpa, guest, final.rights)
        data = self._data_access(hpa, access, value, trace)
        return self._result(trace, value=data, gpa=gpa, hva=self.vm.fault_hva(gpa), hpa=hpa)

    def _ept_exit(
        self, guest: WalkRecord, record: WalkRecord, *, final: bool, value: int | None, trace: Trace
    ) -> AccessResult | None:
        """A VM exit for a failed nested walk (an EPT violation or misconfiguration, or
        AMD's #VMEXIT(NPF) with EXITINFO1 and the GPA in EXITINFO2); None means KVM fixed
        it and the guest retries."""
        mmu = self.vm.ept
        gpa = record.address
        if mmu.npt:
            exit_info1 = npf_exit_info1(record, final)
            self._vm_exit(trace, VmExit(SVM_EXIT_NPF, "NPF", exit_info1, gpa, guest.address))
            resolution = mmu.handle_npf(gpa, exit_info1, trace)
        elif is_misconfiguration(record):
            self._vm_exit(
                trace, VmExit(EXIT_REASON_EPT_MISCONFIG, "EPT_MISCONFIG", None, gpa, guest.address)
            )
            resolution = mmu.handle_ept_misconfig(gpa, trace)
        else:
            qualification = ept_violation_qualification(record, final)
            self._vm_exit(
                trace,
                VmExit(
                    EXIT_REASON_EPT_VIOLATION, "EPT_VIOLATION", qualification, gpa, guest.address
                ),
            )
            resolution = mmu.handle_ept_violation(gpa, qualification, trace)
        if not isinstance(resolution, EmulateMmio):
            return None
        if not final:
            return self._table_in_no_memslot(guest, trace)
        return self._mmio_exit(gpa, guest.access, value, trace)

    def _mmio_exit(self, gpa: int, access: Access, value: int | None, trace: Trace) -> AccessResult:
        """KVM's emulator hands the access to userspace (KVM_EXIT_MMIO); it cannot fetch
        instructions from MMIO (KVM_EXIT_INTERNAL_ERROR)."""
        if access.is_fetch:
            exit_ = InternalError(
                "KVM_INTERNAL_ERROR_EMULATION", f"instruction fetch from MMIO at GPA {gpa:#x}"
            )
            return self._result(trace, exit=exit_, gpa=gpa)
        data = (value or 0).to_bytes(ACCESS_SIZE, "little") if access.is_write else bytes(8)
        mmio = MmioExit(gpa, access.is_write, ACCESS_SIZE, data)
        return self._result(trace, exit=mmio, gpa=gpa)

    def _attempt_shadow(
        self, mmu: ShadowMmu, gva: int, access: Access, value: int | None, trace: Trace
    ) -> AccessResult | None:
        """With EPT off: the hardware walks KVM's shadow tables; a #PF exits to KVM
        (exit reason 0, exception #PF), which decides what the guest sees."""
        controls = self.controls()
        if controls.cr4_pke:
            raise TwodwalkError("cr4_pke=True needs EPT: KVM exposes PKU only with tdp=True")
        fmt = self.guest_format(controls)
        guest_root = self.cr3_root
        start, _ = self._psc_start(fmt, gva, trace)
        shadow_tables = self.walk_tables(self.vm.host.physical_tables)
        hardware_controls = self.hardware_controls()
        hardware = mmu.walk(
            mmu.root_for(guest_root, fmt, controls.cr0_wp),
            gva,
            access,
            hardware_controls,
            start,
            shadow_tables,
        )
        trace.add(NativeWalk(hardware))
        if hardware.translation is not None:
            self._fill_psc(hardware)
            hpa = hardware.translation.address
            gpa = (mmu.spte_gfn[hardware.steps[-1].entry_address] << 12) | (gva & 0xFFF)
            self._fill_tlb(gva, hardware.translation.page_size, hpa, gpa, hardware, None)
            data = self._data_access(hpa, access, value, trace)
            return self._result(trace, value=data, gpa=gpa, hva=self.vm.fault_hva(gpa), hpa=hpa)
        exception = exception_for(hardware, hardware_controls)
        if isinstance(exception, GeneralProtection):
            return self._result(trace, fault=exception)
        assert isinstance(exception, PageFault)
        self._vm_exit(trace, self._exits.page_fault(gva, exception.error_code))
        resolution = mmu.page_fault(gva, access, controls, guest_root, hardware, trace)
        if isinstance(resolution, InjectFault):
            return self._result(trace, fault=resolution.exception)
        if isinstance(resolution, EmulateMmio):
            return self._mmio_exit(resolution.gpa, access, value, trace)
        if isinstance(resolution, EmulateWrite):
            assert value is not None
            hpa = mmu.emulate_write(resolution.gpa, value.to_bytes(ACCESS_SIZE, "little"), trace)
            trace.add(DataAccess(hpa, access.kind.value, value))
            gpa = resolution.gpa
            return self._result(trace, value=value, gpa=gpa, hva=self.vm.fault_hva(gpa), hpa=hpa)
        return None

    def _table_in_no_memslot(self, guest: WalkRecord, trace: Trace) -> AccessResult:
        """KVM emulates the instruction; its software walker cannot read a guest table that
        lies in no memslot and treats the entry as not present (paging_tmpl.h
        `walk_addr_generic`, error path): the guest gets #PF with P=0."""
        assert guest.fault is not None
        trace.add(
            KvmStep(
                "walk_addr_generic",
                "guest page table is in no memslot: treated as"
                " not present; #PF injected into the guest",
            )
        )
        level = guest.fault.level
        not_present = WalkFault(
            FaultKind.NOT_PRESENT, level, guest.address, "guest page table lies in no memslot"
        )
        return self._result(
            trace, fault=exception_for(replace(guest, outcome=not_present), self.controls())
        )
