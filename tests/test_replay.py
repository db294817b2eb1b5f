"""Replaying valgrind lackey traces (issue 21): the reader on hand-written traces, demand
paging in the guest, and a real trace recorded at test time where valgrind is installed."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from twodwalk import workloads
from twodwalk.cli import main
from twodwalk.errors import TwodwalkError
from twodwalk.workloads import CONFIGURATIONS, lackey_trace, replay

BY_NAME = {c.name: c for c in CONFIGURATIONS}
TWO_DIMENSIONAL = ("EPT 4x4", "AMD NPT 4x4", "EPT 4x4, AMD-style page-walk cache")


def write_trace(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "trace.lackey"
    path.write_text(text)
    return path


def test_the_reader_turns_records_into_accesses(tmp_path: Path) -> None:
    path = write_trace(
        tmp_path,
        "==42== Lackey, an example Valgrind tool\n"
        "\n"
        "I  0401ab70,3\n"  # a fetch: the 8-byte word holding 0x401ab70
        " L 1fff000778,8\n"
        " S 1fff000770,8\n"
        " M 0602a004,4\n"  # a modify: a load, then a store
        " L 0040fffc,8\n"  # 0x40fffc..0x410003 crosses into the page at 0x410000
        "==42== Counted 0 calls to main()\n",
    )
    assert list(lackey_trace(path)) == [
        (0x401AB70, "fetch"),
        (0x1FFF000778, "read"),
        (0x1FFF000770, "write"),
        (0x602A000, "read"),
        (0x602A000, "write"),
        (0x40FFF8, "read"),
        (0x410000, "read"),
    ]


def test_repeated_lines_give_their_accesses_each_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reader parses a distinct line once and remembers it (`_LINES_REMEMBERED` lines,
    then it starts over): a repeat must still give the line's own accesses, in order."""
    monkeypatch.setattr(workloads, "_LINES_REMEMBERED", 2)
    loop = "I  0401ab70,3\n M 0602a004,4\n L 0040fffc,8\n"
    path = write_trace(tmp_path, loop * 3 + "I  0401ab70,3\n")
    once = [
        (0x401AB70, "fetch"),
        (0x602A000, "read"),
        (0x602A000, "write"),
        (0x40FFF8, "read"),
        (0x410000, "read"),
    ]
    assert list(lackey_trace(path)) == once * 3 + once[:1]


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("X  0401ab70,3", "is not a lackey record"),
        (" L 0401ab70", "is not a lackey record"),
        (" L zz,8", "is not a lackey record"),
        (" L 0401ab70,0", "size 0 at 0x401ab70 is not valid"),
        (" L ffffffffffffffff,8", "size 8 at 0xffffffffffffffff is not valid"),
    ],
)
def test_a_malformed_line_is_named_with_its_number(tmp_path: Path, line: str, why: str) -> None:
    path = write_trace(tmp_path, f"I  0401ab70,3\n{line}\n")
    accesses = lackey_trace(path)
    assert next(accesses) == (0x401AB70, "fetch"), "read as a stream: line 1 before line 2"
    with pytest.raises(
        TwodwalkError, match=rf"trace\.lackey:2: '{re.escape(line.rstrip())}'.*{why}"
    ):
        next(accesses)


def test_demand_paging_maps_each_page_on_its_first_touch(tmp_path: Path) -> None:
    pages = [0x400000, 0x401000, 0x1FFF000000, 0x7F0000002000]
    path = write_trace(tmp_path, "".join(f" L {p + 8:x},8\n S {p + 16:x},8\n" for p in pages))
    for name in ("EPT 4x4", "shadow paging"):
        ((first, second),) = replay(path, [BY_NAME[name]], passes=2)
        assert first.accesses == second.accesses == 8
        assert first.guest_faults == len(pages), "one #PF per page, resolved and retried"
        assert second.guest_faults == 0 and second.exits == {}


def test_large_guest_pages_demand_page_two_mib_at_a_time(tmp_path: Path) -> None:
    path = write_trace(tmp_path, "".join(f" L {0x400000 + n * 0x1000:x},8\n" for n in range(40)))
    ((run,),) = replay(path, [BY_NAME["EPT 4x4, 2 MiB guest and EPT pages"]])
    assert run.guest_faults == 1, "forty 4 KiB pages inside one 2 MiB guest page"


def test_bare_metal_cannot_replay_a_trace(tmp_path: Path) -> None:
    path = write_trace(tmp_path, "I  0401ab70,3\n")
    with pytest.raises(TwodwalkError, match="is bare metal: it has no guest"):
        replay(path, [BY_NAME["native (bare metal)"]])


@pytest.fixture(scope="module")
def real_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A lackey trace of /bin/true (the dynamic loader and libc's start-up), recorded now."""
    if shutil.which("valgrind") is None:
        if os.environ.get("TWODWALK_REQUIRE_VALGRIND"):
            pytest.fail("valgrind is required here (TWODWALK_REQUIRE_VALGRIND) but missing")
        pytest.skip("valgrind is not installed: no real trace to record (apt-get install valgrind)")
    path = tmp_path_factory.mktemp("lackey") / "true.lackey"
    subprocess.run(
        ["valgrind", "--tool=lackey", "--trace-mem=yes", f"--log-file={path}", "/bin/true"],
        check=True,
        timeout=120,
    )
    return path


def test_a_real_trace_replays_on_every_virtual_configuration(real_trace: Path) -> None:
    accesses = list(lackey_trace(real_trace))
    pages = {gva >> 12 for gva, _ in accesses}
    assert len(accesses) > 10_000 and len(pages) > 20, "a real program's start-up"
    names = (*TWO_DIMENSIONAL, "shadow paging")
    runs = dict(zip(names, replay(real_trace, [BY_NAME[n] for n in names], passes=2), strict=True))
    for name, (cold, warm) in runs.items():
        assert cold.accesses == warm.accesses == len(accesses), name
        assert cold.guest_faults == len(pages), f"{name}: every page faults in once, no more"
        assert warm.guest_faults == warm.host_page_faults == 0 and warm.exits == {}, name
        assert sum(warm.references.values()) <= sum(cold.references.values()), name
        dimensions = {"native"} if name == "shadow paging" else {"guest", "ept"}
        assert set(cold.references) <= dimensions, name
    amd, intel_same_cache = runs["AMD NPT 4x4"], runs["EPT 4x4, AMD-style page-walk cache"]
    for a, b in zip(amd, intel_same_cache, strict=True):
        assert a.references == b.references, "NPT and EPT walk the same shape with one cache"
    assert runs["shadow paging"][0].exits, "shadow paging pays in exits for the first touches"


def test_the_command_line_replays_a_trace(
    real_trace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["replay", str(real_trace), "--config", "EPT 4x4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    (run,) = data["runs"]
    assert run["configuration"] == "EPT 4x4"
    assert run["accesses"] == sum(1 for _ in lackey_trace(real_trace))
    assert run["cycles_per_access"] > 0 and run["tlb_hit_rate"] > 0.9
    assert main(["replay", str(real_trace), "--config", "EPT 9x9"]) == 1
    assert "--config 'EPT 9x9' is not a configuration: choose one of" in capsys.readouterr().err
