"""What INVLPG and MOV to CR3 cost: with EPT the guest runs them without an exit; with EPT off
KVM intercepts both (INVLPG exiting, CR3-load exiting: SDM Vol 3C 25.6.2) and does the work
in software (`kvm_mmu_invlpg`, `kvm_set_cr3` -> `kvm_mmu_new_pgd`)."""

from __future__ import annotations

import pytest
from support import mapped_machine

import twodwalk as tw
from twodwalk.engine.trace import KvmStep, Trace, VmExit

GVA = 0x40_0000
EXIT_REASON_INVLPG = 14
EXIT_REASON_CR_ACCESS = 28


def machine(tdp: bool) -> tw.Machine:
    return mapped_machine(GVA, 0x10_0000, 0x1000, guest_ram=16 << 20, user=False, tdp=tdp)


def exits(trace: Trace) -> list[tuple[int, int | None]]:
    return [(e.reason, e.qualification) for e in trace.of_type(VmExit)]


@pytest.mark.parametrize("tdp", [True, False])
def test_invlpg_exits_only_without_ept(tdp: bool) -> None:
    m = machine(tdp)
    assert m.vcpu.access(GVA, "read").fault is None
    trace = m.vcpu.invlpg(GVA)
    # The exit qualification of INVLPG is its linear-address operand (SDM Vol 3C 28.2.1).
    assert exits(trace) == ([] if tdp else [(EXIT_REASON_INVLPG, GVA)])
    assert not m.vcpu.tlb.entries(), "either way the page's translation is gone"


@pytest.mark.parametrize("tdp", [True, False])
def test_cr3_load_exits_only_without_ept(tdp: bool) -> None:
    m = machine(tdp)
    trace = m.vcpu.mov_cr3(m.vcpu.cr3)
    # Qualification 3: control register 3, access type 0 (MOV to CR), from RAX (table 28-3).
    assert exits(trace) == ([] if tdp else [(EXIT_REASON_CR_ACCESS, 3)])


def test_kvm_switches_fast_to_one_of_three_previous_roots() -> None:
    """KVM keeps the current shadow root and 3 previous ones per vCPU
    (KVM_MMU_NUM_PREV_ROOTS); a load of any of them is a `fast_pgd_switch`."""
    m = machine(tdp=False)
    roots = [m.guest.alloc_table() for _ in range(4)]  # four more address spaces
    first = m.vcpu.cr3

    def switch(root: int) -> str:
        (step,) = [s for s in m.vcpu.mov_cr3(root).of_type(KvmStep)]
        return step.detail

    for root in roots[:3]:
        assert "not among" in switch(root)
    assert "fast_pgd_switch" in switch(first), "3 loads ago: still a previous root"
    assert "not among" in switch(roots[3])  # evicts the oldest, roots[0]
    assert "fast_pgd_switch" in switch(roots[1])
    assert "not among" in switch(roots[0])
