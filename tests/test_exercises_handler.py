"""The handler lab: the reference handler builds KVM's EPT bit for bit, and each typical
mistake of a student's handler gets its own message (Linux 6.18 kvm_tdp_mmu_page_fault:
kvm_faultin_pfn, kvm_mmu_hugepage_adjust, make_spte, kvm_tdp_mmu_map)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from twodwalk.engine.machine import Machine
from twodwalk.errors import TwodwalkError
from twodwalk.exercises import handler as lab
from twodwalk.exercises.handler import (
    LAB_GUESTS,
    EptViolation,
    HostPage,
    SlotFields,
    check_handler,
    reference_handler,
    run_guest,
)

FOUR_K_READ, FOUR_K_WRITE, THP, HOLE, MISALIGNED = LAB_GUESTS
A_BIT, D_BIT = 1 << 8, 1 << 9  # SDM Vol 3C table 29-6


def ept_contents(machine: Machine) -> list[tuple[int, int, int]]:
    return sorted((e.level, e.virtual, e.value) for e in machine.vm.ept.tables.entries())


@pytest.mark.parametrize("guest", LAB_GUESTS, ids=lambda g: g.name)
def test_reference_handler_builds_kvms_ept_bit_for_bit(guest: lab.LabGuest) -> None:
    """The same guest, once on KVM's own path and once on the reference handler: the same
    EPT entries (software bits included), the same dirty bitmaps, the same HPA."""
    kvm = guest.build()
    value = 0x5EED if guest.kind == "write" else None
    expected = kvm.vcpu.access(guest.gva, guest.kind, value)
    ours = guest.build()
    feedback, trace = run_guest(reference_handler, ours, guest)
    assert feedback.correct, feedback.message
    assert ept_contents(ours) == ept_contents(kvm)
    assert [s.dirty_bitmap for s in ours.vm.memslots.slots.values()] == [
        s.dirty_bitmap for s in kvm.vm.memslots.slots.values()
    ]
    assert f"reached HPA {expected.hpa:#x}" in feedback.message
    assert "your handler: EPT violation 1 at GPA" in trace


def test_reference_handler_passes_every_guest() -> None:
    report = check_handler(reference_handler)
    assert report.passed
    assert str(report).endswith("5 of 5 guests ran as under KVM.")
    assert str(report).count("PASS") == 5


def test_lab_guests_take_the_levels_kvm_chooses() -> None:
    """The guests exist to catch level mistakes: 2 MiB under THP, 4 KiB when the slot's HVA
    is 4 KiB off (kvm_mmu_max_mapping_level refuses GFN/HVA misalignment)."""
    for guest, data_level in ((THP, 2), (MISALIGNED, 1), (FOUR_K_WRITE, 1)):
        machine = guest.build()
        result = machine.vcpu.access(guest.gva, guest.kind, 1 if guest.kind == "write" else None)
        assert result.gpa is not None
        leaf = machine.vm.ept.get_walk(result.gpa).steps[-1]
        assert leaf.level == data_level, guest.name


Patch = Callable[[pytest.MonkeyPatch], None]


def failures(monkeypatch: pytest.MonkeyPatch, patch: Patch) -> dict[str, str]:
    """The report's failing guests and their messages, for the reference with a mistake."""
    patch(monkeypatch)
    report = check_handler(reference_handler)
    return {name: f.message for name, f in report.results if not f.correct}


def test_forgetting_the_memslot_offset(monkeypatch: pytest.MonkeyPatch) -> None:
    def patch(mp: pytest.MonkeyPatch) -> None:
        mp.setattr(lab, "solution_gfn_to_hva_memslot", lambda s, g: s.userspace_addr + (g << 12))

    failed = failures(monkeypatch, patch)
    assert set(failed) == {HOLE.name, MISALIGNED.name}, "slots at GPA 0 hide the mistake"
    assert "the memslot's offset is missing. The slot starts at GPA 0xc00000" in failed[HOLE.name]
    assert "HVA = userspace_addr + (gfn - base_gfn) * 4096" in failed[MISALIGNED.name]


def test_slot_zero_for_every_gpa(monkeypatch: pytest.MonkeyPatch) -> None:
    def patch(mp: pytest.MonkeyPatch) -> None:
        mp.setattr(lab, "solution_gfn_to_memslot", lambda fault, gfn: fault.memslots[0])

    failed = failures(monkeypatch, patch)
    assert set(failed) == {HOLE.name, MISALIGNED.name}
    assert "that is memslot 0's rule; GFN 0x13ff is in memslot 1 (GPA 0xc00000" in failed[HOLE.name]


def test_a_gpa_used_as_an_hva(monkeypatch: pytest.MonkeyPatch) -> None:
    def patch(mp: pytest.MonkeyPatch) -> None:
        mp.setattr(lab, "solution_gfn_to_hva_memslot", lambda s, g: g << 12)

    failed = failures(monkeypatch, patch)
    assert len(failed) == 5
    assert "a GPA is not an HVA" in failed[FOUR_K_READ.name]
    assert "raised KvmError: EFAULT" in failed[FOUR_K_READ.name]


def test_always_4k(monkeypatch: pytest.MonkeyPatch) -> None:
    def patch(mp: pytest.MonkeyPatch) -> None:
        mp.setattr(lab, "solution_hugepage_adjust", lambda *args: 1)

    failed = failures(monkeypatch, patch)
    assert set(failed) == {THP.name, MISALIGNED.name}, "the guest tables of both are in THP"
    assert failed[THP.name] == (
        "at EPT violation 1, it mapped at level 1 (4 KiB); KVM maps at level 2 (2 MiB); not"
        " larger: 1 GiB: host page is smaller"
    )


def test_ignoring_gfn_hva_alignment(monkeypatch: pytest.MonkeyPatch) -> None:
    def host_page_only(
        fault: EptViolation, slot: SlotFields, gfn: int, hva: int, page: HostPage
    ) -> int:
        return max(
            lv for lv in range(1, fault.max_level + 1) if fault.page_size(lv) <= page.page_size
        )

    failed = failures(
        monkeypatch, lambda mp: mp.setattr(lab, "solution_hugepage_adjust", host_page_only)
    )
    assert set(failed) == {MISALIGNED.name}
    assert failed[MISALIGNED.name].endswith(
        "KVM maps at level 1 (4 KiB); not larger: 1 GiB: host page is smaller;"
        " 2 MiB: GFN and HVA misaligned"
    )


def test_a_large_leaf_that_is_not_aligned(monkeypatch: pytest.MonkeyPatch) -> None:
    """The 4 KiB frame inside the huge page as a 2 MiB leaf's address: make_ept_entry refuses
    it by name; an entry built by hand with those bits gets the lab's explanation (they are
    reserved in a 2 MiB leaf: SDM Vol 3C 29.3.3.1, an EPT misconfiguration)."""
    make = lab.solution_make_spte

    def frame(fault: EptViolation, level: int) -> int:
        return fault.gpa & (fault.page_size(level) - 1) & ~0xFFF

    def named(fault: EptViolation, level: int, hpa: int, writable: bool) -> int:
        return make(fault, level, hpa | frame(fault, level), writable)

    def by_hand(fault: EptViolation, level: int, hpa: int, writable: bool) -> int:
        return make(fault, level, hpa, writable) | frame(fault, level)

    failed = failures(monkeypatch, lambda mp: mp.setattr(lab, "solution_make_spte", named))
    assert set(failed) == {THP.name, MISALIGNED.name}
    assert "raised AddressError: address=0x" in failed[THP.name]
    assert "is not aligned: it must be a multiple of 0x200000" in failed[THP.name]
    failed = failures(monkeypatch, lambda mp: mp.setattr(lab, "solution_make_spte", by_hand))
    assert set(failed) == {THP.name, MISALIGNED.name}
    assert "2 MiB leaf points at HPA 0x" in failed[THP.name]
    assert "which is not 2 MiB-aligned" in failed[THP.name]


@pytest.mark.parametrize(
    ("fields", "failing", "message"),
    [
        ({"a": 0}, 5, "its leaf has A = 0, KVM's has 1: with EPT A/D on, make_spte sets A"),
        ({"x": 0}, 5, "its leaf has X = 0, KVM's has 1"),
        ({"mt": 0}, 5, "its leaf has MT = 0, KVM's has 6: guest RAM is write-back"),
        ({"ipat": 0}, 5, "its leaf has IPAT = 0, KVM's has 1"),
        ({"w": 1, "d": 1}, 2, "its leaf has W = 1, KVM's has 0: W follows the host page"),
    ],
)
def test_wrong_leaf_fields(
    monkeypatch: pytest.MonkeyPatch, fields: dict[str, int], failing: int, message: str
) -> None:
    def patch(mp: pytest.MonkeyPatch) -> None:
        def make(fault: EptViolation, level: int, hpa: int, writable: bool) -> int:
            w = int(writable)
            base = {"address": hpa, "r": 1, "w": w, "x": 1, "mt": 6, "ipat": 1, "a": 1, "d": w}
            return fault.make_ept_entry(level, **(base | fields))

        mp.setattr(lab, "solution_make_spte", make)

    failed = failures(monkeypatch, patch)
    assert len(failed) == failing
    assert all(message in m for m in failed.values()), failed
    if fields == {"w": 1, "d": 1}:  # the reads of RAM the host left as the zero page
        assert set(failed) == {FOUR_K_READ.name, HOLE.name}


def test_a_write_asked_as_a_read() -> None:
    def reads_only(fault: EptViolation) -> None:
        fault.write = False
        reference_handler(fault)

    report = check_handler(reads_only, (FOUR_K_WRITE,))
    ((_, feedback),) = report.results
    assert not feedback.correct
    assert "it asked the host for a read but the guest writes: pass fault.write" in feedback.message


def test_no_entry_two_entries_and_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    def twice(fault: EptViolation) -> None:
        reference_handler(fault)
        reference_handler(fault)

    def asks_only(fault: EptViolation) -> None:
        fault.hva_to_pfn(lab.solution_gfn_to_hva_memslot(fault.memslots[0], fault.gpa >> 12), True)

    def no_slot(fault: EptViolation) -> None:
        next(s for s in fault.memslots if s.base_gfn > 1 << 40)

    for handler, message in (
        (asks_only, "it returned without installing an entry"),
        (twice, "it installed 2 entries; KVM installs one leaf"),
        (no_slot, "raised StopIteration:  (no memslot matched"),
        (lambda fault: None, "it never asked the host for the page"),
    ):
        ((_, feedback),) = check_handler(handler, (FOUR_K_READ,)).results
        assert not feedback.correct and message in feedback.message, (message, feedback.message)


def test_check_handler_names_a_bad_argument() -> None:
    with pytest.raises(TwodwalkError, match="handler=3 is not valid: pass a function handler"):
        check_handler(3)  # type: ignore[arg-type]
