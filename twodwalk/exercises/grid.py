"""Topic 'grid': reading the two-dimensional walk (SDM Vol 3C 29.3.2), as Bhargava et al.
(ASPLOS 2008) draw it. In a cold walk of an n-level guest under m-level EPT, reference k sits
in row (k-1) // (m+1) and column (k-1) % (m+1): one row per guest table being located (then
the data's GPA), its m EPT reads first, then the guest entry. Given the guest's entries, the
student finds which table reference k reads, or which GPA that row is translating."""

from __future__ import annotations

from dataclasses import dataclass

from twodwalk.engine.trace import GuestWalk, Reference
from twodwalk.engine.units import PAGE_SIZE
from twodwalk.errors import check_choice, check_int
from twodwalk.exercises.grading import Grader, Question, Value, ValueReader, _mistakes, seeded_rng
from twodwalk.exercises.setups import (
    _DATA_GPA,
    _cold_access,
    _nested_machine,
    _random_page,
)
from twodwalk.views.text import format_2d_walk

GRID_ASKS = ("table", "gpa")


@dataclass(frozen=True)
class _ColdWalk:
    """A cold walk's references, the guest's CR3 (a GPA) and entries, and each row's GPA."""

    references: list[Reference]
    trace_text: str
    cr3: int
    entries: list[tuple[str, int]]  # (entry name, value), from the root down
    row_gpas: list[int]  # the GPA each row translates: each guest table, then the data


def _cold_walk(guest_levels: int, ept_levels: int, gva: int) -> _ColdWalk:
    """Run the walk on a `Machine`: the EPT filled by a first touch, then every cache off."""
    machine = _nested_machine(guest_levels, ept_levels)
    machine.guest.map(gva & ~(PAGE_SIZE - 1), _DATA_GPA, PAGE_SIZE, rw=1, us=1)
    result = _cold_access(machine, gva)
    record = result.trace.of_type(GuestWalk)[-1].record
    assert result.gpa is not None
    entries = [(s.format.level_name(s.level), s.value) for s in record.steps]
    return _ColdWalk(
        result.trace.memory_references(),
        format_2d_walk(result.trace),
        machine.vcpu.cr3_root,
        entries,
        [s.table for s in record.steps] + [result.gpa],
    )


def _table_of(ref: Reference) -> str:
    """The table a reference reads, as the grid labels it: nL<level> or gL<level>."""
    if ref.ept_level is not None:
        return f"nL{ref.ept_level}"
    assert ref.guest_level is not None
    return f"gL{ref.guest_level}"


def _table_names(guest_levels: int, ept_levels: int) -> dict[str, str]:
    """What a student may write for each table: nL2, gL3, "EPT PD", "guest PDPT", "PDPTE"..."""
    names: dict[str, str] = {}
    for prefix, levels, tables in (
        ("n", ept_levels, ("pml5", "pml4", "pdpt", "pd", "pt")),
        ("g", guest_levels, ("pml5", "pml4", "pdpt", "pd", "pt")),
    ):
        for level in range(1, levels + 1):
            canonical = f"{prefix}L{level}"
            table = tables[5 - level]
            forms = [canonical.lower(), f"{table}", f"{table}e"]
            forms = [f"ept {f}" for f in forms[1:]] + [forms[0]] if prefix == "n" else forms
            forms += [f"guest {table}", f"guest {table}e"] if prefix == "g" else []
            names.update(dict.fromkeys(forms, canonical))
    return names


def grid_question(
    number: int,
    ask: str = "table",
    *,
    guest_levels: int = 4,
    ept_levels: int = 4,
    gva: int = 0x40_0008,
) -> Question:
    """Reference `number` of a cold walk (every EPT entry in place, nothing cached): which
    table it reads (`ask="table"`: nL1..nL5 for an EPT table, gL1..gL5 for a guest table), or
    which GPA its row translates (`ask="gpa"`: a guest table's address, or the data's)."""
    check_choice("ask", ask, GRID_ASKS)
    walk = _cold_walk(guest_levels, ept_levels, gva)
    refs = walk.references
    check_int("number", number, 1, len(refs) + 1, valid=f"a reference number, 1..{len(refs)}")
    row, col = divmod(number - 1, ept_levels + 1)
    table = _table_of(refs[number - 1])
    gpa = walk.row_gpas[row]
    listed = "\n".join(f"  {name} = {value:#018x}" for name, value in walk.entries)
    question = (
        f"Which table does reference {number} read? Answer nL<level> for an EPT table (nL4 is"
        " the EPT PML4) or gL<level> for a guest table (gL4 is the guest's PML4)."
        if ask == "table"
        else f"Which GPA is translated in the row of reference {number}: the address of the"
        " guest table that row locates, or, in the last row, the data's GPA?"
    )
    prompt = (
        f"A {guest_levels}-level guest runs under {ept_levels}-level EPT with 4 KiB pages"
        f" everywhere. Its CR3 holds GPA {walk.cr3:#x}. Reading GVA {gva:#x}, the guest walk"
        f" reads these entries:\n{listed}\nThe EPT entries are all in place, but the TLB and"
        f" every paging-structure cache are empty: a cold walk of {len(refs)} memory"
        f" references.\n{question}"
    )
    hint = (
        f"Every row has {ept_levels} EPT reads, then the guest entry: {ept_levels + 1} references"
        f" per row. Divide {number} - 1 by {ept_levels + 1}: the quotient is the row (row 0 finds"
        " the guest's top table, at CR3), the remainder the column (the EPT levels from the"
        " top, then the guest entry)."
    )
    source = "CR3" if row == 0 else f"the {walk.entries[row - 1][0]}'s address field"
    what = "the data" if row == len(walk.entries) else f"the gL{guest_levels - row} table"
    solution = "\n".join(
        [
            f"{number} - 1 = {row} x {ept_levels + 1} + {col}: row {row}, column {col}.",
            f"Row {row} locates {what}: GPA {gpa:#x}, from {source}.",
            f"Column {col} reads "
            + (f"the EPT level-{ept_levels - col} table" if col < ept_levels else "the guest entry")
            + f": {table}. The walk in hardware order:",
            walk.trace_text,
            f"Answer: {table if ask == 'table' else f'{gpa:#x}'}",
        ]
    )
    if ask == "table":
        grader = _table_grader(table, row, col, guest_levels, ept_levels)
        return Question("grid", prompt, hint, solution, table, grader)
    return Question("grid", prompt, hint, solution, f"{gpa:#x}", _gpa_grader(walk, row))


def _table_grader(table: str, row: int, col: int, n: int, m: int) -> Grader:
    """Typical mistakes: the table the row locates instead of the EPT table that translates
    its address; a neighbouring column or row; the dimensions swapped."""
    located = f"gL{n - row}" if row < n else None
    items: list[tuple[Value, str]] = []
    if located is not None and table.startswith("n"):
        items.append(
            (
                located,
                f"Not {located}: that is the table row {row} locates; before the CPU can read it,"
                " an EPT walk translates its GPA, and this reference is one of that walk's reads.",
            )
        )
    for other in (col - 1, col + 1):
        if 0 <= other <= m:
            name = f"nL{m - other}" if other < m else f"gL{n - row}" if row < n else None
            if name is not None:
                items.append(
                    (
                        name,
                        f"Not {name}: that is column {other}; this reference is"
                        f" {row} x {m + 1} + {col} + 1, in column {col}.",
                    )
                )
    if table.startswith("n"):
        swapped = f"gL{table[2:]}"
        items.append(
            (
                swapped,
                f"Not {swapped}: columns before the last are EPT levels (nL), not guest ones.",
            )
        )
    return Grader(
        table,
        ValueReader(bare=(), words=_table_names(n, m)),
        "answer nL<level> (EPT) or gL<level> (guest), e.g. nL2 or gL3",
        _mistakes(table, items),
        lambda given: (
            f"Not {given}: find the row and the column first ((k - 1) divided by {m + 1})."
        ),
    )


def _gpa_grader(walk: _ColdWalk, row: int) -> Grader:
    """Typical mistakes: a neighbouring row's GPA, the whole entry instead of its address
    field, the data's page instead of its full GPA."""
    gpa = walk.row_gpas[row]
    items: list[tuple[Value, str]] = [
        (
            walk.row_gpas[r],
            f"Not {walk.row_gpas[r]:#x}: that is row {r}'s GPA; this reference is in row {row}.",
        )
        for r in (row - 1, row + 1)
        if 0 <= r < len(walk.row_gpas)
    ]
    if row > 0:
        name, value = walk.entries[row - 1]
        items.append(
            (
                value,
                f"Not {value:#x}: that is the whole {name}; the GPA is its address field"
                " (bits 51:12), with the flag bits cleared.",
            )
        )
    if row == len(walk.entries):
        items.append(
            (
                gpa & ~(PAGE_SIZE - 1),
                f"Nearly: that is the data's page; the EPT walk translates the whole GPA,"
                f" {gpa:#x}.",
            )
        )
    return Grader(
        gpa,
        ValueReader(bare=(16,)),
        "give the GPA in hex, e.g. 0x3ff000",
        _mistakes(gpa, items),
        lambda given: (
            "Not that GPA: row 0 translates CR3's address, each later row the address"
            " field of the entry read just before it."
        ),
    )


def _seeded_grid(seed: int) -> Question:
    rng = seeded_rng("grid", seed)
    guest_levels, ept_levels = rng.choice((4, 5)), rng.choice((4, 5))
    ask = rng.choice(GRID_ASKS)
    number = rng.randrange(1, (guest_levels + 1) * (ept_levels + 1))
    gva = _random_page(rng, guest_levels) + rng.randrange(0, PAGE_SIZE, 8)
    return grid_question(number, ask, guest_levels=guest_levels, ept_levels=ept_levels, gva=gva)
