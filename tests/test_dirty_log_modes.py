"""Dirty logging in KVM's three ways (x86.c `kvm_mmu_slot_apply_flags`, kvm_main.c
`kvm_get_dirty_log_protect` / `kvm_clear_dirty_log_protect`, SDM Vol 3C 29.3.6 for PML), the
recovery of huge pages when logging stops, and pre-copy migration in each mode. Expected values
are computed by hand in the comments."""

from __future__ import annotations

import errno

import pytest
from support import dirty_among, ept_leaf, mapped_machine

import twodwalk as tw
from twodwalk.engine.kvm.mmu import PML_LOG_NR_ENTRIES
from twodwalk.engine.kvm.vm import DIRTY_LOG_MODES
from twodwalk.engine.trace import KvmStep, VmExit
from twodwalk.migration import precopy
from twodwalk.views.text import info_memslots

RAM = 32 << 20
NPAGES = RAM >> 12  # 8192 pages in slot 0
GVA = 0x20_0000_0000
GPA = 0x10_0000  # GFN 0x100, 1 MiB into the first 2 MiB page
LOG = 1
W, D, MMU_WRITABLE = 1 << 1, 1 << 9, 1 << 58


def machine(mode: str = "write-protect", *, thp: bool = False, tdp: bool = True) -> tw.Machine:
    m = mapped_machine(
        GVA, GPA, 16 << 12, guest_ram=RAM, tdp=tdp, maxphyaddr=48, gbpages=False, thp=thp
    )
    m.vm.set_dirty_log_mode(mode)
    return m


def write(m: tw.Machine, page: int, value: int = 1) -> tw.AccessResult:
    r = m.vcpu.access(GVA + (page << 12), "write", value)
    assert (r.fault, r.exit) == (None, None)
    return r


def log_on(m: tw.Machine, flags: int = LOG) -> None:
    m.vm.set_user_memory_region(0, flags, 0, RAM, m.ram_hva)


def pages(bitmap: bytes, first: int = GPA >> 12, count: int = 16) -> set[int]:
    return dirty_among(bitmap, first, count)


def exits(r: tw.AccessResult) -> int:
    return len(r.trace.of_type(VmExit))


# --- write-protect -----------------------------------------------------------------------------


def test_write_protect_clears_only_w_and_keeps_the_cpus_dirty_bit() -> None:
    m = machine()
    write(m, 3)
    before, level = ept_leaf(m, GPA + 0x3000)
    assert level == 1 and before & (W | D | MMU_WRITABLE) == W | D | MMU_WRITABLE
    log_on(m)
    assert ept_leaf(m, GPA + 0x3000).value == before & ~W, "W cleared; D and MMU-writable stay"
    r = write(m, 3, 2)
    assert [s.function for s in r.trace.of_type(KvmStep)].count("fast_page_fault") >= 1
    assert ept_leaf(m, GPA + 0x3000).value == before, (
        "fast_page_fault sets W back; D was never lost"
    )
    assert pages(m.vm.get_dirty_log(0)) == {3}


# --- PML ---------------------------------------------------------------------------------------


def test_pml_clears_dirty_bits_and_the_cpu_logs_writes_without_exits() -> None:
    m = machine("pml")
    write(m, 3)
    before = ept_leaf(m, GPA + 0x3000).value
    log_on(m)
    assert ept_leaf(m, GPA + 0x3000).value == before & ~D, "D cleared; W stays"
    r = write(m, 3, 7)
    assert exits(r) == 0, "no write protection: the CPU sets D and logs the GPA"
    assert GPA + 0x3000 in m.vm.ept.pml_buffer
    assert ept_leaf(m, GPA + 0x3000).value == before
    bitmap = m.vm.get_dirty_log(0)  # kvm_arch_sync_dirty_log flushes the buffer first
    assert m.vm.ept.pml_buffer == []
    assert pages(bitmap) == {3}
    assert ept_leaf(m, GPA + 0x3000).value == before & ~D, "KVM_GET_DIRTY_LOG clears D again"
    assert exits(write(m, 3, 8)) == 0
    assert pages(m.vm.get_dirty_log(0)) == {3}
    assert pages(m.vm.get_dirty_log(0)) == set()


def test_pml_enable_splits_huge_pages_and_clears_d_without_write_protecting() -> None:
    m = machine("pml", thp=True)
    write(m, 0)
    assert ept_leaf(m, GPA).level == 2
    log_on(m)
    for gpa in (0, GPA, (2 << 20) - 0x1000):
        value, level = ept_leaf(m, gpa)
        assert level == 1 and value & W and not value & D


@pytest.mark.parametrize("mode", ["write-protect", "pml", "initially-set"])
def test_enabling_logging_is_recorded_and_says_why_huge_pages_are_split(mode: str) -> None:
    """`kvm_mmu_slot_apply_flags` runs outside any access: its split and protection go to
    the VM's log, with the reason (one dirty bit per 4 KiB page)."""
    m = machine(mode, thp=True)
    write(m, 0)
    logged = len(m.vm.log)
    log_on(m)
    assert len(m.vm.log) == logged + 1
    step = m.vm.log[-1]
    assert (step.function, step.gfn) == ("kvm_mmu_slot_apply_flags", 0)
    assert step.detail.startswith("dirty logging on for memslot 0: ")
    if mode == "initially-set":
        assert "nothing split or protected now" in step.detail
        assert ept_leaf(m, GPA).level == 2
        return
    # Two 2 MiB leaves were mapped, the data's and the one holding the guest's tables (at the
    # top of RAM): 2 splits, 1,024 small leaves.
    assert "huge leaves made 4 KiB leaves: 2 (the bitmap has one bit per 4 KiB page" in step.detail
    assert ept_leaf(m, GPA).level == 1
    if mode == "pml":
        assert "leaves whose D bit was cleared: 1024" in step.detail
        assert step.detail.endswith("huge leaves left, write-protected: 0")
    else:
        assert "leaves write-protected: 1024 (each first write faults" in step.detail


def test_pml_buffer_full_is_flushed_into_the_bitmap() -> None:
    m = machine("pml")
    log_on(m)
    m.vm.get_dirty_log(0)
    mmu = m.vm.ept
    for gfn in range(PML_LOG_NR_ENTRIES + 1):  # one more than fits
        mmu.pml_log((gfn << 12) | 0x123)
    assert [s.function for s in mmu.log].count("handle_pml_full") == 1
    assert mmu.pml_buffer == [PML_LOG_NR_ENTRIES << 12], "the 513th GPA, 4 KiB aligned"
    assert pages(m.vm.get_dirty_log(0), 0, 520) == set(range(513))


def test_pml_needs_ept_ad() -> None:
    m = tw.Machine(guest_ram=RAM, ept_ad=False)
    with pytest.raises(tw.TwodwalkError, match="A/D"):
        m.vm.set_dirty_log_mode("pml")
    with pytest.raises(tw.TwodwalkError, match="A/D"):
        tw.Machine(guest_ram=RAM, tdp=False).vm.set_dirty_log_mode("pml")


def test_mode_errors_name_the_value() -> None:
    m = machine()
    with pytest.raises(tw.TwodwalkError, match=r"mode='dirty-ring'.*write-protect, pml"):
        m.vm.set_dirty_log_mode("dirty-ring")
    log_on(m)
    with pytest.raises(tw.TwodwalkError, match="turn KVM_MEM_LOG_DIRTY_PAGES off"):
        m.vm.set_dirty_log_mode("pml")


# --- KVM_DIRTY_LOG_INITIALLY_SET ----------------------------------------------------------------


def test_initially_set_protects_nothing_and_reports_every_page() -> None:
    m = machine("initially-set", thp=True)
    write(m, 0)
    huge = ept_leaf(m, GPA)
    log_on(m)
    assert ept_leaf(m, GPA) == huge, "no split, no write protection at enable time"
    for _ in range(2):  # KVM_GET_DIRTY_LOG does not clear
        assert m.vm.get_dirty_log(0) == b"\xff" * (NPAGES // 8)


@pytest.mark.parametrize("pml", [False, True], ids=["write-protect", "pml"])
def test_clear_dirty_log_splits_and_protects_only_the_cleared_pages(pml: bool) -> None:
    m = tw.Machine(guest_ram=RAM, maxphyaddr=48, gbpages=False, thp=True)
    m.guest.map(GVA, GPA, 16 << 12, rw=1, us=1)
    m.vm.set_dirty_log_mode("initially-set", pml=pml)
    write(m, 0)
    log_on(m)
    # Clear pages 256..319 of the slot (GFNs 0x100..0x13f: GPA's page 0 is GFN 0x100).
    m.vm.clear_dirty_log(0, 256, 64, b"\xff" * 8)
    bitmap = m.vm.get_dirty_log(0)
    assert bitmap[32:40] == bytes(8) and bitmap[:32] == b"\xff" * 32 and bitmap[40] == 0xFF
    cleared, level = ept_leaf(m, GPA)
    assert level == 1, "the 2 MiB leaf was split"
    assert (cleared & W, cleared & D) == ((W, 0) if pml else (0, D))
    outside, _ = ept_leaf(m, GPA + (64 << 12))  # GFN 0x140: still dirty, not protected
    assert outside & (W | D) == W | D
    r = write(m, 0, 5)
    assert exits(r) == (0 if pml else 1)
    assert pages(m.vm.get_dirty_log(0)) == {0}, "written again after the clear: dirty"


@pytest.mark.parametrize(
    ("first_page", "num_pages", "size", "code"),
    [
        (1, 64, 8, errno.EINVAL),  # first_page not a multiple of 64
        (64, 65, 16, errno.EINVAL),  # num_pages not a multiple of 64, not to the end
        (NPAGES, 64, 8, errno.EINVAL),  # beyond the slot
        (0, 128, 8, errno.EFAULT),  # the bitmap is shorter than num_pages needs
    ],
)
def test_clear_dirty_log_rules(first_page: int, num_pages: int, size: int, code: int) -> None:
    m = machine("initially-set")
    log_on(m)
    with pytest.raises(tw.KvmError) as info:
        m.vm.clear_dirty_log(0, first_page, num_pages, bytes(size))
    assert info.value.errno == code


def test_clear_dirty_log_to_the_slot_end_may_be_unaligned_and_needs_a_log() -> None:
    m = machine("initially-set")
    with pytest.raises(tw.KvmError) as info:
        m.vm.clear_dirty_log(0, 0, 64, bytes(8))
    assert info.value.errno == errno.ENOENT
    log_on(m)
    m.vm.clear_dirty_log(0, NPAGES - 64, 64, b"\x01" + bytes(7))  # page 8128 only
    assert m.vm.get_dirty_log(0)[-8:] == b"\xfe" + b"\xff" * 7
    with pytest.raises(tw.KvmError) as bad:
        m.vm.clear_dirty_log(1 << 16 | 40000, 0, 64, bytes(8))
    assert bad.value.errno == errno.EINVAL
    with pytest.raises(tw.TwodwalkError, match="num_pages=-1"):
        m.vm.clear_dirty_log(0, 0, -1, bytes(8))


# --- logging off: huge pages come back ----------------------------------------------------------


def test_disabling_logging_recovers_the_huge_page_in_place() -> None:
    m = machine(thp=True)
    r = write(m, 0)
    huge, level = ept_leaf(m, GPA)
    assert level == 2
    log_on(m)
    write(m, 1)
    assert ept_leaf(m, GPA).level == 1
    m.vm.set_user_memory_region(0, 0, 0, RAM, m.ram_hva)
    value, level = ept_leaf(m, GPA)
    assert level == 2 and value & ~(W | D) == huge & ~(W | D), "same 2 MiB frame, PS set"
    # The huge leaf inherits W from the 4 KiB leaf it was made from (write-protected for the
    # log): an access that needs W exits once to fast_page_fault, but no fault maps anything.
    again = m.vcpu.access(GVA, "read")
    assert again.hpa == r.hpa
    functions = {s.function for s in again.trace.of_type(KvmStep)}
    assert "kvm_mmu_hugepage_adjust" not in functions
    steps = [s.function for s in m.vm.mmu.log]
    assert "kvm_mmu_recover_huge_pages" in steps


# --- migration in every mode --------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(DIRTY_LOG_MODES))
def test_precopy_converges_in_every_mode(mode: str) -> None:
    m = machine(mode)

    def shrinking(round_number: int) -> None:
        for i in range(8 >> round_number):
            write(m, i, round_number * 100 + i + 1)

    result = precopy(m, shrinking, threshold_pages=6)
    assert result.converged
    assert result.rounds[0].pages_sent == NPAGES
    # Round 0 dirties data pages 0..7 (plus the guest's four page-table pages, whose reads
    # count as writes with EPT A/D): at least 8.
    assert result.rounds[0].dirtied >= 8
    assert all(result.destination[g] == m.read_gpa(g << 12, 4096) for g in range(NPAGES))


def test_info_memslots_names_the_mode() -> None:
    m = machine("pml")
    text = info_memslots(m.vm.memslots.slots.values(), m.vm.describe_dirty_log_mode())
    assert text.splitlines()[-1].startswith("dirty logging: pml: Intel PML")
