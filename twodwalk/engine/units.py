"""Sizes, in one place: the page sizes of x86-64 paging and EPT (SDM Vol 3A 4.5, Vol 3C
29.3.2: a 4 KiB page, a 2 MiB page mapped by a PDE, a 1 GiB page mapped by a PDPTE), binary
units, and how a size is written for people."""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from typing import TypeVar

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


# Fields that hold an address, a frame or page number, an entry or a bit mask: their reprs show
# them in hex, as the SDM and the kernel print them (counts, levels, vectors stay decimal).
HEX_FIELDS = frozenset(
    {
        "address", "base_gfn", "cr2", "entry", "entry_address", "ep4ta", "error_code", "frame",
        "gfn", "gpa", "gpa_page", "guest_phys_addr", "gva", "hpa", "hva", "leaf", "memory_size",
        "new", "old", "page", "page_size", "phys_addr", "physical", "qualification", "reached",
        "root", "start", "end", "table", "table_hpa", "userspace_addr", "value", "written",
    }
)  # fmt: skip

T = TypeVar("T", bound=type)


def hex_repr(cls: T) -> T:
    """Give a dataclass or named tuple a repr with its `HEX_FIELDS` in hex:
    `MmioExit(phys_addr=0x3000010, ...)`, not `phys_addr=50331664`."""
    if is_dataclass(cls):
        names = [f.name for f in fields(cls) if f.repr]
    else:
        names = list(getattr(cls, "_fields"))  # noqa: B009 (a named tuple's, unknown to mypy)

    def hex_fields_repr(self: object) -> str:
        shown = (f"{name}={_shown(name, getattr(self, name))}" for name in names)
        return f"{type(self).__name__}({', '.join(shown)})"

    setattr(cls, "__repr__", hex_fields_repr)  # noqa: B010 (mypy refuses a method assignment)
    return cls


def _shown(name: str, value: object) -> str:
    if name in HEX_FIELDS and type(value) is int:
        return hex(value)
    return repr(value)
