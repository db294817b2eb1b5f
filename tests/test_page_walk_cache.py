"""The AMD-style page-walk cache, the alternative to Intel's paging-structure caches.

Intel's paging-structure caches key upper-level entries by linear-address prefix and let a
walk skip levels (SDM Vol 3A 4.10.3); an AMD-style page-walk cache keys them by the physical
address they were read from, for guest and nested walks alike, and a walk still visits every
level (Bhargava et al., ASPLOS 2008). Counts here are worked by hand.
"""

from __future__ import annotations

import pytest
from support import mapped_machine

import twodwalk as tw
from twodwalk.engine.tlb import PageWalkCache
from twodwalk.engine.trace import PAGE_WALK_CACHE, Counts, EptWalk
from twodwalk.views.plots import walk_grid
from twodwalk.workloads import CONFIGURATIONS, compare, pointer_chase

GVA = 0x40_0000
GPA = 0x10_0000


def machine(model: str, tdp: bool = True) -> tw.Machine:
    m = mapped_machine(GVA, GPA, 16 * 4096, guest_ram=8 << 20, user=False, tdp=tdp)
    m.vcpu.caches.model = model
    for page in range(8):  # every EPT and shadow entry for the first 8 pages exists
        m.vcpu.access(GVA + page * 4096, "read")
    return m


def warm_miss(m: tw.Machine, page: int, trace: Counts | None = None) -> tw.AccessResult:
    """A TLB miss on a page whose translations all exist, with the walk caches warm from
    the other pages' walks and no guest-physical mapping for this page's GPA."""
    m.vcpu.tlb.invalidate(lambda e: False)
    gpa = GPA + page * 4096
    m.vcpu.caches.guest_physical.invalidate(lambda e: e.page != gpa)
    return m.vcpu.access(GVA + page * 4096, "read", trace=trace)


def test_a_warm_miss_reads_only_leaves_from_memory() -> None:
    """Intel: the PDE cache gives the guest PT (1 guest read), and the EPT's PDE cache the
    EPT PT of the data GPA (1 EPT read). AMD-style: the walk starts at the root, but the
    guest PML4E, PDPTE and PDE and the EPT PML4E, PDPTE and PDE are in the page-walk cache:
    only the two PTEs (guest and EPT) go to memory. Both make 2 references, by different
    means: Intel skips levels, AMD reads them from the cache."""
    intel, amd = warm_miss(machine("intel"), 2), warm_miss(machine("amd"), 2)
    assert intel.trace.reference_counts() == {"guest": 1, "ept": 1}
    final = intel.trace.of_type(EptWalk)[-1].record
    assert final.start is not None and final.start.level == 1, "started at the EPT PT"
    assert amd.trace.reference_counts() == {"guest": 1, "ept": 1}
    cached = amd.trace.page_walk_cache_reads()
    assert sorted((r.dimension, r.step.level) for r in cached) == [
        ("ept", 2), ("ept", 3), ("ept", 4), ("guest", 2), ("guest", 3), ("guest", 4)
    ]  # fmt: skip
    assert (amd.gpa, amd.hpa, amd.value) == (intel.gpa, intel.hpa, intel.value)
    cells = walk_grid(amd.trace).cells
    assert sum(c.source == PAGE_WALK_CACHE for c in cells) == 6
    assert sum(c.source == "memory" for c in cells) == 2


def test_bare_metal_and_shadow_walks_use_it_too() -> None:
    shadow = warm_miss(machine("amd", tdp=False), 2)
    assert shadow.trace.reference_counts() == {"native": 1}, "PML4E, PDPTE, PDE cached"
    native = tw.workloads.Configuration("n", native=True, cache_model="amd").processor(8, GVA)
    for page in (0x1000, 0):  # both pages faulted in; the last walk warms the cache
        native.access(GVA + page, "read")
    native.tlb.invalidate(lambda e: False)
    assert native.access(GVA + 0x1000, "read").trace.reference_counts() == {"native": 1}


def test_every_invalidation_empties_it_and_off_switches_it_off() -> None:
    m = machine("amd")
    pwc = m.vcpu.caches.pwc
    assert pwc.entries()
    m.vcpu.invlpg(GVA + 0x3000)
    assert pwc.entries() == []
    cold = m.vcpu.access(GVA + 0x3000, "read")
    assert cold.trace.reference_counts() == {"guest": 4}, "every guest entry from memory"
    assert len(pwc.entries()) == 3, "the guest PML4E, PDPTE and PDE again"
    m.vcpu.caches.off()
    m.vcpu.flush_tlb()
    off = m.vcpu.access(GVA + 0x3000, "read")
    assert len(off.trace.memory_references()) == 24 and pwc.entries() == []


def test_a_stale_entry_is_used_until_invalidated() -> None:
    """Like the paging-structure caches, a page-walk cache may keep an entry that software
    changed in memory (here the guest's PDE is cleared without INVLPG)."""
    m = machine("amd")
    pde = m.guest.page_tables.entry_address(GVA, 2)
    assert pde is not None
    m.write_gpa(pde, bytes(8))  # the guest unmaps the page table, with no invalidation
    m.vcpu.tlb.invalidate(lambda e: False)
    stale = m.vcpu.access(GVA + 0x4000, "read")
    assert stale.fault is None, "the cached PDE still leads to the page table"
    m.vcpu.invlpg(GVA + 0x4000)
    fresh = m.vcpu.access(GVA + 0x4000, "read")
    assert isinstance(fresh.fault, tw.PageFault) and fresh.fault.error_code == 0


def test_counts_only_runs_count_its_hits() -> None:
    counts = Counts()
    warm_miss(machine("amd"), 2, counts)
    assert counts.references == {"guest": 1, "ept": 1}
    assert counts.cache_hits["page-walk cache"] == 6


def test_workloads_say_which_model_a_result_used() -> None:
    configs = [
        c for c in CONFIGURATIONS if c.name in ("EPT 4x4", "EPT 4x4, AMD-style page-walk cache")
    ]
    results = compare(lambda b: pointer_chase(b, 2048, 2500, seed=3), 2048, configs)
    intel, amd = results
    assert (intel.cache_model, amd.cache_model) == ("intel", "amd")
    assert amd.table().splitlines()[1].split() == [
        "walk",
        "caches",
        "AMD-style",
        "page-walk",
        "cache",
    ]


def test_info_tlb_lists_the_page_walk_cache() -> None:
    from twodwalk.views.text import info_tlb

    m = machine("amd")
    text = info_tlb(m.vcpu.caches)
    pwc = m.vcpu.caches.pwc.entries()
    assert f"page-walk cache (AMD-style): {len(pwc)} entries" in text
    assert all(f"entry @ {hpa:#x} = {value:#018x}" in text for hpa, value in pwc)
    assert "page-walk cache" not in info_tlb(machine("intel").vcpu.caches)


def test_bad_settings_are_refused_clearly() -> None:
    with pytest.raises(tw.TwodwalkError, match="model='arm' is not valid: choose one of intel"):
        tw.TranslationCaches().model = "arm"
    with pytest.raises(tw.TwodwalkError, match="size"):
        PageWalkCache(size=0)
