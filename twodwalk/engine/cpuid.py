"""The CPU model: the few CPUID facts that change how paging behaves, in one place.

Real values come from CPUID (SDM Vol 2A, CPUID leaf 80000008H: EAX[7:0] is MAXPHYADDR, EAX[15:8]
the linear-address width; leaf 80000001H EDX[26] is 1 GiB-page support; leaf 07H ECX[16] is LA57).
KVM reads the same bits to build its reserved-bit masks (arch/x86/kvm/mmu/mmu.c
`reset_guest_rsvds_bits_mask`), so the engine takes them as explicit parameters, not constants.
"""

from __future__ import annotations

from dataclasses import dataclass

from twodwalk.errors import TwodwalkError

MAX_MAXPHYADDR = 52


@dataclass(frozen=True)
class CpuModel:
    """CPUID-visible paging features of the simulated processor.

    maxphyaddr: physical-address width (CPUID.80000008H:EAX[7:0]); 36..52, default 46.
    gbpages: 1 GiB pages (CPUID.80000001H:EDX[26]); without them PS in a PDPTE is reserved.
    la57: 5-level paging (CPUID.(EAX=07H,ECX=0):ECX[16]); needed to set CR4.LA57.
    vendor: "intel" or "amd" (CPUID leaf 0). On AMD, bit 8 of a PML4E/PML5E is reserved
      (KVM `__reset_rsvds_bits_mask`, `nonleaf_bit8_rsvd`; checked on real KVM); Intel
      ignores it.
    """

    maxphyaddr: int = 46
    gbpages: bool = True
    la57: bool = True
    vendor: str = "intel"

    def __post_init__(self) -> None:
        if self.vendor not in ("intel", "amd"):
            raise TwodwalkError(f"vendor={self.vendor!r} is not valid: choose intel or amd")
        if isinstance(self.maxphyaddr, bool) or not isinstance(self.maxphyaddr, int):
            raise TwodwalkError(f"maxphyaddr must be an integer, got {self.maxphyaddr!r}")
        if not 36 <= self.maxphyaddr <= MAX_MAXPHYADDR:
            raise TwodwalkError(
                f"maxphyaddr={self.maxphyaddr} is not valid: x86-64 processors report"
                f" 36..{MAX_MAXPHYADDR} in CPUID.80000008H:EAX[7:0]"
            )
