"""The workload simulator: seeded streams, and counts checked by hand on small runs."""

from __future__ import annotations

import io
import sys
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import mapped_machine

import twodwalk as tw
from twodwalk.engine.trace import Counts, HostPageFault, TlbHit, VmExit
from twodwalk.views.progress import in_notebook, progress_bar
from twodwalk.workloads import (
    CONFIGURATIONS,
    compare,
    comparison_table,
    pointer_chase,
    run_workload,
    sequential,
    strided,
    uniform,
    zipf,
)

BASE = 0x4000_0000
PAGES = 64


def machine(tdp: bool = True) -> tw.Machine:
    return mapped_machine(BASE, 0x10_0000, PAGES * 4096, guest_ram=8 << 20, user=False, tdp=tdp)


@pytest.mark.parametrize("make", [uniform, zipf, pointer_chase])
def test_streams_are_deterministic_for_a_seed(
    make: Callable[..., Iterator[tuple[int, str]]],
) -> None:
    first = list(make(BASE, PAGES, 200, seed=5))
    assert first == list(make(BASE, PAGES, 200, seed=5))
    assert first != list(make(BASE, PAGES, 200, seed=6))
    assert all(BASE <= gva < BASE + PAGES * 4096 and kind == "read" for gva, kind in first)


def test_pointer_chase_visits_every_page_before_repeating() -> None:
    pages = [gva >> 12 for gva, _ in pointer_chase(BASE, PAGES, PAGES, seed=1)]
    assert len(set(pages)) == PAGES


def test_one_page_many_times_is_one_walk_then_tlb_hits() -> None:
    m = machine()
    for _ in range(2):  # warm EPT and host tables, then count from a cold TLB
        m.vcpu.flush_tlb()
        result = run_workload(m.vcpu, sequential(BASE, 1, 10, step=8))
    assert result.tlb_hits == 9
    assert result.references == {"guest": 4, "ept": 20}
    assert result.exits == {}
    assert result.references_per_access == pytest.approx(2.4)


def test_caches_off_every_warm_access_costs_24() -> None:
    m = machine()
    m.vcpu.caches.off()
    run_workload(m.vcpu, strided(BASE, PAGES, PAGES))
    result = run_workload(m.vcpu, strided(BASE, PAGES, PAGES))
    assert result.references_per_access == 24
    assert result.tlb_hits == 0 and result.cache_hits == {}


def test_shadow_paging_walks_one_dimension() -> None:
    m = machine(tdp=False)
    run_workload(m.vcpu, strided(BASE, PAGES, PAGES))
    m.vcpu.caches.off()
    result = run_workload(m.vcpu, strided(BASE, PAGES, PAGES))
    assert result.references == {"native": 4 * PAGES}


def test_first_touch_counts_exits_and_host_faults() -> None:
    m = machine()
    result = run_workload(m.vcpu, uniform(BASE, PAGES, 50, seed=2, write_fraction=0.5))
    assert result.exits.get("EPT_VIOLATION", 0) > 0
    assert result.host_page_faults > 0
    assert "memory references / access" in result.table()


def test_compare_shows_large_pages_help_only_when_both_dimensions_use_them() -> None:
    configs = [c for c in CONFIGURATIONS if c.name.startswith("EPT 4x4")]
    results = compare(lambda base: pointer_chase(base, 2048, 2500, seed=1), 2048, configs)
    by_name = {r.name: r for r in results}
    small = by_name["EPT 4x4"]
    guest_only = by_name["EPT 4x4, 2 MiB guest pages"]
    both = by_name["EPT 4x4, 2 MiB guest and EPT pages"]
    assert small.tlb_hit_rate == guest_only.tlb_hit_rate, "the combined entry is 4 KiB"
    assert both.tlb_hit_rate == 1.0 and both.references_per_access == 0
    misses = small.accesses - small.tlb_hits
    assert misses > 0
    # Each TLB miss (SDM Vol 3C 29.4.3): the guest PTE, whose table the guest PDE cache
    # names, then the final GPA's EPT PTE, whose EPT table the EPT's PDE cache names; the
    # 8 MiB of data fit in 4 PDE-cache entries of each kind.
    assert small.references == {"guest": misses, "ept": misses}
    table = comparison_table(results)
    assert table.splitlines()[1].startswith("EPT 4x4 ")


def test_shadow_paging_costs_one_dimension_in_steady_state() -> None:
    shadow = [c for c in CONFIGURATIONS if not c.tdp]
    (result,) = compare(lambda base: pointer_chase(base, 2048, 2500, seed=1), 2048, shadow)
    misses = result.accesses - result.tlb_hits
    assert result.references == {"native": misses}, "one PTE read per miss, via the PDE cache"


def test_text_progress_bar() -> None:
    out = io.StringIO()
    m = machine()
    run_workload(m.vcpu, sequential(BASE, 1, 2000, step=8), progress=progress_bar(2000, out))
    text = out.getvalue()
    assert "1,000/2,000" in text and text.endswith("[" + "#" * 40 + "] 2,000/2,000\n")


def test_counts_only_sink_adds_up_what_a_full_trace_shows() -> None:
    traced, counted = machine(), machine()
    counts = Counts()
    totals: dict[str, int] = {}
    exits = 0
    for gva, kind in uniform(BASE, PAGES, 40, seed=3, write_fraction=0.3):
        value = 7 if kind == "write" else None
        full = traced.vcpu.access(gva, kind, value)
        for dimension, n in full.trace.reference_counts().items():
            totals[dimension] = totals.get(dimension, 0) + n
        exits += len(full.trace.of_type(VmExit))
        counted.vcpu.access(gva, kind, value, trace=counts)
    assert counts.events == [], "the sink keeps no events"
    assert counts.references == totals and sum(counts.exits.values()) == exits
    assert counts.exits["EPT_VIOLATION"] > 0 and counts.host_page_faults > 0


def test_a_configuration_can_ask_what_a_smaller_tlb_would_do() -> None:
    small = tw.workloads.Configuration("EPT 4x4, 8-entry TLB", tlb_geometry=((4096, 2, 4),))
    default = CONFIGURATIONS[1]
    results = compare(lambda base: zipf(base, 64, 2000, seed=4), 64, [default, small])
    assert results[0].tlb_hit_rate == 1.0, "64 pages fit the default STLB"
    assert results[1].tlb_hit_rate < 0.9, "but not 8 entries"
    with pytest.raises(tw.TwodwalkError, match="cache geometry"):
        tw.workloads.Configuration("bad", tlb_geometry=((4096, 0, 4),)).processor(4, BASE)


STREAMS = st.lists(
    st.tuples(st.integers(0, 2 * PAGES - 1), st.sampled_from(["read", "write"])),
    min_size=1,
    max_size=60,
)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    stream=STREAMS,
    configuration=st.sampled_from(
        [c for c in CONFIGURATIONS if c.name in ("EPT 4x4", "shadow paging", "AMD NPT 4x4")]
    ),
)
def test_counts_only_and_fully_traced_runs_give_the_same_counts(
    stream: list[tuple[int, str]], configuration: tw.workloads.Configuration
) -> None:
    """The workload simulator's shortcuts (the TLB fast path, the counts-only sink) change
    how fast it runs, never what it counts: the same stream run access by access with full
    traces gives the same references, TLB hits, exits and host faults (issue 21)."""
    accesses = [(BASE + (page % PAGES) * 4096 + (page // PAGES) * 8, kind) for page, kind in stream]
    counted = run_workload(configuration.processor(PAGES, BASE), accesses)
    cpu = configuration.processor(PAGES, BASE)
    totals: dict[str, int] = {}
    exits: dict[str, int] = {}
    hits = host_faults = 0
    for number, (gva, kind) in enumerate(accesses):
        trace = cpu.access(gva, kind, number if kind == "write" else None).trace
        for dimension, n in trace.reference_counts().items():
            totals[dimension] = totals.get(dimension, 0) + n
        for exit_ in trace.of_type(VmExit):
            exits[exit_.name] = exits.get(exit_.name, 0) + 1
        hits += len(trace.of_type(TlbHit))
        host_faults += len(trace.of_type(HostPageFault))
    assert counted.references == totals
    assert counted.exits == exits
    assert (counted.tlb_hits, counted.host_page_faults) == (hits, host_faults)


def test_progress_bars_know_a_jupyterlite_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """JupyterLite's Pyodide kernel runs IPython's own shell class, not ipykernel's ZMQ shell:
    the bar is a widget there too, not text on stderr."""
    shell = type("Interpreter", (), {})()
    fake_ipython = type(sys)("IPython")
    fake_ipython.get_ipython = lambda: shell  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "IPython", fake_ipython)
    monkeypatch.delitem(sys.modules, "pyodide_kernel", raising=False)
    assert not in_notebook(), "a plain IPython terminal gets the text bar"
    monkeypatch.setitem(sys.modules, "pyodide_kernel", type(sys)("pyodide_kernel"))
    assert in_notebook()
