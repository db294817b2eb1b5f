"""Topic 'capstone': the tutorial's question, answered by hand. One guest page, after the guest
wrote it: find its HPA through the EPT (SDM Vol 3C 29.3.2), find it again through the memslot
and the host's page tables of the VMM (KVM's `__gfn_to_hva_memslot`, then the walk
`hva_to_pfn` makes), see that both trees lead to the same frame, then predict what the guest's
next access costs after the host swaps the page out (the MMU notifier zaps the EPT entry:
`kvm_mmu_notifier_invalidate_range_start` -> `kvm_unmap_gfn_range`)."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from twodwalk.engine.machine import Machine
from twodwalk.engine.trace import HostPageFault, VmExit
from twodwalk.engine.units import MIB, PAGE_SIZE
from twodwalk.engine.walker import WalkRecord, WalkStep
from twodwalk.errors import check_aligned, check_choice, check_int
from twodwalk.exercises.grading import (
    Grader,
    Question,
    Value,
    ValueReader,
    _hex,
    _mistakes,
    seeded_rng,
)
from twodwalk.exercises.setups import _DATA_GPA, _GUEST_RAM, _random_page
from twodwalk.exercises.tlb import _count_reader
from twodwalk.views.text import format_trace, format_walk, info_memslots
from twodwalk.whatifs import page_of, swap_out

CAPSTONE_PARTS: Mapping[str, str] = MappingProxyType(
    {
        "ept": "the HPA through the EPT, as the CPU finds it",
        "host": "the HPA through the memslot and the host's page tables, as KVM finds it",
        "swap-out": "the VM exits of the next read after the host swaps the page out",
    }
)
_NO_EXIT_WORDS = frozenset({"none", "no exit", "no exits", "0 exits"})


def _written_page(gva: int, gpa: int) -> tuple[Machine, int]:
    """A guest that has written its page at `gva` (so the host gave it a real, writable
    frame, not the zero page), and the HPA the write reached."""
    machine = Machine(guest_ram=_GUEST_RAM, gbpages=False)
    machine.guest.map(gva & ~(PAGE_SIZE - 1), gpa, PAGE_SIZE, rw=1, us=1)
    result = machine.vcpu.access(gva, "write", 0xC0FFEE)
    assert result.hpa is not None
    return machine, result.hpa


def _entries(record: WalkRecord) -> str:
    """The entries of a walk as raw values where they sit, top level first: the numbers a
    student reads, not what they mean."""
    return "\n".join(
        f"  level {s.level}: the entry at {s.entry_address:#x} = {s.value:#018x}"
        for s in record.steps
    )


def capstone_question(part: str, *, gva: int = 0x40_0008, gpa: int = _DATA_GPA) -> Question:
    """One part of the capstone (a key of `CAPSTONE_PARTS`) for the page at `gva`, which the
    guest maps to `gpa` and has written once: the same machine for every part."""
    check_choice("part", part, tuple(CAPSTONE_PARTS))
    check_int("gva", gva, 0, 1 << 47, valid="a user GVA below 2**47")
    check_aligned(
        "gpa", check_int("gpa", gpa, MIB, 6 * MIB, valid="1 MiB <= gpa < 6 MiB"), PAGE_SIZE
    )
    machine, hpa = _written_page(gva, gpa)
    data_gpa = gpa | gva & 0xFFF
    if part == "ept":
        return _through_ept(machine, gva, data_gpa, hpa)
    if part == "host":
        return _through_host(machine, gva, data_gpa, hpa)
    return _after_swap_out(machine, gva, data_gpa, hpa)


def _hpa_grader(hpa: int, items: list[tuple[Value, str]], how: str) -> Grader:
    return Grader(
        hpa,
        ValueReader(bare=(16, 10)),
        "give a host-physical address in hex (0x1234abc or 1234abc) or decimal",
        _mistakes(hpa, items),
        lambda given: f"Not {given:#x}: {how}" if isinstance(given, int) else how,
    )


def _leaf_mistakes(leaf: WalkStep, hpa: int, name: str, space: str) -> list[tuple[Value, str]]:
    """The numbers on the way to the HPA through a leaf: its page's first byte, its raw value
    and where it sits."""
    return [
        (hpa & ~(PAGE_SIZE - 1), f"That is the page's first byte: add the {space}'s offset."),
        (leaf.value, f"That is the {name}'s raw value: the address is bits 51:12."),
        (leaf.entry_address, f"That is where the {name} sits, not the page it maps."),
    ]


def _through_ept(machine: Machine, gva: int, gpa: int, hpa: int) -> Question:
    record = machine.vm.ept.get_walk(gpa)
    leaf = record.steps[-1]
    prompt = (
        f"The guest wrote to GVA {gva:#x}; its page-table walk reached GPA {gpa:#x}."
        f" KVM's EPTP is {machine.vm.ept.eptp.value:#x}. The EPT entries the CPU reads for"
        f" that GPA, as raw values:\n{_entries(record)}\n"
        "Part 1 of 3: which host-physical address did the write reach? Answer in hex."
    )
    hint = (
        "An EPT leaf's address is in bits 51:12 (bits 63:52 and 11:0 are flags, including"
        " KVM's software bits); add the GPA's offset in the page (bits 11:0 for a 4 KiB leaf)."
    )
    solution = "\n".join([format_walk(record), f"Answer: {hpa:#x}"])
    items = [
        *_leaf_mistakes(leaf, hpa, "EPT leaf", "GPA"),
        (gpa, "That is the GPA itself: the EPT maps it to an HPA."),
    ]
    how = "take the last entry's bits 51:12 and add the GPA's bits 11:0."
    return Question("capstone", prompt, hint, solution, _hex(hpa), _hpa_grader(hpa, items, how))


def _through_host(machine: Machine, gva: int, gpa: int, hpa: int) -> Question:
    page = page_of(machine, gva, gpa)
    hva = page.hva | gpa & 0xFFF
    record = machine.host.walk(machine.vmm, hva, False)
    leaf = record.steps[-1]
    slots = info_memslots(machine.vm.memslots.slots.values())
    prompt = (
        f"The same page from the other side. The guest's write reached GPA {gpa:#x}. KVM's"
        f" memslots:\n{slots}\nThe VMM's page tables start at"
        f" {machine.vmm.tables.root:#x}; the host's entries on the way to the HVA of that"
        f" GPA, as raw values:\n{_entries(record)}\n"
        "Part 2 of 3: which HVA does KVM compute for the GPA, and which host-physical address"
        " do the VMM's page tables map it to? Answer with the HPA, in hex."
    )
    hint = (
        "HVA = the slot's userspace_addr + (GPA - the slot's guest_phys_addr). The host's"
        " entries are ordinary x86-64 page-table entries: the address is in bits 51:12; add"
        " the HVA's offset in the page."
    )
    solution = "\n".join(
        [
            f"GPA {gpa:#x} -> HVA {hva:#x} (memslot: userspace_addr + offset in the slot)",
            format_walk(record),
            f"Answer: {hpa:#x}, the frame the EPT walk of part 1 reached: two different"
            " trees, with different roots and formats, lead to one frame, because KVM built"
            " the EPT entry from this host mapping on the first touch.",
        ]
    )
    items = [
        (hva, "That is the HVA: now walk the VMM's page tables to the HPA."),
        *_leaf_mistakes(leaf, hpa, "host PTE", "HVA"),
        (gpa, "That is the GPA: the memslot turns it into an HVA first."),
    ]
    how = "find the HVA through the memslot, then follow the host PTE to the page."
    return Question("capstone", prompt, hint, solution, _hex(hpa), _hpa_grader(hpa, items, how))


def _after_swap_out(machine: Machine, gva: int, gpa: int, hpa: int) -> Question:
    page = page_of(machine, gva, gpa)
    done = swap_out(machine, page)
    result = machine.vcpu.access(gva, "read")
    exits = result.trace.of_type(VmExit)
    faults = result.trace.of_type(HostPageFault)
    assert result.hpa is not None
    prompt = (
        f"The guest wrote GVA {gva:#x} (GPA {gpa:#x}, HPA {hpa:#x}). Now the host runs short"
        " of memory and swaps that page out: the VMM's host PTE becomes a swap entry and the"
        " frame is freed. The host's MMU notifiers tell KVM. Then the guest reads GVA"
        f" {gva:#x} again.\nPart 3 of 3: how many VM exits does that read take?"
    )
    hint = (
        "What did the MMU notifier do to the EPT? Which of the guest's page tables and EPT"
        " entries are still there? Who brings the page back, and when does KVM find out?"
    )
    solution = "\n".join(
        [
            f"{done}; kvm_mmu_notifier_invalidate_range_start zapped the EPT leaf of GPA"
            f" {gpa & ~0xFFF:#x}, and only that one.",
            format_trace(result.trace),
            f"{len(exits)} exit(s); the host faulted the page back in"
            f" ({len(faults)} host page fault) at HPA {result.hpa:#x}"
            + (" (the same frame)" if result.hpa == hpa else f", not {hpa:#x}")
            + ": the EPT entry KVM rebuilt points wherever the host put the page.",
            f"Answer: {len(exits)}",
        ]
    )
    items: list[tuple[Value, str]] = [
        (
            0,
            "Not 0: the MMU notifier zapped the EPT entry (kvm_unmap_gfn_range), so the CPU"
            " finds no mapping for the GPA and exits with an EPT violation; without"
            " notifiers the entry would point at a freed frame.",
        ),
        (
            5,
            "Not 5: only the data page's EPT entry went. The guest's page tables, and the"
            " EPT entries of their GPAs, are untouched: only the last step exits.",
        ),
        (
            2,
            "Not 2: the host page fault that brings the page back happens inside KVM's"
            " hva_to_pfn (get_user_pages), while handling the one EPT violation; it is not a"
            " VM exit.",
        ),
    ]
    grader = Grader(
        len(exits),
        _count_reader(_NO_EXIT_WORDS),
        "give the number of VM exits in decimal",
        _mistakes(len(exits), items),
        lambda given: f"Not {given}: follow the read step by step: which walk fails first?",
    )
    return Question("capstone", prompt, hint, solution, str(len(exits)), grader)


def _seeded_capstone(seed: int) -> Question:
    rng = seeded_rng("capstone", seed)
    gva = _random_page(rng, 4) | rng.randrange(PAGE_SIZE // 8) * 8
    gpa = rng.randrange(MIB // PAGE_SIZE, 6 * MIB // PAGE_SIZE) * PAGE_SIZE
    return capstone_question(rng.choice(tuple(CAPSTONE_PARTS)), gva=gva, gpa=gpa)
