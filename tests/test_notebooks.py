"""Every tutorial notebook runs top to bottom on a fresh kernel, silently, as committed.

A learner must see no traceback and no warning, so any output on stderr fails the notebook
(nbmake would pass a warning). Notebooks are committed without outputs: the repository copy
must have none, so that diffs stay readable and nobody reads a stale result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
SEQUENCE = (
    "00-start-here",
    "01-guest-paging",
    "02-memslots",
    "03-host-paging",
    "04-ept",
    "05-two-dimensional-walk",
    "06-shadow-paging",
    "07-tlbs-and-caches",
    "08-what-if-lab",
    "09-the-answer",
    "10-lab-ept-violation-handler",
    "11-memory-without-an-hva",
    "12-nested-virtualization",
    "13-amd-nested-paging",
    "90-check-on-real-kvm",
)


def read(path: Path) -> Any:
    return nbformat.read(path, as_version=4)  # type: ignore[no-untyped-call]


def test_the_tutorial_sequence_is_all_there() -> None:
    assert tuple(p.stem for p in NOTEBOOKS) == SEQUENCE


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path: Path) -> None:
    for cell in read(path).cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_clean_on_a_fresh_kernel(path: Path) -> None:
    notebook = read(path)
    NotebookClient(notebook, timeout=120, kernel_name="python3").execute(cwd=str(path.parent))
    noisy = [
        (cell.source[:60], output.get("text", output.get("ename")))
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if output.output_type == "error"
        or (output.output_type == "stream" and output.name == "stderr")
    ]
    assert noisy == [], "a learner would see these tracebacks or warnings"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_states_its_time_and_its_lecture_cut_exists(path: Path) -> None:
    """The line under each title gives the self-paced and lecture-demo times; a lecture cut
    names sections, and each must start a real section heading of the notebook."""
    import re

    cells = read(path).cells
    timing = cells[0].source.splitlines()[2]
    assert re.match(
        r"^\*Self-paced: about \d+ minutes · as a lecture demo: about \d+ minutes", timing
    ), timing
    headings = [
        line[3:]
        for c in cells
        if c.cell_type == "markdown"
        for line in c.source.splitlines()
        if line.startswith("## ")
    ]
    for section in re.findall(r"\u201c([^\u201d]+)\u201d", timing):
        assert any(h.startswith(section) for h in headings), f"no section {section!r}"
