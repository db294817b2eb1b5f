"""Topic 'indices'."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from twodwalk.engine.units import PAGE_SIZE
from twodwalk.engine.walker import Translation, WalkRecord
from twodwalk.errors import TwodwalkError
from twodwalk.exercises.grading import (
    Grader,
    Question,
    SequenceReader,
    Value,
    _mistakes,
    seeded_rng,
)
from twodwalk.exercises.setups import (
    _DATA_GPA,
    _bit_range,
    _random_page,
    _table_names,
    _toy_tables,
    _toy_walk,
)
from twodwalk.views.text import format_walk

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
    rng = seeded_rng("indices", seed)
    levels = rng.choice((4, 5))
    page = _random_page(rng, levels, kernel=rng.random() < 0.5)
    return indices_question(page + rng.randrange(PAGE_SIZE), levels)
