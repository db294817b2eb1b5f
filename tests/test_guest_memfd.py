"""guest_memfd (Linux 6.18 virt/kvm/guest_memfd.c, kvm_main.c, arch/x86/kvm/mmu/mmu.c): the
ioctls' rules errno by errno, the fault path that takes a page by file offset with no HVA and
no host walk, punching holes, and the VMM's own mapping of the file."""

from __future__ import annotations

import errno

import pytest

from twodwalk.engine.host import SigbusError
from twodwalk.engine.kvm.guest_memfd import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
)
from twodwalk.engine.kvm.memslots import (
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    KvmError,
)
from twodwalk.engine.kvm.vm import Vm
from twodwalk.engine.machine import Machine
from twodwalk.engine.trace import HostWalk, KvmStep, Retry, VmExit
from twodwalk.errors import TwodwalkError

GMEM_GPA = 1 << 30  # a guest_memfd slot above guest RAM
MIB = 1 << 20
SHARED = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED
PUNCH = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
HVA = 0x7E00_0000_0000  # a userspace_addr the VMM never mapped: access_ok is all KVM asks


def machine(tdp: bool = True) -> Machine:
    return Machine(guest_ram=8 * MIB, tdp=tdp)


def bound(flags: int = SHARED, offset: int = 0) -> tuple[Machine, int]:
    """A machine with a 2 MiB guest_memfd bound as memslot 1 at GMEM_GPA."""
    m = machine()
    fd = m.vm.create_guest_memfd(2 * MIB, flags)
    m.vm.set_user_memory_region2(
        1, KVM_MEM_GUEST_MEMFD, GMEM_GPA, MIB, HVA, guest_memfd=fd, guest_memfd_offset=offset
    )
    return m, fd


def errno_of(call: object, *args: object, **kwargs: object) -> int:
    with pytest.raises(KvmError) as failure:
        call(*args, **kwargs)  # type: ignore[operator]
    return failure.value.errno


# --- KVM_CREATE_GUEST_MEMFD (kvm_gmem_create) ------------------------------------------------


def test_create_rules() -> None:
    vm = machine().vm
    assert errno_of(vm.create_guest_memfd, 0) == errno.EINVAL, "size <= 0"
    assert errno_of(vm.create_guest_memfd, 4096 + 1) == errno.EINVAL, "not PAGE_ALIGNED"
    assert errno_of(vm.create_guest_memfd, 4096, 1 << 2) == errno.EINVAL, "unknown flag"
    assert vm.create_guest_memfd(4096, SHARED) == 3, "the lowest free descriptor"
    assert vm.create_guest_memfd(4096) == 4


# --- KVM_SET_USER_MEMORY_REGION2 (check_memory_region_flags, kvm_gmem_bind) ------------------


def test_binding_rules() -> None:
    m = machine()
    vm = m.vm
    fd = vm.create_guest_memfd(2 * MIB)

    def region2(slot: int, flags: int, gpa: int, size: int, **kwargs: int) -> int:
        return errno_of(vm.set_user_memory_region2, slot, flags, gpa, size, HVA, **kwargs)

    gmem = KVM_MEM_GUEST_MEMFD
    assert region2(1, gmem, GMEM_GPA, MIB, guest_memfd=fd, guest_memfd_offset=0x800) == (
        errno.EINVAL
    ), "offset not page aligned"
    assert region2(1, gmem, GMEM_GPA, MIB, guest_memfd=fd, guest_memfd_offset=2 * MIB) == (
        errno.EINVAL
    ), "offset + size beyond the file"
    assert region2(1, gmem, GMEM_GPA, MIB, guest_memfd=99) == errno.EBADF
    assert region2(1, gmem | KVM_MEM_READONLY, GMEM_GPA, MIB, guest_memfd=fd) == errno.EINVAL
    assert region2(1, gmem | KVM_MEM_LOG_DIRTY_PAGES, GMEM_GPA, MIB, guest_memfd=fd) == (
        errno.EINVAL
    )
    assert errno_of(vm.set_user_memory_region, 1, gmem, GMEM_GPA, MIB, HVA) == errno.EINVAL, (
        "the legacy ioctl takes only the V1 flags"
    )
    other = Vm(m.host, m.vmm, m.cpu_model, tdp=True, ept_levels=4, ept_ad=True)
    foreign = other.create_guest_memfd(2 * MIB)
    assert region2(1, gmem, GMEM_GPA, MIB, guest_memfd=foreign) == errno.EINVAL
    vm.set_user_memory_region2(1, gmem, GMEM_GPA, MIB, HVA, guest_memfd=fd)
    assert region2(2, gmem, GMEM_GPA + MIB, MIB, guest_memfd=fd, guest_memfd_offset=MIB // 2) == (
        errno.EINVAL
    ), "file pages already bound to slot 1"
    vm.set_user_memory_region2(
        2, gmem, GMEM_GPA + MIB, MIB, HVA, guest_memfd=fd, guest_memfd_offset=MIB
    )
    assert region2(1, gmem, GMEM_GPA + 4 * MIB, MIB, guest_memfd=fd) == errno.EINVAL, "no move"
    assert region2(1, gmem, GMEM_GPA, MIB, guest_memfd=fd) == errno.EINVAL, "immutable"
    assert region2(1, 0, GMEM_GPA, MIB) == errno.EINVAL, "nor can it drop the flag"
    vm.set_user_memory_region2(1, gmem, GMEM_GPA, 0, HVA, guest_memfd=fd)  # delete: allowed
    vm.set_user_memory_region2(3, gmem, GMEM_GPA, MIB, HVA, guest_memfd=fd)  # range free again
    assert vm.memslots.slots[0, 3].gmem_pgoff == 0


def test_memory_attributes_are_not_supported_by_the_default_vm_type() -> None:
    with pytest.raises(KvmError, match="KVM_CAP_MEMORY_ATTRIBUTES = 0") as failure:
        machine().vm.set_memory_attributes(GMEM_GPA, MIB, 1 << 3)  # ..._ATTRIBUTE_PRIVATE
    assert failure.value.errno == errno.EINVAL


# --- the fault path (__kvm_mmu_faultin_pfn -> kvm_mmu_faultin_pfn_gmem) ----------------------


def test_a_gmem_only_slot_faults_by_file_offset_with_no_hva() -> None:
    m, fd = bound(offset=0x10_0000)
    m.guest.map(0x40_0000, GMEM_GPA + 0x3000, 4096, rw=1)
    result = m.vcpu.access(0x40_0000, "write", 7)
    file = m.vm.guest_memfd(fd)
    index = 0x10_0000 // 4096 + 3  # gfn - base_gfn + pgoff
    assert result.hpa == file.folios[index] and result.hva is None
    events = result.trace.events
    gmem = next(i for i, e in enumerate(events) if getattr(e, "function", "") == "kvm_gmem_get_pfn")
    exit_ = max(i for i, e in enumerate(events[:gmem]) if isinstance(e, VmExit))
    retry = next(i for i, e in enumerate(events) if i > gmem and isinstance(e, Retry))
    handling = events[exit_:retry]
    assert not [e for e in handling if isinstance(e, HostWalk)], "no host page-table walk"
    assert not [e for e in handling if isinstance(e, KvmStep) and "hva" in e.function], (
        "no __gfn_to_hva_memslot, no hva_to_pfn"
    )
    leaf = m.vm.ept.get_walk(GMEM_GPA + 0x3000).steps[-1]
    assert leaf.level == 1, "6.18 guest_memfd folios are order 0: 4 KiB"


def test_without_mmap_the_slot_is_not_gmem_only_and_faults_go_through_the_hva() -> None:
    """On x86's default VM type no GFN is private (no memory attributes), so a slot bound
    to a file without GUEST_MEMFD_FLAG_MMAP is not KVM_MEMSLOT_GMEM_ONLY: its faults take
    the HVA route, and userspace_addr must be mapped."""
    m = machine()
    fd = m.vm.create_guest_memfd(2 * MIB)
    ram = m.vmm.mmap(MIB)
    m.vm.set_user_memory_region2(1, KVM_MEM_GUEST_MEMFD, GMEM_GPA, MIB, ram, guest_memfd=fd)
    m.guest.map(0x40_0000, GMEM_GPA, 4096, rw=1)
    result = m.vcpu.access(0x40_0000, "write", 9)
    assert result.hva == ram and result.hpa == m.host.pagemap(m.vmm, ram)
    assert not m.vm.guest_memfd(fd).folios, "the file was never touched"


def test_punching_a_hole_zaps_the_ept_entry_and_the_next_access_gets_a_zeroed_page() -> None:
    m, fd = bound()
    m.guest.map(0x40_0000, GMEM_GPA + 0x3000, 4096, rw=1)
    m.vcpu.access(0x40_0000, "write", 0x1234)
    file = m.vm.guest_memfd(fd)
    file.fallocate(PUNCH, 0x3000, 4096)
    assert 3 not in file.folios
    assert m.vm.ept.get_walk(GMEM_GPA + 0x3000).translation is None, "kvm_gmem_invalidate_begin"
    assert m.vm.log[-1].function == "kvm_gmem_invalidate_begin"
    again = m.vcpu.access(0x40_0000, "read")
    assert again.value == 0 and again.hpa == file.folios[3]


def test_fallocate_rules() -> None:
    m, fd = bound()
    file = m.vm.guest_memfd(fd)
    assert errno_of(file.fallocate, FALLOC_FL_PUNCH_HOLE, 0, 4096) == errno.EOPNOTSUPP
    assert errno_of(file.fallocate, FALLOC_FL_KEEP_SIZE | 0x10, 0, 4096) == errno.EOPNOTSUPP
    assert errno_of(file.fallocate, FALLOC_FL_KEEP_SIZE, 100, 4096) == errno.EINVAL
    assert errno_of(file.fallocate, FALLOC_FL_KEEP_SIZE, 0, 4 * MIB) == errno.EINVAL
    file.fallocate(FALLOC_FL_KEEP_SIZE, 0, 3 * 4096)
    assert sorted(file.folios) == [0, 1, 2]


# --- the VMM's own mapping (kvm_gmem_mmap, kvm_gmem_fault_user_mapping) ----------------------


def test_the_vmm_sees_the_guests_page_only_through_a_shared_mapping() -> None:
    m = machine()
    fd = m.vm.create_guest_memfd(2 * MIB, SHARED)
    file = m.vm.guest_memfd(fd)
    hva = file.mmap(m.vmm, 2 * MIB)
    m.vm.set_user_memory_region2(1, KVM_MEM_GUEST_MEMFD, GMEM_GPA, MIB, hva, guest_memfd=fd)
    m.write_gpa(GMEM_GPA + 0x3000, (0x5A5A).to_bytes(8, "little"))
    m.guest.map(0x40_0000, GMEM_GPA + 0x3000, 4096, rw=1)
    result = m.vcpu.access(0x40_0000, "read")
    assert result.value == 0x5A5A, "one frame: the file's page"
    assert m.host.pagemap(m.vmm, hva + 0x3000) == result.hpa
    file.fallocate(PUNCH, 0x3000, 4096)
    assert m.host.pagemap(m.vmm, hva + 0x3000) is None, "unmap_mapping_range"
    with pytest.raises(TwodwalkError, match="unevictable"):
        m.host.swap_out(m.vmm, hva)  # not even after touching it again


def test_mapping_rules() -> None:
    m = machine()
    private = m.vm.guest_memfd(m.vm.create_guest_memfd(MIB, GUEST_MEMFD_FLAG_MMAP))
    hva = private.mmap(m.vmm, 2 * MIB)
    with pytest.raises(SigbusError, match="without GUEST_MEMFD_FLAG_INIT_SHARED"):
        m.host.get_user_page(m.vmm, hva, write=True)
    shared = m.vm.guest_memfd(m.vm.create_guest_memfd(MIB, SHARED))
    past = shared.mmap(m.vmm, 2 * MIB) + MIB
    with pytest.raises(SigbusError, match="past the end of the file"):
        m.host.get_user_page(m.vmm, past, write=False)
    plain = m.vm.guest_memfd(m.vm.create_guest_memfd(MIB))
    assert errno_of(plain.mmap, m.vmm, MIB) == errno.ENODEV


def test_shadow_paging_takes_guest_memfd_pages_too() -> None:
    """The shadow MMU's faults go through the same `__kvm_mmu_faultin_pfn`: a guest_memfd-only
    slot gives its page by file offset there as well (real KVM on the shadow-paging host the
    tests run on runs a guest from guest_memfd RAM: realkvm.RealRunner(guest_memfd=True))."""
    m = machine(tdp=False)
    fd = m.vm.create_guest_memfd(2 * MIB, SHARED)
    m.vm.set_user_memory_region2(1, KVM_MEM_GUEST_MEMFD, GMEM_GPA, MIB, HVA, guest_memfd=fd)
    m.guest.map(0x40_0000, GMEM_GPA + 0x2000, 4096, rw=1)
    result = m.vcpu.access(0x40_0000, "write", 0x77)
    file = m.vm.guest_memfd(fd)
    assert result.hpa == file.folios[2] and result.hva is None
    assert "kvm_gmem_get_pfn" in [s.function for s in result.trace.of_type(KvmStep)]
    assert m.memory.read_u64(file.folios[2]) == 0x77


def test_info_memslots_names_the_binding() -> None:
    from twodwalk.views.text import info_memslots

    m, fd = bound(offset=0x2000)
    table = info_memslots(m.vm.memslots.slots.values())
    assert f"GUEST_MEMFD only (fd {fd} from 0x2000)" in table.splitlines()[-1]
