"""Machine configurations real KVM would not run are refused clearly, and the ones it runs
work end to end."""

from __future__ import annotations

import errno

import pytest

import twodwalk as tw

HIGH_GPA = 1 << 50
GVA = 0x40_0000


def slot_at_high_gpa(m: tw.Machine) -> None:
    hva = m.vmm.mmap(0x1000)
    m.vm.set_user_memory_region(3, 0, HIGH_GPA, 0x1000, hva)


def test_a_4_level_ept_refuses_a_memslot_it_could_never_map() -> None:
    """A 4-level EPT walk uses GPA bits 47:0 only (SDM Vol 3C 29.3.2), so KVM caps the guest's
    physical address bits at 48 without 5-level TDP; a slot at 2**50 is EINVAL, where the
    engine used to accept it and then retry the access for ever."""
    m = tw.Machine(maxphyaddr=52, ept_levels=4)
    with pytest.raises(tw.KvmError) as info:
        slot_at_high_gpa(m)
    assert info.value.errno == errno.EINVAL
    assert "48-bit guest-physical space" in str(info.value)


def test_with_5_level_ept_the_same_slot_is_mapped_and_used() -> None:
    m = tw.Machine(maxphyaddr=52, ept_levels=5)
    slot_at_high_gpa(m)
    m.guest.map(GVA, HIGH_GPA, 0x1000, rw=1)
    assert m.vcpu.access(GVA, "write", 0x5A).fault is None
    r = m.vcpu.access(GVA, "read")
    assert (r.fault, r.exit, r.value, r.gpa) == (None, None, 0x5A, HIGH_GPA)
