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
        # Without EPT, KVM intercepts both (SDM Vol 3C 25.6.2: CR3-load and INVLPG exiting);
        # with EPT it clears them (vmx.c: "CR3 accesses and invlpg don't need to cause VM
        # Exits when EPT enabled").
        (["mov-cr3"], 1, 0),
        (["invlpg-p"], 1, 0),
        # MOV to CR3 flushes the TLB but keeps the shadow root (fast_pgd_switch): P's shadow
        # entry is still there, so reading P again does not exit.
        (["mov-cr3", "read-p"], 1, 0),
        (["invlpg-p", "read-q"], 2, 1),
    ],
)
def test_shadow_exit_counts(actions: list[str], shadow: int, ept: int) -> None:
    assert shadow_question(actions).answer == str(shadow)
    assert shadow_question(actions, paging="ept").answer == str(ept)


def test_shadow_solution_names_kvms_handlers_of_cr3_and_invlpg() -> None:
    q = shadow_question(["mov-cr3", "invlpg-p"])
    assert "1. MOV to CR3 with its own page tables: 1 exit (CR_ACCESS (MOV to CR3))" in q.solution
    assert "kvm_mmu_new_pgd" in q.solution and "kvm_mmu_invlpg" in q.solution
    assert "2. INVLPG P: 1 exit (INVLPG)" in q.solution


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
