"""The grading framework: the question model, how answers are read (numbers in any base, sequences,
bit-by-bit values) and how feedback for a wrong answer is chosen."""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import reduce
from operator import or_

from twodwalk.errors import check_int

SEED_LIMIT = 1 << 63
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


def _explained(
    names: tuple[tuple[int, str, str], ...], mask: int, value: int, if_set: str, if_clear: str
) -> Bit:
    """A bit, named as the engine's table of its bits names it (`PF_ERROR_CODE_BITS`,
    `EPT_VIOLATION_BITS`), whose reason depends on the value the engine gave it."""
    name = next(name for bit, name, _ in names if bit == mask)
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


def check_seed(seed: object) -> int:
    return check_int("seed", seed, 0, SEED_LIMIT, valid="0 <= seed < 2**63")


def seeded_rng(topic: str, seed: int) -> random.Random:
    """The topic's own random stream for `seed` (a string seed is hashed with SHA-512, so
    the stream is the same on every run and platform, whatever PYTHONHASHSEED is)."""
    return random.Random(f"{topic}:{check_seed(seed)}")
