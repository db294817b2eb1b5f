"""Every public figure, drawn for the situations a learner meets (a first touch, a cold walk,
a warm access, shadow paging, 5-level paging, large pages, an MMIO access, a fault), is
checked as a projector would show it: no two texts overlap, none runs outside the figure,
and a label written in a box fits the box (tests/figure_checks.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest
from figure_checks import text_problems
from matplotlib.figure import Figure

import twodwalk as tw
from twodwalk.scenarios import SCENARIOS, TOY5_GVA, TOY_GVA, scenario
from twodwalk.views.graph import plot_walk_graph
from twodwalk.views.plots import (
    plot_address_fields,
    plot_address_map,
    plot_hit_rates,
    plot_nested_trees,
    plot_references,
    plot_timeline,
    plot_two_trees,
    plot_walk_grid,
)
from twodwalk.workloads import CONFIGURATIONS, compare, uniform

BAR_GVA = 0xFFFF_C900_0000_0010


Made = Callable[[], tuple[tw.Machine, tw.AccessResult]]


def first_touch() -> tuple[tw.Machine, tw.AccessResult]:
    m = replace(SCENARIOS["toy"], accesses=()).build()
    return m, m.vcpu.access(TOY_GVA + 0x1008, "write", 1)


def cold(
    name: str, gva: int, kind: str = "read"
) -> Callable[[], tuple[tw.Machine, tw.AccessResult]]:
    def made() -> tuple[tw.Machine, tw.AccessResult]:
        sc = scenario(name)
        m = sc.build()
        sc.run(m)
        m.vcpu.flush_tlb()
        return m, m.vcpu.access(gva, kind, 1 if kind == "write" else None)

    return made


def warm() -> tuple[tw.Machine, tw.AccessResult]:
    m, _ = cold("toy", TOY_GVA)()
    return m, m.vcpu.access(TOY_GVA, "read")


def fault() -> tuple[tw.Machine, tw.AccessResult]:
    m, _ = cold("toy", TOY_GVA)()
    m.vcpu.cpl = 3
    return m, m.vcpu.access(TOY_GVA + 8, "write", 1)


def random_first(name: str) -> tuple[tw.Machine, tw.AccessResult]:
    """A seeded random scenario's machine, and its first access made as a first touch."""
    sc = scenario(name)
    m = sc.build()
    first = sc.accesses[0]
    m.vcpu.cpl = first.cpl
    return m, m.vcpu.access(first.gva, first.kind, 1 if first.kind == "write" else None)


SITUATIONS: dict[str, Made] = {
    "first touch": first_touch,
    "cold walk": cold("toy", TOY_GVA),
    "warm": warm,
    "shadow paging": cold("toy-shadow", TOY_GVA),
    "5-level": cold("toy-5level", TOY5_GVA),
    "large pages": cold("large-pages", 0x4000_0000),
    "qemu heap": cold("qemu", 0x5555_5555_9008, "write"),
    "MMIO": cold("qemu", BAR_GVA, "write"),
    "fault": fault,
    "random-3": lambda: random_first("random-3"),
    "random-11": lambda: random_first("random-11"),
}
ACCESS_PLOTS: dict[str, Callable[[tw.Machine, tw.AccessResult], Figure]] = {
    "walk grid": lambda m, r: plot_walk_grid(r.trace),
    "walk graph": lambda m, r: plot_walk_graph(r),
    "address map": lambda m, r: plot_address_map(m, r),
    "timeline": lambda m, r: plot_timeline(r),
}
TWO_TREES = ("first touch", "cold walk", "large pages", "qemu heap", "5-level")


@pytest.mark.parametrize("situation", SITUATIONS)
@pytest.mark.parametrize("plot", ACCESS_PLOTS)
def test_no_text_collides(plot: str, situation: str) -> None:
    machine, result = SITUATIONS[situation]()
    assert text_problems(ACCESS_PLOTS[plot](machine, result)) == []


@pytest.mark.parametrize(
    ("address", "levels", "page_size"),
    [(TOY_GVA + 0x1008, 4, 4096), (0x4020_1238, 4, 2 << 20), (TOY5_GVA, 5, 4096)],
)
def test_no_text_collides_in_the_address_fields(address: int, levels: int, page_size: int) -> None:
    assert text_problems(plot_address_fields(address, levels=levels, page_size=page_size)) == []


@pytest.mark.parametrize("situation", TWO_TREES)
def test_no_text_collides_in_the_two_trees(situation: str) -> None:
    machine, result = SITUATIONS[situation]()
    assert text_problems(plot_two_trees(machine, result)) == []


def test_no_text_collides_in_the_cost_charts() -> None:
    pages = 2048  # more than the STLB holds: every configuration misses, shadow paging exits
    results = compare(lambda base: uniform(base, pages, 1500, seed=1), pages, CONFIGURATIONS)
    assert text_problems(plot_references(results)) == []
    assert text_problems(plot_hit_rates(results)) == []


def test_nested_trees_figure_text() -> None:
    n = tw.NestedMachine()
    n.l2.map(0x40_0000, 0x20_0000, 4096, rw=1, us=1)
    result = n.l2_vcpu.access(0x40_0008, "write", 1)
    assert text_problems(plot_nested_trees(n, result)) == []
