"""The two-dimensional walk under EPT (SDM Vol 3C 29.3; KVM mmu.c), checked against raw tables.

Every expected address here is computed from the raw 8-byte entries (guest tables read through
the VMM's view of guest RAM, EPT tables read from host memory), never from the engine's walker.
"""

from __future__ import annotations

import pytest

import twodwalk as tw
from twodwalk.engine.trace import DataAccess, HostPageFault, KvmStep, Reference, Retry, VmExit
from twodwalk.engine.units import HUGE_PAGE_SIZE

MIB = 1 << 20
TWO_MIB = 2 * MIB
GVA = 0x40_0008
DATA_GPA = 0x20_0000
EPT_R, EPT_W, EPT_X = 1, 2, 4
QUAL_READ, QUAL_WRITE = 1 << 0, 1 << 1
QUAL_RWX_SHIFT = 3
QUAL_GVA_VALID, QUAL_FINAL = 1 << 7, 1 << 8

# (dimension, guest_level, ept_level, address), the fields a Reference is compared on.
Expected = tuple[str, int | None, int | None, int]


def index(address: int, level: int) -> int:
    return address >> (12 + 9 * (level - 1)) & 0x1FF


def addr_mask(maxphyaddr: int) -> int:
    return ((1 << maxphyaddr) - 1) & ~0xFFF


def is_large(value: int, level: int) -> bool:
    return level in (2, 3) and bool(value >> 7 & 1)


def raw_ept(m: tw.Machine, gpa: int, guest_level: int | None) -> tuple[list[Expected], int]:
    """Walk the raw EPT entries for `gpa`: the expected references and the HPA."""
    mask = addr_mask(m.cpu_model.maxphyaddr)
    table = m.vm.ept.eptp.root
    refs: list[Expected] = []
    for level in range(m.vm.ept.fmt.levels, 0, -1):
        entry_address = table + 8 * index(gpa, level)
        value = m.memory.read_u64(entry_address)
        refs.append(("ept", guest_level, level, entry_address))
        assert value & 7, f"EPT entry for {gpa:#x} at level {level} not present"
        if level == 1 or is_large(value, level):
            size = 1 << (12 + 9 * (level - 1))
            return refs, (value & mask & ~(size - 1)) | (gpa & (size - 1))
        table = value & mask
    raise AssertionError("unreachable")


def raw_two_dimensional(m: tw.Machine, gva: int) -> tuple[list[Expected], int, int]:
    """Expected references of the nested walk of `gva`, the final GPA and the final HPA."""
    mask = addr_mask(m.cpu_model.maxphyaddr)
    levels = m.guest.format.levels
    table_gpa = m.vcpu.cr3 & mask
    refs: list[Expected] = []
    for level in range(levels, 0, -1):
        entry_gpa = table_gpa + 8 * index(gva, level)
        ept_refs, entry_hpa = raw_ept(m, entry_gpa, level)
        refs += ept_refs
        refs.append(("guest", level, None, entry_hpa))
        value = int.from_bytes(m.read_gpa(entry_gpa, 8), "little")
        assert value & 1, f"guest entry for {gva:#x} at level {level} not present"
        if level == 1 or is_large(value, level):
            size = 1 << (12 + 9 * (level - 1))
            gpa = (value & mask & ~(size - 1)) | (gva & (size - 1))
            break
        table_gpa = value & mask
    final_refs, hpa = raw_ept(m, gpa, None)
    return refs + final_refs, gpa, hpa


def as_expected(refs: list[Reference]) -> list[Expected]:
    return [(r.dimension, r.guest_level, r.ept_level, r.address) for r in refs]


def warm(m: tw.Machine, gva: int = GVA, kind: str = "read") -> tw.AccessResult:
    """Access twice with the translation caches off, so the second access walks in full;
    return the second (warm: EPT and host tables filled) access, checked to be exit-free."""
    m.vcpu.caches.off()
    first = m.vcpu.access(gva, kind, 0x1234 if kind == "write" else None)
    assert first.fault is None and first.exit is None
    second = m.vcpu.access(gva, kind, 0x1234 if kind == "write" else None)
    assert len(second.trace.attempts()) == 1
    assert second.trace.of_type(VmExit) == []
    assert second.trace.of_type(Retry) == []
    return second


def mapping_levels(result: tw.AccessResult) -> dict[int, int]:
    """GFN -> level from the `kvm_mmu_hugepage_adjust` steps of one access."""
    return {
        s.gfn: s.level
        for s in result.trace.of_type(KvmStep)
        if s.function == "kvm_mmu_hugepage_adjust" and s.gfn is not None and s.level is not None
    }


# --- reference counts and addresses ------------------------------------------------------------

COUNT_CASES = [
    pytest.param(4, 4, 48, 24, id="guest4-ept4"),
    pytest.param(5, 4, 48, 29, id="guest5-ept4"),
    pytest.param(4, 5, 52, 29, id="guest4-ept5"),
    pytest.param(5, 5, 52, 35, id="guest5-ept5"),
]


def mapped_machine(guest_levels: int, ept_levels: int, maxphyaddr: int) -> tw.Machine:
    """A guest of that depth under EPT of that depth, with the page at GVA mapped."""
    m = tw.Machine(
        guest_ram=32 * MIB,
        guest_levels=guest_levels,
        ept_levels=ept_levels,
        maxphyaddr=maxphyaddr,
        gbpages=False,
    )
    m.guest.map(GVA & ~0xFFF, DATA_GPA, 0x1000, rw=1, us=1)
    return m


@pytest.mark.parametrize(("guest_levels", "ept_levels", "maxphyaddr", "count"), COUNT_CASES)
def test_warm_walk_reference_count(
    guest_levels: int, ept_levels: int, maxphyaddr: int, count: int
) -> None:
    m = mapped_machine(guest_levels, ept_levels, maxphyaddr)
    r = warm(m)
    refs = r.trace.memory_references()
    assert len(refs) == count == (guest_levels + 1) * (ept_levels + 1) - 1
    assert [ref.number for ref in refs] == list(range(1, count + 1))
    assert sum(ref.dimension == "guest" for ref in refs) == guest_levels
    assert sum(ref.dimension == "ept" for ref in refs) == (guest_levels + 1) * ept_levels


@pytest.mark.parametrize(("guest_levels", "ept_levels", "maxphyaddr", "count"), COUNT_CASES)
def test_warm_walk_reference_addresses_match_raw_tables(
    guest_levels: int, ept_levels: int, maxphyaddr: int, count: int
) -> None:
    m = mapped_machine(guest_levels, ept_levels, maxphyaddr)
    m.write_gpa(DATA_GPA + 8, (0xFEEDFACE).to_bytes(8, "little"))
    r = warm(m)
    expected, gpa, hpa = raw_two_dimensional(m, GVA)
    assert len(expected) == count
    assert as_expected(r.trace.memory_references()) == expected
    assert (r.gpa, r.hpa, r.value) == (gpa, hpa, 0xFEEDFACE)
    assert r.trace.of_type(DataAccess) == [DataAccess(hpa, "read", 0xFEEDFACE)]


def test_native_walk_has_one_reference_per_level() -> None:
    memory = tw.PhysicalMemory(48)
    frames = tw.FrameAllocator(memory, 1 << 20, 64 << 20)
    cpu = tw.CpuModel(48)
    tables = tw.PageTables(tw.ia32e_format(4, cpu, nxe=True), memory, frames.alloc)
    tables.map(0x40_0000, 0x80_0000, 0x1000, rw=1)
    record = tw.translate(memory, tables.root, GVA, "read")
    assert record.translation is not None
    assert record.translation.address == 0x80_0008
    assert len(record.steps) == 4
    # Each reference reads the entry the index bits select, in the table the previous one named.
    table = tables.root
    for step, level in zip(record.steps, (4, 3, 2, 1), strict=True):
        assert step.read.physical == table + 8 * index(GVA, level)
        table = memory.read_u64(step.read.physical) & addr_mask(48)


# --- large pages -------------------------------------------------------------------------------


def test_guest_2mib_page_drops_a_guest_level() -> None:
    m = tw.Machine(guest_ram=32 * MIB, guest_levels=4, ept_levels=4, maxphyaddr=48, gbpages=False)
    m.guest.map(0x60_0000, 0x40_0000, TWO_MIB, page_size=TWO_MIB, rw=1, us=1)
    gva = 0x60_0000 + 0x1_2348
    r = warm(m, gva)
    refs = r.trace.memory_references()
    assert len(refs) == 3 * 5 + 4 == 19
    assert [x.guest_level for x in refs if x.dimension == "guest"] == [4, 3, 2]
    expected, gpa, _ = raw_two_dimensional(m, gva)
    assert as_expected(refs) == expected
    assert gpa == r.gpa == 0x40_0000 + 0x1_2348


def test_ept_2mib_leaves_shorten_the_ept_dimension() -> None:
    m = tw.Machine(
        guest_ram=32 * MIB, guest_levels=4, ept_levels=4, maxphyaddr=48, gbpages=False, thp=True
    )
    m.guest.map(GVA & ~0xFFF, DATA_GPA, 0x1000, rw=1, us=1)
    cold = m.vcpu.access(GVA, "read")
    assert mapping_levels(cold)[DATA_GPA >> 12] == 2
    assert set(mapping_levels(cold).values()) == {2}
    found = m.vm.ept.tables.find_leaf(DATA_GPA)
    assert found is not None and found.level == 2
    r = warm(m)
    refs = r.trace.memory_references()
    assert len(refs) == (4 + 1) * (3 + 1) - 1 == 19
    assert [x.ept_level for x in refs if x.dimension == "ept"][:3] == [4, 3, 2]
    expected, _, hpa = raw_two_dimensional(m, GVA)
    assert as_expected(refs) == expected
    assert r.hpa == hpa


def test_guest_and_ept_2mib_pages_together() -> None:
    m = tw.Machine(
        guest_ram=32 * MIB, guest_levels=4, ept_levels=4, maxphyaddr=48, gbpages=False, thp=True
    )
    m.guest.map(0x60_0000, 0x40_0000, TWO_MIB, page_size=TWO_MIB, rw=1, us=1)
    gva = 0x60_0000 + 0x1F_F000
    r = warm(m, gva)
    refs = r.trace.memory_references()
    assert len(refs) == (3 + 1) * (3 + 1) - 1 == 15
    assert as_expected(refs) == raw_two_dimensional(m, gva)[0]


# --- the cold first access ---------------------------------------------------------------------


def test_cold_access_exits_retries_and_ends_clean() -> None:
    m = tw.Machine(guest_ram=32 * MIB, guest_levels=4, ept_levels=4, maxphyaddr=48, gbpages=False)
    m.guest.map(GVA & ~0xFFF, DATA_GPA, 0x1000, rw=1, us=1)
    r = m.vcpu.access(GVA, "read")
    assert r.fault is None and r.exit is None and r.value == 0
    exits = r.trace.of_type(VmExit)
    # One exit per guest table page (4, each in its own page) and one for the data page.
    assert len(exits) == 5
    assert all(e.reason == 48 and e.name == "EPT_VIOLATION" for e in exits)
    assert all(e.gva == GVA for e in exits)
    table_exits, final_exit = exits[:-1], exits[-1]
    for e in table_exits:
        assert e.qualification is not None
        assert e.qualification & QUAL_WRITE, "EPT A/D on: guest table accesses are writes"
        assert e.qualification & QUAL_GVA_VALID
        assert not e.qualification & QUAL_FINAL
        assert e.qualification >> QUAL_RWX_SHIFT & 7 == 0, "entry not present: bits 5:3 zero"
    # The table GPAs that exited are the guest's table pages, root first.
    assert table_exits[0].gpa is not None
    assert table_exits[0].gpa >> 12 == m.vcpu.cr3 >> 12
    assert final_exit.gpa == DATA_GPA + (GVA & 0xFFF)
    q = final_exit.qualification
    assert q is not None
    assert q & QUAL_READ and q & QUAL_GVA_VALID and q & QUAL_FINAL
    assert not q & QUAL_WRITE
    assert q >> QUAL_RWX_SHIFT & 7 == 0
    attempts = r.trace.attempts()
    assert len(attempts) == 6
    assert all(isinstance(a[0], Retry) for a in attempts[1:])
    assert not any(isinstance(e, VmExit) for e in attempts[-1])
    assert any(isinstance(e, DataAccess) for e in attempts[-1])
    # Only the data page was never written by the VMM: one host fault, for its HVA.
    faults = r.trace.of_type(HostPageFault)
    data_hva = m.vm.gpa_to_hva(DATA_GPA)
    assert [f.hva & ~0xFFF for f in faults] == [data_hva]
    assert faults[0].write is False


def test_cold_table_exit_sets_read_and_write_bits_with_ept_ad() -> None:
    m = tw.Machine(guest_ram=32 * MIB, guest_levels=4, ept_levels=4, maxphyaddr=48, gbpages=False)
    m.guest.map(GVA & ~0xFFF, DATA_GPA, 0x1000, rw=1, us=1)
    first = m.vcpu.access(GVA, "read").trace.of_type(VmExit)[0]
    assert first.qualification is not None
    assert first.qualification & (QUAL_READ | QUAL_WRITE) == QUAL_READ | QUAL_WRITE


def test_cold_table_exit_is_a_read_without_ept_ad() -> None:
    m = tw.Machine(
        guest_ram=32 * MIB, guest_levels=4, ept_levels=4, maxphyaddr=48, gbpages=False, ept_ad=False
    )
    m.guest.map(GVA & ~0xFFF, DATA_GPA, 0x1000, rw=1, us=1)
    exits = m.vcpu.access(GVA, "read").trace.of_type(VmExit)
    assert exits[0].qualification is not None
    assert exits[0].qualification & 7 == QUAL_READ
    assert exits[0].qualification & (QUAL_GVA_VALID | QUAL_FINAL) == QUAL_GVA_VALID


# --- the zero page -----------------------------------------------------------------------------


def test_zero_page_read_then_copy_on_write() -> None:
    m = tw.Machine(guest_ram=32 * MIB, guest_levels=4, ept_levels=4, maxphyaddr=48, gbpages=False)
    m.guest.map(GVA & ~0xFFF, DATA_GPA, 0x1000, rw=1, us=1)
    r = m.vcpu.access(GVA, "read")
    assert r.value == 0
    assert r.hpa == m.host.zero_page + (GVA & 0xFFF)
    found = m.vm.ept.tables.find_leaf(DATA_GPA)
    assert found is not None and found.level == 1
    leaf = m.memory.read_u64(found.slot)
    assert leaf & EPT_R and not leaf & EPT_W
    assert leaf & addr_mask(48) == m.host.zero_page
    hva = m.vm.gpa_to_hva(DATA_GPA)
    assert hva is not None
    host_leaf = m.vmm.tables.find_leaf(hva)
    assert host_leaf is not None
    host_pte = m.memory.read_u64(host_leaf.slot)
    assert host_pte & 1 and not host_pte & 2, "host maps the zero page read-only"

    w = m.vcpu.access(GVA, "write", 0xDEAD_BEEF)
    assert w.fault is None and w.exit is None
    # The copy-on-write break inside hva_to_pfn is itself an MMU-notifier invalidation of the
    # GFN (mmu_invalidate_seq moves on), so the fault is stale (`is_page_fault_stale`): KVM
    # installs nothing, and the retried write exits again on the zapped, now absent entry.
    exits = w.trace.of_type(VmExit)
    assert [e.reason for e in exits] == [48, 48]
    assert exits[1].qualification is not None and not exits[1].qualification >> 3 & 7
    q = exits[0].qualification
    assert q is not None
    assert q & QUAL_WRITE and q & QUAL_FINAL
    assert q >> QUAL_RWX_SHIFT & 7 == EPT_R | EPT_X, "readable+executable, not writable"
    faults = w.trace.of_type(HostPageFault)
    assert len(faults) == 1 and faults[0].write
    assert "copy-on-write" in faults[0].resolution
    new_frame = faults[0].hpa
    assert new_frame != m.host.zero_page
    found = m.vm.ept.tables.find_leaf(DATA_GPA)
    assert found is not None
    leaf = m.memory.read_u64(found.slot)
    assert leaf & EPT_W and leaf & addr_mask(48) == new_frame
    assert w.hpa == new_frame + (GVA & 0xFFF)
    assert m.vcpu.access(GVA, "read").value == 0xDEAD_BEEF
    assert m.read_gpa(DATA_GPA + (GVA & 0xFFF), 8) == (0xDEAD_BEEF).to_bytes(8, "little")
    assert m.memory.read(m.host.zero_page, 4096) == bytes(4096), "zero page untouched"


# --- guest-visible faults ----------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "error_code"), [("read", 0), ("write", 2), ("fetch", 0x10)])
def test_guest_pte_not_present_is_a_guest_page_fault(kind: str, error_code: int) -> None:
    m = tw.Machine(guest_ram=32 * MIB, guest_levels=4, ept_levels=4, maxphyaddr=48, gbpages=False)
    m.guest.map(GVA & ~0xFFF, DATA_GPA, 0x1000, rw=1, us=1)
    m.guest.unmap(GVA & ~0xFFF, 0x1000)
    r = m.vcpu.access(GVA, kind, 1 if kind == "write" else None)
    # EPT violations for the table pages happened, yet r.fault is the guest's own #PF.
    assert r.trace.of_type(VmExit)
    assert isinstance(r.fault, tw.PageFault)
    assert r.fault.error_code == error_code
    assert r.fault.address == GVA
    assert r.exit is None and r.value is None


def test_user_read_of_supervisor_page() -> None:
    m = tw.Machine(guest_ram=32 * MIB, guest_levels=4, ept_levels=4, maxphyaddr=48, gbpages=False)
    m.guest.map(GVA & ~0xFFF, DATA_GPA, 0x1000, rw=1, us=0)
    m.vcpu.cpl = 3
    r = m.vcpu.access(GVA, "read")
    assert isinstance(r.fault, tw.PageFault)
    assert r.fault.error_code == 5
    m.vcpu.cpl = 0
    ok = m.vcpu.access(GVA, "read")
    assert ok.fault is None and ok.value == 0


def test_ept_violations_never_reach_r_fault() -> None:
    m = tw.Machine(guest_ram=32 * MIB, guest_levels=4, ept_levels=4, maxphyaddr=48, gbpages=False)
    m.guest.map(0x40_0000, DATA_GPA, 0x4000, rw=1, us=1)
    for page in range(4):
        for kind in ("read", "write", "fetch"):
            r = m.vcpu.access(0x40_0000 + page * 0x1000, kind, 7 if kind == "write" else None)
            assert r.fault is None, r.fault
            assert r.exit is None


# --- mapping levels ----------------------------------------------------------------------------


def test_mapping_level_depends_on_gfn_hva_alignment() -> None:
    m = tw.Machine(
        guest_ram=32 * MIB, guest_levels=4, ept_levels=4, maxphyaddr=48, gbpages=False, thp=True
    )
    # Slot 0: THP-backed and GFN/HVA aligned -> 2 MiB EPT leaf.
    m.guest.map(GVA & ~0xFFF, DATA_GPA, 0x1000, rw=1, us=1)
    r = m.vcpu.access(GVA, "read")
    assert mapping_levels(r)[DATA_GPA >> 12] == 2
    found = m.vm.ept.tables.find_leaf(DATA_GPA)
    assert found is not None and found.level == 2

    # Slot 1: THP-backed but userspace_addr is 4 KiB off a 2 MiB boundary -> 4 KiB leaf.
    region = m.vmm.mmap(8 * MIB, huge=True, name="second")
    assert region % HUGE_PAGE_SIZE == 0
    slot_gpa = 64 * MIB
    m.vm.set_user_memory_region(1, 0, slot_gpa, 4 * MIB, region + 0x1000)
    target = slot_gpa + TWO_MIB  # a 2 MiB-aligned GPA well inside the slot
    m.write_gpa(target, (0xABCD).to_bytes(8, "little"))
    host_leaf = m.vmm.tables.find_leaf(region + 0x1000 + TWO_MIB)
    assert host_leaf is not None and host_leaf.level == 2, "host does map it with a THP"
    gva2 = 0x80_0000
    m.guest.map(gva2, target, 0x1000, rw=1, us=1)
    r2 = m.vcpu.access(gva2, "read")
    assert r2.value == 0xABCD
    step = next(
        s
        for s in r2.trace.of_type(KvmStep)
        if s.function == "kvm_mmu_hugepage_adjust" and s.gfn == target >> 12
    )
    assert step.level == 1
    assert "misaligned" in step.detail
    found = m.vm.ept.tables.find_leaf(target)
    assert found is not None and found.level == 1
    assert r2.hpa == host_leaf_hpa(m, region + 0x1000 + TWO_MIB)


def host_leaf_hpa(m: tw.Machine, hva: int) -> int:
    record = m.host.walk(m.vmm, hva, False)
    assert record.translation is not None
    return record.translation.address
