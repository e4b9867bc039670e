"""``vlpgraph run --dry-run`` names the trials a run would skip as completed, reading the store only."""

from __future__ import annotations

import hashlib
import re

import pytest

from tests.helpers import tiny_graph
from vlpgraph.cli import main
from vlpgraph.engine.sweep import load_experiment

TWO_SEEDS = "sweep:\n  seeds: [0, 1]\n"


def _dry_run(capsys, graph, store) -> str:
    capsys.readouterr()
    assert main(["run", str(graph), "--store", str(store), "--dry-run"]) == 0
    return capsys.readouterr().out


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.integration
def test_dry_run_says_which_trials_a_run_would_skip(tmp_path, capsys):
    one = tiny_graph(tmp_path, "one.yaml", train={"max_steps": 2})  # seed 0 only
    two = tiny_graph(tmp_path, "two.yaml", train={"max_steps": 2}, more=TWO_SEEDS)
    [done] = (t.run_id for t in load_experiment(one).trials)
    first, second = (t.run_id for t in load_experiment(two).trials)
    assert first == done  # the same trial: the sweep adds seed 1 beside it
    store = tmp_path / "store"

    out = _dry_run(capsys, two, store)  # no store yet: nothing to skip, and nothing is created
    assert re.findall(r"run_id=(\S+)", out) == [first, second]  # the list as before
    assert f"0 of 2 trial(s) would be skipped as already completed (no store at {store} yet)" in out
    assert not store.exists()

    assert main(["run", str(one), "--store", str(store)]) == 0
    db = store / "vlpgraph.duckdb"
    before = _digest(db)
    out = _dry_run(capsys, two, store)
    assert re.findall(r"run_id=(\S+)", out) == [first, second]
    assert f"[1/2] default seed=0: already completed ({first}), would be skipped" in out
    assert second not in out.split(f"run_id={second}", 1)[1]  # seed 1 is not named as skipped
    assert f"1 of 2 trial(s) would be skipped as already completed in {store}" in out
    assert _digest(db) == before  # read only

    # an edited evaluator is run again on a completed trial, which is then not skipped: the same rule as the run
    edited = tiny_graph(tmp_path, "edited.yaml", train={"max_steps": 2}, retrieval={"ks": [1, 2]}, more=TWO_SEEDS)
    assert [t.run_id for t in load_experiment(edited).trials] == [first, second]
    assert "0 of 2 trial(s) would be skipped" in _dry_run(capsys, edited, store)
    assert _digest(db) == before

    # and the run skips what the dry run said it would, nothing else
    capsys.readouterr()
    assert main(["run", str(two), "--store", str(store)]) == 0
    err = capsys.readouterr().err
    assert f"already completed ({first}), skipped" in err and err.count("already completed") == 1
