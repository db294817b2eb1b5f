"""One layout for every report of a comparison with real KVM (paging cases, access sequences,
memslot calls): a headline with how many were compared, how many disagreed and how fast, then
one aligned line per category, so the reports read alike in the terminal and the notebook."""

from __future__ import annotations

import errno
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar


def headline(what: str, cases: int, agree: int, disagree: int, seconds: float | None = None) -> str:
    """`what: cases, agree: .., [known quirk: .., ]disagree: ..[, rate cases/s]`: every case
    is counted in the line (a known quirk is a case where real KVM departs from the manual
    in a way the report lists further down)."""
    quirks = cases - agree - disagree
    text = f"{what}: {cases}, agree: {agree}, "
    text += f"known quirk: {quirks}, " if quirks else ""
    text += f"disagree: {disagree}"
    if seconds is not None:
        text += f", {cases / max(seconds, 1e-9):.0f} cases/s"
    return text


def count_lines(counts: Mapping[str, int], label: str = "") -> list[str]:
    """One indented line per category, names aligned, counts right-aligned."""
    width = max((len(name) for name in counts), default=0)
    return [f"  {label}{name:<{width}} {n:6d}" for name, n in sorted(counts.items())]


def errno_name(code: int) -> str:
    """An ioctl's outcome as the reports name it: "success" for 0, else the errno's name."""
    return "success" if code == 0 else errno.errorcode[code]


class CallOutcome(Protocol):
    """One ioctl compared on both sides: the errno each returned (0: success)."""

    @property
    def real(self) -> int: ...

    @property
    def engine(self) -> int: ...

    @property
    def agree(self) -> bool: ...

    def describe(self) -> str: ...


OutcomeT = TypeVar("OutcomeT", bound=CallOutcome)


@dataclass
class CallReport(Generic[OutcomeT]):
    """Agreement counts of a run of ioctl calls, by category, and the calls that disagreed."""

    outcomes: list[OutcomeT] = field(default_factory=list)

    @property
    def disagreements(self) -> list[OutcomeT]:
        return [o for o in self.outcomes if not o.agree]

    def _table(self, what: str, category: Callable[[OutcomeT], str]) -> str:
        counts: dict[str, int] = {}
        for o in self.outcomes:
            counts[category(o)] = counts.get(category(o), 0) + 1
        calls, disagree = len(self.outcomes), len(self.disagreements)
        lines = [headline(what, calls, calls - disagree, disagree)]
        lines += count_lines(counts, "real KVM ")
        lines += [
            f"  DISAGREE {o.describe()}: real {errno_name(o.real)}, engine {errno_name(o.engine)}"
            for o in self.disagreements
        ]
        return "\n".join(lines)
