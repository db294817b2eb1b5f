"""Machines several test modules share (each module keeps the set-ups only it needs)."""

from __future__ import annotations

import twodwalk as tw

GVA = 0x40_0000
GPA = 0x10_0000


def small_machine() -> tw.Machine:
    """4 MiB of guest RAM (4 KiB pages, EPT on) with 64 pages mapped writable at GVA -> GPA."""
    m = tw.Machine(guest_ram=4 << 20)
    m.guest.map(GVA, GPA, 64 * 4096, rw=1)
    return m
