"""Topic 'nested': how many VM exits an L2 access takes under nested EPT (Linux 6.18
vmx/nested.c, paging_tmpl.h for EPT). An EPT violation of L2 exits to L0; if L1's EPT12 does
not map the GPA, L0 reflects it to L1 and L2 takes a second violation once L1 has fixed
EPT12; if EPT12 maps it, L0 shadows it into EPT02 at once. The engine runs the history on a
`NestedMachine` and counts the exits in the trace."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

from twodwalk.engine.nested import NestedMachine
from twodwalk.engine.trace import KvmStep, VmExit
from twodwalk.engine.units import PAGE_SIZE
from twodwalk.errors import check_aligned, check_choice, check_int
from twodwalk.exercises.grading import Grader, Question, Value, _mistakes, seeded_rng
from twodwalk.exercises.tlb import _count_reader

_GVA, _L2_GPA = 0x40_0000, 0x20_0000
_NEIGHBOUR = _GVA + PAGE_SIZE  # the same L2 page table, the next page


def _cold(n: NestedMachine) -> None:
    """Nothing ran in L2 yet."""


def _neighbour(n: NestedMachine) -> None:
    n.l2_vcpu.access(_NEIGHBOUR, "write", 1)


def _invept(n: NestedMachine) -> None:
    n.l2_vcpu.access(_GVA, "write", 1)
    n.nested.invept()


def _l1_unmap(n: NestedMachine) -> None:
    n.l2_vcpu.access(_GVA, "write", 1)
    n.l1.unmap(_L2_GPA)


def _host_swap(n: NestedMachine) -> None:
    n.l2_vcpu.access(_GVA, "write", 1)
    hva = n.l0.vm.gpa_to_hva(n.l1.l1_gpa(_L2_GPA))
    assert hva is not None
    n.l0.host.swap_out(n.l0.vmm, hva)


NESTED_HISTORIES: Mapping[str, tuple[str, Callable[[NestedMachine], None]]] = MappingProxyType(
    {
        "cold": ("nothing has run in L2 yet", _cold),
        "neighbour": ("L2 has written the next page (same L2 page table) once", _neighbour),
        "invept": ("L2 has written this page once, then L1 ran INVEPT", _invept),
        "l1-unmap": (
            "L2 has written this page once, then L1 took it away (cleared its EPT12 entry)",
            _l1_unmap,
        ),
        "host-swap": (
            "L2 has written this page once, then the host swapped out the L1 page behind it",
            _host_swap,
        ),
    }
)
_NO_EXIT = frozenset({"none", "no exit", "no exits"})


def nested_question(history: str, *, offset: int = 0) -> Question:
    """The VM exits of an L2 read at `offset` into the page at GVA 0x400000 after `history`
    (a key of `NESTED_HISTORIES`), with L2's TLB flushed first so the CPU walks."""
    check_aligned("offset", check_int("offset", offset, 0, PAGE_SIZE, valid="0..0xff8"), 8)
    gva = _GVA + offset
    told, run = NESTED_HISTORIES[check_choice("history", history, tuple(NESTED_HISTORIES))]
    machine = NestedMachine()
    machine.l2.map(_GVA, _L2_GPA, 2 * PAGE_SIZE, rw=1, us=1)
    run(machine)
    machine.l2_vcpu.flush_tlb()
    result = machine.l2_vcpu.access(gva, "read")
    exits = len(result.trace.of_type(VmExit))
    steps = [s.function for s in result.trace.of_type(KvmStep)]
    reflected = steps.count("nested_ept_inject_page_fault")
    shadowed = steps.count("FNAME(fetch)")
    prompt = (
        "L2 runs under an L1 hypervisor under KVM (nested EPT: L0 shadows L1's EPT12 into"
        f" EPT02). L2 maps GVA {_GVA:#x} to its GPA {_L2_GPA:#x}, 4 KiB pages. So far, {told}."
        f" Now L2 reads GVA {gva:#x} (its TLB is empty). How many VM exits does the read take?"
    )
    hint = (
        "Count the GPAs the walk needs that EPT02 does not map: L2's own page tables, then the"
        " data. Each takes one EPT violation; if EPT12 has no entry for it either, L0 reflects"
        " it to L1 and the retry takes a second one."
    )
    solution = "\n".join(
        [
            f"{reflected} violations reflected to L1 (EPT12 had no entry), {shadowed} fixed by"
            " L0 shadowing EPT12 into EPT02.",
            f"Exits: {reflected} + {shadowed} = {exits}.",
            f"Answer: {exits}",
        ]
    )
    items: list[tuple[Value, str]] = [
        (
            shadowed,
            f"Not {shadowed}: each GPA EPT12 did not map took two exits: one L0 reflected"
            " to L1, then one L0 fixed by shadowing."
            if reflected == shadowed
            else f"Not {shadowed}: add the {reflected} exits L0 reflected to L1 first.",
        ),
        (
            reflected,
            f"Not {reflected}: each reflection is followed by a second exit, which L0 fixes"
            " by shadowing.",
        ),
        (
            2 if reflected else 1,
            "Not that: that counts the data page alone; L2's own page tables need EPT02"
            " entries too, unless EPT02 still has them.",
        ),
    ]
    grader = Grader(
        exits,
        _count_reader(_NO_EXIT),
        "give the number of VM exits in decimal",
        _mistakes(exits, items),
        lambda given: f"Not {given}: go GPA by GPA: which does EPT02 map, which EPT12?",
    )
    return Question("nested", prompt, hint, solution, str(exits), grader)


def _seeded_nested(seed: int) -> Question:
    rng = seeded_rng("nested", seed)
    return nested_question(rng.choice(tuple(NESTED_HISTORIES)), offset=rng.randrange(512) * 8)
