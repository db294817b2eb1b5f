"""khugepaged's collapse of 512 small pages into a THP (mm/khugepaged.c): swapped-out pages
are swapped in first (`__collapse_huge_page_swapin`), and the scan gives up past
`max_ptes_none` / `max_ptes_swap` (`hpage_collapse_scan_pmd`)."""

from __future__ import annotations

import pytest

import twodwalk as tw
from twodwalk.engine.host import swp_entry_pte
from twodwalk.engine.units import HUGE_PAGE_SIZE

GVA = 0x40_0000
GPA = 0x20_0000  # the second 2 MiB page of guest RAM
PAYLOAD = b"swapped!" * 512


def split_machine() -> tuple[tw.Machine, int]:
    """A THP-backed guest whose 2 MiB page at GPA was split into 512 PTEs; page 5 holds
    PAYLOAD. Returns the machine and the HVA of the 2 MiB page."""
    m = tw.Machine(guest_ram=32 << 20, maxphyaddr=48, gbpages=False, thp=True)
    m.guest.map(GVA, GPA, 0x1000, rw=1, us=1)
    m.write_gpa(GPA + 0x5000, PAYLOAD)
    hva = m.vm.gpa_to_hva(GPA)
    assert hva is not None and hva % HUGE_PAGE_SIZE == 0
    m.host.split_thp(m.vmm, hva)
    return m, hva


def test_collapse_swaps_in_first_so_data_survives_and_the_slot_is_freed() -> None:
    m, hva = split_machine()
    offset = m.host.swap_out(m.vmm, hva + 0x5000)
    assert offset in m.host.swap
    new = m.host.collapse_thp(m.vmm, hva)
    assert m.host.swap == {}, "the swap slot was freed by the swap-in"
    assert m.memory.read(new + 0x5000, 0x1000) == PAYLOAD
    assert m.read_gpa(GPA + 0x5000, 0x1000) == PAYLOAD


def test_collapse_gives_up_past_max_ptes_swap_and_changes_nothing() -> None:
    m, hva = split_machine()
    offset = m.host.swap_out(m.vmm, hva + 0x5000)
    m.host.khugepaged_max_ptes_swap = 0
    with pytest.raises(tw.TwodwalkError, match=r"SCAN_EXCEED_SWAP_PTE: 1 PTEs.*max_ptes_swap=0"):
        m.host.collapse_thp(m.vmm, hva)
    assert offset in m.host.swap and m.vmm.tables.find_leaf(hva + 0x5000) is None
    assert m.read_gpa(GPA + 0x5000, 0x1000) == PAYLOAD  # a later touch still swaps it in


def test_scan_limits() -> None:
    m, hva = split_machine()
    host = m.host
    young = host.format.encode(1, True, address=0x10_0000, p=1, rw=1, us=1, a=1, d=1)
    zero = host.format.encode(1, True, address=host.zero_page, p=1, us=1, a=1)
    with pytest.raises(tw.TwodwalkError, match="SCAN_EXCEED_NONE_PTE: 512 PTEs"):
        host.khugepaged_scan_ptes(hva, [0] * 511 + [zero])  # the zero page counts as none
    host.khugepaged_scan_ptes(hva, [0] * 511 + [young])  # 511 empty: allowed by default
    swapped = [swp_entry_pte(0, 9)] * 64
    with pytest.raises(tw.TwodwalkError, match="SCAN_LACK_REFERENCED_PAGE: 255 young"):
        host.khugepaged_scan_ptes(hva, swapped + [young] * 255 + [0] * 193)
    host.khugepaged_scan_ptes(hva, swapped + [young] * 256 + [0] * 192)  # half young: ok
    with pytest.raises(tw.TwodwalkError, match="SCAN_EXCEED_SWAP_PTE: 65"):
        host.khugepaged_scan_ptes(hva, swapped + [swp_entry_pte(0, 9)] + [young] * 447)
