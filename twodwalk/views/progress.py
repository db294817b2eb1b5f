"""Progress for long runs: a widget bar in a notebook, a text bar on a terminal.

`run_workload(..., progress=progress_bar(total))` calls the bar every 1,000 accesses. The
widget is ipywidgets' IntProgress, imported only when a notebook kernel is running, so the
engine never needs Jupyter.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO


def in_notebook() -> bool:
    """Whether code runs in a Jupyter kernel: IPython's ZMQ shell (ipykernel), or the Pyodide
    kernel of JupyterLite, whose shell is IPython's own class under `pyodide_kernel`."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    shell = ipython.get_ipython()
    if shell is None:
        return False
    return type(shell).__name__ == "ZMQInteractiveShell" or "pyodide_kernel" in sys.modules


def progress_bar(total: int, stream: TextIO | None = None) -> Callable[[int], None]:
    """A callback taking the number done so far, drawing a bar of `total`."""
    if stream is None and in_notebook():
        return _widget_bar(total)
    return _text_bar(total, stream or sys.stderr)


def _text_bar(total: int, stream: TextIO, width: int = 40) -> Callable[[int], None]:
    finished = False

    def update(done: int) -> None:
        nonlocal finished
        if finished:  # drawn full once: later calls (a last one to be sure) draw nothing
            return
        filled = width * min(done, total) // max(total, 1)
        stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {min(done, total):,}/{total:,}")
        finished = done >= total
        if finished:
            stream.write("\n")
        stream.flush()

    return update


def _widget_bar(total: int) -> Callable[[int], None]:
    import ipywidgets
    from IPython.display import display

    bar = ipywidgets.IntProgress(value=0, min=0, max=total, description="accesses")
    display(bar)  # type: ignore[no-untyped-call]

    def update(done: int) -> None:
        bar.value = min(done, total)

    return update
