"""AMD nested paging (NPT) under KVM, checked by hand against the AMD64 APM (Vol 2, 15.25
"Nested Paging") and Linux 6.18 (svm.c `npf_interception`, mmu/spte.c `make_spte` with the
x86 masks of `kvm_mmu_reset_all_pte_masks`, paging_tmpl.h's `nested_access`). The real KVM
on our machines exposes no SVM, so nothing here runs on hardware: every expected value is
computed from the manual and the source.

Same format as the host's tables, still another tree: the nested entries are long-mode
entries under nCR3, built by KVM from memslots and the VMM's host page tables.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import mapped_machine

import twodwalk as tw
from twodwalk.engine.kvm.memslots import KVM_MEM_LOG_DIRTY_PAGES, dirty_pages
from twodwalk.engine.kvm.run import MmioExit
from twodwalk.engine.trace import Counts, KvmStep, Trace, VmExit
from twodwalk.errors import TwodwalkError
from twodwalk.views.plots import plot_references, plot_timeline, plot_two_trees, plot_walk_grid
from twodwalk.views.text import exit_summaries, explain, format_exits
from twodwalk.workloads import Configuration, compare, strided

GVA = 0x40_0000
GPA = 0x10_0000
RAM = 16 << 20
NPF = 0x400
# EXITINFO1 bits (APM Vol 2 15.25.6): the #PF error code, bit 32 final GPA, bit 33 guest table.
P, W, U, RSVD, ID = 1, 2, 4, 8, 16
FINAL, TABLE = 1 << 32, 1 << 33
# Long-mode entry bits, and KVM's SPTE_MMU_PRESENT (11), MMU-writable (10), host-writable (9).
PRESENT, RW, US, ACCESSED, DIRTY = 1, 2, 4, 1 << 5, 1 << 6
HOST_WRITABLE, MMU_WRITABLE, MMU_PRESENT = 1 << 9, 1 << 10, 1 << 11


def amd(**options: object) -> tw.Machine:
    return mapped_machine(GVA, GPA, 0x4000, guest_ram=RAM, vendor="amd", **options)  # type: ignore[arg-type]


def npf_exits(trace: Trace) -> list[tuple[int, int, int]]:
    """(exit code, EXITINFO1, EXITINFO2) of each #VMEXIT(NPF)."""
    return [
        (e.reason, e.qualification or 0, e.gpa or 0)
        for e in trace.of_type(VmExit)
        if e.name == "NPF"
    ]


def nested_leaf(m: tw.Machine, gpa: int) -> int:
    found = m.vm.ept.tables.find_leaf(gpa)
    assert found is not None and found.level == 1
    return m.memory.read_u64(found.slot)


def guest_table_gpas(m: tw.Machine) -> list[int]:
    """The GPAs of the guest's PML4, PDPT, PD and PT on the way to GVA: the top pages of
    guest RAM, allocated downward from the top by the guest kernel."""
    return [RAM - 0x1000 * (i + 1) for i in range(4)]


def test_a_first_touch_exits_once_per_guest_table_and_once_for_the_data() -> None:
    m = amd()
    done = m.vcpu.access(GVA + 0x18, "write", 7)
    assert done.fault is None and done.value == 7
    pml4, pdpt, pd, pt = guest_table_gpas(m)
    # Each guest table is reached through the nested walk as a user write (bit 33, W, U; P=0:
    # nothing mapped yet), EXITINFO2 the GPA of the entry read: index 0 in the PML4, PDPT and
    # PD (GVA 0x400000 has PD index 2), index 0 in the PT.
    table = TABLE | W | U
    assert npf_exits(done.trace) == [
        (NPF, table, pml4),
        (NPF, table, pdpt),
        (NPF, table, pd + 2 * 8),
        (NPF, table, pt),
        (NPF, FINAL | W | U, GPA + 0x18),  # the data: the final GPA, a user write
    ]


@pytest.mark.parametrize(
    ("kind", "exit_info1"),
    [("read", FINAL | U), ("write", FINAL | W | U), ("fetch", FINAL | U | ID)],
)
def test_the_final_gpa_fault_reports_the_access(kind: str, exit_info1: int) -> None:
    m = amd()
    m.vcpu.access(GVA + 0x1000, "read")  # the guest tables are mapped in the NPT now
    value = 1 if kind == "write" else None
    done = m.vcpu.access(GVA, kind, value)  # a new data page: only its final GPA faults
    assert npf_exits(done.trace) == [(NPF, exit_info1, GPA)]


def test_kvm_builds_long_mode_entries_with_its_software_bits() -> None:
    m = amd()
    done = m.vcpu.access(GVA, "write", 1)
    assert done.hpa is not None
    # make_spte for a writable host page: P, R/W, U/S (shadow_user_mask), A, D, host- and
    # MMU-writable, SPTE_MMU_PRESENT; no NX (TDP maps ACC_ALL), no memory type (SVM has no
    # get_mt_mask); bits 51:12 the host frame.
    leaf_bits = PRESENT | RW | US | ACCESSED | DIRTY | HOST_WRITABLE | MMU_WRITABLE | MMU_PRESENT
    assert leaf_bits == 0xE67
    assert nested_leaf(m, GPA) == done.hpa | leaf_bits
    # make_nonleaf_spte: P, R/W, U/S, A and SPTE_MMU_PRESENT, then the next table's address.
    mmu = m.vm.ept
    top = m.memory.read_u64(mmu.ncr3)
    assert top & 0xFFF == PRESENT | RW | US | ACCESSED | MMU_PRESENT == 0x827


def test_a_nested_entry_without_user_refuses_every_access() -> None:
    """Every nested access is a user access (x86.c `translate_nested_gpa`), so an entry with
    U/S=0 allows nothing: a protection fault (P=1) on the final GPA."""
    m = amd()
    m.vcpu.access(GVA, "read")
    slot = m.vm.ept.tables.find_leaf(GPA)
    assert slot is not None
    m.memory.write_u64(slot.slot, m.memory.read_u64(slot.slot) & ~US)
    m.vcpu.flush_tlb()
    done = m.vcpu.access(GVA, "read")
    assert npf_exits(done.trace)[0] == (NPF, FINAL | P | U, GPA)
    assert done.fault is None, "KVM's fault path maps the page again, with U/S"
    assert nested_leaf(m, GPA) & US


def test_a_guest_read_writes_its_page_tables_in_the_nested_dimension() -> None:
    """With dirty logging on, KVM write-protects the nested leaves; a guest *read* then
    faults on its page-table pages as a write (bit 33, P, W, U), fast_page_fault makes them
    writable again and logs them: the guest's tables show up dirty though it wrote nothing."""
    m = amd()
    m.vcpu.access(GVA, "read")
    m.vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, RAM, m.ram_hva)
    m.vm.get_dirty_log(0)
    m.vcpu.flush_tlb()
    done = m.vcpu.access(GVA + 0x1000, "read")  # a page the guest has not read yet
    tables = guest_table_gpas(m)
    infos = {gpa & ~0xFFF: info for _, info, gpa in npf_exits(done.trace)}
    assert infos[tables[0]] == TABLE | P | W | U
    assert {gfn << 12 for gfn in dirty_pages(m.vm.get_dirty_log(0))} >= set(tables)


def test_mmio_is_cached_with_a_reserved_bit_and_faults_with_rsvd() -> None:
    hole = (0x80_0000, 0x90_0000)
    m = mapped_machine(GVA, hole[0], 0x1000, guest_ram=RAM, vendor="amd", pci_hole=hole)
    first = m.vcpu.access(GVA, "read")
    assert isinstance(first.exit, MmioExit)
    # make_mmio_spte: bit 51 and P (a reserved bit under MAXPHYADDR 46), W and U/S
    # (shadow_mmio_access_mask), the GPA, and generation bits (the memslot generation).
    spte = nested_leaf(m, hole[0])
    generation = m.vm.memslots.generation & ((1 << 19) - 1)
    gen_bits = (generation & 0xFF) << 3 | (generation >> 8) << 52
    assert spte == 1 << 51 | PRESENT | RW | US | hole[0] | gen_bits
    second = m.vcpu.access(GVA, "read")
    assert npf_exits(second.trace) == [(NPF, FINAL | P | U | RSVD, hole[0])]
    steps = [s.function for s in second.trace.of_type(KvmStep)]
    assert "handle_mmio_page_fault" in steps and "__gfn_to_hva_memslot" not in steps
    assert isinstance(second.exit, MmioExit)


@pytest.mark.parametrize(("guest_levels", "nested_levels", "references"), [(4, 4, 24), (4, 5, 29)])
def test_a_cold_walk_reads_as_many_entries_as_under_ept(
    guest_levels: int, nested_levels: int, references: int
) -> None:
    """(n+1)(m+1)-1 (Bhargava et al., ASPLOS 2008) holds for NPT as for EPT."""
    m = amd(guest_levels=guest_levels, ept_levels=nested_levels, maxphyaddr=52)
    m.vcpu.access(GVA, "read")
    m.vcpu.caches.off()
    counts = Counts()
    m.vcpu.access(GVA, "read", trace=counts)
    assert sum(counts.references.values()) == references


def test_the_vendor_is_checked_with_clear_errors() -> None:
    with pytest.raises(TwodwalkError, match="vendor='arm' is not valid"):
        tw.Machine(vendor="arm")
    with pytest.raises(TwodwalkError, match="ept_ad=False is Intel's"):
        tw.Machine(vendor="amd", ept_ad=False)
    m = amd()
    with pytest.raises(TwodwalkError, match=r"nested root is mmu\.ncr3"):
        _ = m.vm.ept.eptp
    with pytest.raises(TwodwalkError, match="INVEPT is Intel's"):
        m.vcpu.invept("single")
    with pytest.raises(TwodwalkError, match="SVM has no PML"):
        m.vm.set_dirty_log_mode("pml")
    assert m.vcpu.caches.model == "amd", "the AMD-style page-walk cache is this vendor's"


MAPPINGS = st.lists(
    st.tuples(st.integers(0, 15), st.booleans(), st.booleans(), st.booleans()),
    min_size=1,
    max_size=6,
    unique_by=lambda t: t[0],
)
ACCESSES = st.lists(
    st.tuples(
        st.integers(0, 15), st.sampled_from(["read", "write", "fetch"]), st.sampled_from([0, 3])
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(mappings=MAPPINGS, accesses=ACCESSES)
def test_ept_and_npt_reach_the_same_frames_and_the_same_guest_faults(
    mappings: list[tuple[int, bool, bool, bool]], accesses: list[tuple[int, str, int]]
) -> None:
    """The nested dimension changes how a GPA reaches its frame, not what the guest sees:
    given the same guest tables and memslots, an Intel (EPT) and an AMD (NPT) machine give
    each access the same fault, value, GPA and host frame."""
    machines = [tw.Machine(guest_ram=RAM, vendor=vendor) for vendor in ("intel", "amd")]
    for m in machines:
        for page, rw, us, xd in mappings:
            fields = {"rw": int(rw), "us": int(us), "xd": int(xd)}
            m.guest.map(GVA + page * 0x1000, GPA + page * 0x1000, 0x1000, **fields)
    for number, (page, kind, cpl) in enumerate(accesses):
        seen = []
        for m in machines:
            m.vcpu.cpl = cpl
            value = number if kind == "write" else None
            done = m.vcpu.access(GVA + page * 0x1000, kind, value)
            seen.append((done.fault, done.value, done.gpa, done.hpa))
        assert seen[0] == seen[1], f"access {number}: {kind} page {page} at CPL {cpl}"


def test_the_views_name_the_vendors_tree() -> None:
    """Text and figures say NPT, nCR3 and #VMEXIT(NPF) for an AMD guest, never EPT."""
    m = amd()
    first = m.vcpu.access(GVA, "write", 1)
    assert format_exits(first.trace) == "5 VM exits (#VMEXIT(NPF) x5)"
    assert "EXITINFO1 0x100000006 (W, U, final GPA)" in exit_summaries(first.trace)[-1]
    assert "The NPT walk of GPA 0x100000 stopped at the nested PDE" in explain(first)
    m.vcpu.flush_tlb()
    with m.vcpu.caches.switched_off():
        cold = m.vcpu.access(GVA, "read")
    grid = plot_walk_grid(cold.trace)
    legend = grid.axes[0].get_legend()
    assert legend is not None
    assert grid.axes[0].get_title() == "4-level guest walk under 4-level NPT: 24 memory references"
    assert "memory reference: NPT entry" in [t.get_text() for t in legend.get_texts()]
    timeline = plot_timeline(first)
    labels = [t.get_text() for legend in timeline.legends for t in legend.get_texts()]
    assert "NPT walk (data GPA)" in labels and "EPT walk (data GPA)" not in labels
    trees = plot_two_trees(m, first)
    shown = " ".join(t.get_text() for t in trees.axes[0].texts)
    assert f"nCR3\n{m.vm.ept.ncr3:#x}" in shown and "EPTP" not in shown
    for figure in (grid, timeline, trees):
        plt.close(figure)


def test_shadow_paging_on_amd_exits_with_svm_codes() -> None:
    """With NPT off, KVM on AMD intercepts #PF (VMEXIT_EXCP14, EXITINFO1 the error code),
    CR3 writes (VMEXIT_CR3_WRITE, EXITINFO1 bit 63 with decode assists: a MOV, from RAX)
    and INVLPG (VMEXIT_INVLPG, the address): APM Vol 2 15.12 and appendix C."""
    m = amd(tdp=False)
    first = m.vcpu.access(GVA, "read")
    # The shadow walk finds nothing: a not-present read at CPL 0, error code 0.
    exit_ = first.trace.of_type(VmExit)[0]
    assert (exit_.reason, exit_.name, exit_.qualification, exit_.gva) == (0x4E, "EXCP14", 0, GVA)
    cr3 = m.vcpu.mov_cr3(m.vcpu.cr3)
    assert [(e.reason, e.name, e.qualification) for e in cr3.of_type(VmExit)] == [
        (0x13, "CR3_WRITE", 1 << 63)
    ]
    invlpg = m.vcpu.invlpg(GVA)
    assert [(e.reason, e.name, e.qualification) for e in invlpg.of_type(VmExit)] == [
        (0x79, "INVLPG", GVA)
    ]
    assert format_exits(invlpg) == "1 VM exit (#VMEXIT(INVLPG) x1)"


def test_translations_are_tagged_by_asid_and_flushed_by_it() -> None:
    m = amd()
    m.vcpu.access(GVA, "read")
    tlb_tags = {e.tag for e in m.vcpu.caches.tlb.entries()}
    assert tlb_tags == {(m.vcpu.asid, 0, 0)}, "ASID 1, PCID 0, no EP4TA: AMD has none"
    assert m.vcpu.caches.guest_physical.entries(), "nested translations are cached too"
    m.vcpu.invlpga(GVA)
    assert not m.vcpu.caches.tlb.entries(), "INVLPGA dropped the page of ASID 1"
    assert m.vcpu.caches.guest_physical.entries(), "INVLPGA leaves nested translations"
    m.vcpu.access(GVA, "read")
    m.vcpu.flush_tlb()  # KVM's TLB_CONTROL_FLUSH_ASID
    assert not m.vcpu.caches.tlb.entries() and not m.vcpu.caches.guest_physical.entries()
    with pytest.raises(TwodwalkError, match="INVLPGA is AMD's"):
        tw.Machine().vcpu.invlpga(GVA)


def test_workloads_run_on_amd_and_name_its_tree() -> None:
    """The AMD configuration walks as the Intel one with the same page-walk cache does,
    reference for reference (the same shape, the same cache), and the figures say NPT."""
    amd_run, intel_run = compare(
        lambda base: strided(base, 2048, 400, stride_pages=128),  # one TLB set, overflowing
        2048,
        [
            Configuration("AMD NPT 4x4", vendor="amd", cache_model="amd"),
            Configuration("EPT 4x4, AMD-style page-walk cache", cache_model="amd"),
        ],
    )
    assert (amd_run.nested_tree, intel_run.nested_tree) == ("NPT", "EPT")
    assert amd_run.references == intel_run.references and amd_run.references["ept"] > 0
    figure = plot_references([amd_run])
    labels = [t.get_text() for legend in figure.legends for t in legend.get_texts()]
    assert "NPT entry references" in labels
    both = plot_references([amd_run, intel_run])
    labels = [t.get_text() for legend in both.legends for t in legend.get_texts()]
    assert "EPT/NPT entry references" in labels
    for f in (figure, both):
        plt.close(f)
