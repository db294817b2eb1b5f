"""Replay one access of an engine `Machine` on real KVM, and say where the answers differ.

The guest RAM the engine holds (its page tables and data, read from the host frames behind the
VMM's mapping, without faulting anything in) is loaded into a real VM with the same control
bits, the access runs on both, and the guest-visible results are compared: the exception, the
value read, and the A/D bits of every guest entry the engine's walk used.
"""

from __future__ import annotations

from dataclasses import dataclass

from twodwalk.engine.machine import Machine
from twodwalk.engine.processor import AccessResult
from twodwalk.engine.trace import GuestWalk, KvmWalk
from twodwalk.engine.units import PAGE_SIZE
from twodwalk.realkvm.device import KvmUnavailableError
from twodwalk.realkvm.runtime import RUNTIME_SIZE, Controls, Observed, RealRunner


@dataclass(frozen=True)
class Replay:
    """Both answers and the differences, one sentence each."""

    engine: AccessResult
    real: Observed
    differences: tuple[str, ...]

    @property
    def agree(self) -> bool:
        return not self.differences


def guest_ram_pages(machine: Machine) -> dict[int, bytes]:
    """Every resident, non-zero page of memslot 0, read from the host frame behind it."""
    pages = {}
    host = machine.host
    for gpa in range(0, machine.guest_ram, PAGE_SIZE):
        hva = machine.ram_hva + gpa
        record = host.walk(machine.vmm, hva, False)
        if record.translation is None:
            continue
        data = machine.memory.read(record.translation.address, PAGE_SIZE)
        if any(data):
            pages[gpa] = data
    return pages


def replay(
    machine: Machine, gva: int, kind: str, value: int | None = None, *, guest_memfd: bool = False
) -> Replay:
    """Run the same access on real KVM (first, on the engine's state as it is now) and on the
    engine, and compare what the guest sees. With `guest_memfd`, real KVM's guest RAM is a
    guest_memfd (KVM_SET_USER_MEMORY_REGION2), punched empty before the run and filled
    through the VMM's shared mapping."""
    cpu = machine.vcpu
    if cpu.cr4_la57:
        raise KvmUnavailableError("5-level guests cannot run here: KVM refuses CR4.LA57")
    if len(machine.vm.memslots.slots) != 1:
        raise KvmUnavailableError(
            "replay runs guest RAM as one memslot at GPA 0: build the Machine without a"
            " pci_hole (or other memslots) to compare it with real KVM"
        )
    controls = Controls.of(cpu.controls(), cpu.cpl)
    runner = RealRunner(machine.guest_ram + 2 * RUNTIME_SIZE, guest_memfd=guest_memfd)
    try:
        real = runner.run(guest_ram_pages(machine), cpu.cr3, gva, kind, controls, value or 0)
    finally:
        runner.close()
    ours = cpu.access(gva, kind, value)
    return Replay(ours, real, tuple(_differences(ours, real, kind)))


def _differences(ours: AccessResult, real: Observed, kind: str) -> list[str]:
    out = []
    vector = None if ours.fault is None else ours.fault.vector
    if vector != real.vector:
        out.append(f"exception: engine {vector}, real {real.vector}")
    elif ours.fault is not None and ours.fault.error_code != real.error_code:
        out.append(f"error code: engine {ours.fault.error_code:#x}, real {real.error_code}")
    if kind == "read" and vector is None and real.mmio is None and ours.value != real.value:
        out.append(f"value: engine {ours.value}, real {real.value}")
    walks = [e.record for e in ours.trace if isinstance(e, GuestWalk | KvmWalk)]
    if walks and vector is None:
        for step in walks[-1].steps:
            mine = step.written if step.written is not None else step.value
            theirs = (
                real.read_u64(step.entry_address)
                if (step.entry_address & ~0xFFF) in real.pages
                else None
            )
            if theirs is not None and (mine ^ theirs) & 0x60:
                out.append(
                    f"A/D of the level-{step.level} entry at GPA {step.entry_address:#x}:"
                    f" engine {mine >> 5 & 3:02b}, real {theirs >> 5 & 3:02b}"
                )
    return out
