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
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Generic, NamedTuple, Protocol, TypeVar

from twodwalk.engine.formats import RIGHTS_BY_MASK, Rights
from twodwalk.engine.units import GIGANTIC_PAGE_SIZE, HUGE_PAGE_SIZE, PAGE_SIZE, hex_repr
from twodwalk.engine.walker import (
    ROW_INDEX,
    ROW_LEVEL,
    ROW_READ,
    ROW_RIGHTS,
    ROW_TABLE,
    ROW_VALUE,
    WalkRecord,
)
from twodwalk.errors import TwodwalkError, check_choice, check_int

# Sizes of a Skylake-class core (Intel Optimization Reference Manual, "TLB parameters"): the
# first-level data TLB has 64 4-KiB, 32 2-MiB and 4 1-GiB entries, 4-way; the second-level
# STLB 1536 4-KiB/2-MiB entries, 12-way, and 16 1-GiB entries, 4-way. The STLB's 4-KiB and
# 2-MiB entries share one array in hardware; here each size has its own.
DEFAULT_GEOMETRY: Mapping[int, tuple[int, int]] = {
    PAGE_SIZE: (16, 4),
    HUGE_PAGE_SIZE: (8, 4),
    GIGANTIC_PAGE_SIZE: (1, 4),
}
STLB_GEOMETRY: Mapping[int, tuple[int, int]] = {
    PAGE_SIZE: (128, 12),
    HUGE_PAGE_SIZE: (128, 12),
    GIGANTIC_PAGE_SIZE: (4, 4),
}


@hex_repr
class Tag(NamedTuple):
    """What an entry belongs to: the VPID, the PCID and the EP4TA, EPTP bits 51:12 (0 without
    EPT; SDM Vol 3C 29.4.1: entries are associated with the EP4TA, not the whole EPTP). A
    global entry carries ANY_PCID: it may be used with every PCID (SDM Vol 3A 4.10.2.4).
    A named tuple, because every cache lookup hashes one."""

    vpid: int
    pcid: int
    ep4ta: int


ANY_PCID = -1  # the PCID of a global TLB entry: it translates for every PCID


@hex_repr
@dataclass(slots=True)
class TlbEntry:
    """One cached translation of a page: `page` (`page_size` bytes) -> `frame`, with its
    GPA page where the translation went through one, the rights the walk accumulated, the
    leaf entry, whether the leaf was already dirty, and whether it is global. Made on every
    TLB fill, so a slotted dataclass, not a frozen one: treat it as read-only.
    `check_key` is what a rights check of it reads (the rights, the EPT rights, the leaf's
    protection key and XD bit) as one small int, for the processor's memo of those checks."""

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
    check_key: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ept = 16 if self.ept_rights is None else int(self.ept_rights)
        self.check_key = int(self.rights) | ept << 4 | (self.leaf >> 59) << 9


@hex_repr
@dataclass(slots=True)
class PscEntry:
    """One paging-structure-cache entry (SDM Vol 3A 4.10.3.1; Vol 3C 29.4.3 for the EPT's):
    for the address prefix that chose an upper-level entry (the `page_size` bytes from `page`
    it covers), the table below that entry, `table` in the walk's own space (a GPA when the
    guest's tables are walked through EPT) and `table_hpa` where it is, the rights
    accumulated down to it, the EPT rights of the table's page, and the entry itself. No
    dirty bit and no global bit: those belong to pages, which only the TLB holds. Slotted,
    not frozen, as `TlbEntry`: read-only by convention."""

    tag: Tag
    page: int
    page_size: int
    table: int
    table_hpa: int
    rights: Rights
    ept_rights: Rights | None
    entry: int


class CachedEntry(Protocol):
    """What a set-associative cache keys an entry by: its tag and the aligned region."""

    @property
    def tag(self) -> Tag: ...

    @property
    def page(self) -> int: ...

    @property
    def page_size(self) -> int: ...


E = TypeVar("E", bound=CachedEntry)


@dataclass
class TlbStats:
    """Lookups that hit and missed since the TLB was made."""

    hits: int = 0
    misses: int = 0


@dataclass
class SetAssociativeCache(Generic[E]):
    """Entries kept by (tag, aligned region), one set-associative array per region size
    (`geometry`: size -> (sets, ways)), least recently used way replaced: the shape of the
    TLB and of the paging-structure caches alike."""

    geometry: Mapping[int, tuple[int, int]] = field(default_factory=lambda: DEFAULT_GEOMETRY)
    enabled: bool = True
    stats: TlbStats = field(default_factory=TlbStats)

    def __post_init__(self) -> None:
        for size, (sets, ways) in self.geometry.items():
            if size < PAGE_SIZE or size & (size - 1) or sets < 1 or ways < 1:
                raise TwodwalkError(
                    f"cache geometry {size:#x}: ({sets}, {ways}) is not valid: a power-of-two"
                    " size of at least 4 KiB, with >= 1 set and >= 1 way"
                )
        self._sets: dict[int, list[OrderedDict[tuple[Tag, int], E]]] = {
            size: [OrderedDict() for _ in range(sets)] for size, (sets, _) in self.geometry.items()
        }
        self._ways = {size: ways for size, (_, ways) in self.geometry.items()}
        self._in_use: list[tuple[int, int, list[OrderedDict[tuple[Tag, int], E]], int]] = []
        self._sizes_in_use: set[int] = set()
        self._may_hold_global = False  # no entry tagged ANY_PCID: a miss is a miss
        self._last_hit: tuple[Tag, int, int, E] | None = None  # see `lookup`

    def _note_sizes_in_use(self) -> None:
        """The arrays a look-up probes: only page sizes that hold an entry. An eviction
        replaces an entry of the same size, so only inserts and invalidations change this."""
        self._in_use = [
            (-s, s.bit_length() - 1, sets, len(sets)) for s, sets in self._sets.items() if any(sets)
        ]
        self._sizes_in_use = {-mask for mask, _, _, _ in self._in_use}

    def lookup(self, tag: Tag, address: int) -> E | None:
        """The entry that translates `address` for `tag`, or None (counted as a miss).

        The engine's one look-up shortcut: an access to the page the last hit found (same
        tag object, same page) gets that entry without probing its set. The answer and the
        set's LRU order are what a probe would give, because that entry is already its
        set's most recently used way and any insert or invalidation forgets the shortcut."""
        if not self.enabled:
            return None
        last = self._last_hit
        if last is not None and last[0] is tag and address & last[1] == last[2]:
            self.stats.hits += 1
            return last[3]
        for mask, shift, sets, count in self._in_use:  # per page size: -size, log2(size)
            page = address & mask
            key = (tag, page)
            ways = sets[(page >> shift) % count]
            entry = ways.get(key)
            if entry is not None:
                ways.move_to_end(key)
                self.stats.hits += 1
                self._last_hit = (tag, mask, page, entry)
                return entry
        if self._may_hold_global and tag.pcid != ANY_PCID:  # another PCID's global entry
            return self.lookup(Tag(tag.vpid, ANY_PCID, tag.ep4ta), address)  # will do (4.10.2.4)
        self.stats.misses += 1
        return None

    def insert(self, entry: E) -> None:
        """Cache a translation; the least recently used way of its set makes room."""
        size = entry.page_size
        sets = self._sets.get(size)
        if sets is None or not self.enabled:
            return
        self._last_hit = None
        ways = sets[(entry.page // size) % len(sets)]
        key = (entry.tag, entry.page)
        ways.pop(key, None)  # a new or re-inserted key goes in as the most recent way
        ways[key] = entry
        if len(ways) > self._ways[size]:
            ways.popitem(last=False)
        if entry.tag.pcid == ANY_PCID:
            self._may_hold_global = True
        if size not in self._sizes_in_use:
            self._note_sizes_in_use()

    def invalidate(self, keep: Callable[[E], bool]) -> int:
        """Drop every entry for which `keep` is false; return how many went."""
        self._last_hit = None
        dropped = 0
        held_global = False
        for sets in self._sets.values():
            for ways in sets:
                for key, entry in list(ways.items()):
                    if not keep(entry):
                        del ways[key]
                        dropped += 1
                    elif entry.tag.pcid == ANY_PCID:
                        held_global = True
        self._may_hold_global = held_global
        self._note_sizes_in_use()
        return dropped

    def entries(self) -> list[E]:
        return [e for sets in self._sets.values() for ways in sets for e in ways.values()]


class Tlb(SetAssociativeCache[TlbEntry]):
    """A set-associative TLB: translations of pages, one array per page size."""


class PagingStructureCache(SetAssociativeCache[PscEntry]):
    """The cache of one level's upper-level entries, keyed by the address prefix that
    selected them (its "page" is the region one entry of that level covers)."""


@dataclass
class TwoLevelTlb:
    """A first-level TLB backed by a larger second-level one (the STLB), as on current x86
    cores: a look-up tries the first level, then the STLB, whose hit refills the first level;
    a walk fills both. Invalidations reach both, so stale entries behave as in one TLB."""

    l1: Tlb = field(default_factory=Tlb)
    stlb: Tlb = field(default_factory=lambda: Tlb(STLB_GEOMETRY))

    @property
    def enabled(self) -> bool:
        return self.l1.enabled or self.stlb.enabled

    @enabled.setter
    def enabled(self, on: bool) -> None:
        self.l1.enabled = self.stlb.enabled = on

    @property
    def stats(self) -> TlbStats:
        """Hits in either level; misses: look-ups that neither level answered."""
        return TlbStats(self.l1.stats.hits + self.stlb.stats.hits, self.stlb.stats.misses)

    def lookup(self, tag: Tag, address: int) -> TlbEntry | None:
        entry = self.l1.lookup(tag, address)
        if entry is None:
            entry = self.stlb.lookup(tag, address)
            if entry is not None:
                self.l1.insert(entry)
        return entry

    def insert(self, entry: TlbEntry) -> None:
        self.l1.insert(entry)
        self.stlb.insert(entry)

    def invalidate(self, keep: Callable[[TlbEntry], bool]) -> int:
        """Drop every entry for which `keep` is false, in both levels; return how many
        translations went (an entry held by both levels counts once)."""
        gone = {id(e): e for e in self.entries() if not keep(e)}
        self.l1.invalidate(keep)
        self.stlb.invalidate(keep)
        return len(gone)

    def entries(self) -> list[TlbEntry]:
        """Each translation once, whichever levels hold it."""
        return list({id(e): e for e in (*self.l1.entries(), *self.stlb.entries())}.values())


@dataclass
class PageWalkCache:
    """An AMD-style page-walk cache, the alternative to Intel's paging-structure caches (as
    modelled by Bhargava et al., ASPLOS 2008, and Barr et al., ISCA 2010): upper-level
    entries of any walk, guest or nested, kept by the host-physical address they were read
    from. A walk still visits every level; a hit saves only that level's memory reference.
    Fully associative with LRU replacement. Like the paging-structure caches it may hold a
    stale entry, and every invalidation (INVLPG, MOV CR3, INVVPID, INVEPT) empties it."""

    size: int = 32
    enabled: bool = True
    stats: TlbStats = field(default_factory=TlbStats)

    def __post_init__(self) -> None:
        check_int("size", self.size, 1, 1 << 20, valid="1 or more entries")
        self._lines: OrderedDict[int, int] = OrderedDict()

    def lookup(self, hpa: int) -> int | None:
        """The cached entry read from `hpa`, or None (counted as a miss)."""
        if not self.enabled:
            return None
        value = self._lines.get(hpa)
        if value is None:
            self.stats.misses += 1
            return None
        self._lines.move_to_end(hpa)
        self.stats.hits += 1
        return value

    def fill(self, record: WalkRecord) -> None:
        """Keep the upper-level entries of a successful walk (not its leaf), as written."""
        if not self.enabled:
            return
        written = record.written or (None,) * len(record.rows)
        for row, wrote in zip(record.rows[:-1], written, strict=False):
            read = row[ROW_READ]
            hpa = row[ROW_TABLE] + 8 * row[ROW_INDEX] if read is None else read.physical
            self._lines[hpa] = row[ROW_VALUE] if wrote is None else wrote
            self._lines.move_to_end(hpa)
            if len(self._lines) > self.size:
                self._lines.popitem(last=False)

    def clear(self) -> int:
        """Empty the cache; return how many entries went."""
        gone = len(self._lines)
        self._lines.clear()
        return gone

    def entries(self) -> list[tuple[int, int]]:
        """(host-physical address, entry) of each line, least recently used first."""
        return list(self._lines.items())


MODELS = ("intel", "amd")


def deepest_table(
    psc: Mapping[int, PagingStructureCache], tag: Tag, address: int, levels: int
) -> tuple[int, PscEntry] | None:
    """The deepest paging-structure-cache entry for `address` and its level: where a walk
    can begin (SDM Vol 3A 4.10.3.2: the PDE cache first, then the PDPTE and PML4E caches;
    Vol 3C 29.4.3 likewise for the EPT's caches of guest-physical addresses)."""
    for level in range(2, levels + 1):
        cache = psc[level]
        if cache.enabled:  # a switched-off cache costs no look-up
            entry = cache.lookup(tag, address)
            if entry is not None:
                return level, entry
    return None


def fill_paging_structure_caches(
    psc: Mapping[int, PagingStructureCache], tag: Tag, record: WalkRecord
) -> None:
    """Cache, for each table a walk went through, the table below it (its address in the
    walk's own space, its HPA, the EPT rights of its page) and the rights so far, keyed by
    the address bits that chose them."""
    for entry, below in pairwise(record.rows):
        cache = psc[entry[ROW_LEVEL]]
        if not cache.enabled:
            continue
        cover = record.format.page_size(entry[ROW_LEVEL])
        read, table = below[ROW_READ], below[ROW_TABLE]
        frame = table if read is None else read.physical & ~0xFFF
        ept_rights = None if read is None else read.ept_rights
        rights = RIGHTS_BY_MASK[entry[ROW_RIGHTS]]
        page = record.address & ~(cover - 1)
        cache.insert(PscEntry(tag, page, cover, table, frame, rights, ept_rights, entry[ROW_VALUE]))


TranslationCache = Tlb | TwoLevelTlb | PagingStructureCache  # any of a processor's caches


def _psc_geometry(level: int) -> Mapping[int, tuple[int, int]]:
    """A paging-structure cache for level `level` entries: keyed by the address bits above
    the level below (so its "page" is 2 MiB for the PDE cache, 1 GiB for the PDPTE cache ...)."""
    return {1 << (12 + 9 * (level - 1)): (1, {2: 32, 3: 4}.get(level, 2))}


@dataclass
class TranslationCaches:
    """Every translation cache of one logical processor (SDM Vol 3C 29.4.2-29.4.3):

    - `tlb`: linear (EPT off) or combined (EPT on) mappings of whole pages, in two levels by
      default (`TwoLevelTlb`; any `Tlb` will do, e.g. one tiny level for an exercise);
    - `psc[L]`: paging-structure caches: a linear-address prefix -> the host-physical (and
      guest-physical) address of the level L-1 table and the rights accumulated above it,
      so a walk can start there (PML4E cache L=4, PDPTE cache L=3, PDE cache L=2);
    - `guest_physical`: guest-physical mappings (GPA page -> HPA page from EPT), tagged
      by the EP4TA only, used for the GPA of each guest table and the final GPA;
    - `ept_psc[L]`: guest-physical paging-structure caches: a GPA prefix -> the HPA of the
      level L-1 EPT table and the EPT rights above it, so that an EPT walk that misses the
      guest-physical mappings can start there (EPT PML4E L=4, PDPTE L=3, PDE L=2);
    - `pwc`: with `model="amd"`, a `PageWalkCache` takes the place of the paging-structure
      caches (`model="intel"`, the default, is the SDM's).

    Each can be switched off (`enabled`); `off()` switches all of them off."""

    tlb: Tlb | TwoLevelTlb = field(default_factory=TwoLevelTlb)
    psc: dict[int, PagingStructureCache] = field(
        default_factory=lambda: {lv: PagingStructureCache(_psc_geometry(lv)) for lv in (5, 4, 3, 2)}
    )
    guest_physical: Tlb = field(default_factory=Tlb)
    ept_psc: dict[int, PagingStructureCache] = field(
        default_factory=lambda: {lv: PagingStructureCache(_psc_geometry(lv)) for lv in (5, 4, 3, 2)}
    )
    model: str = "intel"
    pwc: PageWalkCache = field(default_factory=PageWalkCache)

    def __setattr__(self, name: str, value: object) -> None:
        """Plain attributes; `model` must name a model (`MODELS`), when made or changed."""
        if name == "model":
            check_choice("model", value, MODELS)
        object.__setattr__(self, name, value)

    @property
    def amd(self) -> bool:
        """Whether walks use the page-walk cache instead of the paging-structure caches."""
        return self.model == "amd"

    def all(self) -> list[TranslationCache]:
        return [self.tlb, *self.psc.values(), self.guest_physical, *self.ept_psc.values()]

    def off(self) -> None:
        for cache in self.all():
            cache.enabled = False
        self.pwc.enabled = False

    @contextmanager
    def switched_off(self) -> Iterator[None]:
        """Every cache off inside the `with` (each walk then reads every entry from memory),
        and each back as it was after it."""
        was = [cache.enabled for cache in self.all()], self.pwc.enabled
        self.off()
        try:
            yield
        finally:
            for cache, enabled in zip(self.all(), was[0], strict=True):
                cache.enabled = enabled
            self.pwc.enabled = was[1]

    def flush_vpid(self, vpid: int, keep_global: bool = False) -> None:
        """INVVPID single-context (or retaining globals): linear and combined mappings and
        paging-structure caches of one VPID; guest-physical mappings stay."""
        self.pwc.clear()
        self.tlb.invalidate(lambda e: e.tag.vpid != vpid or (keep_global and e.global_page))
        for psc in self.psc.values():
            psc.invalidate(lambda e: e.tag.vpid != vpid)

    def flush_asid(self, asid: int) -> None:
        """AMD's TLB_CONTROL_FLUSH_ASID at the next VMRUN (APM Vol 2 15.16.1): every
        translation of one ASID, guest-linear and nested alike. The guest-physical caches
        of this model belong to the one vCPU, so they go whole."""
        self.pwc.clear()
        for cache in (self.tlb, *self.psc.values()):
            cache.invalidate(lambda e: e.tag.vpid != asid)
        self.guest_physical.invalidate(lambda e: False)
        for psc in self.ept_psc.values():
            psc.invalidate(lambda e: False)

    def flush_all_vpids(self) -> None:
        """INVVPID all-context: every VPID but 0 (the host's)."""
        self.pwc.clear()
        for cache in (self.tlb, *self.psc.values()):
            cache.invalidate(lambda e: e.tag.vpid == 0)

    def flush_pcid(self, vpid: int, pcid: int) -> None:
        """MOV to CR3: the non-global TLB entries and all paging-structure entries of a PCID."""
        self.pwc.clear()
        self.tlb.invalidate(lambda e: e.global_page or e.tag.vpid != vpid or e.tag.pcid != pcid)
        for psc in self.psc.values():
            psc.invalidate(lambda e: e.tag.vpid != vpid or e.tag.pcid != pcid)

    def flush_address(self, vpid: int, pcid: int | None, address: int) -> None:
        """INVLPG (pcid: the current PCID) or INVVPID individual-address (pcid None: every
        PCID): the page's TLB entries (global ones too) and every paging-structure entry of
        the PCID, whatever its address (SDM Vol 3A 4.10.4.1)."""
        self.pwc.clear()
        self.tlb.invalidate(
            lambda e: (
                e.tag.vpid != vpid
                or not e.page <= address < e.page + e.page_size
                or (pcid is not None and not e.global_page and e.tag.pcid != pcid)
            )
        )
        for psc in self.psc.values():
            psc.invalidate(
                lambda e: e.tag.vpid != vpid or (pcid is not None and e.tag.pcid != pcid)
            )

    def flush_pcid_address(self, vpid: int, pcid: int, address: int) -> None:
        """INVPCID individual-address (type 0): the page's non-global TLB entries of one
        PCID, and that PCID's paging-structure entries (SDM Vol 3A 4.10.4.1)."""
        self.pwc.clear()
        self.tlb.invalidate(
            lambda e: (
                e.tag.vpid != vpid
                or e.tag.pcid != pcid
                or e.global_page
                or not e.page <= address < e.page + e.page_size
            )
        )
        for psc in self.psc.values():
            psc.invalidate(lambda e: e.tag.vpid != vpid or e.tag.pcid != pcid)

    def flush_eptp(self, ep4ta: int | None) -> None:
        """INVEPT single-context (one EP4TA) or global (None): combined, paging-structure and
        guest-physical mappings derived from that EPT (from any EPT)."""
        self.pwc.clear()

        def keep(e: CachedEntry) -> bool:
            return e.tag.ep4ta == 0 if ep4ta is None else e.tag.ep4ta != ep4ta

        for cache in self.all():
            cache.invalidate(keep)
