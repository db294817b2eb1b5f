"""The address explorer's model: one access as the user sets it up, and what the engine did.

The explorer asks the vCPU for the access and shows the trace it returns: the walk grid, the
QEMU-monitor lines and the Bochs-style reference dump. A scenario's machine first makes the
scenario's own accesses, so that the EPT entries are in place: the explorer's walk is a cold
walk (every translation cache flushed first) that shows every reference, not a first touch's VM
exits. Switching EPT off builds the scenario again with `tdp=False`; both machines are kept, so
switching back finds the same one.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, replace

from matplotlib.figure import Figure

from twodwalk.engine.machine import Machine
from twodwalk.engine.processor import AccessResult
from twodwalk.engine.trace import GuestWalk, NativeWalk
from twodwalk.engine.units import PAGE_SIZE
from twodwalk.engine.walker import FaultKind
from twodwalk.errors import TwodwalkError, parse_int
from twodwalk.views.plots import plot_walk_grid, walk_grid
from twodwalk.views.text import explain, format_2d_walk, format_exits, format_outcome, monitor
from twodwalk.widgets.common import Source, default_access, mapped_regions, resolve

KINDS = ("read", "write", "fetch")
CPLS = (0, 3)


@dataclass(frozen=True)
class ExplorerRequest:
    """The controls as typed: the GVA and the value are text, read as `parse_int` reads them
    (hex with or without 0x, decimal with 0d)."""

    gva: str
    kind: str = "read"
    cpl: int = 3
    value: str = ""
    tdp: bool = True
    flush_tlb: bool = True


class ExplorerModel:
    """The explorer's state: the machines, the request, the last result or the error."""

    def __init__(self, source: Source = None) -> None:
        machine, self.scenario = resolve(source)
        if self.scenario is not None:
            self.scenario.run(machine)
        self.tdp = machine.vm.tdp
        self._machines = {self.tdp: machine}
        self.regions = mapped_regions(machine, self.scenario)
        start = default_access(machine, self.scenario)
        value = f"{start.gva:#x}" if start.kind == "write" else ""  # as GuestAccess.perform
        self.request = ExplorerRequest(f"{start.gva:#x}", start.kind, start.cpl, value, self.tdp)
        self.gva: int | None = None  # the GVA last read from the request
        self.result: AccessResult | None = None
        self.error = ""

    @property
    def machine(self) -> Machine:
        """The machine the explorer walks now (EPT or shadow paging)."""
        return self._machines[self.tdp]

    def run(self, request: ExplorerRequest) -> AccessResult | None:
        """Make the access; bad input becomes `error` (one sentence), never a traceback."""
        self.request = request
        self.gva = self.result = None
        try:
            self.result = self._access(request)
        except TwodwalkError as e:
            self.error = str(e)
        else:
            self.error = refusal(self.result)
        return self.result

    def _access(self, request: ExplorerRequest) -> AccessResult:
        gva = self.gva = parse_int(request.gva, "gva")
        value = None
        if request.kind == "write":
            if not request.value.strip():
                raise TwodwalkError("a write needs a value: type one, e.g. 0x2a (or 0d42)")
            value = parse_int(request.value, "value")
        vcpu = self._switch(request.tdp).vcpu
        vcpu.cpl = request.cpl
        if request.flush_tlb:
            vcpu.flush_tlb()
        return vcpu.access(gva, request.kind, value)

    def _switch(self, tdp: bool) -> Machine:
        """The machine for EPT on or off, built from the scenario the first time."""
        if tdp not in self._machines:
            if self.scenario is None:
                raise TwodwalkError(
                    "switching EPT on or off builds the machine again from its scenario:"
                    " give the explorer a scenario (e.g. 'qemu') instead of a Machine"
                )
            variant = replace(self.scenario, tdp=tdp)
            self._machines[tdp] = variant.build()
            variant.run(self._machines[tdp])
        self.tdp = tdp
        return self.machine

    def locate(self, gva: int) -> tuple[int, int] | None:
        """(region index, page index in it) of a GVA in a mapped region, or None."""
        for i, region in enumerate(self.regions):
            if region.contains(gva):
                return i, (gva - region.start) // PAGE_SIZE
        return None

    def page_gva(self, region: int, page: int, offset: int) -> int:
        """The GVA of a page of a region, keeping the offset in the page."""
        return self.regions[region].start + page * PAGE_SIZE + offset % PAGE_SIZE

    @property
    def summary(self) -> str:
        """The access and how it ended, in two lines, shown above the explorer's tabs."""
        return "\n".join(self.text.splitlines()[:2])

    @property
    def text(self) -> str:
        """What the access did, as the QEMU monitor and a Bochs-style dump would show it, and
        why it ended so (`explain`)."""
        result = self.result
        if result is None:
            return ""
        request = self.request
        paging = "EPT" if self.tdp else "shadow paging (EPT off)"
        walk = format_2d_walk(result.trace) or "no memory reference: the TLB held the translation"
        return "\n".join(
            [
                f"{request.kind} of {self.gva:#x} at CPL {request.cpl}, {paging}",
                f"outcome: {format_outcome(result)}",
                monitor(result),
                format_exits(result.trace),
                "",
                "why:",
                explain(result),
                "",
                "hardware references of the last attempt:",
                walk,
            ]
        )

    def figure(self) -> Figure:
        """The walk grid of the last attempt (once an access has run)."""
        if self.result is None:
            raise TwodwalkError("no access has run yet: there is no walk to draw")
        return plot_walk_grid(self.result.trace)

    def figure_key(self) -> Hashable:
        """What the figure shows: equal keys draw the same grid (it is drawn from this)."""
        return None if self.result is None else ("walk grid", walk_grid(self.result.trace))


def refusal(result: AccessResult) -> str:
    """Why the CPU refused the address before walking, in the engine's words: a
    non-canonical GVA raises #GP(0), not #PF (SDM Vol 3A 3.3.7.1)."""
    for event in result.trace:
        if isinstance(event, GuestWalk | NativeWalk):
            fault = event.record.fault
            if fault is not None and fault.kind is FaultKind.NON_CANONICAL:
                return f"{fault.detail}; the CPU raises #GP(0) without walking"
    return ""
