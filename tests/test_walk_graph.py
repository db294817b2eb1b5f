"""The walk graph: its nodes and edges as data, then the artists that draw it."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from matplotlib.colors import to_hex
from matplotlib.patches import FancyArrowPatch
from support import mapped_machine

import twodwalk as tw
from twodwalk.views.graph import plot_walk_graph, walk_graph
from twodwalk.views.plots import DIMENSION_STYLES

MIB = 1 << 20
GVA = 0x40_0008
SPACES = {"GVA", "GPA", "HVA", "HPA"}
SOFTWARE = {"memslot", "host", "kvm-walk"}


def machine(**options: Any) -> tw.Machine:
    return mapped_machine(
        GVA & ~0xFFF, 0x20_0000, 0x1000, guest_ram=32 * MIB, maxphyaddr=48, gbpages=False, **options
    )


def cold(m: tw.Machine) -> tw.AccessResult:
    """The first access with the caches off: EPT violations, then a full walk."""
    m.vcpu.caches.off()
    return m.vcpu.access(GVA, "write", 7)


def edges_of(graph: Any, *dimensions: str) -> list[dict[str, Any]]:
    return [d for _, _, d in graph.edges(data=True) if d["dimension"] in dimensions]


def test_cold_walk_has_an_edge_per_reference_in_hardware_order() -> None:
    result = cold(machine())
    graph = walk_graph(result)
    hardware = edges_of(graph, "guest", "ept")
    assert sorted(d["order"] for d in hardware) == list(range(1, 25))
    assert Counter(d["dimension"] for d in hardware) == {"ept": 20, "guest": 4}
    references = result.trace.memory_references()
    values = {d["order"]: d["value"] for d in hardware}
    assert values == {ref.number: ref.value for ref in references}
    for d in hardware:
        assert d["label"] == f"{d['order']}: {d['value']:#x}"


def test_reference_edges_run_from_the_table_that_holds_the_entry() -> None:
    graph = walk_graph(cold(machine()))
    kinds = {"guest": "guest table", "ept": "EPT table"}
    for source, _, d in graph.edges(data=True):
        if d["dimension"] in kinds:
            assert graph.nodes[source]["kind"] == kinds[d["dimension"]]
    frames = [n for n, d in graph.nodes(data=True) if d["kind"] == "frame"]
    assert len(frames) == 4, "one host frame per guest table, reached by its EPT walk"
    ept_tables = [n for n, d in graph.nodes(data=True) if d["kind"] == "EPT table"]
    assert len(ept_tables) == 20, "each EPT walk has its own copy of the tables it reads"


def test_ept_violation_adds_kvms_software_path() -> None:
    result = cold(machine())
    graph = walk_graph(result)
    memslot = [(u, v) for u, v, d in graph.edges(data=True) if d["dimension"] == "memslot"]
    assert len(memslot) == 5, "one memslot lookup per EPT violation: four tables and the data"
    assert all(graph.nodes[v]["space"] == "HVA" for _, v in memslot)
    host = edges_of(graph, "host")
    assert host and all(d["order"] is None for d in host)
    assert {graph.nodes[n]["kind"] for n in graph} >= {"host table", "fault", "frame"}
    assert result.hpa is not None
    data = f"HPA {result.hpa & ~0xFFF:#x}"
    assert data in graph
    reach = Counter(graph.edges[u, data]["dimension"] for u in graph.predecessors(data))
    assert reach == {"ept": 1, "host": 1}, "EPT and the host tables both lead to the data"


def test_warm_walk_has_no_software_path() -> None:
    m = machine()
    cold(m)
    graph = walk_graph(m.vcpu.access(GVA, "read"))
    assert len(edges_of(graph, "guest", "ept")) == 24
    assert edges_of(graph, *SOFTWARE) == []


def test_nodes_carry_space_kind_and_a_deterministic_layout() -> None:
    first = walk_graph(cold(machine()))
    second = walk_graph(cold(machine()))
    assert list(first.nodes(data=True)) == list(second.nodes(data=True))
    assert list(first.edges(data=True)) == list(second.edges(data=True))
    for _, d in first.nodes(data=True):
        assert d["space"] in SPACES and d["kind"] and d["label"]
        assert len(d["pos"]) == 2
    positions = [d["pos"] for _, d in first.nodes(data=True)]
    assert len(set(positions)) == len(positions), "no two nodes on top of each other"


def test_cached_translations_are_links_not_references() -> None:
    m = machine()
    m.vcpu.access(GVA, "read")
    m.vcpu.invlpg(GVA)
    graph = walk_graph(m.vcpu.access(GVA, "read"))
    assert len(edges_of(graph, "guest")) == 4 and edges_of(graph, "ept") == []
    links = Counter(d["label"] for d in edges_of(graph, "link"))
    assert links["GPM"] == 5, "four guest tables and the data GPA from guest-physical mappings"


def test_faults_end_at_fault_nodes_in_their_space() -> None:
    m = machine()
    m.guest.map(0x80_0000, 0x4000_0000, 0x1000, rw=1, us=1)  # a GPA beyond guest RAM
    m.vcpu.caches.off()
    mmio = walk_graph(m.vcpu.access(0x80_0008, "read"))
    (ept_fault,) = [d for _, d in mmio.nodes(data=True) if d["kind"] == "fault"]
    assert (ept_fault["space"], ept_fault["label"]) == ("HPA", "stop: not present")
    unmapped = walk_graph(m.vcpu.access(0xA0_0008, "read"))  # no guest PDE: #PF
    (guest_fault,) = [d for _, d in unmapped.nodes(data=True) if d["kind"] == "fault"]
    assert guest_fault["space"] == "GPA"
    assert not edges_of(unmapped, "memslot"), "a guest #PF never reaches KVM under EPT"


def test_shadow_paging_graph_is_one_dimensional_plus_kvms_walk() -> None:
    m = machine(tdp=False)
    graph = walk_graph(m.vcpu.access(GVA, "read"))
    assert sorted(d["order"] for d in edges_of(graph, "native")) == [1, 2, 3, 4]
    assert edges_of(graph, "guest", "ept") == []
    assert len(edges_of(graph, "kvm-walk")) == 4, "KVM read the guest's four entries"
    assert len(edges_of(graph, "memslot")) == 1


def test_tlb_hit_graph_links_gva_to_hpa() -> None:
    m = machine()
    first = m.vcpu.access(GVA, "read")
    graph = walk_graph(m.vcpu.access(GVA, "read"))
    assert [d["label"] for d in edges_of(graph, "link")] == ["TLB"]
    assert {d["space"] for _, d in graph.nodes(data=True)} == {"GVA", "HPA"}
    assert first.hpa is not None and f"HPA {first.hpa & ~0xFFF:#x}" in graph


# --- drawing -----------------------------------------------------------------------------------


def arrows(result: tw.AccessResult, highlight: int | None = None) -> list[FancyArrowPatch]:
    ax = plot_walk_graph(result, highlight=highlight).axes[0]
    return [p for p in ax.patches if isinstance(p, FancyArrowPatch)]


def test_plot_distinguishes_dimensions_by_colour_and_line_style() -> None:
    result = cold(machine())
    figure = plot_walk_graph(result)
    ax = figure.axes[0]
    drawn = [p for p in ax.patches if isinstance(p, FancyArrowPatch)]
    assert len(drawn) == walk_graph(result).number_of_edges()
    styles = Counter((to_hex(p.get_edgecolor()), str(p.get_linestyle())) for p in drawn)
    expected = {
        name: (style.colour.lower(), str(style.linestyle))
        for name, style in DIMENSION_STYLES.items()
        if name in ("guest", "ept", "memslot", "host", "link")
    }
    assert styles[expected["ept"]] == 20 and styles[expected["guest"]] == 4
    assert set(expected.values()) <= set(styles)
    legend = ax.get_legend()
    assert legend is not None
    labels = [t.get_text() for t in legend.get_texts()]
    for name in ("guest", "ept", "memslot", "host"):
        assert DIMENSION_STYLES[name].label in labels
    texts = {t.get_text().strip() for t in ax.texts}
    # A guest reference shows its number and entry; an EPT reference, in its narrow column,
    # its number; the value is in the grid and the dumps.
    assert "5: 0x" in " ".join(texts) and "1" in texts and "1: 0x" not in " ".join(texts)
    assert "memslot" in texts and "EPTP" in texts
    assert all(float(t.get_fontsize()) >= 10 for t in ax.texts)


def test_plot_highlights_one_reference() -> None:
    result = cold(machine())
    widths = Counter(p.get_linewidth() for p in arrows(result, highlight=7))
    assert widths[6.0] == 1
    texts = plot_walk_graph(result, highlight=7).axes[0].texts
    bold = [t.get_text() for t in texts if t.get_fontweight() == "bold"]
    assert bold == [" 7"], "the current step's label stands out (an EPT reference: its number)"
    with pytest.raises(tw.TwodwalkError, match="highlight"):
        plot_walk_graph(result, highlight=25)
