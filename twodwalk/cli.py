"""The `twodwalk` command: a scenario's machine, asked the questions of a QEMU monitor.

    twodwalk walk 0x8080604000 --scenario toy      Bochs-style dump of the 2D walk
    twodwalk gva2gpa / gpa2hva / gpa2hpa ADDRESS    the QEMU monitor commands of the same names
    twodwalk info memslots | tlb | scenario         KVM's memslots, the caches, the scenario
    twodwalk quiz --seed 7 [--solve]                a seeded problem, OSTEP-style
    twodwalk quiz --seed 7 --scenario qemu          ... about that scenario's own memslots
    twodwalk lab                                    the tutorials in JupyterLab

Every command asks the same machine: the scenario as built, after the guest has made the
scenario's own accesses (so the EPT, the caches and the host's pages are as the guest left
them, and one GPA always shows one HPA).
`--json` prints one JSON object with addresses as hex strings. User errors print one line,
`twodwalk: error: ...`, and exit with 2 (bad usage) or 1 (input the model rejects).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NoReturn

from twodwalk import exercises
from twodwalk.costs import LatencyModel, cycle_table
from twodwalk.engine.formats import nested_tree
from twodwalk.engine.kvm.run import InternalError, MmioExit
from twodwalk.engine.machine import Machine
from twodwalk.engine.paging import GeneralProtection, PageFault
from twodwalk.engine.processor import AccessResult
from twodwalk.engine.tlb import PscEntry, TlbEntry
from twodwalk.engine.trace import Reference, VmExit
from twodwalk.engine.units import PAGE_SHIFT
from twodwalk.errors import TwodwalkError, check_int, parse_int
from twodwalk.scenarios import KINDS, GuestAccess, Scenario, scenario
from twodwalk.views.progress import progress_bar
from twodwalk.views.text import (
    explain,
    format_2d_walk,
    format_exits,
    format_outcome,
    format_trace,
    gpa2hpa_text,
    gpa2hva_text,
    gva2gpa,
    info_memslots,
    info_tlb,
    named_caches,
    rights_text,
)
from twodwalk.workloads import CONFIGURATIONS, comparison_table, lackey_trace, replay

START_NOTEBOOK = "00-start-here.ipynb"
STATE_HELP = (
    "Every command asks the same machine: the scenario as built, after the guest has made the"
    " scenario's own accesses (`twodwalk info scenario` lists them). Addresses are hex, with or"
    " without 0x (7f001000), or decimal with 0d (0d4096)."
)
Json = dict[str, object]


@dataclass(frozen=True)
class Report:
    """What a command found: the text for people, the same as JSON data, the exit status."""

    text: str
    data: Json = field(default_factory=dict)
    status: int = 0


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors worded `twodwalk: error: ...` in every subcommand."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"twodwalk: error: {message}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return the exit status (0 ok, 1 rejected input, 2 bad usage)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed
        return e.code if isinstance(e.code, int) else 2
    try:
        report: Report = args.run(args)
    except TwodwalkError as e:
        print(f"twodwalk: error: {e}", file=sys.stderr)
        return 1
    if getattr(args, "json", False):
        print(json.dumps(report.data, indent=2))
    elif report.text:
        print(report.text)
    return report.status


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="twodwalk",
        description="x86-64 two-dimensional address translation under Linux KVM, bit for bit.",
        epilog=STATE_HELP,
    )
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    output = _Parser(add_help=False)
    output.add_argument("--json", action="store_true", help="print one JSON object")
    machine = _Parser(add_help=False, parents=[output])
    machine.add_argument(
        "--scenario",
        default="qemu",
        metavar="NAME|PATH",
        help="a named scenario (qemu, toy, toy-5level, toy-shadow, toy-amd, large-pages),"
        " random-SEED, or a .json/.toml file (default: qemu)",
    )
    machine.add_argument(
        "--vendor",
        choices=("intel", "amd"),
        help="run the scenario on Intel (EPT) or AMD (nested paging, #NPF);"
        " default: the scenario's own",
    )
    access = _Parser(add_help=False)
    access.add_argument("--kind", choices=KINDS, default="read", help="default: read")
    access.add_argument(
        "--cpl", type=int, choices=range(4), default=0, help="0 kernel .. 3 user (default: 0)"
    )

    def command(
        name: str, run: Callable[[argparse.Namespace], Report], text: str, *parents: _Parser
    ) -> _Parser:
        sub = commands.add_parser(
            name, parents=parents, help=text, description=text, epilog=STATE_HELP
        )
        sub.set_defaults(run=run)
        return sub

    for name, run, text, arg in (
        (
            "walk",
            _walk,
            "a guest access (a first touch where the page is new), its cold 2D walk"
            " Bochs-style, and why the access ended so",
            "GVA",
        ),
        ("gva2gpa", _gva2gpa, "QEMU monitor gva2gpa: the guest's own translation", "GVA"),
        ("gpa2hva", _gpa2hva, "QEMU monitor gpa2hva: the memslot route", "GPA"),
        ("gpa2hpa", _gpa2hpa, "QEMU monitor gpa2hpa: the host frame behind a GPA", "GPA"),
    ):
        sub = command(name, run, text, *((machine, access) if arg == "GVA" else (machine,)))
        sub.add_argument(arg.lower(), type=_address, metavar=arg, help="hex, or decimal with 0d")
        if name == "walk":
            sub.add_argument(
                "--trace",
                action="store_true",
                help="the access's story: VM exits, KVM's steps, host page faults, in order",
            )
    info = command("info", _info, "KVM's memslots, the vCPU's caches, or the scenario", machine)
    info.add_argument("what", choices=("memslots", "tlb", "scenario"))
    quiz = command("quiz", _quiz, "a seeded problem: same seed, same problem", output)
    quiz.add_argument("--seed", type=int, default=0, help="the problem's seed (default: 0)")
    quiz.add_argument("--topic", choices=tuple(exercises.TOPICS), help="default: the seed picks")
    quiz.add_argument("--solve", action="store_true", help="print the worked answer")
    quiz.add_argument("--answer", help="check this answer (exit status 1 when it is wrong)")
    quiz.add_argument(
        "--scenario",
        metavar="NAME|PATH",
        help="ask about this scenario's own machine (its memslots: topic memslot)",
    )
    replay = command(
        "replay",
        _replay,
        "replay a valgrind lackey trace (valgrind --tool=lackey --trace-mem=yes PROG) as a"
        " guest process on each configuration: references, TLB hits, exits, cycles",
        output,
    )
    replay.add_argument("trace", metavar="TRACE", help="the lackey output (--log-file=...)")
    replay.add_argument(
        "--config",
        action="append",
        metavar="NAME",
        help=f"a configuration, repeatable (default: {', '.join(REPLAY_DEFAULTS)});"
        f" one of: {', '.join(c.name for c in CONFIGURATIONS if not c.native)}",
    )
    replay.add_argument(
        "--passes", type=int, default=1, help="runs of the trace per machine (default: 1)"
    )
    lab = command("lab", _lab, "open the tutorials in JupyterLab")
    lab.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    return parser


def _address(text: str) -> int:
    """argparse type for addresses; a bad one is a usage error (exit 2)."""
    try:
        value = parse_int(text)
    except TwodwalkError as e:
        raise argparse.ArgumentTypeError(str(e)) from e
    if value >= 1 << 64:
        raise argparse.ArgumentTypeError(f"{text!r} does not fit in 64 bits")
    return value


# --- commands -----------------------------------------------------------------------------------


def _walk(args: argparse.Namespace) -> Report:
    """The access as the guest makes it now (a first touch takes VM exits while KVM fills the
    EPT), then a cold walk: the same access after INVVPID and INVEPT, so the dump shows the
    walk's references; and the count with every cache switched off, which no cache shortens."""
    sc, machine = _ran(args)
    access = GuestAccess(args.gva, args.kind, args.cpl)
    first = access.perform(machine)
    machine.vcpu.flush_tlb()
    again = access.perform(machine)
    refs = again.trace.memory_references()
    machine.vcpu.flush_tlb()
    with machine.vcpu.caches.switched_off():
        uncached = len(access.perform(machine).trace.memory_references())
    lines = [
        f"scenario {sc.name} ({_state(sc)}): {args.kind} of {args.gva:#x} at CPL {args.cpl}",
        f"this access: {_touch(first)}; {format_outcome(first)}",
        *([format_trace(first.trace)] if args.trace else []),
        f"cold walk ({_second_tree(machine)} in place, every translation cache flushed):"
        f" {len(refs)} memory"
        f" references; with every translation cache switched off: {uncached}",
        format_2d_walk(again.trace),
        f"=> {format_outcome(again)}",
        *_route_lines(machine, again),
        "why this access ended so:",
        *(f"  {line}" for line in explain(first).splitlines()),
    ]
    data = {
        **_access_data(sc, access, again),
        "route": _route_data(machine, again.gpa),
        "this_access": {**_result_data(first), "explanation": explain(first)},
        "uncached_references": uncached,
    }
    return Report("\n".join(line for line in lines if line), {**data, "references": _refs(refs)})


def _state(sc: Scenario) -> str:
    """Which machine every command asks (the module docstring says why one)."""
    count = len(sc.accesses)
    return f"as built, after its own {count} access{'' if count == 1 else 'es'}"


def _touch(result: AccessResult) -> str:
    """Whether the access was a first touch: the VM exits KVM took to fill its tables."""
    exits = format_exits(result.trace)
    return exits if exits == "no VM exit" else f"first touch, {exits}"


def _route_lines(machine: Machine, result: AccessResult) -> list[str]:
    """The GPA the guest's translation reached, and its route through the memslots and the
    host's tables now, as `gpa2hva` and `gpa2hpa` show it, also for a refused access."""
    if result.gpa is None:
        return [gva2gpa(result)]
    slot, hva, hpa = _gpa_route(machine, result.gpa)
    region = f"memslot {slot}"
    return [
        gva2gpa(result),
        gpa2hva_text(result.gpa, hva, region),
        gpa2hpa_text(result.gpa, hva, hpa, region),
    ]


def _gva2gpa(args: argparse.Namespace) -> Report:
    sc, machine = _ran(args)
    access = GuestAccess(args.gva, args.kind, args.cpl)
    result = access.perform(machine)
    return Report(gva2gpa(result), _access_data(sc, access, result))


def _gpa2hva(args: argparse.Namespace) -> Report:
    sc, machine, gpa = _gpa_argument(args)
    slot, hva, _ = _gpa_route(machine, gpa)
    data = {"scenario": sc.name, **_route_data(machine, gpa)}
    return Report(gpa2hva_text(gpa, hva, f"memslot {slot}"), data)


def _gpa2hpa(args: argparse.Namespace) -> Report:
    sc, machine, gpa = _gpa_argument(args)
    slot, hva, hpa = _gpa_route(machine, gpa)
    data = {"scenario": sc.name, **_route_data(machine, gpa)}
    return Report(gpa2hpa_text(gpa, hva, hpa, f"memslot {slot}"), data)


def _gpa_argument(args: argparse.Namespace) -> tuple[Scenario, Machine, int]:
    sc, machine = _ran(args)
    gpa: int = args.gpa
    check_int("gpa", gpa, 0, 1 << sc.maxphyaddr, valid=f"below 2**{sc.maxphyaddr} (MAXPHYADDR)")
    return sc, machine, gpa


def _route_data(machine: Machine, gpa: int | None) -> Json:
    if gpa is None:
        return {"gpa": None, "memslot": None, "hva": None, "hpa": None}
    slot, hva, hpa = _gpa_route(machine, gpa)
    return {"gpa": _hex(gpa), "memslot": slot, "hva": _hex(hva), "hpa": _hex(hpa)}


def _gpa_route(machine: Machine, gpa: int) -> tuple[int | None, int | None, int | None]:
    """GPA -> memslot -> HVA (`__gfn_to_hva_memslot`) -> HPA as the host's page tables have
    it now, without faulting anything in (QEMU's gpa2hpa reads /proc/self/pagemap): the one
    route every command shows."""
    memslot = machine.vm.memslots.gfn_to_memslot(gpa >> PAGE_SHIFT)
    if memslot is None:
        return None, None, None
    return memslot.id, machine.vm.gpa_to_hva(gpa), machine.gpa_to_hpa(gpa)


def _info(args: argparse.Namespace) -> Report:
    if args.what == "scenario":
        sc = _scenario(args)
        return Report(sc.describe(), json.loads(sc.to_json()))
    sc, machine = _ran(args)
    if args.what == "memslots":
        slots = sorted(machine.vm.memslots.slots.values(), key=lambda m: m.guest_phys_addr)
        rows: list[Json] = [
            {
                "slot": m.id,
                "as_id": m.as_id,
                "gpa": _hex(m.guest_phys_addr),
                "size": _hex(m.memory_size),
                "hva": _hex(m.userspace_addr),
                "flags": m.flags,
            }
            for m in slots
        ]
        return Report(info_memslots(slots), {"scenario": sc.name, "memslots": rows})
    caches = machine.vcpu.caches
    data: Json = {name: [_entry_data(e) for e in c.entries()] for name, c in named_caches(caches)}
    return Report(info_tlb(caches), {"scenario": sc.name, "caches": data})


REPLAY_DEFAULTS = ("EPT 4x4", "AMD NPT 4x4", "shadow paging", "EPT 4x4, 2 MiB guest and EPT pages")


def _replay(args: argparse.Namespace) -> Report:
    """The trace on each configuration asked for, with a progress bar on stderr."""
    by_name = {c.name: c for c in CONFIGURATIONS}
    names = args.config or list(REPLAY_DEFAULTS)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        valid = "; ".join(c.name for c in CONFIGURATIONS if not c.native)
        raise TwodwalkError(
            f"--config {unknown[0]!r} is not a configuration: choose one of {valid}"
        )
    path = Path(args.trace)
    if not path.is_file():
        raise TwodwalkError(f"TRACE {args.trace!r} is not a file: give a lackey --log-file")
    total = sum(1 for _ in lackey_trace(path)) * len(names) * args.passes  # a first, quick pass
    bar = progress_bar(total)
    configs = [by_name[name] for name in names]
    results = [r for runs in replay(path, configs, passes=args.passes, progress=bar) for r in runs]
    bar(total)
    text = "\n\n".join([comparison_table(results), cycle_table(results)])
    data: Json = {
        "trace": str(path),
        "runs": [
            {
                "configuration": r.name,
                "accesses": r.accesses,
                "references_per_access": round(r.references_per_access, 4),
                "tlb_hit_rate": round(r.tlb_hit_rate, 4),
                "vm_exits": dict(r.exits),
                "host_page_faults": r.host_page_faults,
                "guest_faults": r.guest_faults,
                "cycles_per_access": round(LatencyModel().cycles(r).total / max(r.accesses, 1), 2),
            }
            for r in results
        ],
    }
    return Report(text, data)


def _question(args: argparse.Namespace) -> exercises.Question:
    """The seeded question; with --scenario, one about that scenario's own memslots."""
    if args.scenario is None:
        return exercises.quiz(args.seed, args.topic)
    if args.topic not in (None, "memslot"):
        raise TwodwalkError(
            f"--scenario asks about the scenario's memslots: use --topic memslot, not"
            f" --topic {args.topic}"
        )
    machine = scenario(args.scenario).build()
    return exercises.memslots_of_machine_question(machine.vm.memslots, args.seed)


def _quiz(args: argparse.Namespace) -> Report:
    """OSTEP-style: echo the parameters, state the problem; the answer only on request."""
    question = _question(args)
    where = "" if args.scenario is None else f" --scenario {args.scenario}"
    lines = [
        f"twodwalk quiz --seed {args.seed} --topic {question.topic}{where}",
        question.prompt,
        f"Hint: {question.hint}",
    ]
    data: Json = {
        "seed": args.seed,
        "topic": question.topic,
        "prompt": question.prompt,
        "hint": question.hint,
    }
    status = 0
    if args.answer is not None:
        feedback = question.check(args.answer)
        lines.append(feedback.message)
        data["feedback"] = {"correct": feedback.correct, "message": feedback.message}
        status = 0 if feedback.correct else 1
    if args.solve:
        lines.append(f"Solution:\n{question.solution}")
        data.update(solution=question.solution, answer=question.answer)
    return Report("\n".join(lines), data, status)


def _lab(args: argparse.Namespace) -> Report:
    notebooks = find_notebooks()
    command = lab_command(notebooks, _euid())
    print(shlex.join(command), flush=True)
    if args.dry_run:
        return Report("")
    try:
        return Report("", status=subprocess.call(command, cwd=notebooks.parent))
    except KeyboardInterrupt:
        return Report("", status=130)


# --- lab ----------------------------------------------------------------------------------------


def find_notebooks(places: Sequence[Path] | None = None) -> Path:
    """The tutorials' folder: `notebooks/` beside the package (a clone of the repository,
    installed editable) or in the current directory. Wheels do not ship them."""
    if places is None:
        places = [Path(__file__).resolve().parent.parent / "notebooks", Path.cwd() / "notebooks"]
    for place in places:
        if (place / START_NOTEBOOK).is_file():
            return place
    raise TwodwalkError(
        f"the tutorials were not found: no {START_NOTEBOOK} in "
        f"{' or '.join(str(p) for p in places)}; run `twodwalk lab` in a clone of the"
        " twodwalk repository"
    )


def lab_command(notebooks: Path, euid: int) -> list[str]:
    """`python -m jupyter lab notebooks/00-start-here.ipynb`, as `make lab` runs it; as root
    Jupyter refuses to start without --allow-root."""
    root = ["--allow-root"] if euid == 0 else []
    return [sys.executable, "-m", "jupyter", "lab", *root, str(notebooks / START_NOTEBOOK)]


def _euid() -> int:
    geteuid: Callable[[], int] | None = getattr(os, "geteuid", None)  # not on Windows
    return 1 if geteuid is None else geteuid()


# --- shared -------------------------------------------------------------------------------------


def _scenario(args: argparse.Namespace) -> Scenario:
    """The scenario the arguments name, on the vendor `--vendor` asks for."""
    sc = scenario(args.scenario)
    vendor = getattr(args, "vendor", None)
    return sc if vendor is None else replace(sc, vendor=vendor)


def _second_tree(machine: Machine) -> str:
    """What KVM built for the hardware: EPT (Intel), NPT (AMD) or shadow tables."""
    return nested_tree(machine.vm.ept.fmt) if machine.vm.tdp else "shadow tables"


def _ran(args: argparse.Namespace) -> tuple[Scenario, Machine]:
    """The scenario's machine after the guest has made the scenario's accesses."""
    sc = _scenario(args)
    machine = sc.build()
    sc.run(machine)
    return sc, machine


def _hex(value: int | None) -> str | None:
    return None if value is None else f"{value:#x}"


def _access_data(sc: Scenario, access: GuestAccess, result: AccessResult) -> Json:
    return {
        "scenario": sc.name,
        "gva": _hex(access.gva),
        "kind": access.kind,
        "cpl": access.cpl,
        **_result_data(result),
    }


def _result_data(result: AccessResult) -> Json:
    return {
        "gpa": _hex(result.gpa),
        "hva": _hex(result.hva),
        "hpa": _hex(result.hpa),
        "value": _hex(result.value),
        "fault": _fault_data(result.fault),
        "exit": _exit_data(result.exit),
        "vm_exits": [
            {"reason": e.reason, "name": e.name, "gpa": _hex(e.gpa)}
            for e in result.trace.of_type(VmExit)
        ],
        "outcome": format_outcome(result),
    }


def _fault_data(fault: PageFault | GeneralProtection | None) -> Json | None:
    if fault is None:
        return None
    data: Json = {"vector": fault.vector, "error_code": _hex(fault.error_code)}
    return {**data, "cr2": _hex(fault.cr2)} if isinstance(fault, PageFault) else data


def _exit_data(exit: MmioExit | InternalError | None) -> Json | None:
    if isinstance(exit, MmioExit):
        return {
            "reason": "KVM_EXIT_MMIO",
            "gpa": _hex(exit.phys_addr),
            "is_write": exit.is_write,
            "len": exit.len,
            "data": exit.data.hex(),
        }
    if isinstance(exit, InternalError):
        return {
            "reason": "KVM_EXIT_INTERNAL_ERROR",
            "suberror": exit.suberror,
            "detail": exit.detail,
        }
    return None


def _refs(refs: list[Reference]) -> list[Json]:
    return [
        {
            "number": r.number,
            "dimension": r.dimension,
            "entry": r.step.format.level_name(r.step.level),
            "guest_level": r.guest_level,
            "ept_level": r.ept_level,
            "address": _hex(r.address),
            "value": _hex(r.value),
        }
        for r in refs
    ]


def _entry_data(e: TlbEntry | PscEntry) -> Json:
    """A TLB entry (a page's frame, dirty, global) or a paging-structure-cache entry (the
    next table, in the walk's own space and in host memory)."""
    data: Json = {
        "vpid": e.tag.vpid,
        "pcid": e.tag.pcid,
        "ep4ta": _hex(e.tag.ep4ta),
        "page": _hex(e.page),
        "page_size": _hex(e.page_size),
        "rights": rights_text(e.rights),
    }
    if isinstance(e, PscEntry):
        return data | {"table": _hex(e.table), "table_hpa": _hex(e.table_hpa)}
    return data | {
        "frame": _hex(e.frame),
        "gpa_page": _hex(e.gpa_page),
        "dirty": e.dirty,
        "global": e.global_page,
    }
