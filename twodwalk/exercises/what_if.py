"""Topic 'what-if'."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from types import MappingProxyType

from twodwalk.engine.machine import Machine
from twodwalk.engine.memory import PhysicalMemory
from twodwalk.engine.pagetables import Leaf, PageTables
from twodwalk.engine.units import MIB, PAGE_SHIFT, PAGE_SIZE
from twodwalk.errors import check_aligned, check_choice, check_int
from twodwalk.exercises.grading import Grader, Question, Value, _normal, seeded_rng
from twodwalk.exercises.setups import _DATA_GPA, _GUEST_RAM, _random_page
from twodwalk.views.text import entry_meaning, size_text
from twodwalk.whatifs import WHAT_IFS as REGISTRY
from twodwalk.whatifs import Page, what_if

# --- topic "what-if": which structure a change under a running guest touches (KVM mmu.c, mm/) -----

# The registry's what-ifs whose effect is one of the four structures: INVLPG changes none,
# and a race is about when KVM installs an entry, not whether it changes.
WHAT_IFS: Mapping[str, str] = MappingProxyType(
    {
        name: w.changes
        for name, w in REGISTRY.items()
        if name not in ("invlpg", "race-with-invalidation")
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
    pte_hva = machine.vm.gpa_to_hva(pte.slot)
    assert pte_hva is not None
    before = _structures(machine, gpa, hva, pte_hva)
    logged = len(machine.vm.mmu.log)
    what_if(what).apply(machine, Page(gva, gpa, hva))
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
    pte_hpa = machine.host.pagemap(machine.vmm, pte_hva)
    guest = "not in memory"
    if pte_hpa is not None:
        value = machine.memory.read_u64(pte_hpa)
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
                found = Leaf(slot, level)
                break
    if found is None:
        return "no table"
    value = memory.read_u64(found.slot)
    name = fmt.level_name(found.level)
    return f"{name} = {value:#018x}{entry_meaning(fmt, found.level, value)}"


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
    rng = seeded_rng("what-if", seed)
    return what_if_question(
        rng.choice(tuple(WHAT_IFS)),
        gva=_random_page(rng, 4),
        gpa=rng.randrange(0x100, 0x600) << PAGE_SHIFT,
        guest_write=rng.random() < 0.7,
    )
