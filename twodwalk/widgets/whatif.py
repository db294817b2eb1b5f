"""The what-if lab's model: change something under a running guest, make the same access
again, and compare what the engine recorded before and after.

The what-ifs come from the shared registry (twodwalk.whatifs): one call a real system makes,
by the host kernel, the VMM or the guest. The lab adds two of its own (switching between EPT
and shadow paging, and a guest PTE edit that a second click undoes). The lab never says what
*should* happen: the before/after table is read from the two traces.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace

from twodwalk.engine.processor import AccessResult
from twodwalk.engine.trace import HostPageFault, KvmStep, SpteWrite, TlbHit
from twodwalk.errors import TwodwalkError, check_choice
from twodwalk.scenarios import GuestAccess, Scenario
from twodwalk.views.text import format_exits, format_outcome, format_trace, size_text
from twodwalk.whatifs import WHAT_IFS as WHAT_IF_REGISTRY
from twodwalk.whatifs import Page, page_of
from twodwalk.widgets.common import Source, default_access, resolve


@dataclass(frozen=True)
class Change:
    """One row of the before/after table."""

    field: str
    before: str
    after: str

    @property
    def changed(self) -> bool:
        """Whether the what-if changed this (never before the first what-if)."""
        return bool(self.before) and self.before != self.after


def summarise(result: AccessResult) -> dict[str, str]:
    """One access in the terms the lab compares, all read from its result and trace."""
    trace = result.trace
    counts = trace.reference_counts()
    steps = Counter(step.function for step in trace.of_type(KvmStep))
    faults = [fault.resolution for fault in trace.of_type(HostPageFault)]
    by_dimension = " + ".join(f"{dimension} {n}" for dimension, n in counts.items())
    return {
        "outcome": format_outcome(result),
        "GPA": _hex(result.gpa),
        "HVA": _hex(result.hva),
        "HPA": _hex(result.hpa),
        "TLB": "hit" if trace.of_type(TlbHit) else "miss",
        "memory references": f"{sum(counts.values())}" + (f" ({by_dimension})" if counts else ""),
        "VM exits": format_exits(trace),
        "host page faults": "; ".join(faults) or "none",
        "KVM steps": ", ".join(f"{f} x{n}" if n > 1 else f for f, n in steps.items()) or "none",
        "KVM entry writes (EPT or shadow)": str(len(trace.of_type(SpteWrite))),
    }


def _hex(value: int | None) -> str:
    return "-" if value is None else f"{value:#x}"


class WhatIfModel:
    """A machine, one guest access, and the last two results of that access. `apply(key)`
    presses the lab's button `WHAT_IFS[key]` and then makes the access again."""

    def __init__(
        self,
        source: Source = None,
        gva: int | None = None,
        *,
        kind: str | None = None,
        cpl: int | None = None,
    ) -> None:
        self.machine, self.scenario = resolve(source)
        start = default_access(self.machine, self.scenario)
        self.access = GuestAccess(
            start.gva if gva is None else gva,
            start.kind if kind is None else kind,
            start.cpl if cpl is None else cpl,
        )
        self.before: AccessResult | None = None
        self.message = ""
        self.error = ""
        self._edited_pte: tuple[int, int] | None = None  # (entry GPA, value before the edit)
        self.result = self._settle()

    def _settle(self) -> AccessResult:
        """The access made twice: the first faults everything in (EPT violations, host
        faults), the second shows the steady state every what-if starts from."""
        self.access.perform(self.machine)
        return self.access.perform(self.machine)

    def apply(self, key: str) -> bool:
        """Make one what-if and the access again; an inapplicable one becomes `error`."""
        what = WHAT_IFS[check_choice("what-if", key, tuple(WHAT_IFS))]
        self.error = ""
        try:
            self.message = what.apply(self)
        except TwodwalkError as e:
            self.error = f"{what.label}: not applicable here: {e}"
            self.message = ""
            return False
        return self._again()

    def rerun(self) -> bool:
        """The same access again, with nothing changed (e.g. to see the TLB warm up)."""
        self.error = ""
        self.message = "nothing changed: the same access, made again"
        return self._again()

    def reset(self) -> None:
        """Build the machine again from the scenario, keeping EPT or shadow paging."""
        self.error = ""
        try:
            self._rebuild(self.machine.vm.tdp)
        except TwodwalkError as e:
            self.error = f"reset: {e}"
            return
        self.before = None
        self.message = "the machine was built again from its scenario"
        self.result = self._settle()

    def _again(self) -> bool:
        try:
            after = self.access.perform(self.machine)
        except TwodwalkError as e:
            self.error = f"the access failed: {e}"
            return False
        self.before, self.result = self.result, after
        return True

    def _rebuild(self, tdp: bool) -> None:
        scenario = self._scenario()
        self.machine = replace(scenario, tdp=tdp).build()
        self._edited_pte = None

    def _scenario(self) -> Scenario:
        if self.scenario is None:
            raise TwodwalkError(
                "this needs the machine built again from its scenario: give the lab a"
                " scenario (e.g. 'qemu') instead of a Machine"
            )
        return self.scenario

    @property
    def changes(self) -> list[Change]:
        """The before/after table (before is empty until a what-if or re-run): read like
        `message`, `result` and `trace_text`, as what the lab shows now."""
        after = summarise(self.result)
        before = summarise(self.before) if self.before is not None else dict.fromkeys(after, "")
        return [Change(field, before[field], after[field]) for field in after]

    @property
    def trace_text(self) -> str:
        return format_trace(self.result.trace)

    # --- what the lab's own buttons do ------------------------------------------------------

    def page(self) -> Page:
        """The page the access reached: what a registry what-if acts on."""
        return page_of(self.machine, self.access.gva, self.result.gpa)

    def switch_paging(self) -> str:
        tdp = not self.machine.vm.tdp
        self._rebuild(tdp)
        paging = "EPT" if tdp else "shadow paging (EPT off)"
        return f"the scenario was built again with {paging}: the access below is its first"

    def edit_pte(self) -> str:
        """Clear P in the guest's leaf entry for the GVA with a guest store, with no INVLPG
        (a second click restores the entry). Under EPT the TLB keeps the old translation
        until INVLPG; with EPT off the store traps and KVM zaps the shadow entry at once
        (`kvm_mmu_pte_write`; the model has no unsync shadow pages)."""
        if self._edited_pte is not None:
            entry, value = self._edited_pte
            self._write_entry(entry, value)
            self._edited_pte = None
            return f"the guest restored its entry at GPA {entry:#x}, again without INVLPG"
        tables = self.machine.guest.page_tables
        found = tables.find_leaf(self.access.gva)
        if found is None:
            raise TwodwalkError(f"the guest maps no page at GVA {self.access.gva:#x}")
        entry, level = found.slot, found.level
        value = int.from_bytes(self.machine.read_gpa(entry, 8), "little")
        self._write_entry(entry, value & ~1)
        self._edited_pte = (entry, value)
        size = size_text(tables.fmt.page_size(level))
        trapped = (
            ""
            if self.machine.vm.tdp
            else "; with EPT off the store trapped and KVM zapped"
            " the shadow entry (kvm_mmu_pte_write), so there is no stale window"
        )
        return (
            f"the guest cleared P in its {tables.fmt.level_name(level)} at GPA {entry:#x}"
            f" ({size} page) and did not run INVLPG{trapped}"
        )

    def _write_entry(self, entry: int, value: int) -> None:
        self.machine.guest_store(entry, value.to_bytes(8, "little"))

    def invlpg(self) -> str:
        self.machine.vcpu.invlpg(self.access.gva)
        return f"the guest ran INVLPG {self.access.gva:#x}"


@dataclass(frozen=True)
class LabButton:
    """One button of the lab: its label, why it matters (with a source), what it does."""

    label: str
    why: str
    apply: Callable[[WhatIfModel], str]


def _registry_button(name: str) -> LabButton:
    """A button for one what-if of the shared registry (twodwalk.whatifs)."""
    what = WHAT_IF_REGISTRY[name]
    return LabButton(
        what.label, what.changes, lambda model: what.apply(model.machine, model.page())
    )


# The registry's what-ifs the lab offers, and the lab's own: rebuilding the scenario with the
# other kind of paging, and a guest PTE edit that a second click undoes.
WHAT_IFS: dict[str, LabButton] = {
    **{
        name: _registry_button(name)
        for name in (
            "swap-out",
            "migrate",
            "ksm-merge",
            "thp-split",
            "thp-collapse",
            "memslot-move",
            "memslot-delete",
            "dirty-logging",
            "race-with-invalidation",
        )
    },
    "switch-paging": LabButton(
        "switch EPT / shadow",
        "kvm_intel.ept=0: KVM builds shadow tables GVA -> HPA instead of EPT, and the guest's"
        " page faults exit to KVM (arch/x86/kvm/mmu/paging_tmpl.h).",
        WhatIfModel.switch_paging,
    ),
    "edit-pte": LabButton(
        "guest PTE: toggle P, no INVLPG",
        "The TLB may keep using a translation after its entry changes until the guest"
        " invalidates it (SDM Vol 3A 4.10.4).",
        WhatIfModel.edit_pte,
    ),
    "invlpg": _registry_button("invlpg"),
}
