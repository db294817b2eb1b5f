"""Host-side what-ifs under a running guest (include/linux/mmu_notifier.h): swap-out, migration,
KSM, THP split/collapse, munmap, and what goes wrong when KVM is not notified."""

from __future__ import annotations

import errno
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import ept_leaf_if_present, mapped_machine

import twodwalk as tw
from twodwalk.engine.host import swp_offset
from twodwalk.engine.kvm.mmu import is_mmio_spte
from twodwalk.engine.trace import HostPageFault, KvmStep, VmExit
from twodwalk.engine.units import HUGE_PAGE_SIZE

MIB = 1 << 20
GVA = 0x40_0000
DATA_GPA = 0x20_0000
EPT_W = 2
PAYLOAD = b"twodwalk" * 512  # one full 4 KiB page


def machine(thp: bool = False) -> tw.Machine:
    m = mapped_machine(
        GVA, DATA_GPA, 0x1000, guest_ram=32 * MIB, maxphyaddr=48, gbpages=False, thp=thp
    )
    m.write_gpa(DATA_GPA, PAYLOAD)
    return m


def word(data: bytes, offset: int = 0) -> int:
    return int.from_bytes(data[offset : offset + 8], "little")


def ept_frame(value: int, level: int) -> int:
    size = 1 << (12 + 9 * (level - 1))
    return value & ((1 << 48) - 1) & ~(size - 1)


def host_hpa(m: tw.Machine, gpa: int) -> int | None:
    hva = m.vm.gpa_to_hva(gpa)
    assert hva is not None
    record = m.host.walk(m.vmm, hva, False)
    return None if record.translation is None else record.translation.address


def first_access(m: tw.Machine) -> tw.AccessResult:
    r = m.vcpu.access(GVA, "read")
    assert r.fault is None and r.exit is None and r.value == word(PAYLOAD)
    assert r.hva is not None and r.hpa is not None
    assert ept_leaf_if_present(m, DATA_GPA) is not None
    return r


def test_swap_out_zaps_ept_and_swap_in_restores_data() -> None:
    m = machine()
    r = first_access(m)
    hva = r.hva & ~0xFFF  # type: ignore[operator]
    offset = m.host.swap_out(m.vmm, hva)
    assert ept_leaf_if_present(m, DATA_GPA) is None, "the notifier zapped the EPT leaf"
    assert m.vmm.tables.find_leaf(hva) is None
    slot = m.vmm.tables.entry_address(hva, 1)
    assert slot is not None
    pte = m.memory.read_u64(slot)
    assert pte != 0 and not pte & 1, "a swap entry: non-zero, not present"
    assert swp_offset(pte) == offset

    again = m.vcpu.access(GVA, "read")
    assert again.value == word(PAYLOAD)
    assert again.trace.of_type(VmExit), "the guest re-faulted"
    faults = again.trace.of_type(HostPageFault)
    assert len(faults) == 1 and faults[0].resolution.startswith("swap-in")
    assert again.hpa is not None and again.hpa & ~0xFFF == faults[0].hpa
    assert m.memory.read(faults[0].hpa, 4096) == PAYLOAD
    leaf = ept_leaf_if_present(m, DATA_GPA)
    assert leaf is not None and ept_frame(*leaf) == faults[0].hpa


def test_migrate_moves_the_frame_and_keeps_data() -> None:
    m = machine()
    r = first_access(m)
    old = r.hpa & ~0xFFF  # type: ignore[operator]
    new = m.host.migrate(m.vmm, r.hva & ~0xFFF)  # type: ignore[operator]
    assert new != old
    assert ept_leaf_if_present(m, DATA_GPA) is None
    again = m.vcpu.access(GVA, "read")
    assert again.trace.of_type(VmExit)
    assert again.value == word(PAYLOAD)
    assert again.hpa == new
    assert m.memory.read(new, 4096) == PAYLOAD


def test_ksm_merge_then_copy_on_write() -> None:
    m = machine()
    gva_b, gpa_b = GVA + 0x1000, DATA_GPA + 0x1000
    m.guest.map(gva_b, gpa_b, 0x1000, rw=1, us=1)
    m.write_gpa(gpa_b, PAYLOAD)
    a = m.vcpu.access(GVA, "read")
    b = m.vcpu.access(gva_b, "read")
    assert a.hpa != b.hpa
    assert a.hva is not None and b.hva is not None
    frame = m.host.ksm_merge(m.vmm, a.hva & ~0xFFF, b.hva & ~0xFFF)
    assert ept_leaf_if_present(m, DATA_GPA) is None and ept_leaf_if_present(m, gpa_b) is None
    a2 = m.vcpu.access(GVA, "read")
    b2 = m.vcpu.access(gva_b, "read")
    assert a2.hpa == b2.hpa == frame
    assert a2.value == b2.value == word(PAYLOAD)
    leaf = ept_leaf_if_present(m, gpa_b)
    assert leaf is not None and not leaf.value & EPT_W, "merged page is read-only in EPT"

    w = m.vcpu.access(gva_b, "write", 0x1122_3344)
    faults = w.trace.of_type(HostPageFault)
    assert len(faults) == 1 and "copy-on-write" in faults[0].resolution
    assert faults[0].hpa != frame
    assert w.hpa == faults[0].hpa
    assert m.vcpu.access(gva_b, "read").value == 0x1122_3344
    a3 = m.vcpu.access(GVA, "read")
    assert a3.value == word(PAYLOAD) and a3.hpa == frame
    assert m.read_gpa(DATA_GPA, 4096) == PAYLOAD
    assert m.read_gpa(gpa_b + 8, 4088) == PAYLOAD[8:]


def test_thp_split_and_collapse() -> None:
    m = machine(thp=True)
    r = first_access(m)
    leaf = ept_leaf_if_present(m, DATA_GPA)
    assert leaf is not None and leaf.level == 2
    hva = r.hva & ~0xFFF  # type: ignore[operator]

    m.host.split_thp(m.vmm, hva)
    assert ept_leaf_if_present(m, DATA_GPA) is None
    split = m.vcpu.access(GVA, "read")
    assert split.value == word(PAYLOAD)
    levels = [s.level for s in split.trace.of_type(KvmStep) if s.function.endswith("adjust")]
    assert levels == [1]
    leaf = ept_leaf_if_present(m, DATA_GPA)
    assert leaf is not None and leaf.level == 1
    assert split.hpa == r.hpa, "split keeps the frames"

    new = m.host.collapse_thp(m.vmm, hva)
    assert new % HUGE_PAGE_SIZE == 0
    assert ept_leaf_if_present(m, DATA_GPA) is None
    collapsed = m.vcpu.access(GVA, "read")
    assert collapsed.value == word(PAYLOAD)
    leaf = ept_leaf_if_present(m, DATA_GPA)
    assert leaf is not None and leaf.level == 2 and ept_frame(*leaf) == new
    assert collapsed.hpa == new + (DATA_GPA % HUGE_PAGE_SIZE)
    assert m.read_gpa(DATA_GPA, 4096) == PAYLOAD


def test_munmap_of_guest_ram_makes_kvm_run_fail_with_efault() -> None:
    m = machine()
    r = first_access(m)
    m.vmm.munmap(r.hva & ~0xFFF, 0x1000)  # type: ignore[operator]
    assert ept_leaf_if_present(m, DATA_GPA) is None
    with pytest.raises(tw.KvmError) as info:
        m.vcpu.access(GVA, "read")
    assert info.value.errno == errno.EFAULT


def test_without_notifiers_the_guest_reads_a_freed_frame() -> None:
    m = machine()
    r = first_access(m)
    old_frame = r.hpa & ~0xFFF  # type: ignore[operator]
    m.host.mmu_notifiers_enabled = False
    m.host.swap_out(m.vmm, r.hva & ~0xFFF)  # type: ignore[operator]
    leaf = ept_leaf_if_present(m, DATA_GPA)
    assert leaf is not None and ept_frame(*leaf) == old_frame, "stale EPT leaf"
    reused = m.host.frames.alloc()
    assert reused == old_frame, "LIFO reuse hands out the freed frame"
    junk = b"\xa5" * 4096
    m.memory.write(reused, junk)
    stale = m.vcpu.access(GVA, "read")
    assert stale.trace.of_type(VmExit) == [], "no exit: the guest never noticed"
    assert stale.value == word(junk) != word(PAYLOAD)
    assert stale.hpa == old_frame
    # The VMM's own view swaps the real data back in elsewhere.
    assert m.read_gpa(DATA_GPA, 4096) == PAYLOAD


# --- property: EPT agrees with memslots + host page tables --------------------------------------

PAGES = 6
PROP_GVA = 0x100_0000
PROP_GPA = 0x40_0000


@dataclass(frozen=True)
class Op:
    what: str
    page: int
    value: int = 0


OPS = st.one_of(
    st.builds(Op, st.just("read"), st.integers(0, PAGES - 1)),
    st.builds(Op, st.just("write"), st.integers(0, PAGES - 1), st.integers(0, (1 << 64) - 1)),
    st.builds(Op, st.sampled_from(["swap", "migrate"]), st.integers(0, PAGES - 1)),
    st.builds(Op, st.sampled_from(["log_on", "log_off"]), st.just(0)),
    st.builds(Op, st.just("remap"), st.integers(0, PAGES - 1)),
)
ALT_GPA = 0x80_0000  # a second GPA for each page, which the guest may remap the page to


def check_ept_matches_host(m: tw.Machine) -> int:
    checked = 0
    for entry in m.vm.ept.tables.entries():
        if not entry.leaf or is_mmio_spte(entry.value):
            continue
        gpa = entry.virtual
        expected = host_hpa(m, gpa)
        assert expected is not None, f"EPT maps GPA {gpa:#x} but the host page is gone"
        assert ept_frame(entry.value, entry.level) == expected, f"stale EPT leaf for {gpa:#x}"
        checked += 1
    return checked


@settings(max_examples=30)
@given(st.lists(OPS, min_size=1, max_size=25))
def test_ept_leaves_always_match_memslot_and_host_tables(ops: list[Op]) -> None:
    m = tw.Machine(guest_ram=32 * MIB, guest_levels=4, ept_levels=4, maxphyaddr=48, gbpages=False)
    m.guest.map(PROP_GVA, PROP_GPA, PAGES * 0x1000, rw=1, us=1)
    model: dict[int, int] = {}  # GPA -> value last written there
    backing = {page: PROP_GPA + page * 0x1000 for page in range(PAGES)}
    for op in ops:
        gva, gpa = PROP_GVA + op.page * 0x1000, backing[op.page]
        hva = m.vm.gpa_to_hva(gpa)
        assert hva is not None
        if op.what == "read":
            assert m.vcpu.access(gva, "read").value == model.get(gpa, 0)
        elif op.what == "write":
            assert m.vcpu.access(gva, "write", op.value).fault is None
            model[gpa] = op.value
        elif op.what == "remap":
            other = ALT_GPA + op.page * 0x1000
            backing[op.page] = other if gpa != other else PROP_GPA + op.page * 0x1000
            m.guest.unmap(gva, 0x1000)
            m.guest.map(gva, backing[op.page], 0x1000, rw=1, us=1)
            m.vcpu.invlpg(gva)
        elif op.what in ("swap", "migrate"):
            found = m.vmm.tables.find_leaf(hva)
            if found is None:
                continue  # not resident: nothing to swap or migrate
            pte = m.memory.read_u64(found.slot)
            if pte & 0xFFFF_FFFF_F000 == m.host.zero_page:
                continue  # the shared zero page is never swapped or migrated
            if op.what == "swap":
                m.host.swap_out(m.vmm, hva)
            else:
                m.host.migrate(m.vmm, hva)
        else:
            m.vm.set_user_memory_region(0, int(op.what == "log_on"), 0, m.guest_ram, m.ram_hva)
        check_ept_matches_host(m)
    for page in range(PAGES):
        value = m.vcpu.access(PROP_GVA + page * 0x1000, "read").value
        assert value == model.get(backing[page], 0)
    assert check_ept_matches_host(m) >= PAGES


def test_a_guest_read_sets_no_bit_in_the_vmms_host_pte() -> None:
    """KVM's `hva_to_pfn` asks get_user_pages for the page (first a writable one without
    faulting); GUP reads the host PTE and never sets its A or D bit (mm/gup.c
    `follow_page_pte`). A page swapped back in by a read is writable and clean (D=0), and
    a guest read must leave it clean, or reclaim would write it to swap again for nothing."""
    m = machine()
    hva = m.vm.gpa_to_hva(DATA_GPA)
    assert hva is not None
    m.host.swap_out(m.vmm, hva)
    assert first_access(m).value == word(PAYLOAD)
    m.vm.ept.zap_all()  # the next read faults again: now `hva_to_pfn_fast` finds the page
    again = m.vcpu.access(GVA, "read")
    fast = [s for s in again.trace.of_type(KvmStep) if s.function == "hva_to_pfn_fast"]
    assert [s.hva for s in fast].count(hva) == 1
    found = m.vmm.tables.find_leaf(hva)
    assert found is not None
    pte = m.memory.read_u64(found.slot)
    # P, R/W, U/S and A (x86 vm_page_prot has _PAGE_ACCESSED), D clear, XD set.
    assert pte & 0x7F == 0b010_0111 and pte >> 63 == 1
