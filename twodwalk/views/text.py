"""Text views: entries as the SDM tables show them, walks as a hand calculation, table trees.

Views only read what the engine recorded (a `DecodedEntry`, a `WalkRecord`, the entries of a
`PageTables`); they never walk or translate anything themselves. Numbers are hex with decimal
beside them where a learner would check an index by hand (as in the OSTEP paging simulators).
"""

from __future__ import annotations

import html
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING

from twodwalk.engine.ept import (
    EPT_VIOLATION_BITS,
    EPT_VIOLATION_GVA_TRANSLATED,
    EXIT_REASON_EPT_MISCONFIG,
    EXIT_REASON_EPT_VIOLATION,
    qualification_names,
)
from twodwalk.engine.exits import exit_label
from twodwalk.engine.formats import DecodedEntry, EntryFormat, EptFormat, Rights, nested_tree
from twodwalk.engine.kvm.memslots import dirty_pages as dirty_pages  # re-exported for notebooks
from twodwalk.engine.kvm.mmu import KVM_EPT_ERROR_CODE_BITS
from twodwalk.engine.kvm.run import InternalError, MmioExit
from twodwalk.engine.npt import PFERR_GUEST_FINAL, SVM_EXIT_NPF, exit_info1_names
from twodwalk.engine.paging import (
    PF_ERROR_CODE_BITS,
    GeneralProtection,
    PageFault,
    bit_names,
    unnamed_bits,
)
from twodwalk.engine.tlb import ANY_PCID, PscEntry
from twodwalk.engine.trace import (
    CacheHit,
    EptWalk,
    Event,
    GuestWalk,
    HostPageFault,
    HostWalk,
    KvmStep,
    KvmWalk,
    NativeWalk,
    Retry,
    SpteWrite,
    TlbHit,
    Trace,
    VmExit,
)
from twodwalk.engine.units import PAGE_SIZE
from twodwalk.engine.units import size_text as size_text  # re-exported for views and widgets
from twodwalk.engine.walker import (
    Access,
    AccessKind,
    FaultKind,
    Translation,
    WalkFault,
    WalkRecord,
    WalkStep,
)

if TYPE_CHECKING:
    from twodwalk.engine.kvm.memslots import Memslot
    from twodwalk.engine.pagetables import PageTables, PhysicalSpace, TreeEntry
    from twodwalk.engine.processor import AccessResult
    from twodwalk.engine.tlb import TlbEntry, TranslationCache, TranslationCaches
    from twodwalk.views.readouts import TwoTrees


def describe_entry(entry: DecodedEntry) -> str:
    """An entry as a table of fields: bits, name, value, meaning (SDM tables 4-15..4-20)."""
    state = "present" if entry.present else "not present"
    lines = [
        f"{entry.layout.name} = {entry.value:#018x} ({state})",
        f"  {'bits':>6}  {'field':<8} {'value':>18}  meaning",
    ]
    for fv in entry.fields:
        width = fv.field.high - fv.field.low + 1
        shown = f"{fv.value:#x}" if fv.field.is_address or width > 1 else str(fv.value)
        lines.append(
            f"  {fv.field.bit_range:>6}  {fv.field.name:<8} {shown:>18}  {fv.field.meaning}"
        )
    if not entry.present:
        lines.append("  not present: the CPU ignores the other bits (software may keep data there)")
    elif entry.reserved_set:
        lines.append(f"  reserved bits set: {entry.reserved_set:#x} (a walk faults with RSVD)")
    if entry.misconfiguration:
        lines.append(f"  misconfigured: {entry.misconfiguration} (an EPT walk exits, reason 49)")
    return "\n".join(lines)


def rights_text(rights: Rights) -> str:
    """Accumulated rights as letters, e.g. 'RW-U' ('-' for a right not granted)."""
    return "".join(
        r.name or "" if r in rights else "-" for r in (Rights.R, Rights.W, Rights.X, Rights.U)
    )


def _privilege(record: WalkRecord) -> str:
    """ " (user)" or " (supervisor)" for paging; nothing for EPT, which has no privilege
    levels (SDM 29.3.3.2 checks only R/W/X)."""
    if isinstance(record.format, EptFormat):
        return ""
    return " (user)" if record.access.user else " (supervisor)"


def format_walk(record: WalkRecord) -> str:
    """A walk as a hand calculation: per level the index, the entry, and where it leads."""
    fmt = record.format
    lines = [
        f"{fmt.name}: {record.access.kind.value} of {record.address:#x}"
        f"{_privilege(record)}, root {record.root:#x}"
    ]
    for step in record.steps:
        name = fmt.level_name(step.level)
        bits_used = f"{fmt.shift(step.level) + 8}:{fmt.shift(step.level)}"
        line = (
            f"  {name:<6} index[{bits_used:>5}] = {step.index:#05x} ({step.index:3d})"
            f"  entry @ {step.entry_address:#x} = {step.value:#018x}"
        )
        line += entry_meaning(fmt, step.level, step.value) + f"  rights {rights_text(step.rights)}"
        if step.written is not None:
            line += f"  -> wrote {step.written:#018x}"
        lines.append(line)
    lines.append("  " + _outcome_text(record.outcome))
    return "\n".join(lines)


def entry_meaning(fmt: EntryFormat, level: int, value: int) -> str:
    """Where an entry leads, as a hand calculation notes it: not present, the next table, or
    the page it maps and its size."""
    if not fmt.is_present(value):
        return "  not present"
    target = fmt.output_address(value, level)
    if fmt.is_leaf(value, level):
        return f"  page {target:#x} ({size_text(fmt.page_size(level))})"
    return f"  next table {target:#x}"


def _outcome_text(outcome: Translation | WalkFault) -> str:
    if isinstance(outcome, Translation):
        return (
            f"=> physical {outcome.address:#x} in a {size_text(outcome.page_size)} page,"
            f" rights {rights_text(outcome.rights)}"
        )
    where = "before the walk" if outcome.level is None else f"at level {outcome.level}"
    return f"=> FAULT {where}: {outcome.kind.value}: {outcome.detail}"


def dump_tables(tables: PageTables) -> str:
    """A page-table tree in text, one present entry a line (what `PageTables` built)."""
    return format_tree(tables.fmt, tables.root, tables.entries())


def hexdump_pages(memory: PhysicalSpace, pages: Iterable[int], space: str = "physical") -> str:
    """Whole 4 KiB pages as raw 8-byte words, two a line, as gdb's `x/512gx` prints them,
    with a run of lines that repeat the line before shown once as `*` (the convention of
    hexdump(1)): the bytes a walker reads, with nothing decoded, as OSTEP's paging homework
    gives them. The last line of each page is always shown, so the page's end is visible."""
    blocks = []
    for page in sorted(set(pages)):
        lines = [f"{space} page {page:#x}:"]
        previous: tuple[int, int] | None = None
        for line_address in range(page, page + PAGE_SIZE, 16):
            words = (memory.read_u64(line_address), memory.read_u64(line_address + 8))
            last = line_address == page + PAGE_SIZE - 16
            if words == previous and not last:
                if lines[-1] != "*":
                    lines.append("*")
                continue
            previous = words
            lines.append(f"  {line_address:#x}:  {words[0]:#018x}  {words[1]:#018x}")
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


def format_tree(fmt: EntryFormat, root: int, entries: Iterable[TreeEntry]) -> str:
    """The present entries of a table tree, indented by level (like Linux's ptdump)."""
    lines = [f"{fmt.name}, root table at {root:#x}"]
    for e in entries:
        indent = "  " * (fmt.levels - e.level + 1)
        what = (
            f"page {fmt.output_address(e.value, e.level):#x} ({size_text(fmt.page_size(e.level))})"
            if e.leaf
            else f"table {fmt.output_address(e.value, e.level):#x}"
        )
        lines.append(
            f"{indent}{fmt.level_name(e.level)} {e.virtual:#018x} @ {e.entry_address:#x}"
            f" = {e.value:#018x} -> {what}"
        )
    return "\n".join(lines)


def accessed_dirty(trees: TwoTrees) -> str:
    """The A and D flags of the two leaves that map one guest page, each read by its own
    format's field names: the CPU sets the EPT leaf's on the guest's accesses (SDM Vol 3C
    29.3.5); the host PTE's change only when the host itself uses or faults in the page."""
    lines = []
    for name, record in (("EPT leaf", trees.ept), ("host PTE", trees.host)):
        leaf = record.steps[-1]
        entry = leaf.entry
        lines.append(
            f"{name:<9} @ {leaf.entry_address:#x} = {leaf.value:#018x}:"
            f"  A={entry['a']} D={entry['d']}"
        )
    return "\n".join(lines)


def entry_flags(fmt: EntryFormat, level: int, value: int) -> str:
    """Bochs-style flag letters: upper case when set, lower case when clear."""
    entry = fmt.decode(value, level)
    letters = [
        fv.field.name if fv.value else fv.field.name.lower()
        for fv in reversed(entry.fields)
        if fv.field.high == fv.field.low and fv.field.key not in ("sw", "hw", "mw")
    ]
    return " ".join(letters)


def format_2d_walk(trace: Trace, attempt: int = -1) -> str:
    """A Bochs-style dump of one attempt's hardware references: for each guest level, the EPT
    entries that translated the guest table's GPA come first, then the guest entry itself."""
    rows = []
    for ref in trace.memory_references(attempt):
        step = ref.step
        name = step.format.level_name(step.level)
        if ref.dimension == "ept":
            served = "final GPA" if ref.guest_level is None else f"guest L{ref.guest_level} table"
            label = f"  {name} ({served})"
        else:
            label = name
        rows.append((ref, label))
    width = max([28, *(len(label) for _, label in rows)])
    return "\n".join(
        f"{ref.number:3d} {label:<{width}} @ {ref.address:#014x} = {ref.value:#018x}"
        f"  {entry_flags(ref.step.format, ref.step.level, ref.step.value)}"
        for ref, label in rows
    )


def format_trace(trace: Trace) -> str:
    """The story of one access, event by event: walks, exits, KVM's steps, retries."""
    lines = []
    for event in trace:
        lines.append(_event_text(event))
    return "\n".join(lines)


def _event_text(event: Event) -> str:
    if isinstance(event, GuestWalk | EptWalk | NativeWalk | HostWalk | KvmWalk):
        kind = type(event).__name__
        return f"{kind}: {_outcome_text(event.record.outcome)}"
    if isinstance(event, VmExit) and event.reason == SVM_EXIT_NPF:
        info = event.qualification or 0
        return (
            f"#VMEXIT(NPF) {SVM_EXIT_NPF:#x}: EXITINFO2 (GPA) {event.gpa or 0:#x},"
            f" EXITINFO1 {info:#x} ({', '.join(exit_info1_names(info))})"
        )
    if isinstance(event, VmExit):
        where = "" if event.gpa is None else f": GPA {event.gpa:#x}"
        if event.gva is not None and event.gpa is None:
            where = f": GVA {event.gva:#x}"
        qual = "" if event.qualification is None else f" qualification {event.qualification:#x}"
        if event.qualification is not None and event.reason == EXIT_REASON_EPT_VIOLATION:
            qual += f" ({', '.join(qualification_names(event.qualification))})"
        return f"VM exit {event.reason} {event.name}{where}{qual}"
    if isinstance(event, KvmStep):
        return f"  KVM {event.function}: {event.detail}"
    if isinstance(event, HostPageFault):
        return f"  host page fault at HVA {event.hva:#x}: {event.resolution} (HPA {event.hpa:#x})"
    if isinstance(event, SpteWrite):
        what = "leaf" if event.leaf else "table link"
        return (
            f"  {event.table} L{event.level} {what} @ {event.entry_address:#x}: {event.old:#x} ->"
            f" {event.new:#x}"
        )
    if isinstance(event, Retry):
        return f"VM entry: the guest retries (attempt {event.attempt + 1})"
    if isinstance(event, CacheHit):
        return f"{event.cache} hit: {event.address:#x} -> {event.result:#x}"
    if isinstance(event, TlbHit):
        return (
            f"TLB hit: page {event.page:#x} ({size_text(event.page_size)}) -> frame"
            f" {event.frame:#x}; no walk"
        )
    return f"data {event.kind} at HPA {event.hpa:#x}: {event.value:#x}"


def info_memslots(slots: Iterable[Memslot], dirty_log_mode: str | None = None) -> str:
    """Memslots as a table, in the spirit of QEMU's `info mtree` / KVM's memslot dump; with
    `dirty_log_mode` (`Vm.describe_dirty_log_mode()`) a last line says how KVM logs."""
    lines = ["slot as  GPA range                               HVA              pages  flags"]
    for m in sorted(slots, key=lambda m: (m.as_id, m.base_gfn)):
        flags = ",".join(n for bit, n in ((1, "LOG_DIRTY"), (2, "READONLY")) if m.flags & bit)
        if m.gmem is not None:
            only = " only" if m.gmem_only else ""
            flags = f"GUEST_MEMFD{only} (fd {m.gmem.fd} from {m.gmem_pgoff << 12:#x})"
        end = m.guest_phys_addr + m.memory_size - 1
        lines.append(
            f"{m.id:4d} {m.as_id:2d}  {m.guest_phys_addr:#018x}-{end:#018x}"
            f"  {m.userspace_addr:#014x} {m.npages:6d}  {flags or '-'}"
        )
    if dirty_log_mode is not None:
        lines.append(f"dirty logging: {dirty_log_mode}")
    return "\n".join(lines)


def gva2gpa(result: AccessResult) -> str:
    """QEMU monitor `gva2gpa` for the address of one access. Like QEMU's
    `cpu_get_phys_page_debug` it ignores access rights: a page the access was not allowed
    to touch is still mapped, at the GPA the guest walk reached."""
    return "Unmapped" if result.gpa is None else f"gpa: {result.gpa:#x}"


def gpa2hva(result: AccessResult) -> str:
    """QEMU monitor `gpa2hva`: the memslot route the access took."""
    return _not_accessed(result) or gpa2hva_text(result.gpa, result.hva)


def gpa2hpa(result: AccessResult) -> str:
    """QEMU monitor `gpa2hpa`: where the access landed in host memory."""
    return _not_accessed(result) or gpa2hpa_text(result.gpa, result.hva, result.hpa)


def _not_accessed(result: AccessResult) -> str:
    """A refused access has a GPA but took no route beyond it: say so rather than "no
    memory" (`twodwalk gpa2hva GPA` shows the GPA's route all the same)."""
    if result.fault is None or result.gpa is None:
        return ""
    return f"GPA {result.gpa:#x} not accessed: the guest's translation refused the access"


def gpa2hva_text(gpa: int | None, hva: int | None, region: str = "guest RAM") -> str:
    """`gpa2hva` for a bare GPA and the HVA its memslot gives (None: no memslot), worded as
    QEMU's `hmp_gpa2hva` (monitor/hmp-cmds-target.c)."""
    if gpa is None or hva is None:
        return _no_memory(gpa)
    return f"Host virtual address for {gpa:#x} ({region}) is {hva:#x}"


def gpa2hpa_text(
    gpa: int | None, hva: int | None, hpa: int | None, region: str = "guest RAM"
) -> str:
    """`gpa2hpa` as QEMU's `hmp_gpa2hpa`: "Unavailable" when the host has no frame behind the
    HVA yet (QEMU reads /proc/self/pagemap, which does not fault pages in)."""
    if gpa is None or hva is None:
        return _no_memory(gpa)
    if hpa is None:
        return "Unavailable"
    return f"Host physical address for {gpa:#x} ({region}) is {hpa:#x}"


def _no_memory(gpa: int | None) -> str:
    return "No memory is mapped at " + ("that address" if gpa is None else f"address {gpa:#x}")


def monitor(result: AccessResult) -> str:
    """The three QEMU-monitor lines for one access: gva2gpa, gpa2hva, gpa2hpa."""
    return "\n".join(view(result) for view in (gva2gpa, gpa2hva, gpa2hpa))


PSC_NAMES = {5: "PML5E cache", 4: "PML4E cache", 3: "PDPTE cache", 2: "PDE cache"}


def info_tlb(caches: TranslationCaches) -> str:
    """What the translation caches hold (SDM Vol 3C 29.4.2-29.4.3), one entry a line: the TLB
    always, the paging-structure caches and guest-physical mappings when they hold anything.
    For a TLB entry `page` is the linear page and `frame` the host frame; for a
    paging-structure cache, the linear prefix and the next table; for a guest-physical
    mapping, the GPA page and its host frame."""
    lines = []
    for name, cache in named_caches(caches):
        entries: list[TlbEntry | PscEntry] = [*cache.entries()]
        entries.sort(key=lambda e: (e.tag, e.page))
        if entries or cache is caches.tlb:
            stats = cache.stats
            lines.append(
                f"{name}: {len(entries)} entries ({stats.hits} hits, {stats.misses} misses)"
            )
            lines.extend(_entry_text(e) for e in entries)
    if caches.amd:
        pwc = caches.pwc
        lines.append(
            f"page-walk cache (AMD-style): {len(pwc.entries())} entries"
            f" ({pwc.stats.hits} hits, {pwc.stats.misses} misses)"
        )
        lines.extend(f"  entry @ {hpa:#x} = {value:#018x}" for hpa, value in pwc.entries())
    return "\n".join(lines)


def named_caches(caches: TranslationCaches) -> list[tuple[str, TranslationCache]]:
    """Each cache with its SDM name: the TLB, the paging-structure caches from the top level
    down, the guest-physical mappings, the EPT's paging-structure caches."""
    return [
        ("TLB", caches.tlb),
        *((PSC_NAMES[level], caches.psc[level]) for level in sorted(caches.psc, reverse=True)),
        ("guest-physical mappings", caches.guest_physical),
        *(
            (f"EPT {PSC_NAMES[level]}", caches.ept_psc[level])
            for level in sorted(caches.ept_psc, reverse=True)
        ),
    ]


def _entry_text(e: TlbEntry | PscEntry) -> str:
    """A TLB entry: the page -> its frame (and GPA page), rights, dirty and global flags. A
    paging-structure-cache entry: the prefix -> the next table's HPA (and its GPA where the
    walk's own space differs: a guest table walked through EPT), the rights above it."""
    pcid = "any" if e.tag.pcid == ANY_PCID else f"{e.tag.pcid:#x}"
    region = (
        f"  vpid {e.tag.vpid} pcid {pcid} ep4ta {e.tag.ep4ta:#x}  {e.page:#018x}"
        f" ({size_text(e.page_size)})"
    )
    if isinstance(e, PscEntry):
        gpa = "" if e.table == e.table_hpa else f"  gpa {e.table:#x}"
        return f"{region} -> table {e.table_hpa:#x}{gpa}  {rights_text(e.rights)}"
    gpa = "" if e.gpa_page in (None, e.frame) else f"  gpa {e.gpa_page:#x}"
    flags = ("D" if e.dirty else "-") + ("G" if e.global_page else "-")
    return f"{region} -> {e.frame:#x}{gpa}  {rights_text(e.rights)} {flags}"


def describe_qualification(qualification: int) -> str:
    """An EPT violation's exit qualification bit by bit, as SDM Vol 3C table 28-7 names the
    bits: one line per bit the model uses, set or clear, and any other set bit."""
    title = f"EPT-violation exit qualification {qualification:#x} (SDM Vol 3C table 28-7)"
    return _bit_table(title, qualification, EPT_VIOLATION_BITS)


def describe_error_code(code: int, *, kvm: bool = False) -> str:
    """A #PF error code bit by bit (SDM Vol 3A 4.7, figure 4-12); with `kvm`, the page-fault
    code KVM derives from an EPT violation (`__vmx_handle_ept_violation`), with the names of
    its PFERR_*_MASK bits, bits 32 and 33 included."""
    if kvm:
        title = f"KVM page-fault code {code:#x} (arch/x86/include/asm/kvm_host.h PFERR_*)"
        return _bit_table(title, code, KVM_EPT_ERROR_CODE_BITS)
    return _bit_table(f"#PF error code {code:#x} (SDM Vol 3A 4.7)", code, PF_ERROR_CODE_BITS)


def _bit_table(title: str, value: int, bits: tuple[tuple[int, str, str], ...]) -> str:
    width = max(len(name) for _, name, _ in bits)
    lines = [title]
    for mask, name, meaning in bits:
        number = mask.bit_length() - 1
        lines.append(f"  bit {number:2d} {name:<{width}} {value >> number & 1}  {meaning}")
    lines += [
        f"  bit {n:2d} {'':<{width}} 1  not modelled: see the manual"
        for n in unnamed_bits(value, bits)
    ]
    return "\n".join(lines)


def format_outcome(result: AccessResult) -> str:
    """How one access ended, as the guest or the VMM sees it: a value, a guest exception
    (#PF with its error code and CR2, #GP), or an exit to userspace (KVM_EXIT_MMIO ...)."""
    if isinstance(result.fault, PageFault):
        code = result.fault.error_code
        names = " ".join(bit_names(code, PF_ERROR_CODE_BITS)) or "none set"
        return f"#PF error code {code:#x} ({names}), CR2 {result.fault.cr2:#x}"
    if isinstance(result.fault, GeneralProtection):
        return f"#GP({result.fault.error_code})"
    if isinstance(result.exit, MmioExit):
        kind = "write" if result.exit.is_write else "read"
        return f"KVM_EXIT_MMIO: {kind} of {result.exit.len} bytes at GPA {result.exit.phys_addr:#x}"
    if isinstance(result.exit, InternalError):
        return f"KVM_EXIT_INTERNAL_ERROR ({result.exit.suberror}): {result.exit.detail}"
    return f"value {result.value or 0:#x}"


def format_exits(trace: Trace) -> str:
    """The VM exits of one access, counted by reason: "2 VM exits (48 EPT_VIOLATION x2)"."""
    exits = trace.of_type(VmExit)
    if not exits:
        return "no VM exit"
    counts = Counter(exit_label(e) for e in exits)
    reasons = ", ".join(f"{name} x{n}" for name, n in counts.items())
    return f"{len(exits)} VM exit{'s' if len(exits) > 1 else ''} ({reasons})"


def exit_summaries(trace: Trace) -> list[str]:
    """One line per VM exit of an access: the exit, what the CPU was translating, what KVM
    ran and wrote, and how the access went on: the trace's story without its detail."""
    lines: list[str] = []
    segment: list[Event] = []
    for event in [*trace, None]:
        if event is None or isinstance(event, VmExit):
            if segment and isinstance(segment[0], VmExit):
                lines.append(_exit_summary(len(lines) + 1, segment))
            segment = []
        if event is not None:
            segment.append(event)
    return lines


def _exit_summary(number: int, segment: list[Event]) -> str:
    exit_ = segment[0]
    assert isinstance(exit_, VmExit)
    where = f" at GPA {exit_.gpa:#x}" if exit_.gpa is not None else ""
    if exit_.qualification is not None and exit_.reason == EXIT_REASON_EPT_VIOLATION:
        final = exit_.qualification & EPT_VIOLATION_GVA_TRANSLATED
        where += " (the data's GPA)" if final else " (a guest page table)"
    if exit_.qualification is not None and exit_.reason == SVM_EXIT_NPF:
        final = exit_.qualification & PFERR_GUEST_FINAL
        where += " (the data's GPA)" if final else " (a guest page table)"
        where += f", EXITINFO1 {exit_.qualification:#x}"
        where += f" ({', '.join(exit_info1_names(exit_.qualification))})"
    steps = list(dict.fromkeys(e.function for e in segment if isinstance(e, KvmStep)))
    leaves = sum(1 for e in segment if isinstance(e, SpteWrite) and e.leaf)
    faults = sum(1 for e in segment if isinstance(e, HostPageFault))
    did = " -> ".join(steps) or "nothing"
    extra = f"; {leaves} leaf entr{'y' if leaves == 1 else 'ies'} written" if leaves else ""
    extra += f"; {faults} host page fault{'s' if faults > 1 else ''}" if faults else ""
    then = "retry" if any(isinstance(e, Retry) for e in segment) else "the access ends"
    return f"exit {number}: {exit_label(exit_)}{where}. KVM: {did}{extra}. Then: {then}."


class CollapsedTrace:
    """A trace shown folded: one line per VM exit, with the full trace a click away (an HTML
    `<details>`, in a notebook) or a call away (`format_trace`, in text)."""

    def __init__(self, trace: Trace) -> None:
        self.trace = trace

    @property
    def summary(self) -> str:
        return "\n".join(exit_summaries(self.trace)) or "no VM exit"

    def __repr__(self) -> str:
        return f"{self.summary}\n(the full trace: print(format_trace(trace)))"

    def _repr_html_(self) -> str:
        full = format_trace(self.trace)
        return (
            f"<pre>{html.escape(self.summary)}</pre>"
            f"<details><summary>the full trace ({len(full.splitlines())} lines)</summary>"
            f"<pre>{html.escape(full)}</pre></details>"
        )


# --- why an access ended as it did ---------------------------------------------------------------

# The entry field that grants each right, per format: IA-32e R/W, U/S and XD (SDM Vol 3A 4.6),
# EPT R, W and X (Vol 3C 29.3.3.2).
_RIGHT_FIELDS = {
    "IA-32e": {Rights.W: "rw", Rights.U: "us", Rights.X: "xd"},
    "EPT": {Rights.R: "r", Rights.W: "w", Rights.X: "x"},
}


def explain(result: AccessResult) -> str:
    """Why the access ended as it did, in plain words, from its trace alone: each VM exit on
    the way (which walk stopped, at which entry, and what KVM did), then the outcome: which
    check refused the access, at which level of which dimension, the entry and the bit that
    decided, and what the guest, KVM and the VMM each see."""
    attempts = result.trace.attempts()
    lines = []
    for number, attempt in enumerate(attempts, 1):
        lines += _explain_exits(number, attempt, retried=number < len(attempts))
    return "\n".join([*lines, *_explain_outcome(result)])


def _explain_exits(number: int, events: list[Event], *, retried: bool) -> list[str]:
    """One attempt's VM exit, the walk that caused it and KVM's answer."""
    exits = [e for e in events if isinstance(e, VmExit)]
    if not exits:
        return []
    exit_ = exits[0]
    lines = [f"Attempt {number}: VM exit {exit_label(exit_)}{_exit_place(exit_)}."]
    failed = _failed_second_dimension(events)
    if failed is not None:
        lines.append(f"  {_why_walk_stopped(*failed)}")
        if exit_.reason == EXIT_REASON_EPT_MISCONFIG:
            lines.append(
                "  KVM writes such an entry on purpose for a GPA in no memslot (an MMIO SPTE),"
                " so that each access there exits as a misconfiguration and takes its fast"
                " MMIO path (`handle_ept_misconfig`)."
            )
    if exit_.qualification is not None and exit_.reason == EXIT_REASON_EPT_VIOLATION:
        names = ", ".join(qualification_names(exit_.qualification))
        lines.append(f"  The exit qualification {exit_.qualification:#x} says: {names}.")
    if exit_.qualification is not None and exit_.reason == SVM_EXIT_NPF:
        names = ", ".join(exit_info1_names(exit_.qualification))
        lines.append(f"  EXITINFO1 {exit_.qualification:#x} says: {names}.")
    steps = [e.function for e in events if isinstance(e, KvmStep)]
    if steps:
        lines.append(f"  KVM: {' -> '.join(dict.fromkeys(steps))}.")
    if retried:
        lines.append("  The guest does not see the exit: KVM resumes it at the same instruction.")
    return lines


def _exit_place(exit_: VmExit) -> str:
    if exit_.qualification is not None and exit_.reason in (
        EXIT_REASON_EPT_VIOLATION,
        SVM_EXIT_NPF,
    ):
        final_bit = (
            PFERR_GUEST_FINAL if exit_.reason == SVM_EXIT_NPF else EPT_VIOLATION_GVA_TRANSLATED
        )
        final = exit_.qualification & final_bit
        what = "the final GPA of the access" if final else "a guest page-table entry"
        return f" for GPA {exit_.gpa:#x}, {what}"
    return "" if exit_.gpa is None else f" for GPA {exit_.gpa:#x}"


def _failed_second_dimension(events: list[Event]) -> tuple[WalkRecord, str] | None:
    """The walk that stopped in this attempt and what it walked: the EPT walk of a guest
    table's GPA or of the final GPA, or, under shadow paging, the hardware walk of KVM's
    shadow tables."""
    for event in events:
        if isinstance(event, GuestWalk):
            fault = event.record.fault
            if fault is not None and fault.nested is not None:
                walked = f"The {nested_tree(fault.nested.format)} walk"
                return fault.nested, f"{walked} of GPA {fault.nested.address:#x}"
        if isinstance(event, EptWalk) and event.record.fault is not None:
            walked = f"The {nested_tree(event.record.format)} walk"
            return event.record, f"{walked} of GPA {event.record.address:#x}"
        if isinstance(event, NativeWalk) and event.record.fault is not None:
            walked = f"The hardware walk of KVM's shadow tables for GVA {event.record.address:#x}"
            return event.record, walked
    return None


def _why_walk_stopped(record: WalkRecord, walk_name: str, space: str = "HPA") -> str:
    """Where a walk stopped and the bit of which entry decided it (the entry's address is in
    `space`: a GPA for the guest's tables, an HPA for EPT and KVM's tables)."""
    fault = record.fault
    assert fault is not None
    if fault.level is None or not record.steps:
        return f"{walk_name} stopped before any entry: {fault.detail}."
    step, bit = _deciding_entry(record)
    name = record.format.level_name(step.level)
    where = f"{name} @ {space} {step.entry_address:#x} = {step.value:#018x}"
    if fault.kind is FaultKind.NOT_PRESENT:
        lazily = " (KVM fills the EPT lazily, on violations like this one)"
        text = f"{walk_name} stopped at the {where}, which is not present: {bit}"
        return text + (lazily if isinstance(record.format, EptFormat) else "") + "."
    text = f"{walk_name} stopped at the {where}: {fault.detail}"
    return f"{text}; {bit}." if bit else f"{text}."


def _deciding_entry(record: WalkRecord) -> tuple[WalkStep, str]:
    """The entry that decided a fault, and its deciding bit in words: the not-present or
    misconfigured entry itself, or, for a rights violation, the first entry of the walk
    that withheld the right (rights accumulate by AND, SDM Vol 3A 4.6.1)."""
    fault = record.fault
    assert fault is not None
    steps = record.steps
    last = steps[-1]
    fmt = "EPT" if isinstance(record.format, EptFormat) else "IA-32e"
    if fault.kind is FaultKind.NOT_PRESENT:
        what = "R, W and X (bits 2:0) are all 0" if fmt == "EPT" else "P (bit 0) is 0"
        return last, what
    if fault.kind is not FaultKind.PERMISSION:
        return last, ""
    for right, key in _RIGHT_FIELDS[fmt].items():
        if right in last.rights or not _needs(record.access, right, fmt):
            continue
        step = next(s for s in steps if right not in s.rights)
        field = step.entry.layout.field(key)
        return step, f"{field.name} (bit {field.low}) is {field.extract(step.value)} there"
    return last, ""


def _needs(access: Access, right: Rights, fmt: str) -> bool:
    """Whether the access needs `right` (a user access needs U; a write W; a fetch X; an EPT
    access R for a read)."""
    if right is Rights.U:
        return access.user
    if right is Rights.W:
        return access.is_write
    if right is Rights.X:
        return access.is_fetch
    return fmt == "EPT" and access.kind is AccessKind.READ


def _explain_outcome(result: AccessResult) -> list[str]:
    """What the access came to, and who sees what."""
    if isinstance(result.exit, MmioExit):
        return [
            f"GPA {result.exit.phys_addr:#x} is in no memslot: no RAM is behind it, so KVM"
            f" cannot map it and hands the access to the VMM ({format_outcome(result)}). The"
            " VMM emulates the device; the guest never sees a fault."
        ]
    if isinstance(result.exit, InternalError):
        return [f"KVM could not emulate the access: {result.exit.detail}."]
    if isinstance(result.fault, GeneralProtection):
        return [
            "The GVA is not canonical (its unused high bits are not copies of the top"
            " translated bit), so there is nothing to walk: the guest gets #GP(0) (SDM Vol 3A"
            " 4.5); KVM and the VMM see nothing."
        ]
    if isinstance(result.fault, PageFault):
        return _explain_page_fault(result, result.fault)
    return [f"The access completed: {format_outcome(result)}{_route(result)}."]


def _route(result: AccessResult) -> str:
    parts = [f"{name} {value:#x}" for name, value in (("GPA", result.gpa), ("HPA", result.hpa))]
    return "" if result.gpa is None else f", through {' -> '.join(parts)}"


def _explain_page_fault(result: AccessResult, fault: PageFault) -> list[str]:
    walks = [e.record for e in result.trace if isinstance(e, GuestWalk | KvmWalk | NativeWalk)]
    shadowed = any(isinstance(e, KvmWalk) for e in result.trace)
    guest = next((r for r in reversed(walks) if not isinstance(r.format, EptFormat)), None)
    names = " ".join(bit_names(fault.error_code, PF_ERROR_CODE_BITS)) or "none set"
    sees = f"The guest sees #PF, error code {fault.error_code:#x} ({names}), CR2 {fault.cr2:#x}"
    who = (
        "KVM walked the guest's tables in software (shadow paging) and injected the #PF"
        if shadowed
        else "with EPT the fault goes straight to the guest: KVM and the VMM see nothing"
    )
    lines = ["The guest's own page tables refused the access."]
    if guest is not None and guest.fault is not None:
        walked = f"The walk of the guest's tables for GVA {guest.address:#x}"
        lines.append(f"  {_why_walk_stopped(guest, walked, space='GPA')}")
    return [*lines, f"  {sees}; {who}."]
