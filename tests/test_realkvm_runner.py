"""The guest runtime on real KVM (twodwalk.realkvm.runtime): one access under hand-built page
tables, checked against the SDM; skipped with the reason where there is no usable /dev/kvm."""

from __future__ import annotations

import dataclasses
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from twodwalk import realkvm
from twodwalk.engine.kvm.memslots import KvmError
from twodwalk.errors import TwodwalkError
from twodwalk.realkvm import runtime
from twodwalk.realkvm.device import KvmExitError
from twodwalk.realkvm.runtime import Controls, Observed, RealRunner, Step

REASON = realkvm.unavailable_reason()
needs_kvm = pytest.mark.skipif(REASON is not None, reason=f"no usable /dev/kvm: {REASON}")

P, RW, US, A, D = 1, 2, 4, 0x20, 0x40
XD = 1 << 63
PML4, PDPT, PD, PT = 0x1000, 0x2000, 0x3000, 0x4000
DATA_GVA, DATA_GPA = 0x40_0000, 0x80_0000
CODE_GVA, CODE_GPA = 0x40_1000, 0x80_1000
MMIO_GPA = 0x4000_0000  # beyond the 32 MiB memslot
VALUE = 0x1122_3344_5566_7788
# Where the four entries of DATA_GVA's walk live (PD index 2, PT index 0).
ENTRIES = {"PML4E": PML4, "PDPTE": PDPT, "PDE": PD + 8 * 2, "PTE": PT}
CPL0 = Controls(
    cr0_wp=False, cr4_smep=False, cr4_smap=False, efer_nxe=False, rflags_ac=False, cpl=0
)
CPL3 = Controls(
    cr0_wp=False, cr4_smep=False, cr4_smap=False, efer_nxe=False, rflags_ac=False, cpl=3
)
NXE = Controls(cr0_wp=False, cr4_smep=False, cr4_smap=False, efer_nxe=True, rflags_ac=False, cpl=0)


def image(
    data_pte: int = DATA_GPA | P | RW | US, code_pte: int = CODE_GPA | P | RW | US
) -> dict[int, bytes]:
    """PML4 -> PDPT -> PD -> PT for DATA_GVA (holding VALUE) and CODE_GVA (an int3)."""
    ram = bytearray(CODE_GPA + 0x1000)
    struct.pack_into("<Q", ram, PML4, PDPT | P | RW | US)
    struct.pack_into("<Q", ram, PDPT, PD | P | RW | US)
    struct.pack_into("<Q", ram, PD + 8 * 2, PT | P | RW | US)
    struct.pack_into("<Q", ram, PT, data_pte)
    struct.pack_into("<Q", ram, PT + 8, code_pte)
    struct.pack_into("<Q", ram, DATA_GPA, VALUE)
    ram[CODE_GPA] = 0xCC
    pages = {a: bytes(ram[a : a + 0x1000]) for a in range(0, len(ram), 0x1000)}
    return {a: page for a, page in pages.items() if any(page)}


def entry(seen: Observed, name: str) -> int:
    return seen.read_u64(ENTRIES[name])


@pytest.fixture(scope="module")
def runner() -> Iterator[RealRunner]:
    made = RealRunner()
    yield made
    made.close()


@needs_kvm
def test_cpuid_is_read(runner: RealRunner) -> None:
    assert 36 <= runner.cpuid_maxphyaddr <= 52
    assert isinstance(runner.cpuid_gbpages, bool)
    assert isinstance(runner.cpuid_la57, bool)


@needs_kvm
def test_cpl0_read_returns_the_value_and_sets_accessed_bits(runner: RealRunner) -> None:
    seen = runner.run(image(), PML4, DATA_GVA, "read", CPL0)
    assert (seen.vector, seen.value, seen.mmio, seen.fetched) == (None, VALUE, None, False)
    for name in ENTRIES:
        assert entry(seen, name) & A, f"{name} accessed"
        assert not entry(seen, name) & D, f"{name} not dirty"


@needs_kvm
def test_write_sets_dirty_and_stores_the_value(runner: RealRunner) -> None:
    seen = runner.run(image(), PML4, DATA_GVA, "write", CPL3, value=0xFEED_F00D)
    assert (seen.vector, seen.value) == (None, None)
    assert entry(seen, "PTE") & (A | D) == A | D
    assert seen.read_u64(DATA_GPA) == 0xFEED_F00D


@needs_kvm
@pytest.mark.parametrize(("kind", "error_code"), [("read", 0), ("write", 2)])
def test_not_present_pte_faults(runner: RealRunner, kind: str, error_code: int) -> None:
    seen = runner.run(image(data_pte=DATA_GPA | RW | US), PML4, DATA_GVA, kind, CPL0)
    assert (seen.vector, seen.error_code, seen.cr2) == (14, error_code, DATA_GVA)


@needs_kvm
def test_cpl3_read_of_a_supervisor_page_faults(runner: RealRunner) -> None:
    seen = runner.run(image(data_pte=DATA_GPA | P | RW), PML4, DATA_GVA, "read", CPL3)
    assert (seen.vector, seen.error_code, seen.cr2) == (14, 5, DATA_GVA)


@needs_kvm
@pytest.mark.parametrize("controls", [CPL0, CPL3])
def test_fetch_runs_the_int3(runner: RealRunner, controls: Controls) -> None:
    seen = runner.run(image(), PML4, CODE_GVA, "fetch", controls)
    assert (seen.vector, seen.fetched, seen.value) == (None, True, None)


@needs_kvm
def test_fetch_from_an_xd_page_faults(runner: RealRunner) -> None:
    xd = image(code_pte=CODE_GPA | P | RW | US | XD)
    seen = runner.run(xd, PML4, CODE_GVA, "fetch", NXE)
    assert (seen.vector, seen.error_code, seen.cr2, seen.fetched) == (14, 0x11, CODE_GVA, False)


@needs_kvm
@pytest.mark.parametrize("kind", ["read", "write", "fetch"])
def test_non_canonical_gva_is_a_general_protection_fault(runner: RealRunner, kind: str) -> None:
    seen = runner.run(image(), PML4, 0x0000_8000_0000_0000, kind, CPL0)
    assert (seen.vector, seen.error_code, seen.cr2) == (13, 0, None)


@needs_kvm
@pytest.mark.parametrize(("kind", "controls"), [("read", CPL0), ("write", CPL3)])
def test_a_gpa_outside_the_memslot_is_mmio(
    runner: RealRunner, kind: str, controls: Controls
) -> None:
    seen = runner.run(image(data_pte=MMIO_GPA | P | RW | US), PML4, DATA_GVA, kind, controls, 7)
    assert seen.vector is None
    assert seen.mmio is not None
    phys_addr, length, is_write, data = seen.mmio
    assert (phys_addr, length, is_write) == (MMIO_GPA, 8, kind == "write")
    assert data == ((7).to_bytes(8, "little") if is_write else b"")


REUSE_CASES = [
    (image(), DATA_GVA, "read", CPL0),
    (image(), DATA_GVA, "write", CPL3),
    (image(data_pte=DATA_GPA | US), DATA_GVA, "write", CPL0),
    (image(data_pte=DATA_GPA | P | US), DATA_GVA, "write", CPL3),
    (image(data_pte=MMIO_GPA | P | RW | US), DATA_GVA, "read", CPL0),
    (image(), CODE_GVA, "fetch", CPL0),
    (image(), CODE_GVA, "fetch", CPL3),
]


@needs_kvm
def test_a_reused_runner_answers_like_a_fresh_one(runner: RealRunner) -> None:
    for number, (ram, gva, kind, controls) in enumerate(REUSE_CASES):
        fresh = RealRunner()
        try:
            expected = fresh.run(ram, PML4, gva, kind, controls, value=0xAB)
        finally:
            fresh.close()
        other = REUSE_CASES[(number + 3) % len(REUSE_CASES)]
        first = runner.run(ram, PML4, gva, kind, controls, value=0xAB)
        runner.run(other[0], PML4, other[1], other[2], other[3], value=0xCD)
        with pytest.raises(KvmError):  # reserved CR3 bit: KVM_SET_SREGS refuses it
            runner.run(ram, PML4 | 1 << 62, gva, kind, controls)
        with pytest.raises(KvmExitError):  # runs VALUE as code, which faults elsewhere
            runner.run(image(), PML4, DATA_GVA, "fetch", controls)
        second = runner.run(ram, PML4, gva, kind, controls, value=0xAB)
        assert first == expected, f"case {number}: first run on a used runner"
        assert second == expected, f"case {number}: run after other cases"


@needs_kvm
def test_bad_arguments_are_refused(runner: RealRunner) -> None:
    with pytest.raises(TwodwalkError, match="kind"):
        runner.run(image(), PML4, DATA_GVA, "exec", CPL0)
    with pytest.raises(TwodwalkError, match="cpl"):
        runner.run(image(), PML4, DATA_GVA, "read", dataclasses.replace(CPL0, cpl=1))
    with pytest.raises(TwodwalkError, match="cr3"):
        runner.run(image(), runtime.RUNTIME_GPA, DATA_GVA, "read", CPL0)


@needs_kvm
def test_a_sequence_keeps_state_between_steps(runner: RealRunner) -> None:
    """One run: a read, a write that must set D, an MMIO write, a fault the run survives,
    a MOV to CR3 and INVLPG; each step reports on its own."""
    steps = [
        Step("read", DATA_GVA),
        Step("write", DATA_GVA, 0xFEED),
        Step("invlpg", DATA_GVA),
        Step("read", DATA_GVA),
        Step("write", CODE_GVA + 0x1000, 5),  # PTE 2 is not present
        Step("cr3", value=PML4),
        Step("read", DATA_GVA),
    ]
    seen = runner.run_sequence(image(), PML4, steps, CPL0)
    assert [(o.vector, o.error_code, o.value) for o in seen] == [
        (None, None, VALUE),
        (None, None, None),
        (None, None, None),
        (None, None, 0xFEED),
        (14, 2, None),
        (None, None, None),
        (None, None, 0xFEED),
    ]
    assert entry(seen[0], "PTE") & (A | D) == A
    assert entry(seen[1], "PTE") & (A | D) == A | D
    mmio = runner.run_sequence(image(data_pte=MMIO_GPA | P | RW), PML4, steps[:2], CPL0)
    assert [o.mmio for o in mmio] == [
        (MMIO_GPA, 8, False, b""),
        (MMIO_GPA, 8, True, (0xFEED).to_bytes(8, "little")),
    ]


@needs_kvm
def test_bad_sequences_are_refused(runner: RealRunner) -> None:
    with pytest.raises(TwodwalkError, match="CPL 0"):
        runner.run_sequence(image(), PML4, [Step("read", DATA_GVA)], CPL3)
    with pytest.raises(TwodwalkError, match="step kind"):
        runner.run_sequence(image(), PML4, [Step("fetch", CODE_GVA)], CPL0)
    with pytest.raises(TwodwalkError, match="number of steps"):
        runner.run_sequence(image(), PML4, [], CPL0)


def test_embedded_code_is_the_assembled_source(tmp_path: Path) -> None:
    assembler, objcopy, nm = (shutil.which(name) for name in ("as", "objcopy", "nm"))
    if assembler is None or objcopy is None or nm is None:
        pytest.skip("GNU binutils (as, objcopy, nm) not installed: cannot re-assemble runtime.S")
    source = Path(runtime.__file__).with_name("runtime.S")
    obj, binary = tmp_path / "runtime.o", tmp_path / "runtime.bin"
    subprocess.run([assembler, "--64", "-o", obj, source], check=True)
    subprocess.run([objcopy, "-O", "binary", "-j", ".text", obj, binary], check=True)
    assert binary.read_bytes() == runtime.RUNTIME_CODE
    listing = subprocess.run([nm, obj], check=True, capture_output=True, text=True).stdout
    symbols = {name: int(address, 16) for address, _, name in map(str.split, listing.splitlines())}
    assert {kind: symbols[kind] for kind in runtime.STUBS} == runtime.STUBS
    assert {kind: symbols[f"step_{kind}"] for kind in runtime.STEPS} == runtime.STEPS
    assert symbols["next"] == runtime.SEQUENCE
    assert (symbols["DONE_PORT"], symbols["EXCEPTION_PORT"], symbols["STEP_PORT"]) == (
        runtime.DONE_PORT,
        runtime.EXCEPTION_PORT,
        runtime.STEP_PORT,
    )


def test_a_report_headline_accounts_for_every_case() -> None:
    """Notebook 90 once printed "paging cases: 300, agree: 299, disagree: 0": the missing case
    was a known quirk, explained only further down. The headline counts it."""
    from twodwalk.realkvm.report import headline

    assert headline("paging cases", 300, 299, 0, None) == (
        "paging cases: 300, agree: 299, known quirk: 1, disagree: 0"
    )
    assert headline("memslot calls", 5, 4, 1) == "memslot calls: 5, agree: 4, disagree: 1"


def test_the_notebook_describes_the_reader_s_kvm_not_ours() -> None:
    """Notebook 90 prints what the reader's /dev/kvm is: its module and whether paging is
    two-dimensional in hardware or shadowed, so a quirk of one flavour is never presented as
    every machine's."""
    from twodwalk.realkvm.device import KvmFlavour

    shadow = KvmFlavour("kvm_pvm", False, 1, 32764, True, False).describe()
    assert shadow.splitlines()[0] == "KVM module: kvm_pvm"
    assert "guest paging shadowed by KVM in software (no EPT or NPT here)" in shadow
    ept = KvmFlavour("kvm_intel", True, 2, 32764, True, True).describe()
    assert "two-dimensional paging in hardware (EPT or NPT)" in ept
    assert "address spaces: 2" in ept and "MMIO SPTE caching: yes" in ept
    here = realkvm.this_machine()
    reason = realkvm.unavailable_reason()
    assert here == f"no real KVM here: {reason}" if reason else here.startswith("KVM module: ")
