"""What cached translations are tagged with and what invalidates them: the EP4TA (SDM Vol 3C
29.4.1), global entries under PCIDs (Vol 3A 4.10.2.4), MOV to CR4 and INVPCID (4.10.4.1), and
a CR0.WP change under shadow paging (KVM's MMU role)."""

from __future__ import annotations

import pytest
from support import mapped_machine

import twodwalk as tw
from twodwalk.engine.tlb import ANY_PCID
from twodwalk.engine.trace import TlbHit

GVA = 0x40_0000
GPA = 0x10_0000
KERNEL_GVA = 0xFFFF_8000_0040_0000


def machine(tdp: bool = True) -> tw.Machine:
    m = mapped_machine(GVA, GPA, 2 * 4096, guest_ram=16 << 20, tdp=tdp)
    m.guest.map(KERNEL_GVA, GPA + 0x8000, 4096, rw=1, g=1)
    return m


def hit(r: tw.AccessResult) -> bool:
    return bool(r.trace.of_type(TlbHit)) and r.trace.memory_references() == []


def with_pcids(m: tw.Machine) -> int:
    """PCIDE on, CR3 = the root with PCID 1; both pages cached under PCID 1."""
    m.vcpu.cr4_pcide = True
    root = m.vcpu.cr3 & ~0xFFF
    m.vcpu.mov_cr3(root | 1)
    m.vcpu.access(GVA, "read")
    m.vcpu.access(KERNEL_GVA, "read")
    return root


def test_entries_are_tagged_by_ep4ta_and_invept_matches_it() -> None:
    """The tag is EPTP bits 51:12, so an INVEPT naming the VM's EPT with another memory type
    or A/D setting still drops its entries; another root does not."""
    m = machine()
    m.vcpu.access(GVA, "read")
    eptp = m.vm.ept.eptp
    assert {e.tag.ep4ta for e in m.vcpu.tlb.entries()} == {eptp.root}
    m.vcpu.invept("single", eptp=eptp.root + 0x1000 | 0x1E)
    assert hit(m.vcpu.access(GVA, "read")), "another EP4TA"
    same_tables = eptp.value ^ 0x40 ^ 0x6  # the A/D enable flipped, memory type WB -> UC
    assert same_tables >> 12 == eptp.value >> 12 and same_tables != eptp.value
    m.vcpu.invept("single", eptp=same_tables)
    assert not hit(m.vcpu.access(GVA, "read"))


def test_a_global_entry_serves_every_pcid() -> None:
    m = machine()
    root = with_pcids(m)
    m.vcpu.mov_cr3(root | 2)
    assert hit(m.vcpu.access(KERNEL_GVA, "read")), "cached under PCID 1, used under PCID 2"
    assert not hit(m.vcpu.access(GVA, "read")), "a non-global entry is PCID 1's only"
    tags = {e.page: e.tag.pcid for e in m.vcpu.tlb.entries()}
    assert tags[KERNEL_GVA] == ANY_PCID and tags[GVA] == 2


@pytest.mark.parametrize("change", ["pge off", "pcide off"])
def test_mov_to_cr4_that_changes_pge_or_clears_pcide_drops_globals(change: str) -> None:
    m = machine()
    with_pcids(m)
    if change == "pge off":
        m.vcpu.cr4_pge = False
    else:
        m.vcpu.cr3 = m.vcpu.cr3 & ~0xFFF
        m.vcpu.access(KERNEL_GVA, "read")  # the CR3 load kept the global entry
        assert any(e.global_page for e in m.vcpu.tlb.entries())
        m.vcpu.cr4_pcide = False
    assert not any(e.global_page for e in m.vcpu.tlb.entries())
    assert not hit(m.vcpu.access(KERNEL_GVA, "read"))


def test_setting_pcide_with_a_pcid_in_cr3_is_refused() -> None:
    m = machine()
    m.vcpu.mov_cr3(m.vcpu.cr3 | 0x8)  # PCD, bit 3: CR3[11:0] != 0
    with pytest.raises(tw.TwodwalkError, match=r"CR3\[11:0\]=0x8 would raise #GP"):
        m.vcpu.cr4_pcide = True
    assert not m.vcpu.cr4_pcide


def test_invpcid_types() -> None:
    m = machine()
    root = with_pcids(m)
    m.vcpu.access(GVA + 0x1000, "read")
    m.vcpu.invpcid("address", pcid=1, gva=KERNEL_GVA)
    assert hit(m.vcpu.access(KERNEL_GVA, "read")), "type 0 keeps global entries"
    m.vcpu.invpcid("address", pcid=1, gva=GVA)
    assert not hit(m.vcpu.access(GVA, "read"))
    assert hit(m.vcpu.access(GVA + 0x1000, "read")), "type 0: that page only"
    m.vcpu.invpcid("single", pcid=2)
    assert hit(m.vcpu.access(GVA + 0x1000, "read")), "type 1: another PCID's flush"
    m.vcpu.invpcid("single", pcid=1)
    assert not hit(m.vcpu.access(GVA + 0x1000, "read"))
    assert hit(m.vcpu.access(KERNEL_GVA, "read")), "type 1 keeps globals"
    m.vcpu.invpcid("all-but-globals")
    assert hit(m.vcpu.access(KERNEL_GVA, "read"))
    assert not hit(m.vcpu.access(GVA, "read"))
    m.vcpu.invpcid("all")
    assert not hit(m.vcpu.access(KERNEL_GVA, "read")), "type 2 drops globals too"
    with pytest.raises(tw.TwodwalkError, match="pcid"):
        m.vcpu.invpcid("single", pcid=1 << 12)
    with pytest.raises(tw.TwodwalkError, match="kind=address"):
        m.vcpu.invpcid("address", pcid=1)
    assert m.vcpu.cr3 == root | 1


def test_shadow_entry_made_for_wp0_does_not_serve_wp1() -> None:
    """KVM emulates guest CR0.WP=0 with a writable, supervisor-only shadow leaf; WP is in the
    shadow page's role, so after the guest sets WP again a kernel write to the read-only page
    must fault, with nothing else happening in between."""
    m = machine(tdp=False)
    m.guest.protect(GVA, 0x1000, rw=0)
    m.vcpu.cr0_wp = False
    assert m.vcpu.access(GVA, "write", 7).fault is None
    m.vcpu.cr0_wp = True
    refused = m.vcpu.access(GVA, "write", 9)
    assert refused.fault is not None and refused.fault.error_code == 0b11  # P | W
    assert m.vcpu.access(GVA, "read").value == 7
