"""The paging differential fuzzer: random guest page-table chains run on real KVM and on the
engine, compared by what the guest can observe.

Each case is a 4-level chain of real entries with random flag bits at every level (present,
R/W, U/S, PWT/PCD, A/D, G, XD, software bits, protection keys), large pages, now and then a
reserved bit or a non-canonical address, CPL 0 or 3, a read, write or fetch, and random
CR0.WP, CR4.SMEP/SMAP, EFER.NXE and RFLAGS.AC. Both sides report: the exception (vector,
error code, CR2), the value read, whether a fetch ran, an MMIO exit, and the A/D bits of every
entry of the chain afterwards.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from twodwalk.engine.cpuid import CpuModel
from twodwalk.engine.formats import bits, ia32e_format
from twodwalk.engine.memory import PhysicalMemory
from twodwalk.engine.paging import GeneralProtection, exception_for, translate
from twodwalk.engine.units import PAGE_SIZE
from twodwalk.realkvm.device import RealKvm
from twodwalk.realkvm.report import count_lines, headline
from twodwalk.realkvm.runtime import Controls, Observed, RealRunner

RAM_SIZE = 32 << 20
TABLES = {4: 0x1000, 3: 0x2000, 2: 0x3000, 1: 0x4000}
DATA_4K = 0x8000
DATA_2M = 0x20_0000
DATA_1G_WINDOW = (0x40_0000, 0x48_0000)
MMIO_FRAME = 0x4000_0000
AVOID_PML4 = frozenset({256, 511})  # 511: the runtime; 256: spurious CPL3 faults on PVM
LEAF_SIZE = {1: 1 << 12, 2: 1 << 21, 3: 1 << 30}
INT3 = 0xCC


@dataclass(frozen=True)
class PagingCase:
    """One access through one random chain of entries."""

    number: int
    gva: int
    kind: str
    controls: Controls
    value: int
    entries: tuple[tuple[int, int, int], ...]  # (level, GPA of the entry, value)
    data: tuple[tuple[int, bytes], ...]  # (GPA, bytes) of the target

    def pages(self) -> dict[int, bytearray]:
        """The guest RAM image: table pages with the chain's entries, and the target bytes."""
        out: dict[int, bytearray] = {}
        for _, address, value in self.entries:
            page = out.setdefault(address & ~0xFFF, bytearray(PAGE_SIZE))
            page[address & 0xFFF : (address & 0xFFF) + 8] = value.to_bytes(8, "little")
        for address, blob in self.data:
            page = out.setdefault(address & ~0xFFF, bytearray(PAGE_SIZE))
            page[address & 0xFFF : (address & 0xFFF) + len(blob)] = blob
        return out


def outcome_category(vector: int | None, error_code: int | None, mmio: object) -> str:
    """How an access ended, in the words agreement counts are kept by: the #PF kind (its
    error code's RSVD and P bits, SDM Vol 3A 4.7), another vector, an MMIO exit, or "ok"."""
    if vector == 14:
        assert error_code is not None
        why = "reserved" if error_code & 8 else "protection" if error_code & 1 else "not present"
        return f"#PF {why}"
    if vector is not None:
        return f"vector {vector}"
    return "MMIO exit" if mmio else "ok"


@dataclass(frozen=True)
class Answer:
    """What one side observed, in the terms both sides share."""

    vector: int | None
    error_code: int | None
    cr2: int | None
    value: int | None
    fetched: bool
    mmio: tuple[int, int, bool] | None
    accessed_dirty: tuple[tuple[int, int], ...]

    def category(self, kind: str) -> str:
        outcome = outcome_category(self.vector, self.error_code, self.mmio)
        return f"{kind} ok" if outcome == "ok" else outcome


def random_case(rng: random.Random, number: int, cpu: CpuModel) -> PagingCase:
    """A random chain, access and set of control bits."""
    kind = rng.choice(["read", "write", "fetch"])
    leaf = rng.choices([1, 2, 3], weights=[6, 3, 1])[0]
    mmio = kind != "fetch" and leaf == 1 and rng.random() < 0.05
    gva, target = _random_address(rng, leaf, mmio)
    controls = Controls(
        cr0_wp=rng.random() < 0.7,
        cr4_smep=rng.random() < 0.4,
        cr4_smap=rng.random() < 0.4,
        efer_nxe=rng.random() < 0.8,
        rflags_ac=rng.random() < 0.3,
        cpl=rng.choice([0, 3]),
    )
    entries = []
    for level in range(4, leaf - 1, -1):
        next_address = target & ~(LEAF_SIZE[leaf] - 1) if level == leaf else TABLES[level - 1]
        value = _random_entry(rng, level, level == leaf, next_address, cpu)
        index = gva >> (12 + 9 * (level - 1)) & 0x1FF
        entries.append((level, TABLES[level] + 8 * index, value))
    payload = bytes([INT3]) + bytes(7) if kind == "fetch" else rng.randbytes(8)
    data = () if mmio else ((target, payload),)
    return PagingCase(number, gva, kind, controls, rng.getrandbits(64), tuple(entries), data)


def _random_address(rng: random.Random, leaf: int, mmio: bool) -> tuple[int, int]:
    """A GVA whose PML4 slot avoids the runtime's, and the GPA its leaf leads to."""
    slot = rng.choice([s for s in range(512) if s not in AVOID_PML4])
    low = rng.getrandbits(39) & ~7
    gva = slot << 39 | low
    if slot >= 256:
        gva |= bits(63, 48)
    if rng.random() < 0.03:
        gva ^= 1 << rng.randint(48, 62)  # non-canonical
    offset = gva & (LEAF_SIZE[leaf] - 1) & 0xFF8
    if leaf == 1:
        return gva, (MMIO_FRAME if mmio else DATA_4K) | offset
    if leaf == 2:
        return gva, DATA_2M | (gva & (LEAF_SIZE[2] - 1))
    window = rng.randrange(*DATA_1G_WINDOW, PAGE_SIZE) | offset
    gva = (gva & ~(LEAF_SIZE[3] - 1)) | window
    return gva, window


def _random_entry(rng: random.Random, level: int, leaf: bool, address: int, cpu: CpuModel) -> int:
    """An entry with random flags; bit 7 says whether it is a leaf (PS) where that exists."""
    value = address
    value |= int(rng.random() < 0.95)  # P
    value |= int(rng.random() < 0.8) << 1 | int(rng.random() < 0.8) << 2  # R/W, U/S
    value |= rng.getrandbits(2) << 3 | int(rng.random() < 0.3) << 5  # PWT, PCD, A
    value |= int(rng.random() < 0.3) << 6  # D
    value |= int(rng.random() < (0.2 if leaf else 0.03)) << 8  # G; reserved in an AMD PML4E
    value |= rng.getrandbits(3) << 9  # software bits
    value |= int(rng.random() < 0.15) << 63  # XD
    if leaf:
        value |= rng.getrandbits(4) << 59  # protection key, ignored without CR4.PKE
        if level > 1:
            value |= 1 << 7
        elif rng.random() < 0.5:
            value |= 1 << 7  # PAT in a PTE
    if rng.random() < 0.05:
        value |= 1 << rng.choice(_reserved_candidates(level, leaf, cpu))
    return value


def _reserved_candidates(level: int, leaf: bool, cpu: CpuModel) -> list[int]:
    candidates = list(range(cpu.maxphyaddr, 52)) or [51]
    if level == 4:
        candidates.append(7)
    if leaf and level > 1:
        candidates += list(range(13, 12 + 9 * (level - 1)))
    return candidates


def engine_answer(case: PagingCase, cpu: CpuModel) -> Answer:
    """The engine's walk (walker.py with the IA-32e format and SDM 4.6 rules)."""
    memory = PhysicalMemory(cpu.maxphyaddr)
    for address, page in case.pages().items():
        memory.write(address, bytes(page))
    controls = case.controls.paging()
    record = translate(
        memory, TABLES[4], case.gva, case.kind, cpl=case.controls.cpl, controls=controls, cpu=cpu
    )
    exception = exception_for(record, controls)
    ad = _accessed_dirty(case, memory.read_u64)
    if isinstance(exception, GeneralProtection):
        return Answer(13, exception.error_code, None, None, False, None, ad)
    if exception is not None:
        return Answer(14, exception.error_code, exception.cr2, None, False, None, ad)
    assert record.translation is not None
    physical = record.translation.address
    if physical >= RAM_SIZE:
        return Answer(None, None, None, None, False, (physical, 8, case.kind == "write"), ad)
    if case.kind == "write":
        memory.write(physical, case.value.to_bytes(8, "little"))
    value = int.from_bytes(memory.read(physical, 8), "little") if case.kind == "read" else None
    return Answer(
        None, None, None, value, case.kind == "fetch", None, _accessed_dirty(case, memory.read_u64)
    )


def real_answer(case: PagingCase, runner: RealRunner) -> Answer:
    """The same case on real KVM, through the guest runtime."""
    pages = {address: bytes(page) for address, page in case.pages().items()}
    seen: Observed = runner.run(pages, TABLES[4], case.gva, case.kind, case.controls, case.value)
    mmio = None if seen.mmio is None else seen.mmio[:3]
    cr2 = seen.cr2 if seen.vector == 14 else None
    error = seen.error_code if seen.vector in (13, 14) else None
    value = seen.value if case.kind == "read" and seen.vector is None and mmio is None else None
    return Answer(
        seen.vector, error, cr2, value, seen.fetched, mmio, _accessed_dirty(case, seen.read_u64)
    )


def _accessed_dirty(
    case: PagingCase, read_u64: Callable[[int], int]
) -> tuple[tuple[int, int], ...]:
    """(A, D) of every entry of the chain, read back after the access."""
    return tuple(
        (read_u64(address) >> 5 & 1, read_u64(address) >> 6 & 1) for _, address, _ in case.entries
    )


@dataclass(frozen=True)
class Quirk:
    """A way this host's KVM differs from the SDM that is not a rule of the CPU model: kept
    out of the engine, listed here, and counted apart from agreements and disagreements."""

    name: str
    module: str
    description: str
    matches: Callable[[PagingCase, Answer, Answer], bool]


def _smap_on_fetch(case: PagingCase, engine: Answer, real: Answer) -> bool:
    c = case.controls
    return (
        case.kind == "fetch"
        and c.cpl == 0
        and c.cr4_smap
        and not c.rflags_ac
        and engine.fetched
        and real.vector == 14
        and real.error_code is not None
        and real.error_code & ~0x10 == 1
        and real.accessed_dirty == engine.accessed_dirty
    )


QUIRKS = (
    Quirk(
        "PVM: SMAP on fetches",
        "kvm_pvm",
        "kvm_pvm faults a CPL0 instruction fetch from a user page when CR4.SMAP=1 and"
        " EFLAGS.AC=0 (#PF P, plus I/D as usual); the SDM says SMAP never applies to"
        " fetches, so the engine does not fault",
        _smap_on_fetch,
    ),
)
# Known quirks the generator avoids rather than matches: CPL3 accesses through PML4 slot 256
# take spurious faults on kvm_pvm; CR4.LA57 is refused, so no 5-level cases; 1 GiB pages are
# not advertised (the engine is configured from CPUID, so PS in a PDPTE is reserved on both).


@dataclass
class PagingReport:
    """Agreement counts by category, the disagreements with their reproductions, the rate."""

    agree: dict[str, int] = field(default_factory=dict)
    quirks: dict[str, int] = field(default_factory=dict)
    disagreements: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def cases(self) -> int:
        return sum(self.agree.values()) + sum(self.quirks.values()) + len(self.disagreements)

    def table(self) -> str:
        lines = [
            headline(
                "paging cases",
                self.cases,
                sum(self.agree.values()),
                len(self.disagreements),
                self.seconds,
            )
        ]
        lines += count_lines(self.agree)
        lines += count_lines(self.quirks, "known quirk: ")
        lines += self.disagreements
        return "\n".join(lines)


def reproduction(case: PagingCase, engine: Answer, real: Answer, cpu: CpuModel) -> str:
    """A minimal reproduction: the entries decoded, the control bits, both answers."""
    fmt = ia32e_format(4, cpu, case.controls.efer_nxe)
    lines = [f"DISAGREE case {case.number}: {case.kind} of {case.gva:#x} with {case.controls}"]
    for level, address, value in case.entries:
        entry = fmt.decode(value, level)
        flags = " ".join(f"{f.field.name}={f.value:#x}" for f in entry.fields)
        lines.append(f"    {fmt.level_name(level)} @ {address:#x} = {value:#018x}: {flags}")
    lines.append(f"    engine: {engine}")
    lines.append(f"    real:   {real}")
    return "\n".join(lines)


def paging_fuzz(cases: int, seed: int, runner: RealRunner | None = None) -> PagingReport:
    """Run `cases` random cases on real KVM and on the engine, configured like the real CPU."""
    own = runner is None
    runner = runner or RealRunner(RAM_SIZE)
    cpu = runner.cpu_model()
    rng = random.Random(seed)
    report = PagingReport()
    kvm = RealKvm()
    try:
        quirks = [q for q in QUIRKS if q.module == kvm.flavour().module]
    finally:
        kvm.close()
    start = time.perf_counter()
    try:
        for number in range(cases):
            case = random_case(rng, number, cpu)
            ours, theirs = engine_answer(case, cpu), real_answer(case, runner)
            quirk = next((q for q in quirks if q.matches(case, ours, theirs)), None)
            if ours == theirs:
                name = ours.category(case.kind)
                report.agree[name] = report.agree.get(name, 0) + 1
            elif quirk is not None:
                report.quirks[quirk.name] = report.quirks.get(quirk.name, 0) + 1
            else:
                report.disagreements.append(reproduction(case, ours, theirs, cpu))
    finally:
        if own:
            runner.close()
    report.seconds = time.perf_counter() - start
    return report
