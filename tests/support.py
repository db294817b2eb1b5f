"""Machines and look-ups several test modules share. Each module keeps only what is its own
(its addresses, its Machine options, what it does after building), so that a reader sees the
set-up of a test in its module and the common steps here."""

from __future__ import annotations

from typing import Any, NamedTuple

import twodwalk as tw
from twodwalk.engine.kvm.memslots import dirty_pages

GVA = 0x40_0000
GPA = 0x10_0000


def mapped_machine(
    gva: int, gpa: int, size: int, *, guest_ram: int, user: bool = True, **options: Any
) -> tw.Machine:
    """A VM (`options` go to `Machine`: tdp, maxphyaddr, thp, ...) whose guest maps
    [gva, gva + size) to `gpa`, writable, and user-accessible when `user`."""
    m = tw.Machine(guest_ram=guest_ram, **options)
    m.guest.map(gva, gpa, size, rw=1, us=int(user))
    return m


def small_machine() -> tw.Machine:
    """4 MiB of guest RAM (4 KiB pages, EPT on) with 64 pages mapped writable at GVA -> GPA."""
    return mapped_machine(GVA, GPA, 64 * 4096, guest_ram=4 << 20, user=False)


class EptLeaf(NamedTuple):
    """An EPT leaf as a test reads it: the entry's value and its level."""

    value: int
    level: int


def ept_leaf_if_present(m: tw.Machine, gpa: int) -> EptLeaf | None:
    """(value, level) of the EPT leaf KVM has for `gpa`, or None where its tables do not
    reach one or the entry allows nothing (R, W and X clear: zapped or never filled)."""
    found = m.vm.ept.tables.find_leaf(gpa)
    if found is None:
        return None
    value = m.memory.read_u64(found.slot)
    return EptLeaf(value, found.level) if value & 7 else None


def ept_leaf(m: tw.Machine, gpa: int) -> EptLeaf:
    """(value, level) of the EPT leaf for `gpa`, which the test expects to be there."""
    leaf = ept_leaf_if_present(m, gpa)
    assert leaf is not None, f"no EPT leaf for gpa={gpa:#x}"
    return leaf


def dirty_among(bitmap: bytes, first: int, count: int) -> set[int]:
    """Which of the `count` pages from page `first` of the memslot the dirty bitmap sets,
    numbered from `first`."""
    return {page - first for page in dirty_pages(bitmap) if first <= page < first + count}
