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
from twodwalk.kvm.memslots import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, Memslots
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
from twodwalk.tlb import Tlb, TwoLevelTlb
from twodwalk.trace import (
    EptWalk,
    GuestWalk,
    HostWalk,
    KvmStep,
    NativeWalk,
    Reference,
    Trace,
    VmExit,
)
from twodwalk.views.text import (
    PSC_NAMES,
    dump_tables,
    entry_meaning,
    format_2d_walk,
    format_walk,
    info_memslots,
    rights_text,
    size_text,
)
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


# --- topic "indices": split a GVA (SDM Vol 3A 4.5.4, figure 4-8) ----------------------------------


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
    rng = _rng("references", seed)
    guest_levels, ept_levels = rng.choice((4, 5)), rng.choice((4, 5))
    large = rng.choice(("none", "none", "guest", "ept", "both"))
    guest_page = HUGE_PAGE if large in ("guest", "both") else PAGE_SIZE
    ept_page = HUGE_PAGE if large in ("ept", "both") else PAGE_SIZE
    gva = _random_page(rng, guest_levels, guest_page) + rng.randrange(0, guest_page, 8)
    return references_question(
        guest_levels, ept_levels, guest_page=guest_page, ept_page=ept_page, gva=gva
    )


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


# --- topic "translate": walk a toy guest page table by hand (SDM Vol 3A 4.5.4) --------------------

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


# --- topic "memslot": GPA -> HVA (KVM `__gfn_to_hva_memslot`, api.rst) ----------------------------

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


def memslots_of_machine_question(memslots: Memslots, seed: int) -> Question:
    """A memslot question about a machine's own memslots (e.g. a scenario's): the seed picks
    a GPA inside a slot, in the gap after one, or just past the last, as `_seeded_memslot`
    does for its PC layout."""
    rng = _rng("memslot-of-machine", seed)
    slots = sorted(memslots.slots.values(), key=lambda s: s.guest_phys_addr)
    if not slots:
        raise TwodwalkError("the machine has no memslots to ask about")
    slot = rng.choice(slots)
    end = slot.guest_phys_addr + slot.memory_size
    gpa = rng.choice(
        (
            slot.guest_phys_addr + rng.randrange(slot.memory_size),
            slot.guest_phys_addr + rng.randrange(slot.memory_size),
            end + rng.randrange(PAGE_SIZE),  # just past the slot: a hole or the next slot
        )
    )
    specs = [
        (s.as_id << 16 | s.id, s.flags, s.guest_phys_addr, s.memory_size, s.userspace_addr)
        for s in slots
    ]
    return memslot_question(specs, gpa)


# --- topic "ept-qualification": an EPT violation's exit qualification (SDM Vol 3C 28-7) -----------

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
    """Why each bit of the engine's qualification has its value (SDM Vol 3C table 28-7)."""
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


# --- topic "tlb": what the translation caches save (SDM Vol 3C 29.4; Vol 3A 4.10) -----------------

TLB_STEPS = ("read", "invlpg", "mov-cr3", "invvpid", "invept")
_STEP_TEXT = {
    "read": "read {page}",
    "invlpg": "INVLPG {page}",
    "mov-cr3": "MOV to CR3 (the same value, CR4.PCIDE=0)",
    "invvpid": "INVVPID single-context (its own VPID)",
    "invept": "INVEPT single-context (its own EPTP)",
}
_SHORT_STEP = {
    "read": "read {page}",
    "invlpg": "INVLPG {page}",
    "mov-cr3": "MOV to CR3",
    "invvpid": "INVVPID",
    "invept": "INVEPT",
}
_HIT_WORDS = frozenset({"hit", "tlb hit", "a tlb hit", "no walk", "none"})
_CACHES_OFF = ("tlb", "psc", "guest-physical", "ept-psc", "all")
TLB_PAGES: Mapping[str, int] = MappingProxyType(
    {
        "A": 0x7F00_4060_5000,  # 1 GiB 1, 2 MiB region 3, page 5
        "B": 0x7F00_4060_9000,  # the same page table as A
        "C": 0x7F00_40E0_2000,  # 2 MiB region 7 of the same GiB: the same page directory
        "D": 0x7F00_8010_0000,  # GiB 2 of the same 512 GiB: the same PDPT
    }
)


@dataclass(frozen=True)
class _CacheState:
    """What the caches hold for the page asked about, after one step of the history."""

    tlb: bool
    psc: int | None  # the lowest paging-structure-cache level whose entry covers the page
    gpm: bool  # the page's guest-physical mapping (its GPA -> HPA)
    ept_psc: int | None  # the lowest EPT paging-structure-cache level covering the page's GPA


@dataclass(frozen=True)
class _TlbRun:
    trace: Trace
    states: tuple[_CacheState, ...]  # [0]: after the caches were emptied; [k]: after step k
    fmt: EntryFormat


def tlb_question(
    history: Sequence[str],
    final: str,
    *,
    pages: Mapping[str, int] = TLB_PAGES,
    guest_levels: int = 4,
    ept_levels: int = 4,
) -> Question:
    """How many memory references the last read of a history makes: the guest has read every
    page of `pages` once (so EPT maps them all), the caches were emptied, then the steps of
    `history` ran ('read A', 'invlpg A', 'mov-cr3', 'invvpid', 'invept'). The answer is the
    engine's count; each typical mistake is checked by running the history again with one
    cache switched off."""
    steps = [_tlb_step(step, pages) for step in history]
    check_choice("final", final, tuple(pages))
    run = _tlb_run(pages, steps, final, guest_levels, ept_levels, None)
    refs = run.trace.memory_references()
    expected = len(refs)
    off = {
        name: len(
            _tlb_run(pages, steps, final, guest_levels, ept_levels, name).trace.memory_references()
        )
        for name in _CACHES_OFF
    }
    names = list(pages)
    layout = [
        f"  {name} = GVA {gva:#x}{_page_relation(run.fmt, pages[names[0]], gva, names[0])}"
        for name, gva in pages.items()
    ]
    told = [f"  {n}. {_step_text(step)}" for n, step in enumerate(steps, 1)] or ["  (nothing)"]
    prompt = "\n".join(
        [
            f"A {guest_levels}-level guest under {ept_levels}-level EPT has read each of these"
            " pages once, so KVM has built every EPT entry they need:",
            *layout,
            "Then every translation cache was emptied (INVVPID and INVEPT). The guest then did,"
            " in order:",
            *told,
            f"Finally the guest reads {final}. How many memory references does the hardware"
            " make to translate that read? Count the reads of guest and EPT entries, not the"
            " data access; answer 0 if the TLB serves it. The caches (SDM Vol 3C 29.4): a TLB"
            " big enough for all these pages, paging-structure caches (PML4E, PDPTE, PDE),"
            " guest-physical mappings, and the EPT's own paging-structure caches (EPT PML4E,"
            " PDPTE, PDE: a GPA prefix -> the EPT table below), filled when a walk is over.",
        ]
    )
    hint = (
        "Go through the caches in the order the CPU does. A TLB entry for the page: no walk."
        " Else the lowest paging-structure cache that covers the page lets the walk start"
        " below it (the PDE cache: only the PTE is read). Every guest table then costs 1"
        " read plus an EPT walk of its GPA, and so does the final GPA, unless a guest-physical"
        " mapping holds that GPA; an EPT walk starts below the EPT root when an EPT"
        " paging-structure cache covers the GPA (the EPT PDE cache: 1 read). INVLPG and MOV to"
        " CR3 drop the page's TLB entries and the paging-structure caches but keep what came"
        " from EPT (guest-physical mappings, EPT paging-structure caches); INVEPT drops all."
    )
    story = _tlb_story(run, steps, final)
    walk = (
        ["The TLB serves the read: no walk, no memory reference."]
        if not refs
        else [
            "The walk, reference by reference:",
            format_2d_walk(run.trace),
            f"  = {sum(r.dimension == 'guest' for r in refs)} guest entries"
            f" + {sum(r.dimension == 'ept' for r in refs)} EPT entries",
        ]
    )
    solution = "\n".join(
        [
            f"Before the final read of {final} (GVA {pages[final]:#x}):",
            *story,
            *walk,
            f"Answer: {expected}",
        ]
    )
    grader = Grader(
        expected,
        _count_reader(_HIT_WORDS),
        "give the number of memory references in decimal (0 for a TLB hit)",
        _mistakes(expected, _tlb_mistakes(expected, off, refs, story, final)),
        lambda given: (
            f"Not {given}: start from the TLB, then the lowest paging-structure cache that"
            " covers the page, then count for each guest table left (and the final GPA) one"
            " EPT walk unless a guest-physical mapping holds its GPA."
        ),
    )
    return Question("tlb", prompt, hint, solution, str(expected), grader)


def _count_reader(zero_words: frozenset[str]) -> Callable[[str], tuple[Value, ...]]:
    """A count in decimal, or one of `zero_words` ("hit", "none" ...) for 0."""
    decimal = ValueReader(bare=(10,))

    def read(text: str) -> tuple[Value, ...]:
        return (0,) if _normal(text) in zero_words else decimal(text)

    return read


def _tlb_step(step: str, pages: Mapping[str, int]) -> tuple[str, str | None]:
    """('read', 'A') from 'read A', ('invept', None) from 'invept'."""
    words = step.split()
    verb = check_choice("step", words[0] if words else step, TLB_STEPS)
    if verb in ("read", "invlpg"):
        if len(words) != 2:
            raise TwodwalkError(f"step={step!r} needs a page: e.g. '{verb} {next(iter(pages))}'")
        return verb, check_choice("page", words[1], tuple(pages))
    if len(words) != 1:
        raise TwodwalkError(f"step={step!r}: {verb} takes no page")
    return verb, None


def _step_text(step: tuple[str, str | None]) -> str:
    return _STEP_TEXT[step[0]].format(page=step[1])


def _page_relation(fmt: EntryFormat, first: int, gva: int, first_name: str) -> str:
    """Which entries and tables a page shares with the first page, named by region."""
    if gva == first:
        return ""
    for level in (2, 3, 4):
        if gva >> fmt.shift(level) == first >> fmt.shift(level):
            entry, below = fmt.level_name(level), fmt.level_name(level - 1).removesuffix("E")
            return (
                f"  (the same {size_text(fmt.page_size(level))} region as {first_name}: one"
                f" {entry}, and the {below} it points to, serve both)"
            )
    return f"  (shares only the top-level table with {first_name})"


def _tlb_run(
    pages: Mapping[str, int],
    steps: Sequence[tuple[str, str | None]],
    final: str,
    guest_levels: int,
    ept_levels: int,
    off: str | None,
) -> _TlbRun:
    """The question's machine, run: every page read once, the caches emptied, one cache
    switched off (`off`) for a what-if, the history, then the final read."""
    machine = Machine(
        guest_ram=_GUEST_RAM,
        guest_levels=guest_levels,
        ept_levels=ept_levels,
        maxphyaddr=48 if ept_levels == 4 else 52,
        gbpages=False,
    )
    gpas = {}
    for number, (name, gva) in enumerate(pages.items()):
        gpas[name] = _DATA_GPA + number * 0x11000  # spread over the caches' sets
        machine.guest.map(gva, gpas[name], PAGE_SIZE, rw=1, us=1)
        machine.write_gpa(gpas[name], name.encode() * 8)  # a real page, not the zero page
    vcpu, caches = machine.vcpu, machine.vcpu.caches
    for gva in pages.values():
        vcpu.access(gva, "read")
    vcpu.flush_tlb()
    choices: dict[str | None, list[Tlb | TwoLevelTlb]] = {
        None: [],
        "tlb": [caches.tlb],
        "psc": list(caches.psc.values()),
        "guest-physical": [caches.guest_physical],
        "ept-psc": list(caches.ept_psc.values()),
        "all": caches.all(),
    }
    off_caches = choices[off]
    for cache in off_caches:
        cache.enabled = False
    gva, gpa = pages[final], gpas[final]
    states = [_cache_state(machine, gva, gpa)]
    for verb, page in steps:
        if verb == "read":
            vcpu.access(pages[page or ""], "read")
        elif verb == "invlpg":
            vcpu.invlpg(pages[page or ""])
        elif verb == "mov-cr3":
            vcpu.mov_cr3(vcpu.cr3)
        elif verb == "invvpid":
            vcpu.invvpid("single")
        else:
            vcpu.invept("single")
        states.append(_cache_state(machine, gva, gpa))
    trace = vcpu.access(gva, "read").trace
    if trace.of_type(VmExit):
        raise TwodwalkError("the final read took a VM exit: EPT was not complete")
    return _TlbRun(trace, tuple(states), machine.guest.format)


def _cache_state(machine: Machine, gva: int, gpa: int) -> _CacheState:
    """Read, without counting a look-up, what the caches hold for one page."""
    caches = machine.vcpu.caches
    psc = [
        level
        for level, cache in caches.psc.items()
        if any(e.page <= gva < e.page + e.page_size for e in cache.entries())
    ]
    ept_psc = [
        level
        for level, cache in caches.ept_psc.items()
        if any(e.page <= gpa < e.page + e.page_size for e in cache.entries())
    ]
    return _CacheState(
        any(e.page <= gva < e.page + e.page_size for e in caches.tlb.entries()),
        min(psc, default=None),
        any(e.page <= gpa < e.page + e.page_size for e in caches.guest_physical.entries()),
        min(ept_psc, default=None),
    )


def _since(run: _TlbRun, steps: Sequence[tuple[str, str | None]], attribute: str) -> str:
    """The step after which a cache's state for the page stopped changing, in words."""
    values = [getattr(state, attribute) for state in run.states]
    changed = [k for k in range(1, len(values)) if values[k] != values[k - 1]]
    if not changed:
        return "since the caches were emptied"
    k = changed[-1]
    verb, page = steps[k - 1]
    return f"since step {k}, {_SHORT_STEP[verb].format(page=page)}"


def _tlb_story(run: _TlbRun, steps: Sequence[tuple[str, str | None]], final: str) -> list[str]:
    """What each cache holds for the page, and since which step: the solution's first lines,
    and the reasons the feedback quotes (one sentence per cache: TLB, PSC, guest-physical)."""
    state, fmt = run.states[-1], run.fmt
    if state.tlb:
        tlb = f"The TLB holds {final} ({_since(run, steps, 'tlb')}): no walk at all."
    else:
        tlb = f"The TLB has no entry for {final} ({_since(run, steps, 'tlb')})."
    if state.psc is not None:
        psc = (
            f"The {PSC_NAMES[state.psc]} covers {final}'s"
            f" {size_text(fmt.page_size(state.psc))} region ({_since(run, steps, 'psc')}):"
            f" a walk starts at the {fmt.level_name(state.psc - 1)}, and the cache gives the"
            " host-physical address of its table (no EPT walk for that table)."
        )
    else:
        psc = (
            f"No paging-structure cache covers {final} ({_since(run, steps, 'psc')}): a walk"
            f" starts at CR3 and reads all {fmt.levels} guest levels."
        )
    holds = "hold" if state.gpm else "do not hold"
    gpm = f"The guest-physical mappings {holds} {final}'s GPA ({_since(run, steps, 'gpm')})"
    walks = run.trace.of_type(GuestWalk)
    if walks and not state.tlb:
        reads = [step.read for step in walks[0].record.steps]
        found = {
            how: sum(
                (read.cached == how) if how != "EPT walk" else bool(read.nested) for read in reads
            )
            for how in ("paging-structure cache", "guest-physical", "EPT walk")
        }
        gpm += (
            f"; of the {len(reads)} guest table{'s' if len(reads) > 1 else ''} the walk reads,"
            f" the paging-structure cache found {found['paging-structure cache']}, a"
            f" guest-physical mapping {found['guest-physical']} and an EPT walk"
            f" {found['EPT walk']}."
        )
    else:
        gpm += "."
    if state.ept_psc is not None:
        ept = (
            f"The EPT {PSC_NAMES[state.ept_psc]} covers {final}'s GPA"
            f" ({_since(run, steps, 'ept_psc')}): an EPT walk of it reads only the"
            f" {state.ept_psc - 1} EPT level{'s' if state.ept_psc > 2 else ''} below."
        )
    else:
        ept = (
            f"No EPT paging-structure cache covers {final}'s GPA"
            f" ({_since(run, steps, 'ept_psc')}): an EPT walk of it starts at the EPT root."
        )
    return [f"  {line}" for line in (tlb, psc, gpm, ept)]


def _tlb_mistakes(
    expected: int,
    off: Mapping[str, int],
    refs: Sequence[Reference],
    story: Sequence[str],
    final: str,
) -> list[tuple[Value, str]]:
    """Typical wrong counts, each found by running the history with a cache switched off."""
    tlb, psc, gpm, ept = (line.strip() for line in story)
    guest = sum(r.dimension == "guest" for r in refs)
    items: list[tuple[Value, str]] = [
        (off["tlb"], f"Not {off['tlb']}: that is what a walk would cost. {tlb}"),
        (0, f"Not 0: {tlb} The read walks."),
        (off["psc"], f"Not {off['psc']}: that is the cost without paging-structure caches. {psc}"),
        (
            off["guest-physical"],
            f"Not {off['guest-physical']}: that is the cost without guest-physical mappings. {gpm}",
        ),
        (
            off["ept-psc"],
            f"Not {off['ept-psc']}: that is the cost without the EPT's paging-structure"
            f" caches, every EPT walk from the root. {ept}",
        ),
        (
            off["all"],
            f"Not {off['all']}: that is the walk with every cache empty ((n+1)(m+1)-1"
            f" references). {psc} {gpm}",
        ),
    ]
    if guest < len(refs):
        items.append(
            (
                guest,
                f"Not {guest}: that counts only the guest entries; the walk also reads"
                f" {len(refs) - guest} EPT entries for GPAs no guest-physical mapping held.",
            )
        )
    items.append(
        (expected + 1, f"Not {expected + 1}: that counts the data access too; count the walk.")
    )
    return items


def _seeded_tlb(seed: int) -> Question:
    rng = _rng("tlb", seed)
    guest_levels, ept_levels = rng.choice(((4, 4), (4, 4), (4, 5), (5, 4)))
    top = PAGE_SHIFT + 9 * guest_levels - 1  # the user half
    base = rng.randrange(1 << 39, 1 << top, 1 << 39)
    gib_a, gib_d = rng.sample(range(512), 2)
    region_a, region_c = rng.sample(range(512), 2)
    page_a, page_b, page_c, page_d = rng.sample(range(512), 4)
    pages = {
        "A": base | gib_a << 30 | region_a << 21 | page_a << 12,
        "B": base | gib_a << 30 | region_a << 21 | page_b << 12,
        "C": base | gib_a << 30 | region_c << 21 | page_c << 12,
        "D": base | gib_d << 30 | rng.randrange(512) << 21 | page_d << 12,
    }
    names = list(pages)
    history = []
    for _ in range(rng.randint(1, 4)):
        verb = rng.choices(TLB_STEPS, weights=(8, 3, 1, 1, 1))[0]
        history.append(f"{verb} {rng.choice(names)}" if verb in ("read", "invlpg") else verb)
    final = rng.choice(names)
    return tlb_question(
        history, final, pages=pages, guest_levels=guest_levels, ept_levels=ept_levels
    )


# --- topic "what-if": which structure a change under a running guest touches (KVM mmu.c, mm/) -----

WHAT_IFS: Mapping[str, str] = MappingProxyType(
    {
        "swap-out": "The host kernel swaps the page out (mm/vmscan.c shrink_folio_list).",
        "migrate": "The host kernel migrates the page to another frame (mm/migrate.c"
        " migrate_pages), e.g. for compaction or NUMA balancing.",
        "ksm-merge": "KSM finds an identical page elsewhere in the VMM and merges the two into"
        " one write-protected frame (mm/ksm.c try_to_merge_one_page).",
        "thp-split": "The host splits the 2 MiB transparent huge page that backs the page into"
        " 512 small pages (mm/huge_memory.c __split_huge_pmd).",
        "thp-collapse": "khugepaged collapses the 512 small pages around the page into one"
        " 2 MiB page (mm/khugepaged.c collapse_huge_page).",
        "munmap": "The VMM munmaps the 4 KiB of its guest-RAM mapping behind the page.",
        "memslot-move": "The VMM moves the memslot to a new guest-physical base"
        " (KVM_SET_USER_MEMORY_REGION, a MOVE).",
        "memslot-delete": "The VMM deletes the memslot (KVM_SET_USER_MEMORY_REGION with"
        " memory_size 0).",
        "dirty-logging": "The VMM turns on dirty logging for the memslot, as live migration"
        " does (KVM_SET_USER_MEMORY_REGION with KVM_MEM_LOG_DIRTY_PAGES).",
        "guest-remap": "The guest points its PTE for the page at another GPA, and runs no INVLPG.",
        "swap-out-without-notifiers": "With KVM's MMU notifiers switched off (a what-if: Linux"
        " always has them), the host kernel swaps the page out.",
    }
)
STRUCTURES = ("guest", "memslot", "host", "ept")  # along the chain GVA -> GPA -> HVA -> HPA
_STRUCTURE_NAMES = {
    "guest": "the guest's PTE",
    "memslot": "the memslot",
    "host": "the host page-table entry",
    "ept": "the EPT entry",
}
_STRUCTURE_WORDS = {
    "guest": "guest",
    "memslot": "memslot",
    "memslots": "memslot",
    "slot": "memslot",
    "host": "host",
    "ept": "ept",
    "spte": "ept",
}
_NONE_WORDS = frozenset({"none", "nothing", "no change", "neither"})
_FILLER = frozenset(
    (
        *("the", "a", "its", "of", "and", "only", "both", "s", "vmm", "kvm", "memory"),
        *("entry", "entries", "pte", "ptes", "pmd", "page", "table", "tables", "leaf"),
        *("change", "changes", "changed"),
    )
)
_UNCHANGED = {
    "guest": "the guest's PTE changes only when the guest itself writes it; the guest is not"
    " told about changes below its GPAs",
    "memslot": "memslots change only when the VMM calls KVM_SET_USER_MEMORY_REGION",
    "host": "the VMM's host page table maps HVA -> HPA, and this change leaves that mapping alone",
    "ept": "nothing asked KVM to change it",
}
_EPT_UNCHANGED = {
    "guest-remap": "with EPT on, a guest store to its own page table is an ordinary write that"
    " KVM never sees (no exit), and the GPA -> HPA mapping did not change; the guest must run"
    " INVLPG so that its TLB forgets the old translation",
    "swap-out-without-notifiers": "with MMU notifiers off nothing tells KVM: the EPT entry"
    " still points at the frame the host just freed (a stale entry)",
}


def what_if_question(
    what: str, *, gva: int = 0x40_0000, gpa: int = _DATA_GPA, guest_write: bool = True
) -> Question:
    """Which of the guest's PTE, the memslot, the host page-table entry and the EPT entry
    that serve one guest page change when `what` (a key of `WHAT_IFS`) happens, read from the
    engine's entries before and after: the guest has already accessed the page (a write if
    `guest_write`), so every structure is in place."""
    check_choice("what", what, tuple(WHAT_IFS))
    check_aligned("gva", check_int("gva", gva, 0, 1 << 47, valid="a user GVA"), PAGE_SIZE)
    check_aligned("gpa", check_int("gpa", gpa, 0, 6 * MIB, valid="0 <= gpa < 6 MiB"), PAGE_SIZE)
    thp = what.startswith("thp")
    machine = Machine(guest_ram=_GUEST_RAM, gbpages=False, thp=thp)
    machine.guest.map(gva, gpa, PAGE_SIZE, rw=1, us=1)
    machine.write_gpa(gpa, b"guest data" * 409)  # the VMM loaded the page: a real frame
    hva = machine.vm.gpa_to_hva(gpa)
    assert hva is not None
    kind = "write" if guest_write else "read"
    machine.vcpu.access(gva, kind, 1 if guest_write else None)
    if what == "thp-collapse":  # small pages first, each in use, so there is something to collapse
        machine.host.split_thp(machine.vmm, hva)
        machine.vcpu.access(gva, kind, 2 if guest_write else None)
    pte = machine.guest.page_tables.find_leaf(gva)
    assert pte is not None
    pte_hva = machine.vm.gpa_to_hva(pte[0])
    assert pte_hva is not None
    before = _structures(machine, gpa, hva, pte_hva)
    logged = len(machine.vm.mmu.log)
    _do_what_if(machine, what, gva, gpa, hva, pte[0])
    after = _structures(machine, gpa, hva, pte_hva)
    kvm = [f"KVM {s.function}: {s.detail}" for s in machine.vm.mmu.log[logged:]]
    changed = tuple(name for name in STRUCTURES if before[name] != after[name])
    expected = _structure_mask(changed)
    answer = " ".join(changed) or "none"
    prompt = (
        f"A guest maps GVA {gva:#x} to GPA {gpa:#x}; memslot 0 maps that GPA to HVA"
        f" {hva:#x} of the VMM, and the host's page tables map the HVA to a host frame. The"
        f" guest has {'written' if guest_write else 'read'} the page, so KVM has built its"
        f" EPT entry.\n{WHAT_IFS[what]}\n"
        "Right after that (before the guest touches the page again), which of these changed:"
        " the guest's PTE ('guest'), the memslot ('memslot'), the host page-table entry for"
        " the HVA ('host'), the EPT entry for the GPA ('ept')? Name all that changed, e.g."
        " 'host ept', or answer 'none'."
    )
    hint = (
        "Each structure has one owner: the guest kernel writes its PTE; the VMM changes"
        " memslots (KVM_SET_USER_MEMORY_REGION); the host kernel writes its page tables;"
        " KVM writes EPT entries, and zaps them when the host tells it (MMU notifiers) or"
        " when a memslot goes away or moves."
    )
    reasons = _structure_reasons(what, before, after, kvm)
    solution = "\n".join(
        [
            f"{WHAT_IFS[what]}",
            *(
                f"  {_STRUCTURE_NAMES[name]:<26} {'CHANGED' if name in changed else 'same':<8}"
                f" {before[name]}"
                + (f"\n  {'':<26} {'':<8} -> {after[name]}" if name in changed else "")
                for name in STRUCTURES
            ),
            *(f"  {line}" for line in kvm),
            f"Answer: {answer}",
        ]
    )
    grader = Grader(
        expected,
        _structure_reader,
        "give the structures that changed: guest, memslot, host, ept (e.g. 'host ept'), or 'none'",
        {},
        lambda given: _structure_differences(expected, given, reasons),
    )
    return Question("what-if", prompt, hint, solution, answer, grader)


def _structure_mask(names: Sequence[str]) -> int:
    return sum(1 << STRUCTURES.index(name) for name in names)


def _structure_reader(text: str) -> tuple[Value, ...]:
    """A set of structure names ('EPT entry and host PTE'), as a bit mask; 'none' is 0."""
    normal = _normal(text)
    if normal in _NONE_WORDS:
        return (0,)
    tokens = [t for t in re.split(r"[\s,;:+&/|'()-]+", normal.replace("'s", " ")) if t]
    names = [t for t in tokens if t not in _FILLER]
    if not names or any(t not in _STRUCTURE_WORDS for t in names):
        return ()
    return (_structure_mask(sorted({_STRUCTURE_WORDS[t] for t in names})),)


def _structures(machine: Machine, gpa: int, hva: int, pte_hva: int) -> dict[str, str]:
    """Each structure serving the page, as text: compare two snapshots to see what changed.
    Read without side effects (no walk sets an A bit, nothing is faulted in); the guest's PTE
    is read where it lies in the VMM's memory, so a memslot change cannot hide it."""
    host_fmt = machine.host.format
    found = machine.vmm.tables.find_leaf(pte_hva)
    guest = "not in memory"
    if found is not None:
        frame = host_fmt.output_address(machine.memory.read_u64(found[0]), found[1])
        value = machine.memory.read_u64(frame + (pte_hva & (host_fmt.page_size(found[1]) - 1)))
        guest = f"PTE = {value:#018x}{entry_meaning(machine.guest.format, 1, value)}"
    slot = machine.vm.memslots.gfn_to_memslot(gpa >> PAGE_SHIFT)
    memslot = (
        f"no memslot covers GPA {gpa:#x}"
        if slot is None
        else f"slot {slot.id}: GPA {slot.guest_phys_addr:#x}, {size_text(slot.memory_size)},"
        f" HVA {slot.userspace_addr:#x}, flags {slot.flags:#x}"
    )
    return {
        "guest": guest,
        "memslot": memslot,
        "host": _leaf_text(machine.vmm.tables, machine.memory, hva),
        "ept": _leaf_text(machine.vm.ept.tables, machine.memory, gpa),
    }


def _leaf_text(tables: PageTables, memory: PhysicalMemory, address: int) -> str:
    """The entry that maps `address` (or the lowest one a walk would reach, if none does)."""
    fmt = tables.fmt
    found = tables.find_leaf(address)
    if found is None:
        for level in range(1, fmt.levels + 1):
            slot = tables.entry_address(address, level)
            if slot is not None:
                found = slot, level
                break
    if found is None:
        return "no table"
    value = memory.read_u64(found[0])
    name = fmt.level_name(found[1])
    return f"{name} = {value:#018x}{entry_meaning(fmt, found[1], value)}"


def _do_what_if(machine: Machine, what: str, gva: int, gpa: int, hva: int, pte: int) -> None:
    """Make one what-if happen, through the calls the real actors make."""
    host, vmm, vm = machine.host, machine.vmm, machine.vm
    slot = vm.memslots.gfn_to_memslot(gpa >> PAGE_SHIFT)
    assert slot is not None
    region = (slot.as_id << 16 | slot.id, slot.guest_phys_addr, slot.memory_size)
    if what in ("swap-out", "swap-out-without-notifiers"):
        host.mmu_notifiers_enabled = what == "swap-out"
        host.swap_out(vmm, hva)
    elif what == "migrate":
        host.migrate(vmm, hva)
    elif what == "ksm-merge":
        twin = vmm.mmap(PAGE_SIZE, name="KSM twin")
        page = host.get_user_page(vmm, twin, True)
        assert page is not None
        machine.memory.write(page.hpa, machine.read_gpa(gpa, PAGE_SIZE))
        host.ksm_merge(vmm, hva, twin)
    elif what == "thp-split":
        host.split_thp(vmm, hva)
    elif what == "thp-collapse":
        host.collapse_thp(vmm, hva)
    elif what == "munmap":
        vmm.munmap(hva, PAGE_SIZE)
    elif what == "memslot-move":
        vm.set_user_memory_region(region[0], slot.flags, 1 << 30, region[2], slot.userspace_addr)
    elif what == "memslot-delete":
        vm.set_user_memory_region(region[0], slot.flags, region[1], 0, slot.userspace_addr)
    elif what == "dirty-logging":
        vm.set_user_memory_region(
            region[0],
            slot.flags | KVM_MEM_LOG_DIRTY_PAGES,
            region[1],
            region[2],
            slot.userspace_addr,
        )
    else:  # guest-remap: the guest kernel's store to its PTE, no INVLPG
        value = int.from_bytes(machine.read_gpa(pte, 8), "little")
        moved = (
            machine.guest.format.layout(1, False).field("address").insert(value, gpa + PAGE_SIZE)
        )
        machine.write_gpa(pte, moved.to_bytes(8, "little"))


def _structure_reasons(
    what: str, before: Mapping[str, str], after: Mapping[str, str], kvm: Sequence[str]
) -> dict[str, str]:
    """Why each structure changed or not: its entries before and after, and KVM's steps."""
    reasons = {}
    for name in STRUCTURES:
        if before[name] != after[name]:
            reason = f"{before[name]} -> {after[name]}"
            if name == "ept" and kvm:
                reason += f" ({'; '.join(kvm)})"
            reasons[name] = reason
        else:
            reasons[name] = (
                _EPT_UNCHANGED.get(what, _UNCHANGED[name]) if name == "ept" else (_UNCHANGED[name])
            )
    return reasons


def _structure_differences(expected: int, given: Value, reasons: Mapping[str, str]) -> str:
    """Name each structure the answer got wrong, with its entries before and after."""
    if not isinstance(given, int):
        return "Name the structures that changed, or answer 'none'."
    lines = []
    for number, name in enumerate(STRUCTURES):
        if (expected ^ given) >> number & 1:
            does = "does change" if expected >> number & 1 else "does not change"
            lines.append(f"{_STRUCTURE_NAMES[name]} {does}: {reasons[name]}.")
    shown = " ".join(n for i, n in enumerate(STRUCTURES) if given >> i & 1) or "none"
    return f"Not '{shown}':\n" + "\n".join(f"  {line}" for line in lines)


def _seeded_what_if(seed: int) -> Question:
    rng = _rng("what-if", seed)
    return what_if_question(
        rng.choice(tuple(WHAT_IFS)),
        gva=_random_page(rng, 4),
        gpa=rng.randrange(0x100, 0x600) << PAGE_SHIFT,
        guest_write=rng.random() < 0.7,
    )


# --- topic "roots": the same shape, different trees (SDM Vol 3A 4.5; Vol 3C 29.3.2) ---------------

ROOT_WALKS: Mapping[str, str] = MappingProxyType(
    {
        "gva": "the CPU walks the guest's page tables for GVA {gva:#x} (EPT on)",
        "gpa": "the CPU walks EPT for GPA {gpa:#x}, the guest-physical address of that access"
        " (EPT on)",
        "hva": "KVM, handling the EPT violation for GPA {gpa:#x}, translates HVA {hva:#x} in"
        " software (hva_to_pfn -> get_user_pages) (EPT on)",
        "gva-shadow": "the CPU walks the tables for GVA {gva:#x} with EPT off (shadow paging)",
    }
)


def roots_question(
    walk: str, *, guest_levels: int = 4, gva: int = 0x40_0008, gpa: int = _DATA_GPA
) -> Question:
    """Where a walk starts: the root each walk of a first access to `gva` used, read from the
    trace (guest walk: the GPA in the guest's CR3; EPT walk: the EPTP's root; KVM's walk of
    the VMM's tables: the VMM's own CR3; with EPT off: KVM's shadow root)."""
    check_choice("walk", walk, tuple(ROOT_WALKS))
    check_aligned("gpa", check_int("gpa", gpa, 0, 6 * MIB, valid="0 <= gpa < 6 MiB"), PAGE_SIZE)
    shadow = walk == "gva-shadow"
    machine = Machine(
        guest_ram=_GUEST_RAM, guest_levels=guest_levels, gbpages=False, tdp=not shadow
    )
    machine.guest.map(gva & ~(PAGE_SIZE - 1), gpa, PAGE_SIZE, rw=1, us=1)
    cold = machine.vcpu.access(gva, "read").trace  # KVM's software path runs here
    machine.vcpu.flush_tlb()
    warm = machine.vcpu.access(gva, "read").trace  # every hardware walk from its root
    hva = machine.vm.gpa_to_hva(gpa)
    assert hva is not None
    guest_root = machine.vcpu.cr3_root
    vmm_root = machine.vmm.tables.root
    record = _walk_of(cold if walk == "hva" else warm, walk)
    expected = record.root
    registers = [
        f"  guest CR3, as the guest loaded it:        {machine.vcpu.cr3:#x}",
        f"  the VMM process's CR3 on the host:        {vmm_root:#x}",
    ]
    mistakes: list[tuple[int, str]] = [
        (
            guest_root,
            "That is the root of the guest's own tables (a GPA, from the guest's CR3): they"
            " translate GVA -> GPA"
            + (
                ". With EPT off the CPU never walks them: KVM walks them in software"
                " (walk_addr_generic) and loads the root of its shadow tables into the real CR3"
                if shadow
                else ""
            ),
        ),
        (
            vmm_root,
            "That is the root of the VMM process's own page tables: they translate the VMM's"
            " HVAs, which only KVM's software path (hva_to_pfn) and the VMM itself use; a"
            " guest access never walks them in hardware",
        ),
    ]
    if shadow:
        registers.append(f"  the root of KVM's shadow tables for it:   {expected:#x}")
    else:
        eptp = machine.vm.ept.eptp
        registers.append(f"  the EPTP in the VMCS:                     {eptp.value:#x}")
        mistakes += [
            (
                eptp.root,
                "That is the EPT root (from the EPTP): EPT translates GPAs, each guest table's"
                " address and the final GPA, not the GVA or the VMM's HVAs",
            ),
            (
                eptp.value,
                "That is the whole EPTP: bits 2:0 are the memory type of EPT accesses, bits"
                " 5:3 the walk length minus 1, bit 6 enables EPT A/D flags; the root's address"
                " is bits M-1:12",
            ),
        ]
        root_hpa = warm.of_type(GuestWalk)[0].record.steps[0].read.physical & ~0xFFF
        mistakes.append(
            (
                root_hpa,
                "That is where the guest's root table sits in host memory, found through EPT;"
                " the register holds its guest-physical address",
            )
        )
    prompt = "\n".join(
        [
            f"A {guest_levels}-level guest maps GVA {gva & ~0xFFF:#x} to GPA {gpa:#x}; memslot 0"
            f" puts that GPA at HVA {hva:#x} of the VMM. The registers and roots:",
            *registers,
            f"During the guest's first read of GVA {gva:#x}, "
            + ROOT_WALKS[walk].format(gva=gva, gpa=gpa, hva=hva)
            + ". At which address does that walk start (the root table's address, as the"
            " walk uses it)? Answer in hex.",
        ]
    )
    hint = (
        "Three trees, one shape: the guest's tables (GVA -> GPA, root in the guest's CR3, a"
        " GPA), EPT (GPA -> HPA, root in the EPTP's bits M-1:12) and the VMM's host tables"
        " (HVA -> HPA, root in the VMM process's CR3). With EPT off the CPU walks KVM's"
        " shadow tables (GVA -> HPA) instead of the guest's."
    )
    owner = {
        "gva": "the guest's page tables",
        "gpa": "EPT",
        "hva": "the VMM process's host page tables",
        "gva-shadow": "KVM's shadow page tables",
    }[walk]
    solution = "\n".join(
        [
            f"The trace of the read records this walk of {owner}:",
            format_walk(record),
            f"It starts at {expected:#x}.",
            f"Answer: {expected:#x}",
        ]
    )
    grader = Grader(
        expected,
        ValueReader(bare=(16, 10)),
        "give the root's address in hex, e.g. 0x7ff000",
        _mistakes(expected, [(value, f"Not {value:#x}: {why}.") for value, why in mistakes]),
        lambda given: f"Not {_hex(given)}: which tree does this walk use, and where is its root?",
    )
    return Question("roots", prompt, hint, solution, f"{expected:#x}", grader)


def _walk_of(trace: Trace, walk: str) -> WalkRecord:
    """The last walk of one kind in a trace: the one that translated the address (there
    are several in a first access, one per attempt)."""
    records: list[WalkRecord]
    if walk == "gva":
        records = [e.record for e in trace.of_type(GuestWalk)]
    elif walk == "gpa":
        records = [e.record for e in trace.of_type(EptWalk)]
    elif walk == "hva":
        records = [e.record for e in trace.of_type(HostWalk)]
    else:
        records = [e.record for e in trace.of_type(NativeWalk)]
    return records[-1]


def _seeded_roots(seed: int) -> Question:
    rng = _rng("roots", seed)
    levels = rng.choice((4, 5))
    return roots_question(
        rng.choice(tuple(ROOT_WALKS)),
        guest_levels=levels,
        gva=_random_page(rng, levels) + rng.randrange(0, PAGE_SIZE, 8),
        gpa=rng.randrange(0x100, 0x600) << PAGE_SHIFT,
    )


# --- topic "shadow": what exits with EPT off, and with EPT on (KVM paging_tmpl.h, mmu.c) ----------

SHADOW_ACTIONS: Mapping[str, str] = MappingProxyType(
    {
        "read-p": "read P",
        "read-q": "read Q",
        "write-p": "write P",
        "write-pte": "write its PTE for Q (setting D), through its mapping of the page table",
        "read-unmapped": "read GVA {hole:#x}, which its page tables do not map",
    }
)
_PAGINGS = ("shadow", "ept")
_PAGING_TEXT = {"shadow": "EPT off (shadow paging)", "ept": "EPT on"}
_NO_EXIT_WORDS = frozenset({"none", "no exit", "no exits", "no vm exit", "no vm exits"})
_DIRECT_MAP = 0xFFFF_8880_0000_0000  # where Linux maps all of RAM (x86-64 mm.rst)
_HOLE_PAGES = 0x10  # the unmapped GVA: this many pages above P, in the same page table


def shadow_question(
    actions: Sequence[str],
    *,
    paging: str = "shadow",
    gva: int = 0x40_0000,
    gpa: int = _DATA_GPA,
) -> Question:
    """How many VM exits a few guest actions (keys of `SHADOW_ACTIONS`) take with EPT off
    (`paging="shadow"`) or on ("ept"): the engine runs the same guest on two machines, one
    per paging mode, and counts the exits in the traces."""
    check_choice("paging", paging, _PAGINGS)
    for action in actions:
        check_choice("action", action, tuple(SHADOW_ACTIONS))
    check_aligned("gva", check_int("gva", gva, 0, 1 << 47, valid="a user GVA"), PAGE_SIZE)
    check_aligned("gpa", check_int("gpa", gpa, 0, 6 * MIB, valid="0 <= gpa < 6 MiB"), PAGE_SIZE)
    runs = {name: _shadow_run(actions, name == "ept", gva, gpa) for name in _PAGINGS}
    counts = {
        name: sum(len(t.of_type(VmExit)) for t in traces) for name, (traces, _) in runs.items()
    }
    expected, other = counts[paging], "ept" if paging == "shadow" else "shadow"
    hole = gva + _HOLE_PAGES * PAGE_SIZE
    told = [f"  {n}. {SHADOW_ACTIONS[a].format(hole=hole)}" for n, a in enumerate(actions, 1)] or [
        "  (nothing)"
    ]
    prompt = "\n".join(
        [
            f"A guest maps page P at GVA {gva:#x} and page Q at GVA {gva + PAGE_SIZE:#x} (the"
            " VMM has already loaded both into RAM), and maps the page table that holds their"
            f" PTEs at GVA {runs[paging][1]:#x}, as Linux's direct map does. It has read P, and"
            " read through that mapping once; KVM handled whatever exits that took. Then its"
            f" TLB was flushed. With {_PAGING_TEXT[paging]}, the guest now does, in order:",
            *told,
            "How many VM exits do these take in all?",
        ]
    )
    hint = (
        "With EPT on, KVM hears of a guest access only through an EPT violation: a GPA it has"
        " not mapped yet. With EPT off, the CPU walks KVM's shadow tables, and exits on a page"
        " KVM has not shadowed yet, on a write through a shadow entry KVM made read-only (a"
        " clean guest PTE, or a page of the guest's page tables, which KVM write-protects) and"
        " on every guest #PF, which KVM must see first."
    )
    stories = {name: _exit_stories(actions, traces, hole) for name, (traces, _) in runs.items()}
    solution = "\n".join(
        [
            f"With {_PAGING_TEXT[paging]}, action by action:",
            *(f"  {n}. {line}" for n, (line, _) in enumerate(stories[paging], 1)),
            f"With {_PAGING_TEXT[other]} it would be {counts[other]} in all.",
            f"Answer: {expected}",
        ]
    )
    differ = [
        f"{n}. {mine}"
        for n, ((mine, count), (_, theirs)) in enumerate(
            zip(stories[paging], stories[other], strict=True), 1
        )
        if count != theirs
    ]
    exiting = [f"{n}. {line}" for n, (line, count) in enumerate(stories[paging], 1) if count]
    mistakes: list[tuple[Value, str]] = [
        (
            counts[other],
            f"Not {counts[other]}: that is the count with {_PAGING_TEXT[other]}. With"
            f" {_PAGING_TEXT[paging]} these differ: {' '.join(differ)}",
        ),
        (0, f"Not 0: at least one action exits. {exiting[0] if exiting else ''}"),
        (len(actions), f"Not {len(actions)}: not every action exits."),
    ]
    grader = Grader(
        expected,
        _count_reader(_NO_EXIT_WORDS),
        "give the number of VM exits in decimal",
        _mistakes(expected, mistakes),
        lambda given: (
            f"Not {given}: go action by action. Does it reach a page KVM has not mapped"
            " (or shadowed) yet, write through an entry KVM made read-only, or fault in"
            " the guest? Each action's effect stays for the next one."
        ),
    )
    return Question("shadow", prompt, hint, solution, str(expected), grader)


def _shadow_run(actions: Sequence[str], tdp: bool, gva: int, gpa: int) -> tuple[list[Trace], int]:
    """The guest of a shadow question on one machine: the set-up, then one trace per action,
    and the GVA where the guest maps its page table."""
    machine = Machine(guest_ram=_GUEST_RAM, gbpages=False, tdp=tdp)
    machine.guest.map(gva, gpa, 2 * PAGE_SIZE, rw=1, us=1)
    machine.write_gpa(gpa, b"P" * PAGE_SIZE + b"Q" * PAGE_SIZE)
    found = machine.guest.page_tables.find_leaf(gva)
    assert found is not None
    table = found[0] & ~(PAGE_SIZE - 1)
    table_gva = _DIRECT_MAP + table
    machine.guest.map(table_gva, table, PAGE_SIZE, rw=1)
    vcpu = machine.vcpu
    vcpu.access(gva, "read")
    vcpu.access(table_gva, "read")
    vcpu.flush_tlb()
    q_pte = found[0] + 8
    traces = []
    for action in actions:
        if action == "write-pte":
            dirty = int.from_bytes(machine.read_gpa(q_pte, 8), "little") | 1 << 6
            result = vcpu.access(table_gva + (q_pte & (PAGE_SIZE - 1)), "write", dirty)
        elif action == "write-p":
            result = vcpu.access(gva, "write", 1)
        else:
            page = {"read-p": 0, "read-q": 1, "read-unmapped": _HOLE_PAGES}[action]
            result = vcpu.access(gva + page * PAGE_SIZE, "read")
        traces.append(result.trace)
    return traces, table_gva


def _exit_stories(
    actions: Sequence[str], traces: Sequence[Trace], hole: int
) -> list[tuple[str, int]]:
    """Each action's exits and what KVM did for them, from its trace, with the count."""
    lines = []
    for action, trace in zip(actions, traces, strict=True):
        exits = trace.of_type(VmExit)
        what = SHADOW_ACTIONS[action].format(hole=hole).split(",")[0]
        if not exits:
            lines.append((f"{what}: no exit.", 0))
            continue
        steps = ", ".join(dict.fromkeys(s.function for s in trace.of_type(KvmStep)))
        names = ", ".join(e.name for e in exits)
        plural = "s" if len(exits) > 1 else ""
        lines.append(
            (f"{what}: {len(exits)} exit{plural} ({names}); KVM runs {steps}.", len(exits))
        )
    return lines


def _seeded_shadow(seed: int) -> Question:
    rng = _rng("shadow", seed)
    return shadow_question(
        rng.choices(tuple(SHADOW_ACTIONS), k=rng.randint(2, 4)),
        paging=rng.choice(("shadow", "shadow", "ept")),
        gva=_random_page(rng, 4, HUGE_PAGE) + rng.randrange(0, 256) * PAGE_SIZE,
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
        "tlb": _seeded_tlb,
        "what-if": _seeded_what_if,
        "roots": _seeded_roots,
        "shadow": _seeded_shadow,
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
