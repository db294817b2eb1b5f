"""The notebooks in a real browser: JupyterLab (and Notebook 7, which Binder also serves) in
Debian's Chromium, driven by Playwright.

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
    CURRENT,
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


def run(session: Session, notebook: str, ui: str = "lab") -> Any:
    """Open and run `notebook`; check it ran clean; return the page to interact with."""
    page = session.page
    open_notebook(page, session.lab.url(notebook, ui))
    screenshot(page, f"{ui}-{notebook.removesuffix('.ipynb')}")
    assert notebook_problems(page) == []
    return page


def widget_count(page: Any) -> int:
    return int(page.locator(f"{CURRENT} .jupyter-widgets").count())


def figure_count(page: Any) -> int:
    """Figures as learners see them: PNGs in cell outputs or inside widgets' outputs."""
    return int(page.locator(f"{CURRENT} .jp-OutputArea-output img").count())


def test_start_notebook_explorer_follows_a_typed_address(session: Session) -> None:
    page = run(session, "00-start-here.ipynb")
    assert widget_count(page) > 0 and figure_count(page) > 0
    gva = page.locator(f"{CURRENT} .widget-text", has=page.locator("label", has_text="GVA")).first
    explorer = gva.locator("xpath=ancestor::div[contains(@class,'widget-vbox')][1]")
    before = explorer.inner_text()
    gva.locator("input").fill("0x0")  # unmapped in every scenario: the walk now faults
    gva.locator("input").press("Enter")
    page.wait_for_function(
        "([element, before]) => element.innerText !== before",
        arg=[explorer.element_handle(), before],
        timeout=20_000,
    )
    assert "0x0" in explorer.inner_text(), "typing an address re-walks and changes the view"
    explorer.scroll_into_view_if_needed()
    screenshot(page, "lab-00-start-here-after-typing")


def test_ept_notebook_folds_its_traces(session: Session) -> None:
    """Notebook 04 shows each first touch as one line per exit, the full trace folded in a
    <details> that opens on a click."""
    page = run(session, "04-ept.ipynb")
    assert widget_count(page) > 0 and figure_count(page) > 0
    folded = page.locator(f"{CURRENT} details").first
    assert (
        "exit 1: 48 EPT_VIOLATION"
        in page.locator(f"{CURRENT} pre", has_text="exit 1:").first.inner_text()
    )
    folded.locator("summary").click()
    assert "VM exit 48 EPT_VIOLATION" in folded.inner_text()


@pytest.mark.parametrize("ui", ["lab", "notebook"])
def test_two_dimensional_walk_stepper_steps(session: Session, ui: str) -> None:
    page = run(session, "05-two-dimensional-walk.ipynb", ui)
    assert widget_count(page) > 0 and figure_count(page) > 0
    label = page.locator(f"{CURRENT} .widget-html", has_text=" of ").first
    before = label.inner_text()
    assert before.startswith("step 1 of ")
    page.locator(f"{CURRENT} .widget-button", has_text="next").first.click()
    page.wait_for_function(
        "before => [...document.querySelectorAll('.widget-html')]"
        ".some(e => e.innerText.includes(' of ') && e.innerText !== before)",
        arg=before,
        timeout=20_000,
    )
    assert label.inner_text().startswith("step 2 of ")
    label.scroll_into_view_if_needed()
    screenshot(page, f"{ui}-05-two-dimensional-walk-after-next")
