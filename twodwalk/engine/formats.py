"""Paging-entry formats as data: which bits mean what, at which level, and which must be zero.

A format is the shape of one radix tree: its depth, its index bits and the layout of its 8-byte
entries at each level, leaf or not. The walker (walker.py) knows nothing else about x86, so the
same loop walks guest tables, host tables and EPT tables, as KVM's one walker source
(arch/x86/kvm/mmu/paging_tmpl.h) serves 32-bit, 64-bit and EPT formats through small helpers.

Sources: SDM Vol 3A 4.5 "4-Level Paging and 5-Level Paging" (tables 4-15 .. 4-20 give the
entry layouts) and KVM's reserved-bit masks (arch/x86/kvm/mmu/mmu.c `__reset_rsvds_bits_mask`).
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import NamedTuple

from twodwalk.engine.cpuid import CpuModel
from twodwalk.engine.units import PAGE_SHIFT, hex_repr
from twodwalk.errors import TwodwalkError, check_aligned, check_choice, check_int

ENTRY_SIZE = 8
INDEX_BITS = 9
ENTRIES_PER_TABLE = 1 << INDEX_BITS
PS_BIT = 7


def bits(high: int, low: int) -> int:
    """Mask of bits high..low inclusive (KVM's `rsvd_bits(low, high)`); 0 when high < low."""
    return ((1 << (high + 1)) - (1 << low)) if high >= low else 0


class Rights(enum.IntFlag):
    """What a translation allows. x86 entries grant W (R/W=1), U (U/S=1) and X (XD=0);
    EPT entries grant R, W and X. Rights accumulate down a walk by AND (SDM 4.6.1)."""

    NONE = 0
    R = 1
    W = 2
    X = 4
    U = 8


RIGHTS_BY_MASK = tuple(Rights(mask) for mask in range(16))  # no enum arithmetic on hot paths


@dataclass(frozen=True)
class Field:
    """One named field of an entry, as a row of the SDM's entry tables."""

    key: str
    name: str
    high: int
    low: int
    meaning: str
    is_address: bool = False

    @property
    def mask(self) -> int:
        return bits(self.high, self.low)

    @property
    def bit_range(self) -> str:
        return str(self.low) if self.high == self.low else f"{self.high}:{self.low}"

    def extract(self, value: int) -> int:
        """The field's value; an address field keeps its position (a physical address)."""
        if self.is_address:
            return value & self.mask
        return (value & self.mask) >> self.low

    def insert(self, value: int, field_value: int) -> int:
        """`value` with this field set to `field_value`, checked to fit."""
        if self.is_address:
            check_aligned(self.key, check_int(self.key, field_value, 0, 1 << 64), 1 << self.low)
            if field_value & ~self.mask:
                raise TwodwalkError(
                    f"{self.key}={field_value:#x} does not fit bits {self.bit_range}: physical"
                    f" addresses must be below {1 << (self.high + 1):#x} (MAXPHYADDR)"
                )
            return (value & ~self.mask) | field_value
        width = self.high - self.low + 1
        check_int(self.key, field_value, 0, 1 << width, valid=f"0..{(1 << width) - 1}")
        return (value & ~self.mask) | (field_value << self.low)


@dataclass(frozen=True)
class Layout:
    """The fields of one kind of entry and the bits that must be 0 when it is present."""

    name: str
    level: int
    leaf: bool
    fields: tuple[Field, ...]
    reserved: int

    def field(self, key: str) -> Field:
        for field in self.fields:
            if field.key == key:
                return field
        names = ", ".join(f.key for f in self.fields)
        raise TwodwalkError(f"{self.name} has no field {key!r}: its fields are {names}")


@hex_repr
@dataclass(frozen=True)
class FieldValue:
    """A field together with its value in one entry."""

    field: Field
    value: int


@hex_repr
@dataclass(frozen=True)
class DecodedEntry:
    """An 8-byte entry read as the SDM tables read it: each field, its bits, its value."""

    format_name: str
    level: int
    value: int
    layout: Layout
    present: bool
    leaf: bool
    reserved_set: int
    misconfiguration: str | None = None  # an EPT rule the entry breaks (SDM 29.3.3.1)

    @cached_property
    def fields(self) -> tuple[FieldValue, ...]:
        return tuple(FieldValue(f, f.extract(self.value)) for f in self.layout.fields)

    def __getitem__(self, key: str) -> int:
        return self.layout.field(key).extract(self.value)


class LevelShape(NamedTuple):
    """What the walker needs to know about one level, precomputed: the index shift, the
    reserved masks for bit 7 clear and set, whether bit 7 makes a leaf there, and the
    address masks of a table pointer and of a leaf. A named tuple, so that the walker
    unpacks a level in one step."""

    shift: int
    reserved_small: int
    reserved_large: int
    large_ok: bool
    table_mask: int
    leaf_mask: int


class WalkConstants(NamedTuple):
    """A format as the walker reads it (`EntryFormat.walk_constants`). `rights_by_bits`:
    the rights mask of an entry by its bits 2:0 and 63, indexed `bits 2:0 | bit 63 << 3`,
    so that each level costs an index, not a call of `rights_mask`."""

    levels: int
    top_shift: int
    valid_tops: frozenset[int]
    all_rights_mask: int
    shapes: tuple[LevelShape, ...]
    present_bits: int
    bad_mt_xwr: int
    rights_by_bits: tuple[int, ...]


class EntryFormat(ABC):
    """The shape of one kind of radix tree, and small predicates over its entries.

    Levels count from 1 (the table that maps 4 KiB pages) to `levels` (the root). Subclasses
    give the entry layouts and the few format-specific predicates; everything else is shared.
    """

    name: str
    levels: int
    maxphyaddr: int
    gbpages: bool
    level_names: Mapping[int, str]
    table_names: Mapping[int, str]
    accessed_bit: int | None
    dirty_bit: int | None
    all_rights: Rights

    def __init__(
        self, name: str, levels: int, maxphyaddr: int, gbpages: bool, level_names: Mapping[int, str]
    ) -> None:
        check_choice("levels", str(levels), ("4", "5"))
        self.name = name
        self.levels = levels
        self.maxphyaddr = maxphyaddr
        self.gbpages = gbpages
        self.level_names = {lv: level_names[lv] for lv in range(1, levels + 1)}
        self._layouts = {
            (lv, b7): self._make_layout(lv, b7)
            for lv in range(1, levels + 1)
            for b7 in (False, True)
        }

    @property
    def input_bits(self) -> int:
        """Width of the translated address: 48 for 4 levels, 57 for 5."""
        return PAGE_SHIFT + INDEX_BITS * self.levels

    @staticmethod
    def shift(level: int) -> int:
        """Lowest address bit that selects an entry of a level-`level` table."""
        return PAGE_SHIFT + INDEX_BITS * (level - 1)

    @classmethod
    def page_size(cls, level: int) -> int:
        """Size mapped by a leaf at `level`: 4 KiB, 2 MiB, 1 GiB."""
        return 1 << cls.shift(level)

    def index(self, address: int, level: int) -> int:
        """Entry index of `address` in a level-`level` table (SDM 4.5.4, figure 4-8)."""
        return (address >> self.shift(level)) & (ENTRIES_PER_TABLE - 1)

    @property
    def large_page_levels(self) -> frozenset[int]:
        """Levels where bit 7 set makes the entry a leaf (a large page): PDE and PDPTE."""
        return frozenset({2, 3})

    @property
    def leaf_levels(self) -> frozenset[int]:
        """Levels at which this CPU model can map a page: 4 KiB always, 2 MiB, maybe 1 GiB."""
        return frozenset({1, 2, 3} if self.gbpages else {1, 2})

    def level_for_size(self, page_size: int) -> int:
        """The level whose leaves map `page_size` bytes; rejects sizes this format lacks."""
        for level in sorted(self.leaf_levels):
            if self.page_size(level) == page_size:
                return level
        valid = ", ".join(f"{self.page_size(lv):#x}" for lv in sorted(self.leaf_levels))
        raise TwodwalkError(f"page_size={page_size!r} is not supported here: valid are {valid}")

    @abstractmethod
    def is_present(self, value: int) -> bool:
        """Whether the entry is present (x86: P=1; EPT: any of R/W/X)."""

    @abstractmethod
    def rights_mask(self, value: int) -> int:
        """The rights one entry grants, as a `Rights` mask; the walker ANDs them down the
        tree (plain ints: no enum arithmetic on the hot path). It reads bits 2:0 and 63
        only (x86: R/W, U/S and XD; EPT: read, write, execute), which `walk_constants`
        relies on."""

    @cached_property
    def walk_constants(self) -> WalkConstants:
        """Everything the walker reads from the format, as one value it unpacks once."""
        return WalkConstants(
            self.levels,
            self.top_shift,
            self.valid_tops,
            self.all_rights_mask,
            self.shapes,
            self.present_bits,
            self.bad_mt_xwr,
            tuple(self.rights_mask(bits & 7 | (bits >> 3) << 63) for bits in range(16)),
        )

    @cached_property
    def all_rights_mask(self) -> int:
        return int(self.all_rights)

    @cached_property
    def top_shift(self) -> int:
        """`address >> top_shift` must be in `valid_tops` for the address to translate."""
        return self.input_bits - 1

    @property
    @abstractmethod
    def valid_tops(self) -> frozenset[int]:
        """The values of the address bits above the top index that `check_address` accepts,
        so that the walker tests an address with one shift and one set look-up."""

    def layout(self, level: int, bit7: bool) -> Layout:
        """The layout of a level-`level` entry, chosen by its bit 7 as KVM chooses its
        reserved-bit mask (`rsvd_bits_mask[bit7][level - 1]`)."""
        return self._layouts[level, bit7]

    @abstractmethod
    def _fields(self, level: int, leaf: bool) -> list[Field]:
        """The entry's fields other than the address."""

    @abstractmethod
    def _reserved(self, level: int, leaf: bool, large: bool) -> int:
        """Reserved bits other than 51:MAXPHYADDR and a 1 GiB PS without 1 GiB pages."""

    def _make_layout(self, level: int, bit7: bool) -> Layout:
        """What both formats share: a leaf's address starts at its page size, bits
        51:MAXPHYADDR are reserved, and so is PS in a PDPTE without 1 GiB pages."""
        large = bit7 and level in self.large_page_levels
        leaf = level == 1 or large
        target = f"{_PAGE_NAMES[level]} page" if leaf else self.table_names[level]
        low = self.shift(level) if leaf else PAGE_SHIFT
        address = Field(
            "address",
            "Address",
            self.maxphyaddr - 1,
            low,
            f"Physical address of the {target}",
            is_address=True,
        )
        reserved = bits(51, self.maxphyaddr) | self._reserved(level, leaf, large)
        if large and level == 3 and not self.gbpages:
            reserved |= bits(PS_BIT, PS_BIT)
        what = f"maps a {target}" if leaf else f"references the {target}"
        fields = sorted([address, *self._fields(level, leaf)], key=lambda f: f.low)
        return Layout(f"{self.level_names[level]} ({what})", level, leaf, tuple(fields), reserved)

    @abstractmethod
    def check_address(self, address: int) -> str | None:
        """Why `address` cannot be translated at all (e.g. non-canonical), or None."""

    @property
    @abstractmethod
    def table_defaults(self) -> Mapping[str, int]:
        """Fields a builder sets in a non-leaf entry so that the leaf alone decides rights."""

    @property
    @abstractmethod
    def leaf_defaults(self) -> Mapping[str, int]:
        """Fields a builder sets in a leaf unless told otherwise (present; WB for EPT)."""

    present_bits: int

    @cached_property
    def bad_mt_xwr(self) -> int:
        """KVM's `bad_mt_xwr` bitmap: bit n set when an entry whose bits 5:0 are n is
        misconfigured (only EPT has such rules; 0 otherwise)."""
        leaf = self.layout(1, False)
        return sum(1 << n for n in range(64) if self.misconfiguration(n, leaf) is not None)

    @cached_property
    def shapes(self) -> tuple[LevelShape, ...]:
        """`LevelShape` of each level (index = level; index 0 unused), for the walker."""
        unused = LevelShape(0, 0, 0, False, 0, 0)
        return (
            unused,
            *(
                LevelShape(
                    self.shift(level),
                    self.layout(level, False).reserved,
                    self.layout(level, True).reserved,
                    level in self.large_page_levels,
                    self.address_mask(level, False),
                    self.address_mask(level, True),
                )
                for level in range(1, self.levels + 1)
            ),
        )

    def misconfiguration(self, value: int, layout: Layout) -> str | None:
        """A present entry that is invalid for a reason other than a reserved bit."""
        del value, layout
        return None

    def is_leaf(self, value: int, level: int) -> bool:
        """A level-1 entry, or a large page: bit 7 set where large pages exist."""
        return level == 1 or (level in self.large_page_levels and bool(value >> PS_BIT & 1))

    def address_mask(self, level: int, leaf: bool) -> int:
        """Bits holding the physical address: M-1:12, or M-1:21 / M-1:30 in a large leaf."""
        return bits(self.maxphyaddr - 1, self.shift(level) if leaf else PAGE_SHIFT)

    def output_address(self, value: int, level: int) -> int:
        """The physical address an entry points to: the next table, or the page frame."""
        return value & self.address_mask(level, self.is_leaf(value, level))

    def problem(self, value: int, level: int) -> str | None:
        """Why a present entry is invalid (reserved bits, or a format-specific rule), or None."""
        layout = self.layout(level, bool(value >> PS_BIT & 1))
        reserved = value & layout.reserved
        if reserved:
            return f"reserved bit(s) {_bit_list(reserved)} set in {layout.name}"
        return self.misconfiguration(value, layout)

    def decode(self, value: int, level: int) -> DecodedEntry:
        """Name every field of a raw entry."""
        check_int("entry value", value, 0, 1 << 64, valid="0 <= value < 2**64")
        self._check_level(level)
        layout = self.layout(level, bool(value >> PS_BIT & 1))
        return DecodedEntry(
            format_name=self.name,
            level=level,
            value=value,
            layout=layout,
            present=self.is_present(value),
            leaf=self.is_leaf(value, level),
            reserved_set=value & layout.reserved,
            misconfiguration=self.misconfiguration(value, layout)
            if self.is_present(value)
            else None,
        )

    def encode(self, level: int, leaf: bool, **fields: int) -> int:
        """Build an entry from named fields. A large leaf gets bit 7 (PS) set for you."""
        self._check_level(level)
        if leaf and level != 1 and level not in self.large_page_levels:
            sizes = ", ".join(f"level {lv}" for lv in sorted(self.large_page_levels)) or "none"
            raise TwodwalkError(
                f"level={level} cannot hold a leaf in {self.name}: large pages exist at {sizes}"
            )
        layout = self.layout(level, leaf and level != 1)
        value = 1 << PS_BIT if leaf and level != 1 else 0
        for key, field_value in fields.items():
            value = layout.field(key).insert(value, field_value)
        return value

    def _check_level(self, level: int) -> None:
        check_int("level", level, 1, self.levels + 1, valid=f"1..{self.levels} in {self.name}")

    def level_name(self, level: int) -> str:
        return self.level_names[level]


def _bit_list(mask: int) -> str:
    return ",".join(str(b) for b in range(64) if mask >> b & 1)


# --- IA-32e (4-level and 5-level) paging: SDM Vol 3A 4.5, tables 4-15 .. 4-20 -----------------

_PAGE_NAMES = {1: "4-KByte", 2: "2-MByte", 3: "1-GByte"}
_X86_LEVEL_NAMES = {5: "PML5E", 4: "PML4E", 3: "PDPTE", 2: "PDE", 1: "PTE"}
_X86_TABLE_NAMES = {
    5: "PML4 table",
    4: "page-directory-pointer table",
    3: "page directory",
    2: "page table",
}
_X86_COMMON = [
    Field("p", "P", 0, 0, "Present; must be 1 to reference a table or map a page"),
    Field("rw", "R/W", 1, 1, "Read/write; if 0, writes may not be allowed"),
    Field("us", "U/S", 2, 2, "User/supervisor; if 0, user-mode accesses are not allowed"),
    Field("pwt", "PWT", 3, 3, "Page-level write-through"),
    Field("pcd", "PCD", 4, 4, "Page-level cache disable"),
    Field("a", "A", 5, 5, "Accessed; set by the processor when the entry is used"),
    Field("avl", "AVL", 11, 9, "Ignored by the CPU; for software (Linux: bit 9 special)"),
    Field("xd", "XD", 63, 63, "Execute-disable (if IA32_EFER.NXE=1)"),
]
_X86_LEAF = [
    Field("d", "D", 6, 6, "Dirty; set by the processor on a write through this entry"),
    Field("g", "G", 8, 8, "Global; the translation survives a CR3 load if CR4.PGE=1"),
    Field("pk", "PK", 62, 59, "Protection key (if CR4.PKE=1 or CR4.PKS=1)"),
]
_PS_LEAF = Field("ps", "PS", 7, 7, "Page size; 1: this entry maps a page")
_PS_TABLE = Field("ps", "PS", 7, 7, "Page size; must be 0 to reference a table")


class Ia32eFormat(EntryFormat):
    """IA-32e paging entries (4-level or 5-level), for guest and host page tables alike."""

    accessed_bit = 5
    dirty_bit = 6
    all_rights = Rights.R | Rights.W | Rights.X | Rights.U
    table_names = _X86_TABLE_NAMES
    present_bits = 1

    def __init__(
        self,
        levels: int,
        maxphyaddr: int,
        gbpages: bool,
        nxe: bool,
        amd: bool = False,
        nested: bool = False,
    ) -> None:
        self.nxe = nxe
        self.amd = amd
        self.nested = nested
        if nested:  # AMD's nested page tables: the same entries, named as the other tree
            self.table_names = {lv: f"nested {name}" for lv, name in _X86_TABLE_NAMES.items()}
            names = {lv: f"nested {name}" for lv, name in _X86_LEVEL_NAMES.items()}
            title = f"AMD nested paging, {levels}-level (long-mode entries)"
        else:
            names, title = _X86_LEVEL_NAMES, f"IA-32e {levels}-level paging"
        super().__init__(title, levels, maxphyaddr, gbpages, names)

    @property
    def table_defaults(self) -> Mapping[str, int]:
        return {"p": 1, "rw": 1, "us": 1}

    @property
    def leaf_defaults(self) -> Mapping[str, int]:
        return {"p": 1}

    def is_present(self, value: int) -> bool:
        return bool(value & 1)

    def rights_mask(self, value: int) -> int:
        # R always; W from R/W (bit 1); U from U/S (bit 2, Rights.U is 8); X unless XD.
        return 1 | (value & 2) | (value & 4) << 1 | (0 if value >> 63 else 4)

    @cached_property
    def valid_tops(self) -> frozenset[int]:
        return frozenset((0, (1 << (65 - self.input_bits)) - 1))

    def check_address(self, address: int) -> str | None:
        """Canonical check (SDM 3.3.7.1): bits 63:N-1 must all equal bit N-1."""
        top = address >> (self.input_bits - 1)
        if top in (0, (1 << (65 - self.input_bits)) - 1):
            return None
        return (
            f"{address:#x} is not canonical for {self.levels}-level paging: bits"
            f" 63:{self.input_bits - 1} must all equal bit {self.input_bits - 1}"
        )

    def _fields(self, level: int, leaf: bool) -> list[Field]:
        if not leaf:
            ps = (
                _PS_TABLE
                if level in self.large_page_levels
                else Field("ps", "PS", 7, 7, "Reserved (must be 0)")
            )
            return [*_X86_COMMON, ps]
        pat = Field(
            "pat",
            "PAT",
            7 if level == 1 else 12,
            7 if level == 1 else 12,
            "Memory type, with PCD and PWT (PAT index)",
        )
        return [*_X86_COMMON, *_X86_LEAF, pat, *([_PS_LEAF] if level > 1 else [])]

    def _reserved(self, level: int, leaf: bool, large: bool) -> int:
        """KVM `__reset_rsvds_bits_mask` (long mode): XD without NXE; bits 29:13 or 20:13
        inside a large leaf's address (bit 12 is PAT); PS in a PML4E/PML5E, and on AMD bit 8
        there too."""
        reserved = 0 if self.nxe else bits(63, 63)
        if large:
            reserved |= bits(self.shift(level) - 1, 13)
        if not leaf and level > 3:
            reserved |= bits(PS_BIT, PS_BIT)
            if self.amd:
                reserved |= bits(8, 8)  # nonleaf_bit8_rsvd
        return reserved


@lru_cache(maxsize=64)
def ia32e_format(levels: int, cpu: CpuModel, nxe: bool = True) -> Ia32eFormat:
    """The IA-32e format for a CPU model; EFER.NXE=0 makes bit 63 reserved (SDM 4.5.4)."""
    if levels == 5 and not cpu.la57:
        raise TwodwalkError("levels=5 needs a CPU model with la57=True (CPUID.07H:ECX[16])")
    return Ia32eFormat(levels, cpu.maxphyaddr, cpu.gbpages, nxe, cpu.vendor == "amd")


def nested_tree(fmt: EntryFormat) -> str:
    """What the manuals call the second-dimension tree of this format: "NPT" for AMD's
    nested page tables, "EPT" otherwise."""
    return "NPT" if isinstance(fmt, Ia32eFormat) and fmt.nested else "EPT"


@lru_cache(maxsize=16)
def npt_format(levels: int, cpu: CpuModel) -> Ia32eFormat:
    """AMD's nested page tables (APM Vol 2 15.25.5): the long-mode format with the host's
    EFER.NX=1 and the CPU's reserved bits, `levels` deep as the host pages (KVM
    `get_npt_level`); entries are named "nested PML4E" and so on."""
    if cpu.vendor != "amd":
        raise TwodwalkError("nested page tables are AMD's: give a CpuModel with vendor='amd'")
    if levels == 5 and not cpu.la57:
        raise TwodwalkError("levels=5 needs a CPU model with la57=True (CPUID.07H:ECX[16])")
    return Ia32eFormat(levels, cpu.maxphyaddr, cpu.gbpages, True, amd=True, nested=True)


# --- EPT: SDM Vol 3C 29.3.2 "EPT Translation Mechanism", tables 29-1 .. 29-7 -------------------

_EPT_LEVEL_NAMES = {5: "EPT PML5E", 4: "EPT PML4E", 3: "EPT PDPTE", 2: "EPT PDE", 1: "EPT PTE"}
_EPT_TABLE_NAMES = {
    5: "EPT PML4 table",
    4: "EPT page-directory-pointer table",
    3: "EPT page directory",
    2: "EPT page table",
}
_EPT_BAD_MEMTYPES = frozenset({2, 3, 7})
EPT_MEMTYPE_WB = 6
_EPT_COMMON = [
    Field("r", "R", 0, 0, "Read access allowed"),
    Field("w", "W", 1, 1, "Write access allowed"),
    Field("x", "X", 2, 2, "Instruction fetch allowed (supervisor fetch with MBEC)"),
    Field("a", "A", 8, 8, "Accessed (if EPTP bit 6 enables EPT A/D flags)"),
    Field("xu", "XU", 10, 10, "User-mode fetch allowed (with MBEC; else ignored)"),
    Field("sw", "SW", 11, 11, "Ignored by the CPU; KVM's SPTE_MMU_PRESENT software bit"),
]
_EPT_LEAF = [
    Field("mt", "MT", 5, 3, "EPT memory type: 0 UC, 1 WC, 4 WT, 5 WP, 6 WB"),
    Field("ipat", "IPAT", 6, 6, "Ignore PAT memory type"),
    Field("d", "D", 9, 9, "Dirty (if EPTP bit 6 enables EPT A/D flags)"),
    Field("hw", "HW", 57, 57, "Ignored by the CPU; KVM: host page writable"),
    Field("mw", "MW", 58, 58, "Ignored by the CPU; KVM: may be made writable"),
    Field("sve", "SVE", 63, 63, "Suppress #VE"),
]


class EptFormat(EntryFormat):
    """EPT paging-structure entries (4-level or 5-level), walked for GPA -> HPA."""

    all_rights = Rights.R | Rights.W | Rights.X
    table_names = _EPT_TABLE_NAMES
    present_bits = 7

    def __init__(
        self, levels: int, maxphyaddr: int, gbpages: bool, ad: bool, execute_only: bool = True
    ) -> None:
        self.ad = ad
        self.execute_only = execute_only
        self.accessed_bit = 8 if ad else None
        self.dirty_bit = 9 if ad else None
        super().__init__(f"EPT {levels}-level", levels, maxphyaddr, gbpages, _EPT_LEVEL_NAMES)

    @property
    def table_defaults(self) -> Mapping[str, int]:
        return {"r": 1, "w": 1, "x": 1}

    @property
    def leaf_defaults(self) -> Mapping[str, int]:
        return {"r": 1, "mt": EPT_MEMTYPE_WB}

    def is_present(self, value: int) -> bool:
        """SDM 29.3.2: an entry is not present when bits 2:0 are all 0."""
        return bool(value & 7)

    def rights_mask(self, value: int) -> int:
        return value & 7

    @cached_property
    def valid_tops(self) -> frozenset[int]:
        return frozenset((0, 1))

    def check_address(self, address: int) -> str | None:
        if address >> self.input_bits:
            return (
                f"guest-physical address {address:#x} is beyond what {self.levels}-level EPT"
                f" translates ({self.input_bits} bits)"
            )
        return None

    def misconfiguration(self, value: int, layout: Layout) -> str | None:
        """SDM 29.3.3.1: write-only or write+execute, execute-only without the capability,
        or a leaf memory type of 2, 3 or 7 (KVM `__is_bad_mt_xwr`)."""
        xwr = value & 7
        if xwr in (0b010, 0b110) or (xwr == 0b100 and not self.execute_only):
            return f"{layout.name} has X/W/R = {xwr:03b}, which EPT does not allow"
        memtype = value >> 3 & 7
        if layout.leaf and memtype in _EPT_BAD_MEMTYPES:
            return f"{layout.name} has memory type {memtype}, which is reserved"
        return None

    def _fields(self, level: int, leaf: bool) -> list[Field]:
        if leaf:
            return [*_EPT_COMMON, *_EPT_LEAF, *([_PS_LEAF] if level > 1 else [])]
        return [*_EPT_COMMON, *([_PS_TABLE] if level in self.large_page_levels else [])]

    def _reserved(self, level: int, leaf: bool, large: bool) -> int:
        """KVM `__reset_rsvds_bits_mask_ept`: bits 29:12 or 20:12 inside a large leaf's
        address; bits 7:3 in a non-leaf PML5E/PML4E, 6:3 in a non-leaf PDPTE/PDE."""
        if large:
            return bits(self.shift(level) - 1, 12)
        if not leaf:
            return bits(7, 3) if level > 3 else bits(6, 3)
        return 0


@lru_cache(maxsize=64)
def ept_format(levels: int, cpu: CpuModel, ad: bool = True) -> EptFormat:
    """The EPT format for a CPU model; 1 GiB EPT pages follow the CPU's 1 GiB support."""
    return EptFormat(levels, cpu.maxphyaddr, cpu.gbpages, ad)


def leaf_bit(fmt: EntryFormat, key: str) -> int:
    """The mask of a one-bit field of `fmt`'s leaf entries, named as the SDM's tables name
    it ("d", "g", "mw" ...): the bit is the same in a 4 KiB leaf and in a large one (SDM Vol
    3A tables 4-18 to 4-20; Vol 3C tables 29-3 to 29-6). For hot paths, look it up once."""
    field = fmt.layout(1, False).field(key)
    if field.high != field.low:
        raise TwodwalkError(f"{key} is bits {field.bit_range} of a leaf, not one bit")
    return field.mask


# The one-bit fields of an IA-32e leaf (the same in 4- and 5-level paging and in every leaf
# size), named once from the SDM's tables for code that tests them on hot paths.
_IA32E_LEAF = ia32e_format(4, CpuModel(), nxe=True)
PTE_WRITABLE, PTE_ACCESSED, PTE_DIRTY, PTE_GLOBAL = (
    leaf_bit(_IA32E_LEAF, key) for key in ("rw", "a", "d", "g")
)
