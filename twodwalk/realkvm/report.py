"""One layout for every report of a comparison with real KVM (paging cases, access sequences,
memslot calls): a headline with how many were compared, how many disagreed and how fast, then
one aligned line per category, so the reports read alike in the terminal and the notebook."""

from __future__ import annotations

from collections.abc import Mapping


def headline(what: str, cases: int, agree: int, disagree: int, seconds: float | None = None) -> str:
    """`what: cases, agree: .., disagree: ..[, rate cases/s]` (cases that neither agree nor
    disagree matched a known quirk)."""
    text = f"{what}: {cases}, agree: {agree}, disagree: {disagree}"
    if seconds is not None:
        text += f", {cases / max(seconds, 1e-9):.0f} cases/s"
    return text


def count_lines(counts: Mapping[str, int], label: str = "") -> list[str]:
    """One indented line per category, names aligned, counts right-aligned."""
    width = max((len(name) for name in counts), default=0)
    return [f"  {label}{name:<{width}} {n:6d}" for name, n in sorted(counts.items())]
