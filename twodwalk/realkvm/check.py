"""One call that runs every comparison with real KVM and says how it went, for the command
line and the notebook alike."""

from __future__ import annotations

from dataclasses import dataclass

from twodwalk.realkvm.device import RealKvm, unavailable_reason
from twodwalk.realkvm.guest_memfd import GmemReport, gmem_fuzz, gmem_unsupported
from twodwalk.realkvm.memslots import memslot_fuzz
from twodwalk.realkvm.report import headline


@dataclass(frozen=True)
class CheckResult:
    """The report text and whether anything disagreed (None: real KVM is not available)."""

    text: str
    disagreements: int | None


def check(
    cases: int = 1000, memslot_cases: int = 1000, seed: int = 0, sequence_cases: int = 200
) -> CheckResult:
    """Paging cases, access sequences, memslot and guest_memfd calls, MMIO exits and dirty
    logs on real KVM and on the engine."""
    reason = unavailable_reason()
    if reason is not None:
        return CheckResult(f"skipped: {reason}", None)
    from twodwalk.realkvm.mmio_and_dirty_log import dirty_log, readonly_and_hole
    from twodwalk.realkvm.paging import QUIRKS, paging_fuzz
    from twodwalk.realkvm.runtime import RealRunner
    from twodwalk.realkvm.sequences import ENGINE_DEFECTS, sequence_fuzz

    paging = paging_fuzz(cases, seed)
    sequences = sequence_fuzz(sequence_cases, seed)
    memslots = memslot_fuzz(memslot_cases, seed)
    gmem = _guest_memfd(memslot_cases, seed)
    runner = RealRunner()
    try:
        mmio = readonly_and_hole(runner)
    finally:
        runner.close()
    runner = RealRunner()
    try:
        logs = dirty_log(runner, seed)
    finally:
        runner.close()
    bad = [f"  DISAGREE {o.what}" for o in mmio if not o.agree]
    bad += [f"  DISAGREE dirty log round {o.round}" for o in logs if not o.agree]
    lines = [
        f"seed {seed}",
        paging.table(),
        sequences.table(),
        memslots.table(),
        gmem.table() if isinstance(gmem, GmemReport) else gmem,
        _headline("MMIO accesses (READONLY slot, hole)", [o.agree for o in mmio]),
        _headline("dirty-log rounds", [o.agree for o in logs]),
        *bad,
        "known quirks of KVM flavours (not engine rules):",
        *(f"  {q.name} ({q.module}): {q.description}" for q in QUIRKS),
        "known engine defects (to be fixed in the engine):",
        *(f"  {d.name} ({d.kernel}): {d.description}" for d in ENGINE_DEFECTS),
    ]
    total = len(paging.disagreements) + len(sequences.disagreements)
    total += len(memslots.disagreements) + len(bad)
    total += len(gmem.disagreements) if isinstance(gmem, GmemReport) else 0
    return CheckResult("\n".join(lines), total)


def _guest_memfd(cases: int, seed: int) -> GmemReport | str:
    """The guest_memfd comparison, or why this KVM cannot take part in it."""
    kvm = RealKvm()
    try:
        reason = gmem_unsupported(kvm)
    finally:
        kvm.close()
    return f"guest_memfd calls: skipped, {reason}" if reason else gmem_fuzz(cases, seed)


def _headline(what: str, agreed: list[bool]) -> str:
    return headline(what, len(agreed), sum(agreed), len(agreed) - sum(agreed))
