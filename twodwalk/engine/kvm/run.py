"""What KVM_RUN hands to userspace when an access leaves the guest (struct kvm_run in
include/uapi/linux/kvm.h): an MMIO access to emulate, or an access KVM could not emulate.
Only a vCPU makes them; a bare-metal access never exits."""

from __future__ import annotations

from dataclasses import dataclass

from twodwalk.engine.units import hex_repr


@hex_repr
@dataclass(frozen=True)
class MmioExit:
    """KVM_EXIT_MMIO: the access went to userspace (struct kvm_run `mmio`)."""

    phys_addr: int
    is_write: bool
    len: int
    data: bytes


@dataclass(frozen=True)
class InternalError:
    """KVM_EXIT_INTERNAL_ERROR: KVM could not emulate the access (e.g. a fetch from MMIO)."""

    suberror: str
    detail: str
