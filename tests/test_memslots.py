"""KVM_SET_USER_MEMORY_REGION: the validation table of `__kvm_set_memory_region` (errno and a
message naming the rule), the kinds of change (create, move, flags only, delete, no-op), and
what a change does to the guest (Documentation/virt/kvm/api.rst, virt/kvm/kvm_main.c)."""

from __future__ import annotations

import errno
import re
from collections.abc import Callable

import pytest

import twodwalk as tw
from twodwalk.engine.kvm.memslots import Change

RAM = 32 << 20
SLOT_SIZE = 64 << 10
NEW_GPA = 0x4000_0000  # 1 GiB: well above slot 0's [0, 32 MiB)
MAXPHYADDR = 48
AS1 = 1 << 16
KVM_MEM_LOG_DIRTY_PAGES = 1
KVM_MEM_READONLY = 2

Region = tuple[int, int, int, int, int]  # slot, flags, guest_phys_addr, memory_size, hva


def machine() -> tw.Machine:
    return tw.Machine(
        guest_ram=RAM, tdp=True, guest_levels=4, ept_levels=4, maxphyaddr=MAXPHYADDR, gbpages=False
    )


def generation(m: tw.Machine) -> int:
    return m.vm.memslots.generation


def slot_ids(m: tw.Machine) -> set[tuple[int, int]]:
    return set(m.vm.memslots.slots)


# --- the errno table ---------------------------------------------------------------------------

# Each case: a call built from a fresh machine and a fresh 64 KiB mmap'd HVA, its errno, and a
# pattern the message must match (it names the rule that failed).
REJECTED: list[tuple[str, Callable[[tw.Machine, int], Region], int, str]] = [
    (
        "slot id 32764 (first non-user slot)",
        lambda m, hva: (32764, 0, NEW_GPA, SLOT_SIZE, hva),
        errno.EINVAL,
        r"slot id 32764 .*too large",
    ),
    (
        "slot id 0xffff",
        lambda m, hva: (0xFFFF, 0, NEW_GPA, SLOT_SIZE, hva),
        errno.EINVAL,
        r"slot id 65535 .*too large",
    ),
    (
        "address space 2",
        lambda m, hva: (1 | 2 << 16, 0, NEW_GPA, SLOT_SIZE, hva),
        errno.EINVAL,
        r"address space 2",
    ),
    (
        "guest_memfd flag on the legacy ioctl",
        lambda m, hva: (1, 1 << 2, NEW_GPA, SLOT_SIZE, hva),
        errno.EINVAL,
        r"flags=0x4 has bits 0x4 that KVM_SET_USER_MEMORY_REGION does not take.*REGION2",
    ),
    (
        "unknown flag bit 31",
        lambda m, hva: (1, 1 << 31 | KVM_MEM_READONLY, NEW_GPA, SLOT_SIZE, hva),
        errno.EINVAL,
        r"has bits 0x80000000 that KVM_SET_USER_MEMORY_REGION does not take",
    ),
    (
        "size not a multiple of 4 KiB",
        lambda m, hva: (1, 0, NEW_GPA, SLOT_SIZE + 0x800, hva),
        errno.EINVAL,
        r"memory_size=0x10800 is not a multiple of 4 KiB",
    ),
    (
        "size of one byte",
        lambda m, hva: (1, 0, NEW_GPA, 1, hva),
        errno.EINVAL,
        r"not a multiple of 4 KiB",
    ),
    (
        "GPA not page aligned",
        lambda m, hva: (1, 0, NEW_GPA + 0x10, SLOT_SIZE, hva),
        errno.EINVAL,
        r"guest_phys_addr=0x40000010 is not 4 KiB aligned",
    ),
    (
        "HVA not page aligned",
        lambda m, hva: (1, 0, NEW_GPA, SLOT_SIZE, hva + 8),
        errno.EINVAL,
        r"userspace_addr=0x[0-9a-f]+008 is not 4 KiB aligned",
    ),
    (
        "kernel-range HVA (direct map)",
        lambda m, hva: (1, 0, NEW_GPA, SLOT_SIZE, 0xFFFF_8880_0000_0000),
        errno.EINVAL,
        r"userspace_addr=0xffff888000000000 .*not user memory \(access_ok",
    ),
    (
        "GPA + size overflows 64 bits",
        lambda m, hva: (1, 0, (1 << 64) - 0x1000, 0x2000, hva),
        errno.EINVAL,
        r"guest_phys_addr=0xfffffffffffff000 \+ memory_size=0x2000 overflows",
    ),
    (
        "2**31 pages",
        lambda m, hva: (1, 0, 1 << 40, 1 << (31 + 12), 1 << 44),
        errno.EINVAL,
        r"more than 2\*\*31-1 pages",
    ),
    (
        "last GFN beyond 2**MAXPHYADDR",
        lambda m, hva: (1, 0, (1 << MAXPHYADDR) - 0x1000, 0x2000, hva),
        errno.EINVAL,
        r"beyond the 48-bit guest-physical space",
    ),
    (
        "slot entirely beyond 2**MAXPHYADDR",
        lambda m, hva: (1, 0, 1 << MAXPHYADDR, SLOT_SIZE, hva),
        errno.EINVAL,
        r"beyond the 48-bit guest-physical space",
    ),
    (
        "delete an empty slot",
        lambda m, hva: (5, 0, 0, 0, 0),
        errno.EINVAL,
        r"slot 5 is empty",
    ),
    (
        "delete an empty slot of address space 1",
        lambda m, hva: (0 | AS1, 0, 0, 0, 0),
        errno.EINVAL,
        r"slot 0 is empty",
    ),
    (
        "change slot 0's userspace_addr",
        lambda m, hva: (0, 0, 0, RAM, hva),
        errno.EINVAL,
        r"slot 0 exists: its userspace_addr cannot change",
    ),
    (
        "shrink slot 0",
        lambda m, hva: (0, 0, 0, RAM - 0x1000, m.ram_hva),
        errno.EINVAL,
        r"slot 0 exists: its size cannot change",
    ),
    (
        "grow slot 0",
        lambda m, hva: (0, 0, 0, RAM + 0x1000, m.ram_hva),
        errno.EINVAL,
        r"slot 0 exists: its size cannot change",
    ),
    (
        "turn READONLY on for slot 0",
        lambda m, hva: (0, KVM_MEM_READONLY, 0, RAM, m.ram_hva),
        errno.EINVAL,
        r"KVM_MEM_READONLY cannot be toggled",
    ),
    (
        "create overlapping slot 0 entirely",
        lambda m, hva: (1, 0, 0x10_0000, SLOT_SIZE, hva),
        errno.EEXIST,
        r"overlaps slot 0 \[0x0, 0x2000000\)",
    ),
    (
        "create overlapping slot 0's last page",
        lambda m, hva: (1, 0, RAM - 0x1000, SLOT_SIZE, hva),
        errno.EEXIST,
        r"overlaps slot 0",
    ),
    (
        "create covering slot 0 from below 0 to above",
        lambda m, hva: (1, 0, 0, RAM + SLOT_SIZE, hva),
        errno.EEXIST,
        r"overlaps slot 0",
    ),
]


@pytest.mark.parametrize(
    ("make", "code", "pattern"),
    [pytest.param(make, code, pattern, id=name) for name, make, code, pattern in REJECTED],
)
def test_rejected_region(
    make: Callable[[tw.Machine, int], Region], code: int, pattern: str
) -> None:
    m = machine()
    hva = m.vmm.mmap(SLOT_SIZE)
    before_slots, before_gen = slot_ids(m), generation(m)
    with pytest.raises(tw.KvmError) as info:
        m.vm.set_user_memory_region(*make(m, hva))
    assert info.value.errno == code
    assert str(info.value).startswith(errno.errorcode[code] + ":")
    assert re.search(pattern, str(info.value)), str(info.value)
    # A failed call changes nothing: same slots, same generation, slot 0 intact.
    assert slot_ids(m) == before_slots
    assert generation(m) == before_gen
    slot0 = m.vm.memslots.slots[(0, 0)]
    assert (slot0.guest_phys_addr, slot0.memory_size, slot0.userspace_addr, slot0.flags) == (
        0,
        RAM,
        m.ram_hva,
        0,
    )


# The accepted neighbours of the rejected cases: each rule's boundary is where the table says.
ACCEPTED: list[tuple[str, Callable[[tw.Machine, int], Region], tuple[int, int]]] = [
    (
        "slot id 32763 (last user slot)",
        lambda m, hva: (32763, 0, NEW_GPA, SLOT_SIZE, hva),
        (0, 32763),
    ),
    ("address space 1 (SMM)", lambda m, hva: (3 | AS1, 0, NEW_GPA, SLOT_SIZE, hva), (1, 3)),
    (
        "LOG_DIRTY_PAGES",
        lambda m, hva: (1, KVM_MEM_LOG_DIRTY_PAGES, NEW_GPA, SLOT_SIZE, hva),
        (0, 1),
    ),
    ("READONLY", lambda m, hva: (1, KVM_MEM_READONLY, NEW_GPA, SLOT_SIZE, hva), (0, 1)),
    ("both flags", lambda m, hva: (1, 3, NEW_GPA, SLOT_SIZE, hva), (0, 1)),
    (
        "last page below 2**MAXPHYADDR",
        lambda m, hva: (1, 0, (1 << MAXPHYADDR) - SLOT_SIZE, SLOT_SIZE, hva),
        (0, 1),
    ),
    (
        "2**31-1 pages",
        lambda m, hva: (1, 0, 1 << 40, ((1 << 31) - 1) << 12, 1 << 44),
        (0, 1),
    ),
    ("adjacent to slot 0", lambda m, hva: (1, 0, RAM, SLOT_SIZE, hva), (0, 1)),
    (
        "overlapping slot 0 in address space 1",
        lambda m, hva: (0 | AS1, 0, 0x10_0000, SLOT_SIZE, hva),
        (1, 0),
    ),
    (
        "an unmapped HVA (not checked at creation)",
        lambda m, hva: (1, 0, NEW_GPA, SLOT_SIZE, 1 << 40),
        (0, 1),
    ),
]


@pytest.mark.parametrize(
    ("make", "key"),
    [pytest.param(make, key, id=name) for name, make, key in ACCEPTED],
)
def test_accepted_region(make: Callable[[tw.Machine, int], Region], key: tuple[int, int]) -> None:
    m = machine()
    hva = m.vmm.mmap(SLOT_SIZE)
    region = make(m, hva)
    before = m.vm.memslots.generations[key[0]]  # each address space has its own
    result = m.vm.set_user_memory_region(*region)
    assert result.change is Change.CREATE
    assert result.old is None
    new = m.vm.memslots.slots[key]
    assert result.new is new
    assert (new.as_id, new.id) == key
    assert (new.flags, new.guest_phys_addr, new.memory_size, new.userspace_addr) == region[1:]
    assert m.vm.memslots.generations[key[0]] > before
    assert (0, 0) in m.vm.memslots.slots


def test_errno_numbers_are_the_kernels() -> None:
    m = machine()
    with pytest.raises(tw.KvmError) as einval:
        m.vm.set_user_memory_region(1, 4, NEW_GPA, SLOT_SIZE, m.vmm.mmap(SLOT_SIZE))
    with pytest.raises(tw.KvmError) as eexist:
        m.vm.set_user_memory_region(1, 0, 0, SLOT_SIZE, m.vmm.mmap(SLOT_SIZE))
    assert einval.value.errno == errno.EINVAL == 22
    assert eexist.value.errno == errno.EEXIST == 17
    assert isinstance(einval.value, tw.TwodwalkError)


def test_readonly_cannot_be_turned_off() -> None:
    m = machine()
    hva = m.vmm.mmap(SLOT_SIZE)
    m.vm.set_user_memory_region(1, KVM_MEM_READONLY, NEW_GPA, SLOT_SIZE, hva)
    gen = generation(m)
    with pytest.raises(tw.KvmError) as info:
        m.vm.set_user_memory_region(1, 0, NEW_GPA, SLOT_SIZE, hva)
    assert info.value.errno == errno.EINVAL
    assert "KVM_MEM_READONLY cannot be toggled" in str(info.value)
    # Toggling dirty logging while keeping READONLY is a legal flags-only change.
    assert generation(m) == gen
    flags = KVM_MEM_READONLY | KVM_MEM_LOG_DIRTY_PAGES
    result = m.vm.set_user_memory_region(1, flags, NEW_GPA, SLOT_SIZE, hva)
    assert result.change is Change.FLAGS_ONLY
    assert m.vm.memslots.slots[(0, 1)].flags == flags


def test_move_onto_slot_0_is_eexist() -> None:
    m = machine()
    hva = m.vmm.mmap(SLOT_SIZE)
    m.vm.set_user_memory_region(1, 0, NEW_GPA, SLOT_SIZE, hva)
    gen = generation(m)
    with pytest.raises(tw.KvmError) as info:
        m.vm.set_user_memory_region(1, 0, RAM - 0x1000, SLOT_SIZE, hva)
    assert info.value.errno == errno.EEXIST
    assert re.search(r"overlaps slot 0", str(info.value))
    assert m.vm.memslots.slots[(0, 1)].guest_phys_addr == NEW_GPA
    assert generation(m) == gen


def test_move_may_overlap_its_own_old_range() -> None:
    m = machine()
    hva = m.vmm.mmap(SLOT_SIZE)
    m.vm.set_user_memory_region(1, 0, NEW_GPA, SLOT_SIZE, hva)
    result = m.vm.set_user_memory_region(1, 0, NEW_GPA + 0x1000, SLOT_SIZE, hva)
    assert result.change is Change.MOVE
    assert m.vm.memslots.slots[(0, 1)].guest_phys_addr == NEW_GPA + 0x1000


def test_move_beyond_maxphyaddr_is_einval() -> None:
    m = machine()
    hva = m.vmm.mmap(SLOT_SIZE)
    m.vm.set_user_memory_region(1, 0, NEW_GPA, SLOT_SIZE, hva)
    with pytest.raises(tw.KvmError) as info:
        m.vm.set_user_memory_region(1, 0, (1 << MAXPHYADDR) - 0x1000, SLOT_SIZE, hva)
    assert info.value.errno == errno.EINVAL
    assert "guest-physical space" in str(info.value)
    assert m.vm.memslots.slots[(0, 1)].guest_phys_addr == NEW_GPA


def test_overlapping_slot_in_other_address_space_is_independent() -> None:
    m = machine()
    hva = m.vmm.mmap(SLOT_SIZE)
    m.vm.set_user_memory_region(0 | AS1, 0, 0, SLOT_SIZE, hva)
    # The same id in the other address space is a different slot; slot 0 is untouched.
    assert m.vm.memslots.slots[(0, 0)].memory_size == RAM
    assert m.vm.memslots.slots[(1, 0)].memory_size == SLOT_SIZE
    # Address space 1 is not what the vCPU translates through (it is SMM).
    assert m.vm.memslots.gfn_to_memslot(0) is m.vm.memslots.slots[(0, 0)]
    assert m.vm.memslots.gfn_to_memslot(0, as_id=1) is m.vm.memslots.slots[(1, 0)]
    # Another slot of address space 1 overlapping that one is EEXIST there.
    with pytest.raises(tw.KvmError) as info:
        m.vm.set_user_memory_region(7 | AS1, 0, 0x1000, SLOT_SIZE, m.vmm.mmap(SLOT_SIZE))
    assert info.value.errno == errno.EEXIST


# --- the kinds of change -----------------------------------------------------------------------


def test_same_everything_is_a_noop() -> None:
    m = machine()
    gen = generation(m)
    result = m.vm.set_user_memory_region(0, 0, 0, RAM, m.ram_hva)
    assert result.change is Change.NONE
    assert result.old is result.new is m.vm.memslots.slots[(0, 0)]
    assert generation(m) == gen


def test_flags_only_change() -> None:
    m = machine()
    gen = generation(m)
    result = m.vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, RAM, m.ram_hva)
    assert result.change is Change.FLAGS_ONLY
    assert result.old is not None and result.old.flags == 0
    slot = m.vm.memslots.slots[(0, 0)]
    assert slot.flags == KVM_MEM_LOG_DIRTY_PAGES
    assert slot.guest_phys_addr == 0 and slot.userspace_addr == m.ram_hva
    assert generation(m) > gen
    # And back off again.
    result = m.vm.set_user_memory_region(0, 0, 0, RAM, m.ram_hva)
    assert result.change is Change.FLAGS_ONLY
    assert m.vm.memslots.slots[(0, 0)].flags == 0


def test_generation_increases_on_every_change_only() -> None:
    m = machine()
    hva = m.vmm.mmap(SLOT_SIZE)
    seen = [generation(m)]
    steps: list[tuple[Region, Change]] = [
        ((1, 0, NEW_GPA, SLOT_SIZE, hva), Change.CREATE),
        ((1, 0, NEW_GPA, SLOT_SIZE, hva), Change.NONE),
        ((1, KVM_MEM_LOG_DIRTY_PAGES, NEW_GPA, SLOT_SIZE, hva), Change.FLAGS_ONLY),
        ((1, KVM_MEM_LOG_DIRTY_PAGES, 2 * NEW_GPA, SLOT_SIZE, hva), Change.MOVE),
        ((1, 0, 0, 0, 0), Change.DELETE),
        ((1, 0, NEW_GPA, SLOT_SIZE, hva), Change.CREATE),
    ]
    for region, change in steps:
        assert m.vm.set_user_memory_region(*region).change is change
        gen = generation(m)
        if change is Change.NONE:
            assert gen == seen[-1]
        else:
            assert gen > seen[-1], change
        seen.append(gen)


# --- what a change does to the guest -----------------------------------------------------------

GVA_OLD = 0x10_0000_0000
GVA_NEW = 0x20_0000_0000
MOVED_GPA = 0x6000_0000


def machine_with_slot_1() -> tw.Machine:
    """Slot 1 at NEW_GPA over a fresh mmap, holding a marker; the guest maps it at GVA_OLD."""
    m = machine()
    hva = m.vmm.mmap(SLOT_SIZE)
    m.vm.set_user_memory_region(1, 0, NEW_GPA, SLOT_SIZE, hva)
    m.write_gpa(NEW_GPA + 0x2008, (0xC0FFEE).to_bytes(8, "little"))
    m.guest.map(GVA_OLD, NEW_GPA, SLOT_SIZE, rw=1, us=1)
    m.guest.map(GVA_NEW, MOVED_GPA, SLOT_SIZE, rw=1, us=1)
    r = m.vcpu.access(GVA_OLD + 0x2008, "read")
    assert (r.fault, r.exit, r.value, r.gpa) == (None, None, 0xC0FFEE, NEW_GPA + 0x2008)
    assert r.hva == hva + 0x2008
    return m


def test_move_old_gpa_becomes_mmio_new_gpa_sees_same_data() -> None:
    m = machine_with_slot_1()
    hva = m.vm.memslots.slots[(0, 1)].userspace_addr
    r = m.vcpu.access(GVA_NEW + 0x2008, "read")  # nothing there yet: MMIO
    assert isinstance(r.exit, tw.MmioExit)
    result = m.vm.set_user_memory_region(1, 0, MOVED_GPA, SLOT_SIZE, hva)
    assert result.change is Change.MOVE
    old = m.vcpu.access(GVA_OLD + 0x2008, "read")
    assert old.fault is None and old.value is None
    assert isinstance(old.exit, tw.MmioExit)
    assert old.exit.phys_addr == NEW_GPA + 0x2008 and not old.exit.is_write
    new = m.vcpu.access(GVA_NEW + 0x2008, "read")
    assert (new.fault, new.exit, new.value) == (None, None, 0xC0FFEE)
    assert new.gpa == MOVED_GPA + 0x2008 and new.hva == hva + 0x2008
    # The same host frame: a write through the new GPA is what the VMM reads at the HVA.
    w = m.vcpu.access(GVA_NEW + 0x2010, "write", 0x5EED)
    assert (w.fault, w.exit) == (None, None)
    assert m.read_gpa(MOVED_GPA + 0x2010, 8) == (0x5EED).to_bytes(8, "little")
    with pytest.raises(tw.TwodwalkError):
        m.read_gpa(NEW_GPA + 0x2010, 8)


def test_move_zaps_the_slots_ept_entries() -> None:
    m = machine_with_slot_1()
    hva = m.vm.memslots.slots[(0, 1)].userspace_addr
    found = m.vm.ept.tables.find_leaf(NEW_GPA + 0x2000)
    assert found is not None and m.memory.read_u64(found.slot) & 7 == 0b111
    m.vm.set_user_memory_region(1, 0, MOVED_GPA, SLOT_SIZE, hva)
    assert m.vm.ept.tables.find_leaf(NEW_GPA + 0x2000) is None


def test_delete_makes_accesses_mmio_and_recreate_restores_them() -> None:
    m = machine_with_slot_1()
    hva = m.vm.memslots.slots[(0, 1)].userspace_addr
    result = m.vm.set_user_memory_region(1, 0, NEW_GPA, 0, 0)
    assert result.change is Change.DELETE and result.new is None
    assert (0, 1) not in m.vm.memslots.slots
    for kind, value in (("read", None), ("write", 0x77)):
        r = m.vcpu.access(GVA_OLD + 0x2008, kind, value)
        assert r.fault is None and r.value is None
        assert isinstance(r.exit, tw.MmioExit)
        assert r.exit.phys_addr == NEW_GPA + 0x2008
        assert r.exit.is_write is (kind == "write")
    # Deleting it again: the slot is empty now.
    with pytest.raises(tw.KvmError) as info:
        m.vm.set_user_memory_region(1, 0, NEW_GPA, 0, 0)
    assert info.value.errno == errno.EINVAL
    # Re-create over the same host memory: the data was never lost (the MMIO write went to
    # userspace, not to RAM).
    assert m.vm.set_user_memory_region(1, 0, NEW_GPA, SLOT_SIZE, hva).change is Change.CREATE
    r = m.vcpu.access(GVA_OLD + 0x2008, "read")
    assert (r.fault, r.exit, r.value) == (None, None, 0xC0FFEE)


def test_delete_then_recreate_with_other_hva_and_size() -> None:
    m = machine_with_slot_1()
    m.vm.set_user_memory_region(1, 0, 0, 0, 0)
    other = m.vmm.mmap(2 * SLOT_SIZE)
    # The new backing is fresh anonymous memory: it reads as zeros.
    result = m.vm.set_user_memory_region(1, 0, NEW_GPA, 2 * SLOT_SIZE, other)
    assert result.change is Change.CREATE
    r = m.vcpu.access(GVA_OLD + 0x2008, "read")
    assert (r.fault, r.exit, r.value, r.hva) == (None, None, 0, other + 0x2008)


def test_unmapped_hva_fails_at_first_access_with_efault() -> None:
    m = machine()
    unmapped = 1 << 40  # no VMA of the VMM there: KVM does not check at creation
    m.vm.set_user_memory_region(1, 0, NEW_GPA, SLOT_SIZE, unmapped)
    m.guest.map(GVA_OLD, NEW_GPA, SLOT_SIZE, rw=1, us=1)
    with pytest.raises(tw.KvmError) as info:
        m.vcpu.access(GVA_OLD + 0x1000, "read")
    assert info.value.errno == errno.EFAULT
    assert f"{unmapped + 0x1000:#x}" in str(info.value)
