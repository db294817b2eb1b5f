"""1 GiB pages: hugetlbfs backing gives 1 GiB EPT leaves, which need the CPU's 1 GiB-page
capability."""

from __future__ import annotations

import pytest

import twodwalk as tw
from twodwalk.engine.trace import KvmStep

GVA = 0x40_0000
GPA = 0x10_0000


def test_1gib_hugetlbfs_backing_gives_a_1gib_ept_leaf_and_14_references() -> None:
    m = tw.Machine(guest_ram=1 << 30, hugetlb_1g=True)
    m.guest.map(GVA, 0x3000_0000, 4096, rw=1)
    m.vcpu.access(GVA, "write", 5)
    found = m.vm.ept.tables.find_leaf(0x3000_0000)
    assert found is not None and found.level == 3
    m.vcpu.caches.off()
    cold = m.vcpu.access(GVA, "read")
    assert cold.value == 5
    assert len(cold.trace.memory_references()) == (4 + 1) * (2 + 1) - 1


def test_1gib_ept_pages_need_gbpages() -> None:
    with pytest.raises(tw.TwodwalkError, match="page_size=0x40000000 is not available"):
        tw.Machine(guest_ram=1 << 30, hugetlb_1g=True, gbpages=False)


def test_hva_to_pfn_names_the_hva_s_own_frame_and_the_huge_page_it_lies_in() -> None:
    """KVM's `hva_to_pfn` returns the pfn of the HVA's own 4 KiB part of a THP: the trace
    shows that HPA (the host walk's answer), with the 2 MiB page beside it."""
    m = tw.Machine(guest_ram=32 << 20, thp=True, maxphyaddr=48, gbpages=False)
    gpa = 0x20_1000  # the second 4 KiB of the 2 MiB page at GPA 2 MiB
    m.guest.map(GVA, gpa, 4096, rw=1)
    first = m.vcpu.access(GVA, "write", 5)
    hva = m.vm.gpa_to_hva(gpa)
    assert hva is not None
    own = m.host.pagemap(m.vmm, hva)
    assert own is not None and own & 0x1F_FFFF == 0x1000, "a THP: the page's second 4 KiB"
    step = next(
        s for s in first.trace.of_type(KvmStep) if s.function == "hva_to_pfn" and s.hva == hva
    )
    assert step.hpa == own
    assert step.detail == (
        f"HVA {hva:#x} -> HPA {own:#x}, in the 2 MiB host page at HPA {own - 0x1000:#x} (writable)"
    )
