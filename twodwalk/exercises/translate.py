"""Topic 'translate'."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from twodwalk.engine.paging import PageFault, PagingControls, exception_for
from twodwalk.engine.units import HUGE_PAGE_SIZE, PAGE_SIZE, size_text
from twodwalk.engine.walker import WalkRecord
from twodwalk.errors import check_choice, check_int
from twodwalk.exercises.error_code import _fault
from twodwalk.exercises.grading import (
    Grader,
    Question,
    Value,
    ValueReader,
    _hex,
    _mistakes,
    seeded_rng,
)
from twodwalk.exercises.indices import _translation
from twodwalk.exercises.setups import (
    _TOY_MAXPHYADDR,
    _TOY_TABLES,
    _bit_range,
    _random_page,
    _toy_tables,
    _toy_walk,
)
from twodwalk.views.text import format_walk, hexdump_pages

# --- topic "translate": walk raw page tables by hand (SDM Vol 3A 4.5.4), OSTEP style ----------

_FAULT = "fault"
_FAULT_WORDS = {
    w: _FAULT for w in ("fault", "#pf", "pf", "page fault", "not mapped", "unmapped", "not present")
}
_TOY_PHYSICAL_RANGE = (_TOY_TABLES[1], 1 << _TOY_MAXPHYADDR)


@dataclass(frozen=True)
class _Space:
    """Whose tables the question walks: the guest's (GVA -> GPA) or the host's for the VMM
    process (HVA -> HPA). Both are IA-32e tables; only the names and who takes the #PF differ."""

    virtual: str
    physical: str
    tables: str
    fault_handler: str


TRANSLATE_SPACES = MappingProxyType(
    {
        "guest": _Space("GVA", "GPA", "the guest's page tables", "the guest's #PF handler"),
        "host": _Space(
            "HVA",
            "HPA",
            "the host's page tables of the VMM process (the CR3 the host loads to run it)",
            "the host kernel's #PF handler (handle_mm_fault)",
        ),
    }
)


def translate_question(
    mappings: Sequence[tuple[int, int, int]], gva: int, levels: int = 4, space: str = "guest"
) -> Question:
    """Which physical address a supervisor read of `gva` reaches through toy page tables that
    map each (virtual, physical, page size) of `mappings`, given as CR3 and the raw table
    pages, nothing decoded; `space` names the tables the guest's (GVA -> GPA) or the host's
    (HVA -> HPA). The answer is the engine's walk."""
    names = TRANSLATE_SPACES[check_choice("space", space, tuple(TRANSLATE_SPACES))]
    memory, tables, cpu = _toy_tables(levels)
    for va, pa, size in mappings:
        check_int(
            names.physical.lower(),
            pa,
            *_TOY_PHYSICAL_RANGE,
            valid="1 MiB <= address < 64 GiB (the tables sit below)",
        )
        tables.map(va, pa, size, page_size=size, rw=1)
    # Before any walk sets A bits that would give the path away:
    dump = hexdump_pages(
        memory, (e.entry_address & ~(PAGE_SIZE - 1) for e in tables.entries()), names.physical
    )
    record = _toy_walk(tables, memory, cpu, gva)
    translation = record.translation
    expected: Value = _FAULT if translation is None else translation.address
    answer = _hex(expected)
    v, p = names.virtual, names.physical
    prompt = (
        f"CR3 = {tables.root:#x} ({levels}-level paging, MAXPHYADDR {_TOY_MAXPHYADDR}). The"
        f" pages that hold {names.tables}, as raw 8-byte entries (a '*' line stands for lines"
        f" that repeat the one above):\n{dump}\n"
        f"A supervisor read of {v} {gva:#x}: which {p} does it reach? Answer in hex, or"
        " 'fault' if the walk faults."
    )
    hint = (
        f"Split the {v} into {levels} 9-bit indices (bits 47:39, 38:30, 29:21, 20:12) and the"
        " offset. Each entry is 8 bytes at table + 8 x index; bit 0 is P, bit 7 in a PDE (PS)"
        " means it maps a 2 MiB page, and the next address is in bits 51:12. The answer is the"
        f" leaf's page plus the {v}'s offset in the page: bits 11:0 for 4 KiB, 20:0 for 2 MiB."
    )
    others = [
        _toy_walk(tables, memory, cpu, va | (gva & (size - 1)))
        for va, _, size in mappings
        if va != gva & ~(size - 1)
    ]
    if translation is None:
        fault = _fault(record)
        last = (
            f"=> #PF, error code {_error_code(record):#x}, for {names.fault_handler}"
            f" ({fault.detail})"
        )
    else:
        base = translation.address & ~(translation.page_size - 1)
        last = (
            f"page {base:#x} + offset {translation.address - base:#x}"
            f" ({v} bits {translation.page_size.bit_length() - 2}:0) = {translation.address:#x}"
        )
    solution = "\n".join([format_walk(record), last, f"Answer: {answer}"])
    grader = Grader(
        expected,
        ValueReader(bare=(16, 10), words=_FAULT_WORDS),
        f"give {'an' if p[0] == 'H' else 'a'} {p} in hex (0x1234abc or 1234abc) or decimal,"
        " or 'fault' if the walk faults",
        _mistakes(expected, _translate_mistakes(record, others, names)),
        _translate_explainer(record),
    )
    return Question("translate", prompt, hint, solution, answer, grader)


def _error_code(record: WalkRecord) -> int:
    fault = exception_for(record, PagingControls(cr4_la57=record.format.levels == 5))
    assert isinstance(fault, PageFault)
    return fault.error_code


def _translate_mistakes(
    record: WalkRecord, others: Sequence[WalkRecord], names: _Space
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
                f" the {names.virtual}, not just bits 11:0.",
            ),
            (
                record.steps[-1].value + (record.address & (size - 1)),
                "That adds the offset to the leaf's raw value: the flags in its low bits"
                " (P, R/W, ...) are not part of the page's address; take bits 51:12.",
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
            (_translation(other).address, _wrong_page_message(record, other, names)),
        ]
    items.append(
        (
            record.address,
            f"That is the {names.virtual} itself: follow the tables to its {names.physical}.",
        )
    )
    return items


def _wrong_page_message(record: WalkRecord, other: WalkRecord, names: _Space) -> str:
    """The other page's address: name the first index where its virtual address and ours
    differ."""
    fmt = record.format
    level = next(
        lv
        for lv in range(fmt.levels, 0, -1)
        if fmt.index(record.address, lv) != fmt.index(other.address, lv)
    )
    return (
        f"That is where {names.virtual} {other.address:#x} goes; for {record.address:#x} the"
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
            large = " (its bit 7, PS, is set)" if leaf.level > 1 else ""
            return (
                f"The walk does not fault: the {record.format.level_name(leaf.level)} at"
                f" {leaf.entry_address:#x} is present and maps a"
                f" {size_text(translation.page_size)} page{large}. Each entry is 8 bytes:"
                " it sits at table + 8 x index."
            )
        return (
            f"Not {given:#x}: follow the GVA's indices down to the leaf, then add the offset"
            " within the page."
        )

    return explain


def _seeded_translate(seed: int) -> Question:
    rng = seeded_rng("translate", seed)
    pd_index = rng.randrange(510)
    region = _random_page(rng, 4, 1 << 30) | pd_index << 21
    slots = rng.sample(range(512), 4)  # three mapped pages, and one left as a hole
    frames = rng.sample(range(0x100, 0x800), 3)
    mappings = [(region | s << 12, f << 12, PAGE_SIZE) for s, f in zip(slots, frames, strict=False)]
    large = region + HUGE_PAGE_SIZE
    mappings.append((large, rng.randrange(4, 32) * HUGE_PAGE_SIZE, HUGE_PAGE_SIZE))
    target = rng.choice(("small", "small", "large", "hole", "no-table"))
    gva = {
        "small": region | rng.choice(slots[:3]) << 12 | rng.randrange(PAGE_SIZE),
        "large": large + rng.randrange(HUGE_PAGE_SIZE),
        "hole": region | slots[3] << 12 | rng.randrange(PAGE_SIZE),
        "no-table": region + 2 * HUGE_PAGE_SIZE + rng.randrange(HUGE_PAGE_SIZE),
    }[target]
    return translate_question(mappings, gva)
