"""Bare metal: a process's accesses, walked by the CPU through the process's own page tables,
with page faults taken into the host kernel. This is the one-dimensional baseline that the
two-dimensional walk is measured against: n references for an n-level walk, no VM exits.
"""

from __future__ import annotations

from twodwalk.engine.cpuid import CpuModel
from twodwalk.engine.machine import new_host
from twodwalk.engine.paging import GeneralProtection, exception_for
from twodwalk.engine.processor import AccessResult, Processor
from twodwalk.engine.trace import NativeWalk, Trace
from twodwalk.engine.walker import Access, FaultKind, WalkRecord, walk


class NativeCpu(Processor):
    """A CPU running one user process (CPL 3) on the host, without virtualization."""

    def __init__(self, machine: NativeMachine) -> None:
        super().__init__(machine.memory, machine.cpu_model)
        self.machine = machine
        self.cpl = 3
        self.cr3 = machine.process.tables.root

    def _attempt(
        self, gva: int, access: Access, value: int | None, trace: Trace
    ) -> AccessResult | None:
        """Walk the process's tables; a fault the kernel can resolve (a page not yet
        present, or copy-on-write) goes to `handle_mm_fault` and the access is retried."""
        controls = self.controls()
        fmt = self.guest_format(controls)
        start, _ = self._psc_start(fmt, gva, trace)
        record = walk(
            fmt,
            self.machine.process.tables.root,
            gva,
            access,
            self.walk_tables(self.machine.host.physical_tables),
            controls.rules,
            start,
        )
        trace.add(NativeWalk(record))
        if record.translation is not None:
            self._fill_psc(record)
            hpa = record.translation.address
            self._fill_tlb(gva, record.translation.page_size, hpa, None, record, None)
            return self._result(trace, value=self._data_access(hpa, access, value, trace), hpa=hpa)
        exception = exception_for(record, controls)
        assert exception is not None
        if isinstance(exception, GeneralProtection) or not self._kernel_resolves(record):
            return self._result(trace, fault=exception)
        self.machine.host.handle_mm_fault(self.machine.process, gva, access.is_write, trace)
        assert record.fault is not None
        if record.fault.kind is FaultKind.PERMISSION:
            # Copy-on-write replaced a present PTE: `ptep_clear_flush` -> flush_tlb_page. A
            # not-present PTE made present needs no flush: nothing cached it (SDM Vol 3A
            # 4.10.2.3, 4.10.3.1: no TLB or paging-structure-cache entry for P=0).
            self.invlpg(gva)
        return None

    def _kernel_resolves(self, record: WalkRecord) -> bool:
        """Demand paging and copy-on-write, inside a VMA; anything else is a SIGSEGV."""
        assert record.fault is not None
        if self.machine.process.find_vma(record.address) is None:
            return False
        if record.fault.kind is FaultKind.NOT_PRESENT:
            return True
        leaf = record.steps[-1].value
        return record.fault.kind is FaultKind.PERMISSION and record.access.is_write and not leaf & 2


class NativeMachine:
    """A host running one process ("app") on bare metal, on one CPU (`cpu`): no VM, so no
    vCPU; workloads run on `cpu` as they run on a `Machine`'s `vcpu` (both are a
    `Processor`)."""

    def __init__(self, maxphyaddr: int = 46, gbpages: bool = True) -> None:
        self.cpu_model = CpuModel(maxphyaddr=maxphyaddr, gbpages=gbpages, la57=True)
        self.memory, self.host = new_host(self.cpu_model)
        self.process = self.host.spawn("app")
        self.cpu = NativeCpu(self)

    def mmap(self, size: int, huge: bool = False, fixed: int | None = None) -> int:
        """Map anonymous memory in the process; returns its address."""
        return self.process.mmap(size, huge=huge, fixed=fixed)
