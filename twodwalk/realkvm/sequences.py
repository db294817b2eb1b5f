"""The sequence fuzzer: several steps in one guest run on real KVM, compared step by step with
the SDM's walk and with the engine's shadow-paging machine.

The single-access fuzzer (paging.py) starts every access from a fresh memslot, so it never sees
what one access leaves behind for the next. Here one run keeps its page tables, KVM's shadow
pages, the TLB and the guest's CR0/CR3 from step to step. A case is a random 4-level chain to a
few data pages (some loaded with random bytes, some never written) and a second chain that maps
the first chain's four table pages at SELF_MAP (a self-map), random paging controls at CPL 0,
and a random list of steps:

- reads and writes of the data pages: a write after a read must set D, which under shadow
  paging traps because KVM maps a clean guest PTE read-only (paging_tmpl.h
  `FNAME(protect_clean_gpte)`) and then sets D itself (`FNAME(update_accessed_dirty_bits)`);
- MOV to CR0 that turns CR0.WP off or on: with WP=0 a supervisor write to a read-only page
  succeeds (SDM Vol. 3A 4.6.1), and KVM makes a supervisor-only writable shadow entry for it
  (`FNAME(page_fault)`); the never-written pages must still read 0 afterwards;
- stores to the chain's own entries through the self-map (KVM write-protects shadowed tables,
  so each traps and is emulated: `kvm_mmu_track_write`), then INVLPG or a MOV to CR3, then an
  access through the edited entry, which must see the new entry (SDM Vol. 3A 4.10.4.1). An
  access never goes through an edited entry before an invalidation, where the SDM allows the
  stale translation too;
- with KVM_MEM_LOG_DIRTY_PAGES on the RAM slot (half the cases), KVM_GET_DIRTY_LOG after every
  step: the data pages written, and the table pages KVM writes for the guest: A/D bits its
  software walker sets and stores it emulates, which both mark the page dirty
  (`kvm_vcpu_mark_page_dirty`).

After each step the three answers are compared: the exception (vector, error code, CR2), the
value read, an MMIO exit, every entry of both chains (A/D bits and all), the data pages' bytes
and, with dirty logging, the dirty GFNs outside the runtime's area. The SDM's walk
(`twodwalk.engine.paging.translate` on a copy of guest RAM, no TLB) has no dirty log.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import twodwalk.engine.machine as engine_machine
from twodwalk.engine.cpuid import CpuModel
from twodwalk.engine.formats import Rights, ia32e_format
from twodwalk.engine.kvm.memslots import KVM_MEM_LOG_DIRTY_PAGES, dirty_pages
from twodwalk.engine.kvm.run import MmioExit
from twodwalk.engine.memory import PhysicalMemory
from twodwalk.engine.paging import GeneralProtection, exception_for, translate
from twodwalk.engine.units import PAGE_SHIFT, PAGE_SIZE
from twodwalk.errors import TwodwalkError
from twodwalk.realkvm.paging import outcome_category
from twodwalk.realkvm.report import count_lines, headline
from twodwalk.realkvm.runtime import RUNTIME_SIZE, Controls, Observed, RealRunner, Step

RAM_SIZE = 32 << 20
PML4 = 0x1000
DATA_TABLES = {3: 0x2000, 2: 0x3000, 1: 0x4000}  # the data chain's PDPT, PD and PT
SELF_TABLES = {3: 0x5000, 2: 0x6000, 1: 0x7000}  # the self-map chain's
DATA_PAGES = 6
DATA_GPA = 0x10_0000  # data page i at DATA_GPA + i pages
MMIO_FRAME = 0x4000_0000  # past the RAM slot: KVM_EXIT_MMIO
# The steps' data accesses use offsets whose entry index no chain uses (all below 448, and
# PML4 entry 511 is the runtime's), so a data page remapped onto a table never edits an entry.
ACCESS_OFFSETS = range(0xE00, 0xFF8, 8)
LOW_SLOTS = range(1, 256)  # PML4 slots for both chains: 256 and up misbehave at CPL3 on PVM
SELF_MAPPED = (PML4, DATA_TABLES[3], DATA_TABLES[2], DATA_TABLES[1])  # at SELF_MAP + i pages


@dataclass(frozen=True)
class SequenceCase:
    """One guest run: the RAM image, the paging controls at the start, and the steps."""

    number: int
    controls: Controls
    log_dirty: bool
    pages: tuple[tuple[int, bytes], ...]
    entries: tuple[tuple[str, int], ...]  # (name, GPA) of every entry of both chains
    data_gvas: tuple[int, ...]  # data page i's GVA
    self_map: int  # the GVA where SELF_MAPPED[0] is mapped
    steps: tuple[Step, ...]
    notes: tuple[str, ...]  # per step: what it is there to test ("" for nothing special)


@dataclass(frozen=True)
class StepAnswer:
    """What one side saw after one step, in the terms all sides share."""

    vector: int | None
    error_code: int | None
    cr2: int | None
    value: int | None
    mmio: tuple[int, int, bool] | None
    entries: tuple[int, ...]  # the values of case.entries, in order
    data: tuple[bytes, ...]  # the data pages' bytes
    dirty: frozenset[int] | None  # dirty GFNs outside the runtime's area (None: not logged)

    def category(self, step: Step) -> str:
        if step.kind in ("cr0", "cr3", "invlpg"):
            return step.kind if step.kind != "cr0" else f"cr0 wp={step.value}"
        return f"{step.kind} {outcome_category(self.vector, self.error_code, self.mmio)}"


def _entry(rng: random.Random, address: int, leaf: bool, nxe_reserved: float) -> int:
    """A chain entry with random flags: mostly present, R/W, U/S, PWT/PCD, A, D, software
    bits, XD (reserved without EFER.NXE), G in leaves only (reserved in an AMD PML4E)."""
    value = address | int(rng.random() < (0.9 if leaf else 0.97))
    value |= int(rng.random() < 0.6) << 1 | int(rng.random() < 0.4) << 2
    value |= rng.getrandbits(2) << 3 | int(rng.random() < 0.5) << 5
    value |= int(rng.random() < 0.5) << 6 | rng.getrandbits(3) << 9
    value |= int(leaf and rng.random() < 0.3) << 8
    value |= int(rng.random() < nxe_reserved) << 63
    return value


def _mutate(rng: random.Random, value: int, level: int, frames: list[int]) -> tuple[int, str]:
    """What an OS does to one entry: take away R/W or P, give them back, change the frame,
    clear A/D, flip U/S or XD."""
    address_mask = 0x000F_FFFF_FFFF_F000
    match rng.randrange(7):
        case 0:
            return value & ~2, "clear R/W"
        case 1:
            return value & ~1, "clear P"
        case 2:
            return value | 3, "set P and R/W"
        case 3 if level == 1:
            frame = rng.choice(frames)
            return value & ~address_mask | frame, f"frame -> {frame:#x}"
        case 4:
            return value & ~0x60, "clear A and D"
        case 5:
            return value ^ 4, "flip U/S"
        case _:
            return value ^ 1 << 63, "flip XD"


def random_sequence(rng: random.Random, number: int, steps: int = 10) -> SequenceCase:
    """A random RAM image, controls and list of steps (see the module's docstring)."""
    controls = Controls(
        cr0_wp=rng.random() < 0.5,
        cr4_smep=rng.random() < 0.3,
        cr4_smap=rng.random() < 0.3,
        efer_nxe=rng.random() < 0.85,
        rflags_ac=rng.random() < 0.3,
        cpl=0,
    )
    data_slot, self_slot = rng.sample(LOW_SLOTS, 2)
    data_index = [rng.randrange(448) for _ in range(2)] + [rng.randrange(448 - DATA_PAGES)]
    self_index = [rng.randrange(448) for _ in range(2)] + [rng.randrange(448 - len(SELF_MAPPED))]
    data_base = data_slot << 39 | data_index[0] << 30 | data_index[1] << 21 | data_index[2] << 12
    self_map = self_slot << 39 | self_index[0] << 30 | self_index[1] << 21 | self_index[2] << 12
    ram: dict[int, bytearray] = {}
    entries: dict[str, tuple[int, int]] = {}  # name -> (GPA, value)

    def put(name: str, gpa: int, value: int) -> None:
        page = ram.setdefault(gpa & ~0xFFF, bytearray(PAGE_SIZE))
        page[gpa & 0xFFF : (gpa & 0xFFF) + 8] = value.to_bytes(8, "little")
        entries[name] = (gpa, value)

    xd = 0.1
    put("data PML4E", PML4 + 8 * data_slot, _entry(rng, DATA_TABLES[3], False, xd))
    put("data PDPTE", DATA_TABLES[3] + 8 * data_index[0], _entry(rng, DATA_TABLES[2], False, xd))
    put("data PDE", DATA_TABLES[2] + 8 * data_index[1], _entry(rng, DATA_TABLES[1], False, xd))
    for i in range(DATA_PAGES):
        put(
            f"data PTE {i}",
            DATA_TABLES[1] + 8 * (data_index[2] + i),
            _entry(rng, DATA_GPA + i * PAGE_SIZE, True, xd),
        )
    self_flags = 0b11 | int(rng.random() < 0.3) << 2  # present, writable; U/S for SMAP
    for name, gpa, target in (
        ("self-map PML4E", PML4 + 8 * self_slot, SELF_TABLES[3]),
        ("self-map PDPTE", SELF_TABLES[3] + 8 * self_index[0], SELF_TABLES[2]),
        ("self-map PDE", SELF_TABLES[2] + 8 * self_index[1], SELF_TABLES[1]),
    ):
        put(name, gpa, target | self_flags | int(rng.random() < 0.5) << 5)
    for i, table in enumerate(SELF_MAPPED):
        leaf = table | self_flags | rng.getrandbits(2) << 5
        put(f"self-map PTE {i}", SELF_TABLES[1] + 8 * (self_index[2] + i), leaf)
    for i in range(DATA_PAGES):
        if rng.random() < 0.6:  # the others are never written before the guest runs
            ram[DATA_GPA + i * PAGE_SIZE] = bytearray(rng.randbytes(PAGE_SIZE))
    data_gvas = tuple(data_base + i * PAGE_SIZE for i in range(DATA_PAGES))
    step_list, notes = _random_steps(rng, steps, entries, data_gvas, self_map)
    return SequenceCase(
        number,
        controls,
        rng.random() < 0.5,
        tuple((a, bytes(p)) for a, p in sorted(ram.items())),
        tuple((name, gpa) for name, (gpa, _) in entries.items()),
        data_gvas,
        self_map,
        tuple(step_list),
        tuple(notes),
    )


def _random_steps(
    rng: random.Random,
    count: int,
    entries: dict[str, tuple[int, int]],
    data_gvas: tuple[int, ...],
    self_map: int,
) -> tuple[list[Step], list[str]]:
    """Accesses, CR0.WP flips, self-map edits, INVLPGs and CR3 reloads. `stale` holds the
    data pages whose translation an edit changed since their last invalidation: they are not
    accessed until one comes (the SDM lets the guest use either translation until then)."""
    steps: list[Step] = []
    notes: list[str] = []
    stale: set[int] = set()
    edited: set[int] = set()
    frames = [DATA_GPA + i * PAGE_SIZE for i in range(DATA_PAGES)]
    frames += [DATA_TABLES[1], DATA_TABLES[2], MMIO_FRAME]
    last: dict[int, str] = {}
    while len(steps) < count:
        roll = rng.random()
        fresh = [i for i in range(DATA_PAGES) if i not in stale]
        if roll < 0.45 and fresh:
            page = rng.choice(fresh)
            gva = data_gvas[page] + rng.choice(ACCESS_OFFSETS)
            kind = rng.choice(["read", "write"])
            note = ""
            if page in edited:
                note = "access through an edited, invalidated entry"
            elif kind == "write" and last.get(page) == "read":
                note = "write after read"
            steps.append(Step(kind, gva, rng.getrandbits(64)))
            notes.append(note)
            last[page] = kind
            edited.discard(page)
        elif roll < 0.58:
            steps.append(Step("cr0", value=rng.getrandbits(1)))
            notes.append("")
        elif roll < 0.8:
            page = rng.randrange(DATA_PAGES)
            name = rng.choices(
                [f"data PTE {page}", "data PDE", "data PDPTE", "data PML4E"], [12, 3, 2, 1]
            )[0]
            gpa, value = entries[name]
            level = 1 if "PTE" in name else {"PDE": 2, "PDPTE": 3, "PML4E": 4}[name.split()[1]]
            new, what = _mutate(rng, value, level, frames)
            entries[name] = (gpa, new)
            table = SELF_MAPPED.index(gpa & ~0xFFF)
            steps.append(Step("write", self_map + table * PAGE_SIZE + (gpa & 0xFFF), new))
            notes.append(f"self-map store: {name} {what}")
            changed = {page} if level == 1 else set(range(DATA_PAGES))
            stale |= changed
            edited |= changed
            if rng.random() < 0.8 and len(steps) < count:
                if level == 1 and rng.random() < 0.5:
                    steps.append(Step("invlpg", data_gvas[page]))
                    stale.discard(page)
                else:
                    steps.append(Step("cr3", value=PML4))
                    stale.clear()
                notes.append("invalidation after a self-map store")
        elif roll < 0.9:
            page = rng.randrange(DATA_PAGES)
            steps.append(Step("invlpg", data_gvas[page]))
            notes.append("")
            stale.discard(page)
        else:
            steps.append(Step("cr3", value=PML4))
            notes.append("")
            stale.clear()
    return steps, notes


# --- the three sides ---------------------------------------------------------------------


def _dirty_gfns(bitmap: bytes, limit: int) -> frozenset[int]:
    """The GFNs whose bit is set (slot 0 starts at GPA 0), below `limit` (the runtime's
    area is left out)."""
    return frozenset(gfn for gfn in dirty_pages(bitmap) if gfn < limit)


def real_answers(case: SequenceCase, runner: RealRunner) -> list[StepAnswer]:
    """The case on real KVM, as one run of the guest runtime's command list."""
    watch = [DATA_GPA + i * PAGE_SIZE for i in range(DATA_PAGES)]
    seen = runner.run_sequence(
        dict(case.pages), PML4, case.steps, case.controls, case.log_dirty, watch
    )
    limit = runner.runtime_gpa >> PAGE_SHIFT
    return [_answer(case, step, o, limit) for step, o in zip(case.steps, seen, strict=True)]


def _answer(case: SequenceCase, step: Step, seen: Observed, limit: int) -> StepAnswer:
    mmio = None if seen.mmio is None else seen.mmio[:3]
    return StepAnswer(
        seen.vector,
        seen.error_code,
        seen.cr2,
        seen.value if step.kind == "read" and seen.vector is None and mmio is None else None,
        mmio,
        tuple(seen.read_u64(gpa) for _, gpa in case.entries),
        tuple(seen.pages[DATA_GPA + i * PAGE_SIZE] for i in range(DATA_PAGES)),
        None if seen.dirty_log is None else _dirty_gfns(seen.dirty_log, limit),
    )


WP0_WRITE = "CR0.WP=0 supervisor write to a read-only page"


def sdm_answers(case: SequenceCase, cpu: CpuModel) -> tuple[list[StepAnswer], list[str]]:
    """What the SDM says the guest sees: every access walks the tables in guest RAM as they
    are (`translate`, setting A/D), with the CR0.WP of the moment; INVLPG and MOV to CR3 do
    nothing to a CPU without a TLB, which is right because no step uses a stale entry.
    Also, per step, WP0_WRITE where the step is one (SDM Vol. 3A 4.6.1), else ""."""
    memory = PhysicalMemory(cpu.maxphyaddr)
    for address, page in case.pages:
        memory.write(address, page)
    wp = case.controls.cr0_wp
    out = []
    tags = []
    for step in case.steps:
        vector = error = cr2 = value = None
        mmio = None
        tags.append("")
        if step.kind == "cr0":
            wp = bool(step.value)
        elif step.kind in ("read", "write"):
            controls = Controls(wp, *_rest(case.controls)).paging()
            record = translate(memory, PML4, step.gva, step.kind, controls=controls, cpu=cpu)
            exception = exception_for(record, controls)
            if exception is not None:
                vector, error = exception.vector, exception.error_code
                cr2 = None if isinstance(exception, GeneralProtection) else exception.cr2
            else:
                assert record.translation is not None
                physical = record.translation.address
                if step.kind == "write" and Rights.W not in record.translation.rights:
                    tags[-1] = WP0_WRITE
                if physical >= RAM_SIZE:
                    mmio = (physical, 8, step.kind == "write")
                elif step.kind == "write":
                    memory.write(physical, step.value.to_bytes(8, "little"))
                else:
                    value = int.from_bytes(memory.read(physical, 8), "little")
        out.append(
            StepAnswer(
                vector,
                error,
                cr2,
                value,
                mmio,
                tuple(memory.read_u64(gpa) for _, gpa in case.entries),
                tuple(memory.read(DATA_GPA + i * PAGE_SIZE, PAGE_SIZE) for i in range(DATA_PAGES)),
                None,
            )
        )
    return out, tags


def _rest(controls: Controls) -> tuple[bool, bool, bool, bool, int]:
    """The controls but CR0.WP, in `Controls` order."""
    return (
        controls.cr4_smep,
        controls.cr4_smap,
        controls.efer_nxe,
        controls.rflags_ac,
        controls.cpl,
    )


def engine_answers(case: SequenceCase, cpu: CpuModel) -> tuple[list[StepAnswer], str | None]:
    """The engine's shadow-paging machine (`Machine(tdp=False)`, KVM's shadow MMU) running
    the same steps: the VMM loads RAM, then the vCPU does each step with the runtime's
    controls (CR4.PGE off, as the runtime sets CR4). An access the engine cannot finish
    (`TwodwalkError`) ends the list, and its message comes back with it."""
    m = engine_machine.Machine(
        guest_ram=RAM_SIZE, tdp=False, maxphyaddr=cpu.maxphyaddr, gbpages=cpu.gbpages
    )
    for address, page in case.pages:
        m.write_gpa(address, page)
    if case.log_dirty:
        m.vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, RAM_SIZE, m.ram_hva)
    vcpu = m.vcpu
    c = case.controls
    vcpu.cr0_wp, vcpu.cr4_smep, vcpu.cr4_smap = c.cr0_wp, c.cr4_smep, c.cr4_smap
    vcpu.efer_nxe, vcpu.rflags_ac, vcpu.cpl, vcpu.cr4_pge = c.efer_nxe, c.rflags_ac, 0, False
    vcpu.cr3 = PML4
    limit = (RAM_SIZE - RUNTIME_SIZE) >> PAGE_SHIFT
    out: list[StepAnswer] = []
    for step in case.steps:
        vector = error = cr2 = value = None
        mmio = None
        if step.kind == "cr0":
            vcpu.cr0_wp = bool(step.value)
        elif step.kind == "cr3":
            vcpu.cr3 = step.value
        elif step.kind == "invlpg":
            vcpu.invlpg(step.gva)
        else:
            try:
                result = vcpu.access(
                    step.gva, step.kind, step.value if step.kind == "write" else None
                )
            except TwodwalkError as exc:
                return out, str(exc)
            if result.fault is not None:
                vector, error = result.fault.vector, result.fault.error_code
                cr2 = None if isinstance(result.fault, GeneralProtection) else result.fault.cr2
            elif isinstance(result.exit, MmioExit):
                mmio = (result.exit.phys_addr, result.exit.len, result.exit.is_write)
            elif step.kind == "read":
                value = result.value
        dirty = _dirty_gfns(m.vm.get_dirty_log(0), limit) if case.log_dirty else None
        out.append(
            StepAnswer(
                vector,
                error,
                cr2,
                value,
                mmio,
                tuple(int.from_bytes(m.read_gpa(gpa, 8), "little") for _, gpa in case.entries),
                tuple(m.read_gpa(DATA_GPA + i * PAGE_SIZE, PAGE_SIZE) for i in range(DATA_PAGES)),
                dirty,
            )
        )
    return out, None


# --- comparing and reporting ---------------------------------------------------------------

ASPECTS = ("exception", "value", "MMIO exit", "entries", "data pages", "dirty log", "error")


def differences(case: SequenceCase, ours: StepAnswer, real: StepAnswer) -> list[tuple[str, str]]:
    """(aspect, sentence) for each way two answers to one step differ; the dirty log only
    where both sides have one."""
    out = []
    if (ours.vector, ours.error_code, ours.cr2) != (real.vector, real.error_code, real.cr2):
        out.append(
            (
                "exception",
                f"exception: {_exception(ours)} here, {_exception(real)} on real KVM",
            )
        )
    if ours.value != real.value:
        out.append(("value", f"value read: {_hex(ours.value)} here, {_hex(real.value)} real"))
    if ours.mmio != real.mmio:
        out.append(("MMIO exit", f"MMIO exit: {ours.mmio} here, {real.mmio} real"))
    for (name, gpa), mine, theirs in zip(case.entries, ours.entries, real.entries, strict=True):
        if mine != theirs:
            what = "A/D" if not (mine ^ theirs) & ~0x60 else "value"
            out.append(
                (
                    "entries",
                    f"{name} @ {gpa:#x} ({what}): {mine:#018x} here, {theirs:#018x} real",
                )
            )
    for i, (mine_page, their_page) in enumerate(zip(ours.data, real.data, strict=True)):
        if mine_page != their_page:
            words = range(0, PAGE_SIZE, 8)
            at = next(o for o in words if mine_page[o : o + 8] != their_page[o : o + 8])
            out.append(
                (
                    "data pages",
                    f"data page {i} (GPA {DATA_GPA + i * PAGE_SIZE:#x}) at +{at:#x}:"
                    f" {mine_page[at : at + 8].hex()} here, {their_page[at : at + 8].hex()} real",
                )
            )
    if ours.dirty is not None and real.dirty is not None and ours.dirty != real.dirty:
        out.append(
            (
                "dirty log",
                f"dirty GFNs: only here {_gfns(ours.dirty - real.dirty)},"
                f" only on real KVM {_gfns(real.dirty - ours.dirty)}",
            )
        )
    return out


def _exception(answer: StepAnswer) -> str:
    if answer.vector is None:
        return "none"
    return f"vector {answer.vector} error code {_hex(answer.error_code)} CR2 {_hex(answer.cr2)}"


def _hex(value: int | None) -> str:
    return "-" if value is None else f"{value:#x}"


def _gfns(gfns: frozenset[int]) -> str:
    return "{" + ", ".join(f"{g:#x}" for g in sorted(gfns)) + "}"


def reproduction(
    case: SequenceCase, upto: int, against: str, found: list[tuple[str, str]], cpu: CpuModel
) -> str:
    """The case up to its first disagreeing step: the entries decoded, the steps, and how
    the answers differ there."""
    fmt = ia32e_format(4, cpu, case.controls.efer_nxe)
    lines = [
        f"DISAGREE ({against}) sequence {case.number}, step {upto}: {case.controls},"
        f" dirty logging {'on' if case.log_dirty else 'off'}"
    ]
    pages = dict(case.pages)
    for name, gpa in case.entries:
        value = int.from_bytes(pages[gpa & ~0xFFF][gpa & 0xFFF :][:8], "little")
        level = 1 if "PTE" in name else {"PDE": 2, "PDPTE": 3, "PML4E": 4}[name.split()[1]]
        fields = " ".join(
            f"{f.field.name}={f.value:#x}" for f in fmt.decode(value, level).fields if f.value
        )
        lines.append(f"    {name:<16} @ {gpa:#07x} = {value:#018x}: {fields}")
    loaded = {a for a, _ in case.pages}
    never = [i for i in range(DATA_PAGES) if DATA_GPA + i * PAGE_SIZE not in loaded]
    lines.append(f"    data pages never written before the run: {never}")
    for number, (step, note) in enumerate(zip(case.steps[: upto + 1], case.notes, strict=False)):
        lines.append(
            f"    step {number}: {step.kind} gva={step.gva:#x} value={step.value:#x}"
            + (f"  ({note})" if note else "")
        )
    lines += [f"      {sentence}" for _, sentence in found]
    return "\n".join(lines)


def _wp_at(case: SequenceCase, number: int) -> bool:
    """CR0.WP while step `number` runs."""
    wp = case.controls.cr0_wp
    for step in case.steps[:number]:
        wp = bool(step.value) if step.kind == "cr0" else wp
    return wp


@dataclass(frozen=True)
class EngineDefect:
    """A known way the engine departs from real KVM, found by this fuzzer and not fixed yet:
    counted apart, so that the fuzzer keeps finding new ones. tests/test_realkvm_sequences.py
    has a strict xfail for each, which fails once the engine is fixed."""

    name: str
    kernel: str
    description: str
    matches: Callable[[SequenceCase, int, StepAnswer | None, StepAnswer], bool]


ENGINE_DEFECTS: tuple[EngineDefect, ...] = ()


@dataclass(frozen=True)
class Disagreement:
    """The first step of a case where one reference differs from real KVM."""

    against: str  # "SDM" or "engine"
    aspects: frozenset[str]
    text: str


@dataclass
class SequenceReport:
    """Step counts by category and by note, the disagreements, the time taken."""

    cases: int = 0
    steps: int = 0
    agree: dict[str, int] = field(default_factory=dict)
    notes: dict[str, int] = field(default_factory=dict)
    disagreements: list[Disagreement] = field(default_factory=list)
    engine_defects: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def against(self, reference: str, aspects: frozenset[str] | None = None) -> list[str]:
        """The reproductions of disagreements with `reference` that touch `aspects`."""
        return [
            d.text
            for d in self.disagreements
            if d.against == reference and (aspects is None or d.aspects & aspects)
        ]

    def table(self) -> str:
        what = f"sequence cases (one guest run each, {self.steps} steps in all)"
        disagree = len(self.disagreements)
        lines = [headline(what, self.cases, self.cases - disagree, disagree, self.seconds)]
        lines += count_lines(self.agree)
        lines += count_lines(self.notes)
        lines += count_lines(self.engine_defects, "known engine defect: ")
        lines += [d.text for d in self.disagreements]
        return "\n".join(lines)


def compare(
    case: SequenceCase, real: list[StepAnswer], cpu: CpuModel, report: SequenceReport
) -> None:
    """Add one case to the report: each step where both references agree with real KVM is
    counted by category; the first step where a reference differs is a disagreement."""
    sdm, tags = sdm_answers(case, cpu)
    engine, error = engine_answers(case, cpu)
    references = {"SDM": (sdm, None), "engine": (engine, error)}
    first: dict[str, int] = {}
    for name, (answers, failure) in references.items():
        for number, theirs in enumerate(real):
            if number < len(answers):
                found = differences(case, answers[number], theirs)
            else:
                found = [("error", f"the {name} model raised: {failure}")]
            if not found:
                continue
            first[name] = number
            ours = answers[number] if number < len(answers) else None
            known = [d for d in ENGINE_DEFECTS if d.matches(case, number, ours, theirs)]
            if name == "engine" and known:
                defect = known[0].name
                report.engine_defects[defect] = report.engine_defects.get(defect, 0) + 1
            else:
                aspects = frozenset(a for a, _ in found)
                text = reproduction(case, number, name, found, cpu)
                report.disagreements.append(Disagreement(name, aspects, text))
            break
    stop = min(first.values(), default=len(case.steps))
    for step, note, tag, answer in zip(case.steps[:stop], case.notes, tags, real, strict=False):
        category = answer.category(step)
        report.agree[category] = report.agree.get(category, 0) + 1
        for key in (note.split(":")[0], tag):
            if key:
                report.notes[key] = report.notes.get(key, 0) + 1
        if case.log_dirty:
            report.notes["dirty-log round"] = report.notes.get("dirty-log round", 0) + 1
    report.cases += 1
    report.steps += len(case.steps)


def sequence_fuzz(
    cases: int, seed: int, steps: int = 10, runner: RealRunner | None = None
) -> SequenceReport:
    """Run `cases` random sequences of `steps` steps on real KVM and on both references."""
    own = runner is None
    runner = runner or RealRunner(RAM_SIZE)
    cpu = runner.cpu_model()
    rng = random.Random(seed)
    report = SequenceReport()
    start = time.perf_counter()
    try:
        for number in range(cases):
            case = random_sequence(rng, number, steps)
            compare(case, real_answers(case, runner), cpu, report)
    finally:
        if own:
            runner.close()
    report.seconds = time.perf_counter() - start
    return report
