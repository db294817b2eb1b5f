"""guest_memfd: guest memory that is a file of the VM's, not memory of the VMM's (Linux 6.18
virt/kvm/guest_memfd.c).

`KVM_CREATE_GUEST_MEMFD` makes an anonymous file whose pages are allocated on first use (a
fault, or `fallocate`) and freed by `fallocate(PUNCH_HOLE)`; a memslot bound to it
(`KVM_SET_USER_MEMORY_REGION2` with `KVM_MEM_GUEST_MEMFD`) names guest memory by file offset:
KVM resolves a GFN with `kvm_gmem_get_pfn` (index = gfn - base_gfn + pgoff), with no HVA and
no walk of the VMM's page tables. The file's pages are unevictable and not movable, and in
6.18 always 4 KiB folios (`max_order` 0). Punching a hole first zaps KVM's mappings of the
affected GFNs (`kvm_gmem_invalidate_begin`, the counterpart of the MMU notifiers).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from twodwalk.engine.host import SigbusError
from twodwalk.engine.kvm.memslots import (
    GUEST_MEMFD_FLAG_INIT_SHARED as GUEST_MEMFD_FLAG_INIT_SHARED,
)
from twodwalk.engine.kvm.memslots import GUEST_MEMFD_FLAG_MMAP as GUEST_MEMFD_FLAG_MMAP
from twodwalk.engine.kvm.memslots import KvmError
from twodwalk.engine.units import PAGE_SHIFT, PAGE_SIZE, hex_repr

if TYPE_CHECKING:
    from twodwalk.engine.host import HostKernel, Process
    from twodwalk.engine.kvm.memslots import Memslot
    from twodwalk.engine.kvm.mmu import KvmMmu

FALLOC_FL_KEEP_SIZE = 0x01  # include/uapi/linux/falloc.h
FALLOC_FL_PUNCH_HOLE = 0x02


@hex_repr
@dataclass
class GuestMemfd:
    """One guest_memfd file: its VM (the MMU KVM zaps through), size and flags, the folios
    its page cache holds (file index -> HPA) and the memslots bound to ranges of it."""

    fd: int
    mmu: KvmMmu = field(repr=False)
    size: int
    flags: int
    folios: dict[int, int] = field(default_factory=dict, repr=False)
    bindings: list[Memslot] = field(default_factory=list, repr=False)

    @property
    def host(self) -> HostKernel:
        return self.mmu.host

    def get_folio(self, index: int) -> int:
        """`kvm_gmem_get_folio`: the page at file index `index`, allocated and zeroed on
        first use (`__filemap_get_folio` with FGP_CREAT, then `clear_highpage`)."""
        frame = self.folios.get(index)
        if frame is None:
            frame = self.host.new_frame()
            self.host.memory.zero_frame(frame)
            self.folios[index] = frame
        return frame

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        """`kvm_gmem_fallocate`: KEEP_SIZE is required and PUNCH_HOLE the only other mode
        (EOPNOTSUPP); offset and length page aligned (EINVAL). Allocating past the end is
        EINVAL; punching frees the pages after zapping every mapping of them."""
        if not mode & FALLOC_FL_KEEP_SIZE or mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE):
            raise KvmError(
                errno.EOPNOTSUPP,
                f"fallocate mode {mode:#x}: guest_memfd takes FALLOC_FL_KEEP_SIZE (1), with or"
                " without FALLOC_FL_PUNCH_HOLE (2)",
            )
        if offset % PAGE_SIZE or length % PAGE_SIZE:
            raise KvmError(
                errno.EINVAL, f"offset={offset:#x} and len={length:#x} must be page aligned"
            )
        first, end = offset >> PAGE_SHIFT, (offset + length) >> PAGE_SHIFT
        if mode & FALLOC_FL_PUNCH_HOLE:
            self.punch_hole(first, end)
            return
        if offset + length > self.size:
            raise KvmError(
                errno.EINVAL,
                f"[{offset:#x}, {offset + length:#x}) goes past the file's end {self.size:#x}"
                " (a guest_memfd's size is fixed)",
            )
        for index in range(first, end):
            self.get_folio(index)

    def punch_hole(self, first: int, end: int) -> None:
        """`kvm_gmem_punch_hole`: zap KVM's mappings of the GFNs bound to file indices
        [first, end) (`kvm_gmem_invalidate_begin` -> `kvm_mmu_unmap_gfn_range`), then free
        the pages (`truncate_inode_pages_range`); the next access gets a new zeroed page."""
        self.mmu.gmem_invalidate(self, first, end)
        self.host.unmap_mapping_range(self, first, end)
        for index in [i for i in self.folios if first <= i < end]:
            self.host.put_frame(self.folios.pop(index))

    def mmap(self, process: Process, size: int, offset: int = 0) -> int:
        """mmap(MAP_SHARED) of the file into `process` (`kvm_gmem_mmap`): ENODEV unless
        the file was created with GUEST_MEMFD_FLAG_MMAP. Touching a page through the
        mapping is SIGBUS past the file's end or when the memory is not shared."""
        if not self.flags & GUEST_MEMFD_FLAG_MMAP:
            raise KvmError(
                errno.ENODEV,
                f"guest_memfd {self.fd} was created without GUEST_MEMFD_FLAG_MMAP: it cannot"
                " be mapped",
            )
        return process.mmap_shared(self, size, offset, name=f"guest_memfd {self.fd}")

    def fault_user_mapping(self, index: int) -> int:
        """`kvm_gmem_fault_user_mapping`: SIGBUS past the end of the file, and for every
        page unless the file was created GUEST_MEMFD_FLAG_INIT_SHARED (its memory is not
        the VMM's to touch); else the page, allocated and zeroed on first use."""
        if index << PAGE_SHIFT >= self.size:
            raise SigbusError(
                f"guest_memfd {self.fd}: offset {index << PAGE_SHIFT:#x} is past"
                f" the end of the file ({self.size:#x}): SIGBUS"
            )
        if not self.flags & GUEST_MEMFD_FLAG_INIT_SHARED:
            raise SigbusError(
                f"guest_memfd {self.fd} was created without GUEST_MEMFD_FLAG_INIT_SHARED: its"
                " pages are not shared with the VMM, and touching one through the mapping is"
                " SIGBUS"
            )
        return self.get_folio(index)

    def check_bind(self, offset: int, npages: int) -> None:
        """`kvm_gmem_bind`'s rules for a new memslot of `npages` pages at file `offset`: page
        aligned, inside the file, and no page of the range bound to another slot (EINVAL)."""
        if offset % PAGE_SIZE or offset + (npages << PAGE_SHIFT) > self.size:
            raise KvmError(
                errno.EINVAL,
                f"guest_memfd_offset={offset:#x} + {npages} pages does not fit the"
                f" {self.size:#x}-byte guest_memfd {self.fd}, or is not page aligned",
            )
        first = offset >> PAGE_SHIFT
        for slot in self.bindings:
            if slot.gmem_pgoff < first + npages and first < slot.gmem_pgoff + slot.npages:
                raise KvmError(
                    errno.EINVAL,
                    f"file pages [{first:#x}, {first + npages:#x}) of guest_memfd {self.fd}"
                    f" overlap those bound to memslot {slot.id}",
                )
