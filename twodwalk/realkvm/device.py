"""/dev/kvm from the standard library: the system and VM file descriptors, the capabilities
and module parameters the engine must mirror, and memory to back real memslots.

The ioctl numbers and structures are those of Documentation/virt/kvm/api.rst (API version 12).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import struct
import sys
from dataclasses import astuple, dataclass
from pathlib import Path

from twodwalk.engine.kvm.guest_memfd import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
)
from twodwalk.engine.kvm.memslots import KvmError
from twodwalk.errors import TwodwalkError

try:
    import fcntl
except ImportError:  # Windows, Pyodide (JupyterLite): no ioctl(2), so no real KVM either
    HAVE_IOCTL = False
else:
    HAVE_IOCTL = True

KVMIO = 0xAE


def _io(nr: int) -> int:
    return KVMIO << 8 | nr


def _iow(nr: int, size: int) -> int:
    return 1 << 30 | size << 16 | KVMIO << 8 | nr


KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, 32)
KVM_GET_DIRTY_LOG = _iow(0x42, 16)  # struct kvm_dirty_log: slot, padding, bitmap pointer
KVM_SET_USER_MEMORY_REGION2 = _iow(0x49, 160)
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_READONLY_MEM = 81
KVM_CAP_MULTI_ADDRESS_SPACE = 118
_MEMORY_REGION = struct.Struct("=IIQQQ")  # struct kvm_userspace_memory_region
# struct kvm_userspace_memory_region2: the same five fields, guest_memfd_offset,
# guest_memfd, pad1, pad2[14]
_MEMORY_REGION2 = struct.Struct("=IIQQQQII14Q")
_CREATE_GUEST_MEMFD = struct.Struct("=QQ6Q")  # struct kvm_create_guest_memfd


class KvmUnavailableError(TwodwalkError):
    """Real KVM cannot be used here; the message says why."""


def unavailable_reason() -> str | None:
    """Why /dev/kvm cannot be used on this machine, or None when it can."""
    if not HAVE_IOCTL:
        return "real KVM needs ioctl(2), and this Python has no fcntl module (Pyodide, Windows)"
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return f"real KVM needs Linux on x86-64; this is {sys.platform} on {platform.machine()}"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"/dev/kvm cannot be opened ({exc.strerror}): no KVM here (Binder, a container?)"
    os.close(fd)
    return None


@dataclass(frozen=True)
class KvmFlavour:
    """What this host's KVM is: its module, whether it uses TDP (EPT/NPT) or shadows guest
    paging in software, and its capabilities that change the memslot rules."""

    module: str
    tdp: bool
    address_spaces: int
    nr_memslots: int
    readonly_mem: bool
    mmio_caching: bool

    def describe(self) -> str:
        """This KVM in words, for the reader of the notebook: what it can be checked on."""
        paging = (
            "two-dimensional paging in hardware (EPT or NPT): the engine's EPT path"
            if self.tdp
            else "guest paging shadowed by KVM in software (no EPT or NPT here): the"
            " engine's shadow path; everything about EPT rests on the manuals and the tests"
        )
        yes = {True: "yes", False: "no"}
        return "\n".join(
            [
                f"KVM module: {self.module}",
                f"paging: {paging}",
                f"memslots per address space: {self.nr_memslots},"
                f" address spaces: {self.address_spaces}",
                f"read-only memslots: {yes[self.readonly_mem]},"
                f" MMIO SPTE caching: {yes[self.mmio_caching]}",
            ]
        )


def this_machine() -> str:
    """What the reader's /dev/kvm is, or why there is none."""
    reason = unavailable_reason()
    if reason is not None:
        return f"no real KVM here: {reason}"
    kvm = RealKvm()
    try:
        return kvm.flavour().describe()
    finally:
        kvm.close()


def _module_flag(path: str) -> bool:
    try:
        return Path(path).read_text().strip() in ("Y", "1")
    except OSError:
        return False


class RealKvm:
    """The /dev/kvm system file descriptor."""

    def __init__(self) -> None:
        reason = unavailable_reason()
        if reason is not None:
            raise KvmUnavailableError(reason)
        self.fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        version = fcntl.ioctl(self.fd, KVM_GET_API_VERSION)
        if version != 12:
            raise KvmUnavailableError(f"KVM API version {version}; twodwalk speaks version 12")

    def check_extension(self, cap: int) -> int:
        return fcntl.ioctl(self.fd, KVM_CHECK_EXTENSION, cap)

    def flavour(self) -> KvmFlavour:
        """Read the module parameters and capabilities that the engine must mirror."""
        modules = {
            m for m in ("kvm_intel", "kvm_amd", "kvm_pvm") if Path(f"/sys/module/{m}").exists()
        }
        module = sorted(modules)[0] if modules else "kvm"
        tdp = _module_flag("/sys/module/kvm_intel/parameters/ept") or _module_flag(
            "/sys/module/kvm_amd/parameters/npt"
        )
        return KvmFlavour(
            module=module,
            tdp=tdp and module != "kvm_pvm",
            address_spaces=max(1, self.check_extension(KVM_CAP_MULTI_ADDRESS_SPACE)),
            nr_memslots=self.check_extension(KVM_CAP_NR_MEMSLOTS),
            readonly_mem=bool(self.check_extension(KVM_CAP_READONLY_MEM)),
            mmio_caching=_module_flag("/sys/module/kvm/parameters/mmio_caching"),
        )

    def create_vm(self) -> RealVm:
        return RealVm(fcntl.ioctl(self.fd, KVM_CREATE_VM, 0))

    def vcpu_mmap_size(self) -> int:
        """KVM_GET_VCPU_MMAP_SIZE: the size of a vCPU's struct kvm_run mapping."""
        return fcntl.ioctl(self.fd, KVM_GET_VCPU_MMAP_SIZE, 0)

    def supported_cpuid(self) -> list[CpuidEntry]:
        """KVM_GET_SUPPORTED_CPUID, retried with room for more entries on E2BIG (api.rst)."""
        nent = 64
        while True:
            raw = bytearray(struct.pack("=II", nent, 0) + bytes(_CPUID_ENTRY.size * nent))
            try:
                _ioctl(self.fd, KVM_GET_SUPPORTED_CPUID, raw, "KVM_GET_SUPPORTED_CPUID")
            except KvmError as exc:
                if exc.errno != errno.E2BIG or nent >= 4096:
                    raise
                nent *= 2
                continue
            count = struct.unpack_from("=I", raw)[0]
            size = _CPUID_ENTRY.size
            return [CpuidEntry(*_CPUID_ENTRY.unpack_from(raw, 8 + size * i)) for i in range(count)]

    def close(self) -> None:
        os.close(self.fd)


class RealVm:
    """A VM file descriptor."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def set_user_memory_region(
        self, slot: int, flags: int, guest_phys_addr: int, memory_size: int, userspace_addr: int
    ) -> None:
        """KVM_SET_USER_MEMORY_REGION; raises `KvmError` with the kernel's errno."""
        arg = _MEMORY_REGION.pack(slot, flags, guest_phys_addr, memory_size, userspace_addr)
        try:
            fcntl.ioctl(self.fd, KVM_SET_USER_MEMORY_REGION, arg)
        except OSError as exc:
            code = exc.errno or errno.EIO
            raise KvmError(code, f"KVM_SET_USER_MEMORY_REGION: {exc.strerror}") from None

    def set_user_memory_region2(
        self,
        slot: int,
        flags: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int,
        guest_memfd: int = 0,
        guest_memfd_offset: int = 0,
    ) -> None:
        """KVM_SET_USER_MEMORY_REGION2; raises `KvmError` with the kernel's errno."""
        arg = _MEMORY_REGION2.pack(
            slot,
            flags,
            guest_phys_addr,
            memory_size,
            userspace_addr,
            guest_memfd_offset,
            guest_memfd,
            0,
            *[0] * 14,
        )
        _ioctl(self.fd, KVM_SET_USER_MEMORY_REGION2, arg, "KVM_SET_USER_MEMORY_REGION2")

    def create_guest_memfd(self, size: int, flags: int = 0) -> int:
        """KVM_CREATE_GUEST_MEMFD: the new file's descriptor, or `KvmError`."""
        arg = bytearray(_CREATE_GUEST_MEMFD.pack(size, flags, *[0] * 6))
        try:
            fd: int = fcntl.ioctl(self.fd, KVM_CREATE_GUEST_MEMFD, arg, True)
        except OSError as exc:
            raise KvmError(
                exc.errno or errno.EIO, f"KVM_CREATE_GUEST_MEMFD: {exc.strerror}"
            ) from None
        return fd

    def get_dirty_log(self, slot: int, npages: int) -> bytes:
        """KVM_GET_DIRTY_LOG: one bit per page of the slot; the kernel fills a buffer
        rounded up to whole longs, which is what comes back."""
        bitmap = ctypes.create_string_buffer((npages + 63) // 64 * 8)
        arg = struct.pack("=IIQ", slot, 0, ctypes.addressof(bitmap))
        try:
            fcntl.ioctl(self.fd, KVM_GET_DIRTY_LOG, arg)
        except OSError as exc:
            raise KvmError(exc.errno or errno.EIO, f"KVM_GET_DIRTY_LOG: {exc.strerror}") from None
        return bitmap.raw

    def create_vcpu(self, vcpu_id: int, mmap_size: int) -> RealVcpu:
        """KVM_CREATE_VCPU; `mmap_size` is `RealKvm.vcpu_mmap_size()`."""
        return RealVcpu(fcntl.ioctl(self.fd, KVM_CREATE_VCPU, vcpu_id), mmap_size)

    def close(self) -> None:
        os.close(self.fd)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with its mode argument, which os.posix_fallocate lacks; `KvmError` with
    the errno when the file refuses."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    if libc.fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise KvmError(code, f"fallocate: {os.strerror(code)}")


class GuestMemfdBuffer:
    """A guest_memfd of `vm` (GUEST_MEMFD_FLAG_MMAP | INIT_SHARED) mapped MAP_SHARED in this
    process, to back a memslot the way HostBuffer does, with the file's descriptor."""

    def __init__(self, vm: RealVm, size: int) -> None:
        self.fd = vm.create_guest_memfd(size, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)
        self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        self.size = size

    def punch_all(self) -> None:
        """fallocate(PUNCH_HOLE | KEEP_SIZE) of the whole file: every page goes, and KVM
        zaps what mapped them (`kvm_gmem_invalidate_begin`)."""
        fallocate(self.fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 0, self.size)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


class HostBuffer:
    """Anonymous memory in this process, to back real memslots."""

    def __init__(self, size: int) -> None:
        self.map = mmap.mmap(
            -1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, mmap.PROT_READ | mmap.PROT_WRITE
        )
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        self.size = size


# --- a vCPU: registers, CPUID and KVM_RUN ------------------------------------------------------


def _ior(nr: int, size: int) -> int:
    return 2 << 30 | size << 16 | KVMIO << 8 | nr


def _iowr(nr: int, size: int) -> int:
    return 3 << 30 | size << 16 | KVMIO << 8 | nr


KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, 8)
KVM_CREATE_GUEST_MEMFD = _iowr(0xD4, _CREATE_GUEST_MEMFD.size)
KVM_CREATE_VCPU = _io(0x41)
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, 144)
KVM_SET_REGS = _iow(0x82, 144)
KVM_GET_SREGS = _ior(0x83, 312)
KVM_SET_SREGS = _iow(0x84, 312)
KVM_SET_CPUID2 = _iow(0x90, 8)

KVM_EXIT_IO = 2
KVM_EXIT_MMIO = 6
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_IO_OUT = 1
# api.rst, "The kvm_run structure": the exit reasons a plain x86 VM without an in-kernel
# irqchip can meet.
EXIT_REASONS = {
    0: "KVM_EXIT_UNKNOWN",
    1: "KVM_EXIT_EXCEPTION",
    2: "KVM_EXIT_IO",
    3: "KVM_EXIT_HYPERCALL",
    4: "KVM_EXIT_DEBUG",
    5: "KVM_EXIT_HLT",
    6: "KVM_EXIT_MMIO",
    7: "KVM_EXIT_IRQ_WINDOW_OPEN",
    8: "KVM_EXIT_SHUTDOWN",
    9: "KVM_EXIT_FAIL_ENTRY",
    10: "KVM_EXIT_INTR",
    17: "KVM_EXIT_INTERNAL_ERROR",
    24: "KVM_EXIT_SYSTEM_EVENT",
    29: "KVM_EXIT_X86_RDMSR",
    30: "KVM_EXIT_X86_WRMSR",
    37: "KVM_EXIT_NOTIFY",
    39: "KVM_EXIT_MEMORY_FAULT",
}

_CPUID_ENTRY = struct.Struct("=7I12x")  # struct kvm_cpuid_entry2
_REGS = struct.Struct("=18Q")  # struct kvm_regs
_SEGMENT = struct.Struct("=QIH9Bx")  # struct kvm_segment
_DTABLE = struct.Struct("=QH6x")  # struct kvm_dtable
_CONTROL = struct.Struct("=7Q32x")  # cr0 cr2 cr3 cr4 cr8 efer apic_base, interrupt_bitmap
_RUN_HEAD = struct.Struct("=BB6xI")  # kvm_run: request_interrupt_window, immediate_exit, exit
_RUN_IO = struct.Struct("=BBHIQ")  # kvm_run.io: direction, size, port, count, data_offset
_RUN_MMIO = struct.Struct("=Q8sIB")  # kvm_run.mmio: phys_addr, data, len, is_write
_RUN_UNION = 32


class KvmExitError(RuntimeError):
    """KVM_RUN returned something the caller did not expect; the message names it."""


@dataclass(frozen=True)
class CpuidEntry:
    """One struct kvm_cpuid_entry2."""

    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


@dataclass(frozen=True)
class Regs:
    """struct kvm_regs (KVM_GET_REGS / KVM_SET_REGS)."""

    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = 0x2


@dataclass(frozen=True)
class Segment:
    """struct kvm_segment: a segment register's selector and hidden part (`long` is L)."""

    base: int
    limit: int
    selector: int
    type: int
    present: int
    dpl: int
    db: int
    s: int
    long: int
    g: int
    avl: int = 0
    unusable: int = 0


@dataclass(frozen=True)
class Sregs:
    """struct kvm_sregs (KVM_GET_SREGS / KVM_SET_SREGS); descriptor tables as (base, limit).
    The pending-interrupt bitmap is always written as zero."""

    cs: Segment
    ds: Segment
    es: Segment
    fs: Segment
    gs: Segment
    ss: Segment
    tr: Segment
    ldt: Segment
    gdt: tuple[int, int]
    idt: tuple[int, int]
    cr0: int
    cr2: int
    cr3: int
    cr4: int
    cr8: int
    efer: int
    apic_base: int

    def pack(self) -> bytes:
        segments = (self.cs, self.ds, self.es, self.fs, self.gs, self.ss, self.tr, self.ldt)
        return b"".join(
            [
                *(_SEGMENT.pack(*astuple(seg)) for seg in segments),
                _DTABLE.pack(*self.gdt),
                _DTABLE.pack(*self.idt),
                _CONTROL.pack(
                    self.cr0, self.cr2, self.cr3, self.cr4, self.cr8, self.efer, self.apic_base
                ),
            ]
        )

    @classmethod
    def unpack(cls, raw: bytes) -> Sregs:
        cs, ds, es, fs, gs, ss, tr, ldt = (
            Segment(*_SEGMENT.unpack_from(raw, _SEGMENT.size * i)) for i in range(8)
        )
        gdt_base, gdt_limit = _DTABLE.unpack_from(raw, 192)
        idt_base, idt_limit = _DTABLE.unpack_from(raw, 208)
        cr0, cr2, cr3, cr4, cr8, efer, apic_base = _CONTROL.unpack_from(raw, 224)
        return cls(
            cs,
            ds,
            es,
            fs,
            gs,
            ss,
            tr,
            ldt,
            (gdt_base, gdt_limit),
            (idt_base, idt_limit),
            cr0,
            cr2,
            cr3,
            cr4,
            cr8,
            efer,
            apic_base,
        )


def _ioctl(fd: int, request: int, arg: bytes | bytearray, name: str) -> None:
    """An ioctl on a structure (a bytearray is filled in place; any size, unlike a bytes
    argument); a failure raises `KvmError` naming the ioctl, with the kernel's errno."""
    try:
        fcntl.ioctl(fd, request, arg if isinstance(arg, bytearray) else bytearray(arg), True)
    except OSError as exc:
        raise KvmError(exc.errno or errno.EIO, f"{name}: {exc.strerror}") from None


class RealVcpu:
    """A vCPU file descriptor and its mmap()ed struct kvm_run (api.rst, KVM_CREATE_VCPU)."""

    def __init__(self, fd: int, mmap_size: int) -> None:
        self.fd = fd
        self.run_map = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    def set_cpuid2(self, entries: list[CpuidEntry]) -> None:
        raw = struct.pack("=II", len(entries), 0) + b"".join(
            _CPUID_ENTRY.pack(*astuple(e)) for e in entries
        )
        _ioctl(self.fd, KVM_SET_CPUID2, raw, "KVM_SET_CPUID2")

    def get_regs(self) -> Regs:
        raw = bytearray(_REGS.size)
        _ioctl(self.fd, KVM_GET_REGS, raw, "KVM_GET_REGS")
        return Regs(*_REGS.unpack(raw))

    def set_regs(self, regs: Regs) -> None:
        _ioctl(self.fd, KVM_SET_REGS, _REGS.pack(*astuple(regs)), "KVM_SET_REGS")

    def get_sregs(self) -> Sregs:
        raw = bytearray(312)
        _ioctl(self.fd, KVM_GET_SREGS, raw, "KVM_GET_SREGS")
        return Sregs.unpack(bytes(raw))

    def set_sregs(self, sregs: Sregs) -> None:
        _ioctl(self.fd, KVM_SET_SREGS, sregs.pack(), "KVM_SET_SREGS")

    def run(self) -> int:
        """KVM_RUN once; the exit reason (a signal's EINTR comes back as KVM_EXIT_INTR)."""
        try:
            fcntl.ioctl(self.fd, KVM_RUN, 0)
        except InterruptedError:
            return KVM_EXIT_INTR
        except OSError as exc:
            raise KvmError(exc.errno or errno.EIO, f"KVM_RUN: {exc.strerror}") from None
        reason: int = _RUN_HEAD.unpack_from(self.run_map)[2]
        return reason

    def complete_pending(self) -> None:
        """Finish a KVM_EXIT_IO/MMIO without entering the guest: api.rst says such an operation
        is complete only once userspace re-enters KVM_RUN, and immediate_exit makes that entry
        return -EINTR before running the guest."""
        self.run_map[1] = 1
        try:
            for _ in range(8):  # a split MMIO access exits once per fragment
                try:
                    fcntl.ioctl(self.fd, KVM_RUN, 0)
                except InterruptedError:
                    return
                except OSError as exc:
                    raise KvmError(exc.errno or errno.EIO, f"KVM_RUN: {exc.strerror}") from None
            raise KvmExitError("KVM_RUN with immediate_exit kept exiting to userspace")
        finally:
            self.run_map[1] = 0

    def io(self) -> tuple[int, int]:
        """kvm_run.io of a KVM_EXIT_IO: (direction, port)."""
        direction, _size, port, _count, _offset = _RUN_IO.unpack_from(self.run_map, _RUN_UNION)
        return direction, port

    def mmio(self) -> tuple[int, int, bool, bytes]:
        """kvm_run.mmio of a KVM_EXIT_MMIO: (phys_addr, len, is_write, data)."""
        phys_addr, data, length, is_write = _RUN_MMIO.unpack_from(self.run_map, _RUN_UNION)
        return phys_addr, length, bool(is_write), data[:length]

    def clear_mmio_data(self) -> None:
        """Zero kvm_run.mmio.data: what a read that exited as KVM_EXIT_MMIO gets once
        KVM_RUN is entered again (api.rst: userspace fills it in for a read)."""
        start = _RUN_UNION + 8
        self.run_map[start : start + 8] = bytes(8)

    def emulation_failure(self) -> bytes | None:
        """For a KVM_EXIT_INTERNAL_ERROR of suberror KVM_INTERNAL_ERROR_EMULATION that carries
        the instruction (flag KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES, api.rst):
        the bytes KVM fetched at RIP and could not emulate; None for any other exit."""
        reason, suberror, ndata, flags, size = struct.unpack_from("=8xI20xIIQB", self.run_map)
        if reason != KVM_EXIT_INTERNAL_ERROR or suberror != 1 or ndata < 2 or not flags & 1:
            return None
        start = _RUN_UNION + 16
        return bytes(self.run_map[start + 1 : start + 1 + min(size, 15)])

    def exit_details(self) -> str:
        """The first words of kvm_run's exit union, for error messages (fail_entry's hardware
        reason, internal's suberror and data)."""
        words = struct.unpack_from("=4Q", self.run_map, _RUN_UNION)
        return " ".join(f"{w:#x}" for w in words)

    def close(self) -> None:
        self.run_map.close()
        os.close(self.fd)
