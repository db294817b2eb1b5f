"""The EPT entry format (SDM Vol 3C 29.3.2-29.3.3): misconfigurations, memory types, reserved
bits, the 1 GiB capability, violation qualifications and the EPTP."""

from __future__ import annotations

import pytest

import twodwalk as tw
from twodwalk.engine.ept import EptAccessRules, ept_violation_qualification, is_misconfiguration
from twodwalk.engine.memory import PhysicalMemory
from twodwalk.engine.pagetables import PageTables
from twodwalk.engine.tables import PhysicalTables
from twodwalk.engine.walker import Access, AccessKind, FaultKind, walk

CPU = tw.CpuModel(maxphyaddr=46)
FMT = tw.ept_format(4, CPU)


@pytest.mark.parametrize("xwr", [0b010, 0b110])
def test_write_without_read_is_a_misconfiguration(xwr: int) -> None:
    for level in (4, 3, 2, 1):
        assert FMT.problem(0x1000 | xwr | (6 << 3 if level == 1 else 0), level) is not None


def test_execute_only_is_allowed_only_with_the_capability() -> None:
    leaf = 0x1000 | 0b100 | 6 << 3
    assert FMT.problem(leaf, 1) is None
    no_exec_only = tw.EptFormat(4, 46, True, True, execute_only=False)
    assert no_exec_only.problem(leaf, 1) is not None


@pytest.mark.parametrize(
    ("memtype", "bad"),
    [(0, False), (1, False), (2, True), (3, True), (4, False), (5, False), (6, False), (7, True)],
)
def test_leaf_memory_types(memtype: int, bad: bool) -> None:
    assert (FMT.problem(0x1000 | 0b111 | memtype << 3, 1) is not None) == bad


@pytest.mark.parametrize(
    ("level", "value", "reserved"),
    [
        (4, 0x1000 | 7 | 1 << 7, True),  # bit 7 in a PML4E
        (4, 0x1000 | 7 | 1 << 3, True),  # bits 7:3 in a non-leaf PML4E
        (3, 0x1000 | 7 | 1 << 6, True),  # bits 6:3 in a non-leaf PDPTE
        (2, 0x20_0000 | 7 | 6 << 3 | 1 << 7 | 1 << 12, True),  # bit 12 inside a 2 MiB leaf
        (3, 0x4000_0000 | 7 | 6 << 3 | 1 << 7 | 1 << 29, True),  # bit 29 inside a 1 GiB leaf
        (1, 0x1000 | 7 | 6 << 3 | 1 << 46, True),  # bit 46 with MAXPHYADDR 46
        (1, 0x1000 | 7 | 6 << 3 | 1 << 63 | 1 << 52, False),  # SVE and ignored bits
    ],
)
def test_ept_reserved_bits(level: int, value: int, reserved: bool) -> None:
    assert (FMT.problem(value, level) is not None) == reserved


def test_1gib_ept_leaf_needs_the_capability() -> None:
    no_1g = tw.ept_format(4, tw.CpuModel(maxphyaddr=46, gbpages=False))
    leaf = 0x4000_0000 | 7 | 6 << 3 | 1 << 7
    assert FMT.problem(leaf, 3) is None
    assert no_1g.problem(leaf, 3) is not None


def ept_tree() -> tuple[PhysicalMemory, PageTables]:
    memory = PhysicalMemory(46)
    frames = tw.FrameAllocator(memory, 0x10_0000, 0x100_0000)
    return memory, PageTables(FMT, memory, frames.alloc)


def test_violation_qualification_ands_the_rights_of_the_entries_used() -> None:
    memory, tables = ept_tree()
    tables.map(0x20_0000, 0x80_0000, 4096, r=1, w=0, x=1, mt=6)
    record = walk(
        FMT,
        tables.root,
        0x20_0010,
        Access(AccessKind.WRITE),
        PhysicalTables(memory),
        EptAccessRules(),
    )
    assert record.fault is not None and record.fault.kind is FaultKind.PERMISSION
    qual = ept_violation_qualification(record, final=True)
    assert qual == 0b010 | 0b101 << 3 | 1 << 7 | 1 << 8
    missing = walk(
        FMT,
        tables.root,
        0x40_0000,
        Access(AccessKind.READ),
        PhysicalTables(memory),
        EptAccessRules(),
    )
    assert ept_violation_qualification(missing, final=True) == 0b001 | 1 << 7 | 1 << 8


def test_misconfigured_entry_on_a_walk_is_a_misconfiguration_not_a_violation() -> None:
    memory, tables = ept_tree()
    tables.map(0x20_0000, 0x80_0000, 4096, r=1, w=1, x=1, mt=6)
    slot = tables.find_leaf(0x20_0000)
    assert slot is not None
    memory.write_u64(slot[0], 0x80_0000 | 0b110)
    record = walk(
        FMT,
        tables.root,
        0x20_0000,
        Access(AccessKind.READ),
        PhysicalTables(memory),
        EptAccessRules(),
    )
    assert is_misconfiguration(record)


def test_eptp_encoding() -> None:
    eptp = tw.Eptp(0x12_3000, 4, True)
    assert eptp.value == 0x12_3000 | 1 << 6 | 3 << 3 | 6
    assert tw.Eptp.decode(eptp.value) == eptp


@pytest.mark.parametrize(
    ("value", "why"),
    [(0x1000 | 0b110, "X/W/R = 110"), (0x1000 | 0b111 | 2 << 3, "memory type 2")],
)
def test_decoded_ept_entry_says_why_it_is_misconfigured(value: int, why: str) -> None:
    from twodwalk.views.text import describe_entry

    fmt = tw.ept_format(4, tw.CpuModel(maxphyaddr=46), True)
    entry = fmt.decode(value, 1)
    assert entry.misconfiguration is not None and why in entry.misconfiguration
    assert describe_entry(entry).splitlines()[-1].startswith("  misconfigured: ")
    assert fmt.decode(0x1000 | 0b111 | 6 << 3, 1).misconfiguration is None
    assert fmt.decode(0, 1).misconfiguration is None, "not present: nothing to misconfigure"
