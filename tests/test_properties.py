"""Property tests of the IA-32e walker, the page-table builder and the entry formats."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import event, given, settings
from hypothesis import strategies as st

from twodwalk import (
    PAGE_SIZE,
    AccessKind,
    CpuModel,
    FaultKind,
    FrameAllocator,
    GeneralProtection,
    PageFault,
    PageTables,
    PagingControls,
    PhysicalMemory,
    Rights,
    Translation,
    WalkFault,
    WalkRecord,
    exception_for,
    ia32e_format,
    translate,
)
from twodwalk.engine.formats import ept_format

A_BIT = 1 << 5
D_BIT = 1 << 6
PS_BIT = 1 << 7
U64 = st.integers(0, (1 << 64) - 1)
KINDS = st.sampled_from(list(AccessKind))
PAGE_SIZES = {1: PAGE_SIZE, 2: 1 << 21, 3: 1 << 30}


def sign_extend(address: int, width: int) -> int:
    if address >> (width - 1) & 1:
        return address | ((1 << 64) - (1 << width))
    return address


def canonical(width: int) -> st.SearchStrategy[int]:
    return st.integers(0, (1 << width) - 1).map(lambda a: sign_extend(a, width))


def snapshot(memory: PhysicalMemory) -> dict[int, bytes]:
    """Every byte the memory holds, frame by frame."""
    return {frame: memory.read(frame, PAGE_SIZE) for frame in memory.touched_frames()}


def controls_strategy(la57: bool) -> st.SearchStrategy[PagingControls]:
    return st.builds(
        PagingControls,
        cr0_wp=st.booleans(),
        cr4_la57=st.just(la57),
        cr4_smep=st.booleans(),
        cr4_smap=st.booleans(),
        cr4_pke=st.booleans(),
        efer_nxe=st.booleans(),
        rflags_ac=st.booleans(),
        pkru=st.integers(0, (1 << 32) - 1),
    )


# --- random entries never crash the walker ----------------------------------------------------


@dataclass(frozen=True)
class RandomChain:
    """A chain of one table per level at fixed frames, one entry each for the address."""

    maxphyaddr: int
    gbpages: bool
    controls: PagingControls
    address: int
    entries: tuple[tuple[int, str], ...]  # (random value, how to use it), root level first
    cr3_low: int
    kind: AccessKind
    cpl: int
    implicit: bool

    @property
    def levels(self) -> int:
        return self.controls.levels


# "raw": the value as drawn; "link": its address replaced by the next table's; "clean": linked,
# present and with no reserved bit set, so that walks often get deep or succeed.
CHAIN_MODES = st.sampled_from(["raw", "link", "clean", "clean", "clean", "clean", "clean"])


def table_at(level: int) -> int:
    return PAGE_SIZE * (6 - level)  # level 5 at 0x1000 ... level 1 at 0x5000


@st.composite
def random_chains(draw: st.DrawFn) -> RandomChain:
    la57 = draw(st.booleans())
    width = 57 if la57 else 48
    return RandomChain(
        maxphyaddr=draw(st.sampled_from([36, 40, 46, 52])),
        gbpages=draw(st.booleans()),
        controls=draw(controls_strategy(la57)),
        address=draw(st.one_of(canonical(width), canonical(48), U64)),
        entries=tuple(draw(st.tuples(U64, CHAIN_MODES)) for _ in range(5 if la57 else 4)),
        cr3_low=draw(st.integers(0, PAGE_SIZE - 1)),
        kind=draw(KINDS),
        cpl=draw(st.integers(0, 3)),
        implicit=draw(st.booleans()),
    )


def build_chain(chain: RandomChain) -> tuple[PhysicalMemory, CpuModel, dict[int, int]]:
    """Write the chain's entries; return the memory, the CPU and {entry address: value}."""
    memory = PhysicalMemory(chain.maxphyaddr)
    cpu = CpuModel(chain.maxphyaddr, gbpages=chain.gbpages, la57=True)
    fmt = chain.controls.format(cpu)
    written: dict[int, int] = {}
    address_bits = ((1 << 52) - 1) & ~(PAGE_SIZE - 1)
    for level, (raw, how) in zip(range(chain.levels, 0, -1), chain.entries, strict=True):
        value = raw
        if how != "raw" and level > 1:
            value = (raw & ~address_bits) | table_at(level - 1)
        if how == "clean":
            value |= 1
            value &= ~fmt.layout(level, bool(value & PS_BIT)).reserved
        slot = table_at(level) + 8 * fmt.index(chain.address, level)
        memory.write_u64(slot, value)
        written[slot] = value
    return memory, cpu, written


def check_exception(record: WalkRecord, controls: PagingControls, fault: WalkFault) -> None:
    exception = exception_for(record, controls)
    assert isinstance(exception, PageFault | GeneralProtection)
    if fault.kind is FaultKind.NON_CANONICAL:
        assert isinstance(exception, GeneralProtection)
        assert exception.error_code == 0
        assert record.steps == ()
        return
    assert isinstance(exception, PageFault)
    assert exception.cr2 == record.address
    assert bool(exception.error_code & 2) == record.access.is_write
    assert bool(exception.error_code & 4) == record.access.user
    assert bool(exception.error_code & 1) == (fault.kind is not FaultKind.NOT_PRESENT)
    assert bool(exception.error_code & 8) == (fault.kind is FaultKind.RESERVED)


def value_at(frames: dict[int, bytes], address: int) -> int:
    """The 8-byte little-endian entry at `address` in a `snapshot` (0 in an untouched frame)."""
    frame = frames.get(address & ~(PAGE_SIZE - 1), bytes(PAGE_SIZE))
    offset = address & (PAGE_SIZE - 1)
    return int.from_bytes(frame[offset : offset + 8], "little")


def maps_a_page(level: int, value: int) -> bool:
    """SDM Vol 3A 4.5.4: a PTE maps a page, and so does a PDE or PDPTE with PS (bit 7) = 1;
    any other entry of a walk references the next table."""
    return level == 1 or bool(value & PS_BIT)


@settings(max_examples=400)
@given(random_chains())
def test_random_entries_never_crash_the_walker(chain: RandomChain) -> None:
    """Any 8-byte values in the tables give a translation or a fault value, never an
    exception, and the A/D bits follow the SDM (Vol 3A 4.8) where it is definite: D is set
    only in the entry that maps the page (never in one that references a table), and a
    faulting walk leaves the A and D flags of the entry it stopped at as they were. Where the
    SDM leaves the choice to the processor (A flags of the upper levels on a faulting walk),
    the engine follows KVM's software walker (paging_tmpl.h `FNAME(walk_addr_generic)` calls
    `FNAME(update_accessed_dirty_bits)` only after the permission check passed), which
    tests/test_realkvm.py compares with a real CPU under KVM (`realkvm.paging_fuzz` reads
    back the A/D bits of every entry of the chain after each case, faulting ones included)."""
    memory, cpu, written = build_chain(chain)
    before = snapshot(memory)
    record = translate(
        memory,
        table_at(chain.levels) | chain.cr3_low,
        chain.address,
        chain.kind,
        cpl=chain.cpl,
        controls=chain.controls,
        cpu=cpu,
        implicit=chain.implicit,
    )
    assert isinstance(record, WalkRecord)
    assert isinstance(record.outcome, Translation | WalkFault)
    assert [step.level for step in record.steps] == list(
        range(chain.levels, chain.levels - len(record.steps), -1)
    )
    outcome = record.outcome
    event(outcome.kind.name if isinstance(outcome, WalkFault) else f"level-{outcome.level} page")
    # Hardware rule, every walk (SDM Vol 3A 4.8): D is set only in the entry that identifies
    # the final physical address; an entry that references a table never gets it.
    for step in record.steps:
        old = value_at(before, step.entry_address)
        if not maps_a_page(step.level, old):
            now = memory.read_u64(step.entry_address)
            assert now & D_BIT == old & D_BIT, f"D set in the level-{step.level} table entry"
    if isinstance(outcome, WalkFault):
        check_exception(record, chain.controls, outcome)
        if record.steps:
            # Hardware rule (SDM Vol 3A 4.8, 4.7): the faulting access did not happen, so the
            # entry the walk stopped at (the leaf on a protection fault) keeps its A and D.
            last = record.steps[-1]
            old = value_at(before, last.entry_address)
            now = memory.read_u64(last.entry_address)
            assert now & (A_BIT | D_BIT) == old & (A_BIT | D_BIT), (
                f"A/D of the level-{last.level} entry the faulting walk stopped at changed:"
                f" {old:#x} -> {now:#x}"
            )
        # The engine's choice, not an SDM rule: Vol 3A 4.8 lets a processor set A in the upper
        # levels of a walk that then faults. The engine sets no flag on a faulting walk, as
        # KVM's FNAME(walk_addr_generic) does (update_accessed_dirty_bits runs only after the
        # permission check), and realkvm.paging_fuzz checks that against real KVM.
        assert snapshot(memory) == before, "engine: a faulting walk writes no entry (as KVM)"
        return
    assert exception_for(record, chain.controls) is None
    assert 0 <= outcome.address < 1 << chain.maxphyaddr
    assert outcome.page_size == PAGE_SIZES[outcome.level]
    offset_mask = outcome.page_size - 1
    assert outcome.address & offset_mask == chain.address & offset_mask
    # A set in every entry used, D only in the leaf on a write; nothing else changes.
    for step in record.steps:
        expected = step.value | A_BIT
        if step is record.steps[-1] and record.access.is_write:
            expected |= D_BIT
        assert memory.read_u64(step.entry_address) == expected
        assert written[step.entry_address] == step.value


# --- map, then walk ---------------------------------------------------------------------------

LEAF_FLAGS = st.fixed_dictionaries(
    {},
    optional={
        "rw": st.integers(0, 1),
        "us": st.integers(0, 1),
        "pwt": st.integers(0, 1),
        "pcd": st.integers(0, 1),
        "a": st.integers(0, 1),
        "d": st.integers(0, 1),
        "g": st.integers(0, 1),
        "pat": st.integers(0, 1),
        "xd": st.integers(0, 1),
        "pk": st.integers(0, 15),
    },
)


@dataclass(frozen=True)
class Mapping:
    levels: int
    gbpages: bool
    maxphyaddr: int
    level: int
    virtual: int
    physical: int
    offset: int
    flags: dict[str, int]

    @property
    def page_size(self) -> int:
        return PAGE_SIZES[self.level]

    @property
    def cpu(self) -> CpuModel:
        return CpuModel(self.maxphyaddr, gbpages=self.gbpages, la57=True)

    @property
    def controls(self) -> PagingControls:
        return PagingControls(cr4_la57=self.levels == 5)


@st.composite
def mappings(draw: st.DrawFn, flags: st.SearchStrategy[dict[str, int]] = LEAF_FLAGS) -> Mapping:
    levels = draw(st.sampled_from([4, 5]))
    gbpages = draw(st.booleans())
    maxphyaddr = draw(st.sampled_from([36, 46, 52]))
    level = draw(st.sampled_from([1, 2, 3] if gbpages else [1, 2]))
    size = PAGE_SIZES[level]
    width = 12 + 9 * levels
    page = draw(st.integers(0, (1 << width) // size - 1))
    frame = draw(st.integers(0, (1 << maxphyaddr) // size - 1))
    return Mapping(
        levels=levels,
        gbpages=gbpages,
        maxphyaddr=maxphyaddr,
        level=level,
        virtual=sign_extend(page * size, width),
        physical=frame * size,
        offset=draw(st.integers(0, size - 1)),
        flags=draw(flags),
    )


def build(mapping: Mapping) -> tuple[PhysicalMemory, PageTables]:
    memory = PhysicalMemory(mapping.maxphyaddr)
    allocator = FrameAllocator(memory, 0x10_0000, 0x20_0000)
    tables = PageTables(mapping.controls.format(mapping.cpu), memory, allocator.alloc)
    tables.map(
        mapping.virtual,
        mapping.physical,
        mapping.page_size,
        page_size=mapping.page_size,
        **mapping.flags,
    )
    return memory, tables


def walk_mapping(
    mapping: Mapping,
    memory: PhysicalMemory,
    tables: PageTables,
    kind: AccessKind,
    address: int | None = None,
    cpl: int = 0,
    controls: PagingControls | None = None,
) -> WalkRecord:
    return translate(
        memory,
        tables.root,
        mapping.virtual + mapping.offset if address is None else address,
        kind,
        cpl=cpl,
        controls=controls or mapping.controls,
        cpu=mapping.cpu,
    )


@settings(max_examples=200)
@given(mappings())
def test_map_then_walk_translates_every_address_in_the_page(mapping: Mapping) -> None:
    memory, tables = build(mapping)
    record = walk_mapping(mapping, memory, tables, AccessKind.READ)
    flags = mapping.flags
    rights = Rights.R
    if flags.get("rw", 0):
        rights |= Rights.W
    if flags.get("us", 0):
        rights |= Rights.U
    if not flags.get("xd", 0):
        rights |= Rights.X
    assert record.outcome == Translation(
        mapping.physical + mapping.offset, mapping.page_size, mapping.level, rights
    )
    assert len(record.steps) == mapping.levels - mapping.level + 1
    leaf = record.steps[-1].entry
    assert leaf.leaf
    assert leaf["address"] == mapping.physical
    for key, value in flags.items():
        if key not in ("a", "d"):
            assert leaf[key] == value
    # The first and last byte of the page translate too.
    for offset in (0, mapping.page_size - 1):
        edge = walk_mapping(mapping, memory, tables, AccessKind.READ, mapping.virtual + offset)
        assert isinstance(edge.outcome, Translation)
        assert edge.outcome.address == mapping.physical + offset


@settings(max_examples=50)
@given(levels=st.sampled_from([4, 5]), data=st.data())
def test_many_4k_mappings_in_one_tree(levels: int, data: st.DataObject) -> None:
    cpu = CpuModel(46)
    controls = PagingControls(cr4_la57=levels == 5)
    memory = PhysicalMemory(46)
    allocator = FrameAllocator(memory, 0x10_0000, 0x20_0000)
    tables = PageTables(controls.format(cpu), memory, allocator.alloc)
    width = 12 + 9 * levels
    pages = data.draw(
        st.lists(
            st.tuples(st.integers(0, (1 << (width - 12)) - 1), st.integers(0, (1 << 34) - 1)),
            min_size=1,
            max_size=12,
            unique_by=lambda pair: pair[0],
        )
    )
    spread = [(sign_extend(vpn << 12, width), pfn << 12) for vpn, pfn in pages]
    for virtual, physical in spread:
        tables.map(virtual, physical, PAGE_SIZE, rw=1)
    for virtual, physical in spread:
        record = translate(
            memory, tables.root, virtual | 0xABC, "write", controls=controls, cpu=cpu
        )
        assert isinstance(record.outcome, Translation)
        assert record.outcome.address == physical | 0xABC
    leaves = {entry.virtual: entry.value for entry in tables.entries() if entry.leaf}
    assert sorted(leaves) == sorted(virtual for virtual, _ in spread)


# --- A/D bits -----------------------------------------------------------------------------------


def entry_values(tables: PageTables) -> dict[int, int]:
    return {entry.entry_address: entry.value for entry in tables.entries()}


WRITABLE = LEAF_FLAGS.map(lambda flags: {**flags, "rw": 1, "a": 0, "d": 0})


@settings(max_examples=100)
@given(mappings(WRITABLE), st.sampled_from(list(AccessKind)))
def test_walking_twice_gives_the_same_translation_and_sets_no_more_bits(
    mapping: Mapping, kind: AccessKind
) -> None:
    memory, tables = build(mapping)
    kind = AccessKind.READ if kind is AccessKind.FETCH and mapping.flags.get("xd") else kind
    before = entry_values(tables)
    first = walk_mapping(mapping, memory, tables, kind)
    assert isinstance(first.outcome, Translation)
    after_first = entry_values(tables)
    path = [step.entry_address for step in first.steps]
    expected = dict(before)
    for slot in path:
        expected[slot] |= A_BIT
    if kind is AccessKind.WRITE:
        expected[path[-1]] |= D_BIT
    assert after_first == expected
    for slot in path[:-1]:
        assert not after_first[slot] & D_BIT, "D is set only in the leaf"
    assert bool(after_first[path[-1]] & D_BIT) == (kind is AccessKind.WRITE)
    assert [step.written for step in first.steps] == [expected[slot] for slot in path]

    memory_after_first = snapshot(memory)
    second = walk_mapping(mapping, memory, tables, kind)
    assert second.outcome == first.outcome
    assert entry_values(tables) == after_first
    assert snapshot(memory) == memory_after_first
    assert all(step.written is None for step in second.steps)


@settings(max_examples=100)
@given(mappings(), st.data())
def test_faulting_walk_changes_no_entry(mapping: Mapping, data: st.DataObject) -> None:
    """The engine's choice on a faulting walk (not an SDM rule: Vol 3A 4.8 leaves A updates
    of the upper levels to the processor): no entry is written, as in KVM's software walker,
    where paging_tmpl.h `FNAME(walk_addr_generic)` calls `FNAME(update_accessed_dirty_bits)`
    only after the permission check. The hardware rules are in
    test_random_entries_never_crash_the_walker."""
    memory, tables = build(mapping)
    flags = mapping.flags
    user = bool(flags.get("us", 0))
    plain = mapping.controls
    la57 = plain.cr4_la57
    scenarios: list[tuple[AccessKind, int, PagingControls, int]] = [
        # Not present: the neighbouring page was never mapped.
        (AccessKind.READ, 0, plain, mapping.virtual ^ mapping.page_size),
    ]
    address = mapping.virtual + mapping.offset
    if not flags.get("rw", 0):
        scenarios.append((AccessKind.WRITE, 0, PagingControls(cr4_la57=la57), address))
        if user:
            scenarios.append((AccessKind.WRITE, 3, PagingControls(cr4_la57=la57), address))
    if not user:
        scenarios.append((data.draw(st.sampled_from(list(AccessKind))), 3, plain, address))
    else:
        smap = PagingControls(cr4_la57=la57, cr4_smap=True)
        scenarios.append((AccessKind.READ, 0, smap, address))
        smep = PagingControls(cr4_la57=la57, cr4_smep=True)
        scenarios.append((AccessKind.FETCH, 0, smep, address))
        key = flags.get("pk", 0)
        pke = PagingControls(cr4_la57=la57, cr4_pke=True, pkru=1 << (2 * key))
        scenarios.append((AccessKind.READ, 3, pke, address))
    if flags.get("xd", 0):
        scenarios.append((AccessKind.FETCH, 0, plain, address))
    kind, cpl, controls, target = data.draw(st.sampled_from(scenarios))

    before = snapshot(memory)
    entries_before = entry_values(tables)
    record = walk_mapping(mapping, memory, tables, kind, target, cpl, controls)
    assert isinstance(record.outcome, WalkFault)
    assert isinstance(exception_for(record, controls), PageFault)
    assert all(step.written is None for step in record.steps)
    assert entry_values(tables) == entries_before
    assert snapshot(memory) == before


# --- decode / encode round trip -------------------------------------------------------------


@settings(max_examples=300)
@given(
    levels=st.sampled_from([4, 5]),
    maxphyaddr=st.integers(36, 52),
    gbpages=st.booleans(),
    nxe=st.booleans(),
    choice=st.integers(0, 100),
    raw=U64,
)
def test_encode_of_decoded_fields_reproduces_the_value(
    levels: int, maxphyaddr: int, gbpages: bool, nxe: bool, choice: int, raw: int
) -> None:
    fmt = ia32e_format(levels, CpuModel(maxphyaddr, gbpages=gbpages), nxe)
    # Every (level, leaf) layout this CPU can have.
    layouts = [(level, False) for level in range(1, levels + 1)]
    layouts += [(level, True) for level in sorted(fmt.leaf_levels) if level != 1]
    level, large = layouts[choice % len(layouts)]
    layout = fmt.layout(level, large)
    covered = 0
    for field in layout.fields:
        covered |= field.mask
    value = raw & covered & ~layout.reserved
    value = value | PS_BIT if large else value & ~PS_BIT if level > 1 else value

    decoded = fmt.decode(value, level)
    assert decoded.layout == layout
    assert decoded.reserved_set == 0
    assert decoded.leaf == (level == 1 or large)
    assert decoded.present == bool(value & 1)
    fields = {fv.field.key: fv.value for fv in decoded.fields}
    assert fields == {key: decoded[key] for key in fields}
    assert fmt.encode(level, decoded.leaf, **fields) == value
    # The address a leaf maps / a table entry points to is the address field, in place.
    assert fmt.output_address(value, level) == fields["address"]


@settings(max_examples=300)
@given(value=U64, levels=st.sampled_from([4, 5]), nxe=st.booleans())
def test_the_walkers_rights_table_is_the_formats_rights_mask(
    value: int, levels: int, nxe: bool
) -> None:
    """The walker looks an entry's rights up by its bits 2:0 and 63 (`walk_constants`),
    instead of calling `rights_mask`: both must agree on any entry, x86 and EPT alike."""
    for fmt in (ia32e_format(levels, CpuModel(), nxe), ept_format(levels, CpuModel())):
        table = fmt.walk_constants.rights_by_bits
        assert table[value & 7 | value >> 60 & 8] == fmt.rights_mask(value), fmt.name
