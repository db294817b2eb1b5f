"""The what-if lab's model: change something under a running guest, make the same access
again, and compare what the engine recorded before and after.

Each what-if is one call a real system makes: the host kernel reclaiming, migrating, merging
or (un)splitting the page behind guest RAM (mm/vmscan.c, mm/migrate.c, mm/ksm.c,
mm/huge_memory.c, mm/khugepaged.c), the VMM changing a memslot (KVM_SET_USER_MEMORY_REGION),
or the guest editing its own page table with or without INVLPG. The lab never says what
*should* happen: the before/after table is read from the two traces.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace

from twodwalk.cpumodel import PAGE_SHIFT, PAGE_SIZE
from twodwalk.errors import TwodwalkError, check_choice
from twodwalk.kvm.memslots import KVM_MEM_LOG_DIRTY_PAGES, Memslot
from twodwalk.processor import AccessResult
from twodwalk.scenarios import GuestAccess, Scenario
from twodwalk.trace import HostPageFault, KvmStep, SpteWrite, TlbHit
from twodwalk.views.text import format_exits, format_outcome, format_trace, size_text
from twodwalk.widgets.common import Source, default_access, resolve

MOVED_SLOT_ALIGN = 1 << 30  # a moved memslot starts on a GiB boundary above every other slot


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
    makes the what-if `WHAT_IFS[key]` and then the access again."""

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
        self._twin: int | None = None  # the VMM's page that KSM merges with guest RAM
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
        self._edited_pte = self._twin = None

    def _scenario(self) -> Scenario:
        if self.scenario is None:
            raise TwodwalkError(
                "this needs the machine built again from its scenario: give the lab a"
                " scenario (e.g. 'qemu') instead of a Machine"
            )
        return self.scenario

    def changes(self) -> list[Change]:
        """The before/after table (before is empty until a what-if or re-run)."""
        after = summarise(self.result)
        before = summarise(self.before) if self.before is not None else dict.fromkeys(after, "")
        return [Change(field, before[field], after[field]) for field in after]

    @property
    def trace_text(self) -> str:
        return format_trace(self.result.trace)

    # --- what the what-ifs change -----------------------------------------------------------

    def _page(self) -> tuple[int, int]:
        """(GPA, HVA) of the 4 KiB page the access reached, through the memslot."""
        gpa = self.result.gpa
        if gpa is None:
            raise TwodwalkError(
                "the access reached no guest-physical page (it faulted or exited): Reset, or"
                " pick a GVA the guest maps"
            )
        hva = self.machine.vm.gpa_to_hva(gpa)
        if hva is None:
            raise TwodwalkError(f"GPA {gpa:#x} is in no memslot: no VMM page is behind it")
        return gpa & ~(PAGE_SIZE - 1), hva & ~(PAGE_SIZE - 1)

    def _memslot(self) -> Memslot:
        gpa, _ = self._page()
        memslot = self.machine.vm.memslots.gfn_to_memslot(gpa >> PAGE_SHIFT)
        assert memslot is not None  # _page found its HVA through this slot
        return memslot

    def _set_region(self, memslot: Memslot, flags: int, gpa: int, size: int) -> None:
        """KVM_SET_USER_MEMORY_REGION on the same slot number and userspace address."""
        self.machine.vm.set_user_memory_region(
            memslot.as_id << 16 | memslot.id, flags, gpa, size, memslot.userspace_addr
        )

    def swap_out(self) -> str:
        _, hva = self._page()
        offset = self.machine.host.swap_out(self.machine.vmm, hva)
        return f"the host wrote HVA {hva:#x} to swap offset {offset:#x} and freed its frame"

    def migrate(self) -> str:
        _, hva = self._page()
        new = self.machine.host.migrate(self.machine.vmm, hva)
        return f"the host moved HVA {hva:#x} to a new frame at HPA {new:#x}"

    def ksm_merge(self) -> str:
        gpa, hva = self._page()
        twin = self._twin_copy(gpa)
        frame = self.machine.host.ksm_merge(self.machine.vmm, hva, twin)
        return (
            f"the VMM held a copy of the page at HVA {twin:#x}; KSM merged both into one"
            f" read-only frame at HPA {frame:#x}, so a write breaks copy-on-write"
        )

    def _twin_copy(self, gpa: int) -> int:
        """A private VMM page with the same bytes as guest page `gpa` (as a second guest
        with the same page would have), written as the VMM writes its memory."""
        machine = self.machine
        if self._twin is None:
            self._twin = machine.vmm.mmap(PAGE_SIZE, name="KSM twin")
        page = machine.host.get_user_page(machine.vmm, self._twin, write=True)
        assert page is not None  # the twin's VMA exists: the host faults it in
        machine.memory.write(page.hpa, machine.read_gpa(gpa, PAGE_SIZE))
        return self._twin

    def split_thp(self) -> str:
        _, hva = self._page()
        self.machine.host.split_thp(self.machine.vmm, hva)
        return f"the host split the 2 MiB THP holding HVA {hva:#x} into 512 4 KiB PTEs"

    def collapse_thp(self) -> str:
        _, hva = self._page()
        new = self.machine.host.collapse_thp(self.machine.vmm, hva)
        return f"khugepaged copied the 512 pages around HVA {hva:#x} into a THP at HPA {new:#x}"

    def move_memslot(self) -> str:
        memslot = self._memslot()
        slots = self.machine.vm.memslots.slots.values()
        top = max(s.guest_phys_addr + s.memory_size for s in slots)
        new = -(-top // MOVED_SLOT_ALIGN) * MOVED_SLOT_ALIGN
        self._set_region(memslot, memslot.flags, new, memslot.memory_size)
        return (
            f"the VMM moved memslot {memslot.id} from GPA {memslot.guest_phys_addr:#x} to"
            f" {new:#x}; its old GPAs are now in no memslot"
        )

    def delete_memslot(self) -> str:
        memslot = self._memslot()
        self._set_region(memslot, memslot.flags, memslot.guest_phys_addr, 0)
        return f"the VMM deleted memslot {memslot.id} (memory_size 0)"

    def dirty_logging(self) -> str:
        memslot = self._memslot()
        if memslot.dirty_logging:
            raise TwodwalkError(f"memslot {memslot.id} already logs dirty pages")
        flags = memslot.flags | KVM_MEM_LOG_DIRTY_PAGES
        self._set_region(memslot, flags, memslot.guest_phys_addr, memslot.memory_size)
        return f"the VMM set KVM_MEM_LOG_DIRTY_PAGES on memslot {memslot.id}"

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
class WhatIf:
    """One button of the lab: its label, why it matters (with a source), what it does."""

    label: str
    why: str
    apply: Callable[[WhatIfModel], str]


WHAT_IFS: dict[str, WhatIf] = {
    "swap_out": WhatIf(
        "swap out the page",
        "Reclaim writes the page to swap and unmaps it; KVM's MMU notifier zaps its entry"
        " first (mm/vmscan.c shrink_folio_list, kvm_mmu_notifier_invalidate_range_start).",
        WhatIfModel.swap_out,
    ),
    "migrate": WhatIf(
        "migrate the page",
        "Compaction or NUMA balancing copies the page to another frame (mm/migrate.c"
        " migrate_pages); EPT must follow the new frame.",
        WhatIfModel.migrate,
    ),
    "ksm_merge": WhatIf(
        "KSM merge",
        "KSM merges identical pages into one write-protected frame (mm/ksm.c"
        " try_to_merge_one_page); a later write breaks copy-on-write.",
        WhatIfModel.ksm_merge,
    ),
    "split_thp": WhatIf(
        "split the THP",
        "The host replaces a 2 MiB PMD by 512 PTEs (mm/huge_memory.c __split_huge_pmd);"
        " KVM can then map only 4 KiB there (kvm_mmu_hugepage_adjust).",
        WhatIfModel.split_thp,
    ),
    "collapse_thp": WhatIf(
        "collapse into a THP",
        "khugepaged copies 512 small pages into one 2 MiB page (mm/khugepaged.c"
        " collapse_huge_page), so KVM may map it with one 2 MiB EPT entry.",
        WhatIfModel.collapse_thp,
    ),
    "move_memslot": WhatIf(
        "move the memslot",
        "KVM_SET_USER_MEMORY_REGION with a new guest_phys_addr (KVM_MR_MOVE): KVM zaps the"
        " slot's mappings (kvm_arch_flush_shadow_memslot); the old GPAs become MMIO.",
        WhatIfModel.move_memslot,
    ),
    "delete_memslot": WhatIf(
        "delete the memslot",
        "KVM_SET_USER_MEMORY_REGION with memory_size 0 (KVM_MR_DELETE): the GPAs become MMIO.",
        WhatIfModel.delete_memslot,
    ),
    "dirty_logging": WhatIf(
        "dirty logging on",
        "KVM_MEM_LOG_DIRTY_PAGES, as live migration sets it: KVM write-protects the slot and"
        " maps it with 4 KiB entries (kvm_mmu_slot_apply_flags) to log each first write.",
        WhatIfModel.dirty_logging,
    ),
    "switch_paging": WhatIf(
        "switch EPT / shadow",
        "kvm_intel.ept=0: KVM builds shadow tables GVA -> HPA instead of EPT, and the guest's"
        " page faults exit to KVM (arch/x86/kvm/mmu/paging_tmpl.h).",
        WhatIfModel.switch_paging,
    ),
    "edit_pte": WhatIf(
        "guest PTE: toggle P, no INVLPG",
        "The TLB may keep using a translation after its entry changes until the guest"
        " invalidates it (SDM Vol 3A 4.10.4).",
        WhatIfModel.edit_pte,
    ),
    "invlpg": WhatIf(
        "guest: INVLPG",
        "INVLPG drops the page's TLB entries and the paging-structure caches"
        " (SDM Vol 3A 4.10.4.1).",
        WhatIfModel.invlpg,
    ),
}
