"""Engine set-ups that several topics share: toy page tables and their walks, table names,
page sizes."""

from __future__ import annotations

import random

from twodwalk.engine.cpuid import CpuModel
from twodwalk.engine.formats import EntryFormat, ia32e_format
from twodwalk.engine.machine import Machine
from twodwalk.engine.memory import FrameAllocator, PhysicalMemory
from twodwalk.engine.pagetables import PageTables
from twodwalk.engine.paging import PagingControls, translate
from twodwalk.engine.processor import AccessResult
from twodwalk.engine.units import HUGE_PAGE_SIZE, MIB, PAGE_SHIFT, PAGE_SIZE
from twodwalk.engine.walker import WalkRecord
from twodwalk.errors import TwodwalkError

# --- shared engine set-ups -----------------------------------------------------------------------

_TOY_TABLES = (0x1000, 0x10_0000)  # where a toy's page tables are allocated
_TOY_MAXPHYADDR = 36
_DATA_GPA = 0x20_0000
_GUEST_RAM = 8 * MIB  # the guest's page tables sit at its top, well above the data pages


def _toy_tables(levels: int) -> tuple[PhysicalMemory, PageTables, CpuModel]:
    """Bare tables in a small physical memory, as in README 'A first walk': a machine is not
    needed when only one dimension is asked about."""
    cpu = CpuModel(maxphyaddr=_TOY_MAXPHYADDR)
    memory = PhysicalMemory(cpu.maxphyaddr)
    frames = FrameAllocator(memory, *_TOY_TABLES)
    return memory, PageTables(ia32e_format(levels, cpu), memory, frames.alloc), cpu


def _toy_walk(
    tables: PageTables,
    memory: PhysicalMemory,
    cpu: CpuModel,
    gva: int,
    kind: str = "read",
    cpl: int = 0,
    controls: PagingControls | None = None,
) -> WalkRecord:
    """The engine's walk of the toy tables (`translate`), by default a supervisor read."""
    controls = controls or PagingControls(cr4_la57=tables.fmt.levels == 5)
    return translate(memory, tables.root, gva, kind, cpl=cpl, controls=controls, cpu=cpu)


def _table_names(fmt: EntryFormat) -> list[str]:
    """Table names top level first, from the entry names: PML4E -> PML4, PDE -> PD."""
    return [fmt.level_name(level).removesuffix("E") for level in range(fmt.levels, 0, -1)]


def _bit_range(fmt: EntryFormat, level: int) -> str:
    return f"{fmt.shift(level) + 8}:{fmt.shift(level)}"


def _check_page_size(name: str, value: int) -> None:
    if value not in (PAGE_SIZE, HUGE_PAGE_SIZE):
        raise TwodwalkError(
            f"{name}={value!r} is not valid: choose {PAGE_SIZE} (4 KiB) or {HUGE_PAGE_SIZE} (2 MiB)"
        )


def _random_page(
    rng: random.Random, levels: int, page_size: int = PAGE_SIZE, *, kernel: bool = False
) -> int:
    """A page-aligned canonical address (SDM 3.3.7.1), in the user or the kernel half."""
    width = PAGE_SHIFT + 9 * levels
    address: int = rng.randrange(page_size, 1 << (width - 1), page_size)
    return address | ((1 << 64) - (1 << (width - 1))) if kernel else address


def _nested_machine(guest_levels: int, ept_levels: int, *, thp: bool = False) -> Machine:
    """A question's VM with the paging depths it asks about: KVM uses 5-level EPT only when
    MAXPHYADDR needs more than 48 bits, so a 5-level EPT needs MAXPHYADDR 52."""
    return Machine(
        guest_ram=_GUEST_RAM,
        guest_levels=guest_levels,
        ept_levels=ept_levels,
        maxphyaddr=48 if ept_levels == 4 else 52,
        gbpages=False,
        thp=thp,
    )


def _cold_access(machine: Machine, gva: int) -> AccessResult:
    """A cold walk of `gva`: a first touch lets KVM fill the EPT, then, with every
    translation cache switched off, the read walks both dimensions in full."""
    machine.vcpu.caches.off()
    machine.vcpu.access(gva, "read")
    return machine.vcpu.access(gva, "read")
