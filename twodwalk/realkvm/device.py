"""/dev/kvm from the standard library: the system and VM file descriptors, the capabilities
and module parameters the engine must mirror, and memory to back real memslots.

The ioctl numbers and structures are those of Documentation/virt/kvm/api.rst (API version 12).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import platform
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

from twodwalk.errors import TwodwalkError
from twodwalk.kvm.memslots import KvmError

KVMIO = 0xAE


def _io(nr: int) -> int:
    return KVMIO << 8 | nr


def _iow(nr: int, size: int) -> int:
    return 1 << 30 | size << 16 | KVMIO << 8 | nr


KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, 32)
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_READONLY_MEM = 81
KVM_CAP_MULTI_ADDRESS_SPACE = 118
_MEMORY_REGION = struct.Struct("=IIQQQ")  # struct kvm_userspace_memory_region


class KvmUnavailableError(TwodwalkError):
    """Real KVM cannot be used here; the message says why."""


def unavailable_reason() -> str | None:
    """Why /dev/kvm cannot be used on this machine, or None when it can."""
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

    def close(self) -> None:
        os.close(self.fd)


class HostBuffer:
    """Anonymous memory in this process, to back real memslots."""

    def __init__(self, size: int) -> None:
        self.map = mmap.mmap(
            -1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, mmap.PROT_READ | mmap.PROT_WRITE
        )
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        self.size = size
