"""Seeded exercises (twodwalk.exercises): answers, notations, feedback, determinism, bad input.

Where a test states an expected answer, it is worked out here by hand (bit arithmetic, the
memslot formula, the SDM's error-code table, the reference-count formula), independently of the
engine that the exercises run. The seeded translate and roots questions are checked against
walks done here by hand on the raw 8-byte entries in the question's own memory (read with
`read_u64`, indexed and masked as SDM Vol 3A 4.5.4 and Vol 3C 29.3.2 say), never through the
engine's walker or the question's solution.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twodwalk.cpuid import CpuModel
from twodwalk.errors import TwodwalkError
from twodwalk.exercises import (
    SEED_LIMIT,
    TOPICS,
    Feedback,
    Question,
    ept_qualification_question,
    error_code_question,
    indices_question,
    memslot_question,
    number_readings,
    quiz,
    references_question,
    roots_question,
    setups,
    shadow_question,
    tlb_question,
    translate_question,
    what_if_question,
)
from twodwalk.exercises import roots as roots_topic
from twodwalk.exercises import translate as translate_topic
from twodwalk.kvm.memslots import KVM_MEM_READONLY
from twodwalk.machine import Machine
from twodwalk.memory import PhysicalMemory
from twodwalk.pagetables import PageTables
from twodwalk.paging import PagingControls
from twodwalk.units import HUGE_PAGE_SIZE

SEEDS = range(6)
ALL_TOPICS = sorted(TOPICS)
MIB = 1 << 20
GIB = 1 << 30


def wrong(question: Question, answer: str) -> str:
    """The feedback message for an answer that must be judged wrong."""
    feedback = question.check(answer)
    assert not feedback.correct, f"{answer!r} was accepted for {question.answer!r}"
    return feedback.message


def right(question: Question, answer: str) -> None:
    feedback = question.check(answer)
    assert feedback.correct, f"{answer!r} rejected for {question.answer!r}: {feedback.message}"


# --- every topic ---------------------------------------------------------------------------------


def test_topics_cover_the_required_ones() -> None:
    required = {"indices", "references", "error-code", "translate", "memslot", "ept-qualification"}
    assert required | {"tlb", "what-if", "roots", "shadow"} <= set(TOPICS)


@pytest.mark.parametrize("topic", ALL_TOPICS)
@pytest.mark.parametrize("seed", SEEDS)
def test_canonical_answer_is_accepted_and_shown(topic: str, seed: int) -> None:
    """Self-consistency only: the grader reads its own canonical answer back and the solution
    prints it. That the answer is *right* is checked against hand-worked values in each
    topic's section below (e.g. test_seeded_translate_follows_the_raw_entries)."""
    q = quiz(seed, topic)
    assert q.topic == topic
    assert q.check(q.answer) == Feedback(True, "Correct.")
    assert f"Answer: {q.answer}" in q.solution
    assert q.prompt and q.hint and q.solution.count("\n") >= 2


@pytest.mark.parametrize("topic", ALL_TOPICS)
def test_same_seed_same_question(topic: str) -> None:
    for seed in SEEDS:
        first, again = quiz(seed, topic), quiz(seed, topic)
        assert first == again
        assert (first.prompt, first.solution, first.answer) == (
            again.prompt,
            again.solution,
            again.answer,
        )
        assert TOPICS[topic](seed) == first


@pytest.mark.parametrize("topic", ALL_TOPICS)
def test_different_seeds_vary(topic: str) -> None:
    questions = [quiz(seed, topic) for seed in range(20)]
    assert len({q.prompt for q in questions}) >= 15
    assert len({q.answer for q in questions}) >= 3


def test_without_a_topic_the_seed_picks_one() -> None:
    picked = [quiz(seed) for seed in range(30)]
    assert len({q.topic for q in picked}) >= 4
    for seed, q in enumerate(picked):
        assert q == quiz(seed) == quiz(seed, q.topic)


@settings(max_examples=25)
@given(seed=st.integers(0, SEED_LIMIT - 1), topic=st.sampled_from(ALL_TOPICS))
def test_any_seed_builds_a_question(seed: int, topic: str) -> None:
    """Every seed in range builds a question without error (self-consistency again, not
    correctness: the grader reads its own answer back and the solution shows it)."""
    q = quiz(seed, topic)
    assert q.topic == topic and q.check(q.answer).correct
    assert q.answer in q.solution


@pytest.mark.parametrize("topic", ALL_TOPICS)
def test_unreadable_answers_say_what_format_is_expected(topic: str) -> None:
    q = quiz(0, topic)
    for junk in ("", "   ", "banana split", "0xZZ"):
        message = wrong(q, junk)
        assert message.startswith(f"Cannot read {junk!r}: give ")


def test_questions_and_feedback_are_frozen() -> None:
    q = quiz(1, "indices")
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.answer = "x"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.check(q.answer).correct = False  # type: ignore[misc]


# --- reading numbers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "bare", "readings"),
    [
        ("0x1F", (16, 10), (31,)),
        ("1f", (10,), (31,)),
        ("1fh", (10,), (31,)),
        ("0b101", (16,), (5,)),
        ("0x7f00_1234", (16,), (0x7F00_1234,)),
        ("10", (16, 10), (16, 10)),
        ("10", (10,), (10,)),
        ("7", (16, 10), (7,)),
        ("0xg", (16,), ()),
        ("12.5", (10,), ()),
    ],
)
def test_number_readings(token: str, bare: tuple[int, ...], readings: tuple[int, ...]) -> None:
    assert number_readings(token.lower(), bare) == readings


# --- indices -------------------------------------------------------------------------------------


def test_indices_match_bit_arithmetic_4_and_5_level() -> None:
    gva = 0x7F00_1234_5ABC
    q = indices_question(gva)
    idx = [gva >> shift & 0x1FF for shift in (39, 30, 21, 12)]
    assert q.answer == f"PML4={idx[0]} PDPT={idx[1]} PD={idx[2]} PT={idx[3]} offset=0xabc"
    assert q.answer == "PML4=254 PDPT=0 PD=145 PT=325 offset=0xabc"
    gva5 = 0xFF12_3456_789A_BCDE
    q5 = indices_question(gva5, levels=5)
    idx5 = [gva5 >> shift & 0x1FF for shift in (48, 39, 30, 21, 12)]
    assert q5.answer == (
        f"PML5={idx5[0]} PML4={idx5[1]} PDPT={idx5[2]} PD={idx5[3]} PT={idx5[4]} offset=0xcde"
    )


def test_indices_notations() -> None:
    q = indices_question(0x7F00_1234_5ABC)
    for answer in (
        "254 0 145 325 0xabc",
        "254, 0, 145, 325, abc",
        "PML4: 254  PDPT: 0  PD: 145  PT: 325  offset: ABC",
        "fe 0 91 145 abc",
        "0xfe 0x0 0x91 0x145 0xabc",
        "254 0 145 325 2748",
        "[254, 0, 145, 325, 0xabc]",
    ):
        right(q, answer)


def test_indices_feedback() -> None:
    q = indices_question(0x7F00_1234_5ABC)
    assert "wrong order" in wrong(q, "325 145 0 254 0xabc")
    assert "9 bits (0..511), so PD cannot be right" in wrong(q, "254 0 1145 325 0xabc")
    assert wrong(q, "254 0 145 326 0xabc") == (
        "Not all right: check PT (bits 20:12); the other parts are right."
    )
    message = wrong(indices_question(0xFF12_3456_789A_BCDE, levels=5), "1 2 3 4 0x5")
    assert "5 indices and an offset: give 6 numbers" in message
    assert "you gave 5" in message


# --- references ----------------------------------------------------------------------------------


@pytest.mark.parametrize("guest_levels", [4, 5])
@pytest.mark.parametrize("ept_levels", [4, 5])
@pytest.mark.parametrize("guest_page", [4096, HUGE_PAGE_SIZE])
@pytest.mark.parametrize("ept_page", [4096, HUGE_PAGE_SIZE])
def test_reference_counts_follow_facts_f(
    guest_levels: int, ept_levels: int, guest_page: int, ept_page: int
) -> None:
    q = references_question(guest_levels, ept_levels, guest_page=guest_page, ept_page=ept_page)
    n = guest_levels - (guest_page == HUGE_PAGE_SIZE)
    m = ept_levels - (ept_page == HUGE_PAGE_SIZE)
    assert q.answer == str((n + 1) * (m + 1) - 1)


def test_classic_counts() -> None:
    assert references_question(4, 4).answer == "24"
    assert references_question(4, 5).answer == references_question(5, 4).answer == "29"
    assert references_question(5, 5).answer == "35"


def test_references_notations() -> None:
    q = references_question(4, 4)
    for answer in ("24", " 24 ", "0x18", "24."):
        right(q, answer)


def test_references_typical_mistakes_4x4() -> None:
    q = references_question(4, 4)
    assert wrong(q, "16") == (
        "Not 16: that counts only the EPT reads of the guest tables: add the 4 guest entries"
        " themselves and the 4 EPT reads for the final GPA."
    )
    assert "forgets the EPT walk of the final GPA" in wrong(q, "20")
    assert "adds the two walks as if each ran once" in wrong(q, "8")
    assert "counts the data access too" in wrong(q, "25")
    assert "guest walk alone, as on bare metal" in wrong(q, "4")
    assert "4 KiB pages here" in wrong(q, "19")
    assert wrong(q, "30").startswith("Not 30: count, per guest level")


def test_references_mistakes_with_large_pages() -> None:
    both = references_question(4, 4, guest_page=HUGE_PAGE_SIZE, ept_page=HUGE_PAGE_SIZE)
    assert both.answer == "15"
    message = wrong(both, "24")
    assert "2 MiB guest pages end the guest walk" in message
    assert "2 MiB EPT pages end every EPT walk" in message
    assert "2 MiB guest pages" in wrong(both, "19")
    assert "add the 3 guest entries" in wrong(both, "9")
    guest_only = references_question(4, 4, guest_page=HUGE_PAGE_SIZE)
    assert guest_only.answer == "19"
    assert "2 MiB guest pages end the guest walk" in wrong(guest_only, "24")


def test_references_solution_shows_the_per_level_sums() -> None:
    solution = references_question(4, 4).solution
    assert "Total: 5 + 5 + 5 + 5 + 4 = 24" in solution
    assert "final GPA    4 EPT reads" in solution
    assert " 24   EPT PTE (final GPA)" in solution


# --- error codes ---------------------------------------------------------------------------------

ERROR_CODE_CASES = [
    # kind, cpl, us, rw, xd, present, expected (SDM 4.7: P=1, W/R=2, U/S=4, I/D=0x10)
    pytest.param("read", 3, 0, 1, 0, True, "0x5", id="user-read-supervisor-page"),
    pytest.param("write", 3, 1, 0, 0, True, "0x7", id="user-write-read-only"),
    pytest.param("write", 0, 1, 0, 0, True, "0x3", id="supervisor-write-read-only-wp"),
    pytest.param("fetch", 3, 1, 1, 1, True, "0x15", id="user-fetch-xd"),
    pytest.param("read", 0, 0, 0, 0, False, "0x0", id="supervisor-read-not-present"),
    pytest.param("write", 3, 1, 1, 0, False, "0x6", id="user-write-not-present"),
    pytest.param("fetch", 0, 0, 1, 0, False, "0x10", id="fetch-not-present"),
    pytest.param("read", 3, 1, 0, 1, True, "none", id="user-read-allowed"),
    pytest.param("write", 0, 0, 1, 0, True, "none", id="supervisor-write-allowed"),
]


@pytest.mark.parametrize(("kind", "cpl", "us", "rw", "xd", "present", "code"), ERROR_CODE_CASES)
def test_error_codes_follow_the_sdm(
    kind: str, cpl: int, us: int, rw: int, xd: int, present: bool, code: str
) -> None:
    q = error_code_question(kind, cpl, us=us, rw=rw, xd=xd, present=present)
    assert q.answer == code


def test_error_code_control_bits() -> None:
    no_wp = PagingControls(cr0_wp=False)
    assert error_code_question("write", 0, us=1, rw=0, xd=0, controls=no_wp).answer == "none"
    smep = PagingControls(cr4_smep=True)
    assert error_code_question("fetch", 0, us=1, rw=1, xd=0, controls=smep).answer == "0x11"
    smap = PagingControls(cr4_smap=True)
    assert error_code_question("read", 0, us=1, rw=1, xd=0, controls=smap).answer == "0x1"
    smap_ac = PagingControls(cr4_smap=True, rflags_ac=True)
    assert error_code_question("read", 0, us=1, rw=1, xd=0, controls=smap_ac).answer == "none"


def test_error_code_notations() -> None:
    q = error_code_question("read", 3, us=0, rw=1, xd=0)
    for answer in ("0x5", "5", "0X05", "0b101", "P U", "p|u/s", "P+U/S", "bits 0 2", "bits: 0, 2"):
        right(q, answer)
    allowed = error_code_question("read", 3, us=1, rw=1, xd=0)
    for answer in ("none", "No fault.", "no #PF"):
        right(allowed, answer)


def test_error_code_feedback_names_the_wrong_bits() -> None:
    q = error_code_question("read", 3, us=0, rw=1, xd=0)
    assert wrong(q, "4") == (
        "Not 0x4:\n  bit 0 (P) should be 1: the entry is present, so this is a protection fault:"
        " user-mode access to a supervisor-mode address (U/S=0 at some level)."
    )
    assert "bit 2 (U/S) should be 1: CPL 3: a user-mode access" in wrong(q, "1")
    assert "bit 1 (W/R) should be 0: a read is not a write" in wrong(q, "7")
    assert "bit 4 (I/D) should be 0" in wrong(q, "0x15")
    assert wrong(q, "none").startswith("The access does fault: user-mode access")
    supervisor = error_code_question("write", 0, us=1, rw=0, xd=0)
    assert "not the page's U/S bit" in wrong(supervisor, "0x7")
    not_present = error_code_question("write", 3, us=1, rw=1, xd=0, present=False)
    assert "bit 0 (P) should be 0: a not-present entry" in wrong(not_present, "7")
    allowed = error_code_question("read", 3, us=1, rw=1, xd=0)
    message = wrong(allowed, "0x5")
    assert "allow a user read" in message and "Answer 'none'" in message


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


def test_translate_prompt_shows_the_tables_before_any_walk() -> None:
    q = translate_question(TOY, 0x7F00_0000_0ABC)
    assert "root table at 0x1000" in q.prompt
    assert "-> page 0x800000 (2 MiB)" in q.prompt
    assert "0x0000000000300003 -> page 0x300000" in q.prompt, "no A bit set yet"
    assert "page 0x300000 + offset 0xabc (GVA bits 11:0) = 0x300abc" in q.solution


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
    large = translate_question(TOY, 0x7F00_0021_2345)
    assert "low 21 bits of the GVA" in wrong(large, "0x800345")
    faulting = translate_question(TOY, 0x7F00_0060_0000)
    assert wrong(faulting, "0x812345") == (
        "The walk faults: PDE at 0x3018 is not present. Answer 'fault'."
    )


# Seeded translate questions, worked by hand on the raw entries (SDM Vol 3A 4.5.4, table 4-15
# to 4-20): index = GVA bits 47:39, 38:30, 29:21, 20:12; entry = 8 bytes at table + 8 * index;
# P = bit 0; PS = bit 7 in a PDE maps a 2 MiB page; the address is bits M-1:12 of the entry.

P_BIT, A_BIT, PS_BIT = 1, 1 << 5, 1 << 7
TOY_MAXPHYADDR = 36  # the toy tables' CPU (exercises: MAXPHYADDR 36)
LEVEL_NAMES = {4: "PML4E", 3: "PDPTE", 2: "PDE", 1: "PTE"}


def address_field(entry: int, maxphyaddr: int) -> int:
    """Bits M-1:12 of an entry: the table or page it names."""
    return entry & ((1 << maxphyaddr) - 1) & ~0xFFF


def gva_index(gva: int, level: int) -> int:
    return gva >> (12 + 9 * (level - 1)) & 0x1FF


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


def number_after(text: str, label: str) -> int:
    found = re.search(re.escape(label) + r"\s*(0x[0-9a-f]+)", text)
    assert found is not None, f"{label!r} not in {text!r}"
    return int(found.group(1), 16)


@pytest.mark.parametrize(
    ("seed", "ends"),
    [(0, "4k"), (4, "2m"), (2, "pte-not-present"), (5, "pde-not-present")],
)
def test_seeded_translate_follows_the_raw_entries(
    monkeypatch: pytest.MonkeyPatch, seed: int, ends: str
) -> None:
    """The seeded question's answer equals a 4-level walk done here on the 8-byte entries in
    the question's memory (SDM Vol 3A 4.5.4), and typical slips get specific feedback."""
    memories = capture_toy_memory(monkeypatch)
    q = quiz(seed, "translate")
    (memory,) = memories
    gva = number_after(q.prompt, "A supervisor read of GVA")
    table = number_after(q.prompt, "root table at")
    assert table == 0x1000
    used: dict[int, tuple[int, int]] = {}  # level -> (entry address, entry value)
    gpa: int | None = None
    for level in (4, 3, 2, 1):
        slot = table + 8 * gva_index(gva, level)
        entry = memory.read_u64(slot)
        used[level] = (slot, entry)
        if not entry & P_BIT:
            break
        # The student's copy: the prompt lists the entry as it was before the walk set A.
        assert f"@ {slot:#x} = {entry & ~A_BIT:#018x}" in q.prompt
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
    assert wrong(q, f"{stop_entry & ~A_BIT:#x}") == (
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


# --- memslots ------------------------------------------------------------------------------------

RAM_HVA = 0x7F00_0000_0000
BIOS_HVA = 0x7F10_0000_0000
SLOTS = [
    (0, 0, 0, GIB, RAM_HVA),
    (1, 0, 4 * GIB, GIB, RAM_HVA + GIB),
    (2, KVM_MEM_READONLY, 0xFFFC_0000, 0x4_0000, BIOS_HVA),
]


@pytest.mark.parametrize(
    ("gpa", "answer"),
    [
        (0x1234_5678, f"{RAM_HVA + 0x1234_5678:#x}"),
        (4 * GIB + 0x1234, f"{RAM_HVA + GIB + 0x1234:#x}"),
        (0xFFFC_1008, f"{BIOS_HVA + 0x1008:#x}"),
        (GIB - 1, f"{RAM_HVA + GIB - 1:#x}"),
        (GIB, "mmio"),
        (0xFEE0_0000, "mmio"),
        (5 * GIB, "mmio"),
    ],
)
def test_memslot_answers(gpa: int, answer: str) -> None:
    assert memslot_question(SLOTS, gpa).answer == answer


def test_memslot_notations_and_feedback() -> None:
    q = memslot_question(SLOTS, 4 * GIB + 0x1234)
    hva = RAM_HVA + GIB + 0x1234
    for answer in (f"{hva:#x}", f"{hva:X}", str(hva), f"hva = {hva:#x}"):
        right(q, answer)
    assert "subtract the slot's base GPA (0x100000000)" in wrong(q, f"{hva + 4 * GIB:#x}")
    assert "lies in slot 1, not slot 0" in wrong(q, f"{RAM_HVA + 4 * GIB + 0x1234:#x}")
    assert "offset into slot 1" in wrong(q, "0x1234")
    assert "That is the GPA itself" in wrong(q, f"{4 * GIB + 0x1234:#x}")
    assert "Slot 1 covers 0x100000000-0x13fffffff" in wrong(q, "mmio")
    hole = memslot_question(SLOTS, GIB + 0x10)
    for answer in ("mmio", "MMIO", "KVM_EXIT_MMIO", "no slot"):
        right(hole, answer)
    assert "past the end of slot 0 (which ends at 0x3fffffff)" in wrong(
        hole, f"{RAM_HVA + GIB + 0x10:#x}"
    )
    assert "answer 'mmio'" in wrong(hole, "0x1234")


# --- EPT exit qualifications ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "which", "ept_ad", "qualification"),
    [
        # Table 28-7: bit 0 read, 1 write, 2 fetch, 5:3 EPT rights, 7 GVA valid, 8 final.
        ("read", "final", True, 0x181),
        ("write", "final", True, 0x182),
        ("fetch", "final", False, 0x184),
        ("read", "table", True, 0x83),
        ("fetch", "table", True, 0x83),
        ("fetch", "table", False, 0x81),
    ],
)
def test_qualifications(kind: str, which: str, ept_ad: bool, qualification: int) -> None:
    q = ept_qualification_question(kind, which=which, ept_ad=ept_ad)
    assert q.answer == f"{qualification:#x}"


def test_zero_page_write_reports_read_and_execute_rights() -> None:
    q = ept_qualification_question("write", first_read=True)
    assert q.answer == f"{0x1 << 1 | 0b101 << 3 | 1 << 7 | 1 << 8:#x}" == "0x1aa"
    assert "readable and executable, not writable" in wrong(q, "0x182")
    assert "bit 4 (writable) should be 0" in wrong(q, "0x1ba")


def test_qualification_notations_and_feedback() -> None:
    q = ept_qualification_question("read", which="table", ept_ad=True)
    for answer in ("0x83", "83", "131", "bits 0 1 7", "bits: 0, 1, 7", "read write gva-valid"):
        right(q, answer)
    message = wrong(q, "0x81")
    assert message.startswith("Not 0x81:\n  bit 1 (write) should be 1")
    assert "with EPT A/D flags on counts as a write too" in message
    assert "bit 8 (final) should be 0" in wrong(q, "0x183")
    fetch = ept_qualification_question("fetch", which="table", ept_ad=False)
    assert "a data access even for a fetch: not a fetch" in wrong(fetch, "0x84")


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seed", "match"),
    [
        (-1, r"seed=-0x1 is out of range: valid is 0 <= seed < 2\*\*63"),
        (SEED_LIMIT, r"seed=.* is out of range"),
        ("3", r"seed must be an integer, got '3' \(str\)"),
        (1.5, r"seed must be an integer, got 1.5 \(float\)"),
        (True, r"seed must be an integer, got True \(bool\)"),
    ],
)
def test_bad_seeds(seed: object, match: str) -> None:
    with pytest.raises(TwodwalkError, match=match):
        quiz(seed)  # type: ignore[arg-type]
    with pytest.raises(TwodwalkError, match=match):
        TOPICS["indices"](seed)  # type: ignore[arg-type]


def test_unknown_topic_lists_the_valid_ones() -> None:
    with pytest.raises(TwodwalkError, match=r"topic='cache' is not valid: choose one of indices,"):
        quiz(1, "cache")


def test_bad_builder_arguments() -> None:
    with pytest.raises(TwodwalkError, match=r"guest_page=8192 is not valid: choose 4096"):
        references_question(guest_page=8192)
    with pytest.raises(TwodwalkError, match=r"guest_levels='3' is not valid"):
        references_question(3, 4)
    with pytest.raises(TwodwalkError, match=r"which='data' is not valid: choose one of table"):
        ept_qualification_question("read", which="data")
    with pytest.raises(TwodwalkError, match=r"takes no EPT violation for the final page"):
        ept_qualification_question("read", first_read=True)
    with pytest.raises(TwodwalkError, match=r"gpa=0x1000 is out of range"):
        translate_question([(0x40_0000, 0x1000, 4096)], 0x40_0000)
    with pytest.raises(TwodwalkError, match=r"not canonical"):
        indices_question(0x8000_0000_0000)
    with pytest.raises(TwodwalkError, match=r"EEXIST"):
        memslot_question([(0, 0, 0, GIB, RAM_HVA), (1, 0, MIB, MIB, BIOS_HVA)], 0)


# --- tlb (SDM Vol 3C 29.4; Vol 3A 4.10) ----------------------------------------------------------
# Worked by hand from the SDM (Vol 3C 29.4.3): n guest levels, m EPT levels; a PSC hit for level
# L skips the guest levels above L-1 and the EPT walk of the table it names; a guest-physical
# mapping skips one EPT walk (m references); an EPT PDE-cache hit leaves 1 EPT reference of an
# EPT walk. The guest tables (top of RAM) share one 2 MiB GPA region, the data pages another,
# and "read A" walked both, so after it every EPT walk of these GPAs starts at an EPT PT.


@pytest.mark.parametrize(
    ("history", "final", "count"),
    [
        pytest.param([], "A", 24, id="caches-empty-worst-case"),
        pytest.param(["read A"], "A", 0, id="tlb-hit"),
        pytest.param(["read A"], "B", 1 + 1, id="pde-cache-then-final-gpa-walk"),
        pytest.param(["read A"], "C", 1 + (1 + 1) + 1, id="pdpte-cache"),
        pytest.param(["read A"], "D", 1 + 2 * (1 + 1) + 1, id="pml4e-cache"),
        pytest.param(["read A", "invlpg A"], "A", 4, id="invlpg-keeps-guest-physical"),
        pytest.param(["read A", "invvpid"], "A", 4, id="invvpid-keeps-guest-physical"),
        pytest.param(["read B", "mov-cr3"], "A", 4 + 1, id="cr3-tables-cached-data-not"),
        pytest.param(["read A", "invept"], "A", 24, id="invept-drops-everything"),
        pytest.param(["read A", "invlpg B"], "A", 0, id="invlpg-of-another-page"),
    ],
)
def test_tlb_counts(history: list[str], final: str, count: int) -> None:
    assert tlb_question(history, final).answer == str(count)


def test_tlb_counts_with_5_level_ept() -> None:
    assert tlb_question([], "A", ept_levels=5).answer == str((4 + 1) * (5 + 1) - 1)
    assert tlb_question(["read A"], "B", ept_levels=5).answer == str(1 + 1)
    assert tlb_question(["read A", "invept"], "B", ept_levels=5).answer == str(5 * 6 - 1)


def test_tlb_notations_and_feedback() -> None:
    hit = tlb_question(["read A"], "A")
    for answer in ("0", "hit", "TLB hit", "no walk"):
        right(hit, answer)
    assert "that is what a walk would cost. The TLB holds A (since step 1, read A)" in wrong(
        hit, "1"
    )
    assert "every cache empty" in wrong(hit, "24")
    after = tlb_question(["read A", "invlpg A"], "A")
    assert wrong(after, "0") == (
        "Not 0: The TLB has no entry for A (since step 2, INVLPG A). The read walks."
    )
    # Without guest-physical mappings the 4 table GPAs and the data GPA are walked, each from
    # an EPT PT that the EPT PDE cache names: 4 + 5 * 1.
    assert "the cost without guest-physical mappings" in wrong(after, "9")
    assert "counts the data access too" in wrong(after, "5")
    neighbour = tlb_question(["read A"], "B")
    assert "counts only the guest entries; the walk also reads 1 EPT entries" in wrong(
        neighbour, "1"
    )
    assert "The PDE cache covers B's 2 MiB region (since step 1, read A)" in wrong(neighbour, "24")
    far = tlb_question(["read A"], "D")
    # Without the EPT's caches, D's PD, PT and data GPAs are walked from the EPT root:
    # 1 + (4 + 1) + (4 + 1) + 4.
    assert "the cost without the EPT's paging-structure caches" in wrong(far, "15")
    assert "The EPT PDE cache covers D's GPA (since step 1, read A)" in wrong(far, "15")
    # Without the PML4E cache: 4 guest reads; A's walk left the PML4 and PDPT GPAs in the
    # guest-physical mappings, so only D's PD, PT and data GPAs need EPT walks, each of them
    # from an EPT PT: 4 + 3 * 1.
    assert "the cost without paging-structure caches" in wrong(far, "7")


def test_tlb_prompt_and_solution() -> None:
    q = tlb_question(["read A", "mov-cr3"], "B")
    assert "1. read A" in q.prompt and "2. MOV to CR3" in q.prompt
    assert "one PDE, and the PT it points to, serve both" in q.prompt
    assert "No paging-structure cache covers B (since step 2, MOV to CR3)" in q.solution
    assert "= 4 guest entries + 1 EPT entries" in q.solution
    assert "The EPT PDE cache covers B's GPA (since step 1, read A)" in q.solution


def test_tlb_bad_steps() -> None:
    with pytest.raises(TwodwalkError, match=r"step='jump' is not valid: choose one of read"):
        tlb_question(["jump A"], "A")
    with pytest.raises(TwodwalkError, match=r"page='Z' is not valid"):
        tlb_question(["read Z"], "A")
    with pytest.raises(TwodwalkError, match=r"needs a page"):
        tlb_question(["invlpg"], "A")
    with pytest.raises(TwodwalkError, match=r"invept takes no page"):
        tlb_question(["invept A"], "A")
    with pytest.raises(TwodwalkError, match=r"final='E' is not valid"):
        tlb_question([], "E")


# --- what-if (owners of each structure; MMU notifiers; memslot changes: KVM mmu.c, mm/) ---------


@pytest.mark.parametrize(
    ("what", "changed"),
    [
        ("swap-out", "host ept"),
        ("migrate", "host ept"),
        ("ksm-merge", "host ept"),
        ("thp-split", "host ept"),
        ("thp-collapse", "host ept"),
        ("munmap", "host ept"),
        ("memslot-move", "memslot ept"),
        ("memslot-delete", "memslot ept"),
        ("dirty-logging", "memslot ept"),
        ("guest-remap", "guest"),
        ("swap-out-without-notifiers", "host"),
    ],
)
def test_what_if_answers(what: str, changed: str) -> None:
    assert what_if_question(what).answer == changed
    assert what_if_question(what, guest_write=False).answer == changed


def test_what_if_notations() -> None:
    q = what_if_question("swap-out")
    for answer in (
        "host ept",
        "EPT entry and host PTE",
        "the host page-table entry, the EPT entry",
        "ept + host",
        "SPTE, host",
    ):
        right(q, answer)
    assert wrong(q, "none").startswith("Not 'none':")


def test_what_if_feedback_names_each_wrong_structure() -> None:
    stale = what_if_question("swap-out-without-notifiers")
    message = wrong(stale, "host ept")
    assert message.startswith("Not 'host ept':\n  the EPT entry does not change: with MMU")
    assert "still points at the frame the host just freed" in message
    remap = what_if_question("guest-remap")
    assert "a guest store to its own page table is an ordinary write" in wrong(remap, "guest ept")
    move = what_if_question("memslot-move")
    assert "the memslot does change: slot 0: GPA 0x0" in wrong(move, "ept")
    swap = what_if_question("swap-out")
    message = wrong(swap, "ept")
    assert "the host page-table entry does change: PTE = " in message and "not present" in message
    assert "memslots change only when the VMM calls" in wrong(swap, "memslot host ept")


def test_what_if_solution_quotes_kvm() -> None:
    assert "kvm_mmu_notifier_invalidate_range_start" in what_if_question("swap-out").solution
    assert "kvm_arch_flush_shadow_memslot" in what_if_question("memslot-delete").solution
    assert "CHANGED" in what_if_question("migrate").solution


def test_what_if_bad_input() -> None:
    with pytest.raises(TwodwalkError, match=r"what='reboot' is not valid"):
        what_if_question("reboot")
    with pytest.raises(TwodwalkError, match=r"gpa=0x1000000 is out of range"):
        what_if_question("swap-out", gpa=16 * MIB)


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


# --- shadow (KVM paging_tmpl.h: shadow paging; EPT violations) -----------------------------------


@pytest.mark.parametrize(
    ("actions", "shadow", "ept"),
    [
        (["read-p"], 0, 0),
        (["read-q"], 1, 1),
        (["read-q", "read-q"], 1, 1),
        (["write-p"], 1, 0),
        (["write-pte"], 1, 0),
        (["write-pte", "read-q"], 2, 1),
        (["read-unmapped"], 1, 0),
    ],
)
def test_shadow_exit_counts(actions: list[str], shadow: int, ept: int) -> None:
    assert shadow_question(actions).answer == str(shadow)
    assert shadow_question(actions, paging="ept").answer == str(ept)


def test_shadow_feedback_and_solution() -> None:
    q = shadow_question(["write-p", "write-pte"])
    assert "kvm_mmu_track_write" in q.solution and "With EPT on it would be 0 in all." in q.solution
    message = wrong(q, "0")
    assert message.startswith("Not 0: that is the count with EPT on. With EPT off")
    assert "1. write P: 1 exit (EXCEPTION_NMI (#PF))" in message
    for answer in ("2", " 2 ", "2."):
        right(q, answer)
    quiet = shadow_question(["read-p"])
    for answer in ("0", "none", "no exits"):
        right(quiet, answer)
    assert "not every action exits" in wrong(shadow_question(["read-p", "read-q"]), "2")
    with pytest.raises(TwodwalkError, match=r"action='jump' is not valid"):
        shadow_question(["jump"])
    with pytest.raises(TwodwalkError, match=r"paging='npt' is not valid"):
        shadow_question([], paging="npt")
