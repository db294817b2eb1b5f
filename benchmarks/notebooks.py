"""The notebooks as a learner runs them: how long the sequence takes and how big a kernel gets.

`execution_seconds` runs every notebook top to bottom on a fresh kernel each (as nbmake and
a learner do) and adds the times up. `kernel_peak_mb` runs every notebook's code, in order,
in one kernel (a learner working through the sequence without restarting) and asks that kernel
for its peak resident set size (getrusage's ru_maxrss, KiB on Linux), in MB.
"""

from __future__ import annotations

import time
from pathlib import Path

import nbformat
from jupyter_client.manager import start_new_kernel
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
PEAK_RSS = "import resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"


def notebook_paths() -> list[Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def execution_seconds() -> float:
    """Seconds to execute all notebooks, each on a fresh kernel (kernel start-up included)."""
    start = time.perf_counter()
    for path in notebook_paths():
        notebook = _read(path)
        NotebookClient(notebook, timeout=300, kernel_name="python3").execute(cwd=str(NOTEBOOKS))
    return time.perf_counter() - start


def kernel_peak_mb() -> float:
    """Peak resident memory of one kernel that ran every notebook's cells in sequence."""
    manager, client = start_new_kernel(kernel_name="python3", cwd=str(NOTEBOOKS))
    try:
        for path in notebook_paths():
            notebook = _read(path)
            for cell in notebook.cells:
                if cell.cell_type == "code":
                    _run(client, cell.source)
        return int(_run(client, PEAK_RSS).strip()) * 1024 / 1e6  # KiB -> MB
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


def _read(path: Path) -> nbformat.NotebookNode:
    notebook: nbformat.NotebookNode = nbformat.read(path, as_version=4)  # type: ignore[no-untyped-call]
    return notebook


def _run(client: object, code: str) -> str:
    """Execute `code` in the kernel and return what it printed; fail on an error."""
    printed: list[str] = []

    def collect(message: dict[str, object]) -> None:
        content = message["content"]
        assert isinstance(content, dict)
        if message["msg_type"] == "stream":
            printed.append(str(content["text"]))
        elif message["msg_type"] == "error":
            raise RuntimeError(f"{content['ename']}: {content['evalue']}")

    client.execute_interactive(code, timeout=300, output_hook=collect)  # type: ignore[attr-defined]
    return "".join(printed)
