"""The tlb exercises: answers computed by hand, typical mistakes and their feedback."""

from __future__ import annotations

import pytest
from exercise_support import right, wrong

from twodwalk.errors import TwodwalkError
from twodwalk.exercises import (
    tlb_question,
)

# --- tlb (SDM Vol 3C 29.4; Vol 3A 4.10) ----------------------------------------------------------
# Worked by hand from the SDM (Vol 3C 29.4.3): n guest levels, m EPT levels; a PSC hit for level
# L skips the guest levels above L-1 and the EPT walk of the table it names; a guest-physical
# mapping skips one EPT walk (m references); an EPT PDE-cache hit leaves 1 EPT reference of an
# EPT walk. The guest tables (top of RAM) share one 2 MiB GPA region, the data pages another,
# and "read A" walked both, so after it every EPT walk of these GPAs starts at an EPT PT.


@pytest.mark.parametrize(
    ("history", "final", "count"),
    [
        pytest.param([], "A", 24, id="caches-empty-worst-case"),
        pytest.param(["read A"], "A", 0, id="tlb-hit"),
        pytest.param(["read A"], "B", 1 + 1, id="pde-cache-then-final-gpa-walk"),
        pytest.param(["read A"], "C", 1 + (1 + 1) + 1, id="pdpte-cache"),
        pytest.param(["read A"], "D", 1 + 2 * (1 + 1) + 1, id="pml4e-cache"),
        pytest.param(["read A", "invlpg A"], "A", 4, id="invlpg-keeps-guest-physical"),
        pytest.param(["read A", "invvpid"], "A", 4, id="invvpid-keeps-guest-physical"),
        pytest.param(["read B", "mov-cr3"], "A", 4 + 1, id="cr3-tables-cached-data-not"),
        pytest.param(["read A", "invept"], "A", 24, id="invept-drops-everything"),
        pytest.param(["read A", "invlpg B"], "A", 0, id="invlpg-of-another-page"),
    ],
)
def test_tlb_counts(history: list[str], final: str, count: int) -> None:
    assert tlb_question(history, final).answer == str(count)


def test_tlb_counts_with_5_level_ept() -> None:
    assert tlb_question([], "A", ept_levels=5).answer == str((4 + 1) * (5 + 1) - 1)
    assert tlb_question(["read A"], "B", ept_levels=5).answer == str(1 + 1)
    assert tlb_question(["read A", "invept"], "B", ept_levels=5).answer == str(5 * 6 - 1)


def test_tlb_notations_and_feedback() -> None:
    hit = tlb_question(["read A"], "A")
    for answer in ("0", "hit", "TLB hit", "no walk"):
        right(hit, answer)
    assert "that is what a walk would cost. The TLB holds A (since step 1, read A)" in wrong(
        hit, "1"
    )
    assert "every cache empty" in wrong(hit, "24")
    after = tlb_question(["read A", "invlpg A"], "A")
    assert wrong(after, "0") == (
        "Not 0: The TLB has no entry for A (since step 2, INVLPG A). The read walks."
    )
    # Without guest-physical mappings the 4 table GPAs and the data GPA are walked, each from
    # an EPT PT that the EPT PDE cache names: 4 + 5 * 1.
    assert "the cost without guest-physical mappings" in wrong(after, "9")
    assert "counts the data access too" in wrong(after, "5")
    neighbour = tlb_question(["read A"], "B")
    assert "counts only the guest entries; the walk also reads 1 EPT entries" in wrong(
        neighbour, "1"
    )
    assert "The PDE cache covers B's 2 MiB region (since step 1, read A)" in wrong(neighbour, "24")
    far = tlb_question(["read A"], "D")
    # Without the EPT's caches, D's PD, PT and data GPAs are walked from the EPT root:
    # 1 + (4 + 1) + (4 + 1) + 4.
    assert "the cost without the EPT's paging-structure caches" in wrong(far, "15")
    assert "The EPT PDE cache covers D's GPA (since step 1, read A)" in wrong(far, "15")
    # Without the PML4E cache: 4 guest reads; A's walk left the PML4 and PDPT GPAs in the
    # guest-physical mappings, so only D's PD, PT and data GPAs need EPT walks, each of them
    # from an EPT PT: 4 + 3 * 1.
    assert "the cost without paging-structure caches" in wrong(far, "7")


def test_tlb_prompt_and_solution() -> None:
    q = tlb_question(["read A", "mov-cr3"], "B")
    assert "1. read A" in q.prompt and "2. MOV to CR3" in q.prompt
    assert "one PDE, and the PT it points to, serve both" in q.prompt
    assert "No paging-structure cache covers B (since step 2, MOV to CR3)" in q.solution
    assert "= 4 guest entries + 1 EPT entries" in q.solution
    assert "The EPT PDE cache covers B's GPA (since step 1, read A)" in q.solution


def test_tlb_bad_steps() -> None:
    with pytest.raises(TwodwalkError, match=r"step='jump' is not valid: choose one of read"):
        tlb_question(["jump A"], "A")
    with pytest.raises(TwodwalkError, match=r"page='Z' is not valid"):
        tlb_question(["read Z"], "A")
    with pytest.raises(TwodwalkError, match=r"needs a page"):
        tlb_question(["invlpg"], "A")
    with pytest.raises(TwodwalkError, match=r"invept takes no page"):
        tlb_question(["invept A"], "A")
    with pytest.raises(TwodwalkError, match=r"final='E' is not valid"):
        tlb_question([], "E")
