"""The references exercises: answers computed by hand, typical mistakes and their feedback."""

from __future__ import annotations

import pytest
from exercise_support import right, wrong

from twodwalk.engine.units import HUGE_PAGE_SIZE
from twodwalk.exercises import (
    references_question,
)

# --- references ----------------------------------------------------------------------------------


@pytest.mark.parametrize("guest_levels", [4, 5])
@pytest.mark.parametrize("ept_levels", [4, 5])
@pytest.mark.parametrize("guest_page", [4096, HUGE_PAGE_SIZE])
@pytest.mark.parametrize("ept_page", [4096, HUGE_PAGE_SIZE])
def test_reference_counts_follow_bhargava_et_al(
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
