"""A guest runtime on real KVM: one access (read, write or fetch) at one GVA under the caller's
page tables, at CPL 0 or 3, with the paging controls set as asked, and what the guest saw; or a
sequence of CPL-0 steps (accesses, MOV to CR0 or CR3, INVLPG) in one run, reported step by step.

The guest is a plain long-mode guest (SDM Vol. 3A 9.8.5): its GDT, TSS, IDT, handlers and
stack live in the top RUNTIME_SIZE bytes of guest RAM (RUNTIME_GPA with the default 32 MiB),
mapped under PML4 entry RUNTIME_PML4_SLOT of the caller's PML4. The machine code is runtime.S,
assembled once with GNU as and embedded below as RUNTIME_CODE. The VMM side is
Documentation/virt/kvm/api.rst: KVM_SET_SREGS/KVM_SET_REGS, KVM_RUN, and the KVM_EXIT_IO
reports of the guest's OUTs.
"""

from __future__ import annotations

import dataclasses
import mmap
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from twodwalk.engine.cpuid import CpuModel
from twodwalk.engine.kvm.memslots import KVM_MEM_GUEST_MEMFD
from twodwalk.engine.paging import PagingControls
from twodwalk.engine.units import PAGE_SIZE
from twodwalk.errors import AddressError, TwodwalkError, check_aligned, check_choice, check_int
from twodwalk.realkvm.device import (
    EXIT_REASONS,
    KVM_EXIT_INTERNAL_ERROR,
    KVM_EXIT_INTR,
    KVM_EXIT_IO,
    KVM_EXIT_IO_OUT,
    KVM_EXIT_MMIO,
    GuestMemfdBuffer,
    HostBuffer,
    KvmExitError,
    RealKvm,
    Regs,
    Segment,
    Sregs,
)

RUNTIME_PML4_SLOT = 511
RUNTIME_GPA = 0x1F0_0000  # where the runtime sits with the default 32 MiB of RAM (the top MiB)
RUNTIME_SIZE = 0x10_0000
RUNTIME_GVA = 0xFFFF_FF80_0000_0000  # PML4 entry 511, sign-extended (SDM Vol. 3A 3.3.7.1)

# runtime.S assembled (`as --64`, then `objcopy -O binary -j .text`); see that file.
RUNTIME_CODE = (
    b"\x48\x8b\x07\xe6\xf0\x00\x00\x00\x48\x89\x37\xe6\xf0\x00\x00\x00\xff\xe7\x00\x00\x00\x00"
    b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x6a\x00\x6a\x00\xe9\xed\x01\x00\x00\x00\x00\x00"
    b"\x00\x00\x00\x00\x6a\x00\x6a\x01\xe9\xdd\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x6a\x00"
    b"\x6a\x02\xe9\xcd\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x6a\x00\x6a\x03\xe9\xbd\x01\x00"
    b"\x00\x00\x00\x00\x00\x00\x00\x00\x6a\x00\x6a\x04\xe9\xad\x01\x00\x00\x00\x00\x00\x00\x00"
    b"\x00\x00\x6a\x00\x6a\x05\xe9\x9d\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x6a\x00\x6a\x06"
    b"\xe9\x8d\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x6a\x00\x6a\x07\xe9\x7d\x01\x00\x00\x00"
    b"\x00\x00\x00\x00\x00\x00\x6a\x08\xe9\x6f\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    b"\x6a\x00\x6a\x09\xe9\x5d\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x6a\x0a\xe9\x4f\x01\x00"
    b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x6a\x0b\xe9\x3f\x01\x00\x00\x00\x00\x00\x00\x00"
    b"\x00\x00\x00\x00\x6a\x0c\xe9\x2f\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x6a\x0d"
    b"\xe9\x1f\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x6a\x0e\xe9\x0f\x01\x00\x00\x00"
    b"\x00\x00\x00\x00\x00\x00\x00\x00\x6a\x00\x6a\x0f\xe9\xfd\x00\x00\x00\x00\x00\x00\x00\x00"
    b"\x00\x00\x6a\x00\x6a\x10\xe9\xed\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x6a\x11\xe9\xdf"
    b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x6a\x00\x6a\x12\xe9\xcd\x00\x00\x00\x00"
    b"\x00\x00\x00\x00\x00\x00\x6a\x00\x6a\x13\xe9\xbd\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    b"\x6a\x00\x6a\x14\xe9\xad\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x6a\x15\xe9\x9f\x00\x00"
    b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x6a\x00\x6a\x16\xe9\x8d\x00\x00\x00\x00\x00\x00"
    b"\x00\x00\x00\x00\x6a\x00\x6a\x17\xe9\x7d\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x6a\x00"
    b"\x6a\x18\xeb\x70\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x6a\x00\x6a\x19\xeb\x60\x00\x00"
    b"\x00\x00\x00\x00\x00\x00\x00\x00\x6a\x00\x6a\x1a\xeb\x50\x00\x00\x00\x00\x00\x00\x00\x00"
    b"\x00\x00\x6a\x00\x6a\x1b\xeb\x40\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x6a\x00\x6a\x1c"
    b"\xeb\x30\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x6a\x1d\xeb\x22\x00\x00\x00\x00\x00\x00"
    b"\x00\x00\x00\x00\x00\x00\x6a\x1e\xeb\x12\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    b"\x6a\x00\x6a\x1f\xeb\x00\x58\x5b\x5a\x0f\x20\xd1\xe6\xf1\x4c\x89\xec\x41\x56\x9d\x49\x8b"
    b"\x1c\x24\x49\x8b\x7c\x24\x08\x49\x8b\x74\x24\x10\x49\x83\xc4\x18\xff\xe3\x48\x8b\x07\xeb"
    b"\x12\x48\x89\x37\xeb\x0d\x0f\x22\xc6\xeb\x08\x0f\x22\xde\xeb\x03\x0f\x01\x3f\xe6\xf2\xeb"
    b"\xcb"
)
STUBS = {"read": 0x00, "write": 0x08, "fetch": 0x10}  # offsets in RUNTIME_CODE
HANDLERS = 0x20  # vector n's handler at HANDLERS + HANDLER_STRIDE * n
HANDLER_STRIDE = 0x10
SEQUENCE = 0x21E  # `next`: runs the command list's next step
STEPS = {"read": 0x238, "write": 0x23D, "cr0": 0x242, "cr3": 0x247, "invlpg": 0x24C}
DONE_PORT = 0xF0
EXCEPTION_PORT = 0xF1
STEP_PORT = 0xF2

# Pages of the runtime area (the same offset from RUNTIME_GPA and from RUNTIME_GVA).
_PDPT, _PD, _PT = 0x0000, 0x1000, 0x2000
_CODE = 0x3000  # supervisor: the ring-0 stubs and the handlers
_USER = 0x4000  # user: the ring-3 stubs
_TABLES = 0x5000  # supervisor: the GDT, the TSS at +_TSS, the IDT at +_IDT
_STACK = 0x6000  # supervisor: the ring-0 stack, RSP0 at its top
_COMMANDS = 0x7000  # supervisor, read-only: a sequence's command list
_STACK_TOP = RUNTIME_GVA + _STACK + 0x1000
_COMMAND = struct.Struct("<3Q")  # the step's entry point, its RDI, its RSI
MAX_STEPS = PAGE_SIZE // _COMMAND.size
_TSS, _IDT = 0x80, 0x200
# The TSS ends with an all-clear I/O bitmap for ports 0..0xFF (and its 0xFF byte) so ring 3
# may OUT its report (SDM Vol. 1 19.5.2). IOPL=3 would do, but PVM keeps no guest IOPL.
_TSS_LIMIT = 104 + 32
_KERNEL_CS, _KERNEL_SS, _USER_SS, _USER_CS, _TR = 0x08, 0x10, 0x1B, 0x23, 0x28

_P, _RW, _US, _A, _D = 1, 2, 4, 0x20, 0x40
_PHYS_MASK = 0x000F_FFFF_FFFF_F000
_CR0_PE, _CR0_ET, _CR0_NE, _CR0_WP, _CR0_PG = 1, 1 << 4, 1 << 5, 1 << 16, 1 << 31
_CR4_PAE, _CR4_SMEP, _CR4_SMAP = 1 << 5, 1 << 20, 1 << 21
_EFER_SCE, _EFER_LME, _EFER_LMA, _EFER_NXE = 1, 1 << 8, 1 << 10, 1 << 11
_RFLAGS_FIXED, _RFLAGS_AC = 0x2, 1 << 18
_INT3 = 0xCC
_MAX_EXITS = 16
KVM_MEM_LOG_DIRTY_PAGES = 1


@dataclass(frozen=True)
class Controls:
    """The paging controls of one run (SDM Vol. 3A 4.1.3, 4.6) and the CPL (0 or 3)."""

    cr0_wp: bool
    cr4_smep: bool
    cr4_smap: bool
    efer_nxe: bool
    rflags_ac: bool
    cpl: int

    @classmethod
    def of(cls, paging: PagingControls, cpl: int) -> Controls:
        """The controls the runtime can set, from the engine's."""
        return cls(
            paging.cr0_wp, paging.cr4_smep, paging.cr4_smap, paging.efer_nxe, paging.rflags_ac, cpl
        )

    def paging(self) -> PagingControls:
        """The same controls for the engine's walk."""
        return PagingControls(
            cr0_wp=self.cr0_wp,
            cr4_smep=self.cr4_smep,
            cr4_smap=self.cr4_smap,
            efer_nxe=self.efer_nxe,
            rflags_ac=self.rflags_ac,
        )


@dataclass(frozen=True)
class Step:
    """One step of a sequence at CPL 0: "read" or "write" (`value`) of `gva`, "cr0" (MOV to
    CR0 with CR0.WP = `value`), "cr3" (MOV to CR3 of `value`), or "invlpg" of `gva`."""

    kind: str
    gva: int = 0
    value: int = 0


@dataclass(frozen=True)
class Observed:
    """What real KVM showed for one access: the exception the guest took (vector, error code
    as pushed, CR2 for #PF), or the completed access (a read's 8 bytes, a fetch's int3 run), or
    the KVM_EXIT_MMIO it became (data: the bytes written, empty for a read); and the pages
    the caller loaded, as they are afterwards (for A/D bits and written data). A sequence's
    step also has the RAM slot's KVM_GET_DIRTY_LOG bitmap taken right after it, if asked."""

    vector: int | None
    error_code: int | None
    cr2: int | None
    value: int | None
    fetched: bool
    mmio: tuple[int, int, bool, bytes] | None
    pages: Mapping[int, bytes]
    dirty_log: bytes | None = None

    def read_u64(self, gpa: int) -> int:
        """8 bytes of guest RAM after the run, from a page the caller loaded."""
        page = self.pages[gpa & ~(PAGE_SIZE - 1)]
        return int.from_bytes(page[gpa & (PAGE_SIZE - 1) :][:8], "little")


def _gdt() -> bytes:
    """Flat 64-bit kernel and user segments and a busy 64-bit TSS (SDM Vol. 3A 3.4.5, 8.2.3)."""
    tss = RUNTIME_GVA + _TABLES + _TSS
    tss_low = _TSS_LIMIT | (tss & 0xFF_FFFF) << 16 | 0x8B << 40 | (tss >> 24 & 0xFF) << 56
    return struct.pack(
        "<7Q",
        0,
        0x00AF_9B00_0000_FFFF,  # _KERNEL_CS: L=1, DPL 0, code
        0x00CF_9300_0000_FFFF,  # _KERNEL_SS: DPL 0, data
        0x00CF_F300_0000_FFFF,  # _USER_SS: DPL 3, data
        0x00AF_FB00_0000_FFFF,  # _USER_CS: L=1, DPL 3, code
        tss_low,
        tss >> 32,
    )


def _idt() -> bytes:
    """64-bit interrupt gates for vectors 0..31 (SDM Vol. 3A 6.14.1); vector 3's has DPL 3 so
    that an int3 at CPL 3 reaches it (SDM Vol. 3A 6.12.1.1)."""
    gates = []
    for vector in range(32):
        handler = RUNTIME_GVA + _CODE + HANDLERS + HANDLER_STRIDE * vector
        kind = 0xEE if vector == 3 else 0x8E
        low = handler & 0xFFFF | _KERNEL_CS << 16 | kind << 40 | (handler >> 16 & 0xFFFF) << 48
        gates.append(struct.pack("<QQ", low, handler >> 32))
    return b"".join(gates)


def _runtime_image(base: int) -> bytes:
    """The runtime area's used pages: its page tables, code, descriptor tables and stack.
    Every entry is accessed (and leaves of written pages dirty) already."""
    image = bytearray(_COMMANDS + 0x1000)
    struct.pack_into("<Q", image, _PDPT, base + _PD | _P | _RW | _US | _A)
    struct.pack_into("<Q", image, _PD, base + _PT | _P | _RW | _US | _A)
    leaves = {
        _CODE: _P | _A,
        _USER: _P | _US | _A,
        _TABLES: _P | _RW | _A | _D,
        _STACK: _P | _RW | _A | _D,
        _COMMANDS: _P | _A,
    }
    for page, flags in leaves.items():
        struct.pack_into("<Q", image, _PT + 8 * (page >> 12), base + page | flags)
    image[_CODE : _CODE + len(RUNTIME_CODE)] = RUNTIME_CODE
    image[_USER : _USER + HANDLERS] = RUNTIME_CODE[:HANDLERS]
    gdt = _gdt()
    image[_TABLES : _TABLES + len(gdt)] = gdt
    struct.pack_into("<Q", image, _TABLES + _TSS + 4, _STACK_TOP)  # RSP0
    struct.pack_into("<H", image, _TABLES + _TSS + 102, 104)  # I/O map base
    image[_TABLES + _TSS + _TSS_LIMIT] = 0xFF
    image[_TABLES + _IDT : _TABLES + _IDT + 32 * 16] = _idt()
    return bytes(image)


def _cr0(wp: bool) -> int:
    """CR0 of a long-mode guest (SDM Vol. 3A 2.5), with WP as asked."""
    return _CR0_PE | _CR0_ET | _CR0_NE | _CR0_PG | (_CR0_WP if wp else 0)


def _rflags(controls: Controls) -> int:
    return _RFLAGS_FIXED | (_RFLAGS_AC if controls.rflags_ac else 0)


def _flat(selector: int, code: bool, dpl: int) -> Segment:
    """A flat 64-bit code or data segment as KVM_SET_SREGS takes it."""
    return Segment(
        base=0,
        limit=0xFFFF_FFFF,
        selector=selector,
        type=11 if code else 3,
        present=1,
        dpl=dpl,
        db=0 if code else 1,
        s=1,
        long=1 if code else 0,
        g=1,
    )


class RealRunner:
    """One real VM with one vCPU and one RAM memslot (slot 0 at GPA 0, anonymous memory, or
    with `guest_memfd` a guest_memfd bound with KVM_SET_USER_MEMORY_REGION2 and mapped shared
    by this process); `run` replays one access on it. KVM_GET_SUPPORTED_CPUID goes to
    KVM_SET_CPUID2 as is."""

    def __init__(self, ram_size: int = 32 << 20, *, guest_memfd: bool = False) -> None:
        check_int("ram_size", ram_size, 2 * RUNTIME_SIZE, 1 << 40)
        if ram_size % mmap.PAGESIZE:
            raise AddressError(f"ram_size={ram_size:#x} is not a multiple of the page size")
        self.ram_size = ram_size
        self.runtime_gpa = ram_size - RUNTIME_SIZE  # the runtime takes the top of RAM
        self._image = _runtime_image(self.runtime_gpa)
        self._kvm = RealKvm()
        self._vm = self._kvm.create_vm()
        self._vcpu = self._vm.create_vcpu(0, self._kvm.vcpu_mmap_size())
        self._mem: HostBuffer | GuestMemfdBuffer = (
            GuestMemfdBuffer(self._vm, ram_size) if guest_memfd else HostBuffer(ram_size)
        )
        self._slot_present = False
        self._loaded: list[int] = []
        self._extra: dict[int, HostBuffer] = {}
        cpuid = self._kvm.supported_cpuid()
        self._vcpu.set_cpuid2(cpuid)
        leaves = {(e.function, e.index): e for e in cpuid}
        self.cpuid_maxphyaddr = leaves[0x8000_0008, 0].eax & 0xFF
        self.cpuid_gbpages = bool(leaves[0x8000_0001, 0].edx >> 26 & 1)
        self.cpuid_la57 = bool(leaves[7, 0].ecx >> 16 & 1)
        vendor = struct.pack("<III", leaves[0, 0].ebx, leaves[0, 0].edx, leaves[0, 0].ecx)
        self.cpuid_vendor = "amd" if vendor in (b"AuthenticAMD", b"HygonGenuine") else "intel"
        self._apic_base = self._vcpu.get_sregs().apic_base

    def cpu_model(self) -> CpuModel:
        """The engine's CPU model for this host, from KVM_GET_SUPPORTED_CPUID. LA57 stays off
        whatever CPUID says, because KVM_SET_SREGS refuses CR4.LA57 on kvm_pvm."""
        return CpuModel(
            maxphyaddr=self.cpuid_maxphyaddr,
            gbpages=self.cpuid_gbpages,
            la57=False,
            vendor=self.cpuid_vendor,
        )

    def add_memslot(self, slot: int, flags: int, guest_phys_addr: int, size: int) -> HostBuffer:
        """A further memslot (slot 0 is RAM) backed by fresh anonymous memory, which the
        caller may fill; it stays across runs (only slot 0 is re-created)."""
        if slot == 0:
            raise TwodwalkError("slot=0 is the runner's RAM: use another slot id")
        buffer = HostBuffer(size)
        self._vm.set_user_memory_region(slot, flags, guest_phys_addr, size, buffer.address)
        self._extra[slot] = buffer
        return buffer

    def get_dirty_log(self, slot: int) -> bytes:
        """KVM_GET_DIRTY_LOG of a slot made with `add_memslot`."""
        return self._vm.get_dirty_log(slot, self._extra[slot].size // PAGE_SIZE)

    def run(
        self,
        pages: Mapping[int, bytes],
        cr3: int,
        gva: int,
        kind: str,
        controls: Controls,
        value: int = 0,
    ) -> Observed:
        """Load guest RAM (`pages`: page-aligned GPA -> up to 4 KiB of bytes; every other
        page reads as zeros) and the runtime, do one `kind` access ("read": `mov rax,
        [rdi]`, "write": `mov [rdi], rsi` of `value`, "fetch": `jmp rdi` onto the caller's
        int3) at `gva` under `cr3`, and return what happened. PML4 entry RUNTIME_PML4_SLOT of
        the table at `cr3` is overwritten. The memslot is deleted and re-created first, which
        zaps KVM's shadow pages, and every register is set again: runs do not see each other.
        """
        check_choice("kind", kind, tuple(STUBS))
        if controls.cpl not in (0, 3):
            raise TwodwalkError(f"cpl={controls.cpl!r} is not supported: valid is 0 or 3")
        check_int("gva", gva, 0, 1 << 64)
        check_int("value", value, 0, 1 << 64)
        self._start(pages, cr3, controls, b"", 0)
        stub = RUNTIME_GVA + (_USER if controls.cpl == 3 else _CODE) + STUBS[kind]
        self._vcpu.set_regs(
            Regs(rsi=value, rdi=gva, rsp=_STACK_TOP, rip=stub, rflags=_rflags(controls))
        )
        return self._observe(gva, kind, controls.cpl)

    def run_sequence(
        self,
        pages: Mapping[int, bytes],
        cr3: int,
        steps: Sequence[Step],
        controls: Controls,
        log_dirty: bool = False,
        watch: Iterable[int] = (),
    ) -> list[Observed]:
        """Load guest RAM and the runtime as `run` does, then run `steps` at CPL 0 in one
        guest run: the guest interprets a command list, and each step's report stops it
        (an OUT, or an exception it took, or a KVM_EXIT_MMIO on the way) until KVM_RUN is
        entered again. Nothing is re-created between steps, so KVM's shadow pages, the TLB
        and the guest's CR0/CR3 carry over. One `Observed` per step, with the loaded pages
        and the `watch` pages (GPAs) as they are after it and, with `log_dirty`, the RAM
        slot's KVM_GET_DIRTY_LOG bitmap (the slot is made with KVM_MEM_LOG_DIRTY_PAGES)."""
        if controls.cpl != 0:
            raise TwodwalkError(f"cpl={controls.cpl!r}: a sequence runs at CPL 0")
        check_int("number of steps", len(steps), 1, MAX_STEPS + 1)
        commands = bytearray()
        for step in steps:
            check_choice("step kind", step.kind, tuple(STEPS))
            check_int("step gva", step.gva, 0, 1 << 64)
            check_int("step value", step.value, 0, 1 << 64)
            rsi = _cr0(bool(step.value)) if step.kind == "cr0" else step.value
            commands += _COMMAND.pack(RUNTIME_GVA + _CODE + STEPS[step.kind], step.gva, rsi)
        watched = sorted({a & ~(PAGE_SIZE - 1) for a in watch} - set(pages))
        for address in watched:
            check_int("watched page", address, 0, self.runtime_gpa)
        self._start(pages, cr3, controls, bytes(commands), KVM_MEM_LOG_DIRTY_PAGES * log_dirty)
        self._loaded = sorted([*self._loaded, *watched])
        self._vcpu.set_regs(
            Regs(
                r12=RUNTIME_GVA + _COMMANDS,
                r13=_STACK_TOP,
                r14=_rflags(controls),
                rsp=_STACK_TOP,
                rip=RUNTIME_GVA + _CODE + SEQUENCE,
                rflags=_rflags(controls),
            )
        )
        out = []
        for step in steps:
            seen = self._observe_step(step)
            if log_dirty:
                dirty = self._vm.get_dirty_log(0, self.ram_size // PAGE_SIZE)
                seen = dataclasses.replace(seen, dirty_log=dirty)
            out.append(seen)
        return out

    def _start(
        self, pages: Mapping[int, bytes], cr3: int, controls: Controls, commands: bytes, flags: int
    ) -> None:
        """Check the guest RAM and CR3, load them with the command list, and set the
        control registers; the caller sets the general registers."""
        for address, page in pages.items():
            check_int("page address", address, 0, self.ram_size - PAGE_SIZE + 1)
            check_aligned("page address", address, PAGE_SIZE)
            check_int("page length", len(page), 0, PAGE_SIZE + 1)
        check_int("cr3", cr3, 0, 1 << 64)
        pml4 = cr3 & _PHYS_MASK
        if pml4 + 0x1000 > self.ram_size or pml4 >= self.runtime_gpa:
            raise AddressError(f"cr3={cr3:#x}: the PML4 must be in RAM, outside the runtime area")
        self._vcpu.complete_pending()
        self._load(pages, pml4, commands, flags)
        self._set_sregs(cr3, controls)

    def _load(self, pages: Mapping[int, bytes], pml4: int, commands: bytes, flags: int) -> None:
        """Delete the memslot, drop all of RAM, fill it, re-create the memslot with `flags`
        (api.rst, KVM_SET_USER_MEMORY_REGION: a zero memory_size deletes the slot, and KVM
        drops its shadow pages with it). MADV_DONTNEED gives the host's pages back, so a page
        no run loads is never-touched anonymous memory again, as in a fresh VMM."""
        if self._slot_present:
            self._vm.set_user_memory_region(0, 0, 0, 0, self._mem.address)  # delete
            self._slot_present = False
        memory = self._mem.map
        if isinstance(self._mem, GuestMemfdBuffer):
            self._mem.punch_all()  # a guest_memfd's way to give its pages back
        else:
            memory.madvise(mmap.MADV_DONTNEED)
        for address, page in pages.items():
            memory[address : address + len(page)] = page
        self._loaded = sorted(pages)
        memory[self.runtime_gpa : self.runtime_gpa + len(self._image)] = self._image
        start = self.runtime_gpa + _COMMANDS
        memory[start : start + len(commands)] = commands
        entry = self.runtime_gpa + _PDPT | _P | _RW | _US | _A
        struct.pack_into("<Q", memory, pml4 + 8 * RUNTIME_PML4_SLOT, entry)
        if isinstance(self._mem, GuestMemfdBuffer):
            if flags:
                raise TwodwalkError(
                    f"flags={flags:#x}: a guest_memfd slot takes no other flag (no dirty"
                    " logging, no KVM_MEM_READONLY)"
                )
            self._vm.set_user_memory_region2(
                0, KVM_MEM_GUEST_MEMFD, 0, self.ram_size, self._mem.address, self._mem.fd
            )
        else:
            self._vm.set_user_memory_region(0, flags, 0, self.ram_size, self._mem.address)
        self._slot_present = True

    def _set_sregs(self, cr3: int, controls: Controls) -> None:
        """Long mode by KVM_SET_SREGS (SDM Vol. 3A 9.8.5), at the controls' CPL."""
        user = controls.cpl == 3
        data = _flat(_USER_SS if user else _KERNEL_SS, False, controls.cpl)
        tables = RUNTIME_GVA + _TABLES
        cr4 = _CR4_PAE | (_CR4_SMEP if controls.cr4_smep else 0)
        cr4 |= _CR4_SMAP if controls.cr4_smap else 0
        efer = _EFER_SCE | _EFER_LME | _EFER_LMA | (_EFER_NXE if controls.efer_nxe else 0)
        self._vcpu.set_sregs(
            Sregs(
                cs=_flat(_USER_CS if user else _KERNEL_CS, True, controls.cpl),
                ds=data,
                es=data,
                fs=data,
                gs=data,
                ss=data,
                tr=Segment(tables + _TSS, _TSS_LIMIT, _TR, 11, 1, 0, 0, 0, 0, 0),
                ldt=Segment(0, 0, 0, 2, 0, 0, 0, 0, 0, 0, unusable=1),
                gdt=(tables, 7 * 8 - 1),
                idt=(tables + _IDT, 32 * 16 - 1),
                cr0=_cr0(controls.cr0_wp),
                cr2=0,
                cr3=cr3,
                cr4=cr4,
                cr8=0,
                efer=efer,
                apic_base=self._apic_base,
            )
        )

    def _observe_step(self, step: Step) -> Observed:
        """KVM_RUN until the guest reports the step: an OUT to STEP_PORT, or to
        EXCEPTION_PORT from a fault at the step's own instruction. A KVM_EXIT_MMIO on the way
        is kept, and the read it stands for gets zeros (kvm_run.mmio.data, api.rst)."""
        vcpu = self._vcpu
        mmio = None
        where = f"step {step.kind} at GVA {step.gva:#x}"
        for _ in range(_MAX_EXITS):
            reason = vcpu.run()
            if reason == KVM_EXIT_INTR:
                continue
            if reason == KVM_EXIT_MMIO and mmio is None:
                phys_addr, length, is_write, data = vcpu.mmio()
                mmio = (phys_addr, length, is_write, data if is_write else b"")
                vcpu.clear_mmio_data()
                continue
            if reason == KVM_EXIT_IO and vcpu.io() == (KVM_EXIT_IO_OUT, STEP_PORT):
                read = vcpu.get_regs().rax if step.kind == "read" and mmio is None else None
                return Observed(None, None, None, read, False, mmio, self._ram())
            if reason == KVM_EXIT_IO and vcpu.io() == (KVM_EXIT_IO_OUT, EXCEPTION_PORT):
                regs = vcpu.get_regs()
                vector, error_code, rip, cr2 = regs.rax, regs.rbx, regs.rdx, regs.rcx
                if vector == 3 or rip != RUNTIME_GVA + _CODE + STEPS[step.kind]:
                    raise KvmExitError(
                        f"{where}: the guest took vector {vector} (error code"
                        f" {error_code:#x}, CR2 {cr2:#x}) at RIP {rip:#x}, not at the step"
                    )
                cr2_seen = cr2 if vector == 14 else None
                return Observed(vector, error_code, cr2_seen, None, False, mmio, self._ram())
            name = EXIT_REASONS.get(reason, f"exit reason {reason}")
            raise KvmExitError(
                f"{where}: KVM_RUN stopped with {name}"
                f" (kvm_run union: {vcpu.exit_details()}; RIP {vcpu.get_regs().rip:#x})"
            )
        raise KvmExitError(f"{where}: no report after {_MAX_EXITS} exits")

    def _observe(self, gva: int, kind: str, cpl: int) -> Observed:
        """KVM_RUN until the guest reports (an OUT to DONE_PORT or EXCEPTION_PORT), an MMIO
        exit or the int3 KVM cannot emulate; anything else raises `KvmExitError` naming the
        exit."""
        vcpu = self._vcpu
        for _ in range(_MAX_EXITS):
            reason = vcpu.run()
            if reason == KVM_EXIT_INTR:
                continue
            if reason == KVM_EXIT_MMIO:
                phys_addr, length, is_write, data = vcpu.mmio()
                mmio = (phys_addr, length, is_write, data if is_write else b"")
                return Observed(None, None, None, None, False, mmio, self._ram())
            if reason == KVM_EXIT_INTERNAL_ERROR and self._int3_not_emulated(gva, kind):
                return Observed(None, None, None, None, True, None, self._ram())
            if reason == KVM_EXIT_IO:
                direction, port = vcpu.io()
                if direction == KVM_EXIT_IO_OUT and port == DONE_PORT and kind != "fetch":
                    read = vcpu.get_regs().rax if kind == "read" else None
                    return Observed(None, None, None, read, False, None, self._ram())
                if direction == KVM_EXIT_IO_OUT and port == EXCEPTION_PORT:
                    return self._exception(gva, kind, cpl)
            name = EXIT_REASONS.get(reason, f"exit reason {reason}")
            raise KvmExitError(
                f"{kind} at GVA {gva:#x}: KVM_RUN stopped with {name}"
                f" (kvm_run union: {vcpu.exit_details()}; RIP {vcpu.get_regs().rip:#x})"
            )
        raise KvmExitError(f"{kind} at GVA {gva:#x}: no report after {_MAX_EXITS} exits")

    def _int3_not_emulated(self, gva: int, kind: str) -> bool:
        """Whether KVM stopped at the fetch target's int3 because it could not emulate it.
        PVM runs guest ring 0 deprivileged and hands its int3 to KVM's instruction emulator,
        which has no INT n in 64-bit mode: KVM_INTERNAL_ERROR_EMULATION with the int3 at
        RIP == gva. Reaching it means the fetch was allowed, as a #BP would."""
        insn = self._vcpu.emulation_failure()
        if kind != "fetch" or not insn:
            return False
        return insn[0] == _INT3 and self._vcpu.get_regs().rip == gva

    def _exception(self, gva: int, kind: str, cpl: int) -> Observed:
        """The handler's report: RAX vector, RBX error code, RDX the pushed RIP, RCX CR2.
        The RIP must be the stub's access (or, for a fetch, the target) so that a fault of the
        runtime itself, or a fetch target that is not int3, is never taken for the access's."""
        regs = self._vcpu.get_regs()
        vector, error_code, rip, cr2 = regs.rax, regs.rbx, regs.rdx, regs.rcx
        access = RUNTIME_GVA + (_USER if cpl == 3 else _CODE) + STUBS[kind]
        if kind == "fetch" and vector == 3 and rip == (gva + 1) % (1 << 64):
            return Observed(None, None, None, None, True, None, self._ram())
        at_target = kind == "fetch" and rip == gva and (vector != 14 or cr2 == gva)
        if vector == 3 or not (rip == access or at_target):
            raise KvmExitError(
                f"{kind} at GVA {gva:#x}: the guest took vector {vector} (error code"
                f" {error_code:#x}, CR2 {cr2:#x}) at RIP {rip:#x}, not at the access"
                f" ({access:#x}{' or its target' if kind == 'fetch' else ''})"
            )
        cr2_seen = cr2 if vector == 14 else None
        return Observed(vector, error_code, cr2_seen, None, False, None, self._ram())

    def _ram(self) -> dict[int, bytes]:
        """The pages the caller loaded, as they are after the run."""
        return {a: bytes(self._mem.map[a : a + PAGE_SIZE]) for a in self._loaded}

    def close(self) -> None:
        self._vcpu.close()
        self._vm.close()
        self._kvm.close()
        if isinstance(self._mem, GuestMemfdBuffer):
            self._mem.close()
        else:
            self._mem.map.close()
