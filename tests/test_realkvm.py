"""The engine against real KVM on /dev/kvm; skipped with the reason where there is none."""

from __future__ import annotations

import errno
import importlib

import pytest

from twodwalk import realkvm

REASON = realkvm.unavailable_reason()
needs_kvm = pytest.mark.skipif(REASON is not None, reason=f"no usable /dev/kvm: {REASON}")


@needs_kvm
def test_memslot_errnos_agree_with_the_kernel() -> None:
    report = realkvm.memslot_fuzz(3000, seed=7)
    assert report.disagreements == [], report.table()
    outcomes = {o.real for o in report.outcomes}
    assert {0, 22, 17} <= outcomes, "the run reached successes, EINVAL and EEXIST"


def skip_without_guest_memfd() -> None:
    """Skip, with the reason, where this KVM cannot create a guest_memfd (before 6.8)."""
    from twodwalk.realkvm.guest_memfd import gmem_unsupported

    kvm = realkvm.RealKvm()
    try:
        reason = gmem_unsupported(kvm)
    finally:
        kvm.close()
    if reason is not None:
        pytest.skip(reason)


@needs_kvm
def test_guest_memfd_errnos_agree_with_the_kernel() -> None:
    """KVM_CREATE_GUEST_MEMFD, KVM_SET_USER_MEMORY_REGION2 and fallocate on the real VM and
    the engine's, call by call (virt/kvm/guest_memfd.c, kvm_main.c)."""
    skip_without_guest_memfd()
    report = realkvm.gmem_fuzz(3000, seed=7)
    assert report.disagreements == [], report.table()
    seen = {(o.call.kind, o.real) for o in report.outcomes}
    for kind, code in (
        ("create", 0),
        ("create", errno.EINVAL),
        ("bind", 0),
        ("bind", errno.EINVAL),
        ("bind", errno.EBADF),
        ("delete", 0),
        ("fallocate", 0),
        ("fallocate", errno.EOPNOTSUPP),
        ("fallocate", errno.EINVAL),
    ):
        assert (kind, code) in seen, f"the run never reached {kind} -> {code}"


@needs_kvm
def test_flavour_is_read_from_the_host() -> None:
    kvm = realkvm.RealKvm()
    try:
        flavour = kvm.flavour()
    finally:
        kvm.close()
    assert flavour.nr_memslots >= 32
    assert flavour.address_spaces in (1, 2)


def test_unavailable_reason_is_a_sentence_or_none() -> None:
    reason = realkvm.unavailable_reason()
    assert reason is None or ("KVM" in reason or "kvm" in reason)


@needs_kvm
def test_paging_cases_agree_with_the_kernel() -> None:
    report = realkvm.paging_fuzz(3000, seed=11)
    assert report.disagreements == [], report.table()
    for category in (
        "read ok",
        "write ok",
        "fetch ok",
        "#PF not present",
        "#PF protection",
        "#PF reserved",
        "vector 13",
        "MMIO exit",
    ):
        assert report.agree.get(category, 0) > 0, f"no {category!r} case in {report.agree}"


@needs_kvm
def test_readonly_slot_and_hole_exit_the_same_way() -> None:
    from twodwalk.realkvm.mmio_and_dirty_log import readonly_and_hole

    runner = realkvm.RealRunner()
    try:
        outcomes = readonly_and_hole(runner)
    finally:
        runner.close()
    assert [o.what for o in outcomes if not o.agree] == []
    writes = [o.real[1] for o in outcomes if o.what.startswith("write")]
    assert all(mmio is not None and mmio[2] for mmio in writes), "READONLY and hole writes exit"


@needs_kvm
def test_dirty_log_bitmaps_agree() -> None:
    from twodwalk.realkvm.mmio_and_dirty_log import dirty_log

    runner = realkvm.RealRunner()
    try:
        outcomes = dirty_log(runner, seed=3, rounds=6)
    finally:
        runner.close()
    assert all(o.agree for o in outcomes), [(o.round, o.real, o.engine) for o in outcomes]
    assert any(any(o.real) for o in outcomes), "some round dirtied pages"


def test_without_kvm_the_check_skips_and_the_command_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from twodwalk.realkvm import __main__ as cli

    check_module = importlib.import_module("twodwalk.realkvm.check")
    monkeypatch.setattr(check_module, "unavailable_reason", lambda: "no /dev/kvm on this box")
    result = realkvm.check(cases=10, memslot_cases=10)
    assert (result.disagreements, result.text) == (None, "skipped: no /dev/kvm on this box")
    assert cli.main(["--cases", "5"]) == 2
    assert "no /dev/kvm on this box" in capsys.readouterr().err


@needs_kvm
def test_command_exits_0_when_everything_agrees() -> None:
    from twodwalk.realkvm import __main__ as cli

    argv = ["--cases", "200", "--memslot-cases", "200", "--sequence-cases", "30", "--seed", "9"]
    assert cli.main(argv) == 0


@needs_kvm
@pytest.mark.parametrize(
    ("cpl", "kind", "fields"),
    [
        (0, "read", {"rw": 1}),
        (0, "write", {"rw": 1}),
        (3, "read", {"rw": 1}),  # supervisor page: #PF 5
        (3, "write", {"rw": 0, "us": 1}),  # #PF 7
        (0, "fetch", {"rw": 1, "xd": 1}),  # #PF 0x11
    ],
)
def test_replay_of_a_machine_access_agrees(cpl: int, kind: str, fields: dict[str, int]) -> None:
    import twodwalk as tw
    from twodwalk.realkvm.replay import replay

    m = tw.Machine(guest_ram=8 << 20)
    m.guest.map(0x40_0000, 0x10_0000, 4096, **fields)
    m.write_gpa(0x10_0008, (0x1234_5678).to_bytes(8, "little"))
    m.vcpu.cpl = cpl
    result = replay(m, 0x40_0008, kind, 7 if kind == "write" else None)
    assert result.agree, result.differences
    if result.engine.fault is None and kind == "read":
        assert result.real.value == 0x1234_5678


@needs_kvm
@pytest.mark.parametrize(
    ("kind", "mapped", "value"),
    [("read", True, None), ("write", True, 0x5EED), ("read", False, None), ("fetch", True, None)],
)
def test_a_guest_whose_ram_is_a_guest_memfd_behaves_the_same(
    kind: str, mapped: bool, value: int | None
) -> None:
    """Real KVM runs the guest from guest_memfd RAM (a shadow-paging host included: its
    faults also take the page from the file); the guest sees what the engine computes."""
    from twodwalk.engine.machine import Machine
    from twodwalk.realkvm.replay import replay

    skip_without_guest_memfd()
    machine = Machine(guest_ram=4 << 20)
    if mapped:
        machine.guest.map(0x40_0000, 0x20_0000, 4096, rw=1, us=1)
        content = 0xCC if kind == "fetch" else 0xC0DE  # a fetch lands on the caller's int3
        machine.write_gpa(0x20_0010, content.to_bytes(8, "little"))
    result = replay(machine, 0x40_0010, kind, value, guest_memfd=True)
    assert result.differences == (), result.differences
    if kind == "read" and mapped:
        assert result.real.value == 0xC0DE


def test_replay_refuses_a_machine_with_a_pci_hole_before_touching_kvm() -> None:
    import twodwalk as tw
    from twodwalk.realkvm.device import KvmUnavailableError
    from twodwalk.realkvm.replay import replay

    m = tw.Machine(guest_ram=8 << 20, pci_hole=(4 << 20, 6 << 20))
    with pytest.raises(KvmUnavailableError, match="one memslot at GPA 0"):
        replay(m, 0x40_0008, "read")
