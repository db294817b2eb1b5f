"""Bad input gets one clear TwodwalkError naming the field and the value, never a traceback
from deep inside the engine (KeyError, IndexError, struct.error, TypeError...)."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from twodwalk import (
    PAGE_SIZE,
    Access,
    AccessKind,
    AddressError,
    CpuModel,
    FrameAllocator,
    PageTables,
    PagingControls,
    PhysicalMemory,
    PhysicalTables,
    TwodwalkError,
    X86AccessRules,
    decode_cr3,
    ia32e_format,
    translate,
    walk,
)
from twodwalk.engine.formats import Ia32eFormat

MIB2 = 1 << 21
GIB = 1 << 30


def new_tables(
    cpu: CpuModel | None = None, la57: bool = False
) -> tuple[PhysicalMemory, PageTables]:
    cpu = cpu or CpuModel()
    memory = PhysicalMemory(cpu.maxphyaddr)
    allocator = FrameAllocator(memory, 0x10_0000, 0x20_0000)
    fmt = PagingControls(cr4_la57=la57).format(cpu)
    return memory, PageTables(fmt, memory, allocator.alloc)


def snapshot(memory: PhysicalMemory) -> dict[int, bytes]:
    return {frame: memory.read(frame, PAGE_SIZE) for frame in memory.touched_frames()}


# --- addresses handed to translate / walk -----------------------------------------------------


@pytest.mark.parametrize(
    ("address", "shown"),
    [(-1, "-0x1"), (-(1 << 63), "-0x8000000000000000"), (1 << 64, "0x10000000000000000")],
)
def test_translate_rejects_addresses_outside_64_bits(address: int, shown: str) -> None:
    memory, tables = new_tables()
    pattern = rf"address={shown} is out of range: valid is 0 <= address < 2\*\*64"
    with pytest.raises(AddressError, match=pattern):
        translate(memory, tables.root, address, "read")


@pytest.mark.parametrize("address", [-1, 1 << 64, (1 << 64) + PAGE_SIZE])
def test_walk_rejects_addresses_outside_64_bits(address: int) -> None:
    memory, tables = new_tables()
    with pytest.raises(AddressError, match=re.escape(f"address={address:#x} is out of range")):
        walk(
            tables.fmt,
            tables.root,
            address,
            Access.of("read"),
            PhysicalTables(memory),
            X86AccessRules(PagingControls()),
        )


@pytest.mark.parametrize("address", [1.5, "0x1000", None, True])
def test_translate_rejects_non_integer_addresses(address: object) -> None:
    memory, tables = new_tables()
    with pytest.raises(TwodwalkError, match="address must be an integer"):
        translate(memory, tables.root, address, "read")  # type: ignore[arg-type]


@pytest.mark.parametrize("root", [0x1008, 0x1001, 0x10_0800])
def test_walk_rejects_unaligned_root(root: int) -> None:
    memory, tables = new_tables()
    with pytest.raises(AddressError, match=rf"root={root:#x} is not aligned.*multiple of 0x1000"):
        walk(
            tables.fmt,
            root,
            0,
            Access.of("read"),
            PhysicalTables(memory),
            X86AccessRules(PagingControls()),
        )


def test_walk_rejects_root_above_maxphyaddr() -> None:
    memory, tables = new_tables()
    with pytest.raises(AddressError, match=r"root=0x400000000000 is out of range"):
        walk(
            tables.fmt,
            1 << 46,
            0,
            Access.of("read"),
            PhysicalTables(memory),
            X86AccessRules(PagingControls()),
        )


@pytest.mark.parametrize(
    ("root", "pattern"),
    [
        (0x1008, r"root=0x1008 is not aligned.*multiple of 0x1000"),
        (0x2800, r"root=0x2800 is not aligned"),
        (-PAGE_SIZE, r"root=-0x1000 is out of range"),
        (1 << 46, r"root=0x400000000000 is out of range"),
    ],
)
def test_page_tables_reject_bad_root(root: int, pattern: str) -> None:
    memory = PhysicalMemory(46)
    allocator = FrameAllocator(memory, 0x10_0000, 0x20_0000)
    fmt = PagingControls().format(CpuModel())
    with pytest.raises(AddressError, match=pattern):
        PageTables(fmt, memory, allocator.alloc, root=root)


# --- PageTables.map arguments -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("virtual", "physical", "size", "page_size", "pattern"),
    [
        (0x1234, 0x5000, PAGE_SIZE, PAGE_SIZE, r"virtual=0x1234 is not aligned.*0x1000"),
        (0x1000, 0x5010, PAGE_SIZE, PAGE_SIZE, r"physical=0x5010 is not aligned.*0x1000"),
        (0x1000, 0x5000, 0x1800, PAGE_SIZE, r"size=0x1800 is not aligned.*0x1000"),
        (0x1000, 0x40_0000, MIB2, MIB2, r"virtual=0x1000 is not aligned.*0x200000"),
        (MIB2, 0x1000, MIB2, MIB2, r"physical=0x1000 is not aligned.*0x200000"),
        (MIB2, 0, PAGE_SIZE, MIB2, r"size=0x1000 is not aligned.*0x200000"),
        (GIB, MIB2, GIB, GIB, r"physical=0x200000 is not aligned.*0x40000000 \(low 30 bits"),
    ],
)
def test_map_rejects_unaligned_arguments(
    virtual: int, physical: int, size: int, page_size: int, pattern: str
) -> None:
    memory, tables = new_tables()
    before = snapshot(memory)
    with pytest.raises(AddressError, match=pattern):
        tables.map(virtual, physical, size, page_size=page_size, rw=1)
    assert snapshot(memory) == before


@pytest.mark.parametrize(
    ("virtual", "physical", "size", "pattern"),
    [
        (-PAGE_SIZE, 0, PAGE_SIZE, r"virtual=-0x1000 is out of range"),
        (0x1000, -PAGE_SIZE, PAGE_SIZE, r"physical=-0x1000 is out of range"),
        (0x1000, 1 << 46, PAGE_SIZE, r"physical=0x400000000000 is out of range"),
        (0x1000, (1 << 46) - PAGE_SIZE, 2 * PAGE_SIZE, r"physical \+ size=0x400000001000"),
        (0x1000, 0, 0, r"size=0x0 is out of range: valid is a positive number of bytes"),
        (0x8000_0000_0000, 0, PAGE_SIZE, r"virtual: 0x800000000000 is not canonical"),
        (0x7FFF_FFFF_F000, 0, 2 * PAGE_SIZE, r"virtual \+ size = 0x800000001000 runs past"),
        (0xFFFF_FFFF_FFFF_F000, 0, 2 * PAGE_SIZE, r"virtual \+ size = 0x10000000000001000"),
    ],
)
def test_map_rejects_out_of_range_arguments(
    virtual: int, physical: int, size: int, pattern: str
) -> None:
    memory, tables = new_tables()
    with pytest.raises(AddressError, match=pattern):
        tables.map(virtual, physical, size)
    assert list(memory.touched_frames()) == []


@pytest.mark.parametrize("page_size", [8192, 0, 512 * GIB, 4095, "4k", None])
def test_map_rejects_unsupported_page_size(page_size: object) -> None:
    _, tables = new_tables()
    pattern = re.escape(
        f"page_size={page_size!r} is not supported here: valid are 0x1000, 0x200000, 0x40000000"
    )
    with pytest.raises(TwodwalkError, match=pattern):
        tables.map(0, 0, GIB, page_size=page_size)  # type: ignore[arg-type]


def test_map_rejects_1gib_pages_without_gbpages() -> None:
    _, tables = new_tables(CpuModel(gbpages=False))
    pattern = r"page_size=1073741824 is not supported here: valid are 0x1000, 0x200000$"
    with pytest.raises(TwodwalkError, match=pattern):
        tables.map(GIB, GIB, GIB, page_size=GIB, rw=1)
    tables.map(GIB, GIB, MIB2, page_size=MIB2, rw=1)  # 2 MiB pages are still fine


@pytest.mark.parametrize(
    ("fields", "pattern"),
    [
        ({"nx": 1}, r"has no field 'nx': its fields are p, rw, us, .*, xd"),
        ({"rw": 2}, r"rw=0x2 is out of range: valid is 0\.\.1"),
        ({"pk": 16}, r"pk=0x10 is out of range: valid is 0\.\.15"),
    ],
)
def test_map_rejects_bad_leaf_fields(fields: dict[str, int], pattern: str) -> None:
    memory, tables = new_tables()
    before = snapshot(memory)
    with pytest.raises(TwodwalkError, match=pattern):
        tables.map(0x1000, 0x5000, PAGE_SIZE, **fields)
    assert snapshot(memory) == before


@pytest.mark.parametrize("key", ["address", "level"])
def test_map_rejects_fields_that_clash_with_its_own_arguments(key: str) -> None:
    _, tables = new_tables()
    with pytest.raises(TwodwalkError, match=key):
        tables.map(0x1000, 0x5000, PAGE_SIZE, **{key: 0x5000})


# --- access kinds, CPL, controls ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["exec", "execute", "READ", "", 3, None, 1.0])
def test_translate_rejects_unknown_access_kinds(kind: object) -> None:
    memory, tables = new_tables()
    pattern = re.escape(f"kind={kind!r} is not valid: choose one of read, write, fetch")
    with pytest.raises(TwodwalkError, match=pattern):
        translate(memory, tables.root, 0x1000, kind)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["read", "write", "fetch", *AccessKind])
def test_translate_accepts_every_access_kind(kind: AccessKind | str) -> None:
    memory, tables = new_tables()
    assert translate(memory, tables.root, 0x1000, kind).fault is not None  # nothing mapped


@pytest.mark.parametrize(("cpl", "shown"), [(-1, "-0x1"), (4, "0x4"), (255, "0xff")])
def test_translate_rejects_cpl_outside_0_to_3(cpl: int, shown: str) -> None:
    memory, tables = new_tables()
    with pytest.raises(TwodwalkError, match=rf"cpl={shown} is out of range: valid is 0, 1, 2 or 3"):
        translate(memory, tables.root, 0x1000, "read", cpl=cpl)


@pytest.mark.parametrize("cpl", [True, 3.0, "3", None])
def test_translate_rejects_non_integer_cpl(cpl: object) -> None:
    memory, tables = new_tables()
    with pytest.raises(TwodwalkError, match="cpl must be an integer"):
        translate(memory, tables.root, 0x1000, "read", cpl=cpl)  # type: ignore[arg-type]


@pytest.mark.parametrize("pkru", [-1, 1 << 32])
def test_controls_reject_pkru_outside_32_bits(pkru: int) -> None:
    with pytest.raises(TwodwalkError, match=re.escape(f"pkru={pkru:#x} is out of range")):
        PagingControls(pkru=pkru)


# --- entry encoding -----------------------------------------------------------------------------


def test_encode_rejects_unknown_field_listing_the_valid_ones() -> None:
    fmt = PagingControls().format(CpuModel())
    pte_fields = "p, rw, us, pwt, pcd, a, d, pat, g, avl, address, pk, xd"
    with pytest.raises(
        TwodwalkError, match=rf"PTE .* has no field 'nx': its fields are {pte_fields}$"
    ):
        fmt.encode(1, True, nx=1)
    pml4e_fields = "p, rw, us, pwt, pcd, a, ps, avl, address, xd"
    with pytest.raises(
        TwodwalkError, match=rf"PML4E .* no field 'g': its fields are {pml4e_fields}$"
    ):
        fmt.encode(4, False, g=1)


@pytest.mark.parametrize(
    ("level", "fields", "pattern"),
    [
        (1, {"rw": 2}, r"rw=0x2 is out of range: valid is 0\.\.1"),
        (1, {"rw": -1}, r"rw=-0x1 is out of range: valid is 0\.\.1"),
        (1, {"pk": 16}, r"pk=0x10 is out of range: valid is 0\.\.15"),
        (1, {"address": 1 << 46}, r"address=0x400000000000 does not fit bits 45:12"),
        (1, {"address": 0x1234}, r"address=0x1234 is not aligned.*0x1000"),
        (1, {"address": -PAGE_SIZE}, r"address=-0x1000 is out of range"),
        (2, {"address": 0x1000}, r"address=0x1000 is not aligned.*0x200000"),
        (3, {"address": MIB2}, r"address=0x200000 is not aligned.*0x40000000"),
    ],
)
def test_encode_rejects_values_that_do_not_fit(
    level: int, fields: dict[str, int], pattern: str
) -> None:
    fmt = PagingControls().format(CpuModel())
    with pytest.raises(TwodwalkError, match=pattern):
        fmt.encode(level, True, **fields)


@pytest.mark.parametrize("value", [True, 1.0, "1", None])
def test_encode_rejects_non_integer_field_values(value: object) -> None:
    fmt = PagingControls().format(CpuModel())
    with pytest.raises(TwodwalkError, match="rw must be an integer"):
        fmt.encode(1, True, rw=value)  # type: ignore[arg-type]


def test_encode_rejects_bad_levels() -> None:
    fmt = PagingControls().format(CpuModel())
    with pytest.raises(TwodwalkError, match=r"level=4 cannot hold a leaf in IA-32e 4-level"):
        fmt.encode(4, True)
    with pytest.raises(TwodwalkError, match=r"level=0x0 is out of range: valid is 1\.\.4"):
        fmt.encode(0, False)
    with pytest.raises(TwodwalkError, match=r"level=0x5 is out of range: valid is 1\.\.4"):
        fmt.decode(0, 5)


@pytest.mark.parametrize("levels", [3, 6])
def test_format_rejects_other_depths(levels: int) -> None:
    with pytest.raises(TwodwalkError, match=rf"levels='{levels}' is not valid: choose one of 4, 5"):
        Ia32eFormat(levels, 46, True, True)


# --- CPU model, CR3, 5-level paging ---------------------------------------------------------


@pytest.mark.parametrize("maxphyaddr", [60, 35, 53, 0, -1])
def test_cpu_model_rejects_impossible_maxphyaddr(maxphyaddr: int) -> None:
    pattern = rf"maxphyaddr={maxphyaddr} is not valid: x86-64 processors report 36\.\.52"
    with pytest.raises(TwodwalkError, match=pattern):
        CpuModel(maxphyaddr=maxphyaddr)


@pytest.mark.parametrize("maxphyaddr", ["46", 46.0, None])
def test_cpu_model_rejects_non_integer_maxphyaddr(maxphyaddr: object) -> None:
    with pytest.raises(TwodwalkError, match="maxphyaddr must be an integer"):
        CpuModel(maxphyaddr=maxphyaddr)  # type: ignore[arg-type]


@pytest.mark.parametrize("cr3", [1 << 46, 1 << 51, 1 << 63, (1 << 46) | 0x1000])
def test_cr3_with_bits_above_maxphyaddr_is_rejected(cr3: int) -> None:
    memory, _ = new_tables()
    pattern = re.escape(f"cr3={cr3:#x} sets bits above MAXPHYADDR (46)")
    with pytest.raises(TwodwalkError, match=pattern):
        translate(memory, cr3, 0, "read")
    with pytest.raises(TwodwalkError, match=pattern):
        decode_cr3(cr3, CpuModel(46))


@pytest.mark.parametrize("cr3", [-1, 1 << 64])
def test_cr3_outside_64_bits_is_rejected(cr3: int) -> None:
    with pytest.raises(TwodwalkError, match=re.escape(f"cr3={cr3:#x} is out of range")):
        decode_cr3(cr3, CpuModel())


def test_5_level_paging_needs_la57() -> None:
    cpu = CpuModel(la57=False)
    memory = PhysicalMemory(46)
    with pytest.raises(TwodwalkError, match=r"cr4_la57=True needs a CPU model with la57=True"):
        translate(memory, 0x1000, 0, "read", controls=PagingControls(cr4_la57=True), cpu=cpu)
    with pytest.raises(TwodwalkError, match=r"levels=5 needs a CPU model with la57=True"):
        ia32e_format(5, cpu)
    with pytest.raises(TwodwalkError, match=r"levels=5 needs a CPU model with la57=True"):
        PagingControls(cr4_la57=True).format(cpu)
    assert ia32e_format(4, cpu).levels == 4


# --- remapping, and unmap/protect of part of a page --------------------------------------------


def test_mapping_an_already_mapped_page_is_rejected() -> None:
    memory, tables = new_tables()
    tables.map(0x4000, 0x9000, 2 * PAGE_SIZE, rw=1)
    before = snapshot(memory)
    with pytest.raises(TwodwalkError, match=r"virtual=0x5000 is already mapped: unmap it first"):
        tables.map(0x5000, 0xA000, PAGE_SIZE)
    # A range whose first page is free but whose second is mapped maps nothing.
    with pytest.raises(TwodwalkError, match=r"virtual=0x4000 is already mapped"):
        tables.map(0x3000, 0xA000, 2 * PAGE_SIZE)
    assert snapshot(memory) == before


def test_mapping_inside_or_over_a_large_page_is_rejected() -> None:
    memory, tables = new_tables()
    tables.map(MIB2, 4 * MIB2, MIB2, page_size=MIB2, rw=1)
    tables.map(4 * MIB2, 0x1000, PAGE_SIZE)
    before = snapshot(memory)
    with pytest.raises(TwodwalkError, match=r"virtual=0x201000 lies in a 0x200000-byte page"):
        tables.map(MIB2 + PAGE_SIZE, 0x5000, PAGE_SIZE)
    with pytest.raises(TwodwalkError, match=r"virtual=0x200000 is already mapped"):
        tables.map(MIB2, 6 * MIB2, MIB2, page_size=MIB2)
    with pytest.raises(TwodwalkError, match=r"virtual=0x800000 is already mapped"):
        tables.map(4 * MIB2, 6 * MIB2, MIB2, page_size=MIB2)  # a page table is there
    assert snapshot(memory) == before


@pytest.mark.parametrize(
    ("virtual", "size", "page_at"),
    [
        (MIB2, PAGE_SIZE, MIB2),
        (MIB2 + PAGE_SIZE, MIB2 - PAGE_SIZE, MIB2),
        (MIB2 + PAGE_SIZE, MIB2, MIB2),
        (0, MIB2 + PAGE_SIZE, MIB2),
    ],
)
@pytest.mark.parametrize("operation", ["unmap", "protect"])
def test_unmap_or_protect_of_part_of_a_large_page_is_rejected(
    operation: str, virtual: int, size: int, page_at: int
) -> None:
    memory, tables = new_tables()
    tables.map(MIB2, 4 * MIB2, MIB2, page_size=MIB2, rw=1)
    before = snapshot(memory)
    pattern = re.escape(
        f"[{virtual:#x}, {virtual + size:#x}) covers part of a 0x200000-byte page at {page_at:#x}"
    )
    with pytest.raises(TwodwalkError, match=pattern):
        if operation == "unmap":
            tables.unmap(virtual, size)
        else:
            tables.protect(virtual, size, rw=0)
    assert snapshot(memory) == before


def test_protect_of_part_of_a_1gib_page_is_rejected() -> None:
    _, tables = new_tables()
    tables.map(GIB, 0, GIB, page_size=GIB)
    with pytest.raises(TwodwalkError, match=r"covers part of a 0x40000000-byte page at 0x40000000"):
        tables.protect(GIB, MIB2, xd=1)


def test_protect_rejects_unknown_fields() -> None:
    _, tables = new_tables()
    tables.map(MIB2, 0, MIB2, page_size=MIB2)
    with pytest.raises(TwodwalkError, match=r"PDE \(maps a 2-MByte page\) has no field 'nx'"):
        tables.protect(MIB2, MIB2, nx=1)


@pytest.mark.parametrize(
    "operation",
    [
        lambda tables: tables.unmap(PAGE_SIZE, MIB2),
        lambda tables: tables.protect(PAGE_SIZE, MIB2, rw=0),
    ],
    ids=["unmap", "protect"],
)
def test_rejected_unmap_or_protect_changes_nothing(
    operation: Callable[[PageTables], None],
) -> None:
    memory, tables = new_tables()
    tables.map(PAGE_SIZE, 0x5000, PAGE_SIZE, rw=1)
    tables.map(MIB2, 4 * MIB2, MIB2, page_size=MIB2, rw=1)
    before = snapshot(memory)
    with pytest.raises(TwodwalkError, match="covers part of a 0x200000-byte page"):
        operation(tables)
    assert snapshot(memory) == before
