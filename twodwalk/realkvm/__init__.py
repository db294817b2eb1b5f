"""Replay on real KVM (/dev/kvm): what the engine says, checked against the kernel.

Standard library only (os, fcntl, mmap, ctypes, struct), Linux x86-64 only. Importing this
package anywhere is safe; using it where /dev/kvm cannot be opened raises
`KvmUnavailableError` saying why.

What can be compared is what the guest and the VMM can observe: the errno of each ioctl,
KVM_RUN exits, dirty bitmaps, the guest's exceptions and its own memory. The tables KVM builds
for itself (EPT or shadow pages) are not visible from userspace.
"""

from twodwalk.realkvm.check import CheckResult, check
from twodwalk.realkvm.device import (
    KvmFlavour,
    KvmUnavailableError,
    RealKvm,
    RealVm,
    this_machine,
    unavailable_reason,
)
from twodwalk.realkvm.guest_memfd import GmemReport, gmem_fuzz
from twodwalk.realkvm.memslots import MemslotReport, memslot_fuzz
from twodwalk.realkvm.paging import QUIRKS, PagingReport, paging_fuzz
from twodwalk.realkvm.runtime import Controls, Observed, RealRunner, Step
from twodwalk.realkvm.sequences import ENGINE_DEFECTS, SequenceReport, sequence_fuzz

__all__ = [
    "ENGINE_DEFECTS",
    "QUIRKS",
    "CheckResult",
    "Controls",
    "GmemReport",
    "KvmFlavour",
    "KvmUnavailableError",
    "MemslotReport",
    "Observed",
    "PagingReport",
    "RealKvm",
    "RealRunner",
    "RealVm",
    "SequenceReport",
    "Step",
    "check",
    "gmem_fuzz",
    "memslot_fuzz",
    "paging_fuzz",
    "sequence_fuzz",
    "this_machine",
    "unavailable_reason",
]
