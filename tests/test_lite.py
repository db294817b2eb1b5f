"""The tutorial as a static JupyterLite site (issue 17): built once per test run with
`lite/build.py` (what `make lite` runs), served from 127.0.0.1 by a plain static file server,
and driven in Debian's Chromium. Every request the page makes is routed: one that leaves
127.0.0.1 is refused and fails the test, so the site is checked to need no other host.

The notebooks run on Pyodide in the page itself: no Jupyter server, no kernel process.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from browser import ALL_RUN, CHROMIUM, CURRENT, ROOT, browser_unavailable, screenshot
from browser import notebook_problems as problems_on

SITE = ROOT / "build" / "lite"
# Matplotlib says so on stderr the first time a fresh browser profile imports it (Pyodide has
# no font cache yet); it is not a problem of the notebook.
FONT_CACHE = "Matplotlib is building the font cache"
NOTEBOOKS = tuple(sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb")))


def _source(notebook: str) -> str:
    cells = json.loads((ROOT / "notebooks" / f"{notebook}.ipynb").read_text())["cells"]
    return "".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


@dataclass
class Site:
    """The served site, the browser, and every request that tried to leave 127.0.0.1."""

    browser: Any
    url: str
    outside: list[str] = field(default_factory=list)
    page: Any = None

    def new_page(self) -> Any:
        """A fresh tab in a fresh profile (no workspace or files kept from another test),
        every request routed."""
        if self.page is not None:
            self.page.context.close()
        context = self.browser.new_context(viewport={"width": 1400, "height": 1000})
        context.route("**/*", self._route)
        self.page = context.new_page()
        return self.page

    def _route(self, request_route: Any) -> None:
        url = request_route.request.url
        if url.startswith(self.url):
            request_route.continue_()
        else:
            self.outside.append(url)
            request_route.abort()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        del format, args


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    reason = browser_unavailable()
    if reason is not None:
        if os.environ.get("TWODWALK_REQUIRE_BROWSER") == "1":
            pytest.fail(f"TWODWALK_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    subprocess.run([sys.executable, str(ROOT / "lite" / "build.py")], check=True, timeout=1800)
    from playwright.sync_api import sync_playwright

    handler = functools.partial(_Quiet, directory=str(SITE))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    origin = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=str(CHROMIUM), args=["--no-sandbox"]
            )
            yield Site(browser, origin)
            browser.close()
    finally:
        server.shutdown()


def run_all(site: Site, notebook: str) -> Any:
    """Open `notebook` in the site's JupyterLab, wait for the Pyodide kernel, run every cell
    and wait until each code cell has an execution count."""
    page = site.new_page()
    page.goto(f"{site.url}lab/index.html?path={notebook}.ipynb")
    page.wait_for_selector(f"{CURRENT} .jp-Cell", timeout=60_000)
    page.wait_for_function(
        "() => [...document.querySelectorAll('span')]"
        ".some(e => (e.textContent || '').includes('Kernel status: Idle'))",
        timeout=180_000,
    )
    page.wait_for_timeout(1500)
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_text("Run All Cells", exact=True).click()
    page.wait_for_function(ALL_RUN, timeout=300_000)
    screenshot(page, f"lite-{notebook}")
    return page


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_notebook_runs_in_the_browser_with_nothing_from_outside(site: Site, notebook: str) -> None:
    """Every notebook of the sequence, top to bottom, in the site; then what a learner does
    there (`INTERACTIONS`)."""
    page = run_all(site, notebook)
    problems = [p for p in problems_on(page) if not p.startswith(FONT_CACHE)]
    assert problems == [], f"{notebook} in JupyterLite: {problems}"
    source = _source(notebook)
    if "widgets." in source:  # the notebook shows widgets: they rendered
        assert page.locator(f"{CURRENT} .jupyter-widgets").count() > 0, "widgets rendered"
    if "plot_" in source:  # it draws figures: they are there
        assert page.locator(f"{CURRENT} .jp-OutputArea-output img").count() > 0, "figures drawn"
    INTERACTIONS.get(notebook, lambda page: None)(page)
    assert site.outside == [], f"requests that left 127.0.0.1: {site.outside[:5]}"


def says_the_browser_has_no_kvm(page: Any) -> None:
    text = page.locator(CURRENT).inner_text()
    assert "real KVM needs Linux on x86-64" in text and "skipped" in text


def the_stepper_steps(page: Any) -> None:
    label = page.locator(f"{CURRENT} .widget-html", has_text=" of ").first
    label.scroll_into_view_if_needed()
    before = label.inner_text()
    assert before.startswith("step 1 of ")
    button = page.locator(f"{CURRENT} .widget-button", has_text="next").first
    button.scroll_into_view_if_needed()
    button.click()
    page.wait_for_function(
        "before => [...document.querySelectorAll('.widget-html')]"
        ".some(e => e.innerText.includes(' of ') && e.innerText !== before)",
        arg=before,
        timeout=20_000,
    )
    assert label.inner_text().startswith("step 2 of ")


def the_address_explorer_walks_on_enter(page: Any) -> None:
    gva = page.locator(f"{CURRENT} .widget-text", has=page.locator("label", has_text="GVA")).first
    gva.scroll_into_view_if_needed()
    explorer = gva.locator("xpath=ancestor::div[contains(@class,'widget-vbox')][1]")
    before = explorer.inner_text()
    gva.locator("input").fill("0x0")
    gva.locator("input").press("Enter")
    page.wait_for_function(
        "([element, before]) => element.innerText !== before",
        arg=[explorer.element_handle(), before],
        timeout=20_000,
    )
    assert "0x0" in explorer.inner_text(), "Enter re-walks the typed address"


INTERACTIONS = {
    "00-start-here": the_address_explorer_walks_on_enter,
    "05-two-dimensional-walk": the_stepper_steps,
    "90-check-on-real-kvm": says_the_browser_has_no_kvm,
}


def test_the_site_holds_everything_it_loads() -> None:
    """What the kernel may load is in the site's own lock, each wheel beside it."""
    if not SITE.exists():
        pytest.skip("the site is built by the browser tests above")
    lock = (SITE / "static" / "pyodide" / "pyodide-lock.json").read_text()
    packages = json.loads(lock)["packages"]
    assert {"twodwalk", "matplotlib", "numpy", "networkx", "ipywidgets", "comm"} <= set(packages)
    for entry in packages.values():
        assert (SITE / "static" / "pyodide" / entry["file_name"]).is_file(), entry["file_name"]
    config = (SITE / "jupyter-lite.json").read_text()
    assert '"disablePyPIFallback": true' in config
