"""Topic 'npf': the EXITINFO1 of a nested page fault on AMD (APM Vol 2 15.25.6)."""

from __future__ import annotations

from twodwalk.engine.kvm.memslots import KVM_MEM_LOG_DIRTY_PAGES
from twodwalk.engine.machine import Machine
from twodwalk.engine.npt import (
    NPF_EXITINFO1_BITS,
    PFERR_GUEST_FINAL,
    PFERR_GUEST_PAGE,
    SVM_EXIT_NPF,
)
from twodwalk.engine.paging import PFERR_FETCH, PFERR_PRESENT, PFERR_RSVD, PFERR_USER, PFERR_WRITE
from twodwalk.engine.trace import VmExit
from twodwalk.engine.units import PAGE_SHIFT, PAGE_SIZE
from twodwalk.errors import TwodwalkError, check_choice
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

_NAMES = {
    "p": PFERR_PRESENT,
    "w": PFERR_WRITE,
    "u": PFERR_USER,
    "rsvd": PFERR_RSVD,
    "id": PFERR_FETCH,
    "final": PFERR_GUEST_FINAL,
    "table": PFERR_GUEST_PAGE,
}
# What happened before the access: nothing (KVM has built no nested entry), the guest's
# tables are mapped already (so only the data page faults), dirty logging write-protected
# every nested leaf, or someone cleared U/S in the data page's nested entry.
STORIES = ("first-touch", "data-page", "dirty-logging", "no-user")
_GVA = 0x40_0008


def npf_question(kind: str, story: str = "first-touch", gpa: int = _DATA_GPA) -> Question:
    """The EXITINFO1 of the first #VMEXIT(NPF) a `kind` access takes on a fresh AMD
    `Machine` after `story` (see `STORIES`); KVM passes it to `kvm_mmu_page_fault`."""
    check_choice("story", story, STORIES)
    machine = Machine(guest_ram=_GUEST_RAM, gbpages=False, vendor="amd")
    machine.guest.map(_GVA & ~(PAGE_SIZE - 1), gpa, PAGE_SIZE, rw=1, us=1)
    _prepare(machine, story, gpa)
    result = machine.vcpu.access(_GVA, kind, 1 if kind == "write" else None)
    exits = [e for e in result.trace.of_type(VmExit) if e.reason == SVM_EXIT_NPF]
    if not exits or exits[0].qualification is None or exits[0].gpa is None:
        raise TwodwalkError(f"this {kind} after {story!r} takes no nested page fault")
    info, fault_gpa = exits[0].qualification, exits[0].gpa
    answer = f"{info:#x}"
    prompt = (
        f"An AMD guest (SVM with nested paging) maps GVA {_GVA:#x} to GPA {gpa:#x}."
        f" {_STORY_TEXT[story]}\nThe vCPU does a {kind} of GVA {_GVA:#x}. Its first"
        f" #VMEXIT(NPF) has EXITINFO2 = {fault_gpa:#x}: what is EXITINFO1? Answer in hex,"
        " or as the set bits, e.g. 'bits 2 32'."
    )
    hint = (
        "The low bits are a #PF error code for the nested walk (P: the nested entry was"
        " present; W; U/S: every nested access is a user access; RSVD; I/D), bit 32 says the"
        " fault was on the final GPA, bit 33 on an access to a guest page table, which the"
        " processor makes as a write."
    )
    bits = _exit_info_bits(kind, story, fault_gpa >> PAGE_SHIFT == gpa >> PAGE_SHIFT, info)
    solution = "\n".join(
        [
            f"The first nested page fault is on GPA {fault_gpa:#x}. EXITINFO1 bit by bit:",
            *_bit_lines(bits, info),
            f"Answer: {answer}",
        ]
    )
    grader = Grader(
        info,
        ValueReader(bare=(16, 10), names=_NAMES, bit_lists=True),
        "give EXITINFO1 in hex (0x100000004), in decimal, or as the set bits ('bits 2 32')",
        {},
        lambda given: (
            _bit_differences(bits, info, given)
            if isinstance(given, int)
            else "Give a number or the set bits."
        ),
    )
    return Question("npf", prompt, hint, solution, answer, grader)


_STORY_TEXT = {
    "first-touch": "KVM has built no nested page-table entry yet.",
    "data-page": "The guest has already used its page tables (KVM mapped them in the nested"
    " tables), but never this data page.",
    "dirty-logging": "The guest has read the page once; then the VMM turned on dirty logging,"
    " so KVM write-protected every nested leaf, and the TLB was flushed.",
    "no-user": "The guest has read the page once; then the U/S bit of the data page's nested"
    " PTE was cleared by hand, and the TLB was flushed.",
}


def _prepare(machine: Machine, story: str, gpa: int) -> None:
    """Bring the machine to the state the story tells of."""
    if story == "data-page":  # the next page, through the same guest tables
        page = (_GVA & ~(PAGE_SIZE - 1)) + PAGE_SIZE
        machine.guest.map(page, gpa + PAGE_SIZE, PAGE_SIZE, rw=1, us=1)
        machine.vcpu.access(page, "read")
    elif story in ("dirty-logging", "no-user"):
        machine.vcpu.access(_GVA, "read")
        if story == "dirty-logging":
            vm = machine.vm
            vm.set_user_memory_region(
                0, KVM_MEM_LOG_DIRTY_PAGES, 0, machine.guest_ram, machine.ram_hva
            )
        else:
            leaf = machine.vm.ept.tables.find_leaf(gpa)
            assert leaf is not None
            memory = machine.memory
            memory.write_u64(leaf.slot, memory.read_u64(leaf.slot) & ~PFERR_USER)  # U/S: bit 2
        machine.vcpu.flush_tlb()


def _exit_info_bits(kind: str, story: str, final: bool, info: int) -> list[Bit]:
    """Why each bit of the engine's EXITINFO1 has its value (APM Vol 2 15.25.6)."""
    access = f"the access is a {kind}"
    if not final:
        access = "the processor reads a guest page-table entry: a write for the nested walk"
    present = {
        "first-touch": "no nested entry maps this GPA yet (KVM builds them lazily): P=0",
        "data-page": "no nested entry maps the data page yet: P=0",
        "dirty-logging": "the nested entry is present but write-protected for dirty logging",
        "no-user": "the nested entry is present but has U/S=0, and every nested access is a"
        " user access",
    }[story]

    def bit(mask: int, if_set: str, if_clear: str) -> Bit:
        return _explained(NPF_EXITINFO1_BITS, mask, info, if_set, if_clear)

    return [
        bit(PFERR_PRESENT, present, present),
        bit(PFERR_WRITE, access, access + ": not a write"),
        bit(PFERR_USER, "every nested access is a user access", "never clear for #NPF"),
        bit(PFERR_RSVD, "a reserved bit was set", "no reserved bit is set in the nested entries"),
        bit(PFERR_FETCH, access, access + ": not an instruction fetch"),
        bit(PFERR_GUEST_FINAL, "the fault is on the final GPA", "not on the final GPA"),
        bit(PFERR_GUEST_PAGE, "the fault is on a guest page-table access", "not a guest table"),
    ]


def _seeded_npf(seed: int) -> Question:
    rng = seeded_rng("npf", seed)
    story = rng.choice(STORIES)
    kind = rng.choice(("read", "write", "fetch"))
    if story == "dirty-logging":
        kind = rng.choice(("read", "write"))
    return npf_question(kind, story, rng.randrange(0x100, 0x600) << PAGE_SHIFT)


# --- topic "npt-entry": the nested PTE KVM writes (spte.c `make_spte`, x86 masks) -------------

_READ_ONLY = "the host maps the page read-only (the zero page), so KVM maps it read-only"
# (mask, name, why when set, why when clear) of each bit of a nested leaf KVM writes.
_ENTRY_BITS: tuple[tuple[int, str, str, str], ...] = (
    (1 << 0, "P", "present (shadow_present_mask)", "always set"),
    (1 << 1, "R/W", "the host page is writable", _READ_ONLY),
    (1 << 2, "U/S", "every nested access is a user access (shadow_user_mask)", "always set"),
    (1 << 5, "A", "KVM sets A as it maps for a fault (shadow_accessed_mask)", "always set"),
    (1 << 6, "D", "a writable entry is made dirty (shadow_dirty_mask)", _READ_ONLY),
    (1 << 7, "PS", "the leaf maps a 2 MiB page", "the leaf maps a 4 KiB page"),
    (1 << 9, "host-writable", "KVM's bit: the host maps the page writable", _READ_ONLY),
    (1 << 10, "MMU-writable", "KVM's bit: the entry may be made writable", _READ_ONLY),
    (1 << 11, "MMU-present", "KVM's SPTE_MMU_PRESENT, in every present SPTE", "always set"),
    (1 << 63, "NX", "no execute", "KVM lets the guest execute from its RAM (ACC_ALL)"),
)
ENTRY_STORIES = ("write", "read-first", "thp-write")


def npt_entry_question(story: str = "write", gpa: int = _DATA_GPA, gva: int = _GVA) -> Question:
    """The nested leaf KVM writes for the data page of an AMD guest's first access: a write
    (a writable 4 KiB page), a read of a page the VMM never wrote (the host maps the zero
    page, read-only), or a write to RAM backed by 2 MiB THP."""
    check_choice("story", story, ENTRY_STORIES)
    thp = story == "thp-write"
    machine = Machine(guest_ram=_GUEST_RAM, gbpages=False, vendor="amd", thp=thp)
    machine.guest.map(gva & ~(PAGE_SIZE - 1), gpa, PAGE_SIZE, rw=1, us=1)
    kind = "read" if story == "read-first" else "write"
    done = machine.vcpu.access(gva, kind, 1 if kind == "write" else None)
    leaf = machine.vm.ept.tables.find_leaf(gpa)
    assert leaf is not None and done.hpa is not None
    value = machine.memory.read_u64(leaf.slot)
    frame = machine.vm.ept.fmt.output_address(value, leaf.level)
    size = "2 MiB" if leaf.level == 2 else "4 KiB"
    prompt = (
        f"An AMD guest's first {kind} of GVA {gva:#x} (GPA {gpa:#x}) takes a nested page"
        f" fault; KVM maps the GPA with a {size} nested leaf to the host frame at HPA"
        f" {frame:#x}.{' The VMM has never written this page.' if story == 'read-first' else ''}"
        " What is the 8-byte nested leaf KVM writes? Answer in hex."
    )
    hint = (
        "spte.c `make_spte` with the x86 masks: SPTE_MMU_PRESENT (bit 11), P, U/S (every"
        " nested access is a user access), A; PS for a large page; the frame; and, when the"
        " host page is writable, R/W, D and KVM's host- and MMU-writable bits 9 and 10. No NX:"
        " the guest may execute from its RAM."
    )
    bits = [Bit(m, name, on if value & m else off) for m, name, on, off in _ENTRY_BITS]
    writable = "the host page is writable" if value & 2 else "the host maps the page read-only"
    solution = "\n".join(
        [
            f"KVM's nested leaf for GPA {gpa:#x} ({writable}), bit by bit:",
            *_bit_lines(bits, value & ~frame),
            f"plus the frame {frame:#x} in bits 51:12: {value:#x}",
            f"Answer: {value:#x}",
        ]
    )
    grader = Grader(
        value,
        ValueReader(bare=(16,)),
        "give the entry in hex, e.g. 0x1234e67",
        {},
        lambda given: (
            _bit_differences(bits, value, given)
            if isinstance(given, int)
            else "Give the entry as a number."
        ),
    )
    return Question("npt-entry", prompt, hint, solution, f"{value:#x}", grader)


def _seeded_npt_entry(seed: int) -> Question:
    rng = seeded_rng("npt-entry", seed)
    story = rng.choice(ENTRY_STORIES)
    gpa = rng.randrange(0x100, 0x600) << PAGE_SHIFT
    gva = _random_page(rng, 4) + rng.randrange(0, PAGE_SIZE, 8)
    return npt_entry_question(story, gpa & ~0x1F_FFFF if story == "thp-write" else gpa, gva)
