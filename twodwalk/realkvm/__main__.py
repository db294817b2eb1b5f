"""`python -m twodwalk.realkvm --cases N --seed S`: the differential fuzzers against /dev/kvm.

Prints agreement counts by category and a reproduction of every disagreement; exits 1 on any
disagreement and 2 when real KVM cannot be used here (saying why).
"""

from __future__ import annotations

import argparse
import sys

from twodwalk.realkvm.check import check


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m twodwalk.realkvm", description=__doc__)
    parser.add_argument("--cases", type=int, default=1000, help="random paging cases")
    parser.add_argument(
        "--sequence-cases", type=int, default=200, help="random step sequences, one run each"
    )
    parser.add_argument("--memslot-cases", type=int, default=1000, help="random memslot calls")
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives the same cases")
    args = parser.parse_args(argv)
    result = check(args.cases, args.memslot_cases, args.seed, args.sequence_cases)
    print(result.text, file=sys.stderr if result.disagreements is None else sys.stdout)
    if result.disagreements is None:
        return 2
    return 1 if result.disagreements else 0


if __name__ == "__main__":
    sys.exit(main())
