"""The host kernel: the VMM process, its VMAs and page tables, demand paging, and what-ifs.

HVA -> HPA is an ordinary process's translation: the VMM ("qemu") mmaps guest RAM, and the
host kernel fills in x86-64 page tables for it in host physical memory on demand (Linux
mm/memory.c `handle_mm_fault`). A first read of anonymous memory maps the shared zero page
read-only (`do_anonymous_page`); the first write breaks copy-on-write into a fresh frame
(`do_wp_page` -> `wp_page_copy`). Every change to a mapping that KVM may have copied into EPT
is bracketed by the MMU notifiers (`mmu_notifier_invalidate_range_start` before,
`mmu_notifier_invalidate_range_end` after), as swap-out, migration, KSM, THP split/collapse and
munmap do in Linux.

Simplification, said once: THP read faults allocate a huge page (as with
/sys/kernel/mm/transparent_hugepage/use_zero_page=0); there is no huge zero page. 1 GiB pages
come from hugetlbfs (a VMA of 1 GiB pages), as QEMU's `-mem-path /dev/hugepages1G` gives.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Protocol

from twodwalk.engine.cpuid import CpuModel
from twodwalk.engine.formats import PTE_ACCESSED, PTE_DIRTY, PTE_WRITABLE, ia32e_format
from twodwalk.engine.memory import FrameAllocator, PhysicalMemory
from twodwalk.engine.pagetables import PageTables
from twodwalk.engine.paging import PagingControls, X86AccessRules
from twodwalk.engine.tables import PhysicalTables
from twodwalk.engine.trace import HostPageFault, HostWalk, Trace
from twodwalk.engine.units import (
    GIGANTIC_PAGE_SIZE,
    HUGE_PAGE_SIZE,
    PAGE_SHIFT,
    PAGE_SIZE,
    hex_repr,
)
from twodwalk.engine.walker import Access, AccessKind, Translation, WalkRecord, walk
from twodwalk.errors import TwodwalkError, check_aligned, check_int

HPAGE_PMD_NR = HUGE_PAGE_SIZE // PAGE_SIZE  # 512 PTEs under one PMD
TASK_SIZE_MAX = (1 << 47) - PAGE_SIZE  # arch/x86/include/asm/page_64_types.h, 4-level host
MMAP_BASE = 0x7F00_0000_0000
SWP_TYPE_BITS = 5  # arch/x86/include/asm/pgtable_64.h: swap entries in non-present PTEs
SWP_OFFSET_FIRST_BIT = 9
_PAGE_SPECIAL = 1  # AVL field value: bit 9, _PAGE_BIT_SPECIAL (zero page)
_HOST_RULES = X86AccessRules(PagingControls(cr0_wp=True, efer_nxe=True))
_PAGE_TABLE = {"a": 1}  # arch/x86/include/asm/pgtable_types.h: user tables are made accessed


def swp_entry_pte(swap_type: int, offset: int) -> int:
    """A swap entry as Linux stores it in a not-present x86-64 PTE: the type in bits 63:59,
    the offset inverted (an L1TF mitigation) in bits 58:9 (`__swp_entry`)."""
    shift = SWP_OFFSET_FIRST_BIT + SWP_TYPE_BITS
    inverted = ((~offset << shift) & ((1 << 64) - 1)) >> SWP_TYPE_BITS
    return inverted | swap_type << (64 - SWP_TYPE_BITS)


def swp_offset(pte: int) -> int:
    """The swap offset of a swap PTE (`__swp_offset`)."""
    shift = SWP_OFFSET_FIRST_BIT + SWP_TYPE_BITS
    return (~pte << SWP_TYPE_BITS & ((1 << 64) - 1)) >> shift


class SigbusError(TwodwalkError):
    """A fault the mapping's file refused (`VM_FAULT_SIGBUS`): the process gets SIGBUS."""


class SharedFile(Protocol):
    """A file a process maps MAP_SHARED (here, a guest_memfd): its pages are its page
    cache's, found by file index (`vm_operations_struct.fault`)."""

    def fault_user_mapping(self, index: int) -> int:
        """The HPA of page `index` for a user mapping, or SigbusError."""
        ...


@hex_repr
@dataclass
class Vma:
    """A virtual memory area: [start, end), anonymous (4 KiB pages or THP-backed) or a
    shared mapping of a file from page `pgoff` on."""

    start: int
    end: int
    page_size: int
    name: str
    file: SharedFile | None = None
    pgoff: int = 0

    @property
    def huge(self) -> bool:
        return self.page_size > PAGE_SIZE


class MmuNotifier(Protocol):
    """A listener for changes to a process's mappings (include/linux/mmu_notifier.h): told
    before the change (`invalidate_range_start`) and after it (`invalidate_range_end`). The
    notifier runs in the thread that changes the mapping: when that is a fault taken for an
    access (a copy-on-write break inside KVM's `hva_to_pfn`), `trace` is that access's."""

    def invalidate_range_start(
        self, process: Process, start: int, end: int, reason: str, trace: Trace | None
    ) -> None: ...

    def invalidate_range_end(self, process: Process, start: int, end: int) -> None: ...

    def clear_flush_young(
        self, process: Process, start: int, end: int, trace: Trace | None
    ) -> bool: ...


@hex_repr
@dataclass(frozen=True)
class UserPage:
    """What get_user_pages found: the host frame of an HVA, its mapping size and writability."""

    hpa: int
    page_size: int
    writable: bool
    record: WalkRecord


class Process:
    """A host process: VMAs and x86-64 page tables in host memory."""

    def __init__(self, kernel: HostKernel, pid: int, name: str) -> None:
        self.kernel = kernel
        self.pid = pid
        self.name = name
        self.vmas: list[Vma] = []
        self.tables = PageTables(
            kernel.format, kernel.memory, kernel.frames.alloc, table_fields=_PAGE_TABLE
        )
        self._mmap_top = MMAP_BASE
        self.files: dict[int, object] = {}  # the file descriptor table (0-2: stdio)

    def install_fd(self, file: object) -> int:
        """`fd_install` at the lowest free descriptor (`get_unused_fd_flags`), from 3 up."""
        fd = next(n for n in range(3, len(self.files) + 4) if n not in self.files)
        self.files[fd] = file
        return fd

    def mmap(
        self,
        size: int,
        huge: bool = False,
        name: str = "anon",
        page_size: int | None = None,
        fixed: int | None = None,
    ) -> int:
        """Anonymous private mapping, placed top-down (mm/mmap.c), or at `fixed` (MAP_FIXED,
        which must not overlap another VMA). `huge` backs it with 2 MiB THP pages;
        `page_size=1 << 30` with 1 GiB hugetlbfs pages. Returns the address."""
        align = page_size or (HUGE_PAGE_SIZE if huge else PAGE_SIZE)
        if align not in self.kernel.allocators:
            sizes = ", ".join(f"{s:#x}" for s in sorted(self.kernel.allocators))
            raise TwodwalkError(f"page_size={align:#x} is not available: this host has {sizes}")
        check_int("size", size, 1, 1 << 46, valid="a positive size below 64 TiB")
        check_aligned("size", size, align)
        if fixed is not None:
            start = check_aligned(
                "fixed",
                check_int("fixed", fixed, 1 << 16, TASK_SIZE_MAX - size, valid="a user address"),
                align,
            )
            if any(v.start < start + size and start < v.end for v in self.vmas):
                raise TwodwalkError(f"fixed={fixed:#x}: the range overlaps an existing mapping")
        else:
            start = (self._mmap_top - size) & ~(align - 1)
            if start < 1 << 32:
                raise MemoryError(f"no room for a mapping of {size:#x} bytes")
            self._mmap_top = start - align
        self.vmas.append(Vma(start, start + size, align, name))
        return start

    def mmap_shared(self, file: SharedFile, size: int, offset: int = 0, name: str = "file") -> int:
        """A MAP_SHARED mapping of `file` from byte `offset` (mm/mmap.c, then the file's
        `mmap` method, which may refuse it), placed top-down. Its pages are the file's."""
        check_aligned("offset", check_int("offset", offset, 0, 1 << 63), PAGE_SIZE)
        start = self.mmap(size, name=name)
        vma = self.vmas[-1]
        vma.file, vma.pgoff = file, offset >> PAGE_SHIFT
        return start

    def munmap(self, hva: int, size: int) -> None:
        """Remove the mapping of [hva, hva+size): notify, clear entries, free frames."""
        check_aligned("hva", hva, PAGE_SIZE)
        check_aligned("size", size, PAGE_SIZE)
        with self.kernel.invalidation(self, hva, hva + size, "munmap"):
            self.zap_range(hva, size)
        self.vmas = [piece for vma in self.vmas for piece in _cut(vma, hva, hva + size)]

    def zap_range(self, hva: int, size: int) -> None:
        """Clear the leaves of [hva, hva+size) and drop their frames (mm/memory.c
        `unmap_page_range`); a huge page must lie wholly inside."""
        va = hva
        while va < hva + size:
            found = self.tables.find_leaf(va)
            page = PAGE_SIZE if found is None else self.kernel.format.page_size(found[1])
            if found is not None:
                if va % page or va + page > hva + size:
                    raise TwodwalkError(
                        f"munmap of [{hva:#x}, {hva + size:#x}) splits a huge"
                        f" page at {va - va % page:#x}: split it first"
                    )
                self.kernel.put_frame(
                    self.kernel.format.output_address(
                        self.kernel.memory.read_u64(found[0]), found[1]
                    )
                )
                self.kernel.memory.write_u64(found[0], 0)
            va += page

    def find_vma(self, hva: int) -> Vma | None:
        return next((v for v in self.vmas if v.start <= hva < v.end), None)


def _cut(vma: Vma, start: int, end: int) -> list[Vma]:
    """What is left of `vma` after [start, end) is unmapped; a file mapping's right piece
    starts that much further into the file."""
    pieces = []
    if vma.start < start:
        pieces.append(replace(vma, end=min(vma.end, start)))
    if vma.end > end:
        right = max(vma.start, end)
        pieces.append(
            replace(vma, start=right, pgoff=vma.pgoff + ((right - vma.start) >> PAGE_SHIFT))
        )
    return pieces if vma.start < end and vma.end > start else [vma]


class HostKernel:
    """The host: one physical memory, page allocators, the zero page, swap, and processes."""

    def __init__(
        self,
        memory: PhysicalMemory,
        cpu: CpuModel,
        frames: FrameAllocator,
        huge_frames: FrameAllocator,
        gigantic_frames: FrameAllocator | None = None,
    ) -> None:
        self.memory = memory
        self.physical_tables = PhysicalTables(memory)  # for walks of tables in host memory
        self.cpu = cpu
        self.frames = frames
        self.huge_frames = huge_frames
        self.allocators = {
            a.frame_size: a for a in (frames, huge_frames, gigantic_frames) if a is not None
        }
        if not cpu.gbpages:
            self.allocators.pop(GIGANTIC_PAGE_SIZE, None)
        self.format = ia32e_format(4, cpu, nxe=True)
        self.zero_page = frames.alloc()
        self.refcount: dict[int, int] = {}
        self.swap: dict[int, bytes] = {}
        self.notifiers: list[MmuNotifier] = []
        self.mmu_notifiers_enabled = True
        self.processes: list[Process] = []
        # /sys/kernel/mm/transparent_hugepage/khugepaged/max_ptes_none and max_ptes_swap
        self.khugepaged_max_ptes_none = HPAGE_PMD_NR - 1
        self.khugepaged_max_ptes_swap = HPAGE_PMD_NR // 8

    def spawn(self, name: str) -> Process:
        process = Process(self, len(self.processes) + 1, name)
        self.processes.append(process)
        return process

    @contextmanager
    def invalidation(
        self, process: Process, start: int, end: int, reason: str, trace: Trace | None = None
    ) -> Iterator[None]:
        """The change made inside the `with` is bracketed by
        `mmu_notifier_invalidate_range_start` and `mmu_notifier_invalidate_range_end`, as
        mm/ does around every change to a mapping; the what-if switch
        `mmu_notifiers_enabled=False` shows what goes wrong without them. `trace` is the
        access whose fault made the change, if one did."""
        listeners = list(self.notifiers) if self.mmu_notifiers_enabled else []
        for listener in listeners:
            listener.invalidate_range_start(process, start, end, reason, trace)
        yield
        for listener in listeners:
            listener.invalidate_range_end(process, start, end)

    # --- demand paging --------------------------------------------------------------------

    def get_user_page(
        self,
        process: Process,
        hva: int,
        write: bool,
        trace: Trace | None = None,
        fault_in: bool = True,
    ) -> UserPage | None:
        """get_user_pages for one page (mm/gup.c): walk the process's tables in software and
        fault the page in if needed. None when the HVA is in no VMA (EFAULT)."""
        if process.find_vma(hva) is None:
            return None
        record = self.walk(process, hva, write)
        if record.fault is not None and fault_in:
            if trace is not None:
                trace.add(HostWalk(record))
            self.handle_mm_fault(process, hva, write, trace)
            record = self.walk(process, hva, write)
        if trace is not None:
            trace.add(HostWalk(record))
        if not isinstance(record.outcome, Translation):
            return None
        page = record.outcome.page_size
        writable = bool(record.leaf & 2)
        return UserPage(record.outcome.address & ~(page - 1), page, writable, record)

    def pagemap(self, process: Process, hva: int) -> int | None:
        """The HPA the process's page tables map `hva` to now, read without faulting and
        without touching A/D, as /proc/PID/pagemap reports it (fs/proc/task_mmu.c
        `pagemap_read`); None when no present entry maps it."""
        page = self.get_user_page(process, hva, False, fault_in=False)
        return None if page is None else page.hpa + (hva & (page.page_size - 1))

    def walk(self, process: Process, hva: int, write: bool) -> WalkRecord:
        """A software walk of the process's page tables, as a user access would see them, by
        get_user_pages (mm/gup.c `follow_page_pte`): it reads entries and sets no A/D bit
        (GUP marks the struct page accessed or dirty, never the PTE)."""
        kind = AccessKind.WRITE if write else AccessKind.READ
        return walk(
            self.format,
            process.tables.root,
            hva,
            Access.of(kind, cpl=3),
            self.physical_tables,
            _HOST_RULES,
            accessed_dirty=False,
        )

    def handle_mm_fault(
        self, process: Process, hva: int, write: bool, trace: Trace | None = None
    ) -> None:
        """Resolve a fault on `hva` as Linux does for private anonymous memory."""
        vma = process.find_vma(hva)
        if vma is None:
            raise TwodwalkError(f"hva={hva:#x} is in no VMA of {process.name}: SIGSEGV")
        if vma.file is not None:
            resolution, hpa = self._file_fault(process, vma, hva, write)
        elif vma.huge and self._huge_slot(process, vma, hva) is not None:
            resolution, hpa = self._huge_fault(process, vma, hva)
        else:
            resolution, hpa = self._pte_fault(process, hva, write, trace)
        if trace is not None:
            trace.add(HostPageFault(hva, write, resolution, hpa))

    def _file_fault(self, process: Process, vma: Vma, hva: int, write: bool) -> tuple[str, int]:
        """mm/memory.c `do_shared_fault`: the file gives the page (or SIGBUS) and the PTE
        maps it shared and writable: no copy-on-write, the page cache's own frame."""
        assert vma.file is not None
        index = vma.pgoff + ((hva - vma.start) >> PAGE_SHIFT)
        frame = vma.file.fault_user_mapping(index)
        slot = process.tables.entry_address(hva, 1, create=True)
        assert slot is not None
        self.refcount[frame] = self.refcount.get(frame, 0) + 1
        self.memory.write_u64(
            slot,
            self.format.encode(1, True, address=frame, p=1, rw=1, us=1, a=1, d=int(write), xd=1),
        )
        return f"page {index:#x} of the shared file mapped", frame

    def unmap_mapping_range(self, file: SharedFile, first: int, end: int) -> None:
        """mm/truncate.c `unmap_mapping_range`: before a file's pages [first, end) go, clear
        every process's PTEs that map them, inside an MMU-notifier invalidation."""
        for process in self.processes:
            for vma in [v for v in process.vmas if v.file is file]:
                lo = max(vma.start, vma.start + ((first - vma.pgoff) << PAGE_SHIFT))
                hi = min(vma.end, vma.start + ((end - vma.pgoff) << PAGE_SHIFT))
                if lo < hi:
                    with self.invalidation(process, lo, hi, "file pages truncated"):
                        process.zap_range(lo, hi - lo)

    def _huge_slot(self, process: Process, vma: Vma, hva: int) -> int | None:
        """The empty PMD (or PUD) slot for a huge fault (`do_huge_pmd_anonymous_page`,
        `hugetlb_fault`), or None once the huge page was split into small ones."""
        slot = process.tables.entry_address(
            hva, self.format.level_for_size(vma.page_size), create=True
        )
        assert slot is not None
        return slot if self.memory.read_u64(slot) == 0 else None

    def _huge_fault(self, process: Process, vma: Vma, hva: int) -> tuple[str, int]:
        frame = self.allocators[vma.page_size].alloc()
        self.refcount[frame] = 1
        slot = self._huge_slot(process, vma, hva)
        assert slot is not None
        level = self.format.level_for_size(vma.page_size)
        self.memory.write_u64(
            slot, self.format.encode(level, True, address=frame, p=1, rw=1, us=1, a=1, d=1, xd=1)
        )
        return f"new zeroed {vma.page_size >> 20} MiB huge page", frame

    def _pte_fault(
        self, process: Process, hva: int, write: bool, trace: Trace | None = None
    ) -> tuple[str, int]:
        slot = process.tables.entry_address(hva, 1, create=True)
        assert slot is not None
        pte = self.memory.read_u64(slot)
        page_va = hva & ~(PAGE_SIZE - 1)
        if pte == 0 and not write:
            self.memory.write_u64(slot, self._pte(self.zero_page, writable=False, special=True))
            return "zero page mapped read-only", self.zero_page
        if pte == 0:
            frame = self.new_frame()
            self.memory.write_u64(slot, self._pte(frame, writable=True))
            return "anonymous page: new zeroed frame", frame
        if not pte & 1:
            frame = self.new_frame()
            offset = swp_offset(pte)
            self.memory.write(frame, self.swap.pop(offset))
            self.memory.write_u64(slot, self._pte(frame, writable=True, dirty=write))
            return f"swap-in from swap offset {offset:#x}", frame
        old = self.format.output_address(pte, 1)
        with self.invalidation(process, page_va, page_va + PAGE_SIZE, "copy-on-write", trace):
            frame = self.new_frame()
            if old != self.zero_page:
                self.memory.copy_frame(old, frame)
            self.put_frame(old)
            self.memory.write_u64(slot, self._pte(frame, writable=True))
        what = "zero page" if old == self.zero_page else f"shared frame {old:#x}"
        return f"copy-on-write break of the {what}", frame

    def _pte(
        self, frame: int, *, writable: bool, dirty: bool | None = None, special: bool = False
    ) -> int:
        """A user PTE for anonymous memory: U/S=1, XD=1, A=1 (x86's vm_page_prot includes
        _PAGE_ACCESSED), D=1 when created writable (`do_anonymous_page`:
        pte_mkdirty(pte_mkwrite(entry)))."""
        d = writable if dirty is None else dirty
        return self.format.encode(
            1,
            True,
            address=frame,
            p=1,
            rw=int(writable),
            us=1,
            a=1,
            d=int(d),
            xd=1,
            avl=_PAGE_SPECIAL if special else 0,
        )

    def new_frame(self) -> int:
        """A free 4 KiB frame with one reference (`alloc_page` for a mapping or a page
        cache, e.g. a guest_memfd's)."""
        frame = self.frames.alloc()
        self.refcount[frame] = 1
        return frame

    def frame_in_use(self, frame: int) -> bool:
        """Whether some mapping still holds the frame (its page count, `page_count`), or
        the allocator may hand it out again."""
        return frame in self.refcount or frame == self.zero_page

    def put_frame(self, frame: int) -> None:
        """Drop one mapping of a frame (a PTE, or a PMD of a THP); free the frame, or the
        whole THP, when no mapping is left. The zero page is never freed."""
        if frame == self.zero_page:
            return
        allocator = next(a for a in self.allocators.values() if a.owns(frame))
        head = frame & ~(allocator.frame_size - 1)
        self.refcount[head] -= 1
        if self.refcount[head] <= 0:
            del self.refcount[head]
            allocator.free(head)

    # --- what-ifs -------------------------------------------------------------------------

    def _pte_of(self, process: Process, hva: int) -> tuple[int, int]:
        """(slot, frame) of a present 4 KiB mapping, or a clear error."""
        check_aligned("hva", hva, PAGE_SIZE)
        vma = process.find_vma(hva)
        if vma is not None and vma.file is not None:
            raise TwodwalkError(
                f"hva={hva:#x} maps a page of {vma.name}: guest_memfd pages are unevictable and"
                " cannot move (mapping_set_unevictable, kvm_gmem_migrate_folio)"
            )
        found = process.tables.find_leaf(hva)
        if found is None:
            raise TwodwalkError(f"hva={hva:#x} is not mapped in {process.name}: touch it first")
        if found[1] != 1:
            raise TwodwalkError(f"hva={hva:#x} is in a 2 MiB THP: split_thp() it first")
        return found[0], self.format.output_address(self.memory.read_u64(found[0]), 1)

    def folio_referenced(self, process: Process, hva: int, trace: Trace | None = None) -> bool:
        """Whether reclaim finds the page at `hva` used since it last looked (mm/rmap.c
        `folio_referenced` -> `folio_referenced_one` -> `ptep_clear_flush_young_notify`):
        test and clear the host PTE's A bit, then ask every MMU notifier
        (`mmu_notifier_clear_flush_young`), because a secondary MMU such as KVM's EPT may
        have used the page without the host PTE ever seeing it."""
        found = process.tables.find_leaf(hva)
        if found is None:
            raise TwodwalkError(f"hva={hva:#x} is not mapped in {process.name}: touch it first")
        entry = self.memory.read_u64(found.slot)
        young = bool(entry & PTE_ACCESSED)
        if young:
            self.memory.write_u64(found.slot, entry & ~PTE_ACCESSED)
        size = self.format.page_size(found.level)
        start = hva & ~(size - 1)
        listeners = list(self.notifiers) if self.mmu_notifiers_enabled else []
        for listener in listeners:
            young |= listener.clear_flush_young(process, start, start + size, trace)
        return young

    def swap_out(self, process: Process, hva: int) -> int:
        """Write a page to swap and free its frame (mm/vmscan.c `shrink_folio_list`,
        `try_to_unmap`). Returns the swap offset; the next touch swaps it back in."""
        slot, frame = self._pte_of(process, hva)
        with self.invalidation(process, hva, hva + PAGE_SIZE, "swap-out"):
            offset = len(self.swap) + 1 + max(self.swap, default=0)
            self.swap[offset] = self.memory.read(frame, PAGE_SIZE)
            self.memory.write_u64(slot, swp_entry_pte(0, offset))
            self.put_frame(frame)
        return offset

    def migrate(self, process: Process, hva: int) -> int:
        """Move a page to another frame (mm/migrate.c `migrate_pages`). Returns the new HPA."""
        slot, frame = self._pte_of(process, hva)
        with self.invalidation(process, hva, hva + PAGE_SIZE, "migration"):
            new = self.new_frame()
            self.memory.copy_frame(frame, new)
            pte = self.memory.read_u64(slot)
            address = self.format.layout(1, False).field("address")
            self.memory.write_u64(slot, address.insert(pte, new))
            self.put_frame(frame)
        return new

    def ksm_merge(self, process: Process, hva: int, other: int) -> int:
        """Merge two identical pages into one write-protected frame (mm/ksm.c
        `try_to_merge_one_page`: write_protect_page, then replace_page). Returns the frame."""
        slot_a, frame_a = self._pte_of(process, hva)
        slot_b, frame_b = self._pte_of(process, other)
        if self.memory.read(frame_a, PAGE_SIZE) != self.memory.read(frame_b, PAGE_SIZE):
            raise TwodwalkError(
                f"pages at {hva:#x} and {other:#x} differ: KSM merges only identical pages"
            )
        for va, slot in ((hva, slot_a), (other, slot_b)):
            with self.invalidation(process, va, va + PAGE_SIZE, "KSM merge"):
                self.memory.write_u64(slot, self._pte(frame_a, writable=False, dirty=False))
        self.refcount[frame_a] += 1
        self.put_frame(frame_b)
        return frame_a

    def split_thp(self, process: Process, hva: int) -> None:
        """Replace a 2 MiB PMD mapping by a page table of 512 PTEs (`__split_huge_pmd`)."""
        base = hva & ~(HUGE_PAGE_SIZE - 1)
        found = process.tables.find_leaf(base)
        if found is None or found[1] != 2:
            raise TwodwalkError(f"hva={hva:#x} is not mapped by a 2 MiB page")
        slot, _ = found
        pmd = self.memory.read_u64(slot)
        frame = self.format.output_address(pmd, 2)
        with self.invalidation(process, base, base + HUGE_PAGE_SIZE, "THP split"):
            table = self.frames.alloc()
            for i in range(HPAGE_PMD_NR):
                pte = self._pte(
                    frame + i * PAGE_SIZE,
                    writable=bool(pmd & PTE_WRITABLE),
                    dirty=bool(pmd & PTE_DIRTY),
                )
                self.memory.write_u64(table + 8 * i, pte)
            self.refcount[frame] = HPAGE_PMD_NR
            link = self.format.encode(2, False, address=table, **process.tables.table_fields)
            self.memory.write_u64(slot, link)

    def collapse_thp(self, process: Process, hva: int) -> int:
        """khugepaged: copy 512 small pages into one 2 MiB page (mm/khugepaged.c
        `collapse_huge_page`) once the scan allows it (`khugepaged_scan_ptes`); swapped-out
        pages are swapped in first (`__collapse_huge_page_swapin`), so their data survives and
        their swap slots are freed. Returns the new 2 MiB frame."""
        base = hva & ~(HUGE_PAGE_SIZE - 1)
        vma = process.find_vma(base)
        if vma is None or vma.page_size != HUGE_PAGE_SIZE or vma.end < base + HUGE_PAGE_SIZE:
            raise TwodwalkError(f"hva={hva:#x} is not in a THP-enabled VMA")
        slot = process.tables.entry_address(base, 2)
        if slot is None or self.format.is_leaf(self.memory.read_u64(slot), 2):
            raise TwodwalkError(f"hva={hva:#x} is not mapped by small pages")
        table = self.format.output_address(self.memory.read_u64(slot), 2)
        ptes = [self.memory.read_u64(table + 8 * i) for i in range(HPAGE_PMD_NR)]
        self.khugepaged_scan_ptes(base, ptes)
        for i, pte in enumerate(ptes):
            if pte and not pte & 1:
                self._pte_fault(process, base + i * PAGE_SIZE, write=False)
        with self.invalidation(process, base, base + HUGE_PAGE_SIZE, "THP collapse"):
            new = self.huge_frames.alloc()
            self.refcount[new] = 1
            for i in range(HPAGE_PMD_NR):
                pte = self.memory.read_u64(table + 8 * i)
                if pte & 1:  # `__collapse_huge_page_copy`: empty and zero-page PTEs stay zero
                    old = self.format.output_address(pte, 1)
                    if old != self.zero_page:
                        self.memory.copy_frame(old, new + i * PAGE_SIZE)
                    self.put_frame(old)
            leaf = self.format.encode(2, True, address=new, p=1, rw=1, us=1, a=1, d=1, xd=1)
            self.memory.write_u64(slot, leaf)
            self.frames.free(table)
        return new

    def khugepaged_scan_ptes(self, base: int, ptes: list[int]) -> None:
        """mm/khugepaged.c `hpage_collapse_scan_pmd`: give up (SCAN_EXCEED_NONE_PTE,
        SCAN_EXCEED_SWAP_PTE) when more PTEs are empty or map the zero page than
        `khugepaged_max_ptes_none`, or more are swap entries than `khugepaged_max_ptes_swap`;
        and (SCAN_LACK_REFERENCED_PAGE) when no page is young, or when swap-in would be needed
        for a range less than half of which is young."""
        present = [pte for pte in ptes if pte & 1]
        swapped = sum(1 for pte in ptes if pte and not pte & 1)
        none = len(ptes) - len(present) - swapped
        none += sum(1 for pte in present if self.format.output_address(pte, 1) == self.zero_page)
        referenced = sum(
            1
            for pte in present
            if pte & PTE_ACCESSED and self.format.output_address(pte, 1) != self.zero_page
        )
        where = f"khugepaged gives up on [{base:#x}, {base + HUGE_PAGE_SIZE:#x}):"
        knobs = "/sys/kernel/mm/transparent_hugepage/khugepaged"
        if none > self.khugepaged_max_ptes_none:
            raise TwodwalkError(
                f"{where} SCAN_EXCEED_NONE_PTE: {none} PTEs are empty or map the zero page,"
                f" more than max_ptes_none={self.khugepaged_max_ptes_none} ({knobs}/max_ptes_none)"
            )
        if swapped > self.khugepaged_max_ptes_swap:
            raise TwodwalkError(
                f"{where} SCAN_EXCEED_SWAP_PTE: {swapped} PTEs are swap entries, more than"
                f" max_ptes_swap={self.khugepaged_max_ptes_swap} ({knobs}/max_ptes_swap)"
            )
        if not referenced or (swapped and referenced < HPAGE_PMD_NR // 2):
            raise TwodwalkError(
                f"{where} SCAN_LACK_REFERENCED_PAGE: {referenced} young pages"
                + (f" for {swapped} to swap in (it wants {HPAGE_PMD_NR // 2})" if swapped else "")
            )
