"""The memory inspector's model: one 4 KiB page of host memory as 512 eight-byte entries.

Paging structures are pages of 512 entries (SDM Vol 3A 4.5), so a page is shown as a table
would be, each entry decoded in the format the reader picks: a guest IA-32e entry, an EPT
entry (Intel), a nested page-table entry (AMD: the long-mode format again) or a host entry,
at a level. The address may be given as an HPA, a GPA (through its
memslot) or an HVA of the VMM (through the host's page tables); looking it up faults nothing
in, as QEMU's `gpa2hpa` reads /proc/self/pagemap without touching the page.
"""

from __future__ import annotations

from twodwalk.engine.formats import ENTRIES_PER_TABLE, ENTRY_SIZE, EntryFormat, nested_tree
from twodwalk.engine.machine import Machine
from twodwalk.engine.units import PAGE_SIZE
from twodwalk.errors import TwodwalkError, check_choice, check_int, parse_int
from twodwalk.views.text import describe_entry, entry_flags, entry_meaning, gpa2hva_text

SPACES = ("hpa", "gpa", "hva")
FORMATS = ("guest", "ept", "npt", "host", "raw")


class InspectorModel:
    """Where the page is (`address` in `space`, and its `hpa`) and how entries are read."""

    def __init__(
        self,
        machine: Machine,
        address: int = 0,
        space: str = "hpa",
        entry_format: str = "guest",
        level: int = 1,
    ) -> None:
        self.machine = machine
        self.space = check_choice("space", space, SPACES)
        self.address = address
        self.hpa: int | None = None
        self.entry_format, self.level = "raw", 1  # until a format is accepted
        self.error = ""
        self.goto(f"{address:#x}", space)
        where = self.error
        self.choose_format(entry_format, level)
        self.error = self.error or where

    def goto(self, text: str, space: str) -> bool:
        """Show the page holding `text` (hex, or decimal with 0d) in `space`."""
        try:
            address = check_int("address", parse_int(text), 0, 1 << 64)
            hpa = self._to_hpa(address, check_choice("space", space, SPACES))
        except TwodwalkError as e:
            self.error = str(e)
            return False
        self.address, self.space, self.hpa, self.error = address, space, hpa, ""
        return True

    def move(self, pages: int) -> bool:
        """The next (+1) or previous (-1) page in the same address space."""
        address = self.address + pages * PAGE_SIZE
        if address < 0:
            self.error = "there is no page below address 0"
            return False
        return self.goto(f"{address:#x}", self.space)

    def choose_format(self, name: str, level: int) -> bool:
        """Read entries as `name` ("guest", "ept", "npt", "host" or "raw") at `level`."""
        try:
            check_choice("entry format", name, FORMATS)
            fmt = self._format(name)
            if fmt is not None:
                check_int("level", level, 1, fmt.levels + 1, valid=f"1..{fmt.levels}")
        except TwodwalkError as e:
            self.error = str(e)
            return False
        self.entry_format, self.level, self.error = name, level, ""
        return True

    def level_names(self, name: str) -> dict[int, str]:
        """The entry names per level of a format here (none for raw, or for EPT with EPT
        off), for the level picker."""
        try:
            fmt = self._format(name)
        except TwodwalkError:
            return {}
        return {} if fmt is None else dict(fmt.level_names)

    def _format(self, name: str) -> EntryFormat | None:
        if name == "guest":
            return self.machine.guest.format
        if name in ("ept", "npt"):
            fmt = self.machine.vm.ept.fmt  # refuses with EPT off, in the engine's words
            tree = nested_tree(fmt)
            if tree.lower() != name:
                raise TwodwalkError(
                    f"entry format {name!r} is not this VM's: its second dimension is {tree},"
                    f" choose {tree.lower()!r}"
                )
            return fmt
        if name == "host":
            return self.machine.host.format
        return None

    def _to_hpa(self, address: int, space: str) -> int:
        if space == "gpa":
            hva = self.machine.vm.gpa_to_hva(address)
            if hva is None:
                raise TwodwalkError(gpa2hva_text(address, None) + " (no memslot: MMIO)")
            return self._hva_to_hpa(hva)
        if space == "hva":
            return self._hva_to_hpa(address)
        limit = self.machine.memory.limit
        return check_int("hpa", address, 0, limit, valid=f"below 2**MAXPHYADDR = {limit:#x}")

    def _hva_to_hpa(self, hva: int) -> int:
        """The frame the VMM's page tables hold for `hva`: their present leaf, read as is."""
        host, vmm = self.machine.host, self.machine.vmm
        if vmm.find_vma(hva) is None:
            raise TwodwalkError(f"HVA {hva:#x} is in no VMA of the VMM ({vmm.name})")
        hpa = host.pagemap(vmm, hva)
        if hpa is None:
            raise TwodwalkError(
                f"HVA {hva:#x} has no host frame (never touched, or swapped out):"
                " the VMM's first touch would fault it in"
            )
        return hpa

    def entries(self) -> list[int]:
        """The page's 512 entries, as 64-bit little-endian values."""
        if self.hpa is None:
            return []
        base = self.hpa & ~(PAGE_SIZE - 1)
        read = self.machine.memory.read_u64
        return [read(base + ENTRY_SIZE * i) for i in range(ENTRIES_PER_TABLE)]

    @property
    def selected(self) -> int:
        """The index of the entry holding the address."""
        return 0 if self.hpa is None else (self.hpa & (PAGE_SIZE - 1)) // ENTRY_SIZE

    def page_text(self) -> str:
        """Every entry of the page, one a line, runs of zero entries folded (as hexdump's
        `*` does); `>` marks the entry the address points into."""
        if self.hpa is None:
            return ""
        fmt = self._format(self.entry_format)
        base = self.hpa & ~(PAGE_SIZE - 1)
        how = "raw" if fmt is None else fmt.level_name(self.level)
        lines = [f"{self.space.upper()} {self.address:#x}: page at HPA {base:#x}, as {how}"]
        zeros: list[int] = []
        for i, value in enumerate(self.entries()):
            if value == 0 and i != self.selected:
                zeros.append(i)
                continue
            lines += _zero_run(zeros)
            zeros = []
            mark = ">" if i == self.selected else " "
            lines.append(
                f"{mark} {i:3d} +{i * ENTRY_SIZE:#05x}  {base + i * ENTRY_SIZE:#x}"
                f"  {value:#018x}  {self._decoded(fmt, value)}"
            )
        return "\n".join(lines + _zero_run(zeros))

    def _decoded(self, fmt: EntryFormat | None, value: int) -> str:
        if fmt is None:
            return "".join(chr(b) if 32 <= b < 127 else "." for b in value.to_bytes(8, "little"))
        return entry_flags(fmt, self.level, value) + entry_meaning(fmt, self.level, value)

    def entry_text(self) -> str:
        """The selected entry, field by field (SDM tables 4-15..4-20, 29-1..29-7)."""
        if self.hpa is None:
            return ""
        value = self.entries()[self.selected]
        fmt = self._format(self.entry_format)
        if fmt is None:
            return f"{value:#018x} = {value} (bytes {value.to_bytes(8, 'little').hex(' ')})"
        return describe_entry(fmt.decode(value, self.level))


def _zero_run(indices: list[int]) -> list[str]:
    if not indices:
        return []
    first, last = indices[0], indices[-1]
    which = f"entry {first} is" if first == last else f"entries {first}..{last} are"
    return [f"        ... {which} zero"]
