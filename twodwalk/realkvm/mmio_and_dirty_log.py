"""MMIO exits and the dirty log on real KVM and on the engine, access by access.

A second memslot sits at SLOT_GPA: READONLY for the MMIO comparison (reads return its data,
writes exit to userspace as KVM_EXIT_MMIO), or with KVM_MEM_LOG_DIRTY_PAGES for the dirty-log
comparison; GPAs past it are a hole (KVM_EXIT_MMIO both ways). The guest maps GVA_BASE + i pages
to SLOT_GPA + i pages. Before each access the real runner re-creates its RAM memslot, which makes
KVM zap everything it built (KVM_X86_QUIRK_SLOT_ZAP_ALL); the engine is asked to do the same,
so both sides start every access from the same state.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from twodwalk.engine.kvm.memslots import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY
from twodwalk.engine.kvm.run import MmioExit
from twodwalk.engine.machine import Machine
from twodwalk.engine.processor import AccessResult
from twodwalk.engine.units import PAGE_SIZE
from twodwalk.realkvm.device import RealKvm
from twodwalk.realkvm.runtime import Controls, Observed, RealRunner

SLOT = 1
SLOT_GPA = 0x4000_0000
SLOT_PAGES = 16
GVA_BASE = 0x40_0000
PML4, PDPT, PD, PT = 0x1000, 0x2000, 0x3000, 0x4000
CPL0 = Controls(cr0_wp=True, cr4_smep=False, cr4_smap=False, efer_nxe=True, rflags_ac=False, cpl=0)


@dataclass(frozen=True)
class SlotOutcome:
    """One access as each side saw it: (exception vector, MMIO exit, value read)."""

    what: str
    real: tuple[int | None, tuple[int, int, bool, bytes] | None, int | None]
    engine: tuple[int | None, tuple[int, int, bool, bytes] | None, int | None]

    @property
    def agree(self) -> bool:
        return self.real == self.engine


class _Pair:
    """A real runner and an engine machine with the same second memslot and mappings."""

    def __init__(self, runner: RealRunner, flags: int, data: bytes) -> None:
        self.runner = runner
        buffer = runner.add_memslot(SLOT, flags, SLOT_GPA, SLOT_PAGES * PAGE_SIZE)
        buffer.map[: len(data)] = data
        self.tables = _guest_tables(SLOT_PAGES + 1)
        self.machine = Machine(
            guest_ram=32 << 20,
            tdp=RealKvm().flavour().tdp,
            maxphyaddr=runner.cpuid_maxphyaddr,
            gbpages=runner.cpuid_gbpages,
        )
        m = self.machine
        hva = m.vmm.mmap(SLOT_PAGES * PAGE_SIZE)
        m.vm.set_user_memory_region(SLOT, flags, SLOT_GPA, SLOT_PAGES * PAGE_SIZE, hva)
        m.write_gpa(SLOT_GPA, data)
        m.guest.map(GVA_BASE, SLOT_GPA, (SLOT_PAGES + 1) * PAGE_SIZE, rw=1, us=1)

    def access(self, page: int, kind: str, value: int = 0) -> SlotOutcome:
        gva = GVA_BASE + page * PAGE_SIZE + 8
        seen = self.runner.run(self.tables, PML4, gva, kind, CPL0, value)
        self.tables = {a: bytes(p) for a, p in seen.pages.items()}
        m = self.machine
        m.vm.set_user_memory_region(0, 0, 0, 0, m.ram_hva)  # as the runner does
        m.vm.set_user_memory_region(0, 0, 0, m.guest_ram, m.ram_hva)
        m.vcpu.flush_tlb()
        ours = m.vcpu.access(gva, kind, value if kind == "write" else None)
        return SlotOutcome(f"{kind} page {page}", _real(seen, kind), _engine(ours, kind))


def _real(
    seen: Observed, kind: str
) -> tuple[int | None, tuple[int, int, bool, bytes] | None, int | None]:
    mmio = None
    if seen.mmio is not None:
        phys, length, is_write, data = seen.mmio
        mmio = (phys, length, is_write, data if is_write else b"")
    value = seen.value if kind == "read" and seen.vector is None and mmio is None else None
    return seen.vector, mmio, value


def _engine(
    result: AccessResult, kind: str
) -> tuple[int | None, tuple[int, int, bool, bytes] | None, int | None]:
    exit_ = result.exit
    mmio = None
    if isinstance(exit_, MmioExit):
        mmio = (exit_.phys_addr, exit_.len, exit_.is_write, exit_.data if exit_.is_write else b"")
    vector = result.fault.vector if result.fault is not None else None
    value = result.value if kind == "read" and vector is None and mmio is None else None
    return vector, mmio, value


def _guest_tables(pages: int) -> dict[int, bytes]:
    """PML4 -> PDPT -> PD -> PT mapping GVA_BASE + i pages to SLOT_GPA + i pages, A and D clear."""
    image = {a: bytearray(PAGE_SIZE) for a in (PML4, PDPT, PD, PT)}
    rw_user = 0b111
    image[PML4][0:8] = (PDPT | rw_user).to_bytes(8, "little")
    image[PDPT][0:8] = (PD | rw_user).to_bytes(8, "little")
    image[PD][(GVA_BASE >> 21) * 8 : (GVA_BASE >> 21) * 8 + 8] = (PT | rw_user).to_bytes(
        8, "little"
    )
    for i in range(pages):
        slot = ((GVA_BASE >> 12) + i) & 0x1FF
        image[PT][slot * 8 : slot * 8 + 8] = (SLOT_GPA + i * PAGE_SIZE | rw_user).to_bytes(
            8, "little"
        )
    return {a: bytes(p) for a, p in image.items()}


def readonly_and_hole(runner: RealRunner) -> list[SlotOutcome]:
    """Reads and writes of a READONLY slot and of the hole past it."""
    data = bytes(range(256)) * (SLOT_PAGES * PAGE_SIZE // 256)
    pair = _Pair(runner, KVM_MEM_READONLY, data)
    return [
        pair.access(page, kind, 0xDEAD_BEEF)
        for page in (0, 3, SLOT_PAGES)
        for kind in ("read", "write", "read")
    ]


@dataclass(frozen=True)
class DirtyLogOutcome:
    """The slot's dirty bitmap after one round of guest accesses, from each side."""

    round: int
    real: bytes
    engine: bytes

    @property
    def agree(self) -> bool:
        return self.real == self.engine


def dirty_log(runner: RealRunner, seed: int, rounds: int = 4) -> list[DirtyLogOutcome]:
    """Rounds of random reads and writes to a logged slot, each followed by
    KVM_GET_DIRTY_LOG on both sides (which also clears and re-protects)."""
    pair = _Pair(runner, KVM_MEM_LOG_DIRTY_PAGES, bytes(SLOT_PAGES * PAGE_SIZE))
    rng = random.Random(seed)
    out = []
    for number in range(rounds):
        for _ in range(rng.randint(1, 8)):
            pair.access(rng.randrange(SLOT_PAGES), rng.choice(["read", "write"]), number)
        real = runner.get_dirty_log(SLOT)
        engine = pair.machine.vm.get_dirty_log(SLOT)
        out.append(DirtyLogOutcome(number, real, engine))
    return out
