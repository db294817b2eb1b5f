"""KVM's MMU notifiers and the retry of a fault that raced with the host (virt/kvm/kvm_main.c
`kvm_mmu_notifier_invalidate_range_start/_end`, include/linux/kvm_host.h
`mmu_invalidate_retry_gfn`, mmu.c `is_page_fault_stale`), under EPT and under shadow paging."""

from __future__ import annotations

import pytest
from support import mapped_machine

import twodwalk as tw
from twodwalk.engine.kvm.mmu import SHADOW_NONPRESENT_VALUE
from twodwalk.engine.trace import KvmStep, SpteWrite, VmExit

GVA = 0x40_0000
GPA = 0x20_0000
PAYLOAD = b"raced!!!" * 512


def machine(tdp: bool) -> tw.Machine:
    """The data page is in host memory (the VMM wrote it); its neighbour was read, so the
    guest's tables are mapped (in EPT, or shadowed) and only the data page will fault."""
    m = mapped_machine(GVA, GPA, 0x2000, guest_ram=32 << 20, tdp=tdp, maxphyaddr=48, gbpages=False)
    m.write_gpa(GPA, PAYLOAD)
    assert m.vcpu.access(GVA + 0x1000, "read").fault is None
    return m


@pytest.mark.parametrize("tdp", [True, False], ids=["ept", "shadow"])
def test_a_pfn_invalidated_before_the_install_is_not_installed(tdp: bool) -> None:
    m = machine(tdp)
    hva = m.vm.gpa_to_hva(GPA)
    assert hva is not None
    moved: list[int] = []
    m.vm.mmu.race_after_hva_to_pfn = lambda: moved.append(m.host.migrate(m.vmm, hva))
    seq = m.vm.mmu_invalidate_seq
    r = m.vcpu.access(GVA, "read")
    assert r.fault is None and r.value == int.from_bytes(PAYLOAD[:8], "little")
    assert m.vm.mmu_invalidate_seq == seq + 1, "the migration's invalidate_range_end"
    assert m.vm.mmu_invalidate_in_progress == 0
    stale = [s for s in r.trace.of_type(KvmStep) if s.function == "is_page_fault_stale"]
    assert len(stale) == 1 and stale[0].gfn == GPA >> 12
    # Two exits for the data page: the first fault retried (RET_PF_RETRY), the second mapped
    # the page where the host has it now.
    assert len(r.trace.of_type(VmExit)) == 2
    assert r.hpa == moved[0], "the new frame, not the freed one hva_to_pfn first found"
    assert m.vcpu.access(GVA, "read").hpa == moved[0]


def test_retry_check_covers_the_range_in_progress_then_the_sequence() -> None:
    m = machine(True)
    mmu = m.vm.mmu
    hva = m.vm.gpa_to_hva(GPA)
    assert hva is not None
    seq = mmu.mmu_invalidate_seq
    gfn = GPA >> 12
    mmu.invalidate_range_start(m.vmm, hva, hva + 0x1000, "test")
    assert (mmu.mmu_invalidate_in_progress, mmu.mmu_invalidate_range) == (1, (gfn, gfn + 1))
    assert mmu.mmu_invalidate_retry_gfn(seq, gfn)
    assert not mmu.mmu_invalidate_retry_gfn(seq, gfn + 1), "outside the invalidated range"
    mmu.invalidate_range_end(m.vmm, hva, hva + 0x1000)
    assert (mmu.mmu_invalidate_in_progress, mmu.mmu_invalidate_range) == (0, None)
    assert mmu.mmu_invalidate_seq == seq + 1
    assert mmu.mmu_invalidate_retry_gfn(seq, gfn + 1), "any fault that sampled the old seq"
    assert not mmu.mmu_invalidate_retry_gfn(seq + 1, gfn)


def test_notifier_names_kvm_unmap_gfn_range_and_ignores_memory_outside_memslots() -> None:
    m = machine(True)
    hva = m.vm.gpa_to_hva(GPA)
    assert hva is not None
    m.vcpu.access(GVA, "read")
    seq = m.vm.mmu_invalidate_seq
    m.host.swap_out(m.vmm, hva)
    step = m.vm.mmu.log[-1]
    assert step.function == "kvm_mmu_notifier_invalidate_range_start"
    assert "kvm_unmap_gfn_range zapped 1 entries" in step.detail
    other = m.vmm.mmap(0x1000)  # in no memslot
    m.host.handle_mm_fault(m.vmm, other, True)
    m.host.swap_out(m.vmm, other)
    assert m.vm.mmu_invalidate_seq == seq + 1, "only the swap-out inside a memslot counts"


@pytest.mark.parametrize("tdp", [True, False], ids=["ept", "shadow"])
def test_a_copy_on_write_break_in_hva_to_pfn_is_part_of_the_access_trace(tdp: bool) -> None:
    """The guest reads a fresh page (the host maps its zero page), then writes it: KVM's
    get_user_pages breaks copy-on-write, and the host's notifier zaps KVM's entry for the zero
    page inside that fault. The zap and the notifier belong to the write's trace, not to the
    log of what KVM did outside accesses, and the fault retries (`is_page_fault_stale`)."""
    m = mapped_machine(GVA, GPA, 0x1000, guest_ram=32 << 20, tdp=tdp, maxphyaddr=48, gbpages=False)
    assert m.vcpu.access(GVA, "read").value == 0
    logged = len(m.vm.mmu.log)
    r = m.vcpu.access(GVA, "write", 5)
    assert r.fault is None
    steps = [s.function for s in r.trace.of_type(KvmStep)]
    assert steps.count("kvm_mmu_notifier_invalidate_range_start") == 1
    notifier = steps.index("kvm_mmu_notifier_invalidate_range_start")
    assert steps.index("is_page_fault_stale") > notifier
    zaps = [w for w in r.trace.of_type(SpteWrite) if w.new == SHADOW_NONPRESENT_VALUE]
    assert len(zaps) == 1 and zaps[0].leaf and zaps[0].level == 1
    hva = m.vm.gpa_to_hva(GPA)
    assert hva is not None and r.hpa is not None
    assert m.host.pagemap(m.vmm, hva) == r.hpa, "the new frame the host's PTE now names"
    assert len(m.vm.mmu.log) == logged, "nothing went to the log of KVM's own steps"
