"""The processor core shared by a vCPU and a bare-metal CPU: control registers, the
translation caches and their invalidation, and one access from the TLB or a walk.

What happens on a TLB miss differs: a vCPU walks two dimensions or KVM's shadow tables and
exits to KVM (vcpu.py); a bare-metal CPU walks one process's page tables and takes page
faults into the kernel (native.py). Both subclass `Processor` and supply `_attempt`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from twodwalk.engine.cpuid import CpuModel
from twodwalk.engine.ept import EptAccessRules
from twodwalk.engine.formats import PTE_DIRTY, PTE_GLOBAL, EntryFormat, Ia32eFormat, Rights
from twodwalk.engine.memory import PhysicalMemory
from twodwalk.engine.paging import (
    GeneralProtection,
    PageFault,
    PagingControls,
    decode_cr3,
)
from twodwalk.engine.tables import PageWalkCacheTables
from twodwalk.engine.tlb import (
    ANY_PCID,
    Tag,
    Tlb,
    TlbEntry,
    TranslationCaches,
    TwoLevelTlb,
    deepest_table,
    fill_paging_structure_caches,
)
from twodwalk.engine.trace import CacheHit, DataAccess, Retry, TlbHit, Trace
from twodwalk.engine.units import hex_repr
from twodwalk.engine.walker import (
    Access,
    AccessKind,
    TableMemory,
    Translation,
    WalkRecord,
    WalkStart,
)
from twodwalk.errors import TwodwalkError, check_choice, check_int

if TYPE_CHECKING:
    from twodwalk.engine.kvm.run import InternalError, MmioExit

MAX_ATTEMPTS = 16
ACCESS_SIZE = 8
_CONTROLS: dict[tuple[bool, bool, bool, bool, bool, bool, bool, int], PagingControls] = {}

# Interned values: there is one `Access` per (kind, CPL, implicit) (`Access.of`) and one
# `PagingControls` per setting of the bits (`Processor._controls`), so an object's identity
# stands for its value, and the hot path's memos key on `interned_key(value)` instead of
# hashing a frozen dataclass field by field. It is `id` itself: the name says why it is safe.
interned_key = id

# Whether cached rights allow an access, under each hardware `PagingControls` (by
# `interned_key`): a memo keyed by `TlbEntry.check_key` and `Access.code` (`_usable_entry`).
_ALLOWED_UNDER: dict[int, dict[int, bool]] = {}

# The attributes the TLB-hit path reads through `HotState`: assigning one drops it.
_HOT_STATE_FIELDS = frozenset(
    {
        "vpid",
        "_cr3",
        "_cr4_pcide",
        "_ep4ta",
        "_cr0_wp",
        "cr4_la57",
        "cr4_smep",
        "cr4_smap",
        "cr4_pke",
        "efer_nxe",
        "rflags_ac",
        "pkru",
        "forces_wp_nx",
        "cpl",
    }
)


@dataclass(slots=True)
class HotState:
    """What every access needs from the processor's registers, derived once per change of
    them instead of once per access (`Processor.__setattr__` drops it when a bit it depends
    on is assigned): the tag of cached translations, the guest's paging controls, the
    controls the hardware obeys, the rights-check memo for those, and the `Access` of each
    kind at the current CPL."""

    tag: Tag
    controls: PagingControls
    hardware_controls: PagingControls
    allowed: dict[int, bool]
    accesses: dict[AccessKind | str, Access]


def _address_for(gva: int | None) -> int:
    """The linear address an individual-address invalidation needs (INVVPID, INVPCID)."""
    if gva is None:
        raise TwodwalkError("kind=address needs gva=, the linear address to invalidate")
    return check_int("gva", gva, 0, 1 << 64, valid="0 <= gva < 2**64")


@hex_repr
@dataclass(slots=True)
class AccessResult:
    """What one `access()` did: the guest-visible fault or exit, the value, the addresses
    in all four spaces, and the trace of everything in order. `gpa` is where the guest's
    translation led, also when the guest's own rights refused the access; `hva` and `hpa`
    are where the access went, None when it went nowhere (a fault) or to the VMM (MMIO).
    Made by every access, so slotted rather than frozen: read it, never change it."""

    fault: PageFault | GeneralProtection | None
    exit: MmioExit | InternalError | None
    value: int | None
    gpa: int | None
    hva: int | None
    hpa: int | None
    trace: Trace = field(repr=False)


class Processor(ABC):
    """One logical processor. Plain attributes are the control-register bits paging reads."""

    def __init__(self, memory: PhysicalMemory, cpu_model: CpuModel, vpid: int = 0) -> None:
        self.memory = memory
        self.cpu_model = cpu_model
        self._cr3 = 0
        self.cr3_root = 0  # CR3's root-table address, decoded once per MOV to CR3
        self._formats: dict[int, Ia32eFormat] = {}
        self._cr0_wp = True
        self._cr4_pge = True
        self._cr4_pcide = False
        self.cr4_smep = False
        self.cr4_smap = False
        self.cr4_la57 = False
        self.cr4_pke = False
        self.efer_nxe = True
        self.rflags_ac = False
        self.pkru = 0
        self.cpl = 0
        self.vpid = vpid
        self.caches = TranslationCaches()
        self._ep4ta = 0  # the EP4TA that tags cached translations; a vCPU with EPT sets it
        self.forces_wp_nx = False  # hardware CR0.WP and EFER.NX are 1 whatever the OS set
        self._hot: HotState | None = None

    def __setattr__(self, name: str, value: object) -> None:
        """Plain attributes, except that assigning one the `HotState` derives from (a
        control-register bit, the VPID, the EP4TA) drops it, to be derived again."""
        object.__setattr__(self, name, value)
        if name in _HOT_STATE_FIELDS:
            object.__setattr__(self, "_hot", None)

    def hot_state(self) -> HotState:
        """The tag, the controls and the rights memo as the registers stand now."""
        hot = self._hot
        if hot is None:
            tag = Tag(self.vpid, self._cr3 & 0xFFF if self._cr4_pcide else 0, self._ep4ta)
            controls = self._controls(self._cr0_wp, self.efer_nxe)
            hardware = self._controls(True, True) if self.forces_wp_nx else controls
            allowed = _ALLOWED_UNDER.setdefault(interned_key(hardware), {})
            accesses: dict[AccessKind | str, Access] = {}
            if type(self.cpl) is int and 0 <= self.cpl <= 3:  # else `Access.of` says what is wrong
                for kind in AccessKind:
                    accesses[kind] = accesses[kind.value] = Access.of(kind, self.cpl)
            hot = self._hot = HotState(tag, controls, hardware, allowed, accesses)
        return hot

    @property
    def cr0_wp(self) -> bool:
        """CR0.WP: whether supervisor writes obey R/W (SDM Vol 3A 4.6.1)."""
        return self._cr0_wp

    @cr0_wp.setter
    def cr0_wp(self, value: bool) -> None:
        changed = value != self._cr0_wp
        self._cr0_wp = value
        if changed:
            self._cr0_wp_changed()

    def _cr0_wp_changed(self) -> None:
        """A MOV to CR0 that changes WP invalidates nothing on bare metal (SDM 4.10.4.1)."""
        return None

    @property
    def cr4_pge(self) -> bool:
        """CR4.PGE: whether G=1 leaves make global TLB entries."""
        return self._cr4_pge

    @cr4_pge.setter
    def cr4_pge(self, value: bool) -> None:
        """A MOV to CR4 that changes PGE invalidates every TLB entry, global ones too, and
        every paging-structure-cache entry, of every PCID (SDM Vol 3A 4.10.4.1)."""
        changed = value != self._cr4_pge
        self._cr4_pge = value
        if changed:
            self.caches.flush_vpid(self.vpid)

    @property
    def cr4_pcide(self) -> bool:
        """CR4.PCIDE: whether CR3 bits 11:0 are a PCID that tags translations."""
        return self._cr4_pcide

    @cr4_pcide.setter
    def cr4_pcide(self, value: bool) -> None:
        """Setting PCIDE needs CR3[11:0] = 0, or MOV to CR4 raises #GP (SDM Vol 3A 4.10.1);
        clearing it invalidates everything, globals included (4.10.4.1)."""
        if value and not self._cr4_pcide and self._cr3 & 0xFFF:
            raise TwodwalkError(
                f"cr4_pcide=True with CR3[11:0]={self._cr3 & 0xFFF:#x} would raise #GP:"
                " load a CR3 with bits 11:0 clear first"
            )
        changed = value != self._cr4_pcide
        self._cr4_pcide = value
        if changed and not value:
            self.caches.flush_vpid(self.vpid)

    @property
    def cr3(self) -> int:
        """CR3: the guest-physical address of the root table, plus PWT/PCD or a PCID."""
        return self._cr3

    @cr3.setter
    def cr3(self, value: int) -> None:
        """A flushing MOV to CR3: plain assignment never keeps the old PCID's entries, even
        with bit 63 set (use `mov_cr3` for the no-flush form)."""
        self.mov_cr3(value & ~(1 << 63))

    def mov_cr3(self, value: int) -> Trace:
        """MOV to CR3 (SDM Vol 3A 4.10.4.1). Bits above MAXPHYADDR raise #GP, so they are
        rejected. With CR4.PCIDE=0 the load invalidates every non-global entry (PCID 0); with
        PCIDE=1 it invalidates the non-global entries of the new PCID, unless bit 63 is set,
        which asks for no invalidation and is not stored. Returns what the load cost beyond
        that: the VM exit, where a hypervisor intercepts it (`Vcpu`)."""
        self.cr3_root = decode_cr3(value, self.cpu_model, pcide=self.cr4_pcide).root
        self._cr3 = value & ~(1 << 63)
        if not (self.cr4_pcide and value >> 63):
            self.caches.flush_pcid(self.vpid, self._pcid())
        return self._intercepted_cr3_load()

    def _intercepted_cr3_load(self) -> Trace:
        """Nothing intercepts a CR3 load on bare metal."""
        return Trace()

    @property
    def tlb(self) -> Tlb | TwoLevelTlb:
        """The TLB proper (see `caches` for the paging-structure and guest-physical caches)."""
        return self.caches.tlb

    def flush_tlb(self) -> None:
        """Flush every translation this CPU caches: TLB (global entries too) and
        paging-structure caches (INVVPID single-context), so the next access walks."""
        self.invvpid("single")

    def invlpg(self, gva: int) -> Trace:
        """INVLPG: drop the translations of the page holding `gva` for the current PCID,
        and global ones for every PCID (SDM Vol 3A 4.10.4.1). Returns what it cost beyond
        that: the VM exit, where a hypervisor intercepts it (`Vcpu`)."""
        check_int("gva", gva, 0, 1 << 64, valid="0 <= gva < 2**64")
        self.caches.flush_address(self.vpid, self._pcid(), gva)
        return self._intercepted_invlpg(gva)

    def _intercepted_invlpg(self, gva: int) -> Trace:
        """Nothing intercepts INVLPG on bare metal."""
        del gva
        return Trace()

    def invvpid(self, kind: str, vpid: int | None = None, gva: int | None = None) -> None:
        """INVVPID (SDM Vol 3C 31.3): "address" (one linear address of a VPID),
        "single" (a VPID), "single-retaining-globals", or "all" (every VPID but 0)."""
        check_choice("kind", kind, ("address", "single", "single-retaining-globals", "all"))
        target = self.vpid if vpid is None else vpid
        if kind == "address":
            self.caches.flush_address(target, None, _address_for(gva))
        elif kind == "all":
            self.caches.flush_all_vpids()
        else:
            self.caches.flush_vpid(target, keep_global=kind == "single-retaining-globals")

    def invpcid(self, kind: str, pcid: int = 0, gva: int | None = None) -> None:
        """INVPCID (SDM Vol 2 "INVPCID", Vol 3A 4.10.4.1): "address" (type 0: one page of a
        PCID, global entries kept), "single" (type 1: a PCID, globals kept), "all" (type 2:
        every PCID, globals too) or "all-but-globals" (type 3)."""
        check_choice("kind", kind, ("address", "single", "all", "all-but-globals"))
        check_int("pcid", pcid, 0, 1 << 12, valid="a 12-bit PCID")
        if kind == "address":
            self.caches.flush_pcid_address(self.vpid, pcid, _address_for(gva))
        elif kind == "single":
            self.caches.flush_pcid(self.vpid, pcid)
        else:
            self.caches.flush_vpid(self.vpid, keep_global=kind == "all-but-globals")

    def _pcid(self) -> int:
        return self._cr3 & 0xFFF if self._cr4_pcide else 0

    def _tag(self) -> Tag:
        """What the caches tag entries with now: VPID, PCID and EP4TA (0 without EPT)."""
        return self.hot_state().tag

    def controls(self) -> PagingControls:
        """The paging controls as the bits stand now (one value per distinct setting)."""
        return self.hot_state().controls

    def hardware_controls(self) -> PagingControls:
        """The controls the processor's own walks and TLB checks obey: the guest's, except
        where the hypervisor forces CR0.WP and EFER.NX to 1 in hardware (`forces_wp_nx`: a
        vCPU under shadow paging, see `Vcpu`)."""
        return self.hot_state().hardware_controls

    def _controls(self, cr0_wp: bool, efer_nxe: bool) -> PagingControls:
        key = (
            cr0_wp,
            self.cr4_la57,
            self.cr4_smep,
            self.cr4_smap,
            self.cr4_pke,
            efer_nxe,
            self.rflags_ac,
            self.pkru,
        )
        controls = _CONTROLS.get(key)
        if controls is None:
            controls = _CONTROLS[key] = PagingControls(*key)
        return controls

    def walk_tables(self, tables: TableMemory) -> TableMemory:
        """How this CPU's walks read tables in physical memory: through the page-walk cache
        in the AMD-style model, straight from memory otherwise."""
        if self.caches.amd:
            return PageWalkCacheTables(tables, self.caches.pwc)
        return tables

    def guest_format(self, controls: PagingControls) -> Ia32eFormat:
        """The entry format `controls` select on this CPU, looked up once per controls value."""
        fmt = self._formats.get(interned_key(controls))
        if fmt is None:
            fmt = self._formats[interned_key(controls)] = controls.format(self.cpu_model)
        return fmt

    def access(
        self,
        gva: int,
        kind: AccessKind | str,
        value: int | None = None,
        *,
        tlb_missed: bool = False,
        trace: Trace | None = None,
    ) -> AccessResult:
        """Run one 8-byte access at `gva`, retrying after whatever fixed a fault, and
        report it. `tlb_missed`: the caller has just seen `tlb_access` fail, so the first
        attempt need not look in the TLB again. `trace`: where the events go (a fresh
        `Trace` by default; a `trace.Counts` keeps totals only)."""
        check_int("gva", gva, 0, 1 << 64, valid="0 <= gva < 2**64")
        access = Access.of(kind, self.cpl)
        if (gva & 0xFFF) + ACCESS_SIZE > 0x1000:
            raise TwodwalkError(
                f"gva={gva:#x}: an {ACCESS_SIZE}-byte access there would cross a"
                " 4 KiB page boundary; use an address with (gva & 0xfff) <= 0xff8"
            )
        if access.is_write:
            check_int("value", value, 0, 1 << 64, valid="a 64-bit value for a write")
        elif value is not None:
            raise TwodwalkError(
                f"value={value!r} is only for writes; a {access.kind.value} takes no value"
            )
        if trace is None:
            trace = Trace()
        for attempt in range(MAX_ATTEMPTS):
            if attempt:
                trace.add(Retry(attempt))
            result = (
                None if tlb_missed and not attempt else self._tlb_hit(gva, access, value, trace)
            )
            if result is None:
                result = self._attempt(gva, access, value, trace)
            if result is not None:
                return result
        raise TwodwalkError(f"access to {gva:#x} did not complete in {MAX_ATTEMPTS} attempts")

    @abstractmethod
    def _attempt(
        self, gva: int, access: Access, value: int | None, trace: Trace
    ) -> AccessResult | None:
        """One try of the access after a TLB miss: a result, or None to retry."""

    def _hva_of(self, gpa: int) -> int | None:
        """The host-virtual address of a guest-physical one, where there is a VMM."""
        del gpa
        return None

    def _psc_start(
        self, fmt: EntryFormat, gva: int, trace: Trace
    ) -> tuple[WalkStart | None, dict[int, tuple[int, Rights | None]]]:
        """The deepest paging-structure cache entry for `gva`: where the walk can begin
        (SDM Vol 3A 4.10.3.2: the PDE cache first, then the PDPTE and PML4E caches), and the
        table it names: its GPA page -> (HPA page, EPT rights of that page). The AMD-style
        model has none: its walks start at the root."""
        if self.caches.amd:
            return None, {}
        found = deepest_table(self.caches.psc, self._tag(), gva, fmt.levels)
        if found is None:
            return None, {}
        level, entry = found
        trace.add(CacheHit(f"paging-structure cache L{level}", entry.page, entry.table_hpa))
        start = WalkStart(level - 1, entry.table, entry.rights)
        return start, {entry.table: (entry.table_hpa, entry.ept_rights)}

    def _fill_psc(self, record: WalkRecord) -> None:
        """Cache, for each table the walk went through, the address of the table below it
        and the rights so far (keyed by the address bits that chose them); in the AMD-style
        model, keep the walk's upper-level entries in the page-walk cache instead."""
        if self.caches.amd:
            self.caches.pwc.fill(record)
        else:
            fill_paging_structure_caches(self.caches.psc, self._tag(), record)

    def _tlb_hit(
        self, gva: int, access: Access, value: int | None, trace: Trace
    ) -> AccessResult | None:
        """Serve the access from the TLB if an entry allows it (see `_usable_entry`)."""
        entry = self._usable_entry(gva, access, self._hot or self.hot_state())
        if entry is None:
            return None
        offset = gva & (entry.page_size - 1)
        trace.add(TlbHit(entry.page, entry.page_size, entry.frame))
        data = self._data_access(entry.frame + offset, access, value, trace)
        gpa = None if entry.gpa_page is None else entry.gpa_page + offset
        hva = None if gpa is None else self._hva_of(gpa)
        return self._result(trace, value=data, gpa=gpa, hva=hva, hpa=entry.frame + offset)

    def _usable_entry(self, gva: int, access: Access, hot: HotState) -> TlbEntry | None:
        """The TLB entry for `gva` if it allows the access. An entry whose rights refuse
        it, or a write through a clean entry, is dropped and the CPU walks (SDM Vol 3A
        4.10.4.1: a page fault invalidates the address's TLB entries)."""
        entry = self.caches.tlb.lookup(hot.tag, gva)
        if entry is None:
            return None
        key = entry.check_key << 4 | access.code  # everything the check reads, as one int
        allowed = hot.allowed.get(key)
        if allowed is None:
            allowed = hot.allowed[key] = self._rights_allow(entry, access, hot.hardware_controls)
        if not allowed or (access.kind is AccessKind.WRITE and not entry.dirty):
            self.tlb.invalidate(lambda e: e is not entry)
            return None
        return entry

    @staticmethod
    def _rights_allow(entry: TlbEntry, access: Access, controls: PagingControls) -> bool:
        """Check cached rights as the walk would have: the leaf's rights and protection
        key under the hardware controls, then the EPT rights."""
        refused = controls.rules.violation(access, entry.rights, entry.leaf)
        if entry.ept_rights is not None and refused is None:
            refused = EptAccessRules().violation(access, entry.ept_rights, 0)
        return refused is None

    def tlb_access(self, gva: int, kind: AccessKind | str, value: int | None = None) -> bool:
        """The counts-only fast path: do the access if the TLB can serve it, recording
        nothing, and say whether it did (False: call `access`, which walks and traces)."""
        hot = self._hot or self.hot_state()
        access = hot.accesses.get(kind) or Access.of(kind, self.cpl)
        if type(gva) is not int or not 0 <= gva < 1 << 64 or (gva & 0xFFF) > 0xFF8:
            return False
        write = access.kind is AccessKind.WRITE
        if write and (type(value) is not int or not 0 <= value < 1 << 64):
            return False
        entry = self._usable_entry(gva, access, hot)
        if entry is None:
            return False
        if write:
            assert value is not None
            hpa = entry.frame + (gva & (entry.page_size - 1))
            self.memory.write(hpa, value.to_bytes(ACCESS_SIZE, "little"))
        return True

    def _fill_tlb(
        self,
        gva: int,
        page_size: int,
        hpa: int,
        gpa: int | None,
        walk_leaf: WalkRecord,
        ept_rights: Rights | None,
    ) -> None:
        """Cache what a successful walk found, at the smaller of the two page sizes (a
        combined mapping cannot be larger than either of its translations)."""
        translation = walk_leaf.outcome
        assert isinstance(translation, Translation)
        leaf = walk_leaf.leaf
        mask = page_size - 1
        global_page = bool(leaf & PTE_GLOBAL) and self._cr4_pge
        tag = self._tag()
        self.caches.tlb.insert(
            TlbEntry(
                Tag(tag.vpid, ANY_PCID, tag.ep4ta) if global_page else tag,
                gva & ~mask,
                page_size,
                hpa & ~mask,
                None if gpa is None else gpa & ~mask,
                translation.rights,
                ept_rights,
                leaf,
                bool(leaf & PTE_DIRTY),
                global_page,
            )
        )

    def _data_access(self, hpa: int, access: Access, value: int | None, trace: Trace) -> int:
        memory = self.memory
        if access.is_write:
            assert value is not None
            memory.write(hpa, value.to_bytes(ACCESS_SIZE, "little"))
            data = value
        elif hpa & 7:
            data = int.from_bytes(memory.read(hpa, ACCESS_SIZE), "little")
        else:
            data = memory.read_u64(hpa)  # aligned: one frame, one unpack
        trace.add(DataAccess(hpa, access.kind.value, data))
        return data if not access.is_write else value or 0

    @staticmethod
    def _result(
        trace: Trace,
        *,
        fault: PageFault | GeneralProtection | None = None,
        exit: MmioExit | InternalError | None = None,
        value: int | None = None,
        gpa: int | None = None,
        hva: int | None = None,
        hpa: int | None = None,
    ) -> AccessResult:
        """A refused access still has the GPA its guest walk reached; it has no HVA or HPA,
        since it went nowhere."""
        if fault is not None and gpa is None:
            gpa = trace.refused_gpa()
        return AccessResult(fault, exit, value, gpa, hva, hpa, trace)
