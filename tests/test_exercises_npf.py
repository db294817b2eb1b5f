"""The npf exercises (AMD's #VMEXIT(NPF)): EXITINFO1 computed by hand from the APM (Vol 2
15.25.6) and KVM (paging_tmpl.h `nested_access`, x86.c `translate_nested_gpa`), and the
feedback for typical mistakes."""

from __future__ import annotations

import pytest
from exercise_support import right, wrong

from twodwalk.exercises import NPF_STORIES, TOPICS, npf_question, npt_entry_question

P, W, U, RSVD, ID = 1, 2, 4, 8, 16
FINAL, TABLE = 1 << 32, 1 << 33


@pytest.mark.parametrize(
    ("kind", "story", "exit_info1"),
    [
        # A guest table's GPA first: a user write for the nested walk, whatever the access.
        ("read", "first-touch", TABLE | W | U),
        ("fetch", "first-touch", TABLE | W | U),
        # Only the data page is new: the access as it is, as a user access, on the final GPA.
        ("read", "data-page", FINAL | U),
        ("write", "data-page", FINAL | W | U),
        ("fetch", "data-page", FINAL | U | ID),
        # Write-protected for dirty logging: the guest's table read is a write to a present
        # entry, even when the guest only reads.
        ("read", "dirty-logging", TABLE | P | W | U),
        # U/S=0 in the nested PTE: a present entry refuses the user access.
        ("read", "no-user", FINAL | P | U),
        ("write", "no-user", FINAL | P | W | U),
        ("fetch", "no-user", FINAL | P | U | ID),
    ],
)
def test_exit_info1(kind: str, story: str, exit_info1: int) -> None:
    assert npf_question(kind, story).answer == f"{exit_info1:#x}"


def test_notations_and_feedback() -> None:
    q = npf_question("read", "data-page")
    for answer in ("0x100000004", "100000004", "bits 2 32", "u final"):
        right(q, answer)
    message = wrong(q, "0x100000000")
    assert message.startswith("Not 0x100000000:\n  bit 2 (U) should be 1")
    assert "every nested access is a user access" in message
    first = npf_question("fetch", "first-touch")
    feedback = wrong(first, "0x100000014")
    assert "bit 1 (W) should be 1: the processor reads a guest page-table entry" in feedback
    assert "bit 33 (guest table) should be 1" in feedback


def test_the_topic_covers_every_story() -> None:
    prompts = {TOPICS["npf"](seed).prompt.split(". ")[1] for seed in range(40)}
    assert len(prompts) >= len(NPF_STORIES) - 1
    with pytest.raises(Exception, match="story='other' is not valid"):
        npf_question("read", "other")


# --- the nested leaf KVM writes -------------------------------------------------------------------

MMU_PRESENT, MMU_WRITABLE, HOST_WRITABLE = 1 << 11, 1 << 10, 1 << 9
PRESENT, RW, US, ACCESSED, DIRTY, PS = 1, 2, 4, 1 << 5, 1 << 6, 1 << 7
ALWAYS = PRESENT | US | ACCESSED | MMU_PRESENT
WRITABLE = RW | DIRTY | HOST_WRITABLE | MMU_WRITABLE


@pytest.mark.parametrize(
    ("story", "flags"),
    [
        # make_spte: P, U/S, A and KVM's present bit always; R/W, D and KVM's writable bits
        # with a writable host page; PS for a 2 MiB leaf.
        (
            "write",
            PRESENT | RW | US | ACCESSED | DIRTY | HOST_WRITABLE | MMU_WRITABLE | MMU_PRESENT,
        ),
        ("read-first", PRESENT | US | ACCESSED | MMU_PRESENT),
        ("thp-write", ALWAYS | WRITABLE | PS),
    ],
)
def test_nested_leaf_flags(story: str, flags: int) -> None:
    q = npt_entry_question(story, 0x20_0000)
    value = int(q.answer, 16)
    assert value & 0xFFF == flags and not value >> 63, "no NX: the guest may execute"
    frame = value & ~0xFFF & ((1 << 52) - 1)
    assert f"HPA {frame:#x}" in q.prompt, "the prompt gives the frame"


def test_nested_leaf_feedback_names_the_wrong_bits() -> None:
    q = npt_entry_question("write", 0x20_0000)
    value = int(q.answer, 16)
    right(q, q.answer)
    message = wrong(q, f"{value & ~US:#x}")
    assert "bit 2 (U/S) should be 1: every nested access is a user access" in message
    read = npt_entry_question("read-first", 0x20_0000)
    assert "the host maps the page read-only" in wrong(read, f"{int(read.answer, 16) | RW:#x}")
