"""Topic 'tlb'."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from twodwalk.engine.formats import EntryFormat
from twodwalk.engine.machine import Machine
from twodwalk.engine.tlb import TranslationCache
from twodwalk.engine.trace import GuestWalk, Reference, Trace, VmExit
from twodwalk.engine.units import PAGE_SHIFT, PAGE_SIZE
from twodwalk.errors import TwodwalkError, check_choice
from twodwalk.exercises.grading import (
    Grader,
    Question,
    Value,
    ValueReader,
    _mistakes,
    _normal,
    seeded_rng,
)
from twodwalk.exercises.setups import _DATA_GPA, _nested_machine
from twodwalk.views.text import PSC_NAMES, format_2d_walk, size_text

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
    machine = _nested_machine(guest_levels, ept_levels)
    gpas = {}
    for number, (name, gva) in enumerate(pages.items()):
        gpas[name] = _DATA_GPA + number * 0x11000  # spread over the caches' sets
        machine.guest.map(gva, gpas[name], PAGE_SIZE, rw=1, us=1)
        machine.write_gpa(gpas[name], name.encode() * 8)  # a real page, not the zero page
    vcpu, caches = machine.vcpu, machine.vcpu.caches
    for gva in pages.values():
        vcpu.access(gva, "read")
    vcpu.flush_tlb()
    choices: dict[str | None, list[TranslationCache]] = {
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
    rng = seeded_rng("tlb", seed)
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
