"""Topic 'error-code'."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from twodwalk.engine.paging import (
    PF_ERROR_CODE_BITS,
    PFERR_FETCH,
    PFERR_PK,
    PFERR_PRESENT,
    PFERR_RSVD,
    PFERR_USER,
    PFERR_WRITE,
    PageFault,
    PagingControls,
    exception_for,
)
from twodwalk.engine.units import PAGE_SIZE
from twodwalk.engine.walker import WalkFault, WalkRecord
from twodwalk.errors import TwodwalkError
from twodwalk.exercises.grading import (
    Bit,
    Grader,
    Question,
    Value,
    ValueReader,
    _bit_differences,
    _bit_lines,
    _explained,
    seeded_rng,
)
from twodwalk.exercises.indices import _translation
from twodwalk.exercises.setups import _DATA_GPA, _random_page, _toy_tables, _toy_walk
from twodwalk.views.text import format_walk, rights_text

# --- topic "error-code": the #PF error code (SDM Vol 3A 4.6, 4.7) ---------------------------------

_NO_FAULT = "none"
_NO_FAULT_WORDS = {
    w: _NO_FAULT for w in ("none", "no fault", "no #pf", "no pf", "no page fault", "no exception")
}
_PF_NAMES = {
    name: mask
    for names, mask in (
        (("p",), PFERR_PRESENT),
        (("w", "w/r", "wr", "r/w", "rw"), PFERR_WRITE),
        (("u", "u/s", "us"), PFERR_USER),
        (("rsvd",), PFERR_RSVD),
        (("i", "i/d", "id"), PFERR_FETCH),
        (("pk",), PFERR_PK),
    )
    for name in names
}


def error_code_question(
    kind: str,
    cpl: int,
    *,
    us: int,
    rw: int,
    xd: int,
    present: bool = True,
    controls: PagingControls | None = None,
    gva: int = 0x7F00_1234_5ABC,
) -> Question:
    """The #PF error code of one access, from the engine's walk (`translate`) and
    `exception_for`, as KVM's `walk_addr_generic` builds it."""
    controls = controls or PagingControls()
    memory, tables, cpu = _toy_tables(controls.levels)
    page = gva & ~(PAGE_SIZE - 1)
    tables.map(page, _DATA_GPA, PAGE_SIZE, us=us, rw=rw, xd=xd)
    if not present:
        tables.protect(page, PAGE_SIZE, p=0)  # a PTE that keeps its bits but is not present
    record = _toy_walk(tables, memory, cpu, gva, kind=kind, cpl=cpl, controls=controls)
    fault = exception_for(record, controls)
    code = fault.error_code if isinstance(fault, PageFault) else None
    answer = _NO_FAULT if code is None else f"{code:#x}"
    c = controls
    prompt = (
        f"A guest at CPL {cpl} does a {kind} at GVA {gva:#x}. The PTE that maps it has"
        f" P={int(present)}, R/W={rw}, U/S={us}, XD={xd}; the entries above it have P=1,"
        " R/W=1, U/S=1, XD=0.\n"
        f"Control bits: CR0.WP={int(c.cr0_wp)}, CR4.SMEP={int(c.cr4_smep)},"
        f" CR4.SMAP={int(c.cr4_smap)}, EFER.NXE={int(c.efer_nxe)},"
        f" EFLAGS.AC={int(c.rflags_ac)}.\n"
        "What #PF error code does the guest get? Answer in hex (e.g. 0x5), as bit names"
        " (e.g. 'P U'), or 'none' if the access does not fault."
    )
    hint = (
        "First decide whether SDM 4.6 allows the access: U/S and R/W must allow it at every"
        " level, XD blocks fetches, and CR0.WP, SMEP and SMAP change the supervisor rules."
        " If it faults (SDM 4.7): bit 0 P = the entry was present (a protection fault),"
        " bit 1 W/R = a write, bit 2 U/S = CPL 3, bit 4 I/D = a fetch (with NXE or SMEP)."
    )
    bits = [] if code is None else _pf_bits(record, cpl, code)
    outcome = (
        _allowed_text(record)
        if code is None
        else "The walk faults, so the guest gets #PF. The error code, bit by bit:"
    )
    lines = [format_walk(record), outcome]
    lines += [] if code is None else _bit_lines(bits, code)
    solution = "\n".join([*lines, f"Answer: {answer}"])
    expected: Value = _NO_FAULT if code is None else code
    grader = Grader(
        expected,
        ValueReader(bare=(16, 10), words=_NO_FAULT_WORDS, names=_PF_NAMES, bit_lists=True),
        "give the error code in hex (0x5 or 5), in decimal, as bit names ('P U'),"
        " or 'none' if there is no fault",
        {},
        _pf_explainer(record, bits, expected),
    )
    return Question("error-code", prompt, hint, solution, answer, grader)


def _allowed_text(record: WalkRecord) -> str:
    translation = _translation(record)
    mode = "user" if record.access.user else "supervisor"
    return (
        f"The accumulated rights {rights_text(translation.rights)} allow a {mode}"
        f" {record.access.kind.value} (SDM 4.6): no #PF."
    )


def _fault(record: WalkRecord) -> WalkFault:
    fault = record.fault
    if fault is None:
        raise TwodwalkError(f"the walk of {record.address:#x} did not fault")
    return fault


def _pf_bits(record: WalkRecord, cpl: int, code: int) -> list[Bit]:
    """Why each bit of the engine's error code has its value (SDM 4.7, table 4-22)."""
    detail, kind = _fault(record).detail, record.access.kind.value

    def bit(mask: int, if_set: str, if_clear: str) -> Bit:
        return _explained(PF_ERROR_CODE_BITS, mask, code, if_set, if_clear)

    return [
        bit(
            PFERR_PRESENT,
            f"the entry is present, so this is a protection fault: {detail}",
            f"a not-present entry: {detail}",
        ),
        bit(PFERR_WRITE, "the access is a write", f"a {kind} is not a write"),
        bit(
            PFERR_USER,
            "CPL 3: a user-mode access",
            f"CPL {cpl}: a supervisor-mode access (the bit tells who accessed, not the"
            " page's U/S bit)",
        ),
        bit(PFERR_RSVD, "a reserved bit is set", "no entry has a reserved bit set"),
        bit(
            PFERR_FETCH,
            "an instruction fetch, reported because EFER.NXE=1 or CR4.SMEP=1",
            f"a {kind} is not reported as an instruction fetch",
        ),
        bit(PFERR_PK, "PKRU blocks this access", "no protection-key violation"),
    ]


def _pf_explainer(
    record: WalkRecord, bits: Sequence[Bit], expected: Value
) -> Callable[[Value], str]:
    """Feedback on a wrong error code: the bits that differ, or fault versus no fault."""

    def explain(given: Value) -> str:
        if isinstance(expected, int) and isinstance(given, int):
            return _bit_differences(bits, expected, given)
        if isinstance(expected, int):
            return f"The access does fault: {_fault(record).detail}."
        return _allowed_text(record) + " Answer 'none'."

    return explain


def _seeded_error_code(seed: int) -> Question:
    rng = seeded_rng("error-code", seed)
    controls = PagingControls(
        cr0_wp=rng.random() < 0.75,
        cr4_smep=rng.random() < 0.5,
        cr4_smap=rng.random() < 0.5,
        rflags_ac=rng.random() < 0.25,
    )
    return error_code_question(
        rng.choice(("read", "write", "fetch")),
        rng.choice((0, 3)),
        us=rng.getrandbits(1),
        rw=rng.getrandbits(1),
        xd=rng.getrandbits(1),
        present=rng.random() > 0.15,
        controls=controls,
        gva=_random_page(rng, 4) + rng.randrange(PAGE_SIZE),
    )
