"""Only what pyproject.toml cannot say: the app lives at the repository's top level (app/, where people
look for it) but installs inside the package as ``vlpgraph.app``, so ``vlpgraph app`` works from any
install, editable or not, without ``sys.path`` edits."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["vlpgraph", "vlpgraph.*"]) + ["vlpgraph.app", "vlpgraph.app.views"],
    package_dir={"vlpgraph.app": "app"},
)
