"""The error-code exercises: answers computed by hand, typical mistakes and their feedback."""

from __future__ import annotations

import pytest
from exercise_support import right, wrong

from twodwalk.engine.paging import PagingControls
from twodwalk.exercises import (
    error_code_question,
)

# --- error codes ---------------------------------------------------------------------------------

ERROR_CODE_CASES = [
    # kind, cpl, us, rw, xd, present, expected (SDM 4.7: P=1, W/R=2, U/S=4, I/D=0x10)
    pytest.param("read", 3, 0, 1, 0, True, "0x5", id="user-read-supervisor-page"),
    pytest.param("write", 3, 1, 0, 0, True, "0x7", id="user-write-read-only"),
    pytest.param("write", 0, 1, 0, 0, True, "0x3", id="supervisor-write-read-only-wp"),
    pytest.param("fetch", 3, 1, 1, 1, True, "0x15", id="user-fetch-xd"),
    pytest.param("read", 0, 0, 0, 0, False, "0x0", id="supervisor-read-not-present"),
    pytest.param("write", 3, 1, 1, 0, False, "0x6", id="user-write-not-present"),
    pytest.param("fetch", 0, 0, 1, 0, False, "0x10", id="fetch-not-present"),
    pytest.param("read", 3, 1, 0, 1, True, "none", id="user-read-allowed"),
    pytest.param("write", 0, 0, 1, 0, True, "none", id="supervisor-write-allowed"),
]


@pytest.mark.parametrize(("kind", "cpl", "us", "rw", "xd", "present", "code"), ERROR_CODE_CASES)
def test_error_codes_follow_the_sdm(
    kind: str, cpl: int, us: int, rw: int, xd: int, present: bool, code: str
) -> None:
    q = error_code_question(kind, cpl, us=us, rw=rw, xd=xd, present=present)
    assert q.answer == code


def test_error_code_control_bits() -> None:
    no_wp = PagingControls(cr0_wp=False)
    assert error_code_question("write", 0, us=1, rw=0, xd=0, controls=no_wp).answer == "none"
    smep = PagingControls(cr4_smep=True)
    assert error_code_question("fetch", 0, us=1, rw=1, xd=0, controls=smep).answer == "0x11"
    smap = PagingControls(cr4_smap=True)
    assert error_code_question("read", 0, us=1, rw=1, xd=0, controls=smap).answer == "0x1"
    smap_ac = PagingControls(cr4_smap=True, rflags_ac=True)
    assert error_code_question("read", 0, us=1, rw=1, xd=0, controls=smap_ac).answer == "none"


def test_error_code_notations() -> None:
    q = error_code_question("read", 3, us=0, rw=1, xd=0)
    for answer in ("0x5", "5", "0X05", "0b101", "P U", "p|u/s", "P+U/S", "bits 0 2", "bits: 0, 2"):
        right(q, answer)
    allowed = error_code_question("read", 3, us=1, rw=1, xd=0)
    for answer in ("none", "No fault.", "no #PF"):
        right(allowed, answer)


def test_error_code_feedback_names_the_wrong_bits() -> None:
    q = error_code_question("read", 3, us=0, rw=1, xd=0)
    assert wrong(q, "4") == (
        "Not 0x4:\n  bit 0 (P) should be 1: the entry is present, so this is a protection fault:"
        " user-mode access to a supervisor-mode address (U/S=0 at some level)."
    )
    assert "bit 2 (U/S) should be 1: CPL 3: a user-mode access" in wrong(q, "1")
    assert "bit 1 (W/R) should be 0: a read is not a write" in wrong(q, "7")
    assert "bit 4 (I/D) should be 0" in wrong(q, "0x15")
    assert wrong(q, "none").startswith("The access does fault: user-mode access")
    supervisor = error_code_question("write", 0, us=1, rw=0, xd=0)
    assert "not the page's U/S bit" in wrong(supervisor, "0x7")
    not_present = error_code_question("write", 3, us=1, rw=1, xd=0, present=False)
    assert "bit 0 (P) should be 0: a not-present entry" in wrong(not_present, "7")
    allowed = error_code_question("read", 3, us=1, rw=1, xd=0)
    message = wrong(allowed, "0x5")
    assert "allow a user read" in message and "Answer 'none'" in message
