"""The VM: memslots and the MMU of one KVM virtual machine, bound to its VMM process.

`set_user_memory_region` and `get_dirty_log` are the two VM ioctls twodwalk models
(KVM_SET_USER_MEMORY_REGION, KVM_GET_DIRTY_LOG). After the memslot rules accept a change, the
MMU is told, as `kvm_set_memslot` does: DELETE and MOVE zap the slot's EPT entries first, and
turning dirty logging on write-protects and splits the slot (`kvm_mmu_slot_apply_flags`).
"""

from __future__ import annotations

from twodwalk.cpumodel import PAGE_SHIFT, CpuModel
from twodwalk.errors import TwodwalkError
from twodwalk.formats import ept_format
from twodwalk.host import HostKernel, Process
from twodwalk.kvm.memslots import Change, MemslotChange, Memslots
from twodwalk.kvm.mmu import TdpMmu
from twodwalk.kvm.shadow import ShadowMmu


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
        if tdp:
            self.mmu = TdpMmu(host, vmm, self.memslots, ept_format(ept_levels, cpu, ept_ad))
        else:
            self.mmu = ShadowMmu(host, vmm, self.memslots, cpu)

    @property
    def ept(self) -> TdpMmu:
        """The TDP MMU that builds the EPT; only with tdp=True."""
        if not isinstance(self.mmu, TdpMmu):
            raise TwodwalkError("this VM runs with EPT off (tdp=False): its shadow MMU is vm.mmu")
        return self.mmu

    def set_user_memory_region(
        self, slot: int, flags: int, guest_phys_addr: int, memory_size: int, userspace_addr: int
    ) -> MemslotChange:
        """KVM_SET_USER_MEMORY_REGION; raises `KvmError` with the kernel's errno."""
        result = self.memslots.set_user_memory_region(
            slot, flags, guest_phys_addr, memory_size, userspace_addr
        )
        if result.change in (Change.DELETE, Change.MOVE) and result.old is not None:
            self.mmu.zap_memslot(result.old)
        new, old = result.new, result.old
        if new is not None and new.dirty_logging and not (old is not None and old.dirty_logging):
            self.mmu.write_protect(new)
        return result

    def get_dirty_log(self, slot: int) -> bytes:
        """KVM_GET_DIRTY_LOG: the bitmap since the last call, then clear it and write-protect
        the pages that were dirty, so their next write is seen (`kvm_get_dirty_log_protect`)."""
        bitmap = self.memslots.get_dirty_log(slot)
        memslot = self.memslots.slots[(slot >> 16, slot & 0xFFFF)]
        for index, byte in enumerate(bitmap):
            for bit in range(8):
                if byte >> bit & 1:
                    gfn = memslot.base_gfn + index * 8 + bit
                    self.mmu.write_protect(memslot, range(gfn, gfn + 1))
        return bitmap

    def gpa_to_hva(self, gpa: int) -> int | None:
        """The memslot route GPA -> HVA (`gfn_to_hva`), or None for a hole."""
        memslot = self.memslots.gfn_to_memslot(gpa >> PAGE_SHIFT)
        if memslot is None:
            return None
        return memslot.gfn_to_hva(gpa >> PAGE_SHIFT) + (gpa & 0xFFF)
