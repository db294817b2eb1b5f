"""What-ifs: one change that a real actor makes under a running guest, made through the calls
that actor makes. The host kernel reclaims, migrates, merges or (un)splits the page behind
guest RAM (mm/vmscan.c, mm/migrate.c, mm/ksm.c, mm/huge_memory.c, mm/khugepaged.c); the VMM
unmaps it or changes its memslot (munmap, KVM_SET_USER_MEMORY_REGION); the guest edits its own
page table or invalidates its TLB. Each what-if is a name, a label, what it changes in the
real system, and a function that makes it happen on a `Machine`. The exercises, the what-if
lab and the notebooks all use this one registry; none of them says what *should* follow: that
is read from the engine's entries and traces afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from twodwalk.engine.kvm.memslots import KVM_MEM_LOG_DIRTY_PAGES, Memslot
from twodwalk.engine.machine import Machine
from twodwalk.engine.units import PAGE_SHIFT, PAGE_SIZE, hex_repr
from twodwalk.errors import TwodwalkError, check_choice

MOVED_SLOT_ALIGN = 1 << 30  # a moved memslot starts on a GiB boundary above every other slot


@hex_repr
@dataclass(frozen=True)
class Page:
    """The guest page a what-if acts on: the GVA the guest used, and the page's GPA and HVA
    (4 KiB aligned), found through the guest's tables and the memslot."""

    gva: int
    gpa: int
    hva: int


def page_of(machine: Machine, gva: int, gpa: int | None) -> Page:
    """The `Page` of an access that reached `gpa` (None: it faulted or exited)."""
    if gpa is None:
        raise TwodwalkError(
            "the access reached no guest-physical page (it faulted or exited): pick a GVA the"
            " guest maps"
        )
    hva = machine.vm.gpa_to_hva(gpa)
    if hva is None:
        raise TwodwalkError(f"GPA {gpa:#x} is in no memslot: no VMM page is behind it")
    return Page(gva, gpa & ~(PAGE_SIZE - 1), hva & ~(PAGE_SIZE - 1))


@dataclass(frozen=True)
class WhatIf:
    """One what-if: its name, a short label, what it changes in the real system (citing the
    code that does it), and the function that makes it happen and says what it did."""

    name: str
    label: str
    changes: str
    apply: Callable[[Machine, Page], str]


def _memslot(machine: Machine, page: Page) -> Memslot:
    memslot = machine.vm.memslots.gfn_to_memslot(page.gpa >> PAGE_SHIFT)
    assert memslot is not None  # page_of found the page's HVA through this slot
    return memslot


def _set_region(machine: Machine, memslot: Memslot, flags: int, gpa: int, size: int) -> None:
    """KVM_SET_USER_MEMORY_REGION on the same slot number and userspace address."""
    machine.vm.set_user_memory_region(memslot.slot, flags, gpa, size, memslot.userspace_addr)


def swap_out(machine: Machine, page: Page) -> str:
    offset = machine.host.swap_out(machine.vmm, page.hva)
    return f"the host wrote HVA {page.hva:#x} to swap offset {offset:#x} and freed its frame"


def swap_out_without_notifiers(machine: Machine, page: Page) -> str:
    machine.host.mmu_notifiers_enabled = False
    return swap_out(machine, page) + ", and told KVM nothing (MMU notifiers off)"


def migrate(machine: Machine, page: Page) -> str:
    new = machine.host.migrate(machine.vmm, page.hva)
    return f"the host moved HVA {page.hva:#x} to a new frame at HPA {new:#x}"


def ksm_merge(machine: Machine, page: Page) -> str:
    """KSM needs an identical page: the VMM holds a private copy of the guest page (as a
    second guest with the same page would), written as the VMM writes its memory."""
    twin = machine.vmm.mmap(PAGE_SIZE, name="KSM twin")
    copy = machine.host.get_user_page(machine.vmm, twin, write=True)
    assert copy is not None  # the twin's VMA exists: the host faults it in
    machine.memory.write(copy.hpa, machine.read_gpa(page.gpa, PAGE_SIZE))
    frame = machine.host.ksm_merge(machine.vmm, page.hva, twin)
    return (
        f"the VMM held a copy of the page at HVA {twin:#x}; KSM merged both into one"
        f" read-only frame at HPA {frame:#x}, so a write breaks copy-on-write"
    )


def split_thp(machine: Machine, page: Page) -> str:
    machine.host.split_thp(machine.vmm, page.hva)
    return f"the host split the 2 MiB THP holding HVA {page.hva:#x} into 512 4 KiB PTEs"


def collapse_thp(machine: Machine, page: Page) -> str:
    new = machine.host.collapse_thp(machine.vmm, page.hva)
    return f"khugepaged copied the 512 pages around HVA {page.hva:#x} into a THP at HPA {new:#x}"


def munmap(machine: Machine, page: Page) -> str:
    machine.vmm.munmap(page.hva, PAGE_SIZE)
    return f"the VMM munmapped the 4 KiB of guest RAM at HVA {page.hva:#x}"


def move_memslot(machine: Machine, page: Page) -> str:
    memslot = _memslot(machine, page)
    top = max(s.guest_phys_addr + s.memory_size for s in machine.vm.memslots.slots.values())
    new = -(-top // MOVED_SLOT_ALIGN) * MOVED_SLOT_ALIGN
    _set_region(machine, memslot, memslot.flags, new, memslot.memory_size)
    return (
        f"the VMM moved memslot {memslot.id} from GPA {memslot.guest_phys_addr:#x} to"
        f" {new:#x}; its old GPAs are now in no memslot"
    )


def delete_memslot(machine: Machine, page: Page) -> str:
    memslot = _memslot(machine, page)
    _set_region(machine, memslot, memslot.flags, memslot.guest_phys_addr, 0)
    return f"the VMM deleted memslot {memslot.id} (memory_size 0)"


def dirty_logging(machine: Machine, page: Page) -> str:
    memslot = _memslot(machine, page)
    if memslot.dirty_logging:
        raise TwodwalkError(f"memslot {memslot.id} already logs dirty pages")
    flags = memslot.flags | KVM_MEM_LOG_DIRTY_PAGES
    _set_region(machine, memslot, flags, memslot.guest_phys_addr, memslot.memory_size)
    return f"the VMM set KVM_MEM_LOG_DIRTY_PAGES on memslot {memslot.id}"


def guest_remap(machine: Machine, page: Page) -> str:
    """The guest kernel's store to its PTE (`Machine.guest_store`), with no INVLPG."""
    found = machine.guest.page_tables.find_leaf(page.gva)
    if found is None:
        raise TwodwalkError(f"the guest maps no page at GVA {page.gva:#x}")
    fmt = machine.guest.format
    value = int.from_bytes(machine.read_gpa(found.slot, 8), "little")
    target = fmt.output_address(value, found.level) + fmt.page_size(found.level)
    moved = fmt.layout(found.level, found.level > 1).field("address").insert(value, target)
    machine.guest_store(found.slot, moved.to_bytes(8, "little"))
    return (
        f"the guest pointed its {fmt.level_name(found.level)} at GPA {found.slot:#x} to GPA"
        f" {target:#x} and did not run INVLPG"
    )


def race_with_invalidation(machine: Machine, page: Page) -> str:
    """The host migrates the page now (KVM's entry is zapped), and again while KVM handles
    the guest's next fault on it, between `hva_to_pfn` and the install."""
    migrate(machine, page)

    def migrate_again() -> None:
        machine.host.migrate(machine.vmm, page.hva)

    machine.vm.mmu.race_after_hva_to_pfn = migrate_again
    return (
        f"the host migrated HVA {page.hva:#x}, and will migrate it again in the middle of"
        " KVM's next fault on it"
    )


def invlpg(machine: Machine, page: Page) -> str:
    machine.vcpu.invlpg(page.gva)
    return f"the guest ran INVLPG {page.gva:#x}"


WHAT_IFS: Mapping[str, WhatIf] = MappingProxyType(
    {
        w.name: w
        for w in (
            WhatIf(
                "swap-out",
                "swap out the page",
                "Reclaim writes the page to swap and unmaps it; KVM's MMU notifier zaps its"
                " entry first (mm/vmscan.c shrink_folio_list,"
                " kvm_mmu_notifier_invalidate_range_start).",
                swap_out,
            ),
            WhatIf(
                "migrate",
                "migrate the page",
                "Compaction or NUMA balancing copies the page to another frame"
                " (mm/migrate.c migrate_pages); EPT must follow the new frame.",
                migrate,
            ),
            WhatIf(
                "ksm-merge",
                "KSM merge",
                "KSM finds an identical page and merges the two into one write-protected"
                " frame (mm/ksm.c try_to_merge_one_page); a later write breaks copy-on-write.",
                ksm_merge,
            ),
            WhatIf(
                "thp-split",
                "split the THP",
                "The host replaces the 2 MiB PMD that maps the page by 512 PTEs"
                " (mm/huge_memory.c __split_huge_pmd); KVM can then map only 4 KiB there"
                " (kvm_mmu_hugepage_adjust).",
                split_thp,
            ),
            WhatIf(
                "thp-collapse",
                "collapse into a THP",
                "khugepaged copies the 512 small pages around the page into one 2 MiB page"
                " (mm/khugepaged.c collapse_huge_page), so KVM may map it with one 2 MiB"
                " EPT entry.",
                collapse_thp,
            ),
            WhatIf(
                "munmap",
                "VMM: munmap the page",
                "The VMM munmaps the 4 KiB of its guest-RAM mapping behind the page (munmap);"
                " KVM's MMU notifier zaps its entry first.",
                munmap,
            ),
            WhatIf(
                "memslot-move",
                "move the memslot",
                "KVM_SET_USER_MEMORY_REGION with a new guest_phys_addr (KVM_MR_MOVE): KVM"
                " zaps the slot's mappings (kvm_arch_flush_shadow_memslot); the old GPAs"
                " become MMIO.",
                move_memslot,
            ),
            WhatIf(
                "memslot-delete",
                "delete the memslot",
                "KVM_SET_USER_MEMORY_REGION with memory_size 0 (KVM_MR_DELETE): the GPAs"
                " become MMIO.",
                delete_memslot,
            ),
            WhatIf(
                "dirty-logging",
                "dirty logging on",
                "KVM_MEM_LOG_DIRTY_PAGES, as live migration sets it: KVM write-protects the"
                " slot and maps it with 4 KiB entries (kvm_mmu_slot_apply_flags) to log each"
                " first write.",
                dirty_logging,
            ),
            WhatIf(
                "guest-remap",
                "guest: remap the page, no INVLPG",
                "The guest points its PTE for the page at another GPA with an ordinary store"
                " and runs no INVLPG; the TLB may keep the old translation (SDM Vol 3A"
                " 4.10.4).",
                guest_remap,
            ),
            WhatIf(
                "swap-out-without-notifiers",
                "swap out, MMU notifiers off",
                "The same reclaim with KVM's MMU notifiers switched off (a what-if: Linux"
                " always has them), so nothing tells KVM its entry is stale.",
                swap_out_without_notifiers,
            ),
            WhatIf(
                "race-with-invalidation",
                "a fault races the host",
                "The host invalidates the page while KVM handles a fault on it, after"
                " hva_to_pfn found its frame: mmu_invalidate_retry_gfn sees the sequence"
                " move, KVM installs nothing (RET_PF_RETRY) and the guest faults again"
                " (mmu.c is_page_fault_stale).",
                race_with_invalidation,
            ),
            WhatIf(
                "invlpg",
                "guest: INVLPG",
                "INVLPG drops the page's TLB entries and the paging-structure caches (SDM Vol"
                " 3A 4.10.4.1); without EPT it exits to KVM (kvm_mmu_invlpg).",
                invlpg,
            ),
        )
    }
)


def what_if(name: str) -> WhatIf:
    """The what-if called `name`, or a clear error naming the valid ones."""
    return WHAT_IFS[check_choice("what-if", name, tuple(WHAT_IFS))]
