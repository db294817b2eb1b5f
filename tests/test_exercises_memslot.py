"""The memslot exercises: answers computed by hand, typical mistakes and their feedback."""

from __future__ import annotations

import pytest
from exercise_support import BIOS_HVA, GIB, RAM_HVA, right, wrong

from twodwalk.engine.kvm.memslots import KVM_MEM_READONLY
from twodwalk.exercises import (
    memslot_question,
)

# --- memslots ------------------------------------------------------------------------------------

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
