"""Sizes, in one place: the page sizes of x86-64 paging and EPT (SDM Vol 3A 4.5, Vol 3C
29.3.2: a 4 KiB page, a 2 MiB page mapped by a PDE, a 1 GiB page mapped by a PDPTE), binary
units, and how a size is written for people."""

from __future__ import annotations

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT  # 4 KiB: a PTE's page
HUGE_PAGE_SIZE = 2 << 20  # 2 MiB: a PDE's page; a transparent huge page
GIGANTIC_PAGE_SIZE = 1 << 30  # 1 GiB: a PDPTE's page; a hugetlbfs gigantic page
PAGE_SIZES = (PAGE_SIZE, HUGE_PAGE_SIZE, GIGANTIC_PAGE_SIZE)
KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30


def size_text(size: int) -> str:
    """A power-of-two size in the largest whole unit: 4 KiB, 2 MiB, 1 GiB, 512 GiB."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift} {unit}"
    return f"{size} B"
