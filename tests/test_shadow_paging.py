"""Shadow paging (EPT off) against EPT: same guest-visible results, different machinery.

arch/x86/kvm/mmu/paging_tmpl.h: KVM walks the guest tables in software, builds shadow
tables GVA -> HPA that the CPU walks, write-protects guest page-table pages so guest edits
trap, and maps clean guest PTEs read-only so the first write sets the guest's D bit.
"""

from __future__ import annotations

import pytest
from support import mapped_machine

import twodwalk as tw
from twodwalk.engine.kvm.mmu import SHADOW_NONPRESENT_VALUE
from twodwalk.engine.kvm.shadow import ShadowMmu
from twodwalk.engine.trace import KvmStep, KvmWalk, NativeWalk, SpteWrite, TlbHit, VmExit

DATA_GVA = 0x40_0000
DATA_GPA = 0x10_0000
PT_WINDOW = 0x60_0000


def machine(tdp: bool) -> tw.Machine:
    m = mapped_machine(DATA_GVA, DATA_GPA, 2 * 4096, guest_ram=16 << 20, tdp=tdp, maxphyaddr=46)
    m.write_gpa(DATA_GPA + 8, (0xABCD).to_bytes(8, "little"))
    m.write_gpa(DATA_GPA + 0x1008, (0x1234).to_bytes(8, "little"))
    return m


def shadow_mmu(m: tw.Machine) -> ShadowMmu:
    assert isinstance(m.vm.mmu, ShadowMmu)
    return m.vm.mmu


def host_hpa(m: tw.Machine, gpa: int) -> int:
    """The HPA that memslot + host page tables give for a GPA right now."""
    hva = m.vm.gpa_to_hva(gpa)
    assert hva is not None
    translation = m.host.walk(m.vmm, hva, False).translation
    assert translation is not None
    return translation.address


@pytest.mark.parametrize("kind", ["read", "write", "fetch"])
def test_shadow_and_ept_agree_on_gva_to_hpa_and_data(kind: str) -> None:
    for tdp in (True, False):
        m = machine(tdp)
        value = 99 if kind == "write" else None
        r = m.vcpu.access(DATA_GVA + 8, kind, value)
        assert (r.fault, r.exit) == (None, None)
        assert r.gpa == DATA_GPA + 8
        assert r.hpa == host_hpa(m, DATA_GPA + 8)
        assert r.value == (99 if kind == "write" else 0xABCD)


@pytest.mark.parametrize(
    ("cpl", "kind", "setup", "code"),
    [
        (0, "read", "unmapped", 0),
        (0, "write", "unmapped", 2),
        (3, "read", "supervisor", 5),
        (3, "write", "readonly", 7),
        (0, "write", "readonly", 3),
        (0, "fetch", "nx", 0x11),
    ],
)
def test_guest_visible_faults_are_the_same(cpl: int, kind: str, setup: str, code: int) -> None:
    results = []
    for tdp in (True, False):
        m = machine(tdp)
        gva = 0x80_0000
        fields = {"supervisor": {"rw": 1}, "readonly": {"rw": 0, "us": 1}, "nx": {"xd": 1}}
        if setup != "unmapped":
            m.guest.map(gva, 0x20_0000, 4096, **fields[setup])
        m.vcpu.cpl = cpl
        r = m.vcpu.access(gva, kind, 5 if kind == "write" else None)
        assert isinstance(r.fault, tw.PageFault)
        results.append((r.fault.error_code, r.fault.cr2))
    assert results == [(code, 0x80_0000)] * 2


def test_non_canonical_is_gp_without_an_exit_in_shadow_mode() -> None:
    m = machine(False)
    r = m.vcpu.access(0x0000_8000_0000_0000, "read")
    assert isinstance(r.fault, tw.GeneralProtection)
    assert r.trace.of_type(VmExit) == []


def test_first_access_exits_and_kvm_walks_the_guest_tables_in_software() -> None:
    m = machine(False)
    r = m.vcpu.access(DATA_GVA, "read")
    exits = r.trace.of_type(VmExit)
    assert [(e.reason, e.qualification) for e in exits] == [(0, DATA_GVA)]
    software = r.trace.of_type(KvmWalk)
    assert len(software) == 1 and software[0].record.translation is not None
    assert software[0].record.translation.address == DATA_GPA
    cached = m.vcpu.access(DATA_GVA, "read")
    assert cached.trace.of_type(TlbHit) and cached.trace.memory_references() == []
    m.vcpu.flush_tlb()
    warm = m.vcpu.access(DATA_GVA, "read")
    assert warm.trace.of_type(VmExit) == []
    assert len(warm.trace.memory_references()) == 4, "the CPU walks only the shadow tables"
    assert len(warm.trace.of_type(NativeWalk)) == 1


def test_guest_page_table_pages_are_write_protected_in_the_shadow() -> None:
    m = machine(False)
    m.vcpu.access(DATA_GVA, "read")
    mmu = shadow_mmu(m)
    pte_gpa = m.guest.page_tables.entry_address(DATA_GVA, 1)
    assert pte_gpa is not None
    assert pte_gpa >> 12 in mmu.shadowed
    m.guest.map(PT_WINDOW, pte_gpa & ~0xFFF, 4096, rw=1)
    r = m.vcpu.access(PT_WINDOW, "read")
    assert r.fault is None
    leaf = r.trace.of_type(NativeWalk)[-1].record.steps[-1].value
    assert not leaf & 2, "the shadow leaf for a guest page-table page is read-only"


def test_guest_edit_of_its_page_table_traps_and_the_next_access_sees_it() -> None:
    m = machine(False)
    assert m.vcpu.access(DATA_GVA + 8, "read").value == 0xABCD
    pte_gpa = m.guest.page_tables.entry_address(DATA_GVA, 1)
    assert pte_gpa is not None
    m.guest.map(PT_WINDOW, pte_gpa & ~0xFFF, 4096, rw=1)
    old = int.from_bytes(m.read_gpa(pte_gpa, 8), "little")
    new = (old & ~0xF_FFFF_FFFF_F000) | (DATA_GPA + 0x1000)
    edit = m.vcpu.access(PT_WINDOW + (pte_gpa & 0xFFF), "write", new)
    assert (edit.fault, edit.exit) == (None, None)
    functions = [s.function for s in edit.trace.of_type(KvmStep)]
    assert "kvm_mmu_track_write" in functions and "kvm_mmu_pte_write" in functions
    zaps = [w for w in edit.trace.of_type(SpteWrite) if w.new == SHADOW_NONPRESENT_VALUE]
    assert [(w.level, w.leaf) for w in zaps] == [(1, True)], "the shadow PTE of that guest PTE"
    assert int.from_bytes(m.read_gpa(pte_gpa, 8), "little") == new
    after = m.vcpu.access(DATA_GVA + 8, "read")
    assert (after.gpa, after.value) == (DATA_GPA + 0x1008, 0x1234)


def test_same_edit_under_ept_needs_no_exit_and_the_tlb_stays_stale_until_invlpg() -> None:
    m = machine(True)
    m.vcpu.access(DATA_GVA + 8, "read")
    pte_gpa = m.guest.page_tables.entry_address(DATA_GVA, 1)
    assert pte_gpa is not None
    m.guest.map(PT_WINDOW, pte_gpa & ~0xFFF, 4096, rw=1)
    m.vcpu.access(PT_WINDOW, "read")
    old = int.from_bytes(m.read_gpa(pte_gpa, 8), "little")
    new = (old & ~0xF_FFFF_FFFF_F000) | (DATA_GPA + 0x1000)
    edit = m.vcpu.access(PT_WINDOW + (pte_gpa & 0xFFF), "write", new)
    assert edit.trace.of_type(VmExit) == []
    stale = m.vcpu.access(DATA_GVA + 8, "read")
    assert (stale.value, stale.gpa) == (0xABCD, DATA_GPA + 8), "the TLB still has the old page"
    m.vcpu.invlpg(DATA_GVA)
    fresh = m.vcpu.access(DATA_GVA + 8, "read")
    assert (fresh.value, fresh.gpa) == (0x1234, DATA_GPA + 0x1008)


def test_clean_guest_pte_is_shadowed_read_only_until_the_first_write() -> None:
    m = machine(False)
    pte_gpa = m.guest.page_tables.entry_address(DATA_GVA, 1)
    assert pte_gpa is not None
    m.vcpu.access(DATA_GVA, "read")
    guest_pte = int.from_bytes(m.read_gpa(pte_gpa, 8), "little")
    assert guest_pte >> 5 & 1 and not guest_pte >> 6 & 1, "KVM's walk set A, not D"
    write = m.vcpu.access(DATA_GVA, "write", 1)
    assert [e.reason for e in write.trace.of_type(VmExit)] == [0], "the first write traps"
    assert int.from_bytes(m.read_gpa(pte_gpa, 8), "little") >> 6 & 1, "then KVM sets D"
    again = m.vcpu.access(DATA_GVA, "write", 2)
    assert again.trace.of_type(VmExit) == []


def test_mmio_in_shadow_mode_caches_a_reserved_bit_entry() -> None:
    m = machine(False)
    m.guest.map(0x90_0000, 0x4000_0000, 4096, rw=1)
    first = m.vcpu.access(0x90_0000, "write", 7)
    assert isinstance(first.exit, tw.MmioExit)
    assert (first.exit.phys_addr, first.exit.is_write) == (0x4000_0000, True)
    second = m.vcpu.access(0x90_0000, "read")
    assert isinstance(second.exit, tw.MmioExit)
    fault = second.trace.of_type(NativeWalk)[0].record.fault
    assert fault is not None and fault.kind is tw.FaultKind.RESERVED
    assert "fast MMIO path" in " ".join(s.detail for s in second.trace.of_type(KvmStep))


def test_swap_out_zaps_the_shadow_leaf_through_the_rmap() -> None:
    m = machine(False)
    first = m.vcpu.access(DATA_GVA + 8, "read")
    assert first.hva is not None
    m.host.swap_out(m.vmm, first.hva & ~0xFFF)
    again = m.vcpu.access(DATA_GVA + 8, "read")
    assert [e.reason for e in again.trace.of_type(VmExit)] == [0]
    assert again.value == 0xABCD
    assert again.hpa == host_hpa(m, DATA_GPA + 8)


def test_pku_needs_ept() -> None:
    m = machine(False)
    m.vcpu.cr4_pke = True
    with pytest.raises(tw.TwodwalkError, match="PKU only with tdp=True"):
        m.vcpu.access(DATA_GVA, "read")


def test_guest_large_page_gets_direct_shadow_tables_with_4k_leaves() -> None:
    """KVM shadows a guest 2 MiB page with 4 KiB shadow entries under a direct shadow table
    (`FNAME(fetch)` links tables down to the host mapping level): each 4 KiB piece is
    faulted in on its own, and the CPU's walk of the shadow tables is 4 levels deep."""
    big_gva, big_gpa = 0x4000_0000, 0x20_0000
    results = {}
    for tdp in (True, False):
        m = machine(tdp)
        m.guest.map(big_gva, big_gpa, 2 << 20, page_size=2 << 20, rw=1)
        first = m.vcpu.access(big_gva + 0x1008, "write", 0x5A)
        again = m.vcpu.access(big_gva + 0x1008, "read")
        results[tdp] = (first.gpa, again.gpa, again.value, first.fault, first.exit)
        if not tdp:
            assert first.trace.of_type(VmExit), "the first touch exits to KVM"
            assert again.trace.of_type(TlbHit)
            m.vcpu.caches.off()
            warm = m.vcpu.access(big_gva + 0x1010, "read")
            (walk,) = warm.trace.of_type(NativeWalk)
            assert [s.level for s in walk.record.steps] == [4, 3, 2, 1]
            assert walk.record.translation is not None
            assert walk.record.translation.page_size == 4096
            other = m.vcpu.access(big_gva + 0x1F_F000, "read")
            assert other.gpa == big_gpa + 0x1F_F000 and other.trace.of_type(VmExit)
    assert results[True] == results[False] == (big_gpa + 0x1008, big_gpa + 0x1008, 0x5A, None, None)
