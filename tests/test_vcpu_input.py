"""Bad input to the vCPU and the machine gets a clear error naming the field."""

from __future__ import annotations

import pytest
from support import GVA, small_machine

import twodwalk as tw


def test_cr3_assignment_rejects_bits_above_maxphyaddr() -> None:
    m = small_machine()
    with pytest.raises(tw.TwodwalkError, match="MAXPHYADDR"):
        m.vcpu.cr3 = 1 << 50
    m.vcpu.cr3 = m.vcpu.cr3 | 0x18
    assert m.vcpu.access(GVA, "read").fault is None, "PWT/PCD are decoded, not rejected"


CPU = tw.CpuModel(maxphyaddr=46)


@pytest.fixture
def m() -> tw.Machine:
    machine = tw.Machine(guest_ram=4 << 20)
    machine.guest.map(0x40_0000, 0x10_0000, 4096, rw=1)
    return machine


@pytest.mark.parametrize(
    ("gva", "kind", "value", "match"),
    [
        (0x40_0FFC, "read", None, "cross a 4 KiB page boundary"),
        (0x40_0000, "read", 5, "only for writes"),
        (0x40_0000, "write", None, "value"),
        (0x40_0000, "write", 1 << 64, "value"),
        (-1, "read", None, "gva"),
        (1 << 64, "read", None, "gva"),
        (0x40_0000, "exec", None, "kind='exec' is not valid: choose one of read, write, fetch"),
    ],
)
def test_bad_access_arguments(
    m: tw.Machine, gva: int, kind: str, value: int | None, match: str
) -> None:
    with pytest.raises(tw.TwodwalkError, match=match):
        m.vcpu.access(gva, kind, value)


def test_bad_cpl(m: tw.Machine) -> None:
    m.vcpu.cpl = 4
    with pytest.raises(tw.TwodwalkError, match="cpl"):
        m.vcpu.access(0x40_0000, "read")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"guest_ram": 1000}, "guest_ram"),
        ({"guest_ram": 2 << 30}, "guest_ram"),
        ({"guest_levels": 3}, "guest_levels=.3. is not valid"),
        ({"ept_levels": 6}, "ept_levels"),
        ({"maxphyaddr": 60}, "maxphyaddr=60"),
        ({"thp": True, "guest_ram": 3 << 20}, "multiple of 0x200000"),
        ({"thp": True, "hugetlb_1g": True}, "choose one backing"),
    ],
)
def test_bad_machine_arguments(kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(tw.TwodwalkError, match=match):
        tw.Machine(**kwargs)  # type: ignore[arg-type]


def test_read_gpa_outside_every_memslot_is_a_clear_error(m: tw.Machine) -> None:
    with pytest.raises(tw.TwodwalkError, match="no memslot"):
        m.read_gpa(0x8000_0000, 8)
