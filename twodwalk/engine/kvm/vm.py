"""The VM: memslots and the MMU of one KVM virtual machine, bound to its VMM process.

The VM ioctls twodwalk models are KVM_SET_USER_MEMORY_REGION, KVM_GET_DIRTY_LOG and
KVM_CLEAR_DIRTY_LOG. After the memslot rules accept a change, the MMU is told, as
`kvm_set_memslot` does: DELETE and MOVE zap first, and turning dirty logging on or off
protects or recovers the slot's mappings (x86.c `kvm_mmu_slot_apply_flags`).

Dirty logging works in one of three modes (`Vm.set_dirty_log_mode`, `DIRTY_LOG_MODES`): KVM
write-protects pages so each first write exits; or, with Intel PML, clears EPT D bits and lets
the CPU log the pages it dirties; or, with KVM_DIRTY_LOG_INITIALLY_SET, protects nothing until
userspace clears bits with KVM_CLEAR_DIRTY_LOG.
"""

from __future__ import annotations

import errno

from twodwalk.engine.cpuid import CpuModel
from twodwalk.engine.formats import ept_format, npt_format
from twodwalk.engine.host import HostKernel, Process
from twodwalk.engine.kvm.guest_memfd import GuestMemfd
from twodwalk.engine.kvm.memslots import (
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    Change,
    KvmError,
    Memslot,
    MemslotChange,
    Memslots,
    check_slot_number,
    check_uapi_int,
)
from twodwalk.engine.kvm.mmu import ALL_LEVELS, HUGE_LEVELS, PG_LEVEL_4K, TdpMmu
from twodwalk.engine.kvm.shadow import ShadowMmu
from twodwalk.engine.memory import page_pieces
from twodwalk.engine.trace import KvmStep, Trace
from twodwalk.engine.units import PAGE_SHIFT, PAGE_SIZE
from twodwalk.errors import TwodwalkError, check_int

DIRTY_LOG_MODES = {
    "write-protect": "KVM write-protects the logged pages: the first write to each after"
    " KVM_GET_DIRTY_LOG exits (EPT violation or #PF) and KVM logs it",
    "pml": "Intel PML: KVM clears the EPT D bits; the CPU logs each page whose D bit it sets"
    " in a 512-entry buffer, without an exit per page",
    "initially-set": "KVM_DIRTY_LOG_INITIALLY_SET: nothing is protected when logging starts and"
    " every bit starts set; KVM_CLEAR_DIRTY_LOG protects the pages userspace clears",
}
_BITS_PER_LONG = 64


class Vm:
    """One KVM VM (a `struct kvm`): memslots, and the MMU that builds its EPT (TDP) or its
    shadow page tables (EPT off)."""

    def __init__(
        self,
        host: HostKernel,
        vmm: Process,
        cpu: CpuModel,
        *,
        tdp: bool,
        ept_levels: int,
        ept_ad: bool,
    ) -> None:
        self.host = host
        self.vmm = vmm
        self.cpu = cpu
        self.tdp = tdp
        # kvm_mmu_max_gfn: the host MAXPHYADDR with TDP, 52 bits with shadow paging; a
        # 4-level EPT walks only GPA bits 47:0, so above 2**48 no EPT entry can map a page
        # (KVM caps the guest's physical bits at 48 without 5-level TDP: CPUID 0x80000008
        # GuestPhysBits, `kvm_set_cpu_caps`).
        gpa_bits = min(cpu.maxphyaddr, 48 if ept_levels == 4 else 52) if tdp else 52
        self.memslots = Memslots(max_gpa_bits=gpa_bits)
        self.mmu: TdpMmu | ShadowMmu
        if tdp and cpu.vendor == "amd":  # svm.c: NPT in the host's long-mode format
            self.mmu = TdpMmu(host, vmm, self.memslots, npt_format(ept_levels, cpu))
        elif tdp:
            self.mmu = TdpMmu(host, vmm, self.memslots, ept_format(ept_levels, cpu, ept_ad))
        else:
            self.mmu = ShadowMmu(host, vmm, self.memslots, cpu)
        self.dirty_log_mode = "write-protect"

    @property
    def ept(self) -> TdpMmu:
        """The TDP MMU that builds the EPT (or, on AMD, the nested page tables); only with
        tdp=True."""
        if not isinstance(self.mmu, TdpMmu):
            raise TwodwalkError("this VM runs with EPT off (tdp=False): its shadow MMU is vm.mmu")
        return self.mmu

    @property
    def pml(self) -> bool:
        """Whether KVM tracks dirty pages with PML (kvm_intel.enable_pml) rather than
        write protection."""
        return isinstance(self.mmu, TdpMmu) and self.mmu.pml

    @property
    def manual_dirty_log_protect(self) -> bool:
        """KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 with KVM_DIRTY_LOG_INITIALLY_SET enabled."""
        return self.memslots.dirty_log_initially_set

    @property
    def mmu_invalidate_seq(self) -> int:
        """`kvm->mmu_invalidate_seq`: MMU-notifier invalidations completed so far."""
        return self.mmu.mmu_invalidate_seq

    @property
    def mmu_invalidate_in_progress(self) -> int:
        """`kvm->mmu_invalidate_in_progress`: invalidations started and not yet ended."""
        return self.mmu.mmu_invalidate_in_progress

    def set_dirty_log_mode(self, mode: str, *, pml: bool | None = None) -> None:
        """Choose how dirty logging works (see `DIRTY_LOG_MODES`): "write-protect", "pml"
        (needs EPT with A/D bits: vmx.c turns enable_pml off without them), or
        "initially-set" (KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET), as QEMU does
        where it can), tracking pages by PML when `pml` is true (default: when the VM can).
        Only while no memslot logs dirty pages."""
        if mode not in DIRTY_LOG_MODES:
            raise TwodwalkError(
                f"mode={mode!r} is not a dirty-logging mode: valid are {', '.join(DIRTY_LOG_MODES)}"
            )
        mmu = self.mmu
        can_pml = isinstance(mmu, TdpMmu) and not mmu.npt and mmu.ad
        use_pml = mode == "pml" or (mode == "initially-set" and (can_pml if pml is None else pml))
        if pml is not None and mode != "initially-set" and pml != (mode == "pml"):
            raise TwodwalkError(
                f"pml={pml!r} contradicts mode={mode!r}: pml chooses the tracking only for"
                " mode='initially-set'"
            )
        if use_pml and not can_pml:
            raise TwodwalkError(
                f"mode={mode!r} with PML needs Intel's EPT with A/D bits (tdp=True,"
                " ept_ad=True, vendor='intel'): KVM turns PML off without them (vmx.c"
                " hardware_setup), and SVM has no PML"
            )
        if any(slot.dirty_logging for slot in self.memslots.slots.values()):
            raise TwodwalkError(
                f"mode={mode!r}: a memslot logs dirty pages; turn KVM_MEM_LOG_DIRTY_PAGES off first"
            )
        self.dirty_log_mode = mode
        self.memslots.dirty_log_initially_set = mode == "initially-set"
        if isinstance(mmu, TdpMmu):
            mmu.pml = use_pml

    def describe_dirty_log_mode(self) -> str:
        """The mode and what it means, for views."""
        mode = self.dirty_log_mode
        if mode == "initially-set" and self.pml:
            mode += " with PML"
        return f"{mode}: {DIRTY_LOG_MODES[self.dirty_log_mode]}"

    def set_user_memory_region(
        self, slot: int, flags: int, guest_phys_addr: int, memory_size: int, userspace_addr: int
    ) -> MemslotChange:
        """KVM_SET_USER_MEMORY_REGION; raises `KvmError` with the kernel's errno."""
        result = self.memslots.set_user_memory_region(
            slot, flags, guest_phys_addr, memory_size, userspace_addr
        )
        if result.change in (Change.DELETE, Change.MOVE) and result.old is not None:
            self.mmu.zap_memslot(result.old)
        self._slot_apply_flags(result)
        return result

    def set_user_memory_region2(
        self,
        slot: int,
        flags: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int,
        guest_memfd: int | None = None,
        guest_memfd_offset: int = 0,
    ) -> MemslotChange:
        """KVM_SET_USER_MEMORY_REGION2: the same rules, plus KVM_MEM_GUEST_MEMFD, which binds
        the slot to file pages of the VMM's descriptor `guest_memfd` from `guest_memfd_offset`
        (`kvm_gmem_bind`): EBADF for a closed descriptor, EINVAL for a file that is not a
        guest_memfd of this VM or a range already bound."""
        check_uapi_int("guest_memfd", guest_memfd or 0, 32, "kvm_userspace_memory_region2")

        def bind(new: Memslot) -> None:
            file = self.vmm.files.get(guest_memfd) if guest_memfd is not None else None
            if file is None:
                raise KvmError(errno.EBADF, f"guest_memfd={guest_memfd}: no such descriptor")
            if not isinstance(file, GuestMemfd) or file.mmu is not self.mmu:
                raise KvmError(
                    errno.EINVAL,
                    f"descriptor {guest_memfd} is not a guest_memfd of this VM",
                )
            file.check_bind(guest_memfd_offset, new.npages)
            new.gmem = file
            file.bindings.append(new)

        result = self.memslots.set_user_memory_region(
            slot,
            flags,
            guest_phys_addr,
            memory_size,
            userspace_addr,
            guest_memfd_offset=guest_memfd_offset,
            bind=bind,
            v2=True,
        )
        if result.change in (Change.DELETE, Change.MOVE) and result.old is not None:
            self.mmu.zap_memslot(result.old)
        self._slot_apply_flags(result)
        return result

    def create_guest_memfd(self, size: int, flags: int = 0) -> int:
        """KVM_CREATE_GUEST_MEMFD: a guest_memfd file of `size` bytes, as a new descriptor of
        the VMM (`kvm_gmem_create`): EINVAL for flags this VM type does not support (x86's
        default VM type in 6.18: MMAP and INIT_SHARED) or a size that is 0 or not page
        aligned."""
        check_uapi_int("size", size, 64, "kvm_create_guest_memfd")
        check_uapi_int("flags", flags, 64, "kvm_create_guest_memfd")
        supported = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED
        if flags & ~supported:
            raise KvmError(
                errno.EINVAL,
                f"flags={flags:#x}: supported are GUEST_MEMFD_FLAG_MMAP (1) and"
                " GUEST_MEMFD_FLAG_INIT_SHARED (2)",
            )
        if size == 0 or size >= 1 << 63 or size % PAGE_SIZE:
            raise KvmError(errno.EINVAL, f"size={size:#x} must be positive and page aligned")
        file = GuestMemfd(0, self.mmu, size, flags)
        file.fd = self.vmm.install_fd(file)
        return file.fd

    def guest_memfd(self, fd: int) -> GuestMemfd:
        """The guest_memfd file behind the VMM's descriptor `fd`."""
        file = self.vmm.files.get(fd)
        if not isinstance(file, GuestMemfd):
            raise TwodwalkError(f"fd={fd} is not a guest_memfd of the VMM")
        return file

    def set_memory_attributes(self, address: int, size: int, attributes: int) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES: x86's default VM type supports no attributes
        (KVM_CAP_MEMORY_ATTRIBUTES = 0, `kvm_supported_mem_attributes`), so any attribute
        is EINVAL: private memory needs KVM_X86_SW_PROTECTED_VM, SEV-SNP or TDX VMs."""
        for name, value in (("address", address), ("size", size), ("attributes", attributes)):
            check_uapi_int(name, value, 64, "kvm_memory_attributes")
        if attributes:
            raise KvmError(
                errno.EINVAL,
                f"attributes={attributes:#x}: this VM type supports no memory attributes"
                " (KVM_CAP_MEMORY_ATTRIBUTES = 0); KVM_MEMORY_ATTRIBUTE_PRIVATE needs a"
                " confidential VM type (KVM_X86_SW_PROTECTED_VM, SEV-SNP, TDX)",
            )

    def _slot_apply_flags(self, result: MemslotChange) -> None:
        """x86.c `kvm_mmu_slot_apply_flags` (and `kvm_mmu_update_cpu_dirty_logging` when
        logging toggles): logging off recovers huge pages; logging on (a FLAGS_ONLY change of
        a writable slot) splits huge pages eagerly and then write-protects every leaf, or
        with PML clears every D bit and write-protects only huge leaves; with
        KVM_DIRTY_LOG_INITIALLY_SET it does nothing, every page being taken as dirty."""
        old_flags = result.old.flags if result.old is not None else 0
        new_flags = result.new.flags if result.new is not None else 0
        if (old_flags ^ new_flags) & KVM_MEM_LOG_DIRTY_PAGES and isinstance(self.mmu, TdpMmu):
            self.mmu.cpu_dirty_logging_count += 1 if new_flags & KVM_MEM_LOG_DIRTY_PAGES else -1
        new = result.new
        if result.change is not Change.FLAGS_ONLY or new is None or new_flags & KVM_MEM_READONLY:
            return
        if not new.dirty_logging:
            self.mmu.recover_huge_pages(new)
            return
        if self.manual_dirty_log_protect:
            self._log_enabled(
                new,
                "KVM_DIRTY_LOG_INITIALLY_SET: nothing split or protected now,"
                " every page counts as dirty until KVM_CLEAR_DIRTY_LOG clears it",
            )
            return
        gfns = range(new.base_gfn, new.base_gfn + new.npages)
        split = self.mmu.split_huge_pages(gfns)
        why = (
            f"eager page split, huge leaves made 4 KiB leaves: {split} (the bitmap has one"
            " bit per 4 KiB page, and a write through a 2 MiB leaf could not say which of its"
            " 512 pages it wrote)"
        )
        if self.pml:
            cleared = self.ept.clear_dirty(gfns, ALL_LEVELS)
            protected = self.mmu.write_protect(gfns, HUGE_LEVELS)
            what = (
                f"leaves whose D bit was cleared: {cleared} (PML logs the GPA of each write"
                f" that sets it again); huge leaves left, write-protected: {protected}"
            )
        else:
            protected = self.mmu.write_protect(gfns, ALL_LEVELS)
            what = f"leaves write-protected: {protected} (each first write faults and is logged)"
        self._log_enabled(new, f"{why}; {what}")

    def _log_enabled(self, memslot: Memslot, detail: str) -> None:
        """What turning dirty logging on did, in `log` (no access caused it)."""
        step = KvmStep(
            "kvm_mmu_slot_apply_flags",
            f"dirty logging on for memslot {memslot.id}: {detail}",
            gfn=memslot.base_gfn,
        )
        self.mmu.log.append(step)

    def _sync_dirty_log(self) -> None:
        """x86.c `kvm_arch_sync_dirty_log`: kick the vCPUs out of the guest, whose exits
        flush their PML buffers into the dirty bitmaps."""
        if self.pml:
            self.ept.flush_pml_buffer()

    def get_dirty_log(self, slot: int) -> bytes:
        """KVM_GET_DIRTY_LOG (`kvm_get_dirty_log_protect`): the bitmap. Without manual
        protection KVM also clears it, long by long, and re-protects the pages that were
        dirty, so their next write is seen; with KVM_DIRTY_LOG_INITIALLY_SET it only copies
        it (KVM_CLEAR_DIRTY_LOG does the rest)."""
        memslot = self.memslots.dirty_log_slot(slot)
        assert memslot.dirty_bitmap is not None
        self._sync_dirty_log()
        bitmap = bytes(memslot.dirty_bitmap)
        if self.manual_dirty_log_protect:
            return bitmap
        memslot.dirty_bitmap[:] = bytes(len(bitmap))
        for index, mask in enumerate(_longs(bitmap)):
            if mask:
                self._enable_log_dirty_pt_masked(memslot, index * _BITS_PER_LONG, mask)
        return bitmap

    def clear_dirty_log(
        self, slot: int, first_page: int, num_pages: int, dirty_bitmap: bytes
    ) -> None:
        """KVM_CLEAR_DIRTY_LOG (`kvm_clear_dirty_log_protect`, Documentation/virt/kvm/api.rst):
        bit i of `dirty_bitmap` is page first_page + i of the slot; each set bit that is set in
        KVM's bitmap is cleared there and the page is protected again. first_page must be a
        multiple of 64, and num_pages too unless the range ends at the end of the slot."""
        check_uapi_int("first_page", first_page, 64, "kvm_clear_dirty_log")
        check_uapi_int("num_pages", num_pages, 32, "kvm_clear_dirty_log")
        if not isinstance(dirty_bitmap, bytes | bytearray):
            raise TwodwalkError(f"dirty_bitmap={dirty_bitmap!r} is not valid: give bytes")
        memslot = self._clear_dirty_log_slot(slot, first_page, num_pages)
        assert memslot.dirty_bitmap is not None
        size = (num_pages + _BITS_PER_LONG - 1) // _BITS_PER_LONG * 8
        self._sync_dirty_log()
        if len(dirty_bitmap) < size:
            raise KvmError(
                errno.EFAULT,
                f"dirty_bitmap has {len(dirty_bitmap)} bytes; num_pages={num_pages} needs {size}",
            )
        kvm_longs = _longs(bytes(memslot.dirty_bitmap))
        for i, mask in enumerate(_longs(bytes(dirty_bitmap[:size]))):
            index = first_page // _BITS_PER_LONG + i
            mask &= kvm_longs[index]
            if mask:
                kept = kvm_longs[index] & ~mask
                memslot.dirty_bitmap[index * 8 : index * 8 + 8] = kept.to_bytes(8, "little")
                self._enable_log_dirty_pt_masked(memslot, index * _BITS_PER_LONG, mask)

    def _clear_dirty_log_slot(self, slot: int, first_page: int, num_pages: int) -> Memslot:
        """The checks of `kvm_clear_dirty_log_protect`, in the kernel's order."""
        check_slot_number(slot, self.memslots.address_spaces)
        if first_page & 63:
            raise KvmError(errno.EINVAL, f"first_page={first_page} is not a multiple of 64")
        memslot = self.memslots.dirty_log_slot(slot)
        npages = memslot.npages
        if (
            first_page > npages
            or num_pages > npages - first_page
            or (num_pages < npages - first_page and num_pages & 63)
        ):
            raise KvmError(
                errno.EINVAL,
                f"first_page={first_page}, num_pages={num_pages} do not fit slot"
                f" {memslot.id} of {npages} pages: the range must lie in the slot, and"
                " num_pages be a multiple of 64 unless it reaches the slot's end",
            )
        return memslot

    def _enable_log_dirty_pt_masked(self, memslot: Memslot, offset: int, mask: int) -> None:
        """x86 `kvm_arch_mmu_enable_log_dirty_pt_masked`: re-protect the pages of one long of
        the bitmap (`offset` is the slot-relative page of bit 0). With
        KVM_DIRTY_LOG_INITIALLY_SET huge pages may still map them: split those eagerly and
        write-protect what stays huge at the first and last page. Then the 4 KiB leaves:
        clear D with PML (`kvm_mmu_clear_dirty_pt_masked`), else clear W
        (`kvm_mmu_write_protect_pt_masked`)."""
        gfns = {memslot.base_gfn + offset + bit for bit in range(_BITS_PER_LONG) if mask >> bit & 1}
        if self.manual_dirty_log_protect:
            start, end = min(gfns), max(gfns)
            self.mmu.split_huge_pages(range(start, end + 1))
            self.mmu.write_protect({start, end}, HUGE_LEVELS)
        if self.pml:
            self.ept.clear_dirty(gfns, PG_LEVEL_4K)
        else:
            self.mmu.write_protect(gfns, PG_LEVEL_4K)

    @property
    def log(self) -> tuple[KvmStep, ...]:
        """What KVM did outside any access, oldest first: MMU-notifier zaps, memslot changes,
        PML flushes (an access's own steps are in its trace)."""
        return tuple(self.mmu.log)

    def gpa_to_hva(self, gpa: int) -> int | None:
        """The memslot route GPA -> HVA (`gfn_to_hva`), or None for a hole."""
        return self._memslot_hva(gpa, gmem_only_too=True)

    def fault_hva(self, gpa: int) -> int | None:
        """The HVA through which KVM's page-fault path resolves `gpa`: the memslot route,
        except for a guest_memfd-only slot, whose pages come from the file by offset and
        have no HVA on that path (the slot's userspace_addr serves only the VMM and KVM's
        own copies)."""
        return self._memslot_hva(gpa, gmem_only_too=False)

    def _memslot_hva(self, gpa: int, gmem_only_too: bool) -> int | None:
        """GPA -> memslot -> HVA, None for a hole (or a guest_memfd-only slot, unless
        `gmem_only_too`)."""
        gfn = gpa >> PAGE_SHIFT
        memslot = self.memslots.gfn_to_memslot(gfn)
        if memslot is None or (memslot.gmem_only and not gmem_only_too):
            return None
        return memslot.gfn_to_hva(gfn) + (gpa & 0xFFF)

    def read_gpa(self, gpa: int, size: int) -> bytes:
        """Read guest memory as the VMM does: memslot -> HVA -> host page tables -> frame."""
        check_int("gpa", gpa, 0, 1 << 64)
        check_int("size", size, 0, 1 << 32)
        out = bytearray()
        for gfn, start, end in page_pieces(gpa, size):
            out += self.host.memory.read(
                self._hpa_for_vmm(gfn << PAGE_SHIFT, write=False) + start, end - start
            )
        return bytes(out)

    def gpa_to_hpa(self, gpa: int) -> int | None:
        """GPA -> memslot -> HVA -> HPA as the VMM's page tables have it now, faulting
        nothing in (QEMU's `gpa2hpa` reads /proc/self/pagemap); None for a hole or a page
        with no host frame."""
        hva = self.gpa_to_hva(gpa)
        return None if hva is None else self.host.pagemap(self.vmm, hva)

    def guest_store(self, gpa: int, data: bytes, trace: Trace | None = None) -> None:
        """Store bytes at a GPA as the guest kernel does (`KvmMmu.guest_store`): dirty logging
        and, under shadow paging, KVM's write tracking see it; the TLB is not flushed. The
        exits and KVM's steps it causes go to `trace` when one is given."""
        check_int("gpa", gpa, 0, 1 << 64)
        done = 0
        for gfn, start, end in page_pieces(gpa, len(data)):
            self.mmu.guest_store(
                (gfn << PAGE_SHIFT) + start, data[done : done + end - start], trace
            )
            done += end - start

    def write_gpa(self, gpa: int, data: bytes) -> None:
        """Write guest memory as the VMM does, through its own mapping: host pages are faulted
        in, but KVM sees nothing (no dirty-log bit, no shadow write tracking), as when QEMU
        writes guest RAM behind the guest's back. For the guest's own stores: `guest_store`."""
        check_int("gpa", gpa, 0, 1 << 64)
        done = 0
        for gfn, start, end in page_pieces(gpa, len(data)):
            hpa = self._hpa_for_vmm(gfn << PAGE_SHIFT, write=True)
            self.host.memory.write(hpa + start, data[done : done + end - start])
            done += end - start

    def _hpa_for_vmm(self, page_gpa: int, write: bool) -> int:
        hva = self.gpa_to_hva(page_gpa)
        if hva is None:
            raise TwodwalkError(f"gpa={page_gpa:#x} is in no memslot: the VMM has no memory there")
        page = self.host.get_user_page(self.vmm, hva, write)
        if page is None:
            raise KvmError(errno.EFAULT, f"HVA {hva:#x} of GPA {page_gpa:#x} is not mapped")
        return page.hpa + (hva & (page.page_size - 1))


def _longs(bitmap: bytes) -> list[int]:
    """A dirty bitmap as KVM's unsigned longs (little-endian, 64 pages each)."""
    return [int.from_bytes(bitmap[i : i + 8], "little") for i in range(0, len(bitmap), 8)]
