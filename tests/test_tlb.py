"""The TLB (SDM Vol 3C 29.4, Vol 3A 4.10): combined mappings, invalidation, KVM's flushes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import mapped_machine

import twodwalk as tw
from twodwalk.engine.formats import Rights
from twodwalk.engine.kvm.memslots import dirty_pages
from twodwalk.engine.tlb import ANY_PCID, Tag, Tlb, TlbEntry, TwoLevelTlb
from twodwalk.engine.trace import CacheHit, GuestWalk, NativeWalk, TlbHit, VmExit
from twodwalk.engine.units import HUGE_PAGE_SIZE, PAGE_SIZE

GVA = 0x40_0000
GPA = 0x10_0000
KERNEL_GVA = 0xFFFF_8000_0040_0000


def machine(tdp: bool = True) -> tw.Machine:
    m = mapped_machine(GVA, GPA, 4 * 4096, guest_ram=16 << 20, tdp=tdp)
    m.guest.map(KERNEL_GVA, GPA + 0x8000, 4096, rw=1, g=1)
    return m


def hit(r: tw.AccessResult) -> bool:
    return bool(r.trace.of_type(TlbHit)) and r.trace.memory_references() == []


def test_second_access_hits_and_costs_no_memory_reference() -> None:
    for tdp in (True, False):
        m = machine(tdp)
        first = m.vcpu.access(GVA, "read")
        second = m.vcpu.access(GVA, "read")
        assert not hit(first) and hit(second)
        assert (second.gpa, second.hpa) == (first.gpa, first.hpa)
        assert m.vcpu.tlb.stats.hits == 1


def test_cr3_load_flushes_non_global_entries_and_keeps_global_ones() -> None:
    m = machine()
    m.vcpu.access(GVA, "read")
    m.vcpu.access(KERNEL_GVA, "read")
    m.vcpu.cr3 = m.vcpu.cr3
    assert not hit(m.vcpu.access(GVA, "read"))
    assert hit(m.vcpu.access(KERNEL_GVA, "read")), "G=1 with CR4.PGE survives MOV to CR3"
    m.vcpu.flush_tlb()
    assert not hit(m.vcpu.access(KERNEL_GVA, "read"))


def test_without_pge_global_entries_go_too() -> None:
    m = machine()
    m.vcpu.cr4_pge = False
    m.vcpu.access(KERNEL_GVA, "read")
    m.vcpu.cr3 = m.vcpu.cr3
    assert not hit(m.vcpu.access(KERNEL_GVA, "read"))


def test_invlpg_drops_only_that_page() -> None:
    m = machine()
    m.vcpu.access(GVA, "read")
    m.vcpu.access(GVA + 0x1000, "read")
    m.vcpu.invlpg(GVA + 0x123)
    assert not hit(m.vcpu.access(GVA, "read"))
    assert hit(m.vcpu.access(GVA + 0x1000, "read"))


def test_write_through_a_clean_entry_walks_again_to_set_dirty() -> None:
    m = machine()
    m.vcpu.access(GVA, "read")
    write = m.vcpu.access(GVA, "write", 5)
    assert not hit(write)
    pte = write.trace.of_type(GuestWalk)[0].record.steps[-1]
    assert pte.written is not None and pte.written >> 6 & 1
    assert hit(m.vcpu.access(GVA, "write", 6))


def test_an_entry_that_does_not_allow_the_access_is_dropped_and_the_walk_faults() -> None:
    m = machine()
    m.vcpu.access(KERNEL_GVA, "read")
    m.vcpu.cpl = 3
    r = m.vcpu.access(KERNEL_GVA, "read")
    assert isinstance(r.fault, tw.PageFault) and r.fault.error_code == 5
    assert r.trace.of_type(GuestWalk)


def test_stale_entry_after_a_pte_edit_until_invlpg() -> None:
    m = machine()
    assert m.vcpu.access(GVA, "read").gpa == GPA
    m.guest.page_tables.protect(GVA, 4096, us=1)
    pte = m.guest.page_tables.entry_address(GVA, 1)
    assert pte is not None
    m.write_gpa(pte, ((GPA + 0x3000) | 0x67).to_bytes(8, "little"))
    assert m.vcpu.access(GVA, "read").gpa == GPA, "no INVLPG: the old translation is used"
    m.vcpu.invlpg(GVA)
    assert m.vcpu.access(GVA, "read").gpa == GPA + 0x3000


def test_kvm_flushes_after_a_notifier_zap() -> None:
    m = machine()
    first = m.vcpu.access(GVA, "write", 9)
    assert first.hva is not None
    m.host.swap_out(m.vmm, first.hva & ~0xFFF)
    again = m.vcpu.access(GVA, "read")
    assert not hit(again) and again.value == 9
    assert again.trace.of_type(VmExit)


def test_without_notifiers_the_tlb_and_ept_both_stay_stale() -> None:
    m = machine()
    first = m.vcpu.access(GVA, "write", 9)
    assert first.hva is not None
    m.host.mmu_notifiers_enabled = False
    m.host.swap_out(m.vmm, first.hva & ~0xFFF)
    again = m.vcpu.access(GVA, "read")
    assert hit(again) and again.hpa == first.hpa


def test_enabling_dirty_logging_flushes_so_the_next_write_is_logged() -> None:
    m = machine()
    m.vcpu.access(GVA, "write", 1)
    m.vcpu.access(GVA, "write", 2)
    m.vm.set_user_memory_region(0, 1, 0, m.guest_ram, m.ram_hva)
    m.vm.get_dirty_log(0)
    write = m.vcpu.access(GVA, "write", 3)
    assert not hit(write)
    assert GPA >> 12 in dirty_pages(m.vm.get_dirty_log(0))


def test_switched_off_every_access_walks() -> None:
    m = machine()
    m.vcpu.caches.off()
    m.vcpu.access(GVA, "read")
    r = m.vcpu.access(GVA, "read")
    assert not hit(r) and len(r.trace.memory_references()) == 24


def test_combined_entry_is_the_smaller_page() -> None:
    m = tw.Machine(guest_ram=16 << 20)
    m.guest.map(0x60_0000, 0x40_0000, HUGE_PAGE_SIZE, page_size=HUGE_PAGE_SIZE, rw=1)
    m.vcpu.access(0x60_0000, "read")
    sizes = {e.page_size for e in m.vcpu.tlb.entries()}
    assert sizes == {PAGE_SIZE}, "a 2 MiB guest page over 4 KiB EPT pages caches 4 KiB"
    assert not hit(m.vcpu.access(0x60_1000, "read"))


def test_lru_replacement_in_a_set() -> None:
    m = machine(tdp=False)
    m.vcpu.caches.tlb = Tlb({PAGE_SIZE: (1, 2)})
    for page in range(3):
        m.vcpu.access(GVA + page * 4096, "read")
    assert not hit(m.vcpu.access(GVA, "read")), "the oldest of three went from a 2-way set"
    assert m.vcpu.access(GVA + 2 * 4096, "read").trace.of_type(NativeWalk) == []


def _entry(tag: Tag, page: int) -> TlbEntry:
    return TlbEntry(
        tag, page, PAGE_SIZE, page + 0x100_0000, None, Rights(7), None, 0x67, True, False
    )


def test_repeated_hits_keep_the_lru_order_a_probe_would() -> None:
    """A hit on the page the last hit found skips the probe (`Tlb.lookup`'s shortcut): the
    LRU victim must still be the way a probe-every-time TLB would evict."""
    tlb, tag = Tlb({PAGE_SIZE: (1, 2)}), Tag(1, 0, 0)
    tlb.insert(_entry(tag, 0x1000))
    tlb.insert(_entry(tag, 0x2000))
    assert tlb.lookup(tag, 0x1008) is not None  # probe: 0x1000 becomes most recent
    assert tlb.lookup(tag, 0x1010) is not None  # the shortcut
    assert tlb.lookup(tag, 0x2000) is not None  # probe: 0x2000 most recent
    assert tlb.lookup(tag, 0x1000) is not None  # must probe again and make 0x1000 most recent
    tlb.insert(_entry(tag, 0x3000))
    assert {e.page for e in tlb.entries()} == {0x1000, 0x3000}, "0x2000 was least recent"
    assert (tlb.stats.hits, tlb.stats.misses) == (4, 0)


def test_the_lookup_shortcut_forgets_on_insert_invalidate_and_switch_off() -> None:
    tlb, tag = Tlb({PAGE_SIZE: (1, 2)}), Tag(1, 0, 0)
    tlb.insert(_entry(tag, 0x1000))
    assert tlb.lookup(tag, 0x1000) is not None
    tlb.invalidate(lambda e: False)
    assert tlb.lookup(tag, 0x1000) is None, "an invalidated entry must not be served"
    tlb.insert(_entry(tag, 0x1000))
    assert tlb.lookup(tag, 0x1000) is not None
    tlb.enabled = False
    assert tlb.lookup(tag, 0x1000) is None, "a switched-off TLB serves nothing"
    tlb.enabled = True
    other = Tag(1, 5, 0)  # an equal-valued tag of another PCID is another address space
    assert tlb.lookup(other, 0x1000) is None


def test_a_global_entry_serves_every_pcid_until_it_is_evicted_or_invalidated() -> None:
    """Global entries carry ANY_PCID (SDM Vol 3A 4.10.2.4); the cache probes for one only
    while it may hold one, and a miss is counted once whichever probes it made."""
    tlb = Tlb({PAGE_SIZE: (1, 1)})
    everyone, pcid_3 = Tag(1, ANY_PCID, 0), Tag(1, 3, 0)
    tlb.insert(_entry(everyone, 0x1000))
    assert tlb.lookup(pcid_3, 0x1000) is not None, "a global entry translates for PCID 3"
    tlb.insert(_entry(pcid_3, 0x2000))  # one way: the global entry is evicted
    assert tlb.lookup(pcid_3, 0x1000) is None
    assert (tlb.stats.hits, tlb.stats.misses) == (1, 1)
    tlb.insert(_entry(everyone, 0x1000))
    tlb.invalidate(lambda e: e.tag.pcid != ANY_PCID)
    assert tlb.lookup(pcid_3, 0x1000) is None
    assert (tlb.stats.hits, tlb.stats.misses) == (1, 2)


def test_stlb_serves_what_the_first_level_evicted_and_refills_it() -> None:
    m = machine()
    tlb = TwoLevelTlb(Tlb({PAGE_SIZE: (1, 2)}), Tlb({PAGE_SIZE: (1, 8)}))
    m.vcpu.caches.tlb = tlb
    for page in range(3):
        m.vcpu.access(GVA + page * 4096, "read")
    assert len(tlb.l1.entries()) == 2 and len(tlb.stlb.entries()) == 3
    again = m.vcpu.access(GVA, "read")
    assert hit(again), "the first level lost page 0, the STLB still had it: no walk"
    assert (tlb.l1.stats.hits, tlb.stlb.stats.hits, tlb.stats.hits) == (0, 1, 1)
    assert tlb.l1.stats.misses == tlb.stlb.stats.hits + tlb.stlb.stats.misses
    assert tlb.stats.misses == tlb.stlb.stats.misses, "a miss is a miss in both levels"
    assert GVA in {e.page for e in tlb.l1.entries()}, "an STLB hit refills the first level"
    assert len(tlb.entries()) == 3, "a translation held by both levels is listed once"


def test_invalidation_reaches_both_levels() -> None:
    m = machine()
    tlb = TwoLevelTlb()
    m.vcpu.caches.tlb = tlb
    m.vcpu.access(GVA, "read")
    assert len(tlb.l1.entries()) == len(tlb.stlb.entries()) == 1
    m.vcpu.invlpg(GVA)
    assert tlb.entries() == [] and not hit(m.vcpu.access(GVA, "read"))
    tlb.enabled = False
    assert not tlb.l1.enabled and not tlb.stlb.enabled
    assert not hit(m.vcpu.access(GVA, "read"))


def test_pcid_keeps_other_address_spaces_and_bit_63_skips_the_flush() -> None:
    m = machine()
    m.vcpu.cr4_pcide = True
    root = m.vcpu.cr3 & ~0xFFF
    m.vcpu.mov_cr3(root | 1)
    m.vcpu.access(GVA, "read")  # cached under PCID 1
    m.vcpu.mov_cr3(root | 2)
    assert not hit(m.vcpu.access(GVA, "read")), "PCID 2 has its own entries"
    m.vcpu.mov_cr3(1 << 63 | root | 1)
    assert hit(m.vcpu.access(GVA, "read")), "back to PCID 1 without a flush"
    assert m.vcpu.cr3 == root | 1, "bit 63 is not stored"
    m.vcpu.mov_cr3(root | 1)
    assert not hit(m.vcpu.access(GVA, "read")), "without bit 63 the new PCID is flushed"
    m.vcpu.mov_cr3(root | 2)
    m.vcpu.cr3 = 1 << 63 | root | 2
    assert not hit(m.vcpu.access(GVA, "read")), "plain assignment always flushes"


def test_invvpid_kinds() -> None:
    m = machine()
    m.vcpu.access(GVA, "read")
    m.vcpu.access(GVA + 0x1000, "read")
    m.vcpu.access(KERNEL_GVA, "read")
    m.vcpu.invvpid("address", gva=GVA)
    assert not hit(m.vcpu.access(GVA, "read"))
    assert hit(m.vcpu.access(GVA + 0x1000, "read"))
    m.vcpu.invvpid("single-retaining-globals")
    assert hit(m.vcpu.access(KERNEL_GVA, "read"))
    assert not hit(m.vcpu.access(GVA + 0x1000, "read"))
    m.vcpu.invvpid("single", vpid=7)
    assert hit(m.vcpu.access(GVA + 0x1000, "read")), "another VPID's flush leaves ours"


def test_invept_single_and_global() -> None:
    m = machine()
    m.vcpu.access(GVA, "read")
    m.vcpu.invept("single", eptp=0x1234_5000)
    assert hit(m.vcpu.access(GVA, "read")), "another EPTP"
    m.vcpu.invept("single")
    assert not hit(m.vcpu.access(GVA, "read"))
    m.vcpu.invept("global")
    assert not hit(m.vcpu.access(GVA, "read"))


def test_without_vpid_every_vm_exit_flushes() -> None:
    m = machine()
    m.guest.map(0x90_0000, 0x4000_0000, 4096, rw=1)  # MMIO: every access exits
    m.vcpu.vpid = 0
    m.vcpu.access(GVA, "read")
    assert hit(m.vcpu.access(GVA, "read"))
    m.vcpu.access(0x90_0000, "read")
    assert not hit(m.vcpu.access(GVA, "read")), "the MMIO exit flushed VPID 0's entries"
    m.vcpu.vpid = 1
    m.vcpu.access(GVA, "read")
    m.vcpu.access(0x90_0000, "read")
    assert hit(m.vcpu.access(GVA, "read")), "with a VPID the entries survive exits"


def test_bad_invalidation_arguments() -> None:
    m = machine()
    with pytest.raises(tw.TwodwalkError, match="kind='some' is not valid"):
        m.vcpu.invvpid("some")
    with pytest.raises(tw.TwodwalkError, match="gva"):
        m.vcpu.invvpid("address")
    with pytest.raises(tw.TwodwalkError, match="kind='local' is not valid"):
        m.vcpu.invept("local")


def refs_by_dimension(r: tw.AccessResult) -> tuple[int, int]:
    refs = r.trace.memory_references()
    return (sum(x.dimension == "guest" for x in refs), sum(x.dimension == "ept" for x in refs))


def test_pde_cache_starts_the_walk_at_the_page_table() -> None:
    m = machine()
    m.vcpu.access(GVA, "read")
    m.vcpu.caches.tlb.enabled = False
    m.vcpu.caches.guest_physical.enabled = False
    r = m.vcpu.access(GVA + 0x1000, "read")
    last = r.trace.attempts()[-1]  # the first attempt took an EPT violation on the new page
    hits = [e.cache for e in last if isinstance(e, CacheHit)]
    assert hits == ["paging-structure cache L2"]
    assert refs_by_dimension(r) == (1, 1), "the PTE, then the final GPA's EPT PTE"
    step = r.trace.of_type(GuestWalk)[-1].record.steps[0]
    assert (step.level, step.read.cached) == (1, "paging-structure cache")


def test_guest_physical_mappings_serve_the_table_gpas() -> None:
    m = machine()
    m.vcpu.access(GVA, "read")
    m.vcpu.caches.tlb.enabled = False
    for psc in m.vcpu.caches.psc.values():
        psc.enabled = False
    r = m.vcpu.access(GVA + 0x1000, "read")
    # The guest entries are read, their GPAs already translated; the new data GPA's EPT walk
    # starts at the EPT PT that the EPT's PDE cache names.
    assert refs_by_dimension(r) == (4, 1)
    cached = [s.read.cached for s in r.trace.of_type(GuestWalk)[0].record.steps]
    assert cached == ["guest-physical"] * 4
    m.vcpu.invept("single")
    assert refs_by_dimension(m.vcpu.access(GVA, "read")) == (4, 20)


def test_all_caches_off_gives_the_uncached_count() -> None:
    m = machine()
    m.vcpu.caches.off()
    m.vcpu.access(GVA, "read")
    assert refs_by_dimension(m.vcpu.access(GVA, "read")) == (4, 20)


def test_stale_pde_cache_until_invlpg() -> None:
    m = machine()
    m.guest.map(GVA + 0x20_0000, GPA + 0x4000, 4096, rw=1, us=1)  # another PT, next 2 MiB
    m.vcpu.access(GVA, "read")
    m.vcpu.access(GVA + 0x20_0000, "read")
    pde = m.guest.page_tables.entry_address(GVA, 2)
    other = m.guest.page_tables.entry_address(GVA + 0x20_0000, 2)
    assert pde is not None and other is not None
    m.write_gpa(pde, m.read_gpa(other, 8))  # the PDE now points at the other page table
    m.vcpu.caches.tlb.enabled = False
    stale = m.vcpu.access(GVA, "read")
    assert stale.gpa == GPA, "the PDE cache still has the old page table"
    m.vcpu.invlpg(GVA + 0x1000)  # INVLPG drops every PSC entry of the PCID
    assert m.vcpu.access(GVA, "read").gpa == GPA + 0x4000


def test_pde_cache_shortens_the_shadow_walk_too() -> None:
    m = machine(tdp=False)
    m.vcpu.access(GVA, "read")
    m.vcpu.access(GVA + 0x1000, "read")
    m.vcpu.caches.tlb.enabled = False
    r = m.vcpu.access(GVA + 0x1000, "read")
    assert [x.dimension for x in r.trace.memory_references()] == ["native"]
    assert [e.cache for e in r.trace.of_type(CacheHit)] == ["paging-structure cache L2"]


# --- property: with the invalidations the SDM requires, caches never change an answer ------

PROP_PAGES = 6


@pytest.mark.parametrize("tdp", [True, False], ids=["ept", "shadow"])
@settings(max_examples=40)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["read", "write", "fetch", "remap", "protect", "swap", "log"]),
            st.integers(0, PROP_PAGES - 1),
            st.integers(0, 3),
        ),
        min_size=1,
        max_size=30,
    )
)
def test_caches_on_and_off_give_the_same_answers(
    tdp: bool, ops: list[tuple[str, int, int]]
) -> None:
    """With the invalidations the SDM requires (Vol 3A 4.10.4.1: INVLPG after a guest edits a
    PTE; KVM's own flushes after an MMU-notifier zap or a memslot flag change), a vCPU with
    its TLB and paging-structure caches on answers every access as one with them off. With
    EPT (Vol 3C 29.4) and under shadow paging, where KVM intercepts the guest's INVLPG
    (`kvm_mmu_invlpg`) and must drop its shadow entry for the page too."""
    cached, uncached = machine(tdp), machine(tdp)
    uncached.vcpu.caches.off()
    for m in (cached, uncached):
        m.guest.map(0x80_0000, 0x20_0000, PROP_PAGES * 4096, rw=1, us=1)
    for what, page, arg in ops:
        answers = []
        for m in (cached, uncached):
            gva = 0x80_0000 + page * 4096
            if what in ("read", "write", "fetch"):
                m.vcpu.cpl = 3 if arg == 3 else 0
                r = m.vcpu.access(gva, what, arg if what == "write" else None)
                code = r.fault.error_code if r.fault is not None else None
                answers.append((code, r.value if what == "read" else None, r.gpa))
            elif what == "remap":
                m.guest.unmap(gva, 4096)
                m.guest.map(gva, 0x30_0000 + arg * 4096, 4096, rw=1, us=1)
                m.vcpu.invlpg(gva)
            elif what == "protect":
                m.guest.protect(gva, 4096, rw=arg & 1, us=arg >> 1 & 1)
                m.vcpu.invlpg(gva)
            elif what == "swap":
                hva = m.vm.gpa_to_hva(0x20_0000 + page * 4096)
                assert hva is not None
                found = m.vmm.tables.find_leaf(hva)
                if found is not None and found.level == 1:
                    frame = m.memory.read_u64(found.slot) & 0xF_FFFF_FFFF_F000
                    if frame != m.host.zero_page:
                        m.host.swap_out(m.vmm, hva)
            else:
                m.vm.set_user_memory_region(0, arg & 1, 0, m.guest_ram, m.ram_hva)
        if answers:
            assert answers[0] == answers[1], (what, page, arg)


def test_counts_only_fast_path_serves_exactly_what_a_traced_hit_would() -> None:
    m = machine()
    assert not m.vcpu.tlb_access(GVA, "read"), "a miss is left to access()"
    m.vcpu.access(GVA, "read")
    assert m.vcpu.tlb_access(GVA, "read")
    assert not m.vcpu.tlb_access(GVA, "write", 5), "a clean entry makes a write walk"
    m.vcpu.access(GVA, "write", 5)
    assert m.vcpu.tlb_access(GVA, "write", 6)
    assert m.read_gpa(GPA, 8) == (6).to_bytes(8, "little"), "the write reached memory"
    m.vcpu.cpl = 3
    m.vcpu.access(KERNEL_GVA, "read")
    m.vcpu.cpl = 0
    m.vcpu.access(KERNEL_GVA, "read")
    m.vcpu.cpl = 3
    assert not m.vcpu.tlb_access(KERNEL_GVA, "read"), "the rights refuse a user access"
    assert not m.vcpu.tlb_access(GVA + 0xFFC, "read"), "bad input goes to access() to raise"
