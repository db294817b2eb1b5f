"""The shadow exercises: answers computed by hand, typical mistakes and their feedback."""

from __future__ import annotations

import pytest
from exercise_support import right, wrong

from twodwalk.errors import TwodwalkError
from twodwalk.exercises import (
    shadow_question,
)

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
