"""Bare metal: one process, its own page tables, page faults into the host kernel."""

from __future__ import annotations

import twodwalk as tw
from twodwalk.engine.native import NativeMachine
from twodwalk.engine.trace import HostPageFault, NativeWalk, TlbHit
from twodwalk.workloads import CONFIGURATIONS, compare, pointer_chase

VA = 0x5000_0000


def machine() -> NativeMachine:
    m = NativeMachine(maxphyaddr=48)
    m.mmap(16 * 4096, fixed=VA)
    return m


def test_first_read_maps_the_zero_page_and_the_first_write_breaks_cow() -> None:
    m = machine()
    read = m.cpu.access(VA + 8, "read")
    assert read.value == 0 and read.hpa is not None
    assert read.hpa & ~0xFFF == m.host.zero_page
    assert [f.resolution for f in read.trace.of_type(HostPageFault)] == [
        "zero page mapped read-only"
    ]
    write = m.cpu.access(VA + 8, "write", 77)
    faults = write.trace.of_type(HostPageFault)
    assert len(faults) == 1 and "copy-on-write" in faults[0].resolution
    assert m.cpu.access(VA + 8, "read").value == 77


def test_a_native_walk_is_one_dimension_of_four_references() -> None:
    m = machine()
    m.cpu.access(VA, "write", 1)
    m.cpu.caches.off()
    r = m.cpu.access(VA, "read")
    assert [ref.dimension for ref in r.trace.memory_references()] == ["native"] * 4
    assert r.gpa is None, "no guest-physical space on bare metal"


def test_tlb_hit_after_the_walk() -> None:
    m = machine()
    m.cpu.access(VA, "write", 1)
    again = m.cpu.access(VA, "read")
    assert again.trace.of_type(TlbHit) and not again.trace.of_type(NativeWalk)


def test_access_outside_every_vma_is_a_user_page_fault() -> None:
    m = machine()
    r = m.cpu.access(VA + 0x10_0000, "write", 1)
    assert isinstance(r.fault, tw.PageFault)
    assert r.fault.error_code == 6, "user write to a not-present page"


def test_native_costs_what_shadow_costs_and_ept_costs_more() -> None:
    configs = [
        c for c in CONFIGURATIONS if c.name in ("native (bare metal)", "EPT 4x4", "shadow paging")
    ]
    results = {
        r.name: r for r in compare(lambda b: pointer_chase(b, 2048, 2500, seed=2), 2048, configs)
    }
    native = results["native (bare metal)"]
    assert native.references_per_access == results["shadow paging"].references_per_access
    assert results["EPT 4x4"].references_per_access > native.references_per_access
    assert native.exits == {}


def test_demand_fault_keeps_the_walk_caches_and_cow_flushes_the_page() -> None:
    """Linux flushes nothing after making a not-present PTE present (nothing cached P=0,
    SDM Vol 3A 4.10.2.3), so the retry walks from the PDE cache; breaking copy-on-write
    replaces a present PTE and flushes the page (`ptep_clear_flush`)."""
    from twodwalk.engine.trace import CacheHit

    m = machine()
    m.cpu.access(VA, "write", 1)  # tables built, the PDE cache warm
    touch = m.cpu.access(VA + 0x1000, "read")  # a demand fault, then the retry
    retry = touch.trace.attempts()[-1]
    assert any(isinstance(e, CacheHit) for e in retry), "the retry starts at the PDE cache"
    assert len(touch.trace.memory_references()) == 1
    write = m.cpu.access(VA + 0x1000, "write", 2)  # copy-on-write of the zero page
    assert write.value == 2 and m.cpu.access(VA + 0x1000, "read").value == 2
