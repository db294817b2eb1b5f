"""The translate-2d exercises: the HPA found by hand from the prompt's raw words (SDM Vol 3C
29.3.2: every guest table address and the final GPA go through the EPT), and the feedback."""

from __future__ import annotations

import pytest
from exercise_support import (
    P_BIT,
    PS_BIT,
    address_field,
    gva_index,
    number_after,
    read_hexdump,
    right,
    wrong,
)

from twodwalk.errors import TwodwalkError
from twodwalk.exercises import quiz, translate_2d_question

EPT_READ = 1 << 0  # SDM Vol 3C table 29-2: bit 0 read access; an entry with bits 2:0 clear
EPT_RWX = 0b111  # is not present (29.3.2)
MAXPHYADDR = 48  # the question's machine (setups._nested_machine with 4-level EPT)

PAGES = [(0x40_0000, 0x20_0000), (0x40_3000, 0x45_1000), (0x7F12_3456_7000, 0x31_0000)]


def ept_by_hand(words: dict[int, int], eptp: int, gpa: int) -> tuple[int, int]:
    """GPA -> (HPA, leaf page size), walking 4-level EPT on the dump's words from the EPTP."""
    assert eptp >> 3 & 7 == 3, "EPTP bits 5:3: a walk of 4 levels"
    table = address_field(eptp, MAXPHYADDR)
    for level in (4, 3, 2, 1):
        entry = words[table + 8 * gva_index(gpa, level)]
        assert entry & EPT_RWX, f"EPT level {level} not present for {gpa:#x}"
        if level in (2, 3) and entry & PS_BIT:
            size = 1 << (12 + 9 * (level - 1))
            return address_field(entry, MAXPHYADDR) & ~(size - 1) | gpa & (size - 1), size
        table = address_field(entry, MAXPHYADDR)
    return table | gpa & 0xFFF, 4096


def walk_2d_by_hand(prompt: str) -> tuple[int, int]:
    """(GPA, HPA) of the prompt's read: the guest's walk, each table read at the HPA the EPT
    gives its GPA, then the data's GPA through the EPT."""
    words = read_hexdump(prompt)
    eptp = number_after(prompt, "EPTP =")
    gva = number_after(prompt, "The guest reads GVA")
    table_gpa = address_field(number_after(prompt, "CR3 ="), MAXPHYADDR)
    for level in (4, 3, 2, 1):
        table_hpa, _ = ept_by_hand(words, eptp, table_gpa)
        entry = words[table_hpa + 8 * gva_index(gva, level)]
        assert entry & P_BIT and not entry & PS_BIT, "the question's guest maps 4 KiB pages"
        table_gpa = address_field(entry, MAXPHYADDR)
    gpa = table_gpa | gva & 0xFFF
    return gpa, ept_by_hand(words, eptp, gpa)[0]


@pytest.mark.parametrize("seed", range(4))
def test_seeded_translate_2d_is_answerable_from_the_dump(seed: int) -> None:
    q = quiz(seed, "translate-2d")
    gpa, hpa = walk_2d_by_hand(q.prompt)
    assert q.answer == f"{hpa:#x}"
    right(q, f"{hpa:#x}")
    assert f"-> GPA {gpa:#x}" in q.solution
    assert "through the EPT too" in wrong(q, f"{gpa:#x}")


def test_translate_2d_by_hand() -> None:
    """Three pages touched; the read of 0x403abc: guest PTE -> GPA 0x451abc, in the 2 MiB
    EPT page of GPA 0x400000, which THP backs by one host huge page."""
    q = translate_2d_question(PAGES, 0x40_3ABC)
    gpa, hpa = walk_2d_by_hand(q.prompt)
    assert gpa == 0x45_1ABC
    assert hpa & 0x1F_FFFF == 0x05_1ABC, "a 2 MiB EPT page keeps GPA bits 20:0"
    assert q.answer == f"{hpa:#x}"
    assert "EPTP = 0x" in q.prompt and "the guest's CR3 = 0x7ff000" in q.prompt
    assert "-> EPT 2 MiB page" in q.solution and "(GPA bits 20:0)" in q.solution


def test_translate_2d_feedback() -> None:
    q = translate_2d_question(PAGES, 0x40_3ABC)
    hpa = int(q.answer, 16)
    assert "through the EPT too" in wrong(q, "0x451abc")
    assert "the EPT page's base" in wrong(q, f"{hpa & ~0x1F_FFFF:#x}")
    assert "not only bits 11:0" in wrong(q, f"{hpa & ~0x1F_FFFF | 0xABC:#x}")
    assert "the GVA itself" in wrong(q, "0x403abc")
    assert "its address is a GPA" in wrong(q, "0x451027"), "the guest PTE's raw value"
    assert "does not fault" in wrong(q, "EPT violation")
    assert "walk the guest's tables from CR3" in wrong(q, "0x1234")


def test_translate_2d_names_a_bad_mapping() -> None:
    with pytest.raises(
        TwodwalkError, match=r"gpa=0x7ff000 is out of range: valid is 1 MiB <= gpa < 6 MiB"
    ):
        translate_2d_question([(0x40_0000, 0x7F_F000)], 0x40_0000)
    with pytest.raises(TwodwalkError, match="gva=0x500000 is not valid: choose an address in a"):
        translate_2d_question(PAGES, 0x50_0000)
