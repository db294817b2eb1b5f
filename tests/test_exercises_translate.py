"""The translate exercises: answers computed by hand, typical mistakes and their feedback."""

from __future__ import annotations

import pytest
from exercise_support import (
    A_BIT,
    LEVEL_NAMES,
    P_BIT,
    PS_BIT,
    TOY_MAXPHYADDR,
    address_field,
    gva_index,
    number_after,
    read_hexdump,
    right,
    wrong,
)

from twodwalk.engine.cpuid import CpuModel
from twodwalk.engine.memory import PhysicalMemory
from twodwalk.engine.pagetables import PageTables
from twodwalk.engine.units import HUGE_PAGE_SIZE
from twodwalk.errors import TwodwalkError
from twodwalk.exercises import (
    quiz,
    setups,
    translate_question,
)
from twodwalk.exercises import translate as translate_topic

# --- translate -----------------------------------------------------------------------------------

TOY = [
    (0x7F00_0000_0000, 0x30_0000, 4096),
    (0x7F00_0000_3000, 0x31_0000, 4096),
    (0x7F00_0020_0000, 0x80_0000, HUGE_PAGE_SIZE),
]


def test_translate_answers() -> None:
    assert translate_question(TOY, 0x7F00_0000_0ABC).answer == "0x300abc"
    assert translate_question(TOY, 0x7F00_0000_3FF8).answer == "0x310ff8"
    assert translate_question(TOY, 0x7F00_0021_2345).answer == "0x812345"
    assert translate_question(TOY, 0x7F00_0000_1ABC).answer == "fault"
    assert translate_question(TOY, 0x7F00_0060_0000).answer == "fault"


def test_translate_prompt_shows_raw_tables_before_any_walk() -> None:
    """CR3 and the table pages as raw words, nothing decoded: the PML4 at 0x1000 has entry
    254 (GVA bits 47:39 of 0x7f00_0000_0000) at 0x1000 + 8 x 254 = 0x17f0."""
    q = translate_question(TOY, 0x7F00_0000_0ABC)
    assert q.prompt.startswith("CR3 = 0x1000 (4-level paging")
    assert "GPA page 0x1000:\n  0x1000:  0x0000000000000000  0x0000000000000000\n*\n" in q.prompt
    assert "  0x17f0:  0x0000000000002007  0x0000000000000000" in q.prompt
    assert "0x0000000000300003" in q.prompt, "the PTE as built: no A bit set yet"
    assert "0x0000000000800083" in q.prompt, "the 2 MiB PDE, PS (bit 7) set"
    assert "->" not in q.prompt and "PTE" not in q.prompt, "nothing decoded"
    assert "page 0x300000 + offset 0xabc (GVA bits 11:0) = 0x300abc" in q.solution


def test_translate_host_space_names_hva_and_hpa() -> None:
    q = translate_question(TOY, 0x7F00_0000_0ABC, space="host")
    assert "A supervisor read of HVA 0x7f0000000abc: which HPA" in q.prompt
    assert "HPA page 0x1000:" in q.prompt and "VMM process" in q.prompt
    assert "the HVA itself" in wrong(q, "0x7f0000000abc")
    faulting = translate_question(TOY, 0x7F00_0000_1ABC, space="host")
    assert "host kernel's #PF handler" in faulting.solution


def test_translate_rejects_an_unknown_space() -> None:
    with pytest.raises(TwodwalkError, match=r"space='nested' is not valid.*guest.*host"):
        translate_question(TOY, 0x7F00_0000_0ABC, space="nested")


def test_translate_notations() -> None:
    q = translate_question(TOY, 0x7F00_0000_0ABC)
    for answer in ("0x300abc", "300ABC", str(0x300ABC), "gpa: 0x300abc", "0x0030_0abc"):
        right(q, answer)
    faulting = translate_question(TOY, 0x7F00_0000_1ABC)
    for answer in ("fault", "#PF", "Page fault", "not mapped"):
        right(faulting, answer)


def test_translate_feedback() -> None:
    q = translate_question(TOY, 0x7F00_0000_0ABC)
    assert "the page's base" in wrong(q, "0x300000")
    assert wrong(q, "0x310abc") == (
        "That is where GVA 0x7f0000003abc goes; for 0x7f0000000abc the PTE index"
        " (bits 20:12) is 0, not 3."
    )
    assert "where the PTE sits" in wrong(q, "0x4000")
    assert "raw value" in wrong(q, "0x300003")
    assert "the GVA itself" in wrong(q, "0x7f0000000abc")
    assert "does not fault" in wrong(q, "fault")
    assert "flags in its low bits" in wrong(q, f"{0x300003 + 0xABC:#x}")
    large = translate_question(TOY, 0x7F00_0021_2345)
    assert "low 21 bits of the GVA" in wrong(large, "0x800345")
    assert "(its bit 7, PS, is set)" in wrong(large, "fault"), "a PDE read as a table pointer"
    faulting = translate_question(TOY, 0x7F00_0060_0000)
    assert wrong(faulting, "0x812345") == (
        "The walk faults: PDE at 0x3018 is not present. Answer 'fault'."
    )


# Seeded translate questions, worked by hand on the raw entries (SDM Vol 3A 4.5.4, table 4-15
# to 4-20): index = GVA bits 47:39, 38:30, 29:21, 20:12; entry = 8 bytes at table + 8 * index;
# P = bit 0; PS = bit 7 in a PDE maps a 2 MiB page; the address is bits M-1:12 of the entry.


def capture_toy_memory(monkeypatch: pytest.MonkeyPatch) -> list[PhysicalMemory]:
    """Record the physical memory each toy question builds its tables in (a test hook on the
    private builder: the question keeps no reference to it)."""
    memories: list[PhysicalMemory] = []
    build = setups._toy_tables

    def recording(levels: int) -> tuple[PhysicalMemory, PageTables, CpuModel]:
        built = build(levels)
        memories.append(built[0])
        return built

    monkeypatch.setattr(translate_topic, "_toy_tables", recording)
    return memories


@pytest.mark.parametrize(
    ("seed", "ends"),
    [(0, "4k"), (4, "2m"), (2, "pte-not-present"), (5, "pde-not-present")],
)
def test_seeded_translate_follows_the_raw_entries(
    monkeypatch: pytest.MonkeyPatch, seed: int, ends: str
) -> None:
    """The seeded question's answer equals a 4-level walk done here on the 8-byte entries
    the prompt's raw dump shows (SDM Vol 3A 4.5.4), which are the question's memory as it was
    before the walk set A bits; and typical slips get specific feedback."""
    memories = capture_toy_memory(monkeypatch)
    q = quiz(seed, "translate")
    (memory,) = memories
    shown = read_hexdump(q.prompt)
    gva = number_after(q.prompt, "A supervisor read of GVA")
    table = number_after(q.prompt, "CR3 =")
    assert table == 0x1000
    used: dict[int, tuple[int, int]] = {}  # level -> (entry address, entry value)
    gpa: int | None = None
    for level in (4, 3, 2, 1):
        slot = table + 8 * gva_index(gva, level)
        entry = shown[slot]  # the student's copy
        assert entry == memory.read_u64(slot) & ~A_BIT, "the dump is memory before the walk"
        used[level] = (slot, entry)
        if not entry & P_BIT:
            break
        if level == 2 and entry & PS_BIT:
            gpa = address_field(entry, TOY_MAXPHYADDR) & ~0x1F_FFFF | gva & 0x1F_FFFF
            break
        if level == 1:
            gpa = address_field(entry, TOY_MAXPHYADDR) | gva & 0xFFF
        table = address_field(entry, TOY_MAXPHYADDR)
    stop_level = min(used)
    stop_slot, stop_entry = used[stop_level]

    if ends.endswith("not-present"):
        assert gpa is None and not stop_entry & P_BIT
        assert LEVEL_NAMES[stop_level] == {"pte": "PTE", "pde": "PDE"}[ends.split("-")[0]]
        assert q.answer == "fault"
        right(q, "#PF")
        # Ignoring P and adding the offset to a zero address is a typical slip:
        assert wrong(q, f"{gva & 0xFFF:#x}") == (
            f"The walk faults: {LEVEL_NAMES[stop_level]} at {stop_slot:#x} is not present."
            " Answer 'fault'."
        )
        return

    assert gpa is not None
    assert q.answer == f"{gpa:#x}"
    leaf = LEVEL_NAMES[stop_level]
    assert (stop_level, leaf) == ((1, "PTE") if ends == "4k" else (2, "PDE"))
    # Off by one level: the leaf's own address (read from the level above) is not the page.
    assert wrong(q, f"{stop_slot:#x}") == f"That is where the {leaf} sits, not what it points to."
    # The raw value as the prompt shows it: before the question's own read set A (SDM 4.8).
    assert wrong(q, f"{stop_entry:#x}") == (
        f"That is the {leaf}'s raw value: the address is in bits 51:12."
    )
    if ends == "2m":
        twelve = address_field(stop_entry, TOY_MAXPHYADDR) & ~0x1F_FFFF | gva & 0xFFF
        assert wrong(q, f"{twelve:#x}") == (
            "A 2 MiB page's offset is the low 21 bits of the GVA, not just bits 11:0."
        )
        return
    # Wrong index field: another present PTE of the same page table (a neighbour's page).
    pt = address_field(used[2][1], TOY_MAXPHYADDR)
    ours = gva_index(gva, 1)
    others = [i for i in range(512) if i != ours and memory.read_u64(pt + 8 * i) & P_BIT]
    assert others, "the seeded page table maps other pages too"
    other = others[0]
    other_gpa = address_field(memory.read_u64(pt + 8 * other), TOY_MAXPHYADDR) | gva & 0xFFF
    other_gva = gva & ~(0x1FF << 12) | other << 12
    assert wrong(q, f"{other_gpa:#x}") == (
        f"That is where GVA {other_gva:#x} goes; for {gva:#x} the PTE index (bits 20:12) is"
        f" {ours}, not {other}."
    )
