"""Driving the notebooks as a learner meets them: JupyterLab in Debian's Chromium.

`JupyterLab` starts `jupyter lab` on a free localhost port with a token, on a copy of the
notebooks, with notebook windowing off (JupyterLab otherwise leaves off-screen cells out of
the DOM) and without the news pop-up. `open_notebook` opens one in Chromium through
Playwright, runs every cell from the Run menu and waits for the kernel to finish.

The browser is always `/usr/bin/chromium` from Debian's package, never a downloaded build.
`browser_unavailable()` says why the browser tests cannot run here; they skip with that
reason unless TWODWALK_REQUIRE_BROWSER=1 (set by `.ci/run`), which turns the skip into a
failure.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "artifacts" / "browser"
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false"},
}
CURRENT = ".jp-NotebookPanel:not(.lm-mod-hidden)"  # the notebook in view, not other tabs
STDERR = f"{CURRENT} .jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"
# Done when every code cell has an execution count, or a cell raised (the rest never run).
ALL_RUN = """() => {
    const prompts = [...document.querySelectorAll("CURRENT .jp-CodeCell .jp-InputArea-prompt")]
        .map(e => e.textContent || '');
    const raised = [...document.querySelectorAll("STDERR")]
        .some(e => (e.textContent || '').includes('Traceback'));
    return raised || (prompts.length > 0 && prompts.every(t => /\\[\\d+\\]/.test(t)));
}""".replace("STDERR", STDERR).replace("CURRENT", CURRENT)


def browser_unavailable() -> str | None:
    """Why the browser tests cannot run on this machine, or None."""
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (Debian package `chromium`)"
    if importlib.util.find_spec("playwright") is None:
        return "the Python package `playwright` is not installed"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class JupyterLab:
    """A `jupyter lab` server on a copy of notebooks/, stopped on exit."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = _free_port()
        self.token = secrets.token_hex(16)
        self.log_path = workdir / "jupyter-lab.log"
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> JupyterLab:
        notebooks = self.workdir / "notebooks"
        shutil.copytree(ROOT / "notebooks", notebooks)
        settings = self.workdir / "settings"
        for name, values in LAB_SETTINGS.items():
            path = settings / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))
        command = [
            sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1",
            f"--port={self.port}", f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={notebooks}", f"--LabApp.user_settings_dir={settings}",
            f"--LabApp.workspaces_dir={self.workdir / 'workspaces'}",
        ]  # fmt: skip
        if os.geteuid() == 0:
            command.append("--allow-root")
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        self._wait_for_port(timeout=90)
        return self

    def _wait_for_port(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(f"jupyter lab exited:\n{self.log_path.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.5).close()
                return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"jupyter lab did not listen in {timeout} s")

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._process.kill()

    def url(self, notebook: str, ui: str = "lab") -> str:
        """The notebook in JupyterLab, alone in a fresh workspace (`reset`: no tabs restored
        from before), or in Notebook 7 (`ui="notebook"`), which Binder also serves."""
        if ui == "notebook":
            return f"http://127.0.0.1:{self.port}/notebooks/{notebook}?token={self.token}"
        return f"http://127.0.0.1:{self.port}/lab/tree/{notebook}?reset&token={self.token}"


def open_notebook(page: Any, url: str, timeout_s: float = 180) -> None:
    """Open the notebook at `url` (JupyterLab or Notebook 7: both have the same notebook
    panel and Run menu), wait for its kernel, run all cells and wait until every code cell
    has an execution count."""
    page.goto(url)
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
    page.wait_for_function(
        "() => [...document.querySelectorAll('span')]"
        ".some(e => (e.textContent || '').includes('Kernel status: Idle'))",
        timeout=60_000,
    )
    page.wait_for_timeout(1500)  # the status bar says Idle a moment before the session is up
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_text("Run All Cells", exact=True).click()
    page.wait_for_function(ALL_RUN, timeout=timeout_s * 1000)


def notebook_problems(page: Any) -> list[str]:
    """What a learner would see go wrong: tracebacks and warnings (both on stderr), widgets
    that failed to render."""
    problems = [(e.text_content() or "")[:400] for e in page.query_selector_all(STDERR)]
    if "Error displaying widget" in (page.text_content(CURRENT) or ""):
        problems.append("Error displaying widget")
    return problems


def screenshot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
