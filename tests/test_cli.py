"""The `twodwalk` command, run in-process through `main(argv)`: what each subcommand prints,
its JSON, and clean errors (one `twodwalk: error:` line, exit 1 or 2, never a traceback)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from twodwalk import exercises
from twodwalk.cli import find_notebooks, lab_command, main
from twodwalk.errors import TwodwalkError
from twodwalk.scenarios import SCENARIOS, Scenario, scenario

TOY_CODE = "0x8080604000"  # the toy scenario's code page: indices 1, 2, 3, 4
QEMU_HEAP = 0x4100000  # GPA of the qemu scenario's heap, in memslot 1 above the PCI hole
HOLE = 0x3000000
Output = tuple[int, str, str]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> Output:
    status = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return status, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str, status: int = 0) -> dict[str, object]:
    exit_status, out, _ = run(capsys, *argv, "--json")
    assert exit_status == status
    data = json.loads(out)
    assert isinstance(data, dict)
    return data


def untouched_toy(tmp_path: Path) -> str:
    """The toy scenario without its accesses: every page's next access is a first touch."""
    path = tmp_path / "untouched.json"
    path.write_text(replace(SCENARIOS["toy"], accesses=()).to_json())
    return str(path)


def test_walk_dumps_the_24_references_of_a_cold_4x4_walk(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status, out, _ = run(capsys, "walk", TOY_CODE, "--scenario", "toy", "--cpl", "3")
    assert status == 0
    lines = out.splitlines()
    assert lines[0].startswith("scenario toy (as built, after its own 2 accesses):")
    assert "this access: no VM exit" in lines[1], "the scenario's own fetch touched the page"
    assert "cold walk" in lines[2] and "24 memory references" in lines[2]
    assert lines[2].endswith("with every translation cache switched off: 24")
    numbered = [line.split()[0] for line in lines[3:27]]
    assert numbered == [str(n) for n in range(1, 25)]
    assert "(final GPA)" in lines[26]
    route = lines.index("gpa: 0x5000")
    assert lines[route + 2].startswith("Host physical address for 0x5000")
    assert lines[route + 3] == "why this access ended so:"
    assert lines[route + 4].startswith("  The access completed: value 0x0")


def test_walk_json_lists_the_references(capsys: pytest.CaptureFixture[str]) -> None:
    data = run_json(capsys, "walk", TOY_CODE, "--scenario", "toy", "--kind", "fetch")
    refs = data["references"]
    assert isinstance(refs, list) and len(refs) == 24
    assert refs[0] == {
        "number": 1,
        "dimension": "ept",
        "entry": "EPT PML4E",
        "guest_level": 4,
        "ept_level": 4,
        "address": refs[0]["address"],
        "value": refs[0]["value"],
    }
    assert refs[4]["dimension"] == "guest" and refs[4]["entry"] == "PML4E"
    assert (data["gva"], data["gpa"], data["kind"], data["fault"]) == (
        "0x8080604000",
        "0x5000",
        "fetch",
        None,
    )
    this = data["this_access"]
    assert isinstance(this, dict) and this["vm_exits"] == []
    assert data["uncached_references"] == 24


def test_a_first_touch_takes_the_exits_kvm_needs_to_fill_the_ept(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    untouched = untouched_toy(tmp_path)
    status, out, _ = run(capsys, "walk", TOY_CODE, "--scenario", untouched, "--trace")
    lines = out.splitlines()
    assert lines[0].startswith("scenario toy (as built, after its own 0 accesses):")
    assert lines[1].startswith("this access: first touch, 5 VM exits (48 EPT_VIOLATION x5)")
    assert status == 0 and "VM entry: the guest retries" in out and "kvm_mmu_hugepage_adjust" in out
    data = run_json(capsys, "walk", TOY_CODE, "--scenario", untouched)
    this = data["this_access"]
    assert isinstance(this, dict) and len(this["vm_exits"]) == 5


def test_walk_and_gpa2hpa_show_one_hpa_for_one_gpa(capsys: pytest.CaptureFixture[str]) -> None:
    """Both ask the scenario after its own accesses: the host frames are the same ones."""
    walked = run_json(capsys, "walk", "555555559008", "--kind", "write", "--cpl", "3")
    route = walked["route"]
    assert isinstance(route, dict) and route["gpa"] == "0x4100008" == walked["gpa"]
    looked_up = run_json(capsys, "gpa2hpa", "0x4100008")
    assert route["hpa"] == looked_up["hpa"] == walked["hpa"] and route["hpa"] is not None
    out = run(capsys, "walk", "555555559008", "--kind", "write", "--cpl", "3")[1]
    looked_up_line = run(capsys, "gpa2hpa", "0x4100008")[1].strip()
    assert looked_up_line.startswith("Host physical address") and looked_up_line in out.splitlines()


def test_a_refused_access_still_shows_its_gpa_and_the_gpa_s_route(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A user write to the toy's read-only code page: the guest walk reached GPA 0x5008."""
    argv = ("walk", "8080604008", "--scenario", "toy", "--kind", "write", "--cpl", "3")
    data = run_json(capsys, *argv)
    assert (data["gpa"], data["hva"], data["hpa"]) == ("0x5008", None, None)
    route = data["route"]
    assert isinstance(route, dict) and route["memslot"] == 0 and route["hva"] is not None
    out = run(capsys, *argv)[1]
    assert "No memory is mapped" not in out
    assert "gpa: 0x5008" in out and "Host virtual address for 0x5008 (memslot 0)" in out
    assert "  The guest's own page tables refused the access." in out.splitlines()
    assert "R/W (bit 1) is 0 there." in out
    this = data["this_access"]
    assert isinstance(this, dict) and "R/W (bit 1) is 0 there." in str(this["explanation"])


def test_the_cold_walk_counts_with_caches_on_and_off(capsys: pytest.CaptureFixture[str]) -> None:
    """With 2 MiB EPT pages the walk's first nested walks fill the guest-physical mappings
    that its later ones use; switched off, every reference goes to memory: 4 guest entries
    and 5 EPT walks of 3 levels (2 MiB EPT leaves) = 19; with 2 MiB guest pages, 3 + 4 x 3 = 15."""
    line = run(capsys, "walk", "555555559008", "--kind", "write", "--cpl", "3")[1].splitlines()[2]
    assert line.endswith("10 memory references; with every translation cache switched off: 19")
    out = run(capsys, "walk", "40000000", "--scenario", "large-pages")[1]
    assert out.splitlines()[2].endswith(
        "9 memory references; with every translation cache switched off: 15"
    )


def test_walk_into_the_pci_hole_exits_to_the_vmm(capsys: pytest.CaptureFixture[str]) -> None:
    data = run_json(capsys, "walk", "ffffc90000000010", "--kind", "write")
    assert data["exit"] == {
        "reason": "KVM_EXIT_MMIO",
        "gpa": "0x3000010",
        "is_write": True,
        "len": 8,
        "data": "1000000000c9ffff",
    }
    out = run(capsys, "walk", "ffffc90000000010", "--kind", "write")[1]
    assert "=> KVM_EXIT_MMIO: write of 8 bytes at GPA 0x3000010" in out


def test_walk_shows_guest_faults(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "walk", TOY_CODE, "--scenario", "toy", "--kind", "write")
    assert status == 0 and "=> #PF error code 0x3" in out  # P=1 W/R=1: a read-only page


def test_gva2gpa(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "gva2gpa", "0x555555554008")[1] == "gpa: 0x800008\n"
    assert run(capsys, "gva2gpa", "0x1000")[1] == "Unmapped\n"
    data = run_json(capsys, "gva2gpa", "0x555555554008", "--cpl", "3", "--kind", "fetch")
    assert (data["gpa"], data["cpl"], data["kind"]) == ("0x800008", 3, "fetch")


def test_gpa2hva_follows_the_memslots(capsys: pytest.CaptureFixture[str]) -> None:
    m = SCENARIOS["qemu"].build()
    hva = m.ram_hva + 48 * (1 << 20) + (QEMU_HEAP - 64 * (1 << 20))
    out = run(capsys, "gpa2hva", hex(QEMU_HEAP))[1]
    assert out == f"Host virtual address for {QEMU_HEAP:#x} (memslot 1) is {hva:#x}\n"
    assert run(capsys, "gpa2hva", hex(HOLE))[1] == f"No memory is mapped at address {HOLE:#x}\n"
    data = run_json(capsys, "gpa2hva", hex(HOLE))
    assert (data["memslot"], data["hva"]) == (None, None)


def test_gpa2hpa_reads_the_host_tables_without_faulting(
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = run_json(capsys, "gpa2hpa", hex(QEMU_HEAP + 8))
    sc = SCENARIOS["qemu"]
    m = sc.build()
    heap = [r for r in sc.run(m) if r.gpa == QEMU_HEAP + 8]
    assert data["hpa"] == hex(heap[0].hpa or 0) and data["memslot"] == 1
    assert run(capsys, "gpa2hpa", "0x2000000")[1] == "Unavailable\n"  # never touched


def test_info_memslots(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "info", "memslots")
    rows = out.splitlines()
    assert status == 0 and len(rows) == 3
    assert rows[1].split()[:3] == ["0", "0", "0x0000000000000000-0x0000000002ffffff"]
    assert rows[2].split()[:3] == ["1", "0", "0x0000000004000000-0x0000000004ffffff"]
    slots = run_json(capsys, "info", "memslots", "--scenario", "toy")["memslots"]
    assert isinstance(slots, list) and [s["size"] for s in slots] == ["0x100000"]


def test_info_tlb_shows_what_the_accesses_left(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "info", "tlb")
    assert status == 0 and out.startswith("TLB: 5 entries")  # the MMIO write is not cached
    assert "0x0000555555554000 (4 KiB) -> " in out and "PDE cache:" in out
    caches = run_json(capsys, "info", "tlb", "--scenario", "toy")["caches"]
    assert isinstance(caches, dict)
    assert sorted(e["page"] for e in caches["TLB"]) == ["0x8080604000", "0x8080605000"]


def test_info_scenario_prints_a_loadable_scenario(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    status, out, _ = run(capsys, "info", "scenario", "--scenario", "toy-5level")
    assert status == 0 and "guest 5-level under 5-level EPT" in out
    _, text, _ = run(capsys, "info", "scenario", "--scenario", "random-4", "--json")
    assert Scenario.from_json(text) == scenario("random-4")
    path = tmp_path / "mine.json"
    path.write_text(text)
    assert run(capsys, "gva2gpa", "0", "--scenario", str(path))[0] == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["walk", "zz"], "argument GVA: address = 'zz' is not a number: give hex"),
        (["walk", "0x1" + "0" * 16], "argument GVA: '0x10000000000000000' does not fit in 64"),
        (["gpa2hpa", "12.5"], "argument GPA: address = '12.5' is not a number"),
        (["walk", "0", "--cpl", "4"], "argument --cpl: invalid choice: 4"),
        (["walk", "0", "--kind", "peek"], "argument --kind: invalid choice: 'peek'"),
        (["info", "registers"], "argument what: invalid choice: 'registers'"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_usage_errors_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    status, out, err = run(capsys, *argv)
    assert status == 2 and out == ""
    assert f"twodwalk: error: {message}" in err and err.startswith("usage: twodwalk")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["walk", "0", "--scenario", "nope"], "unknown scenario 'nope': choose one of qemu, toy"),
        (["walk", "0x8080604ffc", "--scenario", "toy"], "would cross a 4 KiB page boundary"),
        (["gpa2hva", "0x1" + "0" * 12, "--scenario", "toy"], "below 2**46 (MAXPHYADDR)"),
        (["quiz", "--seed", "-1"], "seed=-0x1 is out of range"),
    ],
)
def test_rejected_input_exits_1(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    status, out, err = run(capsys, *argv)
    assert (status, out) == (1, "")
    assert err.startswith("twodwalk: error: ") and message in err and len(err.splitlines()) == 1


def test_a_malformed_scenario_file_exits_1_naming_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('name = "bad"\nept_levels = "four"\n')
    status, _, err = run(capsys, "info", "memslots", "--scenario", str(path))
    assert status == 1
    assert err == f"twodwalk: error: {path}: ept_levels = 'four' is not a number: give hex" + (
        " (0x7f001000 or 7f001000) or decimal with 0d (0d4096)\n"
    )


@pytest.mark.parametrize(
    "argv",
    [[], ["walk"], ["gva2gpa"], ["gpa2hva"], ["gpa2hpa"], ["info"], ["quiz"], ["lab"]],
)
def test_help_everywhere(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    status, out, _ = run(capsys, *argv, "--help")
    assert status == 0 and out.startswith("usage: twodwalk")


def test_python_m_twodwalk_help() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "twodwalk", "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stderr == ""
    assert all(c in done.stdout for c in ("walk", "gva2gpa", "gpa2hpa", "info", "quiz", "lab"))


def test_lab_command_is_built_not_run(capsys: pytest.CaptureFixture[str]) -> None:
    notebooks = find_notebooks()
    assert (notebooks / "00-start-here.ipynb").is_file()
    start = str(notebooks / "00-start-here.ipynb")
    assert lab_command(notebooks, 1000) == [sys.executable, "-m", "jupyter", "lab", start]
    assert lab_command(notebooks, 0)[4:] == ["--allow-root", start]
    status, out, _ = run(capsys, "lab", "--dry-run")
    assert status == 0 and out.strip().endswith("00-start-here.ipynb")


def test_lab_without_notebooks_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(TwodwalkError, match=f"no 00-start-here.ipynb in {tmp_path}"):
        find_notebooks([tmp_path])


# --- quiz (twodwalk.exercises) ------------------------------------------------------------------


def test_quiz_same_seed_same_problem(capsys: pytest.CaptureFixture[str]) -> None:
    first = run(capsys, "quiz", "--seed", "11")
    assert first == run(capsys, "quiz", "--seed", "11")
    question = exercises.quiz(11)
    assert first[1].splitlines()[0] == f"twodwalk quiz --seed 11 --topic {question.topic}"
    assert question.prompt in first[1] and "Solution" not in first[1]


def test_quiz_solve_prints_the_worked_answer(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "quiz", "--seed", "2", "--topic", "memslot", "--solve")
    question = exercises.quiz(2, "memslot")
    assert status == 0 and out.endswith(f"Solution:\n{question.solution}\n")


def test_quiz_about_a_scenarios_own_memslots(capsys: pytest.CaptureFixture[str]) -> None:
    machine = scenario("qemu").build()
    slots = sorted(machine.vm.memslots.slots.values(), key=lambda s: s.guest_phys_addr)
    answers = set()
    for seed in range(12):
        question = exercises.memslots_of_machine_question(machine.vm.memslots, seed)
        status, out, _ = run(
            capsys, "quiz", "--seed", str(seed), "--scenario", "qemu", "--answer", question.answer
        )
        assert status == 0 and "Correct." in out and "--scenario qemu" in out.splitlines()[0]
        assert all(f"{s.userspace_addr:#x}" in out for s in slots), "the scenario's own slots"
        answers.add(question.answer)
    assert "mmio" in answers and len(answers) > 6, "inside slots, and in the PCI hole"
    status, _, err = run(capsys, "quiz", "--scenario", "qemu", "--topic", "indices")
    assert status == 1 and "use --topic memslot" in err


def test_quiz_checks_answers(capsys: pytest.CaptureFixture[str]) -> None:
    question = exercises.quiz(5, "indices")
    right = run(capsys, "quiz", "--seed", "5", "--topic", "indices", "--answer", question.answer)
    assert right[0] == 0 and "Correct." in right[1]
    wrong = ("quiz", "--seed", "5", "--topic", "indices", "--answer", "0 0 0 0 0")
    feedback = run_json(capsys, *wrong, status=1)["feedback"]
    assert isinstance(feedback, dict) and feedback["correct"] is False


@pytest.mark.parametrize("command", ["walk", "gva2gpa", "gpa2hva", "gpa2hpa", "info"])
def test_every_machine_command_says_which_machine_it_asks(
    capsys: pytest.CaptureFixture[str], command: str
) -> None:
    status, out, _ = run(capsys, command, "--help")
    out = " ".join(out.split())
    assert status == 0
    assert "the scenario as built, after the guest has made the scenario's own accesses" in out
