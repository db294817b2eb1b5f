"""Three dimensions: an L2 guest under an L1 hypervisor under KVM (nested EPT), as Linux 6.18
runs it on Intel (arch/x86/kvm/vmx/nested.c, arch/x86/kvm/mmu/paging_tmpl.h for EPT).

L1 is KVM's ordinary guest: its RAM is memslot 0 of L0's VM, mapped by EPT01. Inside it runs a
hypervisor (`L1Hypervisor`, a small model of KVM-as-guest) with memslots of its own over L1's
memory and an EPT (EPT12) written into L1's RAM, mapping L2 GPAs to L1 GPAs. The CPU cannot use
EPT12: it maps to L1 GPAs, not host frames. So L0 *shadows* it (`NestedEptMmu`): on an EPT
violation of L2 it walks EPT12 in software (`FNAME(walk_addr)` for EPT, each table read being
an L1 GPA that L0 translates itself), reflects the violation to L1 when EPT12 does not map or
allow the access (`nested_ept_inject_page_fault`), and otherwise installs an EPT02 entry, L2
GPA -> HPA, with EPT12's rights and L0's host page (`FNAME(fetch)`). L0 write-protects the
EPT12 pages it shadows, so L1's edits trap and zap what was derived from them; L1's INVEPT
exits to L0, which drops EPT02 entries.

Simplification: KVM-in-L1's memslots map L2 GPAs straight onto L1 GPAs (its VMM's memory and
L1's own page tables for it are left out); one L2 vCPU; 4 KiB EPT12 pages.
"""

from __future__ import annotations

from twodwalk.engine.ept import (
    EPT_VIOLATION_ACC_WRITE,
    EptAccessRules,
    Eptp,
    ept_violation_qualification,
)
from twodwalk.engine.formats import EPT_MEMTYPE_WB, Rights, ept_format
from twodwalk.engine.guest import GuestOS, GuestRam
from twodwalk.engine.host import Process
from twodwalk.engine.kvm.memslots import Memslots
from twodwalk.engine.kvm.mmu import (
    PFERR_GUEST_FINAL,
    VMX_EPT_SUPPRESS_VE_BIT,
    Fixed,
    Resolution,
    TdpMmu,
)
from twodwalk.engine.kvm.vm import Vm
from twodwalk.engine.machine import Machine
from twodwalk.engine.pagetables import PageTables
from twodwalk.engine.paging import PFERR_FETCH, PFERR_WRITE
from twodwalk.engine.tables import MemslotTables
from twodwalk.engine.trace import KvmStep, KvmWalk, Trace
from twodwalk.engine.units import MIB, PAGE_SHIFT, PAGE_SIZE
from twodwalk.engine.vcpu import Vcpu
from twodwalk.engine.walker import Access, AccessKind, TableRead, WalkRecord, walk
from twodwalk.errors import TwodwalkError, check_int

EPT_RULES = EptAccessRules()  # EPT12 is walked by EPT's rules (paging_tmpl.h PTTYPE_EPT)


class Ept12Memory:
    """L1's RAM as L1's hypervisor writes its EPT12: stores at L1 GPAs (`Vm.guest_store` of
    L0's VM), each shown first to L0, which traps writes to EPT12 pages it shadows."""

    def __init__(self, l0: Machine, nested: NestedEptMmu) -> None:
        self.ram = GuestRam(l0.vm)
        self.nested = nested

    def read_u64(self, address: int) -> int:
        return self.ram.read_u64(address)

    def write_u64(self, address: int, value: int) -> None:
        self.nested.l1_touch(address)
        self.nested.track_write(address)
        self.ram.write_u64(address, value)


class L1Hypervisor:
    """KVM running in L1, for one L2 guest: memslots (L2 GPA -> L1 GPA) and EPT12 in L1's
    RAM, filled lazily when L0 reflects an EPT violation of L2 (`handle_ept_violation`)."""

    def __init__(
        self, l0: Machine, nested: NestedEptMmu, l2_ram: int, l2_base: int, ept12_top: int
    ) -> None:
        self.memslots = Memslots(max_gpa_bits=48, address_spaces=1)
        self.memslots.set_user_memory_region(0, 0, 0, l2_ram, l2_base)
        self._next_table = ept12_top
        self._l0 = l0
        fmt = ept_format(4, l0.cpu_model, ad=True)
        self.ept12 = PageTables(fmt, Ept12Memory(l0, nested), self._alloc_table)
        self.eptp12 = Eptp(self.ept12.root, 4, ad=True)

    def _alloc_table(self) -> int:
        """A zeroed L1 page for an EPT12 table, from the top of its area down."""
        self._next_table -= PAGE_SIZE
        self._l0.vm.guest_store(self._next_table, bytes(PAGE_SIZE))
        return self._next_table

    def l1_gpa(self, l2_gpa: int) -> int:
        """L2 GPA -> L1 GPA through L1's memslots (`__gfn_to_hva_memslot` in L1's KVM)."""
        memslot = self.memslots.gfn_to_memslot(l2_gpa >> PAGE_SHIFT)
        if memslot is None:
            raise TwodwalkError(
                f"L2 GPA {l2_gpa:#x} is in no memslot of L1's hypervisor: MMIO for L2 is not"
                " modelled"
            )
        return memslot.gfn_to_hva(l2_gpa >> PAGE_SHIFT) | l2_gpa & (PAGE_SIZE - 1)

    def unmap(self, l2_gpa: int) -> None:
        """L1 takes an L2 page away (its own swap-out, say): it clears the EPT12 leaf, a
        store L0 traps because it shadows the page (`NestedEptMmu.track_write`)."""
        self.ept12.unmap(l2_gpa & ~(PAGE_SIZE - 1), PAGE_SIZE)

    def handle_ept_violation(self, l2_gpa: int, trace: Trace) -> None:
        """L1's KVM on the EPT violation L0 reflected: the L1 GPA from its memslot, and an
        EPT12 leaf for it (RWX, write-back, A and D set, as `make_spte` does)."""
        l1_gpa = self.l1_gpa(l2_gpa & ~(PAGE_SIZE - 1))
        trace.add(
            KvmStep(
                "L1 KVM: kvm_tdp_page_fault",
                f"L2 GPA {l2_gpa & ~0xFFF:#x} -> L1 GPA {l1_gpa:#x} (L1's memslot): EPT12 entry"
                " written in L1's RAM",
                gfn=l2_gpa >> PAGE_SHIFT,
            )
        )
        fields = {"r": 1, "w": 1, "x": 1, "mt": EPT_MEMTYPE_WB, "ipat": 1, "a": 1, "d": 1}
        self.ept12.map(l2_gpa & ~(PAGE_SIZE - 1), l1_gpa, PAGE_SIZE, **fields)


class NestedEptMmu:
    """L0's shadow of EPT12: the EPT02 that the CPU walks for L2 (`nested_ept_init_mmu_context`,
    paging_tmpl.h compiled for EPT), kept in step with EPT12 by write protection, INVEPT and
    L0's own MMU notifiers."""

    def __init__(self, l0: Machine, ept02: TdpMmu) -> None:
        self.l0 = l0
        self.ept02 = ept02
        self.l1: L1Hypervisor | None = None
        # EPT12 pages L0 write-protects (L1 GFN) -> each entry's L1 GPA -> L2 GFNs derived
        self.shadowed: dict[int, dict[int, set[int]]] = {}
        self.backed: dict[int, set[int]] = {}  # L1 GFN -> L2 GFNs whose EPT02 leaf maps it
        self.log: list[KvmStep] = []
        self.traps = 0  # L1's writes to shadowed EPT12 pages, each a VM exit to L0
        # The access being handled: what L1 does while handling a reflected exit (its
        # traps, its own EPT violations) belongs to that access's trace.
        self._trace: Trace | None = None
        l0.host.notifiers.append(self)

    def _step(self, step: KvmStep) -> None:
        (self.log.append if self._trace is None else self._trace.add)(step)

    def l1_touch(self, l1_gpa: int) -> None:
        """L1's CPU writes its own RAM through EPT01: a first touch takes an EPT violation
        of L1 that L0 handles as for any guest (`kvm_tdp_page_fault`)."""
        ept01 = self.l0.vm.ept
        if ept01.get_walk(l1_gpa).translation is None:
            self._step(
                KvmStep(
                    "handle_ept_violation (L1)",
                    f"L1's first store to its page at L1 GPA {l1_gpa & ~0xFFF:#x}: an EPT"
                    " violation of L1, which L0 fixes in EPT01",
                    gfn=l1_gpa >> PAGE_SHIFT,
                )
            )
            ept01.handle_ept_violation(l1_gpa, EPT_VIOLATION_ACC_WRITE, self._trace or Trace())

    def _hypervisor(self) -> L1Hypervisor:
        assert self.l1 is not None, "the L1 hypervisor is set up with the machine"
        return self.l1

    def page_fault(self, l2_gpa: int, code: int, trace: Trace) -> Resolution:
        """`kvm_mmu_page_fault` on an EPT violation of L2: walk EPT12 in software; reflect
        the violation to L1 if it does not map or allow the access, else shadow it."""
        l1 = self._hypervisor()
        kind = (
            AccessKind.FETCH
            if code & PFERR_FETCH
            else AccessKind.WRITE
            if code & PFERR_WRITE
            else AccessKind.READ
        )
        tables = MemslotTables(self.l0.vm.mmu, self.l0.memory, trace)
        record = walk(l1.ept12.fmt, l1.eptp12.root, l2_gpa, Access.of(kind), tables, EPT_RULES)
        trace.add(KvmWalk(record))
        if record.translation is None:
            return self._reflect(record, bool(code & PFERR_GUEST_FINAL), trace)
        return self._shadow(record, trace)

    def _reflect(self, record: WalkRecord, final: bool, trace: Trace) -> Resolution:
        """`nested_ept_inject_page_fault`: L1 gets the EPT violation it would get on real
        hardware (its qualification from EPT12's entries); L1's KVM fixes EPT12 and its
        VMRESUME traps back to L0, which enters L2 again."""
        qualification = ept_violation_qualification(record, final)
        self._trace = trace
        trace.add(
            KvmStep(
                "nested_ept_inject_page_fault",
                f"EPT12 does not map L2 GPA {record.address:#x} for this access: reflect the EPT"
                f" violation to L1 (nested VM exit, qualification {qualification:#x})",
                gfn=record.address >> PAGE_SHIFT,
            )
        )
        try:
            self._hypervisor().handle_ept_violation(record.address, trace)
        finally:
            self._trace = None
        trace.add(KvmStep("nested_vmx_run", "L1's VMRESUME traps to L0, which enters L2"))
        return Fixed()

    def _shadow(self, record: WalkRecord, trace: Trace) -> Resolution:
        """`FNAME(fetch)`: EPT12 maps the L2 GPA to an L1 GPA; L0 finds the host page behind
        that L1 GPA as it does for L1 itself (memslot -> HVA -> `hva_to_pfn`) and installs an
        EPT02 leaf L2 GPA -> HPA with EPT12's rights, writable only if L0's page is."""
        translation = record.translation
        assert translation is not None
        l1_gpa = translation.address & ~(PAGE_SIZE - 1)
        l0 = self.l0.vm.mmu
        memslot = self.l0.vm.memslots.gfn_to_memslot(l1_gpa >> PAGE_SHIFT)
        if memslot is None:
            raise TwodwalkError(f"L1 GPA {l1_gpa:#x} is in no memslot of L0: not modelled")
        hva = memslot.gfn_to_hva(l1_gpa >> PAGE_SHIFT)
        wants_write = bool(translation.rights & Rights.W)
        page, host_writable, size = l0._hva_to_pfn(hva, wants_write, trace)
        hpa = page + (hva & (size - 1))
        writable = wants_write and host_writable and not memslot.readonly
        rights = translation.rights
        spte = self.ept02.fmt.encode(
            1,
            True,
            address=hpa,
            r=int(bool(rights & Rights.R)),
            w=int(writable),
            x=int(bool(rights & Rights.X)),
            mt=EPT_MEMTYPE_WB,
            ipat=1,
            a=1,
            d=int(writable),
            sw=1,
            hw=int(host_writable),
            mw=int(writable),
        )
        l2_gfn = record.address >> PAGE_SHIFT
        self.ept02._map(l2_gfn, 1, spte | VMX_EPT_SUPPRESS_VE_BIT, trace)
        trace.add(
            KvmStep(
                "FNAME(fetch)",
                f"EPT02 leaf: L2 GPA {l2_gfn << PAGE_SHIFT:#x} -> (EPT12) L1 GPA {l1_gpa:#x}"
                f" -> (L0) HPA {hpa:#x}, {'writable' if writable else 'read-only'}",
                gfn=l2_gfn,
                hpa=hpa,
                level=1,
            )
        )
        self.backed.setdefault(l1_gpa >> PAGE_SHIFT, set()).add(l2_gfn)
        for step in record.steps:  # account_shadowed: L0 now write-protects these EPT12 pages
            entries = self.shadowed.setdefault(step.entry_address >> PAGE_SHIFT, {})
            entries.setdefault(step.entry_address, set()).add(l2_gfn)
        return Fixed()

    def _zap(self, l2_gfns: set[int]) -> int:
        zapped = sum(self.ept02.unmap_gfn_range(gfn, gfn + 1) for gfn in sorted(l2_gfns))
        for derived in self.backed.values():
            derived -= l2_gfns
        for entries in self.shadowed.values():
            for derived in entries.values():
                derived -= l2_gfns
        return zapped

    def track_write(self, l1_gpa: int) -> None:
        """`kvm_mmu_track_write`: L1 stores to an EPT12 page L0 shadows; the store traps (an
        EPT violation of L1 on the write-protected page), L0 emulates it and zaps the EPT02
        entries derived from the entry it changed (`mmu_page_zap_pte`); a new entry, from
        which nothing was derived yet, costs the trap alone."""
        entries = self.shadowed.get(l1_gpa >> PAGE_SHIFT)
        if entries is None:
            return
        zapped = self._zap(entries.pop(l1_gpa & ~7, set()))
        self.traps += 1
        self._step(
            KvmStep(
                "kvm_mmu_track_write",
                f"L1 wrote its EPT12 entry at L1 GPA {l1_gpa:#x}, in a page L0 shadows: the"
                f" write trapped, was emulated, and {zapped} EPT02 entries were zapped",
                gfn=l1_gpa >> PAGE_SHIFT,
            )
        )

    def invept(self) -> int:
        """L1's INVEPT exits to L0 (`handle_invept`), which drops the EPT02 entries made from
        EPTP12 (`kvm_mmu_free_roots` of the nested MMU): all of them here."""
        zapped = self._zap({g for s in self.backed.values() for g in s})
        self.backed.clear()
        self.log.append(KvmStep("handle_invept", f"L1's INVEPT: {zapped} EPT02 entries zapped"))
        return zapped

    # --- L0's MMU notifiers, for the host pages behind L1's RAM -----------------------------

    def invalidate_range_start(
        self, process: Process, start: int, end: int, reason: str, trace: Trace | None
    ) -> None:
        """A host page behind L1 GPAs changes: the EPT02 leaves made from those L1 GFNs go
        with the EPT01 ones (`kvm_unmap_gfn_range` covers the nested MMU's shadow pages)."""
        for first, stop, _ in self.l0.vm.mmu._slot_ranges(process, start, end):
            l2_gfns = {g for l1 in range(first, stop) for g in self.backed.pop(l1, set())}
            for l1 in range(first, stop):  # an EPT12 page itself moved
                l2_gfns |= {g for d in self.shadowed.pop(l1, {}).values() for g in d}
            if l2_gfns:
                zapped = self._zap(l2_gfns)
                step = KvmStep(
                    "kvm_mmu_notifier_invalidate_range_start",
                    f"{reason}: L1 GFN [{first:#x}, {stop:#x}) backed nested entries:"
                    f" {zapped} EPT02 entries zapped",
                    gfn=first,
                )
                (self.log.append if trace is None else trace.add)(step)

    def invalidate_range_end(self, process: Process, start: int, end: int) -> None:
        """Nothing to end: the nested shadow keeps no invalidation count of its own."""

    def clear_flush_young(
        self, process: Process, start: int, end: int, trace: Trace | None
    ) -> bool:
        """EPT02's A bits are not aged in this model (KVM ages the nested MMU too)."""
        return False


class L2Memory:
    """L2's RAM as the L2 guest kernel writes it: L2 GPA -> (L1's memslots) L1 GPA -> L0's
    VM (`read_gpa`, `guest_store`)."""

    def __init__(self, l0: Machine, l1: L1Hypervisor) -> None:
        self.cpu = l0.cpu_model
        self._l0 = l0
        self._l1 = l1

    def read_gpa(self, gpa: int, size: int) -> bytes:
        return self._l0.vm.read_gpa(self._l1.l1_gpa(gpa), size)

    def guest_store(self, gpa: int, data: bytes, trace: Trace | None = None) -> None:
        self._l0.vm.guest_store(self._l1.l1_gpa(gpa), data, trace)


class _Unshadowed:
    """The walk a hypothetical CPU would make for an L2 address with no shadow: each L2
    table address and the data's L2 GPA through EPT12, each EPT12 table address and each
    L1 GPA through EPT01, reading the real tables and counting every memory reference."""

    def __init__(self, machine: NestedMachine) -> None:
        self.machine = machine
        self.references = 0
        self.space = "l2"  # whose guest-physical addresses the tables being walked use
        self._read = Access.of(AccessKind.READ)

    def read_entry(self, address: int, access: Access) -> tuple[int, TableRead | None]:
        """A table entry at a guest-physical `address` of L1 (EPT12's) or of L2 (L2's own
        tables), found through the trees below it; `self.space` says which."""
        hpa = self.l1_to_hpa(address) if self.space == "l1" else self.l2_to_hpa(address)
        self.references += 1
        value = self.machine.l0.memory.read_u64(hpa)
        return value, TableRead(value, hpa)

    def write_entry(self, address: int, read: TableRead | None, value: int) -> WalkRecord | None:
        raise AssertionError("a counting walk sets no A/D bits")

    def l1_to_hpa(self, l1_gpa: int) -> int:
        self.machine.nested.l1_touch(l1_gpa)  # such a CPU needs EPT01 entries for them all
        record = self.machine.l0.vm.ept.get_walk(l1_gpa)
        self.references += len(record.steps)
        return self._end(record, "EPT01")

    def l2_to_hpa(self, l2_gpa: int) -> int:
        l1 = self.machine.l1
        outer, self.space = self.space, "l1"
        record = walk(
            l1.ept12.fmt, l1.eptp12.root, l2_gpa, self._read, self, EPT_RULES, accessed_dirty=False
        )
        self.space = outer
        return self.l1_to_hpa(self._end(record, "EPT12"))

    def gva_to_hpa(self, gva: int) -> int:
        cpu = self.machine.l2_vcpu
        self.space = "l2"
        fmt = cpu.guest_format(cpu.controls())
        record = walk(
            fmt, cpu.cr3_root, gva, self._read, self, cpu.controls().rules, accessed_dirty=False
        )
        return self.l2_to_hpa(self._end(record, "L2's page tables"))

    @staticmethod
    def _end(record: WalkRecord, tree: str) -> int:
        if record.translation is None:
            raise TwodwalkError(f"{tree} do not map {record.address:#x}: touch it first")
        return record.translation.address


class NestedMachine:
    """An L2 guest, its L1 hypervisor, and L0 (the host kernel and KVM):

    - `l0`: the `Machine` whose guest is L1 (L1's RAM is its memslot 0, mapped by EPT01);
    - `l1`: the hypervisor in L1, with its memslots and EPT12;
    - `nested`: L0's shadow of EPT12, with the EPT02 the CPU walks for L2;
    - `l2`: L2's kernel and page tables; `l2_vcpu.access(gva, kind)` runs an L2 access.
    """

    def __init__(self, l1_ram: int = 64 * MIB, l2_ram: int = 8 * MIB) -> None:
        check_int("l2_ram", l2_ram, MIB, 17 * MIB, valid="1..16 MiB of L2 RAM")
        check_int("l1_ram", l1_ram, 32 * MIB, (1 << 30) + 1, valid="32 MiB .. 1 GiB of L1 RAM")
        self.l0 = Machine(guest_ram=l1_ram, gbpages=False)
        l2_vm = Vm(
            self.l0.host, self.l0.vmm, self.l0.cpu_model, tdp=True, ept_levels=4, ept_ad=True
        )
        self.nested = NestedEptMmu(self.l0, l2_vm.ept)
        # L2's RAM at L1 GPA 16 MiB; EPT12 tables just below the top 2 MiB of L1's RAM
        self.l1 = L1Hypervisor(self.l0, self.nested, l2_ram, 16 * MIB, l1_ram - 2 * MIB)
        self.nested.l1 = self.l1
        l2_vm.ept.page_fault_handler = self.nested.page_fault
        self.l2 = GuestOS(L2Memory(self.l0, self.l1), 4, ram_top=l2_ram)
        self.l2_vcpu = Vcpu(l2_vm)
        self.l2_vcpu.cr3 = self.l2.page_tables.root

    def three_dimensional_references(self, gva: int) -> int:
        """The memory references a hypothetical CPU would make to translate an L2 GVA with no
        shadow, walking all three trees itself. Counted by walking the real tables (every
        page on the way must be mapped already), it is (n+1)(m+1)(k+1) - 1 for n-, m- and
        k-level trees: 124 for 4, 4 and 4, against 24 for the walk through EPT02."""
        unshadowed = _Unshadowed(self)
        unshadowed.gva_to_hpa(gva)
        return unshadowed.references
