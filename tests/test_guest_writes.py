"""Every write made on the guest's behalf passes the second dimension's write check and its
dirty tracking: the CPU's A/D updates under EPT (SDM Vol 3C 29.3.3.2: data writes for EPT,
exit qualification bit 8 = 0), KVM's software walker and emulator under shadow paging
(paging_tmpl.h `FNAME(update_accessed_dirty_bits)`, x86.c `emulator_write_phys`), and the
guest kernel's own stores to its page tables. Expected values are computed by hand here.
"""

from __future__ import annotations

import pytest
from support import mapped_machine

import twodwalk as tw
from twodwalk.engine.kvm.memslots import dirty_pages
from twodwalk.engine.trace import NativeWalk, VmExit
from twodwalk.migration import precopy

RAM = 32 << 20
GVA = 0x20_0000_0000  # 2**37: PDPT index 128 (bits 38:30); PML4, PD and PT index 0
GPA = 0x10_0000
TWIN = 0x20_0000  # a data page made identical to a page-table page
LOG_DIRTY = 1
EPT_VIOLATION = 48
# SDM Vol 3C table 28-7: bits 0-2 the access, 3-5 the EPT rights, 7 GVA valid, 8 final address.
ACC_READ, ACC_WRITE, EPT_R, EPT_X, GVA_VALID, FINAL = 0x1, 0x2, 0x8, 0x20, 0x80, 0x100

MODES = [
    pytest.param(True, True, id="ept-ad-on"),
    pytest.param(True, False, id="ept-ad-off"),
    pytest.param(False, True, id="shadow"),
]


def machine(tdp: bool, ept_ad: bool = True) -> tw.Machine:
    return mapped_machine(
        GVA, GPA, 0x4000, guest_ram=RAM, tdp=tdp, ept_ad=ept_ad, maxphyaddr=48, gbpages=False
    )


def table_gfns(m: tw.Machine) -> list[int]:
    """GFNs of the PML4, PDPT, PD and PT on GVA's path (the builder's record of where it put
    them, not a walk)."""
    out = []
    for level in (4, 3, 2, 1):
        slot = m.guest.page_tables.entry_address(GVA, level)
        assert slot is not None
        out.append(slot >> 12)
    return out


def dirty_gfns(m: tw.Machine) -> set[int]:
    return set(dirty_pages(m.vm.get_dirty_log(0)))


def start_logging_after_a_read(m: tw.Machine) -> None:
    """The page is read (A set at every level, the data page mapped read-only to the zero
    page), then dirty logging starts and the log is emptied; the TLBs are flushed."""
    assert m.vcpu.access(GVA, "read").fault is None
    m.vm.set_user_memory_region(0, LOG_DIRTY, 0, RAM, m.ram_hva)
    m.vm.get_dirty_log(0)
    m.vcpu.flush_tlb()


def exits(r: tw.AccessResult) -> list[tuple[int, int | None, int | None]]:
    return [(e.reason, e.qualification, e.gpa) for e in r.trace.of_type(VmExit)]


def test_cpu_dirty_bit_update_is_an_ept_write_that_dirty_logging_sees() -> None:
    """EPT A/D off: the guest walk only reads its tables, so the EPT entry of the page table
    needs only R; setting the PTE's D bit is a write and needs W, which dirty logging took
    away. The CPU exits (write, rights R and X, GVA valid, not the final address) at the
    PTE's own GPA; KVM's fast path logs the page-table page. Then the data write exits too,
    twice: breaking copy-on-write of the zero page in hva_to_pfn is an MMU-notifier
    invalidation, so that fault is stale (`is_page_fault_stale`) and the retry finds no entry."""
    m = machine(tdp=True, ept_ad=False)
    pml4, _, _, pt = table_gfns(m)
    start_logging_after_a_read(m)
    r = m.vcpu.access(GVA, "write", 5)
    assert r.fault is None and r.value == 5
    assert exits(r) == [
        (EPT_VIOLATION, ACC_WRITE | EPT_R | EPT_X | GVA_VALID, pt << 12),
        (EPT_VIOLATION, ACC_WRITE | EPT_R | EPT_X | GVA_VALID | FINAL, GPA),
        (EPT_VIOLATION, ACC_WRITE | GVA_VALID | FINAL, GPA),
    ]
    assert dirty_gfns(m) == {pt, GPA >> 12}, "the PTE page (D set) and the data page"
    pte = int.from_bytes(m.read_gpa(pt << 12, 8), "little")
    assert pte & 0x60 == 0x60, "A and D are in the guest PTE"
    assert pml4 != pt


def test_with_ept_ad_every_table_read_is_a_write_that_dirty_logging_sees() -> None:
    """EPT A/D on: every guest paging-structure access counts as a write (SDM 29.3.3.2), so
    each of the four write-protected table pages exits, with bits 0 and 1 both set; the data
    write exits twice (copy-on-write makes the first fault stale)."""
    m = machine(tdp=True, ept_ad=True)
    tables = table_gfns(m)
    start_logging_after_a_read(m)
    r = m.vcpu.access(GVA, "write", 5)
    table_qualification = ACC_READ | ACC_WRITE | EPT_R | EPT_X | GVA_VALID
    pdpte_offset = 8 * 128
    assert exits(r) == [
        (EPT_VIOLATION, table_qualification, tables[0] << 12),
        (EPT_VIOLATION, table_qualification, (tables[1] << 12) + pdpte_offset),
        (EPT_VIOLATION, table_qualification, tables[2] << 12),
        (EPT_VIOLATION, table_qualification, tables[3] << 12),
        (EPT_VIOLATION, ACC_WRITE | EPT_R | EPT_X | GVA_VALID | FINAL, GPA),
        (EPT_VIOLATION, ACC_WRITE | GVA_VALID | FINAL, GPA),
    ]
    assert dirty_gfns(m) == {*tables, GPA >> 12}


def test_kvm_software_walker_logs_the_table_whose_dirty_bit_it_sets() -> None:
    """Shadow paging: KVM's walker sets D through the HVA and marks the table's GFN dirty
    (`kvm_vcpu_mark_page_dirty`); the write itself is logged when the shadow leaf becomes
    writable. Two #PF exits: copy-on-write in the first makes it stale, the retry maps."""
    m = machine(tdp=False)
    _, _, _, pt = table_gfns(m)
    start_logging_after_a_read(m)
    r = m.vcpu.access(GVA, "write", 5)
    assert r.fault is None
    assert [e.reason for e in r.trace.of_type(VmExit)] == [0, 0]
    assert dirty_gfns(m) == {pt, GPA >> 12}


@pytest.mark.parametrize(("tdp", "ept_ad"), MODES)
def test_accessed_bit_never_lands_in_a_ksm_shared_frame(tdp: bool, ept_ad: bool) -> None:
    """A page-table page merged by KSM with an identical data page shares a read-only frame
    (mm/ksm.c). Setting an A bit in that table must break copy-on-write first (an EPT
    violation under EPT; KVM's user write under shadow paging), never write the shared frame,
    which would change the other page too."""
    m = machine(tdp, ept_ad)
    assert m.vcpu.access(GVA, "read").fault is None  # A set in PTE 0, not yet in PTE 1
    pt = table_gfns(m)[3] << 12
    image = m.read_gpa(pt, 4096)
    m.write_gpa(TWIN, image)
    hva_pt, hva_twin = m.vm.gpa_to_hva(pt), m.vm.gpa_to_hva(TWIN)
    assert hva_pt is not None and hva_twin is not None
    shared = m.host.ksm_merge(m.vmm, hva_pt, hva_twin)
    m.vcpu.flush_tlb()
    assert m.vcpu.access(GVA + 0x1000, "read").fault is None
    assert m.read_gpa(TWIN, 4096) == image, "the twin page is untouched"
    assert m.memory.read(shared, 4096) == image, "so is the shared frame"
    pte1 = int.from_bytes(m.read_gpa(pt + 8, 8), "little")
    assert pte1 >> 5 & 1, "the A bit went to the table's own, unshared copy"


@pytest.mark.parametrize(("tdp", "ept_ad"), MODES)
def test_precopy_copies_page_tables_whose_accessed_bits_changed(tdp: bool, ept_ad: bool) -> None:
    """The guest only reads new pages during migration: the data stay clean, but the CPU (or
    KVM's walker) sets A bits in the page-table page. The dirty log must say so, or the
    destination gets the old page-table page."""
    m = machine(tdp, ept_ad)
    m.vcpu.access(GVA, "read")

    def reads(round_number: int) -> None:
        assert m.vcpu.access(GVA + 0x1000 * (round_number + 1), "read").fault is None

    result = precopy(m, reads, threshold_pages=4)
    # The PT page; with EPT A/D on, all four table pages (their reads count as writes).
    assert result.converged and result.stop_and_copy_pages == (4 if tdp and ept_ad else 1)
    assert all(result.destination[gfn] == m.read_gpa(gfn << 12, 4096) for gfn in range(RAM >> 12))


def test_shadow_paging_runs_the_guest_with_hardware_wp_set() -> None:
    """Guest CR0.WP=0 under shadow paging: the CPU still walks KVM's tables with WP=1
    (`vmx_set_cr0`), so a kernel write through the read-only shadow leaf of a clean, zero-page
    backed PTE exits and KVM breaks copy-on-write (which makes that fault stale: one more
    exit); it must never reach the zero page."""
    m = machine(tdp=False)
    m.vcpu.cr0_wp = False
    assert m.vcpu.access(GVA, "read").hpa == m.host.zero_page
    w = m.vcpu.access(GVA, "write", 0xDEADBEEF)
    assert w.fault is None and w.hpa is not None and w.hpa & ~0xFFF != m.host.zero_page
    assert [e.reason for e in w.trace.of_type(VmExit)] == [0, 0]
    assert m.vcpu.access(GVA + 0x1000, "read").value == 0, "other pages still read zero"
    assert m.memory.read(m.host.zero_page, 8) == bytes(8)
    assert m.vcpu.access(GVA, "read").value == 0xDEADBEEF


@pytest.mark.parametrize(("smep", "nxe"), [(False, True), (True, True), (True, False)])
def test_shadow_paging_emulates_wp0_with_a_writable_supervisor_entry(smep: bool, nxe: bool) -> None:
    """`FNAME(page_fault)`: a kernel write that guest WP=0 allows to a read-only user page
    gets a shadow leaf with R/W=1, U/S=0, and XD=1 under SMEP, even when the guest runs
    with EFER.NXE=0 (the hardware runs with NX=1 under shadow paging, so XD is not a
    reserved bit there); a user read afterwards faults into KVM again and is shadowed as the
    guest's tables say (read-only, user)."""
    m = machine(tdp=False)
    m.guest.protect(GVA, 0x1000, rw=0)
    m.vcpu.cr0_wp = False
    m.vcpu.cr4_smep = smep
    m.vcpu.efer_nxe = nxe
    w = m.vcpu.access(GVA, "write", 7)
    assert w.fault is None and w.value == 7
    leaf = w.trace.of_type(NativeWalk)[-1].record.steps[-1].value
    assert (leaf >> 1 & 1, leaf >> 2 & 1, leaf >> 63) == (1, 0, int(smep))
    m.vcpu.cpl = 3
    user = m.vcpu.access(GVA, "read")
    assert (user.fault, user.value) == (None, 7)
    user_leaf = user.trace.of_type(NativeWalk)[-1].record.steps[-1].value
    assert (user_leaf >> 1 & 1, user_leaf >> 2 & 1) == (0, 1)
    m.vcpu.cpl = 0
    m.vcpu.cr0_wp = True
    refused = m.vcpu.access(GVA, "write", 9)
    assert refused.fault is not None and refused.fault.error_code == 0b11  # P | W


@pytest.mark.parametrize(("tdp", "ept_ad"), MODES)
def test_guest_os_edits_act_as_guest_stores_in_every_mode(tdp: bool, ept_ad: bool) -> None:
    """`GuestOS.protect/unmap` are the guest kernel's stores: after INVLPG the guest sees
    them under EPT and under shadow paging alike, and dirty logging sees the page-table page
    they changed."""
    m = machine(tdp, ept_ad)
    pt = table_gfns(m)[3]
    assert m.vcpu.access(GVA, "write", 1).fault is None
    assert m.vcpu.access(GVA + 0x1000, "write", 2).fault is None
    m.vm.set_user_memory_region(0, LOG_DIRTY, 0, RAM, m.ram_hva)
    m.vm.get_dirty_log(0)
    m.guest.protect(GVA, 0x1000, rw=0)
    m.guest.unmap(GVA + 0x1000, 0x1000)
    assert dirty_gfns(m) == {pt}
    m.vcpu.invlpg(GVA)
    m.vcpu.invlpg(GVA + 0x1000)
    write = m.vcpu.access(GVA, "write", 3)
    assert write.fault is not None and write.fault.error_code == 0b11  # P | W
    read = m.vcpu.access(GVA + 0x1000, "read")
    assert read.fault is not None and read.fault.error_code == 0  # not present
    assert m.vcpu.access(GVA, "read").value == 1
