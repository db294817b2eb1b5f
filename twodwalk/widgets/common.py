"""What the widget models share: where their machine comes from, and which access to start on.

The models here are plain Python (no ipywidgets): they hold state, drive the engine through
its public calls, and turn what it recorded into text and figures. `ui.py` only wires controls
to them, so every callback can be tested without a browser, as in the jupyter-widgets
tutorial's model/view split.
"""

from __future__ import annotations

from twodwalk.engine.machine import Machine
from twodwalk.errors import TwodwalkError
from twodwalk.scenarios import GuestAccess, Scenario, scenario
from twodwalk.views.readouts import Region, guest_mappings

DEFAULT_SCENARIO = "qemu"
Source = Machine | Scenario | str | None
"""A machine to explore, a scenario to build one from, a scenario's name, or None (qemu)."""


def resolve(source: Source) -> tuple[Machine, Scenario | None]:
    """The machine to drive and the scenario it was built from (None for a given Machine,
    which cannot be rebuilt, e.g. with EPT off)."""
    if source is None:
        source = DEFAULT_SCENARIO
    if isinstance(source, str):
        source = scenario(source)
    if isinstance(source, Scenario):
        return source.build(), source
    if isinstance(source, Machine):
        return source, None
    raise TwodwalkError(
        f"expected a Machine, a Scenario or a scenario name such as 'qemu', got {source!r}"
    )


def mapped_regions(machine: Machine, source: Scenario | None) -> list[Region]:
    """The guest's mapped GVA ranges, named as the scenario names them, or read from the
    guest's page tables for a bare machine."""
    if source is not None:
        return [Region(m.gva, m.gva + m.size, m.name) for m in source.mappings]
    return guest_mappings(machine)


def default_access(machine: Machine, source: Scenario | None) -> GuestAccess:
    """The access a helper starts on: the scenario's first write (it shows the most: dirty
    bits, copy-on-write), else its first access, else a kernel read of the first mapping."""
    accesses = () if source is None else source.accesses
    preferred = [a for a in accesses if a.kind == "write"] + list(accesses)
    if preferred:
        return preferred[0]
    regions = guest_mappings(machine)
    if not regions:
        raise TwodwalkError("the guest maps nothing yet: map a page (machine.guest.map) first")
    return GuestAccess(regions[0].start, "read", 0)
