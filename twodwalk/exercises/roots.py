"""Topic 'roots'."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from twodwalk.engine.machine import Machine
from twodwalk.engine.trace import EptWalk, GuestWalk, HostWalk, NativeWalk, Trace
from twodwalk.engine.units import MIB, PAGE_SHIFT, PAGE_SIZE
from twodwalk.engine.walker import WalkRecord
from twodwalk.errors import check_aligned, check_choice, check_int
from twodwalk.exercises.grading import Grader, Question, ValueReader, _hex, _mistakes, seeded_rng
from twodwalk.exercises.setups import _DATA_GPA, _GUEST_RAM, _random_page
from twodwalk.views.text import format_walk

# --- topic "roots": the same shape, different trees (SDM Vol 3A 4.5; Vol 3C 29.3.2) ---------------

ROOT_WALKS: Mapping[str, str] = MappingProxyType(
    {
        "gva": "the CPU walks the guest's page tables for GVA {gva:#x} (EPT on)",
        "gpa": "the CPU walks EPT for GPA {gpa:#x}, the guest-physical address of that access"
        " (EPT on)",
        "hva": "KVM, handling the EPT violation for GPA {gpa:#x}, translates HVA {hva:#x} in"
        " software (hva_to_pfn -> get_user_pages) (EPT on)",
        "gva-shadow": "the CPU walks the tables for GVA {gva:#x} with EPT off (shadow paging)",
    }
)


def roots_question(
    walk: str, *, guest_levels: int = 4, gva: int = 0x40_0008, gpa: int = _DATA_GPA
) -> Question:
    """Where a walk starts: the root each walk of a first access to `gva` used, read from the
    trace (guest walk: the GPA in the guest's CR3; EPT walk: the EPTP's root; KVM's walk of
    the VMM's tables: the VMM's own CR3; with EPT off: KVM's shadow root)."""
    check_choice("walk", walk, tuple(ROOT_WALKS))
    check_aligned("gpa", check_int("gpa", gpa, 0, 6 * MIB, valid="0 <= gpa < 6 MiB"), PAGE_SIZE)
    shadow = walk == "gva-shadow"
    machine = Machine(
        guest_ram=_GUEST_RAM, guest_levels=guest_levels, gbpages=False, tdp=not shadow
    )
    machine.guest.map(gva & ~(PAGE_SIZE - 1), gpa, PAGE_SIZE, rw=1, us=1)
    first_touch = machine.vcpu.access(gva, "read").trace  # KVM's software path runs here
    machine.vcpu.flush_tlb()
    cold = machine.vcpu.access(gva, "read").trace  # a cold walk: every walk from its root
    hva = machine.vm.gpa_to_hva(gpa)
    assert hva is not None
    guest_root = machine.vcpu.cr3_root
    vmm_root = machine.vmm.tables.root
    record = _walk_of(first_touch if walk == "hva" else cold, walk)
    expected = record.root
    registers = [
        f"  guest CR3, as the guest loaded it:        {machine.vcpu.cr3:#x}",
        f"  the VMM process's CR3 on the host:        {vmm_root:#x}",
    ]
    mistakes: list[tuple[int, str]] = [
        (
            guest_root,
            "That is the root of the guest's own tables (a GPA, from the guest's CR3): they"
            " translate GVA -> GPA"
            + (
                ". With EPT off the CPU never walks them: KVM walks them in software"
                " (walk_addr_generic) and loads the root of its shadow tables into the real CR3"
                if shadow
                else ""
            ),
        ),
        (
            vmm_root,
            "That is the root of the VMM process's own page tables: they translate the VMM's"
            " HVAs, which only KVM's software path (hva_to_pfn) and the VMM itself use; a"
            " guest access never walks them in hardware",
        ),
    ]
    if shadow:
        registers.append(f"  the root of KVM's shadow tables for it:   {expected:#x}")
    else:
        eptp = machine.vm.ept.eptp
        registers.append(f"  the EPTP in the VMCS:                     {eptp.value:#x}")
        mistakes += [
            (
                eptp.root,
                "That is the EPT root (from the EPTP): EPT translates GPAs, each guest table's"
                " address and the final GPA, not the GVA or the VMM's HVAs",
            ),
            (
                eptp.value,
                "That is the whole EPTP: bits 2:0 are the memory type of EPT accesses, bits"
                " 5:3 the walk length minus 1, bit 6 enables EPT A/D flags; the root's address"
                " is bits M-1:12",
            ),
        ]
        root_hpa = cold.of_type(GuestWalk)[0].record.steps[0].read.physical & ~0xFFF
        mistakes.append(
            (
                root_hpa,
                "That is where the guest's root table sits in host memory, found through EPT;"
                " the register holds its guest-physical address",
            )
        )
    prompt = "\n".join(
        [
            f"A {guest_levels}-level guest maps GVA {gva & ~0xFFF:#x} to GPA {gpa:#x}; memslot 0"
            f" puts that GPA at HVA {hva:#x} of the VMM. The registers and roots:",
            *registers,
            f"During the guest's first read of GVA {gva:#x}, "
            + ROOT_WALKS[walk].format(gva=gva, gpa=gpa, hva=hva)
            + ". At which address does that walk start (the root table's address, as the"
            " walk uses it)? Answer in hex.",
        ]
    )
    hint = (
        "Three trees, one shape: the guest's tables (GVA -> GPA, root in the guest's CR3, a"
        " GPA), EPT (GPA -> HPA, root in the EPTP's bits M-1:12) and the VMM's host tables"
        " (HVA -> HPA, root in the VMM process's CR3). With EPT off the CPU walks KVM's"
        " shadow tables (GVA -> HPA) instead of the guest's."
    )
    owner = {
        "gva": "the guest's page tables",
        "gpa": "EPT",
        "hva": "the VMM process's host page tables",
        "gva-shadow": "KVM's shadow page tables",
    }[walk]
    solution = "\n".join(
        [
            f"The trace of the read records this walk of {owner}:",
            format_walk(record),
            f"It starts at {expected:#x}.",
            f"Answer: {expected:#x}",
        ]
    )
    grader = Grader(
        expected,
        ValueReader(bare=(16, 10)),
        "give the root's address in hex, e.g. 0x7ff000",
        _mistakes(expected, [(value, f"Not {value:#x}: {why}.") for value, why in mistakes]),
        lambda given: f"Not {_hex(given)}: which tree does this walk use, and where is its root?",
    )
    return Question("roots", prompt, hint, solution, f"{expected:#x}", grader)


def _walk_of(trace: Trace, walk: str) -> WalkRecord:
    """The last walk of one kind in a trace: the one that translated the address (there
    are several in a first access, one per attempt)."""
    records: list[WalkRecord]
    if walk == "gva":
        records = [e.record for e in trace.of_type(GuestWalk)]
    elif walk == "gpa":
        records = [e.record for e in trace.of_type(EptWalk)]
    elif walk == "hva":
        records = [e.record for e in trace.of_type(HostWalk)]
    else:
        records = [e.record for e in trace.of_type(NativeWalk)]
    return records[-1]


def _seeded_roots(seed: int) -> Question:
    rng = seeded_rng("roots", seed)
    levels = rng.choice((4, 5))
    return roots_question(
        rng.choice(tuple(ROOT_WALKS)),
        guest_levels=levels,
        gva=_random_page(rng, levels) + rng.randrange(0, PAGE_SIZE, 8),
        gpa=rng.randrange(0x100, 0x600) << PAGE_SHIFT,
    )
