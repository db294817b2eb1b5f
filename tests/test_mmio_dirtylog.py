"""MMIO exits, cached MMIO EPT entries, READONLY slots, guest tables in no memslot, and dirty
logging (Documentation/virt/kvm/api.rst; arch/x86/kvm/mmu/mmu.c, spte.c, virt/kvm/kvm_main.c)."""

from __future__ import annotations

import errno

import pytest
from support import dirty_among, ept_leaf

import twodwalk as tw
from twodwalk.engine.kvm.memslots import Change, dirty_pages
from twodwalk.engine.kvm.mmu import mmio_spte_generation
from twodwalk.engine.trace import KvmStep, Retry, VmExit

RAM = 32 << 20
MMIO_GPA = 0x8000_0000  # 2 GiB: beyond guest RAM, in no memslot
MMIO_GVA = 0x4000_0000
SLOT1_GPA = 0x4000_0000
SLOT1_GVA = 0x10_0000_0000
SLOT1_SIZE = 64 << 10
DATA_GPA = 0x10_0000  # 1 MiB into slot 0, far below the guest's page tables at the top of RAM
DATA_GVA = 0x20_0000_0000
DATA_PAGES = 16
KVM_MEM_LOG_DIRTY_PAGES = 1
KVM_MEM_READONLY = 2
EPT_VIOLATION = 48
EPT_MISCONFIG = 49


def machine(thp: bool = False) -> tw.Machine:
    return tw.Machine(
        guest_ram=RAM,
        tdp=True,
        guest_levels=4,
        ept_levels=4,
        maxphyaddr=48,
        gbpages=False,
        thp=thp,
    )


def mmio_machine() -> tw.Machine:
    m = machine()
    m.guest.map(MMIO_GVA, MMIO_GPA, 0x1000, rw=1, us=1)
    return m


def steps(r: tw.AccessResult, function: str) -> list[KvmStep]:
    return [s for s in r.trace.of_type(KvmStep) if s.function == function]


def exit_reasons(r: tw.AccessResult) -> list[int]:
    return [e.reason for e in r.trace.of_type(VmExit)]


def leaf_writes(r: tw.AccessResult) -> list[int]:
    """The new values of the leaf entries KVM wrote during the access (the trace event for an
    EPT/SPTE write carries `new` and `leaf`)."""
    out = []
    for event in r.trace:
        new, leaf = getattr(event, "new", None), getattr(event, "leaf", None)
        if isinstance(new, int) and leaf is True:
            out.append(new)
    return out


# --- MMIO exits --------------------------------------------------------------------------------


def test_read_of_a_hole_is_an_mmio_exit() -> None:
    m = mmio_machine()
    r = m.vcpu.access(MMIO_GVA + 0x18, "read")
    assert r.fault is None
    assert r.value is None and r.hpa is None
    assert isinstance(r.exit, tw.MmioExit)
    assert r.exit.phys_addr == MMIO_GPA + 0x18
    assert r.exit.is_write is False
    assert r.exit.len == 8
    assert r.gpa == MMIO_GPA + 0x18
    assert [s.gfn for s in steps(r, "kvm_faultin_pfn")] == [MMIO_GPA >> 12]
    assert not [s for s in steps(r, "__gfn_to_hva_memslot") if s.gfn == MMIO_GPA >> 12]


def test_write_to_a_hole_carries_the_data_little_endian() -> None:
    m = mmio_machine()
    r = m.vcpu.access(MMIO_GVA + 0x20, "write", 0x1122_3344_5566_7788)
    assert r.fault is None
    assert r.exit == tw.MmioExit(
        phys_addr=MMIO_GPA + 0x20,
        is_write=True,
        len=8,
        data=bytes([0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]),
    )


def test_first_mmio_access_installs_a_misconfigured_ept_entry() -> None:
    m = mmio_machine()
    assert m.vm.ept.tables.find_leaf(MMIO_GPA) is None
    r = m.vcpu.access(MMIO_GVA, "read")
    # The last attempt's exit is an EPT violation (48) for the MMIO GPA.
    last = r.trace.attempts()[-1]
    exits = [e for e in last if isinstance(e, VmExit)]
    assert [(e.reason, e.gpa) for e in exits] == [(EPT_VIOLATION, MMIO_GPA)]
    assert EPT_MISCONFIG not in exit_reasons(r)
    spte, level = ept_leaf(m, MMIO_GPA)
    assert level == 1
    assert spte & 0b111 == 0b110  # W+X without R: a deliberate misconfiguration
    assert spte & 0x000F_FFFF_FFFF_F000 == MMIO_GPA
    assert mmio_spte_generation(spte) == m.vm.memslots.generation
    assert [new for new in leaf_writes(r) if new & 7 == 0b110] == [spte]


def test_second_mmio_access_is_an_ept_misconfig_without_a_memslot_walk() -> None:
    m = mmio_machine()
    m.vcpu.access(MMIO_GVA, "read")
    r = m.vcpu.access(MMIO_GVA + 8, "write", 5)
    assert exit_reasons(r) == [EPT_MISCONFIG]
    assert not r.trace.of_type(Retry)
    assert steps(r, "__gfn_to_hva_memslot") == []
    assert steps(r, "kvm_faultin_pfn") == []
    assert leaf_writes(r) == []
    fast = steps(r, "handle_mmio_page_fault")
    assert len(fast) == 1 and "current generation" in fast[0].detail
    assert r.exit == tw.MmioExit(MMIO_GPA + 8, True, 8, (5).to_bytes(8, "little"))


def test_deleting_a_slot_zaps_everything_mmio_entries_too() -> None:
    """KVM_X86_QUIRK_SLOT_ZAP_ALL (on by default): a DELETE zaps every entry of the VM."""
    m = mmio_machine()
    hva = m.vmm.mmap(SLOT1_SIZE)
    m.vm.set_user_memory_region(1, 0, SLOT1_GPA, SLOT1_SIZE, hva)
    m.vcpu.access(MMIO_GVA, "read")
    m.vm.set_user_memory_region(1, 0, 0, 0, 0)
    found = m.vm.ept.tables.find_leaf(MMIO_GPA)
    assert found is None or m.memory.read_u64(found.slot) == 0
    r = m.vcpu.access(MMIO_GVA, "read")
    assert EPT_MISCONFIG not in exit_reasons(r)
    assert isinstance(r.exit, tw.MmioExit) and r.exit.phys_addr == MMIO_GPA


@pytest.mark.parametrize("change", ["create", "flags-only"])
def test_memslot_change_makes_the_cached_mmio_entry_stale(change: str) -> None:
    m = mmio_machine()
    hva = m.vmm.mmap(SLOT1_SIZE)
    if change == "delete":
        m.vm.set_user_memory_region(1, 0, SLOT1_GPA, SLOT1_SIZE, hva)
    m.vcpu.access(MMIO_GVA, "read")
    old_gen = mmio_spte_generation(ept_leaf(m, MMIO_GPA).value)
    if change == "create":
        m.vm.set_user_memory_region(1, 0, SLOT1_GPA, SLOT1_SIZE, hva)
    elif change == "flags-only":
        m.vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, RAM, m.ram_hva)
    else:
        m.vm.set_user_memory_region(1, 0, 0, 0, 0)
    assert m.vm.memslots.generation != old_gen
    r = m.vcpu.access(MMIO_GVA, "read")
    # (Turning logging on write-protects the guest's page-table pages, whose accesses count as
    # writes with EPT A/D: those take EPT violations first.)
    mmio_exits = [e.reason for e in r.trace.of_type(VmExit) if e.gpa == MMIO_GPA]
    assert mmio_exits == [EPT_MISCONFIG]
    stale = steps(r, "handle_mmio_page_fault")
    assert len(stale) == 1 and "old memslot generation" in stale[0].detail
    assert [s.gfn for s in steps(r, "kvm_faultin_pfn")] == [MMIO_GPA >> 12]
    assert isinstance(r.exit, tw.MmioExit) and r.exit.phys_addr == MMIO_GPA
    # The entry was rebuilt with the new generation: the next access takes the fast path.
    spte = ept_leaf(m, MMIO_GPA).value
    assert spte & 7 == 0b110
    assert mmio_spte_generation(spte) == m.vm.memslots.generation
    again = m.vcpu.access(MMIO_GVA, "read")
    assert "current generation" in steps(again, "handle_mmio_page_fault")[0].detail


def test_noop_memslot_call_keeps_the_mmio_entry_current() -> None:
    m = mmio_machine()
    m.vcpu.access(MMIO_GVA, "read")
    m.vm.set_user_memory_region(0, 0, 0, RAM, m.ram_hva)
    r = m.vcpu.access(MMIO_GVA, "read")
    assert "current generation" in steps(r, "handle_mmio_page_fault")[0].detail


def test_a_new_slot_over_a_cached_mmio_gpa_turns_it_into_ram() -> None:
    m = mmio_machine()
    assert isinstance(m.vcpu.access(MMIO_GVA, "read").exit, tw.MmioExit)
    hva = m.vmm.mmap(SLOT1_SIZE)
    m.vm.set_user_memory_region(1, 0, MMIO_GPA, SLOT1_SIZE, hva)
    m.write_gpa(MMIO_GPA, (0xABCD).to_bytes(8, "little"))
    r = m.vcpu.access(MMIO_GVA, "read")
    assert (r.fault, r.exit, r.value, r.hva) == (None, None, 0xABCD, hva)
    assert ept_leaf(m, MMIO_GPA).value & 7 == 0b111


def test_fetch_from_mmio_is_an_internal_error() -> None:
    m = mmio_machine()
    r = m.vcpu.access(MMIO_GVA, "fetch")
    assert r.fault is None and r.value is None
    assert isinstance(r.exit, tw.InternalError)
    assert r.exit.suberror == "KVM_INTERNAL_ERROR_EMULATION"
    assert f"{MMIO_GPA:#x}" in r.exit.detail


# --- READONLY slots ----------------------------------------------------------------------------


def readonly_machine() -> tuple[tw.Machine, int]:
    m = machine()
    hva = m.vmm.mmap(SLOT1_SIZE)
    m.vm.set_user_memory_region(1, KVM_MEM_READONLY, SLOT1_GPA, SLOT1_SIZE, hva)
    m.guest.map(SLOT1_GVA, SLOT1_GPA, SLOT1_SIZE, rw=1, us=1)
    m.write_gpa(SLOT1_GPA + 0x3008, (0xFEED_FACE).to_bytes(8, "little"))  # the VMM may write
    return m, hva


def test_readonly_slot_reads_work() -> None:
    m, hva = readonly_machine()
    r = m.vcpu.access(SLOT1_GVA + 0x3008, "read")
    assert (r.fault, r.exit, r.value) == (None, None, 0xFEED_FACE)
    assert (r.gpa, r.hva) == (SLOT1_GPA + 0x3008, hva + 0x3008)
    spte, level = ept_leaf(m, SLOT1_GPA + 0x3000)
    assert level == 1 and spte & 0b111 == 0b101  # R+X, never W


@pytest.mark.parametrize("read_first", [False, True], ids=["cold", "after-read"])
def test_readonly_slot_write_is_an_mmio_write_and_memory_is_unchanged(read_first: bool) -> None:
    m, _ = readonly_machine()
    if read_first:
        m.vcpu.access(SLOT1_GVA + 0x3008, "read")
    r = m.vcpu.access(SLOT1_GVA + 0x3008, "write", 0xBAD)
    assert r.fault is None
    assert r.exit == tw.MmioExit(SLOT1_GPA + 0x3008, True, 8, (0xBAD).to_bytes(8, "little"))
    assert steps(r, "kvm_handle_error_pfn")
    assert m.read_gpa(SLOT1_GPA + 0x3008, 8) == (0xFEED_FACE).to_bytes(8, "little")
    again = m.vcpu.access(SLOT1_GVA + 0x3008, "read")
    assert (again.exit, again.value) == (None, 0xFEED_FACE)
    spte = ept_leaf(m, SLOT1_GPA + 0x3000).value
    assert not spte & 2


# --- guest page tables in no memslot -----------------------------------------------------------

HOLE_GVA = 0x7F00_0000_0000  # PML4 index 254: unused by anything the guest maps here


@pytest.mark.parametrize(("kind", "value", "code"), [("read", None, 0), ("write", 1, 2)])
def test_guest_table_in_no_memslot_is_a_not_present_page_fault(
    kind: str, value: int | None, code: int
) -> None:
    m = machine()
    root = m.vcpu.cr3 & ~0xFFF
    index = HOLE_GVA >> 39 & 0x1FF
    m.write_gpa(root + 8 * index, (MMIO_GPA | 0b111).to_bytes(8, "little"))  # P, RW, US
    for _ in range(2):  # the first time with an EPT violation, then with the MMIO entry
        r = m.vcpu.access(HOLE_GVA + 0x10, kind, value)
        assert r.exit is None and r.value is None
        assert isinstance(r.fault, tw.PageFault)
        assert r.fault.error_code & 1 == 0  # P=0: the entry is treated as not present
        assert r.fault.error_code == code
        assert r.fault.cr2 == HOLE_GVA + 0x10
        assert steps(r, "walk_addr_generic")
    assert exit_reasons(r) == [EPT_MISCONFIG]


# --- dirty logging -----------------------------------------------------------------------------
# Only the data pages' bits are asserted on: with EPT A/D the CPU's guest-table accesses count
# as writes, and the guest sets A/D bits in its own page tables, so the page-table pages at the
# top of slot 0 are legitimately dirty too.


def data_bits(bitmap: bytes) -> set[int]:
    """The set bits among the data pages under test, as page numbers relative to the first."""
    return dirty_among(bitmap, DATA_GPA >> 12, DATA_PAGES)


def logging_machine(thp: bool = False) -> tw.Machine:
    """Slot 0 with dirty logging on (a flags-only change); DATA_PAGES pages mapped at DATA_GVA."""
    m = machine(thp)
    m.guest.map(DATA_GVA, DATA_GPA, DATA_PAGES << 12, rw=1, us=1)
    result = m.vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, RAM, m.ram_hva)
    assert result.change is Change.FLAGS_ONLY
    return m


def table_gfns(m: tw.Machine) -> set[int]:
    """GFNs of the guest's page-table pages (allocated from the top of RAM down)."""
    return set(range(m.guest._next_table >> 12, RAM >> 12))


def write(m: tw.Machine, page: int, value: int = 1, offset: int = 0) -> tw.AccessResult:
    r = m.vcpu.access(DATA_GVA + (page << 12) + offset, "write", value)
    assert (r.fault, r.exit) == (None, None)
    return r


def test_get_dirty_log_without_logging_is_enoent() -> None:
    m = machine()
    with pytest.raises(tw.KvmError) as info:
        m.vm.get_dirty_log(0)
    assert info.value.errno == errno.ENOENT
    assert "KVM_MEM_LOG_DIRTY_PAGES" in str(info.value)
    with pytest.raises(tw.KvmError) as missing:
        m.vm.get_dirty_log(9)  # no such slot
    assert missing.value.errno == errno.ENOENT
    # Turning logging off again frees the log.
    m.vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, RAM, m.ram_hva)
    m.vm.get_dirty_log(0)
    m.vm.set_user_memory_region(0, 0, 0, RAM, m.ram_hva)
    with pytest.raises(tw.KvmError) as off:
        m.vm.get_dirty_log(0)
    assert off.value.errno == errno.ENOENT


def test_guest_writes_set_exactly_their_bits() -> None:
    m = logging_machine()
    bitmap = m.vm.get_dirty_log(0)
    assert len(bitmap) == (RAM >> 12) // 8
    assert data_bits(bitmap) == set()
    write(m, 3)
    write(m, 11, offset=0xFF8)
    write(m, 3, offset=0x100)  # the same page twice: one bit
    r = m.vcpu.access(DATA_GVA + (7 << 12), "read")  # a read of never-written RAM: zero page
    assert (r.fault, r.exit, r.value) == (None, None, 0)
    bitmap = m.vm.get_dirty_log(0)
    assert data_bits(bitmap) == {3, 11}
    # With EPT A/D on, the CPU's reads of the four page-table pages on the path count as
    # writes (SDM Vol 3C 29.3.3.2), so exactly those are dirty besides the data pages.
    tables = set()
    for level in (4, 3, 2, 1):
        slot = m.guest.page_tables.entry_address(DATA_GVA, level)
        assert slot is not None
        tables.add(slot >> 12)
    dirty = set(dirty_pages(bitmap))
    assert dirty == {(DATA_GPA >> 12) + 3, (DATA_GPA >> 12) + 11} | tables


def test_vmm_writes_set_no_bit() -> None:
    m = logging_machine()
    m.vm.get_dirty_log(0)
    m.write_gpa(DATA_GPA + (5 << 12), b"vmm wrote this")
    m.write_gpa(DATA_GPA + (6 << 12) - 4, bytes(8))  # straddling pages 5 and 6
    assert data_bits(m.vm.get_dirty_log(0)) == set()
    r = m.vcpu.access(DATA_GVA + (5 << 12), "read")
    assert r.value == int.from_bytes(b"vmm wrot", "little")


def test_get_dirty_log_clears_and_write_protects_again() -> None:
    m = logging_machine()
    write(m, 2)
    write(m, 9)
    assert data_bits(m.vm.get_dirty_log(0)) == {2, 9}
    assert data_bits(m.vm.get_dirty_log(0)) == set()  # cleared by the first call
    spte, level = ept_leaf(m, DATA_GPA + (2 << 12))
    assert level == 1 and not spte & 2  # write-protected again
    r = write(m, 2, value=7)
    # The dirty page-table pages were write-protected too; only the data page is asserted on.
    fast = [s.gfn for s in steps(r, "fast_page_fault")]
    assert (DATA_GPA >> 12) + 2 in fast
    assert [g for g in fast if g not in table_gfns(m)] == [(DATA_GPA >> 12) + 2]
    assert exit_reasons(r)[-1] == EPT_VIOLATION
    assert ept_leaf(m, DATA_GPA + (2 << 12)).value & 2
    # A second write before the next get_dirty_log takes no exit at all.
    assert exit_reasons(write(m, 2, value=8)) == []
    assert data_bits(m.vm.get_dirty_log(0)) == {2}
    assert m.read_gpa(DATA_GPA + (2 << 12), 8) == (8).to_bytes(8, "little")


def test_enabling_logging_write_protects_pages_written_before() -> None:
    m = machine()
    m.guest.map(DATA_GVA, DATA_GPA, DATA_PAGES << 12, rw=1, us=1)
    write(m, 4)
    assert ept_leaf(m, DATA_GPA + (4 << 12)).value & 2
    m.vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, RAM, m.ram_hva)
    assert not ept_leaf(m, DATA_GPA + (4 << 12)).value & 2
    assert data_bits(m.vm.get_dirty_log(0)) == set()  # the log starts clean
    r = write(m, 4)
    assert steps(r, "fast_page_fault")
    assert data_bits(m.vm.get_dirty_log(0)) == {4}


def test_new_slot_created_with_logging() -> None:
    m = machine()
    hva = m.vmm.mmap(SLOT1_SIZE)
    m.vm.set_user_memory_region(1, KVM_MEM_LOG_DIRTY_PAGES, SLOT1_GPA, SLOT1_SIZE, hva)
    m.guest.map(SLOT1_GVA, SLOT1_GPA, SLOT1_SIZE, rw=1, us=1)
    with pytest.raises(tw.KvmError) as info:
        m.vm.get_dirty_log(0)  # slot 0 is not logging
    assert info.value.errno == errno.ENOENT
    for page in (0, 15):
        r = m.vcpu.access(SLOT1_GVA + (page << 12), "write", page + 1)
        assert (r.fault, r.exit) == (None, None)
    bitmap = m.vm.get_dirty_log(1)
    # One bit per page, bit 0 = the slot's first page. (The kernel rounds the buffer up to a
    # whole number of longs; only the slot's 16 bits are asserted on, the rest must be clear.)
    assert len(bitmap) >= (SLOT1_SIZE >> 12) // 8
    assert dirty_among(bitmap, 0, SLOT1_SIZE >> 12) == {0, 15}
    assert bitmap[:2] == bytes([0x01, 0x80]) and not any(bitmap[2:])
    assert not any(m.vm.get_dirty_log(1))


def test_thp_backing_is_mapped_huge_without_logging() -> None:
    m = machine(thp=True)
    m.guest.map(DATA_GVA, DATA_GPA, DATA_PAGES << 12, rw=1, us=1)
    write(m, 0)
    assert ept_leaf(m, DATA_GPA).level == 2  # 2 MiB: the baseline the next test departs from


def test_logging_splits_huge_leaves_and_maps_4k_over_thp() -> None:
    m = machine(thp=True)
    m.guest.map(DATA_GVA, DATA_GPA, DATA_PAGES << 12, rw=1, us=1)
    m.guest.map(DATA_GVA + (4 << 20), DATA_GPA + (4 << 20), 0x1000, rw=1, us=1)
    write(m, 0)
    assert ept_leaf(m, DATA_GPA).level == 2
    m.vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, RAM, m.ram_hva)
    # The huge leaf was split: every page of it now has its own read-only 4 KiB leaf.
    # DATA_GPA is 1 MiB into the 2 MiB page [0, 2 MiB): GPA pages 0 .. 511 of it.
    for gpa in (0, DATA_GPA, DATA_GPA + 0x1000, (2 << 20) - 0x1000):
        spte, level = ept_leaf(m, gpa)
        assert level == 1 and not spte & 2
        assert spte & 0b101 == 0b101
    assert m.vm.ept.tables.find_leaf(2 << 20) is None  # the next 2 MiB was never mapped
    write(m, 1)
    assert ept_leaf(m, DATA_GPA + 0x1000).level == 1
    # A 2 MiB region never touched before is faulted in at 4 KiB too.
    r = m.vcpu.access(DATA_GVA + (4 << 20), "write", 9)
    assert (r.fault, r.exit) == (None, None)
    assert ept_leaf(m, DATA_GPA + (4 << 20)).level == 1
    adjust = [
        s for s in steps(r, "kvm_mmu_hugepage_adjust") if s.gfn == (DATA_GPA + (4 << 20)) >> 12
    ]
    assert adjust and adjust[-1].level == 1 and "dirty logging" in adjust[-1].detail
    bits = dirty_among(m.vm.get_dirty_log(0), DATA_GPA >> 12, 1025)
    assert bits == {1, 1024}


def test_dirty_pages_reads_the_bitmap_as_kvm_lays_it_out() -> None:
    """Bit i of the bitmap (little-endian longs) is page i of the slot."""
    from twodwalk.views.text import dirty_pages

    assert dirty_pages(bytes([0b101, 0, 0, 0, 0, 0, 0, 0x80])) == [0, 2, 63]
    assert dirty_pages(bytes(8)) == []
    m = logging_machine()
    m.vm.get_dirty_log(0)  # start clean
    write(m, 3)
    dirty = set(dirty_pages(m.vm.get_dirty_log(0)))  # slot 0 starts at GPA 0: page = GFN
    assert dirty - table_gfns(m) == {(DATA_GPA >> 12) + 3}, "besides tables given A/D bits"
