"""1 GiB pages: hugetlbfs backing gives 1 GiB EPT leaves, which need the CPU's 1 GiB-page
capability."""

from __future__ import annotations

import pytest

import twodwalk as tw

GVA = 0x40_0000
GPA = 0x10_0000


def test_1gib_hugetlbfs_backing_gives_a_1gib_ept_leaf_and_14_references() -> None:
    m = tw.Machine(guest_ram=1 << 30, hugetlb_1g=True)
    m.guest.map(GVA, 0x3000_0000, 4096, rw=1)
    m.vcpu.access(GVA, "write", 5)
    found = m.vm.ept.tables.find_leaf(0x3000_0000)
    assert found is not None and found.level == 3
    m.vcpu.caches.off()
    warm = m.vcpu.access(GVA, "read")
    assert warm.value == 5
    assert len(warm.trace.memory_references()) == (4 + 1) * (2 + 1) - 1


def test_1gib_ept_pages_need_gbpages() -> None:
    with pytest.raises(tw.TwodwalkError, match="page_size=0x40000000 is not available"):
        tw.Machine(guest_ram=1 << 30, hugetlb_1g=True, gbpages=False)
