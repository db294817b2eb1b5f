"""The notebooks in a real browser: JupyterLab in Debian's Chromium, driven by Playwright.

Each test opens a tutorial notebook, runs all cells, and checks what a learner would see: no
error output, widgets rendered (no "Error displaying widget"), figures drawn; then it clicks
and types and checks the view changed. Screenshots go to artifacts/browser/ (ignored by git).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from browser import (
    CHROMIUM,
    JupyterLab,
    browser_unavailable,
    notebook_problems,
    open_notebook,
    screenshot,
)


@dataclass
class Session:
    """One Chromium tab on one JupyterLab server, for the whole module."""

    page: Any
    lab: JupyterLab


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    reason = browser_unavailable()
    if reason is not None:
        if os.environ.get("TWODWALK_REQUIRE_BROWSER") == "1":
            pytest.fail(f"TWODWALK_REQUIRE_BROWSER=1 but {reason}")
        print(f"browser tests skipped: {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    workdir: Path = tmp_path_factory.mktemp("jupyterlab")
    with JupyterLab(workdir) as lab, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        tab = browser.new_page(viewport={"width": 1400, "height": 1000})
        yield Session(tab, lab)
        browser.close()


def run(session: Session, notebook: str) -> Any:
    """Open and run `notebook`; check it ran clean; return the page to interact with."""
    page = session.page
    open_notebook(page, session.lab, notebook)
    screenshot(page, notebook.removesuffix(".ipynb"))
    assert notebook_problems(page) == []
    return page


def test_start_notebook_runs_clean_in_jupyterlab(session: Session) -> None:
    run(session, "00-start-here.ipynb")
