"""The walk stepper's model: one 2D walk, reference by reference, in hardware order.

Each step is one `Reference` of the trace's last attempt (`Trace.memory_references`), so the
order is the hardware's: for each guest level, the EPT walk of the guest table's GPA and then
the guest entry itself, then the EPT walk of the final GPA (SDM Vol 3C 29.3.2).
"""

from __future__ import annotations

from collections.abc import Hashable

from matplotlib.figure import Figure

from twodwalk.engine.machine import Machine
from twodwalk.engine.processor import AccessResult
from twodwalk.engine.trace import Reference
from twodwalk.views.graph import plot_walk_graph
from twodwalk.views.plots import plot_walk_grid, walk_grid
from twodwalk.views.text import describe_entry
from twodwalk.widgets.common import default_access


def full_walk(machine: Machine, gva: int | None = None) -> AccessResult:
    """A read made, every translation cache flushed, and the read made again, as the README's
    first VM example does: the second is a cold walk (the EPT entries in place, nothing
    cached), so every reference of both dimensions is there to step through, without a first
    touch's VM exits. The default
    GVA is the start of the guest's first mapping."""
    if gva is None:
        gva = default_access(machine, None).gva
    machine.vcpu.access(gva, "read")
    machine.vcpu.flush_tlb()
    return machine.vcpu.access(gva, "read")


class StepperModel:
    """Which reference of the walk is current (1..count; 0 when the walk made none)."""

    def __init__(self, source: AccessResult | Machine, gva: int | None = None) -> None:
        self.result = full_walk(source, gva) if isinstance(source, Machine) else source
        self.references: list[Reference] = self.result.trace.memory_references()
        self.position = 1 if self.references else 0

    @property
    def count(self) -> int:
        return len(self.references)

    def next(self) -> None:
        self.position = min(self.position + 1, self.count)

    def previous(self) -> None:
        self.position = max(self.position - 1, min(1, self.count))

    def reset(self) -> None:
        self.position = min(1, self.count)

    @property
    def reference(self) -> Reference | None:
        return self.references[self.position - 1] if self.position else None

    @property
    def label(self) -> str:
        if not self.count:
            return "no memory reference to step through: the TLB held the translation"
        return f"step {self.position} of {self.count}"

    @property
    def entry_text(self) -> str:
        """The current entry as a hand calculation: which table, which index, where it was
        read, and every field of the value read (before the walk set A/D bits)."""
        ref = self.reference
        if ref is None:
            return ""
        step = ref.step
        # A guest table lives at a GPA (translated through EPT first); EPT, shadow and host
        # tables live at HPAs.
        space = "GPA" if ref.dimension == "guest" else "HPA"
        lines = [
            f"reference {ref.number}: {role(ref)}",
            f"  table at {space} {step.table:#x}, index {step.index:#05x} ({step.index}),"
            f" entry read at HPA {ref.address:#x}",
            describe_entry(step.entry),
        ]
        if step.written is not None:
            lines.append(f"  the walk then wrote {step.written:#018x} (accessed/dirty bits)")
        return "\n".join(lines)

    def grid_figure(self) -> Figure:
        return plot_walk_grid(self.result.trace, highlight=self.position or None)

    def grid_key(self) -> Hashable:
        """What the grid figure shows (it is drawn from the grid and the highlight)."""
        return ("walk grid", walk_grid(self.result.trace), self.position)

    def graph_figure(self) -> Figure:
        return plot_walk_graph(self.result, highlight=self.position or None)


def role(ref: Reference) -> str:
    """What a reference reads, in the words of SDM Vol 3C 29.3.2: a guest entry, or an EPT
    entry translating a guest table's GPA or the final GPA."""
    name = ref.step.format.level_name(ref.step.level)
    if ref.dimension == "ept":
        table = f"the GPA of the guest level-{ref.guest_level} table"
        served = "the final GPA" if ref.guest_level is None else table
        return f"{name} (EPT level {ref.ept_level}), translating {served}"
    return f"{name} ({ref.dimension} level {ref.guest_level})"
