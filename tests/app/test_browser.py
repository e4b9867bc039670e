"""The app in a real browser: `vlpgraph app` on a free port, Debian's Chromium driven by Playwright.

Each page is opened, its key content awaited, no exception box allowed, and a screenshot saved to
tests/screenshots/ (git-ignored). Needs /usr/bin/chromium (`scripts/install-chromium`; `.ci/run`
installs it).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from tests.helpers import ROOT
from vlpgraph.store import Store

CHROMIUM = "/usr/bin/chromium"
SHOTS = ROOT / "tests" / "screenshots"
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run", "--disable-quic"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.integration,  # `vlpgraph app` in a process of its own, on the store of real runs (app_store)
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (run scripts/install-chromium)"),
]

# Streamlit scrolls inside its own container, so a full-page screenshot is only as tall as the
# viewport: a tall viewport shows each page whole.
# url path -> text the page must show once it has rendered, and how many plotly charts it draws
PAGES = {
    "": ("12 runs shown", 0),  # the default page (Runs); the sidebar picks the newest graph: timix_sweep
    "ablations": ("Download CSV", 1),
    "efficiency": ("Where each variant reaches", 2),
    "heatmaps": ("Mixed samples", 1),
    "graph": ("itc", 1),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(command: list[str], store: Path, cwd: Path, env: dict | None = None) -> Iterator[str]:
    """``command`` (a `vlpgraph app` command line, without --port) serving ``store`` on a free port, run
    in ``cwd``: yields the app's URL once Streamlit answers its health check; stopped on leaving."""
    port = free_port()
    env = {**(os.environ if env is None else env), "VLPGRAPH_STORE": str(store)}
    proc = subprocess.Popen([*command, "--port", str(port)], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            if urllib.request.urlopen(url + "/_stcore/health", timeout=2).read() == b"ok":
                break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            out = proc.stdout.read().decode() if proc.poll() is not None else "(still running)"
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"vlpgraph app did not come up on {url}: {out}")
        time.sleep(0.3)
    try:
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@contextmanager
def browser_page() -> Iterator:
    """A Playwright page in Debian's Chromium, with a viewport tall enough to show each page whole."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        try:
            yield browser.new_page(viewport={"width": 1600, "height": 2000})
        finally:
            browser.close()


def render(page, url: str, path: str, text: str, charts: int, shot: str) -> None:
    """Opens page ``path`` of the app at ``url`` and waits until it shows ``text`` and ``charts`` plotly
    charts and Streamlit is idle; no exception box, no "Page not found"; a screenshot ``shot``.png."""
    SHOTS.mkdir(exist_ok=True)
    page.goto(f"{url}/{path}")
    try:
        page.get_by_text(text, exact=False).first.wait_for(timeout=60_000)
    except Exception:
        page.screenshot(path=str(SHOTS / f"{shot}-FAILED.png"), full_page=True)
        raise
    if charts:
        page.locator(".js-plotly-plot").nth(charts - 1).wait_for(timeout=60_000)
    # let the script finish (the status widget disappears when Streamlit is idle)
    page.wait_for_function("!document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=60_000)
    page.wait_for_timeout(500)  # canvas-drawn tables (st.dataframe) paint after the script ends
    assert page.locator("[data-testid='stException']").count() == 0, f"{path}: an exception is shown"
    assert page.get_by_text("Page not found").count() == 0, path
    assert page.locator(".js-plotly-plot").count() >= charts, path
    page.screenshot(path=str(SHOTS / f"{shot}.png"), full_page=True)


@pytest.fixture
def served(app_store):
    with serving([sys.executable, "-m", "vlpgraph.cli", "app"], app_store, ROOT) as url:
        yield url


def test_every_page_renders_in_chromium(served, app_store):
    with browser_page() as page:
        for path, (text, charts) in PAGES.items():
            render(page, served, path, text, charts, path or "runs")
            if path == "":  # pick two runs to compare: the config diff and their curves appear
                compare = page.locator("[data-testid='stMultiSelect']").filter(has_text="runs to compare")
                for variant in ("baseline", "timix"):
                    [run] = Store(app_store).runs({"variant": variant, "shapes.train_fraction": 1.0})
                    compare.click()
                    page.keyboard.type(run["run_id"][:8])  # labels end with the run id's first 8 characters
                    page.keyboard.press("Enter")
                    page.keyboard.press("Escape")
                page.get_by_text("Config diff").wait_for(timeout=60_000)
                page.locator(".js-plotly-plot").last.wait_for(timeout=60_000)  # the first is in a closed expander
                page.wait_for_timeout(500)
                assert page.locator("[data-testid='stException']").count() == 0
                page.screenshot(path=str(SHOTS / "runs-compare.png"), full_page=True)
            if path == "ablations":  # the download is exactly the table shown
                with page.expect_download() as download:
                    page.get_by_text("Download CSV").click()
                lines = Path(download.value.path()).read_text().splitlines()
                assert lines[0] == "variant,0.1,0.2,0.4,1"
                assert [line.split(",")[0] for line in lines[1:]] == ["baseline", "cutmix", "timix"]
                assert all(cell.endswith("(1)") for line in lines[1:] for cell in line.split(",")[1:])
