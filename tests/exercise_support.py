"""What the exercise tests share: the seeds and topics they run over, and how they check that
an answer is judged right or wrong."""

from __future__ import annotations

import re

from twodwalk.exercises import (
    TOPICS,
    Question,
)

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


# Hand-walk helpers and constants several topics use (SDM Vol 3A 4.5).
P_BIT, A_BIT, PS_BIT = 1, 1 << 5, 1 << 7
TOY_MAXPHYADDR = 36  # the toy tables' CPU (exercises: MAXPHYADDR 36)
LEVEL_NAMES = {4: "PML4E", 3: "PDPTE", 2: "PDE", 1: "PTE"}


def address_field(entry: int, maxphyaddr: int) -> int:
    """Bits M-1:12 of an entry: the table or page it names."""
    return entry & ((1 << maxphyaddr) - 1) & ~0xFFF


def gva_index(gva: int, level: int) -> int:
    return gva >> (12 + 9 * (level - 1)) & 0x1FF


def number_after(text: str, label: str) -> int:
    found = re.search(re.escape(label) + r"\s*(0x[0-9a-f]+)", text)
    assert found is not None, f"{label!r} not in {text!r}"
    return int(found.group(1), 16)


RAM_HVA = 0x7F00_0000_0000
BIOS_HVA = 0x7F10_0000_0000


def read_hexdump(text: str) -> dict[int, int]:
    """The 8-byte words a raw dump in a prompt shows (`views.text.hexdump_pages`), parsed
    back as a student would read it: a '*' line repeats the line above up to the next line
    shown. Words of pages the dump does not show are absent."""
    words: dict[int, int] = {}
    line = re.compile(r"^\s+(0x[0-9a-f]+):\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)$")
    repeating: tuple[int, int, int] | None = None  # (address after, first word, second word)
    for text_line in text.splitlines():
        if text_line == "*":
            assert repeating is not None, "a '*' line needs a line above it"
            continue
        found = line.match(text_line)
        if found is None:
            repeating = None
            continue
        address, first, second = (int(g, 16) for g in found.groups())
        if repeating is not None:  # lines a '*' stood for, if any
            for filled in range(repeating[0], address, 16):
                words[filled], words[filled + 8] = repeating[1], repeating[2]
        words[address], words[address + 8] = first, second
        repeating = (address + 16, first, second)
    return words
