"""Memslots on real KVM: the same KVM_SET_USER_MEMORY_REGION calls on a real VM and on the
engine's memslots, compared errno by errno."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from twodwalk.engine.kvm.memslots import KVM_USER_MEM_SLOTS, KvmError, Memslots
from twodwalk.engine.units import PAGE_SIZE
from twodwalk.realkvm.device import HostBuffer, RealKvm
from twodwalk.realkvm.report import CallReport, errno_name

# --- memslots: the same calls on both sides, errno by errno -----------------------------------


@dataclass(frozen=True)
class MemslotCall:
    """One KVM_SET_USER_MEMORY_REGION call."""

    slot: int
    flags: int
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int

    def describe(self) -> str:
        return (
            f"slot={self.slot:#x} flags={self.flags:#x} gpa={self.guest_phys_addr:#x}"
            f" size={self.memory_size:#x} hva={self.userspace_addr:#x}"
        )


@dataclass(frozen=True)
class MemslotOutcome:
    """The errno each side returned for one call (0: success)."""

    call: MemslotCall
    real: int
    engine: int

    @property
    def agree(self) -> bool:
        return self.real == self.engine

    def describe(self) -> str:
        return self.call.describe()


def _errno_of(apply: Callable[[int, int, int, int, int], object], call: MemslotCall) -> int:
    try:
        apply(call.slot, call.flags, call.guest_phys_addr, call.memory_size, call.userspace_addr)
    except KvmError as exc:
        return exc.errno
    return 0


POOL_PAGES = 256


def random_memslot_calls(rng: random.Random, pool: int, count: int) -> Iterator[MemslotCall]:
    """Random calls that reach every rule: slot ids (small, at the limit, other address
    spaces), known and unknown flags, aligned and misaligned addresses and sizes, overlaps,
    deletes, moves and flag changes of slots created before. Sizes stay small: KVM allocates
    per-page metadata for every slot it creates."""
    made: dict[int, MemslotCall] = {}
    for _ in range(count):
        roll = rng.random()
        if made and roll < 0.35:
            yield _variant(rng, rng.choice(list(made.values())))
            continue
        slot = rng.choice(
            [
                0,
                1,
                2,
                3,
                4,
                5,
                KVM_USER_MEM_SLOTS - 1,
                KVM_USER_MEM_SLOTS,
                0xFFFF,
                1 << 16 | 1,
                2 << 16 | 1,
            ]
        )
        flags = rng.choice([0, 0, 1, 2, 3, 4, 1 << 31])
        pages = rng.randint(1, 16)
        gpa = rng.randint(0, 64) * PAGE_SIZE
        hva = pool + rng.randint(0, POOL_PAGES - 16) * PAGE_SIZE
        size = pages * PAGE_SIZE
        match rng.randint(0, 19):
            case 0:
                gpa += rng.choice([1, 0x800])
            case 1:
                hva += rng.choice([1, 0x800])
            case 2:
                size += rng.choice([1, 0x800])
            case 3:
                hva = rng.choice([0xFFFF_8880_0000_0000, (1 << 47) - PAGE_SIZE, 1 << 47])
            case 4:
                gpa = rng.choice([1 << 46, (1 << 52) - PAGE_SIZE, (1 << 64) - PAGE_SIZE])
            case 5:
                size = 0
            case _:
                pass
        call = MemslotCall(slot, flags, gpa, size, hva)
        made[slot] = call
        yield call


def _variant(rng: random.Random, old: MemslotCall) -> MemslotCall:
    """A move, a flag change, a delete, a resize or a new HVA of an earlier slot."""
    kind = rng.randint(0, 4)
    if kind == 0:
        return MemslotCall(
            old.slot, old.flags, rng.randint(0, 64) * PAGE_SIZE, old.memory_size, old.userspace_addr
        )
    if kind == 1:
        return MemslotCall(
            old.slot,
            rng.choice([0, 1, 2, 3]),
            old.guest_phys_addr,
            old.memory_size,
            old.userspace_addr,
        )
    if kind == 2:
        return MemslotCall(old.slot, 0, 0, 0, old.userspace_addr)
    if kind == 3:
        return MemslotCall(
            old.slot,
            old.flags,
            old.guest_phys_addr,
            old.memory_size + PAGE_SIZE,
            old.userspace_addr,
        )
    return MemslotCall(
        old.slot, old.flags, old.guest_phys_addr, old.memory_size, old.userspace_addr + PAGE_SIZE
    )


LIMIT_CASES = (
    # Rejected before KVM allocates anything: more than 2**31-1 pages, and a GPA range that
    # wraps around 2**64.
    MemslotCall(9, 0, 0, (1 << 31) << 12, 0),
    MemslotCall(9, 0, (1 << 64) - PAGE_SIZE, 2 * PAGE_SIZE, 0),
)


def compare_memslots(calls: list[MemslotCall], kvm: RealKvm | None = None) -> list[MemslotOutcome]:
    """Apply the calls to a fresh real VM and to the engine's memslots; the errno of each."""
    kvm = kvm or RealKvm()
    flavour = kvm.flavour()
    vm = kvm.create_vm()
    engine = Memslots(
        max_gpa_bits=52 if not flavour.tdp else _host_maxphyaddr(),
        address_spaces=flavour.address_spaces,
    )
    outcomes: list[MemslotOutcome] = []
    try:
        for call in calls:
            real = _errno_of(vm.set_user_memory_region, call)
            ours = _errno_of(engine.set_user_memory_region, call)
            outcomes.append(MemslotOutcome(call, real, ours))
    finally:
        vm.close()
    return outcomes


def _host_maxphyaddr() -> int:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("address sizes"):
            return int(line.split(":")[1].split()[0])
    return 46


class MemslotReport(CallReport[MemslotOutcome]):
    """Agreement counts of a memslot run, by the real kernel's errno."""

    def table(self) -> str:
        return self._table("memslot calls", lambda o: errno_name(o.real))


def memslot_fuzz(cases: int, seed: int) -> MemslotReport:
    """Random memslot call sequences, in batches on fresh VMs, plus the limit cases."""
    kvm = RealKvm()
    pool = HostBuffer(POOL_PAGES * PAGE_SIZE)
    rng = random.Random(seed)
    report = MemslotReport()
    try:
        report.outcomes += compare_memslots(list(LIMIT_CASES), kvm)
        done = 0
        while done < cases:
            batch = list(random_memslot_calls(rng, pool.address, min(50, cases - done)))
            report.outcomes += compare_memslots(batch, kvm)
            done += len(batch)
    finally:
        kvm.close()
    return report
