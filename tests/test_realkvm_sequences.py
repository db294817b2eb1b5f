"""Sequences of steps in one guest run on real KVM (twodwalk.realkvm.sequences), against the
SDM's walk and the engine's shadow-paging machine; skipped with the reason where there is no
usable /dev/kvm. Hand-built cases say what each side must see; the fuzzer runs random ones."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from twodwalk import realkvm
from twodwalk.realkvm import sequences as seq
from twodwalk.realkvm.runtime import Controls, RealRunner, Step

REASON = realkvm.unavailable_reason()
needs_kvm = pytest.mark.skipif(REASON is not None, reason=f"no usable /dev/kvm: {REASON}")

P, RW, US, A, D = 1, 2, 4, 0x20, 0x40
DATA = 1 << 39  # PML4 slot 1; PDPT, PD and PT index 0: data page i at DATA + i pages
SELF = 2 << 39  # PML4 slot 2: the self-map of the PML4, PDPT, PD and PT at SELF + 0..3 pages
PT = seq.DATA_TABLES[1]
PT_GFN = PT >> 12
TABLE_GFNS = frozenset({seq.PML4 >> 12, seq.DATA_TABLES[3] >> 12, seq.DATA_TABLES[2] >> 12, PT_GFN})
PATTERN = bytes(range(256)) * 16
WP1 = Controls(cr0_wp=True, cr4_smep=False, cr4_smap=False, efer_nxe=True, rflags_ac=False, cpl=0)


def page(i: int) -> int:
    return seq.DATA_GPA + i * 0x1000


def pte_store(i: int, value: int) -> Step:
    """A store to data PTE i through the self-map (PT is the fourth page mapped there)."""
    return Step("write", SELF + 3 * 0x1000 + 8 * i, value)


def case(
    ptes: dict[int, int],
    steps: list[Step],
    controls: Controls = WP1,
    loaded: tuple[int, ...] = (0, 3),
) -> seq.SequenceCase:
    """Both chains with A and D clear above the leaves, data PTE i = `ptes[i]` (the frame is
    data page i unless given), data pages `loaded` filled with PATTERN (a page's number in
    its first byte), the others never written; dirty logging on."""
    entries = {
        "data PML4E": (seq.PML4 + 8, seq.DATA_TABLES[3] | P | RW),
        "data PDPTE": (seq.DATA_TABLES[3], seq.DATA_TABLES[2] | P | RW),
        "data PDE": (seq.DATA_TABLES[2], PT | P | RW),
        "self-map PML4E": (seq.PML4 + 16, seq.SELF_TABLES[3] | P | RW),
        "self-map PDPTE": (seq.SELF_TABLES[3], seq.SELF_TABLES[2] | P | RW),
        "self-map PDE": (seq.SELF_TABLES[2], seq.SELF_TABLES[1] | P | RW),
    }
    for i, flags in ptes.items():
        address = flags & 0x000F_FFFF_FFFF_F000 or page(i)
        entries[f"data PTE {i}"] = (PT + 8 * i, address | flags & 0xFFF)
    for i, table in enumerate(seq.SELF_MAPPED):
        entries[f"self-map PTE {i}"] = (seq.SELF_TABLES[1] + 8 * i, table | P | RW | A | D)
    ram: dict[int, bytearray] = {}
    for gpa, value in entries.values():
        frame = ram.setdefault(gpa & ~0xFFF, bytearray(0x1000))
        frame[gpa & 0xFFF : (gpa & 0xFFF) + 8] = value.to_bytes(8, "little")
    for i in loaded:
        ram[page(i)] = bytearray(bytes([i]) + PATTERN[1:])
    return seq.SequenceCase(
        0,
        controls,
        True,
        tuple((a, bytes(p)) for a, p in sorted(ram.items())),
        tuple((name, gpa) for name, (gpa, _) in entries.items()),
        tuple(DATA + i * 0x1000 for i in range(seq.DATA_PAGES)),
        SELF,
        tuple(steps),
        ("",) * len(steps),
    )


@pytest.fixture(scope="module")
def runner() -> Iterator[RealRunner]:
    made = RealRunner(seq.RAM_SIZE)
    yield made
    made.close()


def run(made: RealRunner, c: seq.SequenceCase) -> tuple[list[seq.StepAnswer], seq.SequenceReport]:
    """Real KVM's answers, and the report of comparing them with the SDM and the engine."""
    real = seq.real_answers(c, made)
    report = seq.SequenceReport()
    seq.compare(c, real, made.cpu_model(), report)
    return real, report


def agree(report: seq.SequenceReport) -> None:
    assert report.disagreements == [], "\n".join(d.text for d in report.disagreements)
    assert report.engine_defects == {}, report.engine_defects


@needs_kvm
@pytest.mark.parametrize("log_dirty", [True, False], ids=["dirty-log", "no-dirty-log"])
def test_write_after_read_and_a_wp0_write_land_in_their_own_pages(
    runner: RealRunner, log_dirty: bool
) -> None:
    """A clean PTE is shadowed read-only, so the write after a read traps and KVM sets D
    (FNAME(protect_clean_gpte), FNAME(update_accessed_dirty_bits)); a CR0.WP=0 supervisor
    write to a read-only, never-written page lands in that page, and another never-written
    page still reads 0 (not the host's zero page, written)."""
    c = case(
        {0: P | RW, 1: P, 2: P | RW},
        [
            Step("read", DATA + 0xE00),
            Step("write", DATA + 0xE00, 0x1111),
            Step("read", DATA + 0x1E08),
            Step("cr0", value=0),
            Step("write", DATA + 0x1E08, 0x2222),
            Step("read", DATA + 0x2E10),
            Step("read", DATA + 0x1E08),
        ],
    )
    real, report = run(runner, dataclasses.replace(c, log_dirty=log_dirty))
    agree(report)
    assert [(r.vector, r.value) for r in real] == [
        (None, int.from_bytes(PATTERN[0xE00:0xE08], "little")),
        (None, None),
        (None, 0),
        (None, None),
        (None, None),
        (None, 0),
        (None, 0x2222),
    ]
    pte = [dict(zip((n for n, _ in c.entries), r.entries, strict=True)) for r in real]
    assert [pte[s]["data PTE 0"] & (A | D) for s in (0, 1)] == [A, A | D]
    assert [pte[s]["data PTE 1"] & (A | D) for s in (2, 4)] == [A, A | D]
    if not log_dirty:
        return
    # The walker's A/D writes and the written data pages, step by step.
    assert [r.dirty for r in real] == [
        TABLE_GFNS,
        frozenset({PT_GFN, page(0) >> 12}),
        frozenset({PT_GFN}),
        frozenset(),
        frozenset({PT_GFN, page(1) >> 12}),
        frozenset({PT_GFN}),
        frozenset(),
    ]


@needs_kvm
def test_self_map_stores_are_seen_after_invlpg_or_a_cr3_reload(runner: RealRunner) -> None:
    """Stores to a shadowed page table trap and are emulated (kvm_mmu_track_write), which
    dirties the table page; after INVLPG or MOV to CR3 the access uses the new entry
    (SDM Vol. 3A 4.10.4.1): read-only, then another frame, then not present."""
    c = case(
        {0: P | RW | A | D},
        [
            Step("read", DATA + 0xE00),
            pte_store(0, page(0) | P | A),
            Step("invlpg", DATA),
            Step("write", DATA + 0xE00, 1),
            pte_store(0, page(3) | P | RW | A | D),
            Step("cr3", value=seq.PML4),
            Step("read", DATA + 0xE00),
            pte_store(0, 0),
            Step("invlpg", DATA),
            Step("read", DATA + 0xE00),
        ],
    )
    real, report = run(runner, c)
    agree(report)
    assert [(r.vector, r.error_code, r.value) for r in real] == [
        (None, None, int.from_bytes(PATTERN[0xE00:0xE08], "little")),
        (None, None, None),
        (None, None, None),
        (14, 3, None),
        (None, None, None),
        (None, None, None),
        (None, None, int.from_bytes(PATTERN[0xE00:0xE08], "little")),
        (None, None, None),
        (None, None, None),
        (14, 0, None),
    ]
    assert real[9].cr2 == DATA + 0xE00
    for store in (1, 4, 7):
        dirty = real[store].dirty
        assert dirty is not None and PT_GFN in dirty, f"step {store}: the PT page is dirty"


@needs_kvm
def test_fuzzed_sequences_agree_with_real_kvm() -> None:
    report = realkvm.sequence_fuzz(100, seed=1)
    assert report.disagreements == [], report.table()
    for category in ("read ok", "write ok", "write #PF protection", "cr0 wp=0", "invlpg", "cr3"):
        assert report.agree.get(category, 0) > 0, f"no {category!r} step in {report.agree}"
    for note in (
        seq.WP0_WRITE,
        "write after read",
        "self-map store",
        "access through an edited, invalidated entry",
        "dirty-log round",
    ):
        assert report.notes.get(note, 0) > 0, f"no {note!r} step in {report.notes}"


@needs_kvm
def test_engine_wp0_write_with_smep_and_no_nx(runner: RealRunner) -> None:
    """Real KVM completes the write (svm.c svm_set_efer: shadow paging assumes NX): the
    supervisor-writable shadow entry made for WP=0 loses execute under SMEP, and its XD bit
    is not reserved because the hardware runs with EFER.NX=1. (Found by the fuzzer in the
    engine, which retried the write for ever.)"""
    controls = Controls(
        cr0_wp=False, cr4_smep=True, cr4_smap=False, efer_nxe=False, rflags_ac=False, cpl=0
    )
    real, report = run(runner, case({0: P}, [Step("write", DATA + 0xE00, 7)], controls))
    assert (real[0].vector, real[0].data[0][0xE00]) == (None, 7)
    agree(report)


@needs_kvm
def test_wp0_shadow_entries_do_not_serve_wp1(runner: RealRunner) -> None:
    """Real KVM: #PF 3 on the second write, because CR0.WP is part of the shadow pages' role
    (kvm_mmu_page_role.cr0_wp): the writable entry made for WP=0 is not used under WP=1,
    even once a CR3 reload has emptied the TLB. (Found by the fuzzer in the engine.)"""
    steps = [
        Step("cr0", value=0),
        Step("write", DATA + 0xE00, 1),
        Step("cr0", value=1),
        Step("cr3", value=seq.PML4),
        Step("write", DATA + 0xE00, 2),
    ]
    real, report = run(runner, case({0: P}, steps))
    assert (real[4].vector, real[4].error_code) == (14, 3)
    agree(report)
