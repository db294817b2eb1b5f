"""Page aging across the two trees (mm/rmap.c folio_referenced -> ptep_clear_flush_young_notify
-> kvm_mmu_notifier_clear_flush_young -> kvm_tdp_mmu_age_gfn_range / kvm_rmap_age_gfn_range,
Linux 6.18): the CPU sets A in the EPT leaf, never in the VMM's host PTE, so reclaim must ask
KVM whether a guest page was used."""

from __future__ import annotations

import pytest

from twodwalk.engine.kvm.shadow import ShadowMmu
from twodwalk.engine.machine import Machine
from twodwalk.engine.trace import KvmStep, SpteWrite, Trace
from twodwalk.errors import TwodwalkError
from twodwalk.views.readouts import two_trees
from twodwalk.views.text import accessed_dirty

GVA, GPA = 0x40_0000, 0x20_0000
HOST_A = 1 << 5  # SDM Vol 3A table 4-20: A is bit 5 of a PTE
EPT_A = 1 << 8  # SDM Vol 3C table 29-6: A is bit 8 of an EPT PTE (EPTP bit 6 set)


def written(tdp: bool = True, ept_ad: bool = True) -> tuple[Machine, int]:
    machine = Machine(guest_ram=8 << 20, tdp=tdp, ept_ad=ept_ad)
    machine.guest.map(GVA, GPA, 4096, rw=1)
    result = machine.vcpu.access(GVA, "write", 1)
    assert result.hva is not None
    return machine, result.hva


def host_pte(machine: Machine, hva: int) -> int:
    found = machine.vmm.tables.find_leaf(hva)
    assert found is not None
    return machine.memory.read_u64(found.slot)


def ept_leaf(machine: Machine) -> int:
    found = machine.vm.ept.tables.find_leaf(GPA)
    assert found is not None
    return machine.memory.read_u64(found.slot)


def test_reclaim_clears_a_in_both_trees() -> None:
    machine, hva = written()
    assert host_pte(machine, hva) & HOST_A and ept_leaf(machine) & EPT_A
    trace = Trace()
    assert machine.host.folio_referenced(machine.vmm, hva, trace)
    assert not host_pte(machine, hva) & HOST_A and not ept_leaf(machine) & EPT_A
    (write,) = trace.of_type(SpteWrite)
    assert write.old & ~write.new == EPT_A, "only A is cleared"
    (step,) = trace.of_type(KvmStep)
    assert step.function == "kvm_mmu_notifier_clear_flush_young" and "young" in step.detail
    assert not machine.host.folio_referenced(machine.vmm, hva), "nothing used it since"


def test_a_guest_access_sets_a_in_the_ept_leaf_only() -> None:
    """The hardware walk of a guest access reads the EPT, not the VMM's tables: after reclaim
    cleared both A bits, a guest write sets the EPT leaf's A (SDM Vol 3C 29.3.5) and leaves
    the host PTE's clear, so only the notifier can tell reclaim the page is hot."""
    machine, hva = written()
    machine.host.folio_referenced(machine.vmm, hva)
    machine.vcpu.flush_tlb()
    machine.vcpu.access(GVA, "write", 2)
    assert ept_leaf(machine) & EPT_A and not host_pte(machine, hva) & HOST_A
    machine.host.mmu_notifiers_enabled = False
    assert not machine.host.folio_referenced(machine.vmm, hva), "without KVM's answer"
    machine.host.mmu_notifiers_enabled = True
    assert machine.host.folio_referenced(machine.vmm, hva), "with it"


def test_no_flush_so_a_cached_translation_sets_no_a() -> None:
    """KVM_ELIDE_TLB_FLUSH_IF_YOUNG: aging does not flush, so an access the TLB serves sets
    no A bit and the page looks idle to the next scan."""
    machine, hva = written()
    machine.host.folio_referenced(machine.vmm, hva)
    machine.vcpu.access(GVA, "write", 3)  # a TLB hit: no walk
    assert not ept_leaf(machine) & EPT_A
    assert not machine.host.folio_referenced(machine.vmm, hva)


def test_shadow_paging_ages_through_the_rmap() -> None:
    machine, hva = written(tdp=False)
    mmu = machine.vm.mmu
    assert isinstance(mmu, ShadowMmu)
    (slot,) = mmu.rmap[GPA >> 12]
    assert machine.memory.read_u64(slot) & HOST_A, "shadow entries use the x86 A bit"
    assert machine.host.folio_referenced(machine.vmm, hva)
    assert not machine.memory.read_u64(slot) & HOST_A


def test_aging_without_ept_ad_is_named_as_not_modelled() -> None:
    machine, hva = written(ept_ad=False)
    with pytest.raises(TwodwalkError, match="mark_spte_for_access_track"):
        machine.host.folio_referenced(machine.vmm, hva)


def test_folio_referenced_names_an_unmapped_hva() -> None:
    machine, _ = written()
    with pytest.raises(TwodwalkError, match=r"hva=0x1000 is not mapped in qemu"):
        machine.host.folio_referenced(machine.vmm, 0x1000)


def test_accessed_dirty_reads_both_leaves_by_field() -> None:
    machine = Machine(guest_ram=8 << 20)
    machine.guest.map(GVA, GPA, 4096, rw=1)
    result = machine.vcpu.access(GVA, "write", 1)
    assert result.hva is not None
    before = accessed_dirty(two_trees(machine, result)).splitlines()
    assert [line.split(":  ")[1] for line in before] == ["A=1 D=1", "A=1 D=1"]
    assert before[0].startswith("EPT leaf") and before[1].startswith("host PTE")
    machine.host.folio_referenced(machine.vmm, result.hva)
    after = accessed_dirty(two_trees(machine, result)).splitlines()
    assert [line.split(":  ")[1] for line in after] == ["A=0 D=1", "A=0 D=1"]
