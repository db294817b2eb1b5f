"""The capstone: one page's HPA by hand through the EPT and through the memslot and the host's
tables (the same frame), then the cost of the next read after a swap-out."""

from __future__ import annotations

import re

import pytest
from exercise_support import address_field, right, wrong

from twodwalk.errors import TwodwalkError
from twodwalk.exercises import capstone_question, quiz

MAXPHYADDR = 46  # the capstone's Machine (the default CPU model)


def leaf_of(prompt: str) -> int:
    """The last raw entry the prompt lists: the leaf."""
    values = re.findall(r"level \d: the entry at 0x[0-9a-f]+ = (0x[0-9a-f]+)", prompt)
    assert len(values) == 4
    return int(values[-1], 16)


def test_part_1_is_the_ept_leaf_plus_the_offset() -> None:
    q = capstone_question("ept", gva=0x40_0ABC & ~7, gpa=0x30_0000)
    gpa = 0x30_0AB8
    hpa = address_field(leaf_of(q.prompt), MAXPHYADDR) | gpa & 0xFFF
    assert f"reached GPA {gpa:#x}" in q.prompt
    assert q.answer == f"{hpa:#x}"
    right(q, f"{hpa:#x}")
    assert "the page's first byte" in wrong(q, f"{hpa & ~0xFFF:#x}")
    assert "raw value" in wrong(q, f"{leaf_of(q.prompt):#x}")
    assert "the GPA itself" in wrong(q, f"{gpa:#x}")


def test_part_2_reaches_the_same_frame_through_the_memslot_and_host_tables() -> None:
    ept = capstone_question("ept", gpa=0x30_0000)
    q = capstone_question("host", gpa=0x30_0000)
    slot = re.search(r"\n\s+0\s+0\s+(0x[0-9a-f]+)-0x[0-9a-f]+\s+(0x[0-9a-f]+)", q.prompt)
    assert slot is not None
    base_gpa, userspace_addr = (int(g, 16) for g in slot.groups())
    hva = userspace_addr + 0x30_0008 - base_gpa  # __gfn_to_hva_memslot, plus the offset
    hpa = address_field(leaf_of(q.prompt), MAXPHYADDR) | hva & 0xFFF
    assert q.answer == f"{hpa:#x}" == ept.answer, "two trees, one frame"
    assert f"HVA {hva:#x}" in q.solution
    assert "That is the HVA: now walk" in wrong(q, f"{hva:#x}")
    assert "the memslot turns it into an HVA" in wrong(q, "0x300008")


def test_part_3_one_ept_violation_after_a_swap_out() -> None:
    q = capstone_question("swap-out")
    assert q.answer == "1"
    right(q, "1")
    assert "zapped the EPT entry (kvm_unmap_gfn_range)" in wrong(q, "0")
    assert "only the data page's EPT entry went" in wrong(q, "5")
    assert "inside KVM's hva_to_pfn" in wrong(q, "2")
    assert "swap-in from swap offset" in q.solution


@pytest.mark.parametrize("seed", range(6))
def test_seeded_capstone_parts_agree(seed: int) -> None:
    q = quiz(seed, "capstone")
    assert q.topic == "capstone"
    if q.answer.startswith("0x"):
        gva = int(re.findall(r"GVA (0x[0-9a-f]+)", q.prompt)[0], 16) if "GVA" in q.prompt else None
        gpa = int(re.findall(r"GPA (0x[0-9a-f]+)", q.prompt)[0], 16)
        for part in ("ept", "host"):
            kwargs = {"gpa": gpa & ~0xFFF} | ({"gva": gva} if gva is not None else {})
            if gva is None:  # part 2 names only the GPA: the GVA's offset is the GPA's
                kwargs["gva"] = 0x40_0000 | gpa & 0xFFF
            assert capstone_question(part, **kwargs).answer == q.answer
    else:
        assert q.answer == "1"


def test_capstone_names_bad_input() -> None:
    with pytest.raises(TwodwalkError, match="part='npt' is not valid"):
        capstone_question("npt")
    with pytest.raises(TwodwalkError, match="gpa=0x7ff000 is out of range"):
        capstone_question("ept", gpa=0x7F_F000)
