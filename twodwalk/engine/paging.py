"""IA-32e paging as the processor applies it: control registers, access rights, #PF and #GP.

The walk itself is the generic one in walker.py; this module supplies what is x86-specific
around it: the control-register bits that steer it (CR0.WP, CR4.LA57/SMEP/SMAP/PKE, EFER.NXE,
EFLAGS.AC, PKRU), the access-rights rules of SDM Vol 3A 4.6, and the mapping from a walk's
fault value to the exception the guest sees (SDM 4.7 "Page-Fault Exceptions", and #GP(0) for a
non-canonical address, SDM 3.3.7.1). KVM encodes the same rules as a permission bitmap
(arch/x86/kvm/mmu/mmu.c `update_permission_bitmask`, `update_pkru_bitmask`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from twodwalk.engine.cpuid import CpuModel
from twodwalk.engine.formats import Ia32eFormat, Rights, ia32e_format
from twodwalk.engine.memory import PhysicalMemory
from twodwalk.engine.tables import PhysicalTables
from twodwalk.engine.units import hex_repr
from twodwalk.engine.walker import (
    Access,
    AccessKind,
    FaultKind,
    TableMemory,
    Violation,
    WalkRecord,
    walk,
)
from twodwalk.errors import TwodwalkError, check_int

# #PF error-code bits (SDM 4.7; KVM's PFERR_*_MASK).
PFERR_PRESENT = 1 << 0
PFERR_WRITE = 1 << 1
PFERR_USER = 1 << 2
PFERR_RSVD = 1 << 3
PFERR_FETCH = 1 << 4
PFERR_PK = 1 << 5

# Each bit of a #PF error code: (mask, the SDM's name, what a set bit says). SDM Vol 3A 4.7,
# figure 4-12 "Page-Fault Error Code".
PF_ERROR_CODE_BITS: tuple[tuple[int, str, str], ...] = (
    (PFERR_PRESENT, "P", "a protection violation (clear: the page was not present)"),
    (PFERR_WRITE, "W/R", "the access was a write (clear: a read)"),
    (PFERR_USER, "U/S", "a user-mode access (clear: supervisor mode)"),
    (PFERR_RSVD, "RSVD", "a reserved bit was set in some paging-structure entry"),
    (PFERR_FETCH, "I/D", "an instruction fetch"),
    (PFERR_PK, "PK", "a protection-key violation"),
)


def bit_names(value: int, bits: tuple[tuple[int, str, str], ...]) -> list[str]:
    """The names of the set bits of `value` in the order of `bits`; a set bit the table does
    not name is shown as "bit N", so nothing set is left unsaid."""
    names = [name for mask, name, _ in bits if value & mask]
    return names + [f"bit {n}" for n in unnamed_bits(value, bits)]


def unnamed_bits(value: int, bits: tuple[tuple[int, str, str], ...]) -> list[int]:
    """The numbers of the set bits of `value` that `bits` does not name."""
    known = sum(mask for mask, _, _ in bits)
    return [n for n in range(value.bit_length()) if value >> n & 1 and not known >> n & 1]


PF_VECTOR = 14
GP_VECTOR = 13


@dataclass(frozen=True)
class PagingControls:
    """The control-register bits that change a walk's outcome (SDM 4.1, 4.6).

    CR3 is not here: it names the root, and the vCPU decodes it (see `decode_cr3`).
    """

    cr0_wp: bool = True
    cr4_la57: bool = False
    cr4_smep: bool = False
    cr4_smap: bool = False
    cr4_pke: bool = False
    efer_nxe: bool = True
    rflags_ac: bool = False
    pkru: int = 0

    def __post_init__(self) -> None:
        check_int("pkru", self.pkru, 0, 1 << 32, valid="a 32-bit value (2 bits per key)")

    @cached_property
    def rules(self) -> X86AccessRules:
        """The access-rights rules these controls give, made once per controls value."""
        return X86AccessRules(self)

    @property
    def levels(self) -> int:
        return 5 if self.cr4_la57 else 4

    def format(self, cpu: CpuModel) -> Ia32eFormat:
        """The entry format these controls select on `cpu`."""
        return ia32e_format(self.levels, cpu, self.efer_nxe)


@dataclass(frozen=True)
class X86AccessRules:
    """SDM 4.6 "Access Rights", checked on the rights accumulated down the walk."""

    controls: PagingControls
    # The answers so far, by `Access.code`, the rights and the leaf's bits 63:59 (the only
    # leaf bits the rules read): every walk ends in this check, and the answer depends on
    # nothing else, so each (access, rights, key) is worked out once per controls value.
    _answers: dict[int, Violation | None] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def violation(self, access: Access, rights: Rights, leaf: int) -> Violation | None:
        key = access.code | int(rights) << 4 | (leaf >> 59) << 8
        answers = self._answers
        if key in answers:
            return answers[key]
        answer = answers[key] = self._violation(access, rights, leaf)
        return answer

    def _violation(self, access: Access, rights: Rights, leaf: int) -> Violation | None:
        reason = self._rights_violation(access, rights)
        blocked_by_key = self._pkru_blocks(access, rights, leaf)
        if reason is None and not blocked_by_key:
            return None
        if reason is None:
            reason = f"PKRU blocks this access to protection key {_pkey(leaf)}"
        return Violation(reason, protection_key=blocked_by_key)

    def _rights_violation(self, access: Access, rights: Rights) -> str | None:
        c = self.controls
        user_page = Rights.U in rights
        if access.user:
            if not user_page:
                return "user-mode access to a supervisor-mode address (U/S=0 at some level)"
            if access.is_write and Rights.W not in rights:
                return "user-mode write to a read-only address (R/W=0 at some level)"
        else:
            if access.is_write and Rights.W not in rights and c.cr0_wp:
                return "supervisor write to a read-only address with CR0.WP=1"
            if access.is_fetch and user_page and c.cr4_smep:
                return "SMEP: supervisor instruction fetch from a user-mode address"
            if (
                not access.is_fetch
                and user_page
                and c.cr4_smap
                and (access.implicit or not c.rflags_ac)
            ):
                return "SMAP: supervisor data access to a user-mode address with EFLAGS.AC=0"
        if access.is_fetch and Rights.X not in rights:
            return "instruction fetch from an execute-disabled address (XD=1 at some level)"
        return None

    def _pkru_blocks(self, access: Access, rights: Rights, leaf: int) -> bool:
        """SDM 4.6.2: keys apply to data accesses to user-mode addresses only."""
        c = self.controls
        if not c.cr4_pke or access.is_fetch or Rights.U not in rights:
            return False
        key = _pkey(leaf)
        access_disable = bool(c.pkru >> (2 * key) & 1)
        write_disable = bool(c.pkru >> (2 * key + 1) & 1)
        return access_disable or (write_disable and access.is_write and (access.user or c.cr0_wp))


def _pkey(leaf: int) -> int:
    return leaf >> 59 & 0xF


@hex_repr
@dataclass(frozen=True)
class PageFault:
    """#PF as the guest sees it: vector 14, the error code, and CR2 (the linear address)."""

    error_code: int
    address: int
    vector: int = field(default=PF_VECTOR, init=False)

    @property
    def cr2(self) -> int:
        return self.address


@hex_repr
@dataclass(frozen=True)
class GeneralProtection:
    """#GP with its error code (0 for a non-canonical memory reference, SDM 6.15)."""

    error_code: int = 0
    vector: int = field(default=GP_VECTOR, init=False)


def exception_for(
    record: WalkRecord, controls: PagingControls
) -> PageFault | GeneralProtection | None:
    """The exception a faulting IA-32e walk raises in the guest (KVM `walk_addr_generic`
    builds the same error code), or None for a successful walk."""
    fault = record.fault
    if fault is None:
        return None
    if fault.kind is FaultKind.NON_CANONICAL:
        return GeneralProtection(0)
    if fault.kind is FaultKind.NESTED:
        raise TwodwalkError("a nested fault is not a guest exception: the hypervisor handles it")
    access = record.access
    code = 0
    if fault.kind is not FaultKind.NOT_PRESENT:
        code |= PFERR_PRESENT
    if access.is_write:
        code |= PFERR_WRITE
    if access.user:
        code |= PFERR_USER
    if fault.kind is FaultKind.RESERVED:
        code |= PFERR_RSVD
    if access.is_fetch and (controls.efer_nxe or controls.cr4_smep):
        code |= PFERR_FETCH
    if fault.protection_key:
        code |= PFERR_PK
    return PageFault(code, record.address)


@hex_repr
@dataclass(frozen=True)
class Cr3:
    """CR3 decoded as the processor reads it (SDM 4.5.2, table 4-13 / 4-14)."""

    value: int
    root: int
    pwt: bool
    pcd: bool
    pcid: int | None


def decode_cr3(value: int, cpu: CpuModel, pcide: bool = False) -> Cr3:
    """Split CR3 into the root table address (bits M-1:12) and its low bits, which are
    decoded and never rejected (PWT/PCD, or a PCID when CR4.PCIDE=1). Bits 63:M must be zero:
    a MOV to CR3 that sets them raises #GP, so the engine rejects them (bit 63 with PCIDE is
    the no-flush hint and is accepted)."""
    check_int("cr3", value, 0, 1 << 64, valid="0 <= cr3 < 2**64")
    allowed_high = (1 << 63) if pcide else 0
    high = value & ~((1 << cpu.maxphyaddr) - 1) & ~allowed_high
    if high:
        raise TwodwalkError(
            f"cr3={value:#x} sets bits above MAXPHYADDR ({cpu.maxphyaddr}): MOV to CR3 would"
            f" raise #GP; valid values are below {1 << cpu.maxphyaddr:#x}"
        )
    root = value & ((1 << cpu.maxphyaddr) - 1) & ~0xFFF
    if pcide:
        return Cr3(value, root, False, False, value & 0xFFF)
    return Cr3(value, root, bool(value & 8), bool(value & 16), None)


def translate(
    memory: PhysicalMemory | TableMemory,
    cr3: int,
    address: int,
    kind: AccessKind | str,
    *,
    cpl: int = 0,
    controls: PagingControls | None = None,
    cpu: CpuModel | None = None,
    implicit: bool = False,
) -> WalkRecord:
    """Walk the IA-32e tables under `cr3` for one access, as the CPU's page-miss handler does.

    `memory` is host physical memory for native paging, or any `TableMemory` (guest tables
    read through EPT, say). The CPU model defaults to one whose MAXPHYADDR is the memory's.
    Use `exception_for` to turn a fault into the guest's #PF or #GP.
    """
    controls = controls or PagingControls()
    if cpu is None:
        cpu = CpuModel(memory.maxphyaddr) if isinstance(memory, PhysicalMemory) else CpuModel()
    if controls.cr4_la57 and not cpu.la57:
        raise TwodwalkError("cr4_la57=True needs a CPU model with la57=True (CPUID.07H:ECX[16])")
    tables = PhysicalTables(memory) if isinstance(memory, PhysicalMemory) else memory
    root = decode_cr3(cr3, cpu).root
    return walk(
        controls.format(cpu),
        root,
        address,
        Access.of(kind, cpl, implicit),
        tables,
        controls.rules,
    )
