"""EPT around the walk: the EPTP, the access check, and what an EPT violation reports.

The EPT tables are walked by the same generic walker as guest and host tables (walker.py) with
the EPT entry format (formats.EptFormat). This module adds what is EPT-specific around it:
the EPTP that names the root (SDM Vol 3C 25.6.11 "Extended-Page-Table Pointer"), the rule that
the accumulated R/W/X must allow the access (SDM 29.3.3.2 "EPT Violations"), and the exit
qualification of an EPT violation (SDM Vol 3C table 28-7).
"""

from __future__ import annotations

from dataclasses import dataclass

from twodwalk.engine.formats import EPT_MEMTYPE_WB, EptFormat, Rights
from twodwalk.engine.paging import bit_names
from twodwalk.engine.units import hex_repr
from twodwalk.engine.walker import Access, AccessKind, FaultKind, Violation, WalkRecord
from twodwalk.errors import check_aligned, check_choice, check_int

EXIT_REASON_EPT_VIOLATION = 48
EXIT_REASON_EPT_MISCONFIG = 49

# Exit-qualification bits of an EPT violation (SDM Vol 3C table 28-7; KVM EPT_VIOLATION_*).
EPT_VIOLATION_ACC_READ = 1 << 0
EPT_VIOLATION_ACC_WRITE = 1 << 1
EPT_VIOLATION_ACC_INSTR = 1 << 2
EPT_VIOLATION_READABLE = 1 << 3
EPT_VIOLATION_WRITABLE = 1 << 4
EPT_VIOLATION_EXECUTABLE = 1 << 5
EPT_VIOLATION_GVA_IS_VALID = 1 << 7
EPT_VIOLATION_GVA_TRANSLATED = 1 << 8
EPT_VIOLATION_NMI_UNBLOCKING = 1 << 12

# Each bit of an EPT violation's exit qualification that the model sets or that a reader
# meets: (mask, a short name, what a set bit says), SDM Vol 3C table 28-7.
EPT_VIOLATION_BITS: tuple[tuple[int, str, str], ...] = (
    (EPT_VIOLATION_ACC_READ, "read", "the access was a data read"),
    (EPT_VIOLATION_ACC_WRITE, "write", "the access was a data write"),
    (EPT_VIOLATION_ACC_INSTR, "fetch", "the access was an instruction fetch"),
    (EPT_VIOLATION_READABLE, "readable", "the EPT entries allowed reads (AND of their bit 0)"),
    (EPT_VIOLATION_WRITABLE, "writable", "the EPT entries allowed writes (AND of their bit 1)"),
    (
        EPT_VIOLATION_EXECUTABLE,
        "executable",
        "the EPT entries allowed fetches (AND of their bit 2)",
    ),
    (EPT_VIOLATION_GVA_IS_VALID, "GVA valid", "the guest-linear-address field is valid"),
    (
        EPT_VIOLATION_GVA_TRANSLATED,
        "final GPA",
        "the access was to the translation of the GVA (clear, with bit 7: to a guest"
        " paging-structure entry, during the walk or to set its A/D bits)",
    ),
    (EPT_VIOLATION_NMI_UNBLOCKING, "NMI unblocking", "NMI unblocking due to IRET"),
)


def qualification_names(qualification: int) -> list[str]:
    """The set bits by name, and, where the GVA is valid but bit 8 is clear, what that says:
    the access was to a guest paging-structure entry."""
    names = bit_names(qualification, EPT_VIOLATION_BITS)
    translated = qualification & EPT_VIOLATION_GVA_TRANSLATED
    if qualification & EPT_VIOLATION_GVA_IS_VALID and not translated:
        names.append("guest page-table entry")
    return names


@hex_repr
@dataclass(frozen=True)
class Eptp:
    """The EPT pointer: memory type of the tables, walk length, A/D enable, root address."""

    root: int
    levels: int
    ad: bool
    memtype: int = EPT_MEMTYPE_WB

    def __post_init__(self) -> None:
        check_aligned("eptp root", check_int("eptp root", self.root, 0, 1 << 52), 4096)
        check_choice("ept levels", str(self.levels), ("4", "5"))

    @property
    def value(self) -> int:
        """Bits 2:0 memory type, 5:3 walk length - 1, 6 A/D enable, M-1:12 the root."""
        return self.root | int(self.ad) << 6 | (self.levels - 1) << 3 | self.memtype

    @property
    def ep4ta(self) -> int:
        """EPTP bits 51:12, the EP4TA that tags cached translations (SDM Vol 3C 29.4.1)."""
        return ep4ta_of(self.value)

    @classmethod
    def decode(cls, value: int) -> Eptp:
        check_int("eptp", value, 0, 1 << 64)
        return cls(
            value & ~0xFFF & ((1 << 52) - 1), (value >> 3 & 7) + 1, bool(value >> 6 & 1), value & 7
        )


def ep4ta_of(eptp: int) -> int:
    """The EP4TA of an EPTP value: two EPTPs that differ only in memory type, walk length or
    the A/D enable name the same cached translations."""
    return eptp & ~0xFFF & ((1 << 52) - 1)


_NEEDED = {AccessKind.READ: Rights.R, AccessKind.WRITE: Rights.W, AccessKind.FETCH: Rights.X}


@dataclass(frozen=True)
class EptAccessRules:
    """SDM 29.3.3.2: a read needs R, a write W, a fetch X, in every entry of the walk."""

    def violation(self, access: Access, rights: Rights, leaf: int) -> Violation | None:
        del leaf
        kind = access.kind  # compared by identity: hashing an enum costs more than the walk step
        bit = 2 if kind is AccessKind.WRITE else 4 if kind is AccessKind.FETCH else 1
        if int(rights) & bit:
            return None
        needed = _NEEDED[kind]
        return Violation(f"EPT entries do not allow {access.kind.value} (need {needed.name})")


def is_misconfiguration(record: WalkRecord) -> bool:
    """An EPT walk that stopped on a misconfigured entry (exit reason 49, not 48)."""
    fault = record.fault
    return fault is not None and fault.kind is FaultKind.RESERVED


def ept_violation_qualification(record: WalkRecord, final: bool) -> int:
    """The exit qualification of an EPT violation from the EPT walk that caused it.

    Bits 2:0: the access (read, write, fetch); bits 5:3: R/W/X ANDed over the EPT entries used
    (0 if one was not present); bit 7: a guest linear address was being translated; bit 8: the
    access was to the final translation (1) or to a guest paging-structure entry (0).
    """
    assert isinstance(record.format, EptFormat)
    access = record.access
    qual = {
        "read": EPT_VIOLATION_ACC_READ,
        "write": EPT_VIOLATION_ACC_WRITE,
        "fetch": EPT_VIOLATION_ACC_INSTR,
    }[access.kind.value]
    if not final and record.format.ad:
        # SDM table 28-7, note: with EPT A/D on, guest paging-structure accesses count as
        # writes, and a violation on one sets both bit 0 and bit 1.
        qual |= EPT_VIOLATION_ACC_READ | EPT_VIOLATION_ACC_WRITE
    last = record.steps[-1] if record.steps else None
    if last is not None and record.format.is_present(last.value):
        qual |= int(last.rights & (Rights.R | Rights.W | Rights.X)) << 3
    qual |= EPT_VIOLATION_GVA_IS_VALID
    if final:
        qual |= EPT_VIOLATION_GVA_TRANSLATED
    return qual
