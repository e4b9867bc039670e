#!/usr/bin/env python
"""A screenshot of one page of the analysis app on a real store, for docs/app/ (linked from the README).

    python scripts/screenshot_app.py --store DIR --page samples --out docs/app/samples.png \
        [--choose "side by side with=captioner"] [--choose "sample=#3"]

Serves `vlpgraph app` on a free port, opens the page in Debian's Chromium through Playwright (as
tests/app/test_browser.py does: `scripts/install-chromium` installs it), picks options in select boxes
(``--choose LABEL=TEXT``: the box whose label is LABEL, the first option matching what is typed; in a
radio group labelled LABEL, its option TEXT), waits until Streamlit is idle and saves a full-page
screenshot. Exits non-zero, with a FAILED screenshot beside ``--out``, when the page shows an exception
or does not render.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's vlpgraph, also for the app it serves

from vlpgraph.store import DB_NAME  # noqa: E402
CHROMIUM = "/usr/bin/chromium"
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run", "--disable-quic"]
# url path of each page -> its title (what shows once it rendered); keep in step with app/main.py
PAGES = {"runs": "Runs", "ablations": "Ablations", "efficiency": "Data efficiency", "heatmaps": "Patch heatmaps",
         "samples": "Samples", "graph": "Graph"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(store: Path, port: int, timeout_s: float = 90) -> subprocess.Popen:
    """`vlpgraph app` on 127.0.0.1:port, returned once it answers its health check."""
    env = {**os.environ, "VLPGRAPH_STORE": str(store), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "vlpgraph.cli", "app", "--port", str(port)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).read() == b"ok":
                return proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            out = proc.stdout.read().decode() if proc.poll() is not None else "(still running)"
            stop(proc)
            raise SystemExit(f"screenshot_app: vlpgraph app did not come up on port {port}: {out}")
        time.sleep(0.3)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def idle(page, settle_ms: int = 700) -> None:
    """Wait until the script run ends (Streamlit's status widget goes away), then let canvases paint."""
    page.wait_for_function("!document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=60_000)
    page.wait_for_timeout(settle_ms)


def choose(page, label: str, text: str) -> None:
    """Pick, in the select box labelled ``label`` (main area or sidebar), the first option matching ``text``;
    in a radio group labelled ``label``, the option reading ``text``."""
    title = page.locator("[data-testid='stWidgetLabel']").get_by_text(label, exact=True)
    radio = page.locator("[data-testid='stRadio']").filter(has=title)
    if radio.count():
        radio.first.get_by_text(text, exact=True).click()
        idle(page)
        return
    box = page.locator("[data-testid='stSelectbox']").filter(has_text=label).first
    box.click()
    page.keyboard.type(text)
    page.keyboard.press("Enter")
    idle(page)


def screenshot(store: Path, page_name: str, out: Path, choices: list[tuple[str, str]] = (),
               width: int = 1600, height: int = 2000) -> Path:
    """Serve the app on ``store``, open ``page_name``, make the ``choices`` and save a full-page PNG to
    ``out``; returns ``out``. SystemExit (with a FAILED screenshot) when the page shows an exception."""
    from playwright.sync_api import sync_playwright

    out.parent.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = serve(store, port)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
            try:
                # Streamlit scrolls inside its own container: a tall viewport shows the page whole
                page = browser.new_page(viewport={"width": width, "height": height})
                page.goto(f"http://127.0.0.1:{port}/{'' if page_name == 'runs' else page_name}")
                page.get_by_role("heading", name=PAGES[page_name]).first.wait_for(timeout=60_000)
                idle(page)
                for label, text in choices:
                    choose(page, label, text)
                if page.locator("[data-testid='stException']").count():
                    failed = out.with_name(out.stem + "-FAILED.png")
                    page.screenshot(path=str(failed), full_page=True)
                    raise SystemExit(f"screenshot_app: the {page_name} page shows an exception (see {failed})")
                page.screenshot(path=str(out), full_page=True)
            finally:
                browser.close()
    finally:
        stop(proc)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", type=Path, required=True, help="the store directory to show")
    ap.add_argument("--page", choices=sorted(PAGES), required=True)
    ap.add_argument("--out", type=Path, required=True, help="where the PNG goes (e.g. docs/app/samples.png)")
    ap.add_argument("--choose", action="append", default=[], metavar="LABEL=TEXT",
                    help="pick an option in the select box labelled LABEL by typing TEXT (repeatable, in order; "
                         "e.g. 'graph=mug', 'run=mug/mug', 'side by side with=captioner', 'sample=#3')")
    ap.add_argument("--width", type=int, default=1600)
    ap.add_argument("--height", type=int, default=2000)
    args = ap.parse_args(argv)
    if not Path(CHROMIUM).exists():
        raise SystemExit(f"screenshot_app: {CHROMIUM} is missing (run scripts/install-chromium)")
    if not (args.store / DB_NAME).exists():
        raise SystemExit(f"screenshot_app: {args.store} holds no store (no {DB_NAME})")
    choices = []
    for item in args.choose:
        label, sep, text = item.partition("=")
        if not sep:
            raise SystemExit(f"screenshot_app: --choose {item!r}: expected LABEL=TEXT")
        choices.append((label.strip(), text))
    out = screenshot(args.store.resolve(), args.page, args.out, choices, args.width, args.height)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
