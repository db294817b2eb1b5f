"""Pre-copy live migration on the dirty log (QEMU migration/ram.c)."""

from __future__ import annotations

import pytest
from support import GPA, GVA, small_machine

import twodwalk as tw
from twodwalk.migration import precopy


def test_precopy_converges_when_the_guest_slows_down_and_copies_everything() -> None:
    m = small_machine()

    def shrinking(round_number: int) -> None:
        for i in range(32 >> round_number):
            m.vcpu.access(GVA + i * 4096, "write", round_number * 1000 + i)

    result = precopy(m, shrinking, threshold_pages=4)
    assert result.converged
    assert result.rounds[0].pages_sent == 1024, "round 0 sends all of guest RAM"
    data_dirty = [r.dirtied for r in result.rounds]
    assert data_dirty[0] >= 32 and data_dirty == sorted(data_dirty, reverse=True)
    assert all(result.destination[gfn] == m.read_gpa(gfn << 12, 4096) for gfn in range(1024))
    assert result.pages_sent == sum(r.pages_sent for r in result.rounds)


def test_precopy_does_not_converge_when_the_guest_keeps_dirtying() -> None:
    m = small_machine()

    def busy(round_number: int) -> None:
        for i in range(40):
            m.vcpu.access(GVA + i * 4096, "write", round_number)

    result = precopy(m, busy, max_rounds=3, threshold_pages=4)
    assert not result.converged
    assert len(result.rounds) == 3
    assert result.stop_and_copy_pages >= 40
    assert result.destination[(GPA >> 12) + 39] == m.read_gpa(GPA + 39 * 4096, 4096)


def test_precopy_rejects_a_missing_slot() -> None:
    with pytest.raises(tw.TwodwalkError, match="slot=5"):
        precopy(small_machine(), lambda _: None, slot=5)
