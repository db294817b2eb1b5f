"""The what-if exercises: answers computed by hand, typical mistakes and their feedback."""

from __future__ import annotations

import pytest
from exercise_support import MIB, right, wrong

from twodwalk.errors import TwodwalkError
from twodwalk.exercises import (
    what_if_question,
)

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
