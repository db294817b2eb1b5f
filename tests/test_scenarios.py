"""Scenarios: the named machines, the QEMU-like RAM split around a PCI hole, seeded random
scenarios, and JSON/TOML files with clear errors for malformed ones."""

from __future__ import annotations

from pathlib import Path

import pytest

import twodwalk as tw
from twodwalk.engine.kvm.run import MmioExit
from twodwalk.errors import parse_int
from twodwalk.scenarios import (
    SCENARIOS,
    GuestAccess,
    GuestMapping,
    Scenario,
    load_scenario,
    random_scenario,
    save_scenario,
    scenario,
)

MIB = 1 << 20
QEMU = SCENARIOS["qemu"]
BAR_GVA = 0xFFFF_C900_0000_0000  # the qemu scenario's ioremapped device page, in the hole


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_every_named_scenario_builds_and_runs_its_accesses(name: str) -> None:
    sc = scenario(name)
    results = sc.run(sc.build())
    assert len(results) == len(sc.accesses) >= 2
    assert all(r.fault is None for r in results), "the named scenarios' accesses all succeed"
    assert sc.describe().startswith(f"{name}: ")


def test_qemu_splits_ram_in_two_memslots_of_one_mmap_around_the_hole() -> None:
    m = QEMU.build()
    slots = sorted(m.vm.memslots.slots.values(), key=lambda s: s.guest_phys_addr)
    assert [(s.id, s.guest_phys_addr, s.memory_size) for s in slots] == [
        (0, 0, 48 * MIB),
        (1, 64 * MIB, 16 * MIB),
    ]
    assert [s.userspace_addr for s in slots] == [m.ram_hva, m.ram_hva + 48 * MIB]
    assert m.vm.gpa_to_hva(48 * MIB) is None and m.vm.gpa_to_hva(64 * MIB - 1) is None
    assert 64 * MIB <= m.vcpu.cr3 < 80 * MIB, "the guest's tables come from RAM, not the hole"


def test_qemu_hole_gpa_gives_an_mmio_exit() -> None:
    m = QEMU.build()
    result = m.vcpu.access(BAR_GVA + 0x10, "write", 0x1234)
    assert result.exit == MmioExit(48 * MIB + 0x10, True, 8, (0x1234).to_bytes(8, "little"))
    assert result.hva is None and result.hpa is None


def test_ram_above_the_hole_is_ram() -> None:
    m = QEMU.build()
    heap = next(mp for mp in QEMU.mappings if mp.name == "bash: heap")
    assert heap.gpa >= 64 * MIB
    m.vcpu.cpl = 3
    assert m.vcpu.access(heap.gva, "write", 7).fault is None
    assert m.read_gpa(heap.gpa, 8) == (7).to_bytes(8, "little")


def test_machine_without_a_hole_keeps_one_memslot_at_zero() -> None:
    m = tw.Machine()
    (slot,) = m.vm.memslots.slots.values()
    assert (slot.id, slot.guest_phys_addr, slot.memory_size) == (0, 0, 32 * MIB)
    assert slot.userspace_addr == m.ram_hva


@pytest.mark.parametrize(
    ("hole", "thp", "message"),
    [
        ((0, 4 * MIB), False, r"pci_hole\[0\]=0x0 is out of range"),
        ((32 * MIB, 40 * MIB), False, r"pci_hole\[0\]=0x2000000 is out of range"),
        ((8 * MIB, 8 * MIB), False, r"pci_hole\[1\]=0x800000 is out of range"),
        ((MIB, 4 * MIB), True, r"pci_hole\[0\]=0x100000 is not aligned"),
    ],
)
def test_bad_pci_holes_are_rejected(hole: tuple[int, int], thp: bool, message: str) -> None:
    with pytest.raises(tw.TwodwalkError, match=message):
        tw.Machine(guest_ram=32 * MIB, thp=thp, pci_hole=hole)


@pytest.mark.parametrize(
    ("name", "references"), [("toy", 24), ("toy-5level", 35), ("toy-shadow", 4)]
)
def test_toy_walks_make_every_reference_when_the_caches_are_cold(
    name: str, references: int
) -> None:
    sc = scenario(name)
    m = sc.build()
    first = sc.accesses[0]
    first.perform(m)
    m.vcpu.flush_tlb()
    assert len(first.perform(m).trace.memory_references()) == references


def test_writes_store_their_own_gva() -> None:
    sc = scenario("toy")
    m = sc.build()
    write = GuestAccess(0x80_8060_5010, "write", 3)
    write.perform(m)
    assert m.read_gpa(0x6010, 8) == (0x80_8060_5010).to_bytes(8, "little")


@pytest.mark.parametrize("name", [*sorted(SCENARIOS), "random-1", "random-2", "random-13"])
def test_json_and_toml_round_trip(name: str) -> None:
    sc = scenario(name)
    assert Scenario.from_json(sc.to_json()) == sc
    assert Scenario.from_toml(sc.to_toml()) == sc


def test_files_round_trip_by_suffix(tmp_path: Path) -> None:
    for suffix in (".json", ".toml"):
        path = tmp_path / f"qemu{suffix}"
        save_scenario(QEMU, path)
        assert load_scenario(path) == QEMU
        assert scenario(str(path)) == QEMU
    assert (tmp_path / "qemu.toml").read_text().startswith('name = "qemu"\n')
    assert '"gva": "0xffff_c900_0000_0000"' in (tmp_path / "qemu.json").read_text()


def test_awkward_strings_survive_toml() -> None:
    odd = Scenario(name='a "quoted" \\ name\nwith a newline, \x7f, \x01 and ü')
    assert Scenario.from_toml(odd.to_toml()) == odd
    assert Scenario.from_json(odd.to_json()) == odd


def test_same_seed_same_scenario_different_seeds_differ() -> None:
    assert random_scenario(7) == random_scenario(7) == scenario("random-7")
    assert len({random_scenario(seed) for seed in range(20)}) == 20


@pytest.mark.parametrize("seed", range(0, 40, 3))
def test_random_scenarios_build_and_run(seed: int) -> None:
    sc = random_scenario(seed)
    results = sc.run(sc.build())
    assert len(results) == len(sc.mappings)


def test_unknown_scenario_names_list_the_known_ones() -> None:
    with pytest.raises(tw.TwodwalkError) as info:
        scenario("qmeu")
    message = str(info.value)
    assert "unknown scenario 'qmeu'" in message
    assert all(name in message for name in SCENARIOS) and "random-SEED" in message


TOML_BASE = 'name = "x"\n'


@pytest.mark.parametrize(
    ("suffix", "text", "expected"),
    [
        (".json", '{"name": "x", "colour": 1}', "unknown key 'colour' in the scenario: valid keys"),
        (".toml", TOML_BASE + "tdp = 1\n", "tdp = 1 (int) is not valid: expected true or false"),
        (".toml", TOML_BASE + "guest_levels = 3\n", "guest_levels='3' is not valid: choose"),
        (".json", '{"name": "x", "guest_ram": "lots"}', "guest_ram = 'lots' is not a number"),
        (".json", '{"name": "x", "pci_hole": [1]}', "pci_hole = [1] (list) is not valid"),
        (".json", "[1, 2]", "the scenario must be a table, got [1, 2] (list)"),
        (".json", '{"description": "no name"}', "the scenario has no 'name': it is required"),
        (".json", '{"name": "x",}', "not valid JSON"),
        (".toml", "name = ", "not valid TOML"),
        (
            ".toml",
            TOML_BASE + '[[mappings]]\nname = "m"\ngva = 0\ngpa = 0\nsize = 0x1000\n'
            "page_size = 0x3000\n",
            "mappings[0]: page_size='12 KiB' is not valid: choose one of 4 KiB, 2 MiB, 1 GiB",
        ),
        (
            ".toml",
            TOML_BASE + '[[accesses]]\ngva = 0\n[[accesses]]\nkind = "peek"\n',
            "accesses[1] has no 'gva': it is required",
        ),
        (
            ".toml",
            TOML_BASE + '[[accesses]]\ngva = 0\nkind = "peek"\n',
            "accesses[0]: kind='peek' is not valid: choose one of read, write, fetch",
        ),
        (
            ".toml",
            TOML_BASE + "[[accesses]]\ngva = 0\nwho = 1\n",
            "unknown key 'who' in accesses[0]",
        ),
        (".yaml", "name: x", "suffix '.yaml' is not valid: a scenario file ends in .json or .toml"),
    ],
)
def test_malformed_files_name_the_file_and_the_field(
    tmp_path: Path, suffix: str, text: str, expected: str
) -> None:
    path = tmp_path / f"bad{suffix}"
    path.write_text(text)
    with pytest.raises(tw.TwodwalkError) as info:
        load_scenario(path)
    assert str(info.value).startswith(f"{path}: ")
    assert expected in str(info.value)


def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(tw.TwodwalkError, match="cannot read the scenario file"):
        scenario(str(tmp_path / "absent.toml"))


def test_build_errors_name_the_scenario_and_the_mapping() -> None:
    clash = Scenario(
        name="clash",
        guest_ram=MIB,
        mappings=(
            GuestMapping("first", 0x1000, 0x5000, 0x1000),
            GuestMapping("second", 0x1000, 0x6000, 0x1000),
        ),
    )
    with pytest.raises(tw.TwodwalkError, match="scenario 'clash', mapping 'second': virtual="):
        clash.build()


def test_describe_shows_the_memory_map() -> None:
    text = QEMU.describe()
    assert "memslot 0  GPA 0x00000000-0x02ffffff  48 MiB" in text
    assert "hole       GPA 0x03000000-0x03ffffff  MMIO" in text
    assert "memslot 1  GPA 0x04000000-0x04ffffff  16 MiB at RAM offset 0x3000000" in text
    assert "virtio BAR (ioremap)" in text


@pytest.mark.parametrize(
    ("text", "value"),
    [("0x7f00_1000", 0x7F00_1000), ("7f001000", 0x7F00_1000), ("1000", 0x1000), ("0d4096", 4096)],
)
def test_numbers_are_hex_unless_marked_decimal(text: str, value: int) -> None:
    assert parse_int(text) == value


@pytest.mark.parametrize("text", ["", "0x", "0d", "0d12a", "xyz", "-1", "1.5"])
def test_bad_numbers_say_what_is_valid(text: str) -> None:
    with pytest.raises(tw.TwodwalkError, match="is not a number: give hex"):
        parse_int(text)


def test_guest_tables_never_spill_into_the_hole() -> None:
    # One page above the hole: the root table takes it, the next table would be in the hole.
    m = tw.Machine(guest_ram=2 * MIB, pci_hole=(2 * MIB - 0x1000, 4 * MIB))
    assert m.vcpu.cr3 == 4 * MIB
    with pytest.raises(tw.TwodwalkError, match="is in no memslot"):
        m.guest.map(0x1000, 0x5000, 0x1000)
