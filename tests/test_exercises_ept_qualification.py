"""The ept-qualification exercises: answers computed by hand, typical mistakes and their
feedback."""

from __future__ import annotations

import pytest
from exercise_support import right, wrong

from twodwalk.exercises import (
    ept_qualification_question,
)

# --- EPT exit qualifications ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "which", "ept_ad", "qualification"),
    [
        # Table 28-7: bit 0 read, 1 write, 2 fetch, 5:3 EPT rights, 7 GVA valid, 8 final.
        ("read", "final", True, 0x181),
        ("write", "final", True, 0x182),
        ("fetch", "final", False, 0x184),
        ("read", "table", True, 0x83),
        ("fetch", "table", True, 0x83),
        ("fetch", "table", False, 0x81),
    ],
)
def test_qualifications(kind: str, which: str, ept_ad: bool, qualification: int) -> None:
    q = ept_qualification_question(kind, which=which, ept_ad=ept_ad)
    assert q.answer == f"{qualification:#x}"


def test_zero_page_write_reports_read_and_execute_rights() -> None:
    q = ept_qualification_question("write", first_read=True)
    assert q.answer == f"{0x1 << 1 | 0b101 << 3 | 1 << 7 | 1 << 8:#x}" == "0x1aa"
    assert "readable and executable, not writable" in wrong(q, "0x182")
    assert "bit 4 (writable) should be 0" in wrong(q, "0x1ba")


def test_qualification_notations_and_feedback() -> None:
    q = ept_qualification_question("read", which="table", ept_ad=True)
    for answer in ("0x83", "83", "131", "bits 0 1 7", "bits: 0, 1, 7", "read write gva-valid"):
        right(q, answer)
    message = wrong(q, "0x81")
    assert message.startswith("Not 0x81:\n  bit 1 (write) should be 1")
    assert "with EPT A/D flags on counts as a write too" in message
    assert "bit 8 (final GPA) should be 0" in wrong(q, "0x183")
    fetch = ept_qualification_question("fetch", which="table", ept_ad=False)
    assert "a data access even for a fetch: not a fetch" in wrong(fetch, "0x84")
