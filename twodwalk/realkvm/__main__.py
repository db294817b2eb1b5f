"""`python -m twodwalk.realkvm --cases N --seed S`: the differential fuzzer against /dev/kvm.

Prints agreement counts by category and a reproduction of every disagreement; exits 1 on any
disagreement and 2 when real KVM cannot be used here (saying why).
"""

from __future__ import annotations

import argparse
import sys

from twodwalk.realkvm.device import unavailable_reason
from twodwalk.realkvm.memslots import memslot_fuzz


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m twodwalk.realkvm", description=__doc__)
    parser.add_argument("--cases", type=int, default=1000, help="random paging cases")
    parser.add_argument("--memslot-cases", type=int, default=1000, help="random memslot calls")
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives the same cases")
    args = parser.parse_args(argv)
    reason = unavailable_reason()
    if reason is not None:
        print(f"twodwalk.realkvm: {reason}", file=sys.stderr)
        return 2
    from twodwalk.realkvm.paging import paging_fuzz

    print(f"seed {args.seed}: {args.cases} paging cases, {args.memslot_cases} memslot calls")
    paging = paging_fuzz(args.cases, args.seed)
    print(paging.table())
    memslots = memslot_fuzz(args.memslot_cases, args.seed)
    print(memslots.table())
    slot_disagreements = _slots(args.seed)
    return 1 if paging.disagreements or memslots.disagreements or slot_disagreements else 0


def _slots(seed: int) -> int:
    """READONLY/hole MMIO exits and dirty-log bitmaps; prints them, returns disagreements."""
    from twodwalk.realkvm.runtime import RealRunner
    from twodwalk.realkvm.slots import dirty_log, readonly_and_hole

    runner = RealRunner()
    try:
        mmio = readonly_and_hole(runner)
    finally:
        runner.close()
    runner = RealRunner()
    try:
        logs = dirty_log(runner, seed)
    finally:
        runner.close()
    bad = [o.what for o in mmio if not o.agree] + [f"round {o.round}" for o in logs if not o.agree]
    print(f"MMIO accesses: {len(mmio)}, agree: {sum(o.agree for o in mmio)}")
    print(f"dirty-log rounds: {len(logs)}, agree: {sum(o.agree for o in logs)}")
    for what in bad:
        print(f"  DISAGREE {what}")
    return len(bad)


if __name__ == "__main__":
    sys.exit(main())
