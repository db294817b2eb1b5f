"""The whole box: one host, one VMM process that mmaps guest RAM, one VM, one vCPU.

`Machine` wires the actors as a real KVM setup does: the host kernel owns physical memory;
the VMM ("qemu") mmaps guest RAM; KVM_SET_USER_MEMORY_REGION makes memslot 0 map GPA
[0, guest_ram) to that HVA (or, with a PCI hole, one memslot for the RAM below it and one for
the RAM above it); the guest OS writes its page tables into guest RAM; the vCPU runs
accesses. Host physical memory is laid out as: 4 KiB frames from 16 MiB to 1 GiB (page tables,
EPT tables, small pages), 2 MiB frames from 1 GiB to 4 GiB (THP) and 1 GiB frames from 4 GiB
to 8 GiB (hugetlbfs).
"""

from __future__ import annotations

from twodwalk.engine.cpuid import CpuModel
from twodwalk.engine.guest import GuestOS
from twodwalk.engine.host import HostKernel
from twodwalk.engine.kvm.vm import Vm
from twodwalk.engine.memory import FrameAllocator, PhysicalMemory
from twodwalk.engine.trace import Trace
from twodwalk.engine.units import GIGANTIC_PAGE_SIZE, HUGE_PAGE_SIZE, PAGE_SIZE
from twodwalk.engine.vcpu import Vcpu
from twodwalk.errors import TwodwalkError, check_aligned, check_choice, check_int

SMALL_FRAMES = (16 << 20, 1 << 30)
HUGE_FRAMES = (1 << 30, 4 << 30)
GIGANTIC_FRAMES = (4 << 30, 8 << 30)


class Machine:
    """A KVM guest on x86-64, from guest page tables down to host frames.

    The actors, each one object, as in a real KVM set-up:

    - `memory`: host physical memory (`PhysicalMemory`), where every table and page lives;
    - `host`: the host kernel (`HostKernel`): processes, their page tables, THP, swap, KSM;
    - `vmm`: the VMM process ("qemu", a `Process` of the host) whose mmap backs guest RAM
      from `ram_hva`, `guest_ram` bytes of it;
    - `vm`: the KVM VM (`Vm`): memslots, the MMU that builds EPT (or shadow) tables, the
      dirty log;
    - `guest`: the guest OS (`GuestOS`), which writes its page tables into guest RAM;
    - `vcpu`: the vCPU (`Vcpu`) that makes accesses: `machine.vcpu.access(gva, "read")`;
    - `cpu_model`: what CPUID reports (`CpuModel`: MAXPHYADDR, 1 GiB pages, LA57).
    """

    def __init__(
        self,
        guest_ram: int = 32 << 20,
        tdp: bool = True,
        guest_levels: int = 4,
        ept_levels: int | None = None,
        maxphyaddr: int = 46,
        gbpages: bool = True,
        ept_ad: bool = True,
        thp: bool = False,
        hugetlb_1g: bool = False,
        pci_hole: tuple[int, int] | None = None,
        vendor: str = "intel",
    ) -> None:
        """Guest RAM is backed by 4 KiB anonymous pages, by 2 MiB THP (`thp`), or by 1 GiB
        hugetlbfs pages (`hugetlb_1g`, which needs `gbpages` and whole GiBs of RAM).
        `pci_hole=(start, end)` leaves GPA [start, end) to MMIO: see `ram_aliases`.
        `vendor="amd"` runs the guest under SVM: with `tdp`, AMD's nested page tables
        (long-mode format, root in nCR3, `ept_levels` deep) instead of EPT, #NPF instead of
        EPT violations, and the AMD-style page-walk cache (`caches.model = "amd"`)."""
        check_int(
            "guest_ram", guest_ram, PAGE_SIZE, (1 << 30) + 1, valid="4 KiB .. 1 GiB of guest RAM"
        )
        if thp and hugetlb_1g:
            raise TwodwalkError("choose one backing for guest RAM: thp=True or hugetlb_1g=True")
        align = GIGANTIC_PAGE_SIZE if hugetlb_1g else HUGE_PAGE_SIZE if thp else PAGE_SIZE
        if guest_ram % align:
            raise TwodwalkError(f"guest_ram={guest_ram:#x} must be a multiple of {align:#x}")
        check_choice("guest_levels", str(guest_levels), ("4", "5"))
        check_choice("vendor", vendor, ("intel", "amd"))
        if vendor == "amd" and not ept_ad:
            raise TwodwalkError(
                "ept_ad=False is Intel's choice (EPTP bit 6): AMD's nested paging always sets"
                " A and D (use vendor='intel' to switch EPT A/D off)"
            )
        self.cpu_model = CpuModel(maxphyaddr=maxphyaddr, gbpages=gbpages, la57=True, vendor=vendor)
        if ept_levels is None:
            ept_levels = 5 if maxphyaddr > 48 else 4  # KVM: 5-level EPT only when needed
        check_choice("ept_levels", str(ept_levels), ("4", "5"))
        self.memory, self.host = new_host(self.cpu_model)
        self.vmm = self.host.spawn("qemu")
        self.guest_ram = guest_ram
        aliases = ram_aliases(guest_ram, pci_hole, align)
        self.ram_hva = self.vmm.mmap(guest_ram, name="guest RAM", page_size=align)
        self.vm = Vm(
            self.host, self.vmm, self.cpu_model, tdp=tdp, ept_levels=ept_levels, ept_ad=ept_ad
        )
        for slot, (gpa, offset, size) in enumerate(aliases):
            self.vm.set_user_memory_region(slot, 0, gpa, size, self.ram_hva + offset)
        gpa, _, size = aliases[-1]
        self.guest = GuestOS(self.vm, guest_levels, ram_top=gpa + size)
        self.vcpu = Vcpu(self.vm)
        if vendor == "amd":
            self.vcpu.caches.model = "amd"
        self.vcpu.cr4_la57 = guest_levels == 5
        self.vcpu.cr3 = self.guest.page_tables.root

    def read_gpa(self, gpa: int, size: int) -> bytes:
        """Read guest memory as the VMM does (`Vm.read_gpa`)."""
        return self.vm.read_gpa(gpa, size)

    def write_gpa(self, gpa: int, data: bytes) -> None:
        """Write guest memory as the VMM does, behind KVM's back (`Vm.write_gpa`)."""
        self.vm.write_gpa(gpa, data)

    def guest_store(self, gpa: int, data: bytes, trace: Trace | None = None) -> None:
        """Store bytes at a GPA as the guest kernel does (`Vm.guest_store`)."""
        self.vm.guest_store(gpa, data, trace)

    def gpa_to_hpa(self, gpa: int) -> int | None:
        """GPA -> memslot -> HVA -> HPA without faulting anything in (`Vm.gpa_to_hpa`)."""
        return self.vm.gpa_to_hpa(gpa)


def ram_aliases(
    guest_ram: int, pci_hole: tuple[int, int] | None, align: int = PAGE_SIZE
) -> list[tuple[int, int, int]]:
    """(GPA, offset in the one RAM block, size) of each piece of guest RAM, one memslot each.

    Without a hole, all of RAM sits at GPA 0. With `pci_hole=(start, end)`, RAM above `start`
    moves up to `end`, as QEMU's `pc_memory_init` (hw/i386/pc.c) splits its one RAM block
    into the aliases "ram-below-4g" [0, below_4g_mem_size) and "ram-above-4g" at 4 GiB; each
    alias becomes a KVM memslot (`kvm_set_phys_mem`) into the same mmap, and [start, end) is
    left to MMIO. Here the hole is anywhere, so small machines can have one."""
    if pci_hole is None:
        return [(0, 0, guest_ram)]
    start, end = pci_hole
    check_aligned("pci_hole[0]", check_int("pci_hole[0]", start, 1, guest_ram), align)
    check_aligned("pci_hole[1]", check_int("pci_hole[1]", end, start + 1, 1 << 64), align)
    return [(0, 0, start), (end, start, guest_ram - start)]


def new_host(cpu_model: CpuModel) -> tuple[PhysicalMemory, HostKernel]:
    """Host physical memory and a host kernel with the frame layout described above."""
    memory = PhysicalMemory(cpu_model.maxphyaddr)
    host = HostKernel(
        memory,
        cpu_model,
        FrameAllocator(memory, *SMALL_FRAMES),
        FrameAllocator(memory, *HUGE_FRAMES, frame_size=HUGE_PAGE_SIZE),
        FrameAllocator(memory, *GIGANTIC_FRAMES, frame_size=GIGANTIC_PAGE_SIZE),
    )
    return memory, host
