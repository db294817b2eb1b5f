"""Pre-copy live migration, the reason dirty logging exists (QEMU migration/ram.c).

The VMM turns on KVM_MEM_LOG_DIRTY_PAGES, sends every page of guest RAM while the guest keeps
running, then asks KVM_GET_DIRTY_LOG which pages the guest wrote meanwhile and sends those
again, round after round, until few enough are left to stop the guest and send the rest
(stop-and-copy). If the guest dirties pages faster than rounds shrink, migration does not
converge. Pages go to a destination image, so the result can be checked page by page.

It works in every dirty-logging mode of the VM (`Vm.set_dirty_log_mode`). With
KVM_DIRTY_LOG_INITIALLY_SET, KVM_GET_DIRTY_LOG only reports, so each round clears the bits it
is about to send with KVM_CLEAR_DIRTY_LOG first, as QEMU does
(`migration_clear_memory_region_dirty_bitmap`): a write after the clear is in the next round.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from twodwalk.engine.kvm.memslots import KVM_MEM_LOG_DIRTY_PAGES, dirty_pages, slot_ids
from twodwalk.engine.units import PAGE_SHIFT, PAGE_SIZE
from twodwalk.errors import TwodwalkError, check_int

if TYPE_CHECKING:
    from twodwalk.engine.machine import Machine


@dataclass(frozen=True)
class MigrationRound:
    """One pass: how many pages it sent, and how many the guest dirtied while it ran."""

    number: int
    pages_sent: int
    dirtied: int


@dataclass(frozen=True)
class MigrationResult:
    """All rounds, whether the dirty set fell below the threshold, and the destination."""

    rounds: tuple[MigrationRound, ...]
    converged: bool
    stop_and_copy_pages: int
    destination: dict[int, bytes] = field(repr=False)

    @property
    def pages_sent(self) -> int:
        return sum(r.pages_sent for r in self.rounds) + self.stop_and_copy_pages


def precopy(
    machine: Machine,
    workload: Callable[[int], None],
    *,
    slot: int = 0,
    max_rounds: int = 8,
    threshold_pages: int = 16,
) -> MigrationResult:
    """Migrate the guest RAM of memslot `slot` while `workload(round)` runs the guest."""
    check_int("max_rounds", max_rounds, 1, 1000, valid="1..999")
    check_int("threshold_pages", threshold_pages, 0, 1 << 31, valid=">= 0")
    vm = machine.vm
    memslot = vm.memslots.slots.get(slot_ids(slot))
    if memslot is None:
        raise TwodwalkError(f"slot={slot} has no memslot to migrate")
    vm.set_user_memory_region(
        slot,
        memslot.flags | KVM_MEM_LOG_DIRTY_PAGES,
        memslot.guest_phys_addr,
        memslot.memory_size,
        memslot.userspace_addr,
    )
    _collect_dirty(machine, slot)
    destination: dict[int, bytes] = {}
    to_send = list(range(memslot.base_gfn, memslot.base_gfn + memslot.npages))
    rounds = []
    for number in range(max_rounds):
        for gfn in to_send:
            destination[gfn] = machine.read_gpa(gfn << PAGE_SHIFT, PAGE_SIZE)
        workload(number)
        dirty = _collect_dirty(machine, slot)
        rounds.append(MigrationRound(number, len(to_send), len(dirty)))
        to_send = dirty
        if len(dirty) <= threshold_pages:
            break
    for gfn in to_send:
        destination[gfn] = machine.read_gpa(gfn << PAGE_SHIFT, PAGE_SIZE)
    return MigrationResult(
        tuple(rounds), len(to_send) <= threshold_pages, len(to_send), destination
    )


def _collect_dirty(machine: Machine, slot: int) -> list[int]:
    """The GFNs dirtied since the last call, with tracking re-armed for them: one
    KVM_GET_DIRTY_LOG, and with manual protection a KVM_CLEAR_DIRTY_LOG of what it reported
    (the whole slot in one call: num_pages reaches the slot's end)."""
    vm = machine.vm
    bitmap = vm.get_dirty_log(slot)
    memslot = vm.memslots.dirty_log_slot(slot)
    if vm.manual_dirty_log_protect:
        vm.clear_dirty_log(slot, 0, memslot.npages, bitmap)
    return [memslot.base_gfn + page for page in dirty_pages(bitmap)]
