"""The handler lab: write the function KVM runs on an EPT violation, then run guests on it.

University VMM courses have students write this path themselves. In Linux 6.18 it is
vmx.c `handle_ept_violation` -> `kvm_mmu_page_fault` -> `kvm_tdp_page_fault` ->
`kvm_tdp_mmu_page_fault`: find the memslot of the GPA (`kvm_vcpu_gfn_to_memslot`), turn the
GFN into an HVA (`__gfn_to_hva_memslot`), ask the host kernel for the frame behind the HVA
(`hva_to_pfn`, get_user_pages underneath), choose the mapping level
(`kvm_mmu_hugepage_adjust`), build the leaf (`make_spte`) and link it into the EPT
(`kvm_tdp_mmu_map`). The reader's `handler(fault)` gets an `EptViolation` with the exit and
the calls that path makes; `check_handler` runs small guests on it in place of KVM's own path
(`TdpMmu.page_fault_handler`) and compares every entry it installs with the one KVM would
make, naming the typical mistakes. `reference_handler` is a worked solution.

Out of scope, as KVM handles them apart: `fast_page_fault` (dirty-logging write protection),
MMIO (GPAs in no memslot) and the MMU-notifier retry (`mmu_invalidate_retry_gfn`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from twodwalk.engine.formats import EPT_MEMTYPE_WB as EPT_MEMTYPE_WB
from twodwalk.engine.kvm.memslots import Memslot
from twodwalk.engine.kvm.mmu import Fixed, Resolution, TdpMmu
from twodwalk.engine.machine import Machine
from twodwalk.engine.paging import PFERR_WRITE
from twodwalk.engine.trace import KvmStep, Trace
from twodwalk.engine.units import HUGE_PAGE_SIZE, MIB, PAGE_SHIFT, PAGE_SIZE, size_text
from twodwalk.errors import TwodwalkError, check_int
from twodwalk.exercises.grading import Feedback
from twodwalk.views.text import format_trace

# The fields of an EPT leaf the CPU reads (SDM Vol 3C tables 29-4 to 29-6; PS in large leaves
# only, bit 7 of a 4 KiB leaf is ignored); KVM's software
# bits (SPTE_MMU_PRESENT, host- and MMU-writable, suppress #VE) are `install`'s business.
HARDWARE_FIELDS = ("r", "w", "x", "mt", "ipat", "ps", "a", "d")


@dataclass(frozen=True)
class SlotFields:
    """A memslot as `struct kvm_memory_slot` holds it: the fields, not KVM's helpers."""

    id: int
    base_gfn: int
    npages: int
    userspace_addr: int
    readonly: bool
    dirty_logging: bool

    @classmethod
    def of(cls, memslot: Memslot) -> SlotFields:
        return cls(
            memslot.id,
            memslot.base_gfn,
            memslot.npages,
            memslot.userspace_addr,
            memslot.readonly,
            memslot.dirty_logging,
        )


@dataclass(frozen=True)
class HostPage:
    """What `hva_to_pfn` found: the host page that maps the HVA (its first HPA and its size:
    4 KiB, or a 2 MiB THP / 1 GiB hugetlbfs page) and whether the host maps it writable."""

    hpa: int
    page_size: int
    writable: bool


@dataclass
class EptViolation:
    """One EPT violation, as the reader's handler gets it, with the calls KVM's path makes.
    `write`: the access was a write (PFERR_WRITE_MASK from the exit qualification)."""

    gpa: int
    write: bool
    memslots: tuple[SlotFields, ...]
    max_level: int
    _mmu: TdpMmu = field(repr=False)
    _trace: Trace = field(repr=False)
    asked: list[tuple[int, bool, HostPage | None]] = field(default_factory=list, repr=False)
    installed: list[tuple[int, int, int]] = field(default_factory=list, repr=False)

    def page_size(self, level: int) -> int:
        """The size an EPT leaf maps at `level`: 4 KiB, 2 MiB, 1 GiB."""
        return self._mmu.fmt.page_size(level)

    def hva_to_pfn(self, hva: int, write: bool) -> HostPage:
        """The host kernel's answer for the VMM's `hva` (kvm_main.c `hva_to_pfn`): the page
        is faulted in if needed, for writing if `write`. Raises KvmError (EFAULT) for an HVA
        the VMM has not mapped."""
        check_int("hva", hva, 0, 1 << 64, valid="a host-virtual address of the VMM")
        self.asked.append((hva, write, None))
        hpa, writable, size = self._mmu._hva_to_pfn(hva, write, self._trace)
        page = HostPage(hpa, size, writable)
        self.asked[-1] = (hva, write, page)
        return page

    def make_ept_entry(self, level: int, **fields: int) -> int:
        """An EPT leaf from named fields (SDM Vol 3C tables 29-4 to 29-6): address, r, w, x,
        mt (memory type), ipat, a, d; PS is set for you at levels 2 and 3."""
        return self._mmu.fmt.encode(level, True, **fields)

    def install(self, gpa: int, level: int, entry: int) -> None:
        """Link `entry` as the leaf at `level` for `gpa` (`kvm_tdp_mmu_map`: missing tables
        are made on the way), adding KVM's software bits as `make_spte` does, and marking
        the page dirty in its memslot when the entry is writable."""
        check_int("level", level, 1, self.max_level + 1, valid=f"1..{self.max_level}")
        check_int("entry", entry, 0, 1 << 64, valid="a 64-bit EPT entry")
        self.installed.append((gpa, level, entry))
        mmu, fmt = self._mmu, self._mmu.fmt
        writable = int(bool(entry & fmt.layout(level, level > 1).field("w").mask))
        software = fmt.encode(level, True, sw=1, hw=writable, mw=writable, sve=1)
        mmu._map(gpa >> PAGE_SHIFT, level, entry | software & ~fmt.encode(level, True), self._trace)
        memslot = mmu.memslots.gfn_to_memslot(gpa >> PAGE_SHIFT)
        if writable and memslot is not None:
            memslot.mark_dirty(gpa >> PAGE_SHIFT)


Handler = Callable[[EptViolation], None]


def reference_handler(fault: EptViolation) -> None:
    """A worked solution: KVM's path, one step per kernel function."""
    gfn = fault.gpa >> PAGE_SHIFT
    slot = solution_gfn_to_memslot(fault, gfn)
    hva = solution_gfn_to_hva_memslot(slot, gfn)
    page = fault.hva_to_pfn(hva, fault.write)
    level = solution_hugepage_adjust(fault, slot, gfn, hva, page)
    hpa = (page.hpa + (hva & (page.page_size - 1))) & ~(fault.page_size(level) - 1)
    writable = page.writable and not slot.readonly
    fault.install(gfn << PAGE_SHIFT, level, solution_make_spte(fault, level, hpa, writable))


def solution_gfn_to_memslot(fault: EptViolation, gfn: int) -> SlotFields:
    """`kvm_vcpu_gfn_to_memslot`: the slot whose GFN range holds `gfn`."""
    return next(s for s in fault.memslots if s.base_gfn <= gfn < s.base_gfn + s.npages)


def solution_gfn_to_hva_memslot(slot: SlotFields, gfn: int) -> int:
    """`__gfn_to_hva_memslot`: the slot maps its GFNs onto its HVAs in order."""
    return slot.userspace_addr + ((gfn - slot.base_gfn) << PAGE_SHIFT)


def solution_hugepage_adjust(
    fault: EptViolation, slot: SlotFields, gfn: int, hva: int, page: HostPage
) -> int:
    """`kvm_mmu_hugepage_adjust`: the largest level that the host page covers, that stays in
    the slot, where GFN and HVA agree in the bits the page spans, and not while dirty
    logging (which tracks 4 KiB pages)."""
    level = fault.max_level
    while level > 1:
        pages = fault.page_size(level) >> PAGE_SHIFT
        head = gfn & ~(pages - 1)
        if (
            fault.page_size(level) <= page.page_size
            and not slot.dirty_logging
            and slot.base_gfn <= head
            and head + pages <= slot.base_gfn + slot.npages
            and not (gfn ^ hva >> PAGE_SHIFT) & (pages - 1)
        ):
            break
        level -= 1
    return level


def solution_make_spte(fault: EptViolation, level: int, hpa: int, writable: bool) -> int:
    """`make_spte`: readable and executable, writable when allowed, write-back with IPAT
    (`vmx_get_mt_mask`), A set and D set when writable."""
    w = int(writable)
    return fault.make_ept_entry(
        level, address=hpa, r=1, w=w, x=1, mt=EPT_MEMTYPE_WB, ipat=1, a=1, d=w
    )


# --- grading -------------------------------------------------------------------------------------


class _HandlerMistakeError(TwodwalkError):
    """The reader's handler did something KVM would not: the message says what and why."""


@dataclass(frozen=True)
class _Expected:
    """What KVM's path makes of one violation, from the same memslot and host page."""

    memslot: Memslot
    hva: int
    level: int
    reasons: list[str]
    entry: int


def _expected(mmu: TdpMmu, fault: EptViolation, page: HostPage) -> _Expected:
    gfn = fault.gpa >> PAGE_SHIFT
    memslot = mmu.memslots.gfn_to_memslot(gfn)
    assert memslot is not None  # the lab's guests touch RAM only
    hva = memslot.gfn_to_hva(gfn)
    level, reasons = mmu._max_mapping_level(memslot, gfn, hva, page.page_size)
    hpa = (page.hpa + (hva & (page.page_size - 1))) & ~(mmu.fmt.page_size(level) - 1)
    writable = page.writable and not memslot.readonly
    entry = mmu._make_spte(hpa, level, writable)
    return _Expected(memslot, hva, level, reasons, entry)


def _review(mmu: TdpMmu, fault: EptViolation, write: bool) -> None:
    """Compare what the handler did with what KVM's path does for a violation of `write`
    kind (the exit's, whatever the handler made of `fault.write`); raise at the first
    mistake."""
    gfn = fault.gpa >> PAGE_SHIFT
    memslot = mmu.memslots.gfn_to_memslot(gfn)
    assert memslot is not None
    hva = memslot.gfn_to_hva(gfn)
    if not fault.asked:
        raise _HandlerMistakeError(
            "it never asked the host for the page (fault.hva_to_pfn): the HPA comes from the"
            " host kernel's mapping of the HVA, not from the GPA"
        )
    asked_hva, asked_write, page = fault.asked[-1]
    if asked_hva >> PAGE_SHIFT != hva >> PAGE_SHIFT:
        raise _HandlerMistakeError(_wrong_hva(mmu, memslot, fault.gpa, asked_hva, hva))
    if asked_write != write:
        raise _HandlerMistakeError(
            f"it asked the host for a {'write' if asked_write else 'read'} but the guest"
            f" {'writes' if write else 'reads'}: pass fault.write, so that a write"
            " breaks copy-on-write (or replaces the zero page) before KVM maps the page"
        )
    assert page is not None
    if len(fault.installed) != 1:
        raise _HandlerMistakeError(
            "it returned without installing an entry: the guest would take the same EPT"
            " violation again, forever"
            if not fault.installed
            else f"it installed {len(fault.installed)} entries; KVM installs one leaf, for"
            " the faulting GPA"
        )
    expected = _expected(mmu, fault, page)
    _review_entry(mmu, fault, expected, *fault.installed[-1])


def _wrong_hva(mmu: TdpMmu, memslot: Memslot, gpa: int, asked: int, hva: int) -> str:
    """Why the handler's HVA differs from KVM's: another slot's mapping, a missing offset
    (`userspace_addr + gpa`), or a GPA passed as it is."""
    base = f"it asked for HVA {asked:#x}, but GPA {gpa:#x} is at HVA {hva:#x}"
    rule = "HVA = userspace_addr + (gfn - base_gfn) * 4096"
    page = asked >> PAGE_SHIFT
    if page == gpa >> PAGE_SHIFT:
        return f"{base}: a GPA is not an HVA; the memslot maps one to the other"
    for other in mmu.memslots.slots.values():
        if other is not memslot and page == other.gfn_to_hva(gpa >> PAGE_SHIFT) >> PAGE_SHIFT:
            return (
                f"{base}: that is memslot {other.id}'s rule; GFN {gpa >> PAGE_SHIFT:#x} is in"
                f" memslot {memslot.id} (GPA {memslot.guest_phys_addr:#x}, {memslot.npages}"
                " pages)"
            )
        if page == (other.userspace_addr + gpa) >> PAGE_SHIFT:
            wrong_slot = (
                f" and memslot {other.id} is the wrong slot" if other is not memslot else ""
            )
            return (
                f"{base}: the memslot's offset is missing{wrong_slot}. The slot starts at GPA"
                f" {memslot.guest_phys_addr:#x}: {rule}"
            )
    return f"{base} ({rule} of memslot {memslot.id})"


def _review_entry(
    mmu: TdpMmu, fault: EptViolation, expected: _Expected, gpa: int, level: int, entry: int
) -> None:
    fmt = mmu.fmt
    if level != expected.level:
        why = f"; not larger: {'; '.join(expected.reasons)}" if expected.reasons else ""
        raise _HandlerMistakeError(
            f"it mapped at level {level} ({size_text(fmt.page_size(level))}); KVM maps at"
            f" level {expected.level} ({size_text(fmt.page_size(expected.level))}){why}"
        )
    size = fmt.page_size(level)
    if gpa // size != fault.gpa // size:
        raise _HandlerMistakeError(
            f"it installed the entry for GPA {gpa:#x}, which does not cover the faulting GPA"
            f" {fault.gpa:#x}"
        )
    layout = fmt.layout(level, level > 1)
    address_field = layout.field("address").mask
    address, want = entry & address_field, expected.entry & address_field
    inside = entry & (size - 1) & ~(PAGE_SIZE - 1)  # address bits a large leaf reserves
    if inside:
        raise _HandlerMistakeError(
            f"its {size_text(size)} leaf points at HPA {address | inside:#x}, which is not"
            f" {size_text(size)}-aligned: a large leaf names the first byte of its page (the"
            " low address bits are reserved: an EPT misconfiguration)"
        )
    if address != want:
        raise _HandlerMistakeError(
            f"its leaf points at HPA {address:#x}; the host maps the HVA in the page at {want:#x}"
        )
    for bit in (f for f in layout.fields if f.key in HARDWARE_FIELDS):
        key = bit.key
        if bit.extract(entry) != bit.extract(expected.entry):
            raise _HandlerMistakeError(
                _field_mistake(key, bit.extract(entry), bit.extract(expected.entry))
            )


_FIELD_REASONS = {
    "r": "KVM maps guest RAM readable, writable when it can and executable (ACC_ALL)",
    "x": "KVM maps guest RAM readable, writable when it can and executable (ACC_ALL): the"
    " guest runs code from its RAM",
    "w": "W follows the host page (hva_to_pfn's writable) and the slot (KVM_MEM_READONLY):"
    " writable only when both allow it. Without W a writable page exits again on the first"
    " write; with W a read-only host page (the zero page, a CoW page) would be written",
    "mt": f"guest RAM is write-back: memory type {EPT_MEMTYPE_WB} (vmx_get_mt_mask)",
    "ipat": "KVM sets IPAT for guest RAM, so the guest's PAT cannot weaken write-back"
    " (vmx_get_mt_mask)",
    "ps": "PS (bit 7) is set in a 2 MiB or 1 GiB leaf and absent from a 4 KiB one",
    "a": "with EPT A/D on, make_spte sets A in the leaf it makes, so the CPU need not",
    "d": "make_spte sets D in a writable leaf and leaves it clear in a read-only one",
}


def _field_mistake(key: str, got: int, want: int) -> str:
    return f"its leaf has {key.upper()} = {got}, KVM's has {want}: {_FIELD_REASONS[key]}"


# --- the guests the lab runs ---------------------------------------------------------------------


@dataclass(frozen=True)
class LabGuest:
    """One small guest and the access it makes: its first touches take EPT violations for
    each guest table and for the data page."""

    name: str
    build: Callable[[], Machine] = field(repr=False)
    gva: int = 0x40_0000
    kind: str = "read"


def _guest(
    thp: bool = False, pci_hole: tuple[int, int] | None = None, gpa: int = 2 * MIB
) -> Machine:
    ram = 16 * MIB if pci_hole else 8 * MIB
    machine = Machine(guest_ram=ram, thp=thp, pci_hole=pci_hole)
    machine.guest.map(0x40_0000, gpa, PAGE_SIZE, rw=1)
    return machine


def _misaligned_slot() -> Machine:
    """THP behind a memslot whose GPA and HVA disagree modulo 2 MiB (the VMM passed an HVA
    4 KiB into a huge page): KVM cannot map 2 MiB even though the host does."""
    machine = Machine(guest_ram=8 * MIB, thp=True)
    hva = machine.vmm.mmap(2 * HUGE_PAGE_SIZE, huge=True, name="misaligned RAM")
    machine.vm.set_user_memory_region(1, 0, 1 << 30, HUGE_PAGE_SIZE, hva + PAGE_SIZE)
    machine.guest.map(0x40_0000, (1 << 30) + 0x5000, PAGE_SIZE, rw=1)
    return machine


LAB_GUESTS = (
    LabGuest("a read of RAM the host backs with 4 KiB pages", _guest),
    LabGuest("a write to RAM the host backs with 4 KiB pages", _guest, kind="write"),
    LabGuest(
        "a write to RAM the host backs with 2 MiB THP", lambda: _guest(thp=True), kind="write"
    ),
    LabGuest(
        "a read of RAM above a PCI hole (a memslot that starts at GPA 12 MiB)",
        lambda: _guest(pci_hole=(8 * MIB, 12 * MIB), gpa=13 * MIB),
    ),
    LabGuest("a write to THP RAM in a slot whose HVA is 4 KiB off", _misaligned_slot, kind="write"),
)


@dataclass(frozen=True)
class HandlerReport:
    """The verdict per guest, and the trace of each run on the reader's handler."""

    results: tuple[tuple[str, Feedback], ...]
    traces: tuple[str, ...] = field(repr=False)

    @property
    def passed(self) -> bool:
        return all(feedback.correct for _, feedback in self.results)

    def __str__(self) -> str:
        lines = [
            f"{'PASS' if feedback.correct else 'FAIL'}  {name}: {feedback.message}"
            for name, feedback in self.results
        ]
        done = sum(feedback.correct for _, feedback in self.results)
        return "\n".join([*lines, f"{done} of {len(self.results)} guests ran as under KVM."])


def check_handler(handler: Handler, guests: tuple[LabGuest, ...] = LAB_GUESTS) -> HandlerReport:
    """Run each guest with `handler` in place of KVM's page-fault path and judge it: every
    entry it installs must be the one KVM makes, and the guest's access must complete."""
    if not callable(handler):
        raise TwodwalkError(f"handler={handler!r} is not valid: pass a function handler(fault)")
    results, traces = [], []
    for guest in guests:
        machine = guest.build()
        feedback, trace = run_guest(handler, machine, guest)
        results.append((guest.name, feedback))
        traces.append(trace)
    return HandlerReport(tuple(results), tuple(traces))


def run_guest(handler: Handler, machine: Machine, guest: LabGuest) -> tuple[Feedback, str]:
    """Run `guest`'s access on `machine` (built by `guest.build`) with `handler` in place
    of KVM's path: the verdict, and the trace of the run."""
    mmu = machine.vm.ept
    violations = 0

    def on_violation(gpa: int, code: int, trace: Trace) -> Resolution:
        write = bool(code & PFERR_WRITE)
        nonlocal violations
        violations += 1
        memslots = tuple(
            SlotFields.of(s) for (as_id, _), s in sorted(mmu.memslots.slots.items()) if as_id == 0
        )
        fault = EptViolation(gpa, write, memslots, max(mmu.fmt.leaf_levels), mmu, trace)
        trace.add(KvmStep("your handler", f"EPT violation {violations} at GPA {gpa:#x}"))
        try:
            handler(fault)
        except Exception as error:  # whatever the reader's code raises is reported
            raise _HandlerMistakeError(_crash(mmu, fault, error)) from error
        _review(mmu, fault, write)
        return Fixed()

    mmu.page_fault_handler = on_violation
    value = 0x5EED if guest.kind == "write" else None
    trace = Trace()
    try:
        result = machine.vcpu.access(guest.gva, guest.kind, value, trace=trace)
    except _HandlerMistakeError as mistake:
        return Feedback(False, f"at EPT violation {violations}, {mistake}"), format_trace(trace)
    assert result.hpa is not None and result.hva is not None
    assert result.hpa == machine.host.pagemap(machine.vmm, result.hva), "reviewed entries"
    return (
        Feedback(
            True,
            f"{violations} EPT violations handled as KVM does; the {guest.kind} reached HPA"
            f" {result.hpa:#x}",
        ),
        format_trace(trace),
    )


def _crash(mmu: TdpMmu, fault: EptViolation, error: Exception) -> str:
    """The reader's handler raised: say what, and what the usual cause is."""
    text = f"the handler raised {type(error).__name__}: {error}"
    memslot = mmu.memslots.gfn_to_memslot(fault.gpa >> PAGE_SHIFT)
    assert memslot is not None  # the lab's guests touch RAM only
    hva = memslot.gfn_to_hva(fault.gpa >> PAGE_SHIFT)
    if fault.asked and fault.asked[-1][0] >> PAGE_SHIFT != hva >> PAGE_SHIFT:
        return f"{text} ({_wrong_hva(mmu, memslot, fault.gpa, fault.asked[-1][0], hva)})"
    if isinstance(error, StopIteration):
        return f"{text} (no memslot matched: a slot covers base_gfn <= gfn < base_gfn + npages)"
    return text
