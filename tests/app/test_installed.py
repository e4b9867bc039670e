"""The app ships with the package: a wheel of this checkout, installed (not editable) into a fresh
virtual environment, serves every page with `vlpgraph app --store S`, started outside the repository.

setup.py maps the repository's app/ folder into the package as ``vlpgraph.app``; before that, `vlpgraph
app` found the app at a path beside a source checkout and only worked from an editable install.

The fresh venv gets the wheel and nothing else; its dependencies (torch, streamlit, ...) are this
environment's, reached through a .pth line that names our site-packages folder. A path named in a .pth
file is only added to sys.path, the .pth files inside it are not run, so this checkout's editable-install
hook stays off and `import vlpgraph` finds the installed wheel (checked below).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.app.test_browser import CHROMIUM, PAGES, browser_page, render, serving
from tests.helpers import ROOT

pytestmark = [
    pytest.mark.browser,
    pytest.mark.integration,  # builds and installs a wheel, serves the app in a process of its own
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (run scripts/install-chromium)"),
]

# what a wheel is built from: pyproject.toml's and setup.py's inputs, nothing else of the checkout
SOURCES = ("pyproject.toml", "setup.py", "README.md", "vlpgraph", "app")
EVERY_PAGE = {**PAGES, "samples": ("Samples", 0)}


def run(*command, cwd: Path | None = None) -> str:
    res = subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{command}:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    return res.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The bin/ folder of a fresh venv holding a wheel of this checkout."""
    tmp = tmp_path_factory.mktemp("installed")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, src / name)
    # no build isolation: setuptools is this environment's, and nothing is downloaded
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", src)
    [wheel] = (tmp / "dist").glob("vlpgraph-*.whl")
    venv = tmp / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", wheel)
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv / "bin"


def test_the_wheel_holds_the_app_and_imports_it_from_the_venv(installed, tmp_path):
    where = run(installed / "python", "-c", "import vlpgraph, vlpgraph.app; print(vlpgraph.__file__); "
                "print(vlpgraph.app.__file__)", cwd=tmp_path).split()
    venv = installed.parent.resolve()
    assert all(Path(f).resolve().is_relative_to(venv) for f in where), where  # not this checkout's copy
    app = Path(where[1]).parent
    assert {"main.py", "common.py"} <= {p.name for p in app.iterdir()}
    assert {f"{name}.py" for name in ("runs", "ablations", "efficiency", "heatmaps", "samples", "graph")} <= {
        p.name for p in (app / "views").iterdir()}


def test_vlpgraph_app_from_the_installed_wheel_serves_every_page(installed, app_store, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    with serving([installed / "vlpgraph", "app"], app_store, cwd=tmp_path, env=env) as url, browser_page() as page:
        for path, (text, charts) in EVERY_PAGE.items():
            render(page, url, path, text, charts, f"installed-{path or 'runs'}")
