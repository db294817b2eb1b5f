"""Nested EPT (Linux 6.18 vmx/nested.c, mmu/paging_tmpl.h for EPT): L0 shadows L1's EPT12 into
the EPT02 the CPU walks for L2. Hand-computed counts, the composition rule for every EPT02
leaf, and what L1's and the host's changes do to EPT02. The machine the tests run on has no
nested virtualization, so none of this is checked against hardware."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twodwalk.engine.nested import NestedMachine
from twodwalk.engine.trace import KvmStep, VmExit
from twodwalk.engine.units import PAGE_SIZE

GVA, L2_GPA = 0x40_0000, 0x20_0000


def machine(pages: int = 1) -> NestedMachine:
    n = NestedMachine()
    n.l2.map(GVA, L2_GPA, pages * PAGE_SIZE, rw=1, us=1)
    return n


def functions(trace_steps: list[KvmStep]) -> list[str]:
    return [s.function for s in trace_steps]


def l0_hpa_of(n: NestedMachine, l1_gpa: int) -> int | None:
    """L0's own answer for an L1 GPA: memslot -> HVA -> the host's page tables."""
    return n.l0.vm.gpa_to_hpa(l1_gpa)


def test_first_touch_reflects_then_shadows_each_gpa() -> None:
    """A first L2 write touches 5 L2 GPAs (4 guest tables, the data): each takes one EPT
    violation that L0 reflects to L1 (EPT12 empty), then one that L0 fixes by shadowing: 10
    VM exits, 5 reflections, 5 EPT02 leaves, and L1's 5 EPT12 leaves written in L1's RAM."""
    n = machine()
    result = n.l2_vcpu.access(GVA + 8, "write", 0x77)
    steps = functions(result.trace.of_type(KvmStep))
    assert len(result.trace.of_type(VmExit)) == 10
    assert steps.count("nested_ept_inject_page_fault") == 5
    assert steps.count("L1 KVM: kvm_tdp_page_fault") == 5
    assert steps.count("FNAME(fetch)") == 5
    # Exit multiplication: while handling, L1's stores to EPT12 pages L0 already shadows
    # trap too (the PT page after the first leaf; the upper tables once shadowed): 4 here.
    assert steps.count("kvm_mmu_track_write") == 4 == n.nested.traps
    # L1 first touches 5 EPT12 pages (L1's stores go through EPT01): PML4, PDPT, PD, and
    # one PT each for L2 GPAs 0x7fc000-0x7ff000 (L2's tables) and 0x200000 (the data).
    assert steps.count("handle_ept_violation (L1)") == 5
    assert result.gpa == L2_GPA + 8
    l1_gpa = n.l1.l1_gpa(L2_GPA + 8)
    assert l1_gpa == 16 * (1 << 20) + L2_GPA + 8, "L1's memslot puts L2 RAM at L1 GPA 16 MiB"
    assert result.hpa == l0_hpa_of(n, l1_gpa)
    assert n.l0.vm.read_gpa(l1_gpa, 8) == (0x77).to_bytes(8, "little")


def test_reflected_qualification_is_the_one_l1_would_see() -> None:
    """The data's first touch: EPT12 has no leaf, so L1 gets 0x182 for a write (bit 1 write,
    bit 7 GVA valid, bit 8 final translation; bits 5:3 clear: not present), SDM table 28-7."""
    n = machine()
    result = n.l2_vcpu.access(GVA + 8, "write", 1)
    reflections = [s.detail for s in result.trace.of_type(KvmStep)]
    data = [d for d in reflections if d.startswith(f"EPT12 does not map L2 GPA {L2_GPA + 8:#x}")]
    assert data and data[0].endswith("qualification 0x182)")


def test_the_cpu_walks_24_references_through_ept02_and_a_3d_walk_would_take_124() -> None:
    n = machine()
    n.l2_vcpu.access(GVA, "read")
    n.l2_vcpu.caches.off()
    cold = n.l2_vcpu.access(GVA, "read")
    assert len(cold.trace.memory_references()) == 24  # (4+1)(4+1) - 1
    assert n.three_dimensional_references(GVA) == 124  # (4+1)(4+1)(4+1) - 1


def every_ept02_leaf_composes(n: NestedMachine) -> None:
    """Each present EPT02 leaf maps its L2 GPA to what EPT12 and L0 give now."""
    for entry in n.nested.ept02.tables.entries():
        if not entry.leaf:
            continue
        l2_gpa = entry.virtual
        walked = n.l1.ept12.find_leaf(l2_gpa)
        assert walked is not None, f"EPT02 maps {l2_gpa:#x}, which EPT12 no longer does"
        l1_gpa = n.l1.l1_gpa(l2_gpa)
        assert n.nested.ept02.fmt.output_address(entry.value, 1) == l0_hpa_of(n, l1_gpa)


def test_l1_unmapping_an_l2_page_traps_and_zaps_only_that_entry() -> None:
    n = machine(pages=2)
    n.l2_vcpu.access(GVA, "write", 1)
    n.l2_vcpu.access(GVA + PAGE_SIZE, "write", 2)
    traps = n.nested.traps
    n.l1.unmap(L2_GPA)  # as L1's swap-out of an L2 page does
    assert n.nested.traps == traps + 1, "the EPT12 page is write-protected: one trap"
    assert n.nested.ept02.get_walk(L2_GPA).translation is None
    assert n.nested.ept02.get_walk(L2_GPA + PAGE_SIZE).translation is not None
    again = n.l2_vcpu.access(GVA, "read")
    assert "nested_ept_inject_page_fault" in functions(again.trace.of_type(KvmStep))
    assert again.value == 1
    every_ept02_leaf_composes(n)


def test_l1_invept_drops_ept02() -> None:
    n = machine()
    n.l2_vcpu.access(GVA, "read")
    assert n.nested.invept() == 5
    assert n.nested.ept02.get_walk(L2_GPA).translation is None
    again = n.l2_vcpu.access(GVA, "read")
    steps = functions(again.trace.of_type(KvmStep))
    assert steps.count("FNAME(fetch)") == 5 and "nested_ept_inject_page_fault" not in steps


def test_the_host_swapping_out_an_l1_page_zaps_the_ept02_leaf_made_from_it() -> None:
    n = machine()
    n.l2_vcpu.access(GVA + 8, "write", 0x99)
    l1_gpa = n.l1.l1_gpa(L2_GPA)
    hva = n.l0.vm.gpa_to_hva(l1_gpa)
    assert hva is not None
    n.l0.host.swap_out(n.l0.vmm, hva)
    assert n.nested.ept02.get_walk(L2_GPA).translation is None, "zapped with EPT01's"
    back = n.l2_vcpu.access(GVA + 8, "read")
    assert back.value == 0x99 and back.hpa == l0_hpa_of(n, l1_gpa + 8)
    every_ept02_leaf_composes(n)


@settings(
    max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    st.lists(
        st.tuples(st.sampled_from(["read", "write", "unmap", "invept", "swap"]), st.integers(0, 3)),
        min_size=1,
        max_size=8,
    )
)
def test_every_ept02_leaf_is_ept12_composed_with_l0(ops: list[tuple[str, int]]) -> None:
    n = machine(pages=4)
    for op, page in ops:
        gva, l2_gpa = GVA + page * PAGE_SIZE, L2_GPA + page * PAGE_SIZE
        if op in ("read", "write"):
            n.l2_vcpu.access(gva, op, page if op == "write" else None)
        elif op == "unmap" and n.l1.ept12.find_leaf(l2_gpa) is not None:
            n.l1.unmap(l2_gpa)
        elif op == "invept":
            n.nested.invept()
        elif op == "swap":
            hva = n.l0.vm.gpa_to_hva(n.l1.l1_gpa(l2_gpa))
            assert hva is not None
            if n.l0.host.pagemap(n.l0.vmm, hva) is not None:
                n.l0.host.swap_out(n.l0.vmm, hva)
        every_ept02_leaf_composes(n)


def test_nested_trees_readout_reads_the_three_trees_without_changing_them() -> None:
    from twodwalk.views.readouts import nested_trees

    n = machine()
    result = n.l2_vcpu.access(GVA + 8, "write", 5)
    before = [e.value for e in n.nested.ept02.tables.entries()]
    trees = nested_trees(n, result)
    assert [e.value for e in n.nested.ept02.tables.entries()] == before
    assert trees.ept12.translation is not None
    assert trees.ept12.translation.address == trees.l1_gpa == n.l1.l1_gpa(L2_GPA + 8)
    assert result.hpa is not None and trees.frame == result.hpa & ~0xFFF
    assert trees.ept12.root == n.l1.eptp12.root and trees.ept02.root == n.nested.ept02.eptp.root
