"""Topic 'ept-qualification'."""

from __future__ import annotations

from twodwalk.engine.ept import (
    EPT_VIOLATION_ACC_INSTR,
    EPT_VIOLATION_ACC_READ,
    EPT_VIOLATION_ACC_WRITE,
    EPT_VIOLATION_BITS,
    EPT_VIOLATION_EXECUTABLE,
    EPT_VIOLATION_GVA_IS_VALID,
    EPT_VIOLATION_GVA_TRANSLATED,
    EPT_VIOLATION_READABLE,
    EPT_VIOLATION_WRITABLE,
    EXIT_REASON_EPT_VIOLATION,
)
from twodwalk.engine.machine import Machine
from twodwalk.engine.trace import VmExit
from twodwalk.engine.units import MIB, PAGE_SHIFT, PAGE_SIZE
from twodwalk.errors import TwodwalkError, check_aligned, check_choice, check_int
from twodwalk.exercises.grading import (
    Bit,
    Grader,
    Question,
    ValueReader,
    _bit_differences,
    _bit_lines,
    _explained,
    seeded_rng,
)
from twodwalk.exercises.setups import _DATA_GPA, _GUEST_RAM, _random_page

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

    def bit(mask: int, if_set: str, if_clear: str) -> Bit:
        return _explained(EPT_VIOLATION_BITS, mask, qual, if_set, if_clear)

    return [
        bit(EPT_VIOLATION_ACC_READ, doing, doing + ": not a read"),
        bit(EPT_VIOLATION_ACC_WRITE, doing, doing + ": not a write"),
        bit(EPT_VIOLATION_ACC_INSTR, doing, doing + ": not a fetch"),
        bit(EPT_VIOLATION_READABLE, allowed, allowed),
        bit(EPT_VIOLATION_WRITABLE, allowed, allowed),
        bit(EPT_VIOLATION_EXECUTABLE, allowed, allowed),
        bit(
            EPT_VIOLATION_GVA_IS_VALID,
            f"the CPU was translating GVA {gva:#x}",
            "no guest-linear address was being translated",
        ),
        bit(
            EPT_VIOLATION_GVA_TRANSLATED,
            "the access was to the final translation (the data page)",
            "the access was to a guest paging-structure entry, not the final translation",
        ),
    ]


def _seeded_qualification(seed: int) -> Question:
    rng = seeded_rng("ept-qualification", seed)
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
