"""The grid exercises: which table reference k reads and which GPA its row translates, worked
by hand from the structure of the cold 2D walk (Bhargava et al., ASPLOS 2008; SDM Vol 3C
29.3.2): k - 1 = row x (m + 1) + column."""

from __future__ import annotations

import pytest
from exercise_support import right, wrong

from twodwalk.errors import TwodwalkError
from twodwalk.exercises import grid_question

# The default machine's guest tables: CR3 at GPA 0x7ff000, then PML4E -> 0x7fe000,
# PDPTE -> 0x7fd000, PDE -> 0x7fc000, PTE -> the data page 0x200000 (GVA 0x400008).


def test_reference_13_of_a_4x4_walk_reads_the_ept_pd_of_row_2() -> None:
    q = grid_question(13)  # 12 = 2 x 5 + 2: row 2, column 2 (EPT level 4 - 2 = 2)
    assert q.answer == "nL2"
    for answer in ("nL2", "nl2", "EPT PD", "ept pde"):
        right(q, answer)
    assert "that is the table row 2 locates" in wrong(q, "gL2")
    # Reference 12 (row 2, column 1) reads nL3; gL3 swaps the dimensions.
    assert "Not gL3: columns before the last are EPT levels (nL)" in wrong(grid_question(12), "gL3")
    assert "that is column 1" in wrong(q, "nL3") and "that is column 3" in wrong(q, "nL1")


@pytest.mark.parametrize(
    ("number", "table"), [(1, "nL4"), (5, "gL4"), (10, "gL3"), (20, "gL1"), (24, "nL1")]
)
def test_each_row_ends_with_its_guest_entry(number: int, table: str) -> None:
    assert grid_question(number).answer == table


def test_the_gpa_of_a_row_is_the_address_field_of_the_entry_before_it() -> None:
    q = grid_question(13, "gpa")  # row 2 locates the guest PD, named by the PDPTE
    assert q.answer == "0x7fd000"
    right(q, "7fd000")
    assert "that is the whole PDPTE" in wrong(q, "0x7fd027")
    assert "that is row 1's GPA" in wrong(q, "0x7fe000")
    assert grid_question(3, "gpa").answer == "0x7ff000", "row 0: the top table, at CR3"


def test_the_last_row_translates_the_data_s_whole_gpa() -> None:
    q = grid_question(21, "gpa")
    assert q.answer == "0x200008"
    assert wrong(q, "0x200000").startswith("Nearly: that is the data's page")


def test_a_5x5_walk_has_35_references_in_rows_of_6() -> None:
    q = grid_question(35, guest_levels=5, ept_levels=5)
    assert q.answer == "nL1" and "a cold walk of 35 memory references" in q.prompt
    assert grid_question(6, guest_levels=5, ept_levels=5).answer == "gL5"


def test_bad_input_is_named() -> None:
    with pytest.raises(TwodwalkError, match="number"):
        grid_question(25)
    with pytest.raises(TwodwalkError, match="ask"):
        grid_question(1, "hpa")
