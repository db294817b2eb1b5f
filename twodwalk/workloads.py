"""Access streams and the workload simulator: what translation costs over many accesses.

A cold two-dimensional walk costs (n+1)(m+1)-1 memory references (24 for 4-level guest
tables under 4-level EPT); the translation caches make the usual case far cheaper. This module
runs a stream of accesses on a `Machine` and counts, with a trace sink that keeps totals
only, where the references went: to memory by dimension, or to the TLB, the
paging-structure caches and the guest-physical mappings; and the VM exits and host page
faults along the way.

Generators are seeded: the same seed gives the same stream.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from twodwalk.engine.formats import nested_tree
from twodwalk.engine.guest import GuestOS
from twodwalk.engine.kvm.mmu import TdpMmu
from twodwalk.engine.machine import Machine
from twodwalk.engine.native import NativeMachine
from twodwalk.engine.paging import PageFault
from twodwalk.engine.processor import Processor
from twodwalk.engine.tlb import Tlb, TranslationCache
from twodwalk.engine.trace import Counts, Trace
from twodwalk.engine.units import HUGE_PAGE_SIZE, PAGE_SHIFT, PAGE_SIZE
from twodwalk.engine.vcpu import Vcpu
from twodwalk.errors import TwodwalkError, check_int

Stream = Iterable[tuple[int, str]]


def sequential(base: int, pages: int, count: int, step: int = 64) -> Iterator[tuple[int, str]]:
    """Reads walking through `pages` pages `step` bytes at a time, wrapping around."""
    span = pages * PAGE_SIZE
    for i in range(count):
        yield base + (i * step) % span, "read"


def strided(base: int, pages: int, count: int, stride_pages: int = 1) -> Iterator[tuple[int, str]]:
    """One read per page, `stride_pages` pages apart: a new page (and TLB entry) each time."""
    for i in range(count):
        yield base + (i * stride_pages % pages) * PAGE_SIZE, "read"


def uniform(
    base: int, pages: int, count: int, seed: int = 0, write_fraction: float = 0.0
) -> Iterator[tuple[int, str]]:
    """Reads (and some writes) at uniformly random 8-byte slots of `pages` pages."""
    rng = random.Random(seed)
    for _ in range(count):
        kind = "write" if rng.random() < write_fraction else "read"
        yield base + rng.randrange(pages * PAGE_SIZE // 8) * 8, kind


def zipf(
    base: int, pages: int, count: int, seed: int = 0, exponent: float = 1.1
) -> Iterator[tuple[int, str]]:
    """Reads whose page follows a Zipf law: a few hot pages, a long cold tail."""
    rng = random.Random(seed)
    weights = [1 / (rank + 1) ** exponent for rank in range(pages)]
    order = list(range(pages))
    rng.shuffle(order)
    for page in rng.choices(order, weights=weights, k=count):
        yield base + page * PAGE_SIZE + rng.randrange(PAGE_SIZE // 8) * 8, "read"


CONTROL_KINDS = ("mov-cr3", "invlpg", "wrprotect")


def context_switching(
    base: int,
    pages: int,
    count: int,
    seed: int = 0,
    switch_every: int = 50,
    invlpg_every: int = 200,
) -> Iterator[tuple[int, str]]:
    """Reads at random 8-byte slots of `pages` pages, with a MOV to CR3 (a switch back to
    this process, as a scheduler makes) every `switch_every` accesses and an INVLPG of a
    random page every `invlpg_every`: the work that shadow paging intercepts and EPT does
    not (CR3-load and INVLPG exiting)."""
    rng = random.Random(seed)
    for number in range(1, count + 1):
        yield base + rng.randrange(pages * PAGE_SIZE // 8) * 8, "read"
        if number % switch_every == 0:
            yield 0, "mov-cr3"
        if number % invlpg_every == 0:
            yield base + rng.randrange(pages) * PAGE_SIZE, "invlpg"


def forking(
    base: int,
    pages: int,
    count: int,
    seed: int = 0,
    fork_every: int = 500,
    write_fraction: float = 0.3,
) -> Iterator[tuple[int, str]]:
    """A process that forks a short-lived child (a shell, make) every `fork_every` of its
    reads and writes at random 8-byte slots of `pages` 4 KiB pages. Each fork write-protects
    every PTE of the region ("wrprotect": `copy_present_pte`), flushes the TLB
    (`dup_mmap` -> `flush_tlb_mm`, a CR3 reload) and switches back to the parent after the
    child has exec'd (a second CR3 load); the parent's next write to each page then takes a
    write-protect fault that the guest kernel resolves by reusing the page
    (`GuestOS.handle_write_protect_fault`). The child's own copy of the tables is not
    modelled: those stores go to pages no shadow table covers, and cost no exit."""
    rng = random.Random(seed)
    for number in range(1, count + 1):
        kind = "write" if rng.random() < write_fraction else "read"
        yield base + rng.randrange(pages * PAGE_SIZE // 8) * 8, kind
        if number % fork_every == 0:
            for page in range(pages):
                yield base + page * PAGE_SIZE, "wrprotect"
            yield 0, "mov-cr3"
            yield 0, "mov-cr3"


def _control(cpu: Processor, guest: GuestOS | None, gva: int, kind: str) -> Trace:
    """MOV to CR3 with the current value (it flushes the TLB of non-global entries), INVLPG
    of `gva`, or the guest kernel write-protecting the PTE of the page at `gva`: what the
    processor, the guest kernel and, under shadow paging, KVM do for it."""
    if kind == "mov-cr3":
        return cpu.mov_cr3(cpu.cr3)
    if kind == "invlpg":
        return cpu.invlpg(gva)
    if guest is None:
        raise TwodwalkError(
            f"a {kind!r} item at gva={gva:#x} is the guest kernel's work: pass guest= to"
            " run_workload (a Machine's guest); a bare-metal run has no guest kernel"
        )
    trace = Trace()
    guest.protect(gva, PAGE_SIZE, trace=trace, rw=0)
    return trace


def pointer_chase(base: int, pages: int, count: int, seed: int = 0) -> Iterator[tuple[int, str]]:
    """Reads following a random cycle through the pages, as a linked list spread over
    memory does: no locality at all, every page visited before any repeats."""
    rng = random.Random(seed)
    cycle = list(range(pages))
    rng.shuffle(cycle)
    for i in range(count):
        yield base + cycle[i % pages] * PAGE_SIZE, "read"


# Valgrind's lackey (`valgrind --tool=lackey --trace-mem=yes PROG`) writes one record a line:
# "I  ADDR,SIZE" an instruction fetch, " L", " S", " M" a load, a store, a modify (a load then
# a store), ADDR in hex; lines of its own ("==PID== ...") are commentary.
_LACKEY_RECORD = re.compile(r"(I |\s[LSM]) ([0-9a-fA-F]{1,16}),(\d+)\s*\Z")
_LACKEY_KINDS = {"I ": ("fetch",), " L": ("read",), " S": ("write",), " M": ("read", "write")}


_LINES_REMEMBERED = 1 << 16  # distinct lines a reader keeps parsed: a loop repeats its lines


def lackey_trace(path: str | Path) -> Iterator[tuple[int, str]]:
    """The accesses of a lackey trace, read a line at a time (never the whole file): each
    record touches the aligned 8-byte word holding its first byte (the engine's access
    width), and one more at the start of the next page when it crosses into it, since the
    CPU translates both pages. A program's loops print the same lines again and again (most
    of a trace's lines are repeats), so each distinct line is parsed once and remembered."""
    parsed: dict[str, tuple[tuple[int, str], ...]] = {}
    with Path(path).open(encoding="ascii", errors="replace") as lines:
        for number, line in enumerate(lines, 1):
            accesses = parsed.get(line)
            if accesses is None:
                accesses = _lackey_accesses(path, number, line)
                if len(parsed) == _LINES_REMEMBERED:
                    parsed.clear()
                parsed[line] = accesses
            yield from accesses


def _lackey_accesses(path: str | Path, number: int, line: str) -> tuple[tuple[int, str], ...]:
    """The accesses one line of a lackey trace makes (none for its commentary)."""
    record = _LACKEY_RECORD.match(line)
    if record is None:
        if line.startswith("==") or not line.strip():
            return ()
        raise TwodwalkError(
            f"{path}:{number}: {line.rstrip()!r} is not a lackey record: expected"
            " 'I  ADDR,SIZE', ' L ADDR,SIZE', ' S ADDR,SIZE' or ' M ADDR,SIZE' (ADDR in"
            " hex), or a '==PID==' line"
        )
    opcode, hex_address, decimal_size = record.groups()
    address, size = int(hex_address, 16), int(decimal_size)
    if size == 0 or address + size > 1 << 64:
        raise TwodwalkError(
            f"{path}:{number}: {line.rstrip()!r}: size {size} at {address:#x} is not"
            " valid: give 1 or more bytes inside the 64-bit address space"
        )
    last = address + size - 1
    accesses: list[tuple[int, str]] = []
    for kind in _LACKEY_KINDS[opcode]:
        accesses.append((address & ~7, kind))
        if last >> PAGE_SHIFT != address >> PAGE_SHIFT:
            accesses.append((last & ~(PAGE_SIZE - 1), kind))
    return tuple(accesses)


@dataclass
class WorkloadResult:
    """Counts over a run. References are per dimension: "guest" and "ept" for the
    two-dimensional walk, "native" for shadow tables. `cache_model` says which walk caches
    the run had: "intel" (paging-structure caches) or "amd" (a page-walk cache)."""

    name: str
    cache_model: str = "intel"
    nested_tree: str = "EPT"  # what the "ept" references walked: EPT, or AMD's NPT
    accesses: int = 0
    references: dict[str, int] = field(default_factory=dict)
    tlb_hits: int = 0
    cache_hits: dict[str, int] = field(default_factory=dict)
    exits: dict[str, int] = field(default_factory=dict)
    host_page_faults: int = 0
    guest_faults: int = 0

    @property
    def references_per_access(self) -> float:
        return sum(self.references.values()) / max(self.accesses, 1)

    @property
    def references_per_miss(self) -> float:
        """Memory references per TLB miss: what one walk costs on average, walk caches
        included (the figure Park et al., ASPLOS 2022, report)."""
        return sum(self.references.values()) / max(self.accesses - self.tlb_hits, 1)

    @property
    def tlb_hit_rate(self) -> float:
        return self.tlb_hits / max(self.accesses, 1)

    def add(self, counts: Counts) -> None:
        """Add the totals a counts-only trace kept."""
        for mine, theirs in (
            (self.references, counts.references),
            (self.cache_hits, counts.cache_hits),
            (self.exits, counts.exits),
        ):
            for key, n in theirs.items():
                mine[key] = mine.get(key, 0) + n
        self.tlb_hits += counts.tlb_hits
        self.host_page_faults += counts.host_page_faults

    def table(self) -> str:
        """The counts as a small text table."""
        rows = [
            ("walk caches", "AMD-style page-walk cache" if self.cache_model == "amd" else "Intel"),
            ("accesses", f"{self.accesses}"),
            ("memory references / access", f"{self.references_per_access:.2f}"),
            *((f"  {dim} references", f"{n}") for dim, n in sorted(self.references.items())),
            ("TLB hit rate", f"{self.tlb_hit_rate:.1%}"),
            *((f"  {cache} hits", f"{n}") for cache, n in sorted(self.cache_hits.items())),
            *((f"VM exits: {name}", f"{n}") for name, n in sorted(self.exits.items())),
            ("host page faults", f"{self.host_page_faults}"),
            ("guest-visible faults", f"{self.guest_faults}"),
        ]
        width = max(len(label) for label, _ in rows)
        return "\n".join([self.name] + [f"  {label:<{width}}  {v:>10}" for label, v in rows])


def run_workload(
    cpu: Processor,
    stream: Stream,
    name: str = "workload",
    progress: Callable[[int], None] | None = None,
    guest: GuestOS | None = None,
) -> WorkloadResult:
    """Run every (gva, kind) of `stream` on a processor (a `Machine`'s `vcpu` or a
    `NativeMachine`'s `cpu`) and count what happened (a "mov-cr3", "invlpg" or
    "wrprotect" item is a control operation: its exits count, it is not an access);
    writes store the access number. Accesses the TLB serves take the counts-only fast path
    (`Processor.tlb_access`); the rest run the full access path into a `Counts` trace sink,
    which keeps the totals and no events. With the `guest` kernel given, a page fault it
    resolves (a write after a fork, a first touch with demand paging) is retried, as the
    guest's access is.
    `progress(n)` is called every 1,000 accesses."""
    result = WorkloadResult(name, cpu.caches.model, _nested_tree(cpu))
    counts = Counts()
    tlb_access = cpu.tlb_access
    accesses = tlb_hits = 0  # counted in locals, added to `result` at the end: a hot loop
    for number, (gva, kind) in enumerate(stream):
        if kind in CONTROL_KINDS:  # a context switch, a TLB shootdown or a fork's PTE edit
            for event in _control(cpu, guest, gva, kind):
                counts.add(event)
            continue
        value = number if kind == "write" else None
        accesses += 1
        if tlb_access(gva, kind, value):
            tlb_hits += 1
        else:
            result.guest_faults += _walked_access(cpu, guest, gva, kind, value, counts)
        if progress is not None and number % 1000 == 999:
            progress(number + 1)
    result.accesses += accesses
    result.tlb_hits += tlb_hits
    result.add(counts)
    return result


def _nested_tree(cpu: Processor) -> str:
    """The second dimension a processor walks: EPT, or NPT on an AMD vCPU."""
    if isinstance(cpu, Vcpu) and isinstance(cpu.vm.mmu, TdpMmu):
        return nested_tree(cpu.vm.mmu.fmt)
    return "EPT"


def _walked_access(
    cpu: Processor, guest: GuestOS | None, gva: int, kind: str, value: int | None, counts: Counts
) -> int:
    """An access the TLB missed, on the full path; returns the guest-visible faults it took
    (a write-protect fault the guest kernel resolves is retried)."""
    check_int("gva", gva, 0, 1 << 64)
    done = cpu.access(gva, kind, value, tlb_missed=True, trace=counts)
    faults = 0
    while done.fault is not None:
        faults += 1
        if not isinstance(done.fault, PageFault) or guest is None:
            break
        if not guest.handle_page_fault(done.fault, counts):
            break
        done = cpu.access(gva, kind, value, tlb_missed=True, trace=counts)
    return faults


@dataclass(frozen=True)
class Configuration:
    """One way to run a guest: EPT (with its depth and large pages) or shadow paging, and
    the model of the walk caches: Intel's paging-structure caches (the SDM's, the default)
    or an AMD-style page-walk cache (`cache_model="amd"`). `tlb_geometry` replaces the
    default two-level TLB by one level of (page size, sets, ways) arrays, e.g.
    `((4096, 16, 4),)` for a 64-entry TLB, to ask what a smaller or larger TLB would do.
    `nested_caches=False` switches off the caches of the EPT dimension (guest-physical
    mappings and EPT paging-structure caches), as in a processor whose walk caches serve
    the guest's dimension only. `vendor="amd"` runs the guest under SVM: nested page tables
    instead of EPT (the AMD-style page-walk cache unless `cache_model` says otherwise)."""

    name: str
    tdp: bool = True
    guest_levels: int = 4
    ept_levels: int = 4
    guest_page_size: int = PAGE_SIZE
    thp: bool = False
    native: bool = False
    cache_model: str = "intel"
    tlb_geometry: tuple[tuple[int, int, int], ...] | None = None
    nested_caches: bool = True
    vendor: str = "intel"

    def processor(self, pages: int, base: int) -> Processor:
        """The processor of `machine(pages, base)`: a vCPU, or the bare-metal CPU."""
        machine = self.machine(pages, base)
        return machine.cpu if isinstance(machine, NativeMachine) else machine.vcpu

    def machine(self, pages: int, base: int) -> Machine | NativeMachine:
        """A machine whose guest maps `pages` pages at `base` (rounded up to whole large
        pages), backed by THP when `thp`; or, `native`, a bare-metal host whose process
        mmaps them there."""
        size = -(-pages * PAGE_SIZE // self.guest_page_size) * self.guest_page_size
        if self.native:
            native = NativeMachine(maxphyaddr=48)
            native.mmap(size, huge=self.guest_page_size > PAGE_SIZE, fixed=base)
            self._set_caches(native.cpu)
            return native
        m = self.bare_machine(max(32 << 20, 2 * size))
        m.guest.map(base, self.guest_page_size, size, page_size=self.guest_page_size, rw=1)
        return m

    def bare_machine(self, guest_ram: int) -> Machine:
        """A machine of this configuration whose guest has mapped nothing yet."""
        if self.native:
            raise TwodwalkError(
                f"configuration {self.name!r} is bare metal: it has no guest to run a trace in"
                " (its process's anonymous memory cannot be executed from, so a trace's"
                " fetches would fault); choose a virtual machine's configuration"
            )
        m = Machine(
            guest_ram=guest_ram,
            tdp=self.tdp,
            guest_levels=self.guest_levels,
            ept_levels=self.ept_levels,
            maxphyaddr=52 if self.ept_levels == 5 else 48,
            thp=self.thp,
            vendor=self.vendor,
        )
        self._set_caches(m.vcpu)
        return m

    def _set_caches(self, cpu: Processor) -> None:
        cpu.caches.model = self.cache_model
        if self.tlb_geometry is not None:
            cpu.caches.tlb = Tlb({size: (sets, ways) for size, sets, ways in self.tlb_geometry})
        if not self.nested_caches:
            nested: list[TranslationCache] = [
                cpu.caches.guest_physical,
                *cpu.caches.ept_psc.values(),
            ]
            for cache in nested:
                cache.enabled = False


CONFIGURATIONS = (
    Configuration("native (bare metal)", native=True),
    Configuration("EPT 4x4"),
    Configuration("EPT 4x5", ept_levels=5),
    Configuration("EPT 5x5", guest_levels=5, ept_levels=5),
    Configuration("EPT 4x4, 2 MiB guest pages", guest_page_size=HUGE_PAGE_SIZE),
    Configuration("EPT 4x4, 2 MiB guest and EPT pages", guest_page_size=HUGE_PAGE_SIZE, thp=True),
    Configuration("shadow paging", tdp=False),
    Configuration("EPT 4x4, AMD-style page-walk cache", cache_model="amd"),
    Configuration("AMD NPT 4x4", vendor="amd", cache_model="amd"),
)


def compare(
    stream: Callable[[int], Stream],
    pages: int,
    configurations: Iterable[Configuration] = CONFIGURATIONS,
    base: int = 0x4000_0000,
    warm: bool = True,
) -> list[WorkloadResult]:
    """Run the same stream (`stream(base)` gives it) on each configuration; with `warm`,
    a first pass faults everything in so the counted pass shows steady-state costs."""
    results = []
    for config in configurations:
        machine = config.machine(pages, base)
        cpu: Processor = machine.cpu if isinstance(machine, NativeMachine) else machine.vcpu
        guest = None if isinstance(machine, NativeMachine) else machine.guest
        if warm:
            run_workload(cpu, stream(base), guest=guest)
        results.append(run_workload(cpu, stream(base), config.name, guest=guest))
    return results


def comparison_table(results: Iterable[WorkloadResult]) -> str:
    """One line per configuration: references per access, TLB hit rate, exits, host faults."""
    rows = list(results)
    width = max(len(r.name) for r in rows)
    lines = [f"{'configuration':<{width}}  refs/access  TLB hits  VM exits  host faults"]
    for r in rows:
        lines.append(
            f"{r.name:<{width}}  {r.references_per_access:11.2f}  {r.tlb_hit_rate:8.1%}"
            f"  {sum(r.exits.values()):8d}  {r.host_page_faults:11d}"
        )
    return "\n".join(lines)


REPLAY_GUEST_RAM = 256 << 20
REPLAY_FIRST_GPA = 16 << 20  # data frames above the first 16 MiB, as Linux leaves ZONE_DMA


def replay(
    path: str | Path,
    configurations: Iterable[Configuration],
    *,
    guest_ram: int = REPLAY_GUEST_RAM,
    passes: int = 1,
    progress: Callable[[int], None] | None = None,
) -> list[list[WorkloadResult]]:
    """Replay a lackey trace (`lackey_trace`) as a user process (CPL 3) of a guest on each
    configuration; the guest kernel maps every page on its first touch (demand paging, in
    the configuration's guest page size). Each further pass runs the trace again on the
    warm machine. Returns one list of results (one per pass) per configuration.
    `progress(n)` gets the accesses done so far, over every pass and configuration."""
    check_int("passes", passes, 1, 11, valid="1 to 10")
    runs: list[list[WorkloadResult]] = []
    done = 0

    def so_far(n: int) -> None:
        if progress is not None:
            progress(done + n)

    for config in configurations:
        machine = config.bare_machine(guest_ram)
        machine.guest.enable_demand_paging(REPLAY_FIRST_GPA, config.guest_page_size)
        machine.vcpu.cpl = 3
        runs.append([])
        for n in range(passes):
            name = config.name if n == 0 else f"{config.name} (pass {n + 1})"
            run = run_workload(machine.vcpu, lackey_trace(path), name, so_far, guest=machine.guest)
            runs[-1].append(run)
            done += run.accesses
    return runs
