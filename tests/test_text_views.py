"""The text views: the story of an access, walks Bochs-style, the QEMU-monitor commands."""

from __future__ import annotations

import pytest
from support import GPA, GVA, small_machine

import twodwalk as tw
from twodwalk.engine.trace import GuestWalk
from twodwalk.views.text import (
    describe_error_code,
    describe_qualification,
    format_2d_walk,
    format_outcome,
    format_trace,
    info_memslots,
    monitor,
)


def test_text_views_tell_the_story_of_a_first_touch() -> None:
    m = small_machine()
    first = m.vcpu.access(GVA + 8, "write", 7)
    story = format_trace(first.trace)
    assert "VM exit 48 EPT_VIOLATION" in story
    assert "kvm_mmu_hugepage_adjust" in story
    assert "VM entry: the guest retries" in story
    m.vcpu.flush_tlb()
    dump = format_2d_walk(m.vcpu.access(GVA + 8, "read").trace).splitlines()
    assert len(dump) == 24
    assert dump[0].split()[:3] == ["1", "EPT", "PML4E"] and "(guest L4 table)" in dump[0]
    assert dump[4].split()[:2] == ["5", "PML4E"]
    assert "(final GPA)" in dump[-1]
    table = info_memslots(m.vm.memslots.slots.values()).splitlines()
    assert len(table) == 2 and table[1].split()[:2] == ["0", "0"]
    lines = monitor(first).splitlines()
    assert lines[0] == f"gpa: {GPA + 8:#x}"
    assert lines[1].endswith(f"is {m.vm.gpa_to_hva(GPA + 8):#x}")
    assert lines[2].endswith(f"is {first.hpa:#x}")


def test_trace_text_of_a_shadow_paging_fault_names_the_gva() -> None:
    m = tw.Machine(guest_ram=8 << 20, tdp=False)
    m.guest.map(GVA, GPA, 4096, rw=1)
    story = format_trace(m.vcpu.access(GVA + 8, "read").trace)
    assert f"VM exit 0 EXCEPTION_NMI (#PF): GVA {GVA + 8:#x}" in story
    assert "FNAME(fetch)" in story


def test_not_present_entries_read_as_ignored_bits_and_faults_name_the_walks_own_address() -> None:
    from twodwalk.engine.host import swp_entry_pte
    from twodwalk.engine.walker import FaultKind
    from twodwalk.views.text import describe_entry

    fmt = tw.ia32e_format(4, tw.CpuModel(maxphyaddr=46), True)
    swap = describe_entry(fmt.decode(swp_entry_pte(0, 0x1234), 1))
    assert "not present: the CPU ignores the other bits" in swap and "reserved" not in swap
    m = small_machine()
    r = m.vcpu.access(GVA + 0x20_0000, "read")  # unmapped: the walk stops at a guest entry
    (walk,) = [e.record for e in r.trace.of_type(GuestWalk)][-1:]
    fault = walk.fault
    assert fault is not None and fault.kind is FaultKind.NOT_PRESENT
    assert f"at {walk.steps[-1].entry_address:#x} is not present" in fault.detail, "a GPA"


@pytest.mark.parametrize("tdp", [True, False])
def test_gva2gpa_ignores_rights_as_qemu_does(tdp: bool) -> None:
    """QEMU's `gva2gpa` walks with `cpu_get_phys_page_debug`, which checks no rights: a user
    read of a supervisor page faults, yet the page is mapped and has a GPA."""
    from twodwalk.views.text import gva2gpa

    m = tw.Machine(guest_ram=4 << 20, tdp=tdp)
    m.guest.map(GVA, GPA, 4096, rw=1)  # supervisor only
    m.vcpu.access(GVA + 8, "read")
    m.vcpu.cpl = 3
    refused = m.vcpu.access(GVA + 8, "read")
    assert isinstance(refused.fault, tw.PageFault) and refused.fault.error_code == 5
    assert gva2gpa(refused) == f"gpa: {GPA + 8:#x}"
    assert gva2gpa(m.vcpu.access(GVA + 0x1000, "read")) == "Unmapped"


def bit_line(text: str, number: int) -> list[str]:
    """The fields of the line for bit `number` of a describe_* table."""
    return next(
        line.split() for line in text.splitlines() if line.split()[:2] == ["bit", str(number)]
    )


def test_describe_qualification_names_every_bit_as_table_28_7_does() -> None:
    """0x1aa: a write to the final GPA through EPT entries that allow R and X (the host's
    zero page mapped for an earlier read): bits 1, 3, 5, 7, 8."""
    text = describe_qualification(0x1AA)
    assert "table 28-7" in text.splitlines()[0]
    assert bit_line(text, 0)[2:4] == ["read", "0"] and bit_line(text, 1)[2:4] == ["write", "1"]
    assert bit_line(text, 3)[2:4] == ["readable", "1"] and bit_line(text, 4)[2:4] == [
        "writable",
        "0",
    ]
    assert bit_line(text, 7)[2:5] == ["GVA", "valid", "1"]
    assert bit_line(text, 8)[2:5] == ["final", "GPA", "1"]


def test_kvm_error_codes_are_decoded_with_bits_32_and_33() -> None:
    final_write = describe_error_code(0x1_0000_0003, kvm=True)
    assert bit_line(final_write, 32)[2:4] == ["PFERR_GUEST_FINAL_MASK", "1"]
    assert bit_line(final_write, 33)[2:4] == ["PFERR_GUEST_PAGE_MASK", "0"]
    table_read = describe_error_code(0x2_0000_0006, kvm=True)
    assert bit_line(table_read, 2)[2:4] == ["PFERR_USER_MASK", "1"] and "read" in table_read
    assert bit_line(table_read, 33)[2:4] == ["PFERR_GUEST_PAGE_MASK", "1"]
    assert bit_line(describe_error_code(1 << 40, kvm=True), 40)[2:3] == ["1"], "unnamed: shown"
    assert bit_line(describe_error_code(0x7), 2)[2:4] == ["U/S", "1"]


def test_traces_and_outcomes_decode_their_codes_by_name() -> None:
    m = small_machine()
    story = format_trace(m.vcpu.access(GVA + 8, "write", 7).trace)
    table = "(PFERR_WRITE_MASK | PFERR_USER_MASK | PFERR_GUEST_PAGE_MASK)"
    assert f"error code 0x200000006 {table}" in story, "EPT A/D on: a table read is a write"
    assert "qualification 0x83 (read, write, GVA valid, guest page-table entry)" in story
    assert "error code 0x100000002 (PFERR_WRITE_MASK | PFERR_GUEST_FINAL_MASK)" in story
    assert "qualification 0x182 (write, GVA valid, final GPA)" in story
    m.guest.protect(GVA, 4096, rw=0)
    m.vcpu.flush_tlb()
    fault = m.vcpu.access(GVA, "write", 1)
    assert format_outcome(fault).startswith("#PF error code 0x3 (P W/R), CR2")


def test_collapsed_trace_has_one_line_per_exit_and_the_full_trace_on_demand() -> None:
    from twodwalk.engine.trace import VmExit
    from twodwalk.views.text import CollapsedTrace, format_trace

    m = tw.Machine(guest_ram=32 << 20, maxphyaddr=48)
    m.guest.map(0x40_0000, 0x10_0000, 4096, rw=1, us=1)
    first = m.vcpu.access(0x40_0008, "write", value=42)
    folded = CollapsedTrace(first.trace)
    lines = folded.summary.splitlines()
    assert len(lines) == len(first.trace.of_type(VmExit)) == 5
    assert lines[0].startswith("exit 1: 48 EPT_VIOLATION at GPA 0x1fff000 (a guest page table)")
    assert "(the data's GPA)" in lines[4] and "1 host page fault" in lines[4]
    assert all(line.endswith("Then: retry.") for line in lines)
    html_text = folded._repr_html_()
    assert "-&gt;" in html_text and "->" not in html_text, "escaped"
    details = html_text[html_text.index("<details>") :]
    assert format_trace(first.trace).splitlines()[0].split(":")[0] in details
    assert f"({len(format_trace(first.trace).splitlines())} lines)" in details
    warm = m.vcpu.access(0x40_0008, "read")
    assert CollapsedTrace(warm.trace).summary == "no VM exit"
