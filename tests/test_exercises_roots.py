"""The roots exercises: answers computed by hand, typical mistakes and their feedback."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from exercise_support import (
    MIB,
    P_BIT,
    PS_BIT,
    address_field,
    gva_index,
    number_after,
    right,
    wrong,
)

from twodwalk.engine.machine import Machine
from twodwalk.exercises import (
    quiz,
    roots_question,
)
from twodwalk.exercises import roots as roots_topic

# --- roots (SDM Vol 3A 4.5: CR3; Vol 3C 29.3.2: the EPTP; KVM hva_to_pfn) ------------------------


def test_roots_are_the_registers_of_each_tree() -> None:
    gva, gpa, hva, shadow = (roots_question(w) for w in ("gva", "gpa", "hva", "gva-shadow"))
    # The guest allocates its tables from the top of its 8 MiB of RAM down: the root is first.
    assert gva.answer == f"{8 * MIB - 0x1000:#x}"
    assert f"guest CR3, as the guest loaded it:        {gva.answer}" in gva.prompt
    eptp = int(gpa.prompt.split("EPTP in the VMCS:")[1].split()[0], 16)
    assert gpa.answer == f"{eptp & ~0xFFF:#x}" and eptp & 0xFFF == 6 | (4 - 1) << 3 | 1 << 6
    vmm = hva.prompt.split("VMM process's CR3 on the host:")[1].split()[0]
    assert hva.answer == vmm
    assert len({gva.answer, gpa.answer, hva.answer}) == 3
    assert f"shadow tables for it:   {shadow.answer}" in shadow.prompt


def test_roots_feedback() -> None:
    gpa = roots_question("gpa")
    eptp = gpa.prompt.split("EPTP in the VMCS:")[1].split()[0]
    assert "That is the whole EPTP" in wrong(gpa, eptp)
    assert "root of the guest's own tables" in wrong(gpa, roots_question("gva").answer)
    hva = roots_question("hva")
    assert "That is the EPT root" in wrong(hva, gpa.answer)
    gva = roots_question("gva")
    assert "never walks them in hardware" in wrong(gva, hva.answer)
    shadow = roots_question("gva-shadow")
    assert "With EPT off the CPU never walks them" in wrong(shadow, gva.answer)
    right(gva, gva.answer.removeprefix("0x"))


# Seeded roots questions, checked by walking each tree by hand from the root the answer names
# (SDM Vol 3A 4.5.4 for the guest's, the host's and KVM's shadow tables; Vol 3C 29.3.2 for
# EPT, where an entry is present if any of bits 2:0 is set). M = 46, the machine's MAXPHYADDR.

MACHINE_MAXPHYADDR = 46


def hand_walk(
    read: Callable[[int], int], root: int, address: int, levels: int, *, ept: bool = False
) -> int:
    """The physical address `address` reaches from `root`, read entry by entry."""
    table = root
    for level in range(levels, 0, -1):
        slot = table + 8 * gva_index(address, level)
        entry = read(slot)
        assert entry & (0b111 if ept else P_BIT), f"level-{level} entry at {slot:#x} not present"
        if level == 1 or (level in (2, 3) and entry & PS_BIT):
            size = 1 << (12 + 9 * (level - 1))
            page = address_field(entry, MACHINE_MAXPHYADDR) & ~(size - 1)
            return page | address & (size - 1)
        table = address_field(entry, MACHINE_MAXPHYADDR)
    raise AssertionError("unreachable: level 1 always ends the walk")


def capture_machines(monkeypatch: pytest.MonkeyPatch) -> list[Machine]:
    """Record every Machine the roots topic builds (a test hook: questions keep none)."""
    machines: list[Machine] = []

    class Recording(Machine):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            machines.append(self)

    monkeypatch.setattr(roots_topic, "Machine", Recording)
    return machines


@pytest.mark.parametrize(("seed", "walk"), [(0, "gva"), (1, "gpa"), (8, "hva"), (5, "gva-shadow")])
def test_seeded_roots_walk_by_hand_to_the_data_page(
    monkeypatch: pytest.MonkeyPatch, seed: int, walk: str
) -> None:
    """The root the seeded question gives is the register the SDM names (CR3 bits M-1:12,
    Vol 3A 4.5.4; EPTP bits N-1:12, Vol 3C 25.6.11), and walking that tree by hand on the raw
    entries in the machine's memory reaches the question's data page."""
    machines = capture_machines(monkeypatch)
    q = quiz(seed, "roots")
    (machine,) = machines
    assert machine.cpu_model.maxphyaddr == MACHINE_MAXPHYADDR
    read = machine.memory.read_u64
    mask = ((1 << MACHINE_MAXPHYADDR) - 1) & ~0xFFF
    found = re.search(r"A (\d)-level guest", q.prompt)
    assert found is not None
    levels = int(found.group(1))
    gva = number_after(q.prompt, "first read of GVA")
    gpa = number_after(q.prompt, "to GPA")
    hva = number_after(q.prompt, "at HVA")
    cr3 = number_after(q.prompt, "guest CR3, as the guest loaded it:")
    vmm_cr3 = number_after(q.prompt, "the VMM process's CR3 on the host:")
    # The VMM's own tables (4-level host paging) put the data page's HVA at this frame:
    data_hpa = hand_walk(read, vmm_cr3 & mask, hva, 4)

    if walk == "gva-shadow":
        assert "EPTP" not in q.prompt
        shadow_root = number_after(q.prompt, "the root of KVM's shadow tables for it:")
        assert q.answer == f"{shadow_root:#x}"
        # The CPU walks KVM's shadow tables, GVA -> HPA, from that root to the same frame.
        assert hand_walk(read, shadow_root, gva, levels) == data_hpa | gva & 0xFFF
        assert "With EPT off the CPU never walks them" in wrong(q, f"{cr3:#x}")
        return

    eptp = number_after(q.prompt, "the EPTP in the VMCS:")
    assert (eptp >> 3 & 7) + 1 == 4, "EPTP bits 5:3: a 4-level EPT walk"
    ept_root = eptp & mask

    def ept(guest_physical: int) -> int:
        return hand_walk(read, ept_root, guest_physical, 4, ept=True)

    def guest_read(guest_physical: int) -> int:
        return read(ept(guest_physical))

    assert ept(gpa) == data_hpa, "EPT and the VMM's tables agree on the data page"
    assert hand_walk(guest_read, cr3 & mask, gva, levels) == gpa | gva & 0xFFF
    expected = {"gva": cr3 & mask, "gpa": ept_root, "hva": vmm_cr3 & mask}[walk]
    assert q.answer == f"{expected:#x}"
    if walk == "gva":
        root_hpa = ept(cr3 & mask)
        assert wrong(q, f"{root_hpa:#x}") == (
            f"Not {root_hpa:#x}: That is where the guest's root table sits in host memory,"
            " found through EPT; the register holds its guest-physical address."
        )
    elif walk == "gpa":
        assert wrong(q, f"{eptp:#x}").startswith(f"Not {eptp:#x}: That is the whole EPTP")
        assert "root of the guest's own tables" in wrong(q, f"{cr3:#x}")
    else:
        assert wrong(q, f"{ept_root:#x}").startswith(f"Not {ept_root:#x}: That is the EPT root")
