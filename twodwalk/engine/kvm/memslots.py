"""KVM memslots: the table that turns a guest-physical address into a host-virtual one.

`set_user_memory_region` follows `KVM_SET_USER_MEMORY_REGION` (Documentation/virt/kvm/api.rst)
and its checks in virt/kvm/kvm_main.c `__kvm_set_memory_region` in the kernel's order, failing
with the same errno. Translation is `__gfn_to_hva_memslot`: hva = userspace_addr +
(gfn - base_gfn) * 4096. The dirty bitmap is KVM's (one bit per page, bit 0 = first page).
Each address space has its own generation, bumped by every swap of its memslot array
(`kvm_swap_active_memslots`): once for CREATE and FLAGS_ONLY, twice for DELETE and MOVE.
"""

from __future__ import annotations

import enum
import errno as errno_codes
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from twodwalk.engine.units import PAGE_SHIFT, PAGE_SIZE, hex_repr
from twodwalk.errors import TwodwalkError

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_MEM_GUEST_MEMFD = 1 << 2
KVM_SET_USER_MEMORY_REGION_V1_FLAGS = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY
GUEST_MEMFD_FLAG_MMAP = 1 << 0  # struct kvm_create_guest_memfd flags
GUEST_MEMFD_FLAG_INIT_SHARED = 1 << 1
KVM_USER_MEM_SLOTS = 32764  # x86: KVM_MEM_SLOTS_NUM = SHRT_MAX - KVM_PRIVATE_MEM_SLOTS
KVM_ADDRESS_SPACE_NUM = 2  # x86 with SMM: address space 1 is SMM
KVM_MEM_MAX_NR_PAGES = (1 << 31) - 1


class KvmError(TwodwalkError):
    """A KVM ioctl failed: `errno` is what the kernel returns, the message says which rule."""

    def __init__(self, errno: int, message: str) -> None:
        self.errno = errno
        super().__init__(f"{errno_codes.errorcode[errno]}: {message}")


class Change(enum.Enum):
    """What a successful call did (`enum kvm_mr_change`)."""

    CREATE = "create"
    DELETE = "delete"
    MOVE = "move"
    FLAGS_ONLY = "flags only"
    NONE = "no change"


class BoundFile(Protocol):
    """What a memslot and KVM's MMU use of the guest_memfd a slot is bound to
    (`slot->gmem.file`; the file itself is `guest_memfd.GuestMemfd`)."""

    fd: int
    flags: int
    folios: dict[int, int]
    bindings: list[Memslot]

    def get_folio(self, index: int) -> int: ...


@hex_repr
@dataclass
class Memslot:
    """One memslot: a guest-physical range backed by a range of the VMM's virtual memory."""

    as_id: int
    id: int
    base_gfn: int
    npages: int
    userspace_addr: int
    flags: int
    dirty_bitmap: bytearray | None = field(default=None, repr=False)
    gmem: BoundFile | None = field(default=None, repr=False)  # `slot->gmem.file`
    gmem_pgoff: int = field(default=0, repr=False)  # `slot->gmem.pgoff`: file page of base_gfn

    @property
    def gmem_only(self) -> bool:
        """KVM_MEMSLOT_GMEM_ONLY, which `kvm_gmem_bind` sets when the file can be mmapped:
        every fault on the slot, shared or private, takes its page from the guest_memfd."""
        return self.gmem is not None and bool(self.gmem.flags & GUEST_MEMFD_FLAG_MMAP)

    def gmem_index(self, gfn: int) -> int:
        """`kvm_gmem_get_index`: the file page that backs `gfn`."""
        return gfn - self.base_gfn + self.gmem_pgoff

    @property
    def slot(self) -> int:
        """The `slot` field of KVM_SET_USER_MEMORY_REGION: address space in bits 31:16, slot
        id in bits 15:0."""
        return self.as_id << 16 | self.id

    @property
    def guest_phys_addr(self) -> int:
        return self.base_gfn << PAGE_SHIFT

    @property
    def memory_size(self) -> int:
        return self.npages << PAGE_SHIFT

    @property
    def readonly(self) -> bool:
        return bool(self.flags & KVM_MEM_READONLY)

    @property
    def dirty_logging(self) -> bool:
        return bool(self.flags & KVM_MEM_LOG_DIRTY_PAGES)

    def contains(self, gfn: int) -> bool:
        return self.base_gfn <= gfn < self.base_gfn + self.npages

    def gfn_to_hva(self, gfn: int) -> int:
        """`__gfn_to_hva_memslot`."""
        return self.userspace_addr + ((gfn - self.base_gfn) << PAGE_SHIFT)

    def hva_to_gfn(self, hva: int) -> int:
        """`hva_to_gfn_memslot`: the inverse, used by the MMU notifiers."""
        return self.base_gfn + ((hva - self.userspace_addr) >> PAGE_SHIFT)

    def mark_dirty(self, gfn: int) -> None:
        """`mark_page_dirty_in_slot`: set the page's bit when dirty logging is on."""
        if self.dirty_bitmap is not None:
            rel = gfn - self.base_gfn
            self.dirty_bitmap[rel >> 3] |= 1 << (rel & 7)


@dataclass(frozen=True)
class MemslotChange:
    """The result of a `set_user_memory_region` call: what changed, from what, to what."""

    change: Change
    old: Memslot | None
    new: Memslot | None


class Memslots:
    """All memslots of a VM, in their address spaces, with the generation counters that
    invalidate cached MMIO entries (`kvm_memslots.generation`)."""

    def __init__(self, max_gpa_bits: int, address_spaces: int = KVM_ADDRESS_SPACE_NUM) -> None:
        """`address_spaces`: 2 on x86 with SMM (`kvm_arch_nr_memslot_as_ids`); a KVM
        without SMM, such as the PVM flavour, has 1 (KVM_CAP_MULTI_ADDRESS_SPACE = 0)."""
        self.max_gpa_bits = max_gpa_bits
        self.address_spaces = address_spaces
        self.slots: dict[tuple[int, int], Memslot] = {}
        # kvm_create_vm: address space i starts at generation i; swaps add the number of
        # address spaces, so generations stay unique across them
        self.generations = list(range(address_spaces))
        # kvm_dirty_log_manual_protect_and_init_set: new dirty bitmaps start all set
        self.dirty_log_initially_set = False

    @property
    def generation(self) -> int:
        """The generation of address space 0, the one a vCPU outside SMM uses
        (`kvm_vcpu_memslots`)."""
        return self.generations[0]

    def set_user_memory_region(
        self,
        slot: int,
        flags: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int,
        *,
        guest_memfd_offset: int = 0,
        bind: Callable[[Memslot], None] | None = None,
        v2: bool = False,
    ) -> MemslotChange:
        """Create, delete (size 0), move or re-flag a slot; raise KvmError as the kernel does.
        `v2`: the call is KVM_SET_USER_MEMORY_REGION2, which alone takes KVM_MEM_GUEST_MEMFD;
        `bind` binds a new guest_memfd slot to its file (`kvm_gmem_bind`), at the point of
        `kvm_set_memory_region` where the kernel does it."""
        for name, value in (
            ("slot", slot),
            ("flags", flags),
            ("guest_phys_addr", guest_phys_addr),
            ("memory_size", memory_size),
            ("userspace_addr", userspace_addr),
            ("guest_memfd_offset", guest_memfd_offset),
        ):
            struct = "kvm_userspace_memory_region2" if v2 else "kvm_userspace_memory_region"
            check_uapi_int(name, value, 32 if name in ("slot", "flags") else 64, struct)
        _check_flags(flags, v2)
        as_id, sid = slot_ids(slot)
        _validate(
            flags, guest_phys_addr, memory_size, userspace_addr, as_id, sid, self.address_spaces
        )
        _check_gmem_offset(flags, guest_memfd_offset, memory_size)
        old = self.slots.get((as_id, sid))
        if memory_size == 0:
            if old is None:
                raise KvmError(errno_codes.EINVAL, f"slot {sid} is empty: nothing to delete")
            return self._commit((as_id, sid), MemslotChange(Change.DELETE, old, None))
        base_gfn, npages = guest_phys_addr >> PAGE_SHIFT, memory_size >> PAGE_SHIFT
        new = Memslot(as_id, sid, base_gfn, npages, userspace_addr, flags)
        change = _classify(old, new)
        if change is Change.NONE:
            return MemslotChange(Change.NONE, old, old)
        if change in (Change.CREATE, Change.MOVE):
            self._check_overlap(new)
            self._check_max_gfn(new)
        if new.flags & KVM_MEM_GUEST_MEMFD:
            assert bind is not None, "a guest_memfd slot needs its file"
            new.gmem_pgoff = guest_memfd_offset >> PAGE_SHIFT
            bind(new)
        if new.dirty_logging:
            new.dirty_bitmap = self._dirty_bitmap(old, npages)
        return self._commit((as_id, sid), MemslotChange(change, old, new))

    def _dirty_bitmap(self, old: Memslot | None, npages: int) -> bytearray:
        """`kvm_prepare_memory_region`: keep the old slot's bitmap, or allocate one
        (`kvm_dirty_bitmap_bytes`: one bit per page, rounded up to whole longs), all set
        with KVM_DIRTY_LOG_INITIALLY_SET (`bitmap_set`)."""
        if old is not None and old.dirty_bitmap is not None:
            return old.dirty_bitmap
        bitmap = bytearray((npages + 63) // 64 * 8)
        if self.dirty_log_initially_set:
            for page in range(npages):
                bitmap[page >> 3] |= 1 << (page & 7)
        return bitmap

    def _check_max_gfn(self, new: Memslot) -> None:
        """x86 `kvm_arch_prepare_memory_region`: the last GFN must be one the MMU can map."""
        if new.base_gfn + new.npages > 1 << (self.max_gpa_bits - PAGE_SHIFT):
            raise KvmError(
                errno_codes.EINVAL,
                f"the slot ends at GPA {new.guest_phys_addr + new.memory_size:#x}, beyond"
                f" the {self.max_gpa_bits}-bit guest-physical space (kvm_mmu_max_gfn)",
            )

    def _check_overlap(self, new: Memslot) -> None:
        for (as_id, sid), other in self.slots.items():
            if as_id != new.as_id or sid == new.id:
                continue
            if (
                new.base_gfn < other.base_gfn + other.npages
                and other.base_gfn < new.base_gfn + new.npages
            ):
                raise KvmError(
                    errno_codes.EEXIST,
                    f"GPA range [{new.guest_phys_addr:#x}, "
                    f"{new.guest_phys_addr + new.memory_size:#x}) overlaps slot {sid}"
                    f" [{other.guest_phys_addr:#x}, "
                    f"{other.guest_phys_addr + other.memory_size:#x})",
                )

    def _commit(self, key: tuple[int, int], result: MemslotChange) -> MemslotChange:
        """`kvm_set_memslot`: DELETE and MOVE first swap in the old slot marked INVALID
        (`kvm_invalidate_memslot`), then the final array; each `kvm_swap_active_memslots`
        adds the number of address spaces to that address space's generation."""
        if result.new is None:
            del self.slots[key]
            if result.old is not None and result.old.gmem is not None:
                result.old.gmem.bindings.remove(result.old)  # kvm_free_memslot -> unbind
        else:
            self.slots[key] = result.new
        swaps = 2 if result.change in (Change.DELETE, Change.MOVE) else 1
        self.generations[key[0]] += swaps * self.address_spaces
        return result

    def gfn_to_memslot(self, gfn: int, as_id: int = 0) -> Memslot | None:
        """`gfn_to_memslot`: the slot covering a GFN, or None (an MMIO hole)."""
        for (slot_as, _), slot in self.slots.items():
            if slot_as == as_id and slot.contains(gfn):
                return slot
        return None

    def dirty_log_slot(self, slot: int) -> Memslot:
        """The memslot KVM_GET_DIRTY_LOG or KVM_CLEAR_DIRTY_LOG names, with its bitmap:
        EINVAL for a slot number out of range, ENOENT for a slot that does not log."""
        as_id, sid = check_slot_number(slot, self.address_spaces)
        memslot = self.slots.get((as_id, sid))
        if memslot is None or memslot.dirty_bitmap is None:
            raise KvmError(
                errno_codes.ENOENT,
                f"slot {sid} has no dirty log: create it with KVM_MEM_LOG_DIRTY_PAGES",
            )
        return memslot


def dirty_pages(bitmap: bytes) -> list[int]:
    """The pages, numbered from the start of the memslot, whose bits a KVM_GET_DIRTY_LOG
    bitmap sets: bit i is page i (longs in little-endian order, so byte i // 8, bit i % 8;
    `kvm_get_dirty_log_protect`)."""
    return [page for page in range(8 * len(bitmap)) if bitmap[page // 8] >> page % 8 & 1]


def slot_ids(slot: int) -> tuple[int, int]:
    """(address space, slot id) of an ioctl's `slot` field: bits 31:16 and 15:0 (the inverse
    of `Memslot.slot`)."""
    return slot >> 16, slot & 0xFFFF


def check_slot_number(slot: int, address_spaces: int) -> tuple[int, int]:
    """(address space, slot id) of a dirty-log ioctl's `slot`: bits 31:16 and 15:0, each
    in range, or EINVAL (`kvm_get_dirty_log_protect`, `kvm_clear_dirty_log_protect`)."""
    check_uapi_int("slot", slot, 32, "kvm_dirty_log")
    as_id, sid = slot_ids(slot)
    if as_id >= address_spaces or sid >= KVM_USER_MEM_SLOTS:
        raise KvmError(errno_codes.EINVAL, f"slot {slot:#x} is not a valid slot number")
    return as_id, sid


def check_uapi_int(
    name: str, value: object, width: int, struct: str = "kvm_userspace_memory_region"
) -> None:
    """A field of an ioctl's struct must be an int that fits it."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << width:
        raise TwodwalkError(
            f"{name}={value!r} is not valid: it is a __u{width} in"
            f" struct {struct} (0 .. 2**{width}-1)"
        )


def _check_flags(flags: int, v2: bool) -> None:
    """`kvm_vm_ioctl`: the legacy ioctl takes only the V1 flags; then
    `check_memory_region_flags`: KVM_MEM_GUEST_MEMFD (which x86's default VM type supports
    in 6.18) excludes dirty logging and KVM_MEM_READONLY."""
    if not v2 and flags & ~KVM_SET_USER_MEMORY_REGION_V1_FLAGS:
        raise KvmError(
            errno_codes.EINVAL,
            f"flags={flags:#x} has bits {flags & ~KVM_SET_USER_MEMORY_REGION_V1_FLAGS:#x} that"
            " KVM_SET_USER_MEMORY_REGION does not take: only KVM_MEM_LOG_DIRTY_PAGES (1) and"
            " KVM_MEM_READONLY (2); KVM_MEM_GUEST_MEMFD needs KVM_SET_USER_MEMORY_REGION2",
        )
    valid = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_GUEST_MEMFD
    if flags & KVM_MEM_GUEST_MEMFD:
        valid &= ~KVM_MEM_LOG_DIRTY_PAGES  # dirty logging private memory: not supported
    else:
        valid |= KVM_MEM_READONLY  # read-only slots have MMIO semantics, not for gmem
    if flags & ~valid:
        raise KvmError(
            errno_codes.EINVAL,
            f"flags={flags:#x} has bits {flags & ~valid:#x} that cannot be set here: valid are"
            " KVM_MEM_LOG_DIRTY_PAGES (1), KVM_MEM_READONLY (2) and KVM_MEM_GUEST_MEMFD (4),"
            " and KVM_MEM_GUEST_MEMFD takes neither of the others",
        )


def _check_gmem_offset(flags: int, offset: int, size: int) -> None:
    """`kvm_set_memory_region`: a guest_memfd slot's file offset is page aligned and the
    range does not wrap (checked between access_ok and the slot number in the kernel; the
    two never fail together here, so it comes after them)."""
    if flags & KVM_MEM_GUEST_MEMFD and (offset % PAGE_SIZE or offset + size >= 1 << 64):
        raise KvmError(
            errno_codes.EINVAL,
            f"guest_memfd_offset={offset:#x} is not page aligned, or offset + size wraps",
        )


def _validate(
    flags: int, gpa: int, size: int, hva: int, as_id: int, sid: int, address_spaces: int
) -> None:
    """The checks of `__kvm_set_memory_region`, in order."""
    rules = [
        (size % PAGE_SIZE, f"memory_size={size:#x} is not a multiple of 4 KiB"),
        (gpa % PAGE_SIZE, f"guest_phys_addr={gpa:#x} is not 4 KiB aligned"),
        (hva % PAGE_SIZE, f"userspace_addr={hva:#x} is not 4 KiB aligned"),
        (
            not _access_ok(hva, size),
            f"userspace_addr={hva:#x} + memory_size={size:#x} is not"
            " user memory (access_ok fails; user addresses end at"
            " 0x7ffffffff000)",
        ),
        (
            as_id >= address_spaces,
            f"address space {as_id} does not exist: this KVM has {address_spaces}"
            " (x86 with SMM has 0 and 1)",
        ),
        (
            sid >= KVM_USER_MEM_SLOTS,
            f"slot id {sid} is too large: user slots are below {KVM_USER_MEM_SLOTS}",
        ),
        (gpa + size >= 1 << 64, f"guest_phys_addr={gpa:#x} + memory_size={size:#x} overflows"),
        (
            (size >> PAGE_SHIFT) > KVM_MEM_MAX_NR_PAGES,
            f"memory_size={size:#x} is more than 2**31-1 pages",
        ),
    ]
    for broken, message in rules:
        if broken:
            raise KvmError(errno_codes.EINVAL, message)


def _access_ok(hva: int, size: int) -> bool:
    """x86-64 `access_ok`: the whole range lies below TASK_SIZE_MAX and does not wrap."""
    return hva + size <= (1 << 47) - PAGE_SIZE


def _classify(old: Memslot | None, new: Memslot) -> Change:
    """CREATE, MOVE, FLAGS_ONLY or NONE; other changes to an existing slot are EINVAL."""
    if old is None:
        return Change.CREATE
    if new.flags & KVM_MEM_GUEST_MEMFD or old.gmem is not None:
        # kvm_set_memory_region: "private memslots are immutable, they can only be
        # deleted" (it tests the new flags); dropping the flag from a guest_memfd slot is
        # refused too on Linux 6.18 (seen on the real KVM by realkvm.guest_memfd).
        raise KvmError(
            errno_codes.EINVAL,
            f"slot {old.id} exists: a guest_memfd slot cannot be changed, only deleted, and"
            " an existing slot cannot become one",
        )
    if new.userspace_addr != old.userspace_addr:
        raise KvmError(
            errno_codes.EINVAL,
            f"slot {old.id} exists: its userspace_addr cannot"
            " change (delete it and create it again)",
        )
    if new.npages != old.npages:
        raise KvmError(errno_codes.EINVAL, f"slot {old.id} exists: its size cannot change")
    if (new.flags ^ old.flags) & KVM_MEM_READONLY:
        raise KvmError(
            errno_codes.EINVAL, f"slot {old.id} exists: KVM_MEM_READONLY cannot be toggled"
        )
    if new.base_gfn != old.base_gfn:
        return Change.MOVE
    if new.flags != old.flags:
        return Change.FLAGS_ONLY
    return Change.NONE
