"""The JupyterLite site's figures for the benchmark table: each notebook's run-all time in
Debian's Chromium (the Pyodide kernel's start counted apart), and the cold traced 4x4 walk
rate under Pyodide, measured in a cell added to a notebook there.

The site is built with `lite/build.py` when build/lite/ is missing; nothing runs where
Chromium or Playwright is missing (the caller leaves the rows out).
"""

from __future__ import annotations

import functools
import http.server
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from browser import ALL_RUN, CHROMIUM, CURRENT, browser_unavailable  # noqa: E402

SITE = ROOT / "build" / "lite"
IDLE = (
    "() => [...document.querySelectorAll('span')]"
    ".some(e => (e.textContent || '').includes('Kernel status: Idle'))"
)
WALK_RATE = (
    "import time, twodwalk as tw\n"
    "m = tw.Machine(guest_ram=16 << 20)\n"
    "m.guest.map(0x40000000, 0x100000, 64 * 4096, rw=1)\n"
    "[m.vcpu.access(0x40000000 + p * 4096, 'write', p) for p in range(64)]\n"
    "m.vcpu.caches.off()\n"
    "t = time.perf_counter()\n"
    "for i in range(500): m.vcpu.access(0x40000000 + (i % 64) * 4096, 'read')\n"
    "print('RATE', 500 / (time.perf_counter() - t))"
)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        del format, args


def available() -> str | None:
    """Why the site cannot be measured here, or None."""
    return browser_unavailable()


@contextmanager
def _served() -> Iterator[tuple[Any, str]]:
    if not SITE.exists():
        subprocess.run([sys.executable, str(ROOT / "lite" / "build.py")], check=True)
    from playwright.sync_api import sync_playwright

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Quiet, directory=str(SITE))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=str(CHROMIUM), args=["--no-sandbox"]
            )
            yield browser, f"http://127.0.0.1:{server.server_address[1]}/"
            browser.close()
    finally:
        server.shutdown()


def _open(browser: Any, url: str, notebook: str) -> tuple[Any, float]:
    """A fresh profile's tab on `notebook`, and the seconds until its kernel was idle."""
    page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    start = time.perf_counter()
    page.goto(f"{url}lab/index.html?path={notebook}.ipynb")
    page.wait_for_function(IDLE, timeout=180_000)
    return page, time.perf_counter() - start


def notebook_times(notebooks: list[str]) -> tuple[dict[str, float], float]:
    """Run-all seconds per notebook once its kernel is idle, and the slowest kernel start."""
    times: dict[str, float] = {}
    slowest_start = 0.0
    with _served() as (browser, url):
        for notebook in notebooks:
            page, started = _open(browser, url, notebook)
            slowest_start = max(slowest_start, started)
            page.wait_for_timeout(1500)
            start = time.perf_counter()
            page.get_by_role("menuitem", name="Run", exact=True).click()
            page.get_by_text("Run All Cells", exact=True).click()
            page.wait_for_function(ALL_RUN, timeout=600_000)
            times[notebook] = time.perf_counter() - start
            page.context.close()
    return times, slowest_start


def walk_rate() -> float:
    """Cold traced 4x4 walks per second in the site's Pyodide kernel."""
    with _served() as (browser, url):
        page, _ = _open(browser, url, "00-start-here")
        page.wait_for_timeout(1500)
        page.locator(f"{CURRENT} .jp-Cell").last.click()
        page.keyboard.press("Escape")
        page.keyboard.press("b")  # a new code cell below, in command mode
        page.keyboard.press("Enter")
        page.keyboard.insert_text(WALK_RATE)
        page.keyboard.press("Shift+Enter")
        output = page.locator(f"{CURRENT} .jp-OutputArea-output", has_text="RATE").last
        output.wait_for(timeout=180_000)
        rate = float(output.inner_text().split("RATE")[1].split()[0])
        page.context.close()
    return rate
