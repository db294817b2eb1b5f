"""The indices exercises: answers computed by hand, typical mistakes and their feedback."""

from __future__ import annotations

from exercise_support import right, wrong

from twodwalk.exercises import (
    indices_question,
)

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
