"""`views.text.explain`: why an access ended as it did, from its trace. Each case is worked by
hand from the tables the test builds: the entry and the bit the explanation names are the ones
that decide, by SDM Vol 3A 4.6 (rights accumulate by AND down the walk) and Vol 3C 29.3.3."""

from __future__ import annotations

from dataclasses import replace

import twodwalk as tw
from twodwalk.scenarios import SCENARIOS, TOY_GVA, scenario
from twodwalk.views.text import explain

BAR_GVA = 0xFFFF_C900_0000_0010  # the qemu scenario's device page, in the PCI hole


def untouched_toy() -> tw.Machine:
    m = replace(SCENARIOS["toy"], accesses=()).build()
    m.vcpu.cpl = 3
    return m


def test_a_user_write_to_a_read_only_page_names_the_pte_and_its_r_w_bit() -> None:
    m = untouched_toy()
    m.vcpu.access(TOY_GVA, "fetch")  # first touch: EPT filled, A set in the code PTE (0x20)
    pte_gpa = m.guest.page_tables.entry_address(TOY_GVA, 1)
    assert pte_gpa is not None
    lines = explain(m.vcpu.access(TOY_GVA + 8, "write", 1)).splitlines()
    assert lines[0] == "The guest's own page tables refused the access."
    assert lines[1] == (
        f"  The walk of the guest's tables for GVA {TOY_GVA + 8:#x} stopped at the PTE"
        f" @ GPA {pte_gpa:#x} = 0x0000000000005025: user-mode write to a read-only address"
        " (R/W=0 at some level); R/W (bit 1) is 0 there."
    )
    assert lines[2] == (
        f"  The guest sees #PF, error code 0x7 (P W/R U/S), CR2 {TOY_GVA + 8:#x}; with EPT the"
        " fault goes straight to the guest: KVM and the VMM see nothing."
    )


def test_a_supervisor_page_names_the_first_entry_that_withholds_u_s() -> None:
    """The guest maps the page with U/S=0 in its PTE only: the upper entries allow user
    mode, so the PTE decides."""
    m = tw.Machine(guest_ram=32 << 20, maxphyaddr=48, gbpages=False)
    m.guest.map(0x40_0000, 0x20_0000, 0x1000, rw=1, us=0)
    m.vcpu.access(0x40_0000, "read")
    m.vcpu.cpl = 3
    text = explain(m.vcpu.access(0x40_0000, "read"))
    assert "stopped at the PTE @ GPA" in text
    assert "user-mode access to a supervisor-mode address" in text
    assert text.count("U/S (bit 2) is 0 there.") == 1


def test_a_first_touch_explains_each_exit_then_the_outcome() -> None:
    m = untouched_toy()
    lines = explain(m.vcpu.access(TOY_GVA + 0x1008, "write", 1)).splitlines()
    attempts = [line for line in lines if line.startswith("Attempt ")]
    assert len(attempts) == 5
    assert all(a.endswith(", a guest page-table entry.") for a in attempts[:4])
    assert (
        attempts[4]
        == "Attempt 5: VM exit 48 EPT_VIOLATION for GPA 0x6008, the final GPA of the access."
    )
    assert (
        sum("which is not present: R, W and X (bits 2:0) are all 0" in line for line in lines) == 5
    )
    assert "  The exit qualification 0x182 says: write, GVA valid, final GPA." in lines
    assert (
        lines.count("  The guest does not see the exit: KVM resumes it at the same instruction.")
        == 5
    )
    assert lines[-1].startswith("The access completed: value 0x1, through GPA 0x6008 -> HPA")


def test_an_ept_write_violation_on_the_zero_page_names_the_ept_pte_and_its_w_bit() -> None:
    """A read maps the host's zero page readable and executable; the write that follows is a
    rights violation in the EPT PTE (W=0), qualification 0x1aa."""
    m = tw.Machine(guest_ram=32 << 20, maxphyaddr=48, gbpages=False)
    m.guest.map(0x40_0000, 0x20_0000, 0x1000, rw=1, us=1)
    m.vcpu.access(0x40_0000, "read")
    lines = explain(m.vcpu.access(0x40_0000, "write", 5)).splitlines()
    assert (
        lines[0]
        == "Attempt 1: VM exit 48 EPT_VIOLATION for GPA 0x200000, the final GPA of the access."
    )
    assert lines[1].startswith("  The EPT walk of GPA 0x200000 stopped at the EPT PTE @ HPA")
    assert lines[1].endswith(": EPT entries do not allow write (need W); W (bit 1) is 0 there.")
    assert (
        lines[2]
        == "  The exit qualification 0x1aa says: write, readable, executable, GVA valid, final GPA."
    )


def test_mmio_first_a_violation_then_a_misconfiguration() -> None:
    m = scenario("qemu").build()
    first = explain(m.vcpu.access(BAR_GVA, "write", 5))
    assert first.splitlines()[-1].startswith("GPA 0x3000010 is in no memslot")
    assert "KVM_EXIT_MMIO: write of 8 bytes at GPA 0x3000010" in first
    again = explain(m.vcpu.access(BAR_GVA, "write", 5)).splitlines()
    assert again[0] == "Attempt 1: VM exit 49 EPT_MISCONFIG for GPA 0x3000010."
    assert "has X/W/R = 110, which EPT does not allow." in again[1]
    assert "an MMIO SPTE" in again[2]


def test_a_non_canonical_gva_is_a_gp_with_no_walk() -> None:
    m = scenario("qemu").build()
    text = explain(m.vcpu.access(0x0000_8000_0000_0000, "read"))
    assert (
        text.startswith("The GVA is not canonical") and "#GP(0)" in text and "Attempt" not in text
    )


def test_under_shadow_paging_kvm_walks_the_guest_s_tables_and_injects_the_fault() -> None:
    m = scenario("toy-shadow").build()
    m.vcpu.cpl = 3
    lines = explain(m.vcpu.access(TOY_GVA + 8, "write", 1)).splitlines()
    assert lines[0] == "Attempt 1: VM exit 0 EXCEPTION_NMI (#PF)."
    assert lines[1].startswith(
        f"  The hardware walk of KVM's shadow tables for GVA {TOY_GVA + 8:#x}"
    )
    assert "R/W (bit 1) is 0 there." in lines[-2]
    assert lines[-1].endswith(
        "KVM walked the guest's tables in software (shadow paging) and injected the #PF."
    )
