"""Cycles from counts (twodwalk.costs), and the workloads whose cost is in exits rather than
references: context switches and INVLPG (CR3-load and INVLPG exiting, SDM Vol 3C 25.6.2),
and fork write-protecting the parent's PTEs (mm/memory.c `copy_present_pte`), which under
shadow paging traps on every store to a shadowed guest page table (`kvm_mmu_pte_write`).
Expected values are computed by hand in each test."""

from __future__ import annotations

import pytest

from twodwalk.costs import LatencyModel, cycle_table
from twodwalk.engine.machine import Machine
from twodwalk.engine.trace import Trace, VmExit
from twodwalk.errors import TwodwalkError
from twodwalk.workloads import (
    Configuration,
    WorkloadResult,
    compare,
    context_switching,
    forking,
    run_workload,
    strided,
)

BASE = 0x4000_0000
PAGE = 0x1000
EPT = Configuration("EPT 4x4")
SHADOW = Configuration("shadow paging", tdp=False)
PF_EXIT, CR3_EXIT, INVLPG_EXIT = "EXCEPTION_NMI (#PF)", "CR_ACCESS (MOV to CR3)", "INVLPG"


def counted_run() -> WorkloadResult:
    return WorkloadResult(
        "by hand",
        accesses=10,
        references={"guest": 3, "ept": 5},
        tlb_hits=4,
        cache_hits={"paging-structure cache": 2},
        exits={"EPT_VIOLATION": 1, "INVLPG": 2, "SOMETHING_ELSE": 1},
        host_page_faults=1,
        guest_faults=2,
    )


def test_cycles_price_every_count() -> None:
    model = LatencyModel()
    # One walk reference: 0.4*5 + 0.3*14 + 0.2*50 + 0.1*250 = 2 + 4.2 + 10 + 25.
    assert model.walk_reference == pytest.approx(41.2)
    cycles = model.cycles(counted_run())
    assert cycles.data == 10 * 5
    assert cycles.translation == pytest.approx(4 * 0 + 2 * 2 + 8 * 41.2)
    # EPT violation 500 + 2500, two INVLPG 2 * (500 + 700), an unnamed reason 500 + 1500.
    assert cycles.exits == 3000 + 2400 + 2000
    assert cycles.page_faults == (1 + 2) * 3000
    assert cycles.total == pytest.approx(50 + 333.6 + 7400 + 9000)
    assert cycles.overhead == pytest.approx((cycles.total - 50) / cycles.total)


def test_work_between_accesses_dilutes_the_overhead() -> None:
    plain = LatencyModel().cycles(counted_run())
    busy = LatencyModel(work_per_access=100).cycles(counted_run())
    assert busy.data == 10 * 105
    assert busy.total - plain.total == 10 * 100
    assert busy.overhead < plain.overhead


def test_calibration_makes_a_run_lose_the_measured_share() -> None:
    run = counted_run()
    model = LatencyModel().calibrated(run, 0.2)
    assert model.cycles(run).overhead == pytest.approx(0.2)
    spent = 333.6 + 7400 + 9000  # what is not the data: unchanged by the work added
    assert model.work_per_access == pytest.approx((spent / 0.2 - spent - 50) / 10)


@pytest.mark.parametrize("overhead", [0, 1, 1.5, -0.1])
def test_calibration_refuses_a_share_outside_zero_one(overhead: float) -> None:
    with pytest.raises(TwodwalkError, match=rf"overhead={overhead!r} is not valid"):
        LatencyModel().calibrated(counted_run(), overhead)


def test_calibration_refuses_an_overhead_the_accesses_alone_do_not_reach() -> None:
    no_translation = WorkloadResult("all TLB hits", accesses=10, tlb_hits=10)
    with pytest.raises(TwodwalkError, match=r"already lose only 0\.0%"):
        LatencyModel().calibrated(no_translation, 0.5)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"dram": -1}, "dram=-1 is not valid: give a number of cycles, at least 0"),
        ({"l1": "5"}, "l1='5' is not valid"),
        ({"page_fault": True}, "page_fault=True is not valid"),
        ({"exit_handling": {"INVLPG": -3}}, r"exit_handling\['INVLPG'\]=-3 is not valid"),
        ({"walk_mix": (1.0, 0.0, 0.0)}, "give four shares"),
        ({"walk_mix": (0.5, 0.5, 0.5, 0.0)}, "must add up to 1"),
    ],
)
def test_a_bad_latency_names_its_field(fields: dict[str, object], message: str) -> None:
    with pytest.raises(TwodwalkError, match=message):
        LatencyModel(**fields)  # type: ignore[arg-type]


def test_context_switches_cost_exits_only_under_shadow_paging() -> None:
    # 400 reads: a CR3 load after every 50th (8) and an INVLPG after every 200th (2).
    results = compare(lambda base: context_switching(base, 16, 400, seed=3), 16, [EPT, SHADOW])
    ept, shadow = results
    assert ept.exits == {}
    assert shadow.exits == {CR3_EXIT: 8, INVLPG_EXIT: 2}
    assert ept.accesses == shadow.accesses == 400  # the control items are not accesses
    model = LatencyModel()
    assert model.cycles(shadow).exits == 8 * (500 + 1000) + 2 * (500 + 700)
    assert model.cycles(ept).exits == 0


@pytest.mark.parametrize(
    ("configuration", "exits"),
    [
        (EPT, {}),
        # 4 PTE stores at fork, each to a page table KVM shadows: a #PF exit each; 2 CR3 loads;
        # then per page written: the write's #PF exit (KVM injects the guest's #PF), the
        # guest kernel's PTE store (an exit), the retried write (an exit, a new shadow entry).
        (SHADOW, {PF_EXIT: 4 + 4 * 3, CR3_EXIT: 2}),
    ],
    ids=["ept", "shadow"],
)
def test_a_fork_costs_exits_only_under_shadow_paging(
    configuration: Configuration, exits: dict[str, int]
) -> None:
    machine = configuration.machine(4, BASE)
    assert isinstance(machine, Machine)
    vcpu, guest = machine.vcpu, machine.guest
    writes = [(BASE + page * PAGE, "write") for page in range(4)]
    run_workload(vcpu, writes, guest=guest)  # every page present, written and cached
    fork = [(BASE + page * PAGE, "wrprotect") for page in range(4)] + [(0, "mov-cr3")] * 2
    result = run_workload(vcpu, fork + writes, guest=guest)
    assert result.exits == exits
    assert result.guest_faults == 4, "each write after the fork takes one write-protect fault"
    for page in range(4):  # wp_page_reuse made each PTE writable, dirty and young again
        pte = guest.page_tables.find_leaf(BASE + page * PAGE)
        assert pte is not None
        value = guest.page_tables.space.read_u64(pte.slot)
        assert value & 0b110_0010 == 0b110_0010, f"PTE {value:#x}: R/W, A and D set"


def test_shadow_loses_the_fork_heavy_workload() -> None:
    results = compare(
        lambda base: forking(base, 32, 600, seed=5, fork_every=200), 32, [EPT, SHADOW]
    )
    ept, shadow = results
    assert ept.guest_faults == shadow.guest_faults > 0, "the same guest, the same faults"
    assert ept.exits == {}
    assert shadow.exits[CR3_EXIT] == 2 * 3  # three forks, two CR3 loads each
    # At least the 32 PTE stores of each fork and 3 exits per write-protect fault.
    assert shadow.exits[PF_EXIT] >= 3 * 32 + 3 * shadow.guest_faults
    model = LatencyModel()
    assert model.cycles(shadow).total > model.cycles(ept).total
    table = cycle_table(results, model).splitlines()
    assert table[0].split() == [
        "configuration", "cycles/access", "translation", "VM", "exits", "page", "faults",
        "overhead",
    ]  # fmt: skip
    cycles = model.cycles(shadow)
    columns = table[2].removeprefix("shadow paging").split()
    assert columns[:4] == [
        f"{x / shadow.accesses:.1f}"
        for x in (cycles.total, cycles.translation, cycles.exits, cycles.page_faults)
    ]
    assert columns[4] == f"{cycles.overhead:.1%}"


def test_a_guest_page_table_store_exits_only_under_shadow_paging() -> None:
    for configuration, expected in ((EPT, 0), (SHADOW, 4)):
        machine = configuration.machine(4, BASE)
        assert isinstance(machine, Machine)
        vcpu, guest = machine.vcpu, machine.guest
        run_workload(vcpu, [(BASE + page * PAGE, "read") for page in range(4)])
        trace = Trace()
        guest.protect(BASE, 4 * PAGE, trace=trace, rw=0)
        assert len(list(trace.of_type(VmExit))) == expected, configuration.name


def test_a_fork_item_needs_the_guest_kernel() -> None:
    vcpu = EPT.processor(4, BASE)
    with pytest.raises(TwodwalkError, match=r"'wrprotect' item at gva=0x40000000 .* pass guest="):
        run_workload(vcpu, [(BASE, "wrprotect")])


def test_without_nested_caches_every_ept_walk_reads_memory() -> None:
    stream = lambda base: strided(base, 2048, 200, stride_pages=128)  # noqa: E731
    cached, uncached = compare(stream, 2048, [EPT, Configuration("no", nested_caches=False)])
    vcpu = Configuration("no", nested_caches=False).processor(4, BASE)
    assert not vcpu.caches.guest_physical.enabled
    assert not any(psc.enabled for psc in vcpu.caches.ept_psc.values())
    assert cached.references["guest"] == uncached.references["guest"]
    assert uncached.references["ept"] > cached.references["ept"]
