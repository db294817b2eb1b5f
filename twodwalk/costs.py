"""Cycles, not only references: a latency model for workload results.

A reference count is not time: a walk reference may hit the L1 data cache or go to DRAM, and
one VM exit costs more than a whole cold walk. `LatencyModel` prices each thing a
`WorkloadResult` counts, so that a run can say what share of its cycles went to address
translation, as the papers do ("TLB-miss overhead N% of cycles").

The defaults, and where they come from:

- cache and memory latencies, in core cycles: L1D 5, L2 14, LLC 50 (Intel 64 and IA-32
  Architectures Optimization Reference Manual, the latency tables of its Skylake server
  microarchitecture chapter: L1 4-5, L2 14, L3 about 50-70); DRAM 250 (about 80 ns at 3 GHz,
  an assumption of this model);
- where walk references are served: 40% L1, 30% L2, 20% LLC, 10% DRAM. An assumption: page
  walks read cacheable memory and mostly hit the caches (Bhargava et al., ASPLOS 2008; Park et
  al., ASPLOS 2022), but no source gives one mix for every workload;
- a TLB hit 0 cycles: the first-level DTLB is looked up in parallel with the L1D, whose
  latency the data access already counts (the model does not tell second-level TLB hits
  apart); a paging-structure, page-walk or guest-physical-mapping cache hit 2 (an
  assumption);
- a VM exit and entry round trip of about 500 cycles in hardware (Agesen et al., "Software
  Techniques for Avoiding Hardware Virtualization Exits", USENIX ATC 2012), plus KVM's
  handling, assumed per exit reason below;
- a page fault 3,000 cycles (about 1 microsecond: an assumption), for the host's (KVM
  faulting a page in) and for a guest-visible one the guest kernel handles (after a fork).

The model counts only memory accesses and what translating them costs: a real program also
runs instructions that touch no memory. `work_per_access` adds their cycles per access
(0 by default), so without it an overhead is the share of the memory accesses' own cycles,
an upper bound of what a whole program loses. Every field is a parameter: give your own
machine's numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType

from twodwalk.errors import TwodwalkError
from twodwalk.workloads import WorkloadResult

VM_EXIT_ROUND_TRIP = 500  # Agesen et al. 2012: the hardware's exit and entry
EXIT_HANDLING = MappingProxyType(  # KVM's work per exit, on top (assumptions); VMX and SVM names
    {
        "EPT_VIOLATION": 2500,  # memslot, hva_to_pfn, the EPT entry
        "NPF": 2500,  # the same path on AMD
        "EPT_MISCONFIG": 1500,  # the MMIO fast path
        "EXCEPTION_NMI (#PF)": 2000,  # shadow paging: KVM's software walk, a shadow entry
        "EXCP14": 2000,
        "CR_ACCESS (MOV to CR3)": 1000,  # kvm_mmu_new_pgd, a TLB flush
        "CR3_WRITE": 1000,
        "INVLPG": 700,  # kvm_mmu_invlpg
    }
)


@dataclass(frozen=True)
class CycleBreakdown:
    """Where a run's cycles went: the data accesses themselves (and the work between them),
    translation (TLB and cache hits, walk references), VM exits and page faults."""

    data: float
    translation: float
    exits: float
    page_faults: float

    @property
    def total(self) -> float:
        return self.data + self.translation + self.exits + self.page_faults

    @property
    def overhead(self) -> float:
        """The share of cycles spent getting to the data: translation, exits, page faults."""
        return (self.total - self.data) / self.total if self.total else 0.0


@dataclass(frozen=True)
class LatencyModel:
    """Cycles per counted event (see the module's docstring for the defaults' sources)."""

    l1: float = 5
    l2: float = 14
    llc: float = 50
    dram: float = 250
    walk_mix: tuple[float, float, float, float] = (0.40, 0.30, 0.20, 0.10)
    tlb_hit: float = 0
    cache_hit: float = 2
    data_access: float = 5
    work_per_access: float = 0
    exit_round_trip: float = VM_EXIT_ROUND_TRIP
    exit_handling: Mapping[str, float] = field(default_factory=lambda: dict(EXIT_HANDLING))
    other_exit_handling: float = 1500
    page_fault: float = 3000

    def __post_init__(self) -> None:
        for name in (f.name for f in fields(self) if f.type == "float"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise TwodwalkError(
                    f"{name}={value!r} is not valid: give a number of cycles, at least 0"
                )
        for reason, value in self.exit_handling.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise TwodwalkError(
                    f"exit_handling[{reason!r}]={value!r} is not valid: give a number of"
                    " cycles, at least 0"
                )
        if len(self.walk_mix) != 4 or any(s < 0 for s in self.walk_mix):
            raise TwodwalkError(
                f"walk_mix={self.walk_mix!r} is not valid: give four shares (L1, L2, LLC,"
                " DRAM), each at least 0"
            )
        if abs(sum(self.walk_mix) - 1) > 1e-9:
            raise TwodwalkError(
                f"walk_mix={self.walk_mix!r} is not valid: the four shares must add up to 1"
            )

    @property
    def walk_reference(self) -> float:
        """The average cycles of one walk memory reference, over the mix of levels."""
        latencies = (self.l1, self.l2, self.llc, self.dram)
        return sum(s * c for s, c in zip(self.walk_mix, latencies, strict=True))

    def calibrated(self, result: WorkloadResult, overhead: float) -> LatencyModel:
        """This model with the `work_per_access` that makes `result`'s overhead equal to a
        measured one (say a native run's share of cycles in TLB misses, from a paper or
        `perf`), so that the other configurations' overheads become predictions."""
        if not 0 < overhead < 1:
            raise TwodwalkError(f"overhead={overhead!r} is not valid: give a share in (0, 1)")
        costs = replace(self, work_per_access=0).cycles(result)
        spent = costs.total - costs.data
        work = (spent / overhead - costs.total) / max(result.accesses, 1)
        if work < 0:
            raise TwodwalkError(
                f"overhead={overhead!r} is not valid for run {result.name!r}: its memory"
                f" accesses alone already lose only {costs.overhead:.1%}; give at most that"
            )
        return replace(self, work_per_access=work)

    def exit_cost(self, name: str) -> float:
        return self.exit_round_trip + self.exit_handling.get(name, self.other_exit_handling)

    def cycles(self, result: WorkloadResult) -> CycleBreakdown:
        """The cycles of a run, by where they went."""
        translation = (
            result.tlb_hits * self.tlb_hit
            + sum(result.cache_hits.values()) * self.cache_hit
            + sum(result.references.values()) * self.walk_reference
        )
        exits = sum(n * self.exit_cost(name) for name, n in result.exits.items())
        return CycleBreakdown(
            result.accesses * (self.data_access + self.work_per_access),
            translation,
            exits,
            (result.host_page_faults + result.guest_faults) * self.page_fault,
        )


def cycle_table(results: Iterable[WorkloadResult], model: LatencyModel | None = None) -> str:
    """One line per configuration: cycles per access, split into translation (caches and
    walk references), VM exits and page faults, and the share of all cycles that was not
    the data access itself."""
    model = model or LatencyModel()
    rows = list(results)
    width = max(len(r.name) for r in rows)
    lines = [
        f"{'configuration':<{width}}  cycles/access  translation  VM exits  page faults  overhead"
    ]
    for r in rows:
        c = model.cycles(r)
        n = max(r.accesses, 1)
        lines.append(
            f"{r.name:<{width}}  {c.total / n:13.1f}  {c.translation / n:11.1f}"
            f"  {c.exits / n:8.1f}  {c.page_faults / n:11.1f}  {c.overhead:8.1%}"
        )
    return "\n".join(lines)
