"""Topic 'references'."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from twodwalk.engine.trace import Reference
from twodwalk.engine.units import HUGE_PAGE_SIZE, PAGE_SIZE, size_text
from twodwalk.exercises.grading import Grader, Question, Value, ValueReader, _mistakes, seeded_rng
from twodwalk.exercises.setups import (
    _DATA_GPA,
    _check_page_size,
    _cold_access,
    _nested_machine,
    _random_page,
)
from twodwalk.views.text import format_2d_walk

# --- topic "references": the cost of a 2D walk (SDM Vol 3C 29.3.2; Bhargava et al.) ---------------


def references_question(
    guest_levels: int = 4,
    ept_levels: int = 4,
    *,
    guest_page: int = PAGE_SIZE,
    ept_page: int = PAGE_SIZE,
    gva: int = 0x40_0008,
) -> Question:
    """Count the memory references of a nested walk with empty translation caches, by running
    one on a `Machine` and counting `Trace.memory_references()`."""
    _check_page_size("guest_page", guest_page)
    _check_page_size("ept_page", ept_page)
    machine = _nested_machine(guest_levels, ept_levels, thp=ept_page == HUGE_PAGE_SIZE)
    machine.guest.map(
        gva & ~(guest_page - 1), _DATA_GPA, guest_page, page_size=guest_page, rw=1, us=1
    )
    trace = _cold_access(machine, gva).trace
    refs = trace.memory_references()
    groups = _reference_groups(refs)
    total, walked_n, walked_m = len(refs), len(groups) - 1, len(groups[-1].ept)
    answer = str(total)
    prompt = (
        f"A {guest_levels}-level guest runs under {ept_levels}-level EPT. The guest maps GVA"
        f" {gva:#x} with a {size_text(guest_page)} page; KVM maps guest RAM into EPT with"
        f" {size_text(ept_page)} pages"
        + (" (the VMM backs it with transparent huge pages)" if ept_page == HUGE_PAGE_SIZE else "")
        + ".\nThe EPT entries are all in place, but the TLB and every paging-structure cache"
        " are empty. How many memory references does the hardware walk make to translate the"
        " GVA into a host-physical address? (Count the walk's reads, not the data access.)"
    )
    hint = (
        "Every guest table is found by a guest-physical address, which must go through EPT"
        " before the guest entry can be read. Count per guest level (EPT reads + 1 guest read),"
        " then add the EPT walk of the final GPA. A 2 MiB page ends its walk one level early."
    )
    solution = "\n".join(
        [
            "Per guest level: the EPT reads that find the guest table, then the guest entry.",
            *(group.line() for group in groups),
            f"Total: {' + '.join(str(group.total) for group in groups)} = {total}",
            f"= (n+1)(m+1)-1 with n = {walked_n} guest and m = {walked_m} EPT levels walked"
            f" (Bhargava et al., ASPLOS 2008). The references, in the order the hardware"
            " makes them:",
            format_2d_walk(trace),
            f"Answer: {answer}",
        ]
    )
    full = (guest_levels, ept_levels)
    grader = Grader(
        total,
        ValueReader(bare=(10,)),
        "give the number of references in decimal, e.g. 17",
        _mistakes(total, _reference_mistakes(walked_n, walked_m, full)),
        lambda given: (
            f"Not {given}: count, per guest"
            " level, the EPT reads that find the table plus the guest entry, then the EPT"
            " reads of the final GPA."
        ),
    )
    return Question("references", prompt, hint, solution, answer, grader)


@dataclass(frozen=True)
class _RefGroup:
    """The references made for one guest level (the EPT reads that find its table, then the
    guest entry) or, last, for the final GPA (its EPT reads only)."""

    label: str
    ept: tuple[str, ...]
    guest_reads: int

    @property
    def total(self) -> int:
        return len(self.ept) + self.guest_reads

    def line(self) -> str:
        reads = f"{len(self.ept)} EPT reads ({', '.join(self.ept)})"
        own = " + 1 guest read" if self.guest_reads else ""
        return f"  {self.label:<12} {reads}{own} = {self.total}"


def _reference_groups(refs: Sequence[Reference]) -> list[_RefGroup]:
    """Split a walk's references, in hardware order, per guest level and the final GPA."""
    groups: list[_RefGroup] = []
    pending: list[str] = []
    for ref in refs:
        name = ref.step.format.level_name(ref.step.level)
        if ref.dimension == "ept":
            pending.append(name)
        else:
            groups.append(_RefGroup(f"guest {name}", tuple(pending), 1))
            pending = []
    return [*groups, _RefGroup("final GPA", tuple(pending), 0)]


def _reference_mistakes(n: int, m: int, full: tuple[int, int]) -> list[tuple[Value, str]]:
    """Typical wrong counts for n guest and m EPT levels walked, most telling first."""
    items: list[tuple[Value, str]] = [
        (
            n * m,
            f"that counts only the EPT reads of the guest tables: add the {n} guest entries"
            f" themselves and the {m} EPT reads for the final GPA",
        ),
        (
            n * (m + 1),
            "that forgets the EPT walk of the final GPA: the guest's leaf gives a"
            f" guest-physical address, and {m} more EPT reads turn it into a host-physical one",
        ),
        (
            (n + 1) * m,
            f"that counts only the EPT reads: add the {n} reads of the guest entries themselves",
        ),
        (
            n + m,
            "that adds the two walks as if each ran once; but every guest table is found by a"
            f" guest-physical address, so each of the {n} guest levels needs its own {m}-read"
            " EPT walk before its entry can be read",
        ),
        (
            (n + 1) * (m + 1),
            "that counts the data access too (which is how some texts get 25 for 4x4); count"
            " only the walk's references",
        ),
        (
            n,
            "that is the guest walk alone, as on bare metal; under EPT every guest table"
            f" address and the final GPA need an EPT walk of {m} reads too",
        ),
        *_depth_mistakes(n, m, full),
    ]
    return [(value, f"Not {value}: {why}.") for value, why in items]


def _depth_mistakes(n: int, m: int, full: tuple[int, int]) -> list[tuple[Value, str]]:
    """Counts that get a dimension's depth wrong: a 2 MiB page ignored, or one imagined."""
    out: list[tuple[Value, str]] = []
    for guess_n in (full[0], full[0] - 1):
        for guess_m in (full[1], full[1] - 1):
            if (guess_n, guess_m) == (n, m):
                continue
            reasons = [
                _depth_reason(dimension, guess, walked, top)
                for dimension, guess, walked, top in (
                    ("guest", guess_n, n, full[0]),
                    ("EPT", guess_m, m, full[1]),
                )
                if guess != walked
            ]
            out.append(((guess_n + 1) * (guess_m + 1) - 1, "; and ".join(reasons)))
    return out


def _depth_reason(dimension: str, guess: int, walked: int, top: int) -> str:
    walks = "the guest walk" if dimension == "guest" else "every EPT walk"
    if walked < top:
        return (
            f"the 2 MiB {dimension} pages end {walks} at the PDE, so it reads {walked}"
            f" levels, not {guess}"
        )
    return f"the {dimension} uses 4 KiB pages here, so {walks} reads all {top} levels"


def _seeded_references(seed: int) -> Question:
    rng = seeded_rng("references", seed)
    guest_levels, ept_levels = rng.choice((4, 5)), rng.choice((4, 5))
    large = rng.choice(("none", "none", "guest", "ept", "both"))
    guest_page = HUGE_PAGE_SIZE if large in ("guest", "both") else PAGE_SIZE
    ept_page = HUGE_PAGE_SIZE if large in ("ept", "both") else PAGE_SIZE
    gva = _random_page(rng, guest_levels, guest_page) + rng.randrange(0, guest_page, 8)
    return references_question(
        guest_levels, ept_levels, guest_page=guest_page, ept_page=ept_page, gva=gva
    )
