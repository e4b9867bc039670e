"""docs/writing-a-node-kind.md works as written: its Python block registers the kind, its graph trains
with it (the kind's loss term reaches the store), and its wrongly wired graph fails validation with the
message the page shows.

The page marks what this test runs with an HTML comment right above a fenced block:
``<!-- tested: python -->``, ``<!-- tested: graph -->``, ``<!-- tested: validate-error -->``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from vlpgraph.cli import main
from vlpgraph.engine import registry
from vlpgraph.store import Store

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "writing-a-node-kind.md"
KIND = "objective.cls_norm"
TERM = "cls_norm"


def page_block(name: str) -> str:
    """The fenced block right after ``<!-- tested: name -->`` (exactly one)."""
    found = re.findall(rf"<!-- tested: {re.escape(name)} -->\n```[a-z]*\n(.*?)\n```", PAGE.read_text(encoding="utf-8"),
                       re.S)
    assert len(found) == 1, f"{PAGE.name}: expected one block marked 'tested: {name}', found {len(found)}"
    return found[0]


@pytest.fixture
def walkthrough_kind():
    """Run the page's Python block (it registers the kind); unregister the kind afterwards, so other tests
    (the node catalog, `vlpgraph nodes`) see only the built-in kinds."""
    registry.load_builtin_kinds()
    assert KIND not in registry.kinds(), f"{KIND} is a built-in kind now: give the walk-through another name"
    namespace = {"__name__": "docs_writing_a_node_kind"}
    try:
        exec(compile(page_block("python"), str(PAGE), "exec"), namespace)
        assert KIND in registry.kinds()
        yield namespace
    finally:
        registry._KINDS.pop(KIND, None)  # the registry has no public unregister


@pytest.mark.integration
def test_the_kind_trains_and_its_term_reaches_the_store(walkthrough_kind, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("cls_norm.yaml").write_text(page_block("graph") + "\n")
    assert main(["validate", "cls_norm.yaml"]) == 0, capsys.readouterr().err
    assert main(["run", "cls_norm.yaml", "--profile", "tiny", "--store", "store"]) == 0, capsys.readouterr().err
    store = Store(tmp_path / "store")
    [run] = store.runs()
    assert run["status"] == "completed"
    doc = run["params"]
    assert f'"kind": "{KIND}"' in doc or f'"kind":"{KIND}"' in doc
    rows = store.query("SELECT step, value FROM metrics WHERE name = ? ORDER BY step", [TERM])
    assert rows, f"no '{TERM}' rows in the store's metrics"
    assert all(math.isfinite(r["value"]) and r["value"] > 0 for r in rows)
    # the term is in the loss the trainer logs: loss = itc + cls_norm (both weighted) at each logged step
    for r in rows:
        [loss] = store.query("SELECT value FROM metrics WHERE name = 'loss' AND step = ?", [r["step"]])
        [itc] = store.query("SELECT value FROM metrics WHERE name = 'itc' AND step = ?", [r["step"]])
        assert loss["value"] == pytest.approx(itc["value"] + r["value"], rel=1e-4)


def test_wrong_wiring_fails_validation_as_the_page_says(walkthrough_kind, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    graph = page_block("graph")
    right = "  norm:\n    kind: objective.cls_norm\n    inputs: {vision: vision}\n"
    assert graph.count(right) == 1
    Path("cls_norm.yaml").write_text(graph.replace(right, right.replace("{vision: vision}", "{vision: text}")) + "\n")
    assert main(["validate", "cls_norm.yaml"]) == 2
    err = capsys.readouterr().err
    assert f"vlpgraph: {page_block('validate-error').strip()}" in err.splitlines(), err
