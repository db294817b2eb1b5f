"""Scenarios: named, ready-made machines as plain data, to build, describe, save and load.

A scenario is what a lecturer writes on the board before an exercise: the machine (guest RAM
and its PCI hole, EPT or shadow paging, the paging depths, MAXPHYADDR, THP), the guest's
mappings (which GVA range maps to which GPA range, with which page size and rights) and a few
accesses the guest makes. `build()` turns it into a `Machine`; `run()` makes the accesses.
Files are JSON or TOML, read only with the standard library's data parsers (json, tomllib),
so a scenario file can never run code. Random scenarios are seeded, as the OSTEP homework
simulators are: the same seed always gives the same machine.
"""

from __future__ import annotations

import json
import random
import re
import tomllib
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar, Union, get_args, get_origin
from typing import get_type_hints as _type_hints

from twodwalk.engine.machine import Machine, ram_aliases
from twodwalk.engine.units import HUGE_PAGE_SIZE, KIB, MIB, PAGE_SIZE, PAGE_SIZES
from twodwalk.errors import TwodwalkError, check_choice, check_int, parse_int
from twodwalk.views.text import size_text

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    from twodwalk.engine.processor import AccessResult

HEX = "hex"  # a field marked Annotated[..., HEX] is written in hex in JSON and TOML files
Hex = Annotated[int, HEX]
KINDS = ("read", "write", "fetch")
SUFFIXES = (".json", ".toml")
T = TypeVar("T", bound="DataclassInstance")


@dataclass(frozen=True)
class GuestMapping:
    """One range of a guest address space, as the guest kernel maps it (`GuestOS.map`)."""

    name: str
    gva: Hex
    gpa: Hex
    size: Hex
    page_size: Hex = PAGE_SIZE
    rw: bool = True
    us: bool = False
    xd: bool = False

    def __post_init__(self) -> None:
        check_choice("page_size", size_text(self.page_size), tuple(map(size_text, PAGE_SIZES)))


@dataclass(frozen=True)
class GuestAccess:
    """One 8-byte access the guest makes at a privilege level."""

    gva: Hex
    kind: str = "read"
    cpl: int = 3

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, KINDS)
        check_int("cpl", self.cpl, 0, 4, valid="0 (kernel) .. 3 (user)")

    def perform(self, machine: Machine) -> AccessResult:
        """Run the access on the machine's vCPU. A write stores the GVA itself, so that a
        memory dump shows who wrote where."""
        machine.vcpu.cpl = self.cpl
        value = self.gva if self.kind == "write" else None
        return machine.vcpu.access(self.gva, self.kind, value)


@dataclass(frozen=True)
class Scenario:
    """A machine and what its guest maps and does, as plain data."""

    name: str
    description: str = ""
    guest_ram: Hex = 32 << 20
    pci_hole: Annotated[tuple[int, int] | None, HEX] = None
    tdp: bool = True
    guest_levels: int = 4
    ept_levels: int = 4
    maxphyaddr: int = 46
    thp: bool = False
    vendor: str = "intel"
    mappings: tuple[GuestMapping, ...] = ()
    accesses: tuple[GuestAccess, ...] = ()

    def __post_init__(self) -> None:
        check_choice("guest_levels", str(self.guest_levels), ("4", "5"))
        check_choice("ept_levels", str(self.ept_levels), ("4", "5"))
        check_choice("vendor", self.vendor, ("intel", "amd"))
        self.ram_pieces()

    def ram_pieces(self) -> list[tuple[int, int, int]]:
        """(GPA, offset in the RAM block, size) of each memslot (see `ram_aliases`)."""
        return ram_aliases(self.guest_ram, self.pci_hole, HUGE_PAGE_SIZE if self.thp else PAGE_SIZE)

    def build(self) -> Machine:
        """A fresh `Machine` with the guest's mappings in place; nothing has run yet."""
        with _where(f"scenario {self.name!r}"):
            machine = Machine(
                guest_ram=self.guest_ram,
                tdp=self.tdp,
                guest_levels=self.guest_levels,
                ept_levels=self.ept_levels,
                maxphyaddr=self.maxphyaddr,
                thp=self.thp,
                pci_hole=self.pci_hole,
                vendor=self.vendor,
            )
        for m in self.mappings:
            with _where(f"scenario {self.name!r}, mapping {m.name!r}"):
                machine.guest.map(
                    m.gva,
                    m.gpa,
                    m.size,
                    page_size=m.page_size,
                    rw=int(m.rw),
                    us=int(m.us),
                    xd=int(m.xd),
                )
        return machine

    def run(self, machine: Machine) -> list[AccessResult]:
        """Make the scenario's accesses in order, as the guest would."""
        return [a.perform(machine) for a in self.accesses]

    def describe(self) -> str:
        """The scenario in words: paging, the guest-physical memory map, mappings, accesses."""
        paging = (
            f"guest {self.guest_levels}-level under {self.ept_levels}-level EPT"
            if self.tdp
            else f"guest {self.guest_levels}-level, shadow paging (EPT off)"
        )
        backing = "2 MiB THP" if self.thp else "4 KiB pages"
        lines = [
            f"{self.name}: {self.description}".rstrip(": "),
            f"  paging: {paging}, MAXPHYADDR {self.maxphyaddr}",
            f"  guest RAM: {size_text(self.guest_ram)}, backed by {backing} of one VMM mmap",
            *self._memory_map(),
            "  mappings:",
            *(_mapping_text(m) for m in self.mappings),
            "  accesses:",
            *(f"    {a.kind:<5} {a.gva:#018x} at CPL {a.cpl}" for a in self.accesses),
        ]
        return "\n".join(lines)

    def _memory_map(self) -> list[str]:
        pieces = self.ram_pieces()
        lines = []
        for slot, (gpa, offset, size) in enumerate(pieces):
            if slot:
                end = pieces[slot - 1][0] + pieces[slot - 1][2]
                lines.append(f"    hole       GPA {end:#010x}-{gpa - 1:#010x}  MMIO: no memslot")
            lines.append(
                f"    memslot {slot}  GPA {gpa:#010x}-{gpa + size - 1:#010x}"
                f"  {size_text(size)} at RAM offset {offset:#x}"
            )
        top = pieces[-1][0] + pieces[-1][2]
        return [*lines, f"    guest page tables: allocated from GPA {top:#x} downward"]

    def to_json(self) -> str:
        """The scenario as JSON; addresses and sizes are hex strings such as "0x20_0000"."""
        return json.dumps(_json_value(self, False), indent=2) + "\n"

    def to_toml(self) -> str:
        """The scenario as TOML (hex integer literals; mappings and accesses as [[tables]])."""
        return "\n".join(_toml_lines(self)) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Scenario:
        """Parse a scenario written by `to_json` (or by hand); errors name the field."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise TwodwalkError(f"not valid JSON: {e}") from e
        return _from_data(cls, data, "")

    @classmethod
    def from_toml(cls, text: str) -> Scenario:
        """Parse a scenario written by `to_toml` (or by hand); errors name the field."""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise TwodwalkError(f"not valid TOML: {e}") from e
        return _from_data(cls, data, "")


def _mapping_text(m: GuestMapping) -> str:
    rights = ("rw" if m.rw else "ro") + (" user" if m.us else " kernel") + (" nx" if m.xd else "")
    return (
        f"    {m.name:<28} GVA {m.gva:#018x} -> GPA {m.gpa:#010x}  {size_text(m.size)}"
        f" in {size_text(m.page_size)} pages, {rights}"
    )


# --- files ------------------------------------------------------------------------------------


def load_scenario(path: str | Path) -> Scenario:
    """Read a .json or .toml scenario file; every error names the file and the field."""
    path = Path(path)
    with _where(str(path)):
        parse = _parser(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TwodwalkError(f"cannot read the scenario file: {e}") from e
        return parse(text)


def save_scenario(scenario: Scenario, path: str | Path) -> None:
    """Write a scenario as JSON or TOML, chosen by the file's suffix."""
    path = Path(path)
    with _where(str(path)):
        _parser(path)
        text = scenario.to_json() if path.suffix == ".json" else scenario.to_toml()
    path.write_text(text, encoding="utf-8")


def _parser(path: Path) -> Callable[[str], Scenario]:
    if path.suffix not in SUFFIXES:
        raise TwodwalkError(
            f"suffix {path.suffix!r} is not valid: a scenario file ends in .json or .toml"
        )
    return Scenario.from_json if path.suffix == ".json" else Scenario.from_toml


@contextmanager
def _where(prefix: str) -> Iterator[None]:
    """Prefix any input error raised inside with where it happened (a file, a field)."""
    try:
        yield
    except TwodwalkError as e:
        if not prefix:
            raise
        raise TwodwalkError(f"{prefix}: {e}") from e


def _items(obj: DataclassInstance) -> Iterator[tuple[str, object, bool]]:
    """(field, value, written in hex) of each field that has a value."""
    hints = _type_hints(type(obj), include_extras=True)
    for f in fields(obj):
        value = getattr(obj, f.name)
        if value is not None:
            yield f.name, value, HEX in getattr(hints[f.name], "__metadata__", ())


def _json_value(value: object, hexa: bool) -> object:
    if is_dataclass(value) and not isinstance(value, type):
        return {k: _json_value(v, hx) for k, v, hx in _items(value)}
    if isinstance(value, tuple):
        return [_json_value(v, hexa) for v in value]
    if hexa and isinstance(value, int):
        return f"{value:#_x}"
    return value


def _toml_lines(obj: DataclassInstance) -> list[str]:
    """Keys first, then arrays of tables, as TOML requires (toml.io, "Array of Tables")."""
    lines, tables = [], []
    for key, value, hexa in _items(obj):
        if isinstance(value, tuple) and value and is_dataclass(value[0]):
            for item in value:
                tables += ["", f"[[{key}]]", *_toml_lines(item)]
        else:
            lines.append(f"{key} = {_toml_value(value, hexa)}")
    return lines + tables


def _toml_value(value: object, hexa: bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value:#_x}" if hexa else str(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v, hexa) for v in value) + "]"
    # A JSON string is a TOML basic string, but for DEL, which TOML wants escaped.
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")


def _from_data(cls: type[T], data: object, where: str) -> T:
    """Build a dataclass from parsed JSON/TOML, refusing unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise TwodwalkError(f"{where or 'the scenario'} must be a table, got {_shown(data)}")
    hints = _type_hints(cls, include_extras=True)
    names = [f.name for f in fields(cls)]
    for key in data:
        if key not in names:
            raise TwodwalkError(
                f"unknown key {key!r} in {where or 'the scenario'}: valid keys are"
                f" {', '.join(names)}"
            )
    for f in fields(cls):
        if f.name not in data and f.default is MISSING:
            raise TwodwalkError(f"{where or 'the scenario'} has no {f.name!r}: it is required")
    values = {key: _convert(hints[key], value, _join(where, key)) for key, value in data.items()}
    with _where(where):
        return cls(**values)


def _convert(hint: object, value: object, where: str) -> object:
    """Check one parsed value against its field's type hint and convert lists to tuples."""
    if get_origin(hint) is Annotated:
        hint = get_args(hint)[0]
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return None if value is None else _convert(args[0], value, where)
    if origin is tuple:
        return _tuple(args, value, where)
    if isinstance(hint, type) and is_dataclass(hint):
        return _from_data(hint, value, where)
    if hint is bool:
        if isinstance(value, bool):
            return value
        expected = "true or false"
    elif hint is int:
        if isinstance(value, str):
            return parse_int(value, where)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        expected = 'an integer (4096 or "0x1000")'
    else:
        if isinstance(value, str):
            return value
        expected = "a string"
    raise TwodwalkError(f"{where} = {_shown(value)} is not valid: expected {expected}")


def _tuple(args: tuple[Any, ...], value: object, where: str) -> tuple[object, ...]:
    fixed = args[-1] is not Ellipsis
    if not isinstance(value, list) or (fixed and len(value) != len(args)):
        what = f"a list of {len(args)} integers" if fixed else "a list"
        raise TwodwalkError(f"{where} = {_shown(value)} is not valid: expected {what}")
    hints = args if fixed else (args[0],) * len(value)
    return tuple(
        _convert(h, v, f"{where}[{i}]") for i, (h, v) in enumerate(zip(hints, value, strict=True))
    )


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _shown(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


# --- named scenarios ---------------------------------------------------------------------------

PAGE_OFFSET = 0xFFFF_8880_0000_0000  # Linux's direct map (Documentation/arch/x86/x86_64/mm.rst)
KERNEL_TEXT = 0xFFFF_FFFF_8100_0000  # __START_KERNEL_map + 16 MiB
VMALLOC_START = 0xFFFF_C900_0000_0000  # vmalloc/ioremap space


def _qemu() -> Scenario:
    """A PC as QEMU builds it, scaled down: RAM below a PCI hole in slot 0, the rest above it
    in slot 1 (QEMU puts the hole under 4 GiB); a Linux guest with its direct map, kernel
    text, an ioremapped device BAR in the hole, and one process's text, heap and stack."""
    pie = 0x5555_5555_4000  # where Linux loads a PIE binary (ELF_ET_DYN_BASE)
    stack = 0x7FFF_FFFF_D000
    return Scenario(
        name="qemu",
        description="a QEMU-like PC: 64 MiB of RAM split around a PCI hole, a Linux guest",
        guest_ram=64 * MIB,
        pci_hole=(48 * MIB, 64 * MIB),
        thp=True,
        mappings=(
            GuestMapping(
                "direct map: RAM below hole", PAGE_OFFSET, 0, 48 * MIB, HUGE_PAGE_SIZE, xd=True
            ),
            GuestMapping(
                "direct map: RAM above hole",
                PAGE_OFFSET + 64 * MIB,
                64 * MIB,
                16 * MIB,
                HUGE_PAGE_SIZE,
                xd=True,
            ),
            GuestMapping("kernel text", KERNEL_TEXT, 16 * MIB, 2 * MIB, HUGE_PAGE_SIZE, rw=False),
            GuestMapping("virtio BAR (ioremap)", VMALLOC_START, 48 * MIB, 4 * KIB, xd=True),
            GuestMapping("bash: text", pie, 8 * MIB, 16 * KIB, rw=False, us=True),
            GuestMapping("bash: heap", pie + 0x5000, 65 * MIB, 32 * KIB, us=True, xd=True),
            GuestMapping("bash: stack", stack, 9 * MIB, 8 * KIB, us=True, xd=True),
        ),
        accesses=(
            GuestAccess(pie, "fetch"),
            GuestAccess(pie + 0x5008, "write"),
            GuestAccess(stack + 0x1FF8, "read"),
            GuestAccess(PAGE_OFFSET + 0x10_0000, "read", cpl=0),
            GuestAccess(KERNEL_TEXT, "fetch", cpl=0),
            GuestAccess(VMALLOC_START + 0x10, "write", cpl=0),
        ),
    )


TOY_GVA = 0x80_8060_4000  # indices 1, 2, 3, 4 in the PML4, PDPT, PD and PT
TOY5_GVA = 0x1_0100_C080_5000  # indices 1, 2, 3, 4, 5 from the PML5 down


def _toy(name: str, gva: int, **machine: Any) -> Scenario:
    """Two pages at addresses whose table indices can be read off by hand, in 1 MiB of RAM
    backed by 4 KiB pages, so every walk is the full (n+1)(m+1)-1 references."""
    return Scenario(
        name=name,
        description="two 4 KiB pages for working a walk by hand",
        guest_ram=1 * MIB,
        mappings=(
            GuestMapping("code", gva, 0x5000, 4 * KIB, rw=False, us=True),
            GuestMapping("data", gva + 0x1000, 0x6000, 4 * KIB, us=True, xd=True),
        ),
        accesses=(GuestAccess(gva, "fetch"), GuestAccess(gva + 0x1008, "write")),
        **machine,
    )


def _large_pages() -> Scenario:
    """2 MiB pages in both dimensions (guest PDEs with PS=1 over THP-backed RAM), beside one
    4 KiB page for contrast."""
    gva = 0x4000_0000
    return Scenario(
        name="large-pages",
        description="2 MiB guest pages over 2 MiB THP, and one 4 KiB page",
        guest_ram=16 * MIB,
        thp=True,
        mappings=(
            GuestMapping("big", gva, 4 * MIB, 4 * MIB, HUGE_PAGE_SIZE, us=True, xd=True),
            GuestMapping("small", gva + 8 * MIB, 2 * MIB, 4 * KIB, us=True, xd=True),
        ),
        accesses=(
            GuestAccess(gva, "read"),
            GuestAccess(gva + 2 * MIB + 8, "write"),
            GuestAccess(gva + 8 * MIB, "read"),
        ),
    )


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        _qemu(),
        _toy("toy", TOY_GVA),
        _toy("toy-5level", TOY5_GVA, guest_levels=5, ept_levels=5, maxphyaddr=52),
        _toy("toy-shadow", TOY_GVA, tdp=False),
        _toy("toy-amd", TOY_GVA, vendor="amd"),
        _large_pages(),
    )
}


def scenario(name_or_path: str) -> Scenario:
    """A named scenario, `random-SEED`, or a scenario file (.json or .toml)."""
    if name_or_path in SCENARIOS:
        return SCENARIOS[name_or_path]
    seeded = re.fullmatch(r"random-(\d+)", name_or_path)
    if seeded:
        return random_scenario(int(seeded.group(1)))
    if Path(name_or_path).suffix in SUFFIXES:
        return load_scenario(name_or_path)
    raise TwodwalkError(
        f"unknown scenario {name_or_path!r}: choose one of {', '.join(SCENARIOS)},"
        " random-SEED (e.g. random-7), or the path of a .json or .toml file"
    )


# --- seeded random scenarios -------------------------------------------------------------------

TABLE_RESERVE = 1 * MIB  # the top of RAM is left to the guest's page tables


def random_scenario(seed: int) -> Scenario:
    """A random but reproducible machine: the same seed gives the same scenario."""
    rng = random.Random(seed)
    guest_levels, ept_levels = rng.choice((4, 5)), rng.choice((4, 5))
    ram = rng.choice((16, 32, 64)) * MIB
    hole = None
    if rng.random() < 0.5:
        start = rng.randrange(1, (ram - 4 * MIB) // HUGE_PAGE_SIZE + 1) * HUGE_PAGE_SIZE
        hole = (start, start + rng.randint(1, 8) * HUGE_PAGE_SIZE)
    base = Scenario(
        name=f"random-{seed}",
        description=f"a seeded random machine (seed {seed})",
        guest_ram=ram,
        pci_hole=hole,
        tdp=rng.random() < 0.8,
        guest_levels=guest_levels,
        ept_levels=ept_levels,
        maxphyaddr=52 if ept_levels == 5 else rng.choice((46, 48)),
        thp=rng.random() < 0.5,
    )
    va_bits = 57 if guest_levels == 5 else 48
    slots = rng.sample(range(1, 1 << (va_bits - 31)), rng.randint(2, 4))
    mappings = [
        _random_mapping(rng, base, f"region {i}", slot, va_bits) for i, slot in enumerate(slots)
    ]
    accesses = [
        GuestAccess(
            m.gva + rng.randrange(0, min(m.size, PAGE_SIZE), 8),
            rng.choice(KINDS),
            3 if m.us else 0,
        )
        for m in mappings
    ]
    return replace(base, mappings=tuple(mappings), accesses=tuple(accesses))


def _random_mapping(
    rng: random.Random, base: Scenario, name: str, slot: int, va_bits: int
) -> GuestMapping:
    """A mapping in its own GiB of the address space (user or kernel half), onto RAM below
    the page tables; one in three is a 2 MiB page."""
    page = rng.choice((PAGE_SIZE, PAGE_SIZE, HUGE_PAGE_SIZE))
    size = page * (1 if page > PAGE_SIZE else rng.randint(1, 4))
    gva = (slot << 30) | (rng.randrange(0, 511) << 21) | ((rng.randrange(0, 508) << 12) & -page)
    kernel = rng.random() < 0.3
    if kernel:
        gva |= (1 << 64) - (1 << (va_bits - 1))  # canonical upper half
    pieces = base.ram_pieces()
    top = pieces[-1][0] + pieces[-1][2] - TABLE_RESERVE
    room = [
        (gpa, min(gpa + psize, top))
        for gpa, _, psize in pieces
        if min(gpa + psize, top) - gpa >= size
    ]
    low, high = rng.choice(room)
    gpa = low + rng.randrange(0, (high - low - size) // page + 1) * page
    return GuestMapping(
        name, gva, gpa, size, page, rw=rng.random() < 0.7, us=not kernel, xd=rng.random() < 0.5
    )
