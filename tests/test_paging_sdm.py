"""Hand-computed cases of IA-32e paging, one per rule of SDM Vol 3A ch. 4.

Each case builds real tables in simulated memory, walks them, and checks the outcome, the #PF
error code and CR2, and the A/D bits written back, against values worked out by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

import twodwalk as tw
from twodwalk.engine.walker import FaultKind

GIB = 1 << 30
MIB2 = 2 << 20
USER_VA = 0x0000_7F00_1234_5000
KERNEL_VA = 0xFFFF_8880_0010_0000


@dataclass
class Box:
    """A native machine: memory, a frame allocator and one tree of page tables."""

    cpu: tw.CpuModel = field(default_factory=lambda: tw.CpuModel(maxphyaddr=48))
    levels: int = 4
    nxe: bool = True

    def __post_init__(self) -> None:
        self.memory = tw.PhysicalMemory(self.cpu.maxphyaddr)
        self.frames = tw.FrameAllocator(self.memory, 0x10_0000, 0x100_0000)
        self.fmt = tw.ia32e_format(self.levels, self.cpu, self.nxe)
        self.tables = tw.PageTables(self.fmt, self.memory, self.frames.alloc)

    def access(self, va: int, kind: str, cpl: int = 0, **controls: bool | int) -> tw.WalkRecord:
        ctl = tw.PagingControls(cr4_la57=self.levels == 5, efer_nxe=self.nxe, **controls)  # type: ignore[arg-type]
        return tw.translate(
            self.memory, self.tables.root, va, kind, cpl=cpl, controls=ctl, cpu=self.cpu
        )

    def error_code(self, va: int, kind: str, cpl: int = 0, **controls: bool | int) -> int:
        record = self.access(va, kind, cpl, **controls)
        exc = tw.exception_for(record, tw.PagingControls(efer_nxe=self.nxe, **controls))  # type: ignore[arg-type]
        assert isinstance(exc, tw.PageFault), f"expected #PF, got {record.outcome}"
        assert exc.vector == 14
        assert exc.cr2 == va
        return exc.error_code

    def leaf_address(self, va: int) -> int:
        record = self.access(va, "read")
        return record.steps[-1].entry_address

    def table_values(self) -> list[int]:
        return [e.value for e in self.tables.entries()]


def test_supervisor_read_sets_accessed_at_every_level_and_no_dirty() -> None:
    box = Box()
    box.tables.map(KERNEL_VA, 0x20_0000, 4096, rw=1)
    record = box.access(KERNEL_VA + 0x10, "read")
    assert record.translation is not None
    assert record.translation.address == 0x20_0010
    assert len(record.steps) == 4
    for step in record.steps:
        now = box.memory.read_u64(step.entry_address)
        assert now == step.value | 1 << 5, f"A set at level {step.level}"
        assert not now >> 6 & 1 or step.level != 1


def test_write_sets_dirty_on_the_leaf_only() -> None:
    box = Box()
    box.tables.map(KERNEL_VA, 0x20_0000, 4096, rw=1)
    record = box.access(KERNEL_VA, "write")
    assert record.translation is not None
    values = [box.memory.read_u64(s.entry_address) for s in record.steps]
    assert [v >> 6 & 1 for v in values] == [0, 0, 0, 1]
    assert all(v >> 5 & 1 for v in values)


def test_entry_addresses_are_table_plus_eight_times_index() -> None:
    box = Box()
    box.tables.map(USER_VA, 0x30_0000, 4096, rw=1, us=1)
    record = box.access(USER_VA + 0xABC, "read", cpl=3)
    table = box.tables.root
    for step, (level, low) in zip(record.steps, [(4, 39), (3, 30), (2, 21), (1, 12)], strict=True):
        index = (USER_VA >> low) & 0x1FF
        assert (step.level, step.table, step.index) == (level, table, index)
        assert step.entry_address == table + 8 * index
        table = box.memory.read_u64(step.entry_address) & ((1 << 48) - 1) & ~0xFFF


@pytest.mark.parametrize(("kind", "code"), [("read", 0), ("write", 2)])
def test_not_present_pte(kind: str, code: int) -> None:
    box = Box()
    box.tables.map(KERNEL_VA, 0x20_0000, 4096, rw=1)
    box.tables.unmap(KERNEL_VA, 4096)
    before = box.table_values()
    assert box.error_code(KERNEL_VA + 0x123, kind) == code
    record = box.access(KERNEL_VA + 0x123, kind)
    assert record.fault is not None
    assert (record.fault.kind, record.fault.level) == (FaultKind.NOT_PRESENT, 1)
    assert box.table_values() == before, "a faulting walk sets no A bit"


def test_user_read_of_supervisor_page() -> None:
    box = Box()
    box.tables.map(USER_VA, 0x20_0000, 4096, rw=1, us=0)
    assert box.error_code(USER_VA, "read", cpl=3) == 5


def test_user_flag_must_be_set_at_every_level() -> None:
    box = Box()
    box.tables.map(USER_VA, 0x20_0000, 4096, rw=1, us=1)
    pde = box.access(USER_VA, "read").steps[2].entry_address
    box.memory.write_u64(pde, box.memory.read_u64(pde) & ~4)
    assert box.error_code(USER_VA, "read", cpl=3) == 5
    assert box.access(USER_VA, "read", cpl=0).translation is not None


def test_user_write_to_read_only_user_page() -> None:
    box = Box()
    box.tables.map(USER_VA, 0x20_0000, 4096, rw=0, us=1)
    assert box.error_code(USER_VA, "write", cpl=3) == 7
    assert box.error_code(USER_VA, "write", cpl=3, cr0_wp=False) == 7


def test_supervisor_write_to_read_only_page_depends_on_wp() -> None:
    box = Box()
    box.tables.map(KERNEL_VA, 0x20_0000, 4096, rw=0)
    ok = box.access(KERNEL_VA, "write", cr0_wp=False)
    assert ok.translation is not None
    assert box.memory.read_u64(ok.steps[-1].entry_address) >> 6 & 1, "D set on the write"
    assert box.error_code(KERNEL_VA, "write", cr0_wp=True) == 3


def test_reserved_bit_above_maxphyaddr() -> None:
    box = Box()
    box.tables.map(KERNEL_VA, 0x20_0000, 4096, rw=1)
    pte = box.leaf_address(KERNEL_VA)
    box.memory.write_u64(pte, box.memory.read_u64(pte) | 1 << 51)
    assert box.error_code(KERNEL_VA, "read") == 9
    assert box.error_code(KERNEL_VA, "write", cpl=3) == 0xF
    record = box.access(KERNEL_VA, "read")
    assert record.fault is not None and record.fault.kind is FaultKind.RESERVED


def test_bit_51_is_an_address_bit_with_maxphyaddr_52() -> None:
    box = Box(cpu=tw.CpuModel(maxphyaddr=52))
    box.tables.map(KERNEL_VA, 1 << 51, 4096, rw=1)
    record = box.access(KERNEL_VA + 8, "read")
    assert record.translation is not None and record.translation.address == (1 << 51) + 8


def test_reserved_bit_in_an_upper_level_stops_there() -> None:
    box = Box()
    box.tables.map(KERNEL_VA, 0x20_0000, 4096, rw=1)
    pml4e = box.access(KERNEL_VA, "read").steps[0].entry_address
    box.memory.write_u64(pml4e, box.memory.read_u64(pml4e) | 1 << 7)
    record = box.access(KERNEL_VA, "read")
    assert record.fault is not None
    assert (record.fault.kind, record.fault.level, len(record.steps)) == (FaultKind.RESERVED, 4, 1)
    assert box.error_code(KERNEL_VA, "read") == 9


def test_xd_fetch_with_nxe() -> None:
    box = Box()
    box.tables.map(KERNEL_VA, 0x20_0000, 4096, rw=1, xd=1)
    assert box.error_code(KERNEL_VA, "fetch") == 0x11
    assert box.access(KERNEL_VA, "read").translation is not None


def test_xd_at_an_upper_level_disables_fetch_below() -> None:
    box = Box()
    box.tables.map(KERNEL_VA, 0x20_0000, 4096, rw=1)
    pdpte = box.access(KERNEL_VA, "read").steps[1].entry_address
    box.memory.write_u64(pdpte, box.memory.read_u64(pdpte) | 1 << 63)
    assert box.error_code(KERNEL_VA, "fetch") == 0x11


def test_bit_63_is_reserved_without_nxe_and_fetch_reports_no_id_bit() -> None:
    box = Box(nxe=False)
    box.tables.map(KERNEL_VA, 0x20_0000, 4096, rw=1)
    pte = box.leaf_address(KERNEL_VA)
    box.memory.write_u64(pte, box.memory.read_u64(pte) | 1 << 63)
    assert box.error_code(KERNEL_VA, "read") == 9
    assert box.error_code(KERNEL_VA, "fetch") == 9, "I/D needs NXE or SMEP"
    assert box.error_code(KERNEL_VA, "fetch", cr4_smep=True) == 0x19


def test_fetch_from_not_present_reports_id_only_with_nxe_or_smep() -> None:
    box = Box(nxe=False)
    assert box.error_code(KERNEL_VA, "fetch") == 0
    assert box.error_code(KERNEL_VA, "fetch", cr4_smep=True) == 0x10
    assert Box(nxe=True).error_code(KERNEL_VA, "fetch") == 0x10


def test_smep_fetch_from_user_page_at_cpl0() -> None:
    box = Box()
    box.tables.map(USER_VA, 0x20_0000, 4096, rw=1, us=1)
    assert box.error_code(USER_VA, "fetch", cr4_smep=True) == 0x11
    assert box.access(USER_VA, "fetch", cr4_smep=False).translation is not None
    assert box.access(USER_VA, "fetch", cpl=3, cr4_smep=True).translation is not None


def test_smap_read_of_user_page_at_cpl0() -> None:
    box = Box()
    box.tables.map(USER_VA, 0x20_0000, 4096, rw=1, us=1)
    assert box.error_code(USER_VA, "read", cr4_smap=True, rflags_ac=False) == 1
    assert box.access(USER_VA, "read", cr4_smap=True, rflags_ac=True).translation is not None
    assert box.error_code(USER_VA, "write", cr4_smap=True) == 3
    smap_fetch = box.access(USER_VA, "fetch", cr4_smap=True)
    assert smap_fetch.translation is not None, "SMAP never applies to fetches"


def test_smap_implicit_supervisor_access_ignores_ac() -> None:
    box = Box()
    box.tables.map(USER_VA, 0x20_0000, 4096, rw=1, us=1)
    ctl = tw.PagingControls(cr4_smap=True, rflags_ac=True)
    record = tw.translate(
        box.memory, box.tables.root, USER_VA, "read", cpl=3, controls=ctl, implicit=True
    )
    exc = tw.exception_for(record, ctl)
    assert isinstance(exc, tw.PageFault) and exc.error_code == 1, "implicit: U/S bit clear"


def test_non_canonical_address_is_gp0_without_a_walk() -> None:
    box = Box()
    record = box.access(0x0000_8000_0000_0000, "read")
    assert record.steps == ()
    assert record.fault is not None and record.fault.kind is FaultKind.NON_CANONICAL
    exc = tw.exception_for(record, tw.PagingControls())
    assert isinstance(exc, tw.GeneralProtection)
    assert (exc.vector, exc.error_code) == (13, 0)


def test_five_level_canonical_boundary_and_depth() -> None:
    box = Box(levels=5)
    va = 0x00FF_0000_0000_0000
    box.tables.map(va, 0x20_0000, 4096, rw=1)
    record = box.access(va + 0x40, "read")
    assert [s.level for s in record.steps] == [5, 4, 3, 2, 1]
    assert record.translation is not None and record.translation.address == 0x20_0040
    assert box.access(0x0100_0000_0000_0000, "read").fault is not None
    assert Box(levels=4).access(va, "read").fault is not None


def test_2mib_page_keeps_21_offset_bits() -> None:
    box = Box()
    box.tables.map(KERNEL_VA & ~(MIB2 - 1), 0x4000_0000, MIB2, page_size=MIB2, rw=1)
    va = (KERNEL_VA & ~(MIB2 - 1)) + 0x1A_BCDE
    record = box.access(va, "read")
    assert record.translation is not None
    assert record.translation.address == 0x4000_0000 + 0x1A_BCDE
    assert (record.translation.page_size, record.translation.level) == (MIB2, 2)
    assert len(record.steps) == 3


def test_1gib_page_keeps_30_offset_bits() -> None:
    box = Box()
    base = 0x0000_0040_0000_0000
    box.tables.map(base, 3 * GIB, GIB, page_size=GIB, rw=1)
    record = box.access(base + 0x2ABC_DEF8, "write")
    assert record.translation is not None
    assert record.translation.address == 3 * GIB + 0x2ABC_DEF8
    assert len(record.steps) == 2
    assert box.memory.read_u64(record.steps[-1].entry_address) >> 6 & 1


def test_reserved_bits_inside_large_page_address_field() -> None:
    box = Box()
    base = KERNEL_VA & ~(MIB2 - 1)
    box.tables.map(base, 0x4000_0000, MIB2, page_size=MIB2, rw=1)
    pde = box.access(base, "read").steps[-1].entry_address
    box.memory.write_u64(pde, box.memory.read_u64(pde) | 1 << 13)
    assert box.error_code(base, "read") == 9
    box.memory.write_u64(pde, (box.memory.read_u64(pde) & ~(1 << 13)) | 1 << 12)
    assert box.access(base, "read").translation is not None, "bit 12 is PAT in a 2 MiB leaf"


def test_ps_in_pdpte_without_1gib_pages_is_reserved() -> None:
    cpu = tw.CpuModel(maxphyaddr=48, gbpages=False)
    box = Box(cpu=cpu)
    base = 0x0000_0040_0000_0000
    box.tables.map(base, 0x20_0000, 4096, rw=1)
    pdpte = box.access(base, "read").steps[1].entry_address
    box.memory.write_u64(pdpte, 3 * GIB | 0x83)
    assert box.error_code(base, "read") == 9
    with_gb = Box()
    with_gb.tables.map(base, 0x20_0000, 4096, rw=1)
    with_gb.memory.write_u64(pdpte, 3 * GIB | 0x83)
    assert with_gb.access(base, "read").translation is not None


@pytest.mark.parametrize(
    ("pkru", "kind", "cpl", "wp", "code"),
    [
        (0b01 << 6, "read", 3, True, 0x25),  # AD for key 3 blocks a user read
        (0b01 << 6, "read", 0, True, 0x21),  # ... and a supervisor read of a user page
        (0b10 << 6, "write", 3, True, 0x27),  # WD blocks a user write
        (0b10 << 6, "write", 0, True, 0x23),  # WD blocks a supervisor write when WP=1
        (0b10 << 6, "write", 0, False, None),  # ... but not when WP=0
        (0b10 << 6, "read", 3, True, None),  # WD does not block reads
        (0b11 << 6, "fetch", 3, True, None),  # keys never apply to fetches
        (0b11 << 4, "read", 3, True, None),  # another key's bits do not matter
    ],
)
def test_protection_keys(pkru: int, kind: str, cpl: int, wp: bool, code: int | None) -> None:
    box = Box()
    box.tables.map(USER_VA, 0x20_0000, 4096, rw=1, us=1, pk=3)
    controls = {"cr4_pke": True, "pkru": pkru, "cr0_wp": wp}
    if code is None:
        assert box.access(USER_VA, kind, cpl, **controls).translation is not None
    else:
        assert box.error_code(USER_VA, kind, cpl, **controls) == code


def test_protection_key_and_rights_violation_together() -> None:
    box = Box()
    box.tables.map(USER_VA, 0x20_0000, 4096, rw=0, us=1, pk=1)
    assert box.error_code(USER_VA, "write", 3, cr4_pke=True, pkru=0b11 << 2) == 0x27


def test_keys_do_not_apply_to_supervisor_pages() -> None:
    box = Box()
    box.tables.map(KERNEL_VA, 0x20_0000, 4096, rw=1, pk=2)
    assert box.access(KERNEL_VA, "write", cr4_pke=True, pkru=0xFFFF_FFFF).translation is not None


def test_cr3_low_bits_are_decoded_not_rejected() -> None:
    cpu = tw.CpuModel(maxphyaddr=48)
    cr3 = tw.decode_cr3(0x1234_5000 | 0x18, cpu)
    assert (cr3.root, cr3.pwt, cr3.pcd, cr3.pcid) == (0x1234_5000, True, True, None)
    with_pcid = tw.decode_cr3(1 << 63 | 0x1234_5000 | 0xABC, cpu, pcide=True)
    assert (with_pcid.root, with_pcid.pcid) == (0x1234_5000, 0xABC)
    box = Box()
    box.tables.map(KERNEL_VA, 0x20_0000, 4096, rw=1)
    ctl = tw.PagingControls()
    record = tw.translate(box.memory, box.tables.root | 0x18, KERNEL_VA, "read", controls=ctl)
    assert record.translation is not None and record.root == box.tables.root
