"""KVM's SPTEs bit for bit as Linux 6.18 writes them (arch/x86/kvm/mmu/spte.h, spte.c):
SPTE_MMU_PRESENT, suppress-#VE in EPT present entries, SHADOW_NONPRESENT_VALUE for empty and
zapped entries, MMIO SPTEs (`make_mmio_spte`), and memslot generations
(`kvm_swap_active_memslots`). Every expected value is computed by hand in a comment."""

from __future__ import annotations

from support import mapped_machine

import twodwalk as tw
from twodwalk.engine.kvm.mmu import SHADOW_NONPRESENT_VALUE, is_mmio_spte, make_mmio_spte
from twodwalk.engine.trace import KvmStep, SpteWrite

GVA = 0x40_0000
GPA = 0x20_0000
MMIO_GVA = 0x4000_0000
MMIO_GPA = 0x8000_0000
KVM_MEM_LOG_DIRTY_PAGES = 1


def machine(tdp: bool = True, maxphyaddr: int = 48) -> tw.Machine:
    m = mapped_machine(
        GVA, GPA, 0x1000, guest_ram=32 << 20, tdp=tdp, maxphyaddr=maxphyaddr, gbpages=False
    )
    m.guest.map(MMIO_GVA, MMIO_GPA, 0x1000, rw=1, us=1)
    return m


def test_ept_leaf_and_table_entries() -> None:
    m = machine()
    r = m.vcpu.access(GVA, "write", 1)
    assert r.hpa is not None
    slot = m.vm.ept.tables.entry_address(GPA, 1)
    assert slot is not None
    # R W X (0x7) | MT=WB (6 << 3 = 0x30) | IPAT 0x40 | A 0x100 | D 0x200 | MMU-present 0x800
    # | host-writable 1<<57 | MMU-writable 1<<58 | suppress-#VE 1<<63
    assert m.memory.read_u64(slot) == 0x8600_0000_0000_0B77 | (r.hpa & ~0xFFF)
    root = m.vm.ept.eptp.root
    pml4e = m.memory.read_u64(root)  # GPA 0x200000: PML4 index 0
    # R W X 0x7 | A 0x100 | MMU-present 0x800 | suppress-#VE 1<<63, and the table's address
    assert pml4e & ~0x000F_FFFF_FFFF_F000 == 0x8000_0000_0000_0907
    # The rest of a new table page holds SHADOW_NONPRESENT_VALUE, not 0.
    assert m.memory.read_u64(root + 8 * 511) == 1 << 63


def test_zapped_ept_leaf_holds_the_nonpresent_value() -> None:
    m = machine()
    r = m.vcpu.access(GVA, "write", 1)
    assert r.hva is not None
    m.host.swap_out(m.vmm, r.hva & ~0xFFF)
    slot = m.vm.ept.tables.entry_address(GPA, 1)
    assert slot is not None and m.memory.read_u64(slot) == 0x8000_0000_0000_0000


def test_ept_mmio_spte() -> None:
    m = machine()
    assert m.vm.memslots.generation == 2  # slot 0 created: one swap, 2 address spaces
    m.vcpu.access(MMIO_GVA, "read")
    found = m.vm.ept.tables.find_leaf(MMIO_GPA)
    assert found is not None
    # W+X 0b110 | generation 2 in bits 10:3 (2 << 3 = 0x10) | the GPA; no bit 11, no bit 63
    assert m.memory.read_u64(found.slot) == 0x8000_0016
    # generation 0x12345: low byte 0x45 << 3 = 0x228; 0x123 << 52 in bits 62:52
    assert make_mmio_spte(MMIO_GPA, 0x1_2345) == 0x1230_0000_8000_022E
    assert not is_mmio_spte(SHADOW_NONPRESENT_VALUE)
    assert not is_mmio_spte(SHADOW_NONPRESENT_VALUE | 0b110), "suppress-#VE is in the mask"


def test_shadow_mmio_spte_sets_bit_51_present_access_and_generation() -> None:
    m = machine(tdp=False, maxphyaddr=46)
    r = m.vcpu.access(MMIO_GVA, "read")
    leaves = [e.new for e in r.trace.of_type(SpteWrite) if e.leaf and e.level == 1]
    # bit 51 | P 0x1 | W 0x2 | U 0x4 (the guest PTE's rw=1 us=1) | generation 2 << 3 = 0x10
    # | the GPA: no other reserved bit (46..50 stay clear)
    assert leaves[-1] == 0x0008_0000_8000_0017
    again = m.vcpu.access(MMIO_GVA + 8, "read")
    assert any(s.function == "handle_mmio_page_fault" for s in again.trace.of_type(KvmStep))


def test_shadow_leaf_has_kvm_software_bits_and_zaps_write_the_nonpresent_value() -> None:
    m = machine(tdp=False)
    r = m.vcpu.access(GVA, "write", 1)
    leaf = [e for e in r.trace.of_type(SpteWrite) if e.leaf][-1]
    # MMU-present 1<<11, MMU-writable 1<<10, host-writable 1<<9
    assert leaf.new & 0xE00 == 0xE00 and leaf.new & 0b111 == 0b111
    assert r.hva is not None
    m.host.swap_out(m.vmm, r.hva & ~0xFFF)
    assert m.memory.read_u64(leaf.entry_address) == 1 << 63


def test_generation_counts_swaps_per_address_space() -> None:
    m = machine()
    slots = m.vm.memslots
    assert slots.generations == [2, 1]  # AS i starts at i; slot 0's CREATE added 2 to AS 0
    hva = m.vmm.mmap(0x10000)
    m.vm.set_user_memory_region(1, 0, 0x4000_0000, 0x10000, hva)  # CREATE: one swap
    assert slots.generations == [4, 1]
    m.vm.set_user_memory_region(1, KVM_MEM_LOG_DIRTY_PAGES, 0x4000_0000, 0x10000, hva)
    assert slots.generations == [6, 1]  # FLAGS_ONLY: one swap
    m.vm.set_user_memory_region(1, 0, 0x5000_0000, 0x10000, hva)  # MOVE: two swaps
    assert slots.generations == [10, 1]
    m.vm.set_user_memory_region(1, 0, 0, 0, 0)  # DELETE: two swaps
    assert slots.generations == [14, 1]
    m.vm.set_user_memory_region(1 << 16 | 2, 0, 0x4000_0000, 0x10000, hva)  # SMM space
    assert slots.generations == [14, 3]
