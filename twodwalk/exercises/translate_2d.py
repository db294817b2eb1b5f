"""Topic 'translate-2d': the two-dimensional walk by hand, from raw host memory (SDM Vol 3C
29.3.2). The student gets the EPTP and the guest's CR3 as raw register values and the host
pages that hold KVM's EPT and the guest's page tables as raw 8-byte words, and must find the
HPA a guest read reaches: every guest table address, and the data's GPA, goes through the
EPT before it can be read. The machine is a real `Machine`: KVM filled the EPT on first
touches (with THP behind guest RAM, 2 MiB EPT pages), and the answer is the vCPU's access."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from twodwalk.engine.kvm.mmu import TdpMmu
from twodwalk.engine.machine import Machine
from twodwalk.engine.processor import AccessResult
from twodwalk.engine.trace import GuestWalk
from twodwalk.engine.units import HUGE_PAGE_SIZE, MIB, PAGE_SIZE, size_text
from twodwalk.engine.walker import WalkRecord
from twodwalk.errors import TwodwalkError, check_aligned, check_int
from twodwalk.exercises.grading import (
    Grader,
    Question,
    Value,
    ValueReader,
    _hex,
    _mistakes,
    seeded_rng,
)
from twodwalk.exercises.setups import _GUEST_RAM, _cold_access, _nested_machine, _random_page
from twodwalk.views.text import format_2d_walk, hexdump_pages

_DATA_GPAS = (MIB, _GUEST_RAM - 2 * MIB)  # data pages; the guest's tables fill the top 2 MiB
_NOT_AN_HPA = "no hpa"
_NOT_AN_HPA_WORDS = dict.fromkeys(
    ("fault", "#pf", "page fault", "ept violation", "not mapped", "not present"), _NOT_AN_HPA
)


def translate_2d_question(mappings: Sequence[tuple[int, int]], gva: int) -> Question:
    """Which HPA a read of `gva` reaches, by hand from raw memory: the guest maps each
    (gva, gpa) 4 KiB page of `mappings`, all of them have been touched (so KVM's EPT maps
    their GPAs and the guest's tables, and every A bit on their paths is set), and the
    question gives the EPTP, CR3 and the raw host pages of both trees."""
    machine = _nested_machine(4, 4, thp=True)
    for page_gva, gpa in mappings:
        _check_mapping(page_gva, gpa)
        machine.guest.map(page_gva, gpa, PAGE_SIZE, rw=1, us=1)
        machine.vcpu.access(page_gva, "read")  # first touch: the guest's walk sets every A
    if not any(page_gva == gva & ~(PAGE_SIZE - 1) for page_gva, _ in mappings):
        raise TwodwalkError(f"gva={gva:#x} is not valid: choose an address in a mapped page")
    dump = hexdump_pages(machine.host.memory, _table_pages(machine), "HPA")
    eptp, cr3 = machine.vm.ept.eptp.value, machine.vcpu.cr3
    result = _cold_access(machine, gva)
    assert result.hpa is not None and result.gpa is not None  # every page was touched
    ept_leaf = machine.vm.ept.get_walk(result.gpa)
    prompt = (
        f"A 4-level guest runs under KVM with EPT. EPTP = {eptp:#x}; the guest's CR3 ="
        f" {cr3:#x}. The host pages that hold the EPT and the guest's page tables, as raw"
        " 8-byte words (a '*' line stands for lines that repeat the one above):\n"
        f"{dump}\n"
        f"The guest reads GVA {gva:#x}, with nothing cached. Which HPA does the read reach?"
        " Answer in hex."
    )
    hint = (
        "EPTP bits 5:3 are the EPT walk length minus 1, bits 51:12 the EPT root. CR3 and"
        " every address in a guest entry are GPAs: before reading a guest table, translate"
        " its GPA through the EPT (GPA bits 47:39, 38:30, 29:21, 20:12 index the EPT tables;"
        " bits 2:0 of an EPT entry are R, W, X, all clear when it is not present, whatever bit"
        " 63 (suppress #VE) says; bit 7 in an EPT PDE maps 2 MiB). The guest's"
        " tables sit close together, so one EPT walk may serve several of them. Last, the"
        " data's GPA goes through the EPT too."
    )
    solution = "\n".join(
        [
            format_2d_walk(result.trace),
            f"GVA {gva:#x} -> GPA {result.gpa:#x} (the guest's walk, rows 1-4)",
            _final_step(result.gpa, result.hpa, ept_leaf),
            f"Answer: {result.hpa:#x}",
        ]
    )
    grader = Grader(
        result.hpa,
        ValueReader(bare=(16, 10), words=_NOT_AN_HPA_WORDS),
        "give a host-physical address in hex (0x1234abc or 1234abc) or decimal",
        _mistakes(result.hpa, _translate_2d_mistakes(machine.vm.ept, result, ept_leaf)),
        _explainer(result),
    )
    return Question("translate-2d", prompt, hint, solution, _hex(result.hpa), grader)


def _check_mapping(gva: int, gpa: int) -> None:
    check_aligned("gva", check_int("gva", gva, 0, 1 << 47, valid="a user GVA below 2**47"), 4096)
    check_int("gpa", gpa, *_DATA_GPAS, valid="1 MiB <= gpa < 6 MiB (the guest's tables sit above)")
    check_aligned("gpa", gpa, PAGE_SIZE)


def _table_pages(machine: Machine) -> set[int]:
    """The host frames of both trees: the EPT's tables, and each guest table at the HPA the
    EPT gives its GPA (KVM's own look-up, which sets no A/D bit)."""
    ept = machine.vm.ept
    pages = {e.entry_address & ~(PAGE_SIZE - 1) for e in ept.tables.entries()}
    for entry in machine.guest.page_tables.entries():
        translation = ept.get_walk(entry.entry_address).translation
        assert translation is not None  # the first touches mapped every guest table
        pages.add(translation.address & ~(PAGE_SIZE - 1))
    return pages


def _final_step(gpa: int, hpa: int, ept_leaf: WalkRecord) -> str:
    page_size = _leaf_size(ept_leaf)
    base = hpa & ~(page_size - 1)
    return (
        f"GPA {gpa:#x} -> EPT {size_text(page_size)} page {base:#x} + offset"
        f" {gpa & (page_size - 1):#x} (GPA bits {page_size.bit_length() - 2}:0) = {hpa:#x}"
    )


def _leaf_size(record: WalkRecord) -> int:
    translation = record.translation
    assert translation is not None
    return translation.page_size


def _translate_2d_mistakes(
    ept: TdpMmu, result: AccessResult, ept_leaf: WalkRecord
) -> list[tuple[Value, str]]:
    """The numbers a student meets on the way and may give by mistake."""
    assert result.gpa is not None and result.hpa is not None
    gpa, hpa = result.gpa, result.hpa
    page_size = _leaf_size(ept_leaf)
    base = hpa & ~(page_size - 1)
    guest = result.trace.of_type(GuestWalk)[-1].record
    items: list[tuple[Value, str]] = [
        (
            gpa,
            "That is the data's GPA (the guest PTE's page plus the offset): the CPU"
            " translates it through the EPT too, to an HPA.",
        ),
        (
            base,
            f"That is the EPT page's base: add the GPA's offset in the"
            f" {size_text(page_size)} page.",
        ),
        (
            base | gpa & 0xFFF,
            f"The EPT leaf maps {size_text(page_size)}: the offset is GPA bits"
            f" {page_size.bit_length() - 2}:0, not only bits 11:0.",
        ),
        (guest.address, "That is the GVA itself: walk both trees to its HPA."),
    ]
    for step in guest.steps:
        name = guest.format.level_name(step.level)
        table_hpa = ept.get_walk(step.entry_address).translation
        assert table_hpa is not None
        items += [
            (
                table_hpa.address,
                f"That is where the guest's {name} sits in host memory, not what it maps.",
            ),
            (step.value, f"That is the guest {name}'s raw value: its address is a GPA."),
        ]
    items += [
        (step.value, f"That is the EPT {ept_leaf.format.level_name(step.level)}'s raw value.")
        for step in ept_leaf.steps
    ]
    return items


def _explainer(result: AccessResult) -> Callable[[Value], str]:
    def explain(given: Value) -> str:
        if not isinstance(given, int):
            return (
                "The read does not fault: every page was touched, so the guest's tables and"
                " KVM's EPT both map it. If an address led nowhere, it was a GPA read as if it"
                " were an HPA: CR3 and guest entries hold GPAs; translate each through the EPT"
                " first."
            )
        return (
            f"Not {given:#x}: walk the guest's tables from CR3, translating each table's GPA"
            " through the EPT before reading it, then translate the data's GPA the same way."
        )

    return explain


def _seeded_translate_2d(seed: int) -> Question:
    rng = seeded_rng("translate-2d", seed)
    region = _random_page(rng, 4, HUGE_PAGE_SIZE)
    slots = rng.sample(range(512), 3)
    gpas = rng.sample(range(_DATA_GPAS[0] // PAGE_SIZE, _DATA_GPAS[1] // PAGE_SIZE), 4)
    mappings = [(region | s << 12, g * PAGE_SIZE) for s, g in zip(slots, gpas, strict=False)]
    elsewhere = region ^ 1 << rng.randrange(30, 47) | rng.randrange(512) << 12  # other tables
    mappings.append((elsewhere, gpas[3] * PAGE_SIZE))
    page_gva = rng.choice(mappings)[0]
    return translate_2d_question(mappings, page_gva | rng.randrange(PAGE_SIZE))
