"""The nested exercises: VM exits of an L2 read, counted by hand from the rules of nested EPT
(an EPT02 miss exits to L0; an EPT12 miss is reflected to L1 and costs a second exit)."""

from __future__ import annotations

import pytest
from exercise_support import right, wrong

from twodwalk.errors import TwodwalkError
from twodwalk.exercises import NESTED_HISTORIES, nested_question

EXPECTED = {
    # 4 L2 tables + the data, none in EPT12 or EPT02: 5 reflections + 5 shadowings
    "cold": 10,
    # the tables are shadowed already; the data page is new to EPT12: reflect, then shadow
    "neighbour": 2,
    # INVEPT dropped all of EPT02, EPT12 still maps all 5 GPAs: 5 shadowings
    "invept": 5,
    # L1 cleared one EPT12 leaf; the trap zapped its EPT02 leaf: reflect, then shadow
    "l1-unmap": 2,
    # the host's reclaim zapped the EPT02 leaf made from the L1 page; EPT12 is intact
    "host-swap": 1,
}


def test_every_history_is_counted_by_hand() -> None:
    assert set(EXPECTED) == set(NESTED_HISTORIES)


@pytest.mark.parametrize(("history", "exits"), sorted(EXPECTED.items()))
def test_exit_counts(history: str, exits: int) -> None:
    q = nested_question(history)
    assert q.answer == str(exits)
    right(q, str(exits))


def test_feedback() -> None:
    q = nested_question("neighbour")
    assert "took two exits: one L0 reflected to L1" in wrong(q, "1")
    cold = nested_question("cold")
    assert "each GPA EPT12 did not map took two exits" in wrong(cold, "5")
    assert "the data page alone" in wrong(cold, "2")
    assert "go GPA by GPA" in wrong(cold, "7")
    with pytest.raises(TwodwalkError, match="history='warm' is not valid"):
        nested_question("warm")
    with pytest.raises(TwodwalkError, match="offset=0x3 is not"):
        nested_question("cold", offset=3)
