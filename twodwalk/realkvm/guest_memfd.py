"""guest_memfd on real KVM: random sequences of KVM_CREATE_GUEST_MEMFD, KVM_SET_USER_MEMORY_REGION2
(bind, delete, change) and fallocate on a real VM and on the engine's, compared errno by errno.

Descriptors differ between the two sides; a call names a file by the order it was created in
(or a descriptor that is not open, or a file of a second VM), and each side translates that to
its own descriptor.
"""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

from twodwalk.engine.cpuid import CpuModel
from twodwalk.engine.kvm.guest_memfd import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE
from twodwalk.engine.kvm.memslots import KVM_MEM_GUEST_MEMFD, KvmError
from twodwalk.engine.kvm.vm import Vm
from twodwalk.engine.machine import new_host
from twodwalk.engine.units import PAGE_SIZE
from twodwalk.realkvm.device import HostBuffer, RealKvm, RealVm, fallocate
from twodwalk.realkvm.report import CallReport, errno_name

BAD_FD = 1000  # a descriptor neither side has open
FOREIGN = -1  # the file of the second VM
POOL_PAGES = 64


@dataclass(frozen=True)
class GmemCall:
    """One call: `kind` is create, bind, delete or fallocate; `file` indexes the files
    created so far, modulo their number (BAD_FD and FOREIGN as above)."""

    kind: str
    size: int = 0
    flags: int = 0
    slot: int = 0
    gpa: int = 0
    file: int = 0
    offset: int = 0

    def describe(self) -> str:
        fields = ", ".join(
            f"{name}={value:#x}" for name, value in vars(self).items() if name != "kind"
        )
        return f"{self.kind}({fields})"


@dataclass(frozen=True)
class GmemOutcome:
    call: GmemCall
    real: int
    engine: int

    @property
    def agree(self) -> bool:
        return self.real == self.engine

    def describe(self) -> str:
        return self.call.describe()


class _Side:
    """One side of the comparison: its VM calls and its own descriptors, in creation order."""

    def __init__(self, vm: RealVm | Vm, foreign: int, hva: int) -> None:
        self.vm = vm
        self.files: list[int] = []
        self.foreign = foreign
        self.hva = hva

    def fd(self, file: int) -> int:
        if file == FOREIGN:
            return self.foreign
        if file == BAD_FD or not self.files:
            return BAD_FD
        return self.files[file % len(self.files)]  # creations may have failed

    def apply(self, call: GmemCall) -> int:
        try:
            self._apply(call)
        except KvmError as exc:
            return exc.errno
        return 0

    def _apply(self, call: GmemCall) -> None:
        if call.kind == "create":
            self.files.append(self.vm.create_guest_memfd(call.size, call.flags))
        elif call.kind == "bind":
            self.vm.set_user_memory_region2(
                call.slot,
                call.flags,
                call.gpa,
                call.size,
                self.hva,
                self.fd(call.file),
                call.offset,
            )
        elif call.kind == "delete":
            self.vm.set_user_memory_region2(call.slot, 0, 0, 0, self.hva)
        else:
            self._fallocate(call)

    def _fallocate(self, call: GmemCall) -> None:
        fd = self.fd(call.file)
        if isinstance(self.vm, RealVm):
            fallocate(fd, call.flags, call.offset, call.size)
        elif fd not in self.vm.vmm.files:
            raise KvmError(errno.EBADF, f"fallocate: descriptor {fd} is not open")
        else:
            self.vm.guest_memfd(fd).fallocate(call.flags, call.offset, call.size)


def random_gmem_calls(rng: random.Random, count: int) -> Iterator[GmemCall]:
    """Calls that reach every rule of kvm_gmem_create, kvm_gmem_bind, the memslot flags and
    kvm_gmem_fallocate: sizes and flags good and bad, offsets aligned or not and past the
    end, overlapping bindings, deletes and changes of bound slots, bad and foreign files."""
    created = 0
    for _ in range(count):
        roll = rng.random()
        if roll < 0.2 or not created:
            created += 1
            yield GmemCall(
                "create",
                size=rng.choice([0, 1, 4096, 4097, 16 * PAGE_SIZE, 32 * PAGE_SIZE]),
                flags=rng.choice([0, 1, 2, 3, 3, 4, 1 << 63]),
            )
        elif roll < 0.65:
            yield GmemCall(
                "bind",
                size=rng.choice([4, 8, 8, 16]) * PAGE_SIZE + rng.choice([0] * 9 + [1]),
                flags=rng.choice([KVM_MEM_GUEST_MEMFD] * 6 + [0, 4 | 1, 4 | 2, 8]),
                slot=rng.randrange(6),
                gpa=rng.randrange(32) * 8 * PAGE_SIZE,
                file=rng.choice([rng.randrange(created)] * 8 + [BAD_FD, FOREIGN]),
                offset=rng.choice([0, 0, 4, 8, 12, 16, 24]) * PAGE_SIZE
                + rng.choice([0] * 9 + [0x800]),
            )
        elif roll < 0.8:
            yield GmemCall("delete", slot=rng.randrange(6))
        else:
            yield GmemCall(
                "fallocate",
                flags=rng.choice(
                    [FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE] * 3
                    + [FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_KEEP_SIZE | 0x10]
                ),
                file=rng.choice([rng.randrange(created)] * 8 + [BAD_FD]),
                offset=rng.randrange(40) * PAGE_SIZE + rng.choice([0] * 9 + [0x10]),
                size=rng.randrange(1, 8) * PAGE_SIZE,
            )


def compare_gmem(calls: list[GmemCall], kvm: RealKvm) -> list[GmemOutcome]:
    """Apply the calls to a fresh real VM and a fresh engine VM; the errno of each."""
    real_vm, other_real = kvm.create_vm(), kvm.create_vm()
    cpu = CpuModel(maxphyaddr=46)
    host = new_host(cpu)[1]
    vmm = host.spawn("vmm")
    engine_vm = Vm(host, vmm, cpu, tdp=kvm.flavour().tdp, ept_levels=4, ept_ad=True)
    other_engine = Vm(host, vmm, cpu, tdp=True, ept_levels=4, ept_ad=True)
    pool = HostBuffer(POOL_PAGES * PAGE_SIZE)
    real = _Side(real_vm, other_real.create_guest_memfd(16 * PAGE_SIZE), pool.address)
    engine = _Side(engine_vm, other_engine.create_guest_memfd(16 * PAGE_SIZE), pool.address)
    try:
        return [GmemOutcome(c, real.apply(c), engine.apply(c)) for c in calls]
    finally:
        for fd in [*real.files, real.foreign]:
            os.close(fd)
        real_vm.close()
        other_real.close()


class GmemReport(CallReport[GmemOutcome]):
    """Agreement counts of a guest_memfd run, by call and the real kernel's errno."""

    def table(self) -> str:
        return self._table("guest_memfd calls", lambda o: f"{o.call.kind} {errno_name(o.real)}")


def gmem_unsupported(kvm: RealKvm) -> str | None:
    """Why this KVM cannot run the comparison (no KVM_CREATE_GUEST_MEMFD: kernels before
    6.8, or a VM type without guest_memfd), or None."""
    vm = kvm.create_vm()
    try:
        os.close(vm.create_guest_memfd(PAGE_SIZE))
    except KvmError as exc:
        return f"this KVM cannot create a guest_memfd ({exc})"
    finally:
        vm.close()
    return None


def gmem_fuzz(cases: int, seed: int) -> GmemReport:
    """Random guest_memfd call sequences, in batches of 40 on fresh VMs."""
    kvm = RealKvm()
    rng = random.Random(seed)
    report = GmemReport()
    try:
        done = 0
        while done < cases:
            batch = list(random_gmem_calls(rng, min(40, cases - done)))
            report.outcomes += compare_gmem(batch, kvm)
            done += len(batch)
    finally:
        kvm.close()
    return report
