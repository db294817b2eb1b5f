"""`python -m twodwalk`: the same command as `twodwalk` (see twodwalk.cli)."""

from twodwalk.cli import main

raise SystemExit(main())
