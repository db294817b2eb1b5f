"""Addresses print in hex everywhere, reprs included (`units.hex_repr`): a learner comparing a
repr with the SDM, the kernel or the text views reads the same digits."""

from __future__ import annotations

from twodwalk.engine.kvm.run import MmioExit
from twodwalk.scenarios import scenario

BAR_GVA = 0xFFFF_C900_0000_0010


def test_an_mmio_exit_and_its_result_show_addresses_in_hex() -> None:
    m = scenario("qemu").build()
    r = m.vcpu.access(BAR_GVA, "write", 0x1234)
    assert isinstance(r.exit, MmioExit)
    assert repr(r.exit).startswith("MmioExit(phys_addr=0x3000010, is_write=True, len=8,")
    assert "gpa=0x3000010" in repr(r) and "hva=None" in repr(r)


def test_a_memslot_and_a_page_fault_show_addresses_in_hex_and_counts_in_decimal() -> None:
    m = scenario("qemu").build()
    slot = m.vm.memslots.gfn_to_memslot(0x4100)
    assert slot is not None
    assert repr(slot) == (
        f"Memslot(as_id=0, id=1, base_gfn=0x4000, npages=4096,"
        f" userspace_addr={slot.userspace_addr:#x}, flags=0)"
    )
    fault = m.vcpu.access(0x1000, "read").fault
    assert repr(fault) == "PageFault(error_code=0x0, address=0x1000, vector=14)"
