"""The TLB: translations the CPU caches so that most accesses need no walk at all.

SDM Vol 3C 29.4 "Caching Translation Information": with EPT on, the TLB holds *combined*
mappings (guest-linear -> host-physical), tagged by VPID, PCID and the EPTP (EP4TA); with EPT
off, *linear* mappings from the tables under CR3 (KVM's shadow tables), tagged by VPID and PCID.
An entry remembers the page size, the rights the walk accumulated and whether the leaf was
already dirty: a write through an entry that is not dirty walks again to set D (SDM Vol 3A
4.8). Entries live until invalidated (MOV to CR3, INVLPG, INVVPID, INVEPT, or a flush), so a
guest that edits a PTE without INVLPG keeps using the old translation.

The TLB is set-associative per page size with LRU replacement; each size's sets and ways are
configurable, and the whole TLB can be switched off to see every walk.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from twodwalk.errors import TwodwalkError
from twodwalk.formats import Rights

KIB4, MIB2, GIB1 = 1 << 12, 1 << 21, 1 << 30
DEFAULT_GEOMETRY: Mapping[int, tuple[int, int]] = {KIB4: (16, 4), MIB2: (8, 4), GIB1: (1, 4)}


@dataclass(frozen=True)
class Tag:
    """What an entry belongs to: the VPID, the PCID and the EPTP (0 without EPT)."""

    vpid: int
    pcid: int
    eptp: int


@dataclass(frozen=True)
class TlbEntry:
    """One cached translation of a page."""

    tag: Tag
    page: int
    page_size: int
    frame: int
    gpa_page: int | None
    rights: Rights
    ept_rights: Rights | None
    leaf: int
    dirty: bool
    global_page: bool


@dataclass
class TlbStats:
    """Lookups that hit and missed since the TLB was made."""

    hits: int = 0
    misses: int = 0


@dataclass
class Tlb:
    """A set-associative TLB, one array per page size (`geometry`: size -> (sets, ways))."""

    geometry: Mapping[int, tuple[int, int]] = field(default_factory=lambda: DEFAULT_GEOMETRY)
    enabled: bool = True
    stats: TlbStats = field(default_factory=TlbStats)

    def __post_init__(self) -> None:
        for size, (sets, ways) in self.geometry.items():
            if size not in (KIB4, MIB2, GIB1) or sets < 1 or ways < 1:
                raise TwodwalkError(
                    f"TLB geometry {size:#x}: ({sets}, {ways}) is not valid:"
                    " page sizes 4 KiB, 2 MiB, 1 GiB with >= 1 set and way"
                )
        self._sets: dict[int, list[OrderedDict[tuple[Tag, int], TlbEntry]]] = {
            size: [OrderedDict() for _ in range(sets)] for size, (sets, _) in self.geometry.items()
        }

    def lookup(self, tag: Tag, address: int) -> TlbEntry | None:
        """The entry that translates `address` for `tag`, or None (counted as a miss)."""
        if not self.enabled:
            return None
        for size, sets in self._sets.items():
            page = address & ~(size - 1)
            ways = sets[(page // size) % len(sets)]
            entry = ways.get((tag, page))
            if entry is not None:
                ways.move_to_end((tag, page))
                self.stats.hits += 1
                return entry
        self.stats.misses += 1
        return None

    def insert(self, entry: TlbEntry) -> None:
        """Cache a translation; the least recently used way of its set makes room."""
        if not self.enabled or entry.page_size not in self._sets:
            return
        sets = self._sets[entry.page_size]
        ways = sets[(entry.page // entry.page_size) % len(sets)]
        ways[(entry.tag, entry.page)] = entry
        ways.move_to_end((entry.tag, entry.page))
        if len(ways) > self.geometry[entry.page_size][1]:
            ways.popitem(last=False)

    def invalidate(self, keep: Callable[[TlbEntry], bool]) -> int:
        """Drop every entry for which `keep` is false; return how many went."""
        dropped = 0
        for sets in self._sets.values():
            for ways in sets:
                for key, entry in list(ways.items()):
                    if not keep(entry):
                        del ways[key]
                        dropped += 1
        return dropped

    def entries(self) -> list[TlbEntry]:
        return [e for sets in self._sets.values() for ways in sets for e in ways.values()]
