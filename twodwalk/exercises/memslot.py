"""Topic 'memslot'."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from twodwalk.engine.kvm.memslots import KVM_MEM_READONLY, Memslots
from twodwalk.engine.units import HUGE_PAGE_SIZE, MIB, PAGE_SHIFT, PAGE_SIZE
from twodwalk.errors import TwodwalkError, check_int
from twodwalk.exercises.grading import (
    Grader,
    Question,
    Value,
    ValueReader,
    _hex,
    _mistakes,
    seeded_rng,
)
from twodwalk.views.text import info_memslots

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
    return (0x7F00 + rng.randrange(0xF0)) << 32 | rng.randrange(0x800) * HUGE_PAGE_SIZE


def _seeded_memslot(seed: int) -> Question:
    """A QEMU-like PC layout: RAM below the PCI hole, the rest above 4 GiB, a BIOS ROM."""
    rng = seeded_rng("memslot", seed)
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
    rng = seeded_rng("memslot-of-machine", seed)
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
    specs = [(s.slot, s.flags, s.guest_phys_addr, s.memory_size, s.userspace_addr) for s in slots]
    return memslot_question(specs, gpa)
