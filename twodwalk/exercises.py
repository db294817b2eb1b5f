"""Seeded exercises: the same seed gives the same question, and the engine gives the answer.

The pattern is OSTEP's simulators (`paging-linear-translate.py -s N -c`): a seed picks the
parameters, the student works the problem by hand, and solve mode prints the worked answer.
Every answer here comes from running the engine on the question's own tables, memslots or
machine (never from a table of answers), so a question cannot disagree with the notebooks.
This is the pure model: the `twodwalk quiz` command and the `Exercise` widget wrap it.

`quiz(seed, topic)` picks a question; `TOPICS` maps each topic to its seeded generator; the
`*_question` functions build one question from explicit parameters, for a notebook that wants a
particular case.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import reduce
from operator import or_
from types import MappingProxyType

from twodwalk.cpumodel import PAGE_SHIFT, PAGE_SIZE, CpuModel
from twodwalk.ept import (
    EPT_VIOLATION_ACC_INSTR,
    EPT_VIOLATION_ACC_READ,
    EPT_VIOLATION_ACC_WRITE,
    EPT_VIOLATION_EXECUTABLE,
    EPT_VIOLATION_GVA_IS_VALID,
    EPT_VIOLATION_GVA_TRANSLATED,
    EPT_VIOLATION_READABLE,
    EPT_VIOLATION_WRITABLE,
    EXIT_REASON_EPT_VIOLATION,
)
from twodwalk.errors import TwodwalkError, check_aligned, check_choice, check_int
from twodwalk.formats import EntryFormat, ia32e_format
from twodwalk.kvm.memslots import KVM_MEM_READONLY, Memslots
from twodwalk.machine import Machine
from twodwalk.memory import FrameAllocator, PhysicalMemory
from twodwalk.pagetables import PageTables
from twodwalk.paging import (
    PFERR_FETCH,
    PFERR_PK,
    PFERR_PRESENT,
    PFERR_RSVD,
    PFERR_USER,
    PFERR_WRITE,
    PageFault,
    PagingControls,
    exception_for,
    translate,
)
from twodwalk.trace import Reference, VmExit
from twodwalk.views.text import dump_tables, format_2d_walk, format_walk, info_memslots, rights_text
from twodwalk.walker import Translation, WalkFault, WalkRecord

SEED_LIMIT = 1 << 63
MIB = 1 << 20
HUGE_PAGE = 2 * MIB
PAGE_SIZES = {PAGE_SIZE: "4 KiB", HUGE_PAGE: "2 MiB"}

# --- answers and how they are read ---------------------------------------------------------------

Value = int | str | tuple[int, ...]
Bases = tuple[int, ...]


@dataclass(frozen=True)
class Feedback:
    """The verdict on one answer: right or wrong, and a sentence that says why."""

    correct: bool
    message: str


@dataclass(frozen=True)
class Grader:
    """Checks answers against the engine's value. `read` lists what a text may mean, most
    likely first (bare digits can be hex or decimal); `mistakes` explains typical wrong
    values; `explain` says something useful about any other wrong value."""

    expected: Value
    read: Callable[[str], tuple[Value, ...]]
    expected_format: str
    mistakes: Mapping[Value, str]
    explain: Callable[[Value], str]

    def __call__(self, answer: str) -> Feedback:
        readings = self.read(answer)
        if not readings:
            return Feedback(False, f"Cannot read {answer!r}: {self.expected_format}.")
        if self.expected in readings:
            return Feedback(True, "Correct.")
        for reading in readings:
            if reading in self.mistakes:
                return Feedback(False, self.mistakes[reading])
        return Feedback(False, self.explain(readings[0]))


@dataclass(frozen=True)
class Question:
    """One exercise: what to ask, a hint, the worked solution and the canonical answer."""

    topic: str
    prompt: str
    hint: str
    solution: str
    answer: str
    grader: Grader = field(repr=False, compare=False)

    def check(self, answer: str) -> Feedback:
        """Judge a student's answer, in any reasonable notation."""
        return self.grader(answer)


_PREFIXED = (
    (re.compile(r"0x([0-9a-f]+)"), 16),
    (re.compile(r"0b([01]+)"), 2),
    (re.compile(r"([0-9a-f]+)h"), 16),
)
_BARE = re.compile(r"[0-9a-f]+")
_LABEL = re.compile(r"^[a-z][a-z0-9 #/.-]*[:=]\s*")
_SEPARATORS = re.compile(r"[\s,;|+]+")
_SEQUENCE_SEPARATORS = re.compile(r"[\s,;:=/|()\[\]]+")
_INDEX_LABELS = re.compile(r"\b(?:pml[45]e?|pdpte?|pde?|pte?|offset|off|index|idx)\b")


def _normal(text: str) -> str:
    """Lower case, single spaces, no full stop at the end: ' No Fault. ' -> 'no fault'."""
    return " ".join(text.lower().split()).rstrip(".!")


def number_readings(token: str, bare: Bases) -> tuple[int, ...]:
    """What one number may mean: 0x, 0b and a trailing h fix the base, letters a-f make it
    hex; plain digits are read in each of the `bare` bases, most likely first."""
    token = token.replace("_", "").replace("'", "")
    for pattern, base in _PREFIXED:
        match = pattern.fullmatch(token)
        if match:
            return (int(match[1], base),)
    if not _BARE.fullmatch(token):
        return ()
    if not token.isdigit():
        return (int(token, 16),)
    return tuple(dict.fromkeys(int(token, base) for base in bare))


@dataclass(frozen=True)
class ValueReader:
    """One value: a word ('none', 'mmio'), a number, bit names ('P W U') or a list of set
    bits ('bits 0 1 7'), as the question allows."""

    bare: Bases
    words: Mapping[str, str] = field(default_factory=dict)
    names: Mapping[str, int] = field(default_factory=dict)
    bit_lists: bool = False

    def __call__(self, text: str) -> tuple[Value, ...]:
        normal = _normal(text)
        if normal in self.words:
            return (self.words[normal],)
        normal = _LABEL.sub("", normal)
        listed = self.bit_lists and normal.startswith("bit")
        if listed:
            normal = normal.removeprefix("bits").removeprefix("bit")
        tokens = [t for t in _SEPARATORS.split(normal) if t]
        numbers = number_readings(tokens[0], self.bare) if len(tokens) == 1 else ()
        if numbers and not listed:
            return numbers
        if tokens and self.names and all(t in self.names for t in tokens):
            return (reduce(or_, (self.names[t] for t in tokens)),)
        if tokens and self.bit_lists and all(t.isdigit() and int(t) < 64 for t in tokens):
            return (reduce(or_, (1 << int(t) for t in tokens)),)
        return ()


@dataclass(frozen=True)
class SequenceReader:
    """Several numbers ('PML4=254 PDPT=0 PD=145 PT=325 offset=0xabc'), read under each
    convention in turn; a convention gives the base of plain digits per position."""

    conventions: tuple[Bases, ...]

    def __call__(self, text: str) -> tuple[Value, ...]:
        plain = _INDEX_LABELS.sub(" ", _normal(text))
        tokens = [t for t in _SEQUENCE_SEPARATORS.split(plain) if t]
        readings: list[Value] = []
        for convention in self.conventions:
            numbers = [
                number_readings(t, (convention[min(i, len(convention) - 1)],))
                for i, t in enumerate(tokens)
            ]
            if not tokens or not all(numbers):
                return ()
            reading = tuple(n[0] for n in numbers)
            if reading not in readings:
                readings.append(reading)
        return tuple(readings)


def _mistakes(expected: Value, items: Sequence[tuple[Value, str]]) -> dict[Value, str]:
    """Typical wrong values and their explanations; the first explanation of a value wins,
    and a 'mistake' that happens to be the right answer is dropped."""
    found: dict[Value, str] = {}
    for value, message in items:
        if value != expected:
            found.setdefault(value, message)
    return found


def _hex(value: Value) -> str:
    return f"{value:#x}" if isinstance(value, int) else str(value)


# --- bit-by-bit answers: #PF error codes and exit qualifications ---------------------------------


@dataclass(frozen=True)
class Bit:
    """One bit of an error code or qualification, and why it has its value in this question."""

    mask: int
    name: str
    why: str

    @property
    def number(self) -> int:
        return self.mask.bit_length() - 1


def _explained(mask: int, name: str, value: int, if_set: str, if_clear: str) -> Bit:
    """A bit whose reason depends on the value the engine gave it."""
    return Bit(mask, name, if_set if value & mask else if_clear)


def _bit_lines(bits: Sequence[Bit], value: int) -> list[str]:
    """The hand calculation: one line per bit, then the value they make."""
    lines = [f"  bit {b.number}  {b.name:<10} = {int(bool(value & b.mask))}  {b.why}" for b in bits]
    return [*lines, f"  = {value:#x}"]


def _bit_differences(bits: Sequence[Bit], expected: int, given: int) -> str:
    """Name each bit the answer got wrong, with the reason it has its value here."""
    wrong = expected ^ given
    known = [b for b in bits if wrong & b.mask]
    lines = [
        f"bit {b.number} ({b.name}) should be {int(bool(expected & b.mask))}: {b.why}"
        for b in known
    ]
    lines += [
        f"bit {n} is not set here"
        for n in range(wrong.bit_length())
        if wrong >> n & 1 and not any(b.number == n for b in known)
    ]
    return f"Not {given:#x}:\n" + "\n".join(f"  {line}." for line in lines)


# --- shared engine set-ups -----------------------------------------------------------------------

_TOY_TABLES = (0x1000, 0x10_0000)  # where a toy's page tables are allocated
_TOY_MAXPHYADDR = 36
_DATA_GPA = 0x20_0000
_GUEST_RAM = 8 * MIB  # the guest's page tables sit at its top, well above the data pages


def _toy_tables(levels: int) -> tuple[PhysicalMemory, PageTables, CpuModel]:
    """Bare tables in a small physical memory, as in README 'A first walk': a machine is not
    needed when only one dimension is asked about."""
    cpu = CpuModel(maxphyaddr=_TOY_MAXPHYADDR)
    memory = PhysicalMemory(cpu.maxphyaddr)
    frames = FrameAllocator(memory, *_TOY_TABLES)
    return memory, PageTables(ia32e_format(levels, cpu), memory, frames.alloc), cpu


def _toy_walk(
    tables: PageTables,
    memory: PhysicalMemory,
    cpu: CpuModel,
    gva: int,
    kind: str = "read",
    cpl: int = 0,
    controls: PagingControls | None = None,
) -> WalkRecord:
    """The engine's walk of the toy tables (`translate`), by default a supervisor read."""
    controls = controls or PagingControls(cr4_la57=tables.fmt.levels == 5)
    return translate(memory, tables.root, gva, kind, cpl=cpl, controls=controls, cpu=cpu)


def _table_names(fmt: EntryFormat) -> list[str]:
    """Table names top level first, from the entry names: PML4E -> PML4, PDE -> PD."""
    return [fmt.level_name(level).removesuffix("E") for level in range(fmt.levels, 0, -1)]


def _bit_range(fmt: EntryFormat, level: int) -> str:
    return f"{fmt.shift(level) + 8}:{fmt.shift(level)}"


def _check_page_size(name: str, value: int) -> None:
    if value not in PAGE_SIZES:
        raise TwodwalkError(
            f"{name}={value!r} is not valid: choose {PAGE_SIZE} (4 KiB) or {HUGE_PAGE} (2 MiB)"
        )


def _random_page(
    rng: random.Random, levels: int, page_size: int = PAGE_SIZE, *, kernel: bool = False
) -> int:
    """A page-aligned canonical address (SDM 3.3.7.1), in the user or the kernel half."""
    width = PAGE_SHIFT + 9 * levels
    address: int = rng.randrange(page_size, 1 << (width - 1), page_size)
    return address | ((1 << 64) - (1 << (width - 1))) if kernel else address


# --- topic "indices": split a GVA (SDM Vol 3A 4.5.4, figure 4-8) ---------------------------------


def indices_question(gva: int, levels: int = 4) -> Question:
    """Split `gva` into its table indices and page offset; the answer is read off the engine's
    walk of a page mapped at that address (the index of each entry it reads)."""
    memory, tables, cpu = _toy_tables(levels)
    tables.map(gva & ~(PAGE_SIZE - 1), _DATA_GPA, PAGE_SIZE, rw=1)
    record = _toy_walk(tables, memory, cpu, gva)
    fmt = tables.fmt
    expected = (*(s.index for s in record.steps), _translation(record).address - _DATA_GPA)
    names = _table_names(fmt)
    layout = " ".join(f"{n}=..." for n in names) + " offset=0x..."
    answer = " ".join(f"{n}={i}" for n, i in zip(names, expected, strict=False))
    answer += f" offset={expected[-1]:#x}"
    ranges = [_bit_range(fmt, level) for level in range(levels, 0, -1)]
    hint = (
        "Each index is 9 bits: "
        + ", ".join(f"{n} = bits {r}" for n, r in zip(names, ranges, strict=True))
        + f"; the offset is bits 11:0. Bits 63:{fmt.input_bits} only repeat bit"
        f" {fmt.input_bits - 1} (canonical form)."
    )
    prompt = (
        f"Split the guest-virtual address {gva:#x} for {levels}-level paging into the"
        f" {', '.join(names)} indices and the page offset.\n"
        f"Answer top level first, as '{layout}' (indices in decimal or 0x-hex)."
    )
    solution = "\n".join(
        [
            f"GVA {gva:#x}: take 9 bits per level from bit {fmt.input_bits - 1} down.",
            *(
                f"  {n:<6} bits {r:>5} = 0b{i:09b} = {i:#05x} = {i}"
                for n, r, i in zip(names, ranges, expected, strict=False)
            ),
            f"  offset bits  11:0 = {expected[-1]:#x}",
            "The engine's walk reads exactly these entries:",
            format_walk(record),
            f"Answer: {answer}",
        ]
    )
    conventions = ((10,) * levels + (16,), (16,) * (levels + 1), (10,) * (levels + 1))
    grader = Grader(
        expected,
        SequenceReader(conventions),
        f"give {levels + 1} numbers, top level first, as '{layout}'",
        _mistakes(expected, [(_bottom_up(expected), _bottom_up_message(names, ranges))]),
        _indices_explainer(names, [*ranges, "11:0"], expected),
    )
    return Question("indices", prompt, hint, solution, answer, grader)


def _translation(record: WalkRecord) -> Translation:
    translation = record.translation
    if translation is None:
        raise TwodwalkError(f"the walk of {record.address:#x} faulted: {record.fault}")
    return translation


def _bottom_up(expected: tuple[int, ...]) -> tuple[int, ...]:
    return (*expected[-2::-1], expected[-1])


def _bottom_up_message(names: Sequence[str], ranges: Sequence[str]) -> str:
    return (
        f"The numbers are right but in the wrong order: start with the {names[0]} index"
        f" (bits {ranges[0]}, the top level) and end with the {names[-1]} index before the"
        " offset."
    )


def _indices_explainer(
    names: Sequence[str], ranges: Sequence[str], expected: tuple[int, ...]
) -> Callable[[Value], str]:
    """Which parts of an indices answer are wrong, named by their bit ranges."""
    parts = [*names, "offset"]

    def explain(given: Value) -> str:
        if not isinstance(given, tuple) or len(given) != len(expected):
            count = len(given) if isinstance(given, tuple) else 1
            return (
                f"A {len(names)}-level walk has {len(names)} indices and an offset:"
                f" give {len(expected)} numbers, top level first (you gave {count})."
            )
        too_big = [p for p, v in zip(parts[:-1], given, strict=False) if v > 511]
        if too_big:
            return (
                f"An index has 9 bits (0..511), so {', '.join(too_big)} cannot be right:"
                " shift the address right, then keep only the low 9 bits."
            )
        wrong = [
            f"{p} (bits {r})"
            for p, r, g, e in zip(parts, ranges, given, expected, strict=True)
            if g != e
        ]
        return f"Not all right: check {', '.join(wrong)}; the other parts are right."

    return explain


def _seeded_indices(seed: int) -> Question:
    rng = _rng("indices", seed)
    levels = rng.choice((4, 5))
    page = _random_page(rng, levels, kernel=rng.random() < 0.5)
    return indices_question(page + rng.randrange(PAGE_SIZE), levels)


# --- topic "references": the cost of a 2D walk (FACTS F; SDM Vol 3C 29.3.2) ----------------------


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
    machine = Machine(
        guest_ram=_GUEST_RAM,
        guest_levels=guest_levels,
        ept_levels=ept_levels,
        maxphyaddr=48 if ept_levels == 4 else 52,  # KVM uses 5-level EPT only when needed
        gbpages=False,
        thp=ept_page == HUGE_PAGE,
    )
    machine.guest.map(
        gva & ~(guest_page - 1), _DATA_GPA, guest_page, page_size=guest_page, rw=1, us=1
    )
    machine.vcpu.caches.off()
    machine.vcpu.access(gva, "read")  # KVM fills the EPT on the way
    trace = machine.vcpu.access(gva, "read").trace
    refs = trace.memory_references()
    groups = _reference_groups(refs)
    total, walked_n, walked_m = len(refs), len(groups) - 1, len(groups[-1].ept)
    answer = str(total)
    prompt = (
        f"A {guest_levels}-level guest runs under {ept_levels}-level EPT. The guest maps GVA"
        f" {gva:#x} with a {PAGE_SIZES[guest_page]} page; KVM maps guest RAM into EPT with"
        f" {PAGE_SIZES[ept_page]} pages"
        + (" (the VMM backs it with transparent huge pages)" if ept_page == HUGE_PAGE else "")
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
            f" (FACTS F). The references, in the order the hardware makes them:",
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
    rng = _rng("references", seed)
    guest_levels, ept_levels = rng.choice((4, 5)), rng.choice((4, 5))
    large = rng.choice(("none", "none", "guest", "ept", "both"))
    guest_page = HUGE_PAGE if large in ("guest", "both") else PAGE_SIZE
    ept_page = HUGE_PAGE if large in ("ept", "both") else PAGE_SIZE
    gva = _random_page(rng, guest_levels, guest_page) + rng.randrange(0, guest_page, 8)
    return references_question(
        guest_levels, ept_levels, guest_page=guest_page, ept_page=ept_page, gva=gva
    )


# --- topic "error-code": the #PF error code (SDM Vol 3A 4.6, 4.7) --------------------------------

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

    def bit(mask: int, name: str, if_set: str, if_clear: str) -> Bit:
        return _explained(mask, name, code, if_set, if_clear)

    return [
        bit(
            PFERR_PRESENT,
            "P",
            f"the entry is present, so this is a protection fault: {detail}",
            f"a not-present entry: {detail}",
        ),
        bit(PFERR_WRITE, "W/R", "the access is a write", f"a {kind} is not a write"),
        bit(
            PFERR_USER,
            "U/S",
            "CPL 3: a user-mode access",
            f"CPL {cpl}: a supervisor-mode access (the bit tells who accessed, not the"
            " page's U/S bit)",
        ),
        bit(PFERR_RSVD, "RSVD", "a reserved bit is set", "no entry has a reserved bit set"),
        bit(
            PFERR_FETCH,
            "I/D",
            "an instruction fetch, reported because EFER.NXE=1 or CR4.SMEP=1",
            f"a {kind} is not reported as an instruction fetch",
        ),
        bit(PFERR_PK, "PK", "PKRU blocks this access", "no protection-key violation"),
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
    rng = _rng("error-code", seed)
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


# --- topic "translate": walk a toy guest page table by hand (SDM Vol 3A 4.5.4) -------------------

_FAULT = "fault"
_FAULT_WORDS = {
    w: _FAULT for w in ("fault", "#pf", "pf", "page fault", "not mapped", "unmapped", "not present")
}
_TOY_GPA_RANGE = (_TOY_TABLES[1], 1 << _TOY_MAXPHYADDR)


def translate_question(
    mappings: Sequence[tuple[int, int, int]], gva: int, levels: int = 4
) -> Question:
    """Which GPA a supervisor read of `gva` reaches through toy guest tables that map each
    (gva, gpa, page size) of `mappings`; the answer is the engine's walk."""
    memory, tables, cpu = _toy_tables(levels)
    for va, pa, size in mappings:
        check_int("gpa", pa, *_TOY_GPA_RANGE, valid="1 MiB <= gpa < 64 GiB (tables sit below)")
        tables.map(va, pa, size, page_size=size, rw=1)
    dump = dump_tables(tables)  # before any walk sets A bits that would give the path away
    record = _toy_walk(tables, memory, cpu, gva)
    translation = record.translation
    expected: Value = _FAULT if translation is None else translation.address
    answer = _hex(expected)
    prompt = (
        "The guest's page tables (present entries only; each line shows the entry's name,"
        " the first GVA it covers, where the entry sits and its value):\n"
        f"{dump}\n"
        f"A supervisor read of GVA {gva:#x}: which guest-physical address does it reach?"
        " Answer in hex, or 'fault' if the walk faults."
    )
    hint = (
        "Follow the GVA's indices from the root down to the leaf (or match the GVA against"
        " the first-GVA column). The GPA is the leaf's page address plus the GVA's offset in"
        " the page: bits 11:0 for a 4 KiB page, bits 20:0 for a 2 MiB page."
    )
    others = [
        _toy_walk(tables, memory, cpu, va | (gva & (size - 1)))
        for va, _, size in mappings
        if va != gva & ~(size - 1)
    ]
    if translation is None:
        fault = _fault(record)
        last = f"=> #PF, error code {_error_code(record):#x}: the guest handles it ({fault.detail})"
    else:
        base = translation.address & ~(translation.page_size - 1)
        last = (
            f"page {base:#x} + offset {translation.address - base:#x}"
            f" (GVA bits {translation.page_size.bit_length() - 2}:0) = {translation.address:#x}"
        )
    solution = "\n".join([format_walk(record), last, f"Answer: {answer}"])
    grader = Grader(
        expected,
        ValueReader(bare=(16, 10), words=_FAULT_WORDS),
        "give a guest-physical address in hex (0x1234abc or 1234abc) or decimal,"
        " or 'fault' if the walk faults",
        _mistakes(expected, _translate_mistakes(record, others)),
        _translate_explainer(record),
    )
    return Question("translate", prompt, hint, solution, answer, grader)


def _error_code(record: WalkRecord) -> int:
    fault = exception_for(record, PagingControls(cr4_la57=record.format.levels == 5))
    assert isinstance(fault, PageFault)
    return fault.error_code


def _translate_mistakes(
    record: WalkRecord, others: Sequence[WalkRecord]
) -> list[tuple[Value, str]]:
    """The numbers a student finds on the way and may give by mistake."""
    fmt = record.format
    items: list[tuple[Value, str]] = []
    translation = record.translation
    if translation is not None:
        size = translation.page_size
        base = translation.address & ~(size - 1)
        items += [
            (base, f"Not {base:#x}: that is the page's base; add the GVA's offset in the page."),
            (
                base | (record.address & 0xFFF),
                f"A {size >> 20} MiB page's offset is the low {size.bit_length() - 1} bits of"
                " the GVA, not just bits 11:0.",
            ),
        ]
    for step in record.steps:
        name = fmt.level_name(step.level)
        items += [
            (step.entry_address, f"That is where the {name} sits, not what it points to."),
            (step.value, f"That is the {name}'s raw value: the address is in bits 51:12."),
        ]
    for other in others:
        items += [
            (_translation(other).address, _wrong_page_message(record, other)),
        ]
    items.append((record.address, "That is the GVA itself: follow the tables to its GPA."))
    return items


def _wrong_page_message(record: WalkRecord, other: WalkRecord) -> str:
    """The other page's GPA: name the first index where its GVA and ours differ."""
    fmt = record.format
    level = next(
        lv
        for lv in range(fmt.levels, 0, -1)
        if fmt.index(record.address, lv) != fmt.index(other.address, lv)
    )
    return (
        f"That is where GVA {other.address:#x} goes; for {record.address:#x} the"
        f" {fmt.level_name(level)} index (bits {_bit_range(fmt, level)}) is"
        f" {fmt.index(record.address, level)}, not {fmt.index(other.address, level)}."
    )


def _translate_explainer(record: WalkRecord) -> Callable[[Value], str]:
    def explain(given: Value) -> str:
        translation = record.translation
        if translation is None:
            return f"The walk faults: {_fault(record).detail}. Answer 'fault'."
        if not isinstance(given, int):
            leaf = record.steps[-1]
            return (
                f"The walk does not fault: the {record.format.level_name(leaf.level)} at"
                f" {leaf.entry_address:#x} is present and maps a"
                f" {PAGE_SIZES[translation.page_size]} page."
            )
        return (
            f"Not {given:#x}: follow the GVA's indices down to the leaf, then add the offset"
            " within the page."
        )

    return explain


def _seeded_translate(seed: int) -> Question:
    rng = _rng("translate", seed)
    pd_index = rng.randrange(510)
    region = _random_page(rng, 4, 1 << 30) | pd_index << 21
    slots = rng.sample(range(512), 4)  # three mapped pages, and one left as a hole
    frames = rng.sample(range(0x100, 0x800), 3)
    mappings = [(region | s << 12, f << 12, PAGE_SIZE) for s, f in zip(slots, frames, strict=False)]
    large = region + HUGE_PAGE
    mappings.append((large, rng.randrange(4, 32) * HUGE_PAGE, HUGE_PAGE))
    target = rng.choice(("small", "small", "large", "hole", "no-table"))
    gva = {
        "small": region | rng.choice(slots[:3]) << 12 | rng.randrange(PAGE_SIZE),
        "large": large + rng.randrange(HUGE_PAGE),
        "hole": region | slots[3] << 12 | rng.randrange(PAGE_SIZE),
        "no-table": region + 2 * HUGE_PAGE + rng.randrange(HUGE_PAGE),
    }[target]
    return translate_question(mappings, gva)


# --- topic "memslot": GPA -> HVA (KVM `__gfn_to_hva_memslot`, FACTS C) ---------------------------

_MMIO = "mmio"
_MMIO_WORDS = {
    w: _MMIO
    for w in ("mmio", "kvm_exit_mmio", "exit_mmio", "mmio exit", "no slot", "no memslot", "none")
}
SlotSpec = tuple[int, int, int, int, int]  # slot, flags, guest_phys_addr, memory_size, hva


def memslot_question(slots: Sequence[SlotSpec], gpa: int) -> Question:
    """Which HVA KVM uses for a read of `gpa`, or MMIO: the engine's `gfn_to_memslot` and
    `gfn_to_hva` on memslots made by KVM_SET_USER_MEMORY_REGION with these arguments."""
    memslots = Memslots(max_gpa_bits=48)
    for spec in slots:
        memslots.set_user_memory_region(*spec)
    check_int("gpa", gpa, 0, 1 << 48, valid="a 48-bit guest-physical address")
    gfn = gpa >> PAGE_SHIFT
    slot = memslots.gfn_to_memslot(gfn)
    expected: Value = _MMIO if slot is None else slot.gfn_to_hva(gfn) + (gpa & 0xFFF)
    answer = _hex(expected)
    table = info_memslots(memslots.slots.values())
    prompt = (
        "The VMM has set these memslots (KVM_SET_USER_MEMORY_REGION; GPA ranges inclusive):\n"
        f"{table}\n"
        f"The guest reads GPA {gpa:#x}. Which host-virtual address of the VMM does KVM use?"
        " Answer in hex, or 'mmio' if no memslot covers it."
    )
    hint = (
        "Find the slot whose GPA range contains the address; then"
        " hva = userspace_addr + (gpa - slot base). No slot: the access exits to the VMM as"
        " KVM_EXIT_MMIO."
    )
    if slot is None:
        steps = [
            f"gfn = {gpa:#x} >> 12 = {gfn:#x}: no slot covers it (gfn_to_memslot finds none).",
            "The read exits to userspace as KVM_EXIT_MMIO and the VMM emulates a device there.",
        ]
    else:
        offset = gpa - slot.guest_phys_addr
        steps = [
            f"gfn = {gpa:#x} >> 12 = {gfn:#x}; slot {slot.id} covers gfns"
            f" {slot.base_gfn:#x}..{slot.base_gfn + slot.npages - 1:#x}",
            "hva = userspace_addr + (gpa - guest_phys_addr)",
            f"    = {slot.userspace_addr:#x} + ({gpa:#x} - {slot.guest_phys_addr:#x})",
            f"    = {slot.userspace_addr:#x} + {offset:#x} = {_hex(expected)}",
        ]
    solution = "\n".join([*steps, f"Answer: {answer}"])
    grader = Grader(
        expected,
        ValueReader(bare=(16, 10), words=_MMIO_WORDS),
        "give a host-virtual address in hex (0x7f...) or decimal, or 'mmio' if no slot"
        " covers the GPA",
        _mistakes(expected, _memslot_mistakes(memslots, gpa)),
        _memslot_explainer(memslots, gpa),
    )
    return Question("memslot", prompt, hint, solution, answer, grader)


def _memslot_mistakes(memslots: Memslots, gpa: int) -> list[tuple[Value, str]]:
    """Each slot's formula applied to the GPA, and the usual slips with the right slot."""
    home = memslots.gfn_to_memslot(gpa >> PAGE_SHIFT)
    items: list[tuple[Value, str]] = [
        (gpa, "That is the GPA itself: the HVA is an address in the VMM's own address space.")
    ]
    if home is not None:
        offset = gpa - home.guest_phys_addr
        items += [
            (
                home.userspace_addr + gpa,
                "You added the whole GPA to userspace_addr: subtract the slot's base GPA"
                f" ({home.guest_phys_addr:#x}) first.",
            ),
            (home.userspace_addr, f"That is where slot {home.id} starts: add {offset:#x}."),
            (offset, f"That is the offset into slot {home.id}: add its userspace_addr."),
        ]
    for slot in memslots.slots.values():
        if slot is home or gpa < slot.guest_phys_addr:
            continue
        end = slot.guest_phys_addr + slot.memory_size - 1
        where = (
            f"GPA {gpa:#x} lies in slot {home.id}, not slot {slot.id}"
            if home is not None
            else f"GPA {gpa:#x} is past the end of slot {slot.id} (which ends at {end:#x}):"
            " no slot covers it, so the read exits to the VMM as MMIO"
        )
        items.append((slot.userspace_addr + gpa - slot.guest_phys_addr, where + "."))
    return items


def _memslot_explainer(memslots: Memslots, gpa: int) -> Callable[[Value], str]:
    def explain(given: Value) -> str:
        home = memslots.gfn_to_memslot(gpa >> PAGE_SHIFT)
        if home is None:
            return (
                f"No slot covers GPA {gpa:#x} (check each range, whose end is inclusive):"
                " answer 'mmio'."
            )
        end = home.guest_phys_addr + home.memory_size - 1
        if not isinstance(given, int):
            return f"Slot {home.id} covers {home.guest_phys_addr:#x}-{end:#x}, which holds it."
        return (
            f"Not {given:#x}: find the slot that holds GPA {gpa:#x}, then"
            " hva = userspace_addr + (gpa - base)."
        )

    return explain


def _random_hva(rng: random.Random) -> int:
    """A 2 MiB-aligned mmap address where x86-64 Linux puts them, with 7 GiB to spare below
    the end of user space (0x7ffffffff000)."""
    return (0x7F00 + rng.randrange(0xF0)) << 32 | rng.randrange(0x800) * HUGE_PAGE


def _seeded_memslot(seed: int) -> Question:
    """A QEMU-like PC layout: RAM below the PCI hole, the rest above 4 GiB, a BIOS ROM."""
    rng = _rng("memslot", seed)
    low = rng.choice((512, 768, 1024, 2048, 3072)) * MIB
    high = rng.choice((1, 2, 4)) << 30
    ram_hva, bios_hva = _random_hva(rng), _random_hva(rng) + MIB
    bios = (0xFFFC_0000, 0x4_0000)
    slots = [
        (0, 0, 0, low, ram_hva),
        (1, 0, 4 << 30, high, ram_hva + low),
        (2, KVM_MEM_READONLY, *bios, bios_hva),
    ]
    target = rng.choice(("low", "high", "high", "bios", "hole", "end"))
    gpa = {
        "low": rng.randrange(low),
        "high": (4 << 30) + rng.randrange(high),
        "bios": bios[0] + rng.randrange(bios[1]),
        "hole": rng.randrange(low, bios[0]),
        "end": rng.choice((low, (4 << 30) + high)) + rng.randrange(PAGE_SIZE),
    }[target]
    return memslot_question(slots, gpa)


# --- topic "ept-qualification": an EPT violation's exit qualification (SDM Vol 3C 28-7) ----------

_QUAL_NAMES = {
    "read": EPT_VIOLATION_ACC_READ,
    "write": EPT_VIOLATION_ACC_WRITE,
    "fetch": EPT_VIOLATION_ACC_INSTR,
    "readable": EPT_VIOLATION_READABLE,
    "writable": EPT_VIOLATION_WRITABLE,
    "executable": EPT_VIOLATION_EXECUTABLE,
    "gva-valid": EPT_VIOLATION_GVA_IS_VALID,
    "gla-valid": EPT_VIOLATION_GVA_IS_VALID,
    "final": EPT_VIOLATION_GVA_TRANSLATED,
    "translated": EPT_VIOLATION_GVA_TRANSLATED,
}
_WHICH = ("table", "final")


def ept_qualification_question(
    kind: str,
    *,
    which: str = "final",
    first_read: bool = False,
    ept_ad: bool = True,
    guest_levels: int = 4,
    gva: int = 0x40_0008,
    gpa: int = _DATA_GPA,
) -> Question:
    """The exit qualification of one EPT violation of a real vCPU access on a fresh
    `Machine` (KVM reads it in `handle_ept_violation`): `which` "table" asks about the first
    exit for a guest page-table page, "final" about the exit for the data page at `gpa`.
    `first_read`: the guest read the page once before, so KVM mapped the host's zero page."""
    check_choice("which", which, _WHICH)
    check_aligned("gpa", check_int("gpa", gpa, 0, 6 * MIB, valid="0 <= gpa < 6 MiB"), PAGE_SIZE)
    machine = Machine(guest_ram=_GUEST_RAM, guest_levels=guest_levels, gbpages=False, ept_ad=ept_ad)
    machine.guest.map(gva & ~(PAGE_SIZE - 1), gpa, PAGE_SIZE, rw=1, us=1)
    if first_read:
        machine.vcpu.access(gva, "read")
    result = machine.vcpu.access(gva, kind, 1 if kind == "write" else None)
    exits = [
        e
        for e in result.trace.of_type(VmExit)
        if e.reason == EXIT_REASON_EPT_VIOLATION
        and e.gpa is not None
        and (e.gpa >> PAGE_SHIFT == gpa >> PAGE_SHIFT) == (which == "final")
    ]
    if not exits:
        raise TwodwalkError(
            f"this {kind} takes no EPT violation for the {which} page: nothing to ask about"
        )
    chosen = exits[0]
    qual = chosen.qualification
    assert qual is not None and chosen.gpa is not None
    answer = f"{qual:#x}"
    history = (
        " The guest already read this GVA once, so KVM mapped the page in EPT with the host's"
        " shared zero page."
        if first_read
        else " KVM has built no EPT entries yet."
    )
    what = "the data page itself" if which == "final" else "a page of the guest's page tables"
    prompt = (
        f"A {guest_levels}-level guest maps GVA {gva:#x} to GPA {gpa:#x} (its CR3 is"
        f" {machine.vcpu.cr3:#x}); EPT A/D flags are {'on' if ept_ad else 'off'}.{history}\n"
        f"The vCPU now does a {kind} of GVA {gva:#x}. Take the first EPT violation for"
        f" {what} (its GPA is {chosen.gpa:#x}): what is its exit qualification?"
        " Answer in hex, or as the set bits, e.g. 'bits 0 7'."
    )
    hint = (
        "Bits 2:0: what the access was (reading a guest paging entry is a data read; with EPT"
        " A/D on, also a write); bits 5:3: what the EPT entries allow (0 if not present);"
        " bit 7: a guest-linear address was translated; bit 8: the access was to the final"
        " translation (1) or to a guest paging-structure entry (0)."
    )
    bits = _qualification_bits(kind, which == "final", ept_ad, first_read, gva, qual)
    exits_text = [
        f"  VM exit {e.reason} {e.name}: GPA {e.gpa:#x}, qualification {e.qualification:#x}"
        for e in result.trace.of_type(VmExit)
        if e.gpa is not None and e.qualification is not None
    ]
    solution = "\n".join(
        [
            f"The access takes these exits (engine trace; the question is about GPA"
            f" {chosen.gpa:#x}):",
            *exits_text,
            "Its qualification, bit by bit:",
            *_bit_lines(bits, qual),
            f"Answer: {answer}",
        ]
    )
    grader = Grader(
        qual,
        ValueReader(bare=(16, 10), names=_QUAL_NAMES, bit_lists=True),
        "give the qualification in hex (0x181 or 181), in decimal, or as the set bits"
        " ('bits 0 7 8')",
        {},
        lambda given: (
            _bit_differences(bits, qual, given)
            if isinstance(given, int)
            else "Give a number or the set bits."
        ),
    )
    return Question("ept-qualification", prompt, hint, solution, answer, grader)


def _qualification_bits(
    kind: str, final: bool, ad: bool, first_read: bool, gva: int, qual: int
) -> list[Bit]:
    """Why each bit of the engine's qualification has its value (SDM Vol 3C table 28-7,
    FACTS B)."""
    doing = f"the access is a {kind}"
    if not final:
        doing = "the CPU reads a guest paging-structure entry, a data access even for a fetch"
        doing += ", which with EPT A/D flags on counts as a write too" if ad else ""
    allowed = (
        "the first read made KVM map the host's zero page readable and executable, not writable"
        if first_read
        else "no EPT entry maps this GPA yet (KVM builds them lazily), so bits 5:3 are 0"
    )

    def bit(mask: int, name: str, if_set: str, if_clear: str) -> Bit:
        return _explained(mask, name, qual, if_set, if_clear)

    return [
        bit(EPT_VIOLATION_ACC_READ, "read", doing, doing + ": not a read"),
        bit(EPT_VIOLATION_ACC_WRITE, "write", doing, doing + ": not a write"),
        bit(EPT_VIOLATION_ACC_INSTR, "fetch", doing, doing + ": not a fetch"),
        bit(EPT_VIOLATION_READABLE, "readable", allowed, allowed),
        bit(EPT_VIOLATION_WRITABLE, "writable", allowed, allowed),
        bit(EPT_VIOLATION_EXECUTABLE, "executable", allowed, allowed),
        bit(
            EPT_VIOLATION_GVA_IS_VALID,
            "GVA valid",
            f"the CPU was translating GVA {gva:#x}",
            "no guest-linear address was being translated",
        ),
        bit(
            EPT_VIOLATION_GVA_TRANSLATED,
            "final",
            "the access was to the final translation (the data page)",
            "the access was to a guest paging-structure entry, not the final translation",
        ),
    ]


def _seeded_qualification(seed: int) -> Question:
    rng = _rng("ept-qualification", seed)
    scenario = rng.choice(("table", "final", "final", "zero-page"))
    levels = rng.choice((4, 5))
    gva = _random_page(rng, levels) + rng.randrange(0, PAGE_SIZE, 8)
    return ept_qualification_question(
        "write" if scenario == "zero-page" else rng.choice(("read", "write", "fetch")),
        which="table" if scenario == "table" else "final",
        first_read=scenario == "zero-page",
        ept_ad=rng.random() < 0.5,
        guest_levels=levels,
        gva=gva,
        gpa=rng.randrange(0x100, 0x600) << PAGE_SHIFT,
    )


# --- choosing a question -------------------------------------------------------------------------

TOPICS: Mapping[str, Callable[[int], Question]] = MappingProxyType(
    {
        "indices": _seeded_indices,
        "references": _seeded_references,
        "error-code": _seeded_error_code,
        "translate": _seeded_translate,
        "memslot": _seeded_memslot,
        "ept-qualification": _seeded_qualification,
    }
)


def _check_seed(seed: object) -> int:
    return check_int("seed", seed, 0, SEED_LIMIT, valid="0 <= seed < 2**63")


def _rng(topic: str, seed: int) -> random.Random:
    """The topic's own random stream for `seed` (a string seed is hashed with SHA-512, so
    the stream is the same on every run and platform, whatever PYTHONHASHSEED is)."""
    return random.Random(f"{topic}:{_check_seed(seed)}")


def quiz(seed: int, topic: str | None = None) -> Question:
    """The question for `seed`: the same seed (and topic) always gives the same question.
    Without a topic, the seed picks one too."""
    _check_seed(seed)
    if topic is None:
        topic = random.Random(seed).choice(tuple(TOPICS))
    return TOPICS[check_choice("topic", topic, tuple(TOPICS))](seed)
