"""One vocabulary (README, "Words we use"): *first touch* (the access that makes KVM build its
EPT entries, with VM exits), *cold walk* (EPT entries in place, every translation cache
empty), *warm* (the caches hold what earlier walks left). The phrases below once mixed them
up; none may come back in anything a learner reads."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIXED_UP = re.compile(
    r"\bcold (access|read|write|fetch)(es)?\b"  # an access with exits is a first touch
    r"|\b(access|walk|touch) is cold\b"
    r"|\bfirst walk is cold\b"
    r"|\bwarm (walk|read)\b"  # a walk after a flush is a cold walk
    r"|\b(EPT|tables) (are |is )?warm\b",
    re.IGNORECASE,
)


def learner_texts() -> list[tuple[str, str]]:
    """(where, text) of the README, CONTRIBUTING, the docs, every notebook cell and every
    module of the package (docstrings, prompts and CLI lines live there)."""
    texts = [(p.name, p.read_text()) for p in (ROOT / "README.md", ROOT / "CONTRIBUTING.md")]
    texts += [(str(p.relative_to(ROOT)), p.read_text()) for p in (ROOT / "docs").glob("*.md")]
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for number, cell in enumerate(json.loads(path.read_text())["cells"]):
            texts.append((f"{path.name} cell {number}", "".join(cell["source"])))
    texts += [(str(p.relative_to(ROOT)), p.read_text()) for p in (ROOT / "twodwalk").rglob("*.py")]
    return texts


def test_one_word_for_each_state_of_an_access() -> None:
    found = [
        (where, m.group(0)) for where, text in learner_texts() for m in MIXED_UP.finditer(text)
    ]
    assert found == []


def test_nothing_shipped_points_at_a_file_learners_do_not_have() -> None:
    """The package cites the SDM, the kernel and papers, never the maintainers' notes beside
    the repository."""
    texts = learner_texts()
    texts += [(str(p.relative_to(ROOT)), p.read_text()) for p in (ROOT / "tests").glob("*.py")]
    here = Path(__file__).name
    found = [w for w, text in texts if ("FACTS" + ".md" in text or "../shared" in text)]
    assert [w for w in found if not w.endswith(here)] == []
