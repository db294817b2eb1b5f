"""Topic 'shadow'."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType

from twodwalk.engine.machine import Machine
from twodwalk.engine.trace import KvmStep, Trace, VmExit
from twodwalk.engine.units import HUGE_PAGE_SIZE, MIB, PAGE_SHIFT, PAGE_SIZE
from twodwalk.errors import check_aligned, check_choice, check_int
from twodwalk.exercises.grading import Grader, Question, Value, _mistakes, seeded_rng
from twodwalk.exercises.setups import _DATA_GPA, _GUEST_RAM, _random_page
from twodwalk.exercises.tlb import _count_reader

# --- topic "shadow": what exits with EPT off, and with EPT on (KVM paging_tmpl.h, mmu.c) ----------

SHADOW_ACTIONS: Mapping[str, str] = MappingProxyType(
    {
        "read-p": "read P",
        "read-q": "read Q",
        "write-p": "write P",
        "write-pte": "write its PTE for Q (setting D), through its mapping of the page table",
        "read-unmapped": "read GVA {hole:#x}, which its page tables do not map",
        "invlpg-p": "INVLPG P, as the kernel does after changing P's PTE",
        "mov-cr3": "MOV to CR3 with its own page tables, as a switch back to this process does",
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
        " on every guest #PF, which KVM must see first; and KVM intercepts INVLPG and MOV to"
        " CR3, since it must keep its shadow tables in step with the guest's."
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
    table = found.slot & ~(PAGE_SIZE - 1)
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
        elif action == "invlpg-p":
            traces.append(vcpu.invlpg(gva))
            continue
        elif action == "mov-cr3":
            traces.append(vcpu.mov_cr3(vcpu.cr3))
            continue
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
    rng = seeded_rng("shadow", seed)
    return shadow_question(
        rng.choices(tuple(SHADOW_ACTIONS), k=rng.randint(2, 4)),
        paging=rng.choice(("shadow", "shadow", "ept")),
        gva=_random_page(rng, 4, HUGE_PAGE_SIZE) + rng.randrange(0, 256) * PAGE_SIZE,
        gpa=rng.randrange(0x100, 0x600) << PAGE_SHIFT,
    )
