"""Answers that say something (issue 8, C): `vlpgraph runs` / `report` on a missing store, an unknown
graph or metric, trials stored under other params, a partial sweep; `--store` naming a file."""

from __future__ import annotations

import os

import pytest

from tests.helpers import tiny_graph
from vlpgraph.cli import main
from vlpgraph.store import Store
from vlpgraph.engine.sweep import load_experiment

MORE = "sweep:\n  seeds: [0, 1]\nprofiles:\n  two: {train.epochs: 2}\n  wide: {itc.embed_dim: 64}\n"


def fill(store: Store, exp, status: dict[int, str] | None = None) -> None:
    """Record the experiment's trials by hand (no training): completed with retrieval.rsum, unless
    ``status`` gives a trial (by seed) another status."""
    for t in exp.trials:
        state = (status or {}).get(t.seed, "completed")
        store.start_run(t.run_id, graph=exp.name, variant=t.variant, seed=t.seed, params=t.document(),
                        flat_params=t.flat_params(), device="cpu")
        if state == "completed":
            store.log_evals(t.run_id, [dict(step=16, evaluator="retrieval", metric="rsum", value=0.5 + t.seed)])
            store.finish_run(t.run_id, "completed", wall_s=3.0, train_samples=256, step=16)
        elif state == "failed":
            store.finish_run(t.run_id, "failed", error="boom")


@pytest.fixture
def graph(tmp_path):
    return tiny_graph(tmp_path, more=MORE)


def test_report_on_a_missing_store_says_so(tmp_path, graph, capsys):
    assert main(["report", str(graph), "--store", str(tmp_path / "nosuch")]) == 2
    err = capsys.readouterr().err
    assert f"no store at {tmp_path / 'nosuch'}" in err
    assert not (tmp_path / "nosuch").exists()  # looking created nothing


def test_runs_on_a_missing_store_says_so(tmp_path, capsys):
    assert main(["runs", "--store", str(tmp_path / "nosuch")]) == 2
    assert f"no store at {tmp_path / 'nosuch'}" in capsys.readouterr().err


@pytest.mark.parametrize("verb", ["run", "runs", "report", "app"])
def test_store_that_is_a_file_is_refused_by_every_verb(tmp_path, graph, capsys, monkeypatch, verb):
    def no_exec(*args):  # `app` would become streamlit: fail instead
        raise AssertionError("the app was started")

    monkeypatch.setattr(os, "execve", no_exec)
    afile = tmp_path / "afile"
    afile.write_text("not a store")
    argv = {"run": ["run", str(graph)], "runs": ["runs"], "report": ["report", str(graph)], "app": ["app"]}[verb]
    assert main([*argv, "--store", str(afile)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"vlpgraph: --store {afile} is a file: a store is a directory "
                       "(it holds vlpgraph.duckdb, runs/, cache/)")
    assert afile.read_text() == "not a store"


def test_store_given_as_the_database_file_suggests_its_folder(tmp_path, graph, capsys):
    store = Store(tmp_path / "s")
    fill(store, load_experiment(graph))
    assert main(["runs", "--store", str(store.db_path)]) == 2
    assert f"(did you mean --store {store.root}?)" in capsys.readouterr().err


def test_store_from_the_environment_that_is_a_file(tmp_path, capsys, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("")
    monkeypatch.setenv("VLPGRAPH_STORE", str(afile))
    assert main(["runs"]) == 2
    assert f"$VLPGRAPH_STORE={afile} is a file" in capsys.readouterr().err


def test_runs_of_an_unknown_graph_names_the_graphs_there(tmp_path, graph, capsys):
    store = Store(tmp_path / "s")
    fill(store, load_experiment(graph))
    assert main(["runs", "--store", str(store.root), "--graph", "tiny"]) == 0
    capsys.readouterr()
    assert main(["runs", "--store", str(store.root), "--graph", "tinny"]) == 2
    err = capsys.readouterr().err
    assert f"no runs of graph 'tinny' in {store.root} (did you mean 'tiny'?); graphs there: tiny" in err


def test_runs_with_a_status_nothing_has_says_what_there_is(tmp_path, graph, capsys):
    store = Store(tmp_path / "s")
    fill(store, load_experiment(graph))
    assert main(["runs", "--store", str(store.root), "--status", "failed"]) == 0
    assert f"no failed runs in {store.root} (there: 2 completed)" in capsys.readouterr().out


def test_report_with_a_mistyped_metric_suggests_the_metrics_there(tmp_path, graph, capsys):
    store = Store(tmp_path / "s")
    fill(store, load_experiment(graph))
    assert main(["report", str(graph), "--store", str(store.root), "--metric", "retrieval.rsun"]) == 2
    err = capsys.readouterr().err
    assert "--metric retrieval.rsun: no trial of graph 'tiny' has this metric (did you mean 'retrieval.rsum'?)" in err
    assert "(retrieval's metrics: retrieval.rsum)" in err
    assert main(["report", str(graph), "--store", str(store.root), "--metric", "retreival.rsum"]) == 2
    assert "(did you mean 'retrieval.rsum'?) (metrics there: retrieval.rsum, wall_s)" in capsys.readouterr().err
    assert main(["report", str(graph), "--store", str(store.root), "--metric", "retrieval.rsum"]) == 0


def test_report_without_the_runs_profile_says_how_the_stored_runs_differ(tmp_path, graph, capsys):
    store = Store(tmp_path / "s")
    fill(store, load_experiment(graph, profile="two"))
    assert main(["report", str(graph), "--store", str(store.root)]) == 2
    err = capsys.readouterr().err
    assert f"none of the 2 trial(s) of graph 'tiny' ({graph}) is in the store {store.root}" in err
    assert "runs of graph 'tiny' exist there under other params: 2 runs with train.epochs=2 (here 1)" in err
    assert err.rstrip().endswith("did you forget --profile two?")
    # the profile finds them
    assert main(["report", str(graph), "--store", str(store.root), "--profile", "two"]) == 0
    assert "2/2 trials done" in capsys.readouterr().out
    # with the wrong profile: both differences, and the right one named
    assert main(["report", str(graph), "--store", str(store.root), "--profile", "wide"]) == 2
    err = capsys.readouterr().err
    assert "2 runs with itc.embed_dim=32 (here 64), train.epochs=2 (here 1)" in err
    assert err.rstrip().endswith("try --profile two")


def test_report_without_the_runs_set_names_the_param(tmp_path, graph, capsys):
    store = Store(tmp_path / "s")
    fill(store, load_experiment(graph, sets=[("train.lr", 0.002)]))
    assert main(["report", str(graph), "--store", str(store.root)]) == 2
    err = capsys.readouterr().err
    assert "2 runs with train.lr=0.002 (here 0.001)" in err
    assert "did you forget" not in err  # no profile holds them


def test_report_of_a_graph_with_no_runs_names_the_graphs_there(tmp_path, graph, capsys):
    store = Store(tmp_path / "s")
    other = load_experiment(graph)
    other.name = "other"
    fill(store, other)  # same trials under another graph name would be found by run id: change them
    exp = load_experiment(graph, profile="two")
    assert main(["report", str(graph), "--store", str(store.root), "--profile", "two"]) == 2
    err = capsys.readouterr().err
    assert f"none of the 2 trial(s) of graph 'tiny' ({graph}, --profile two) is in the store" in err
    assert "nor any run of that graph name (graphs there: other)" in err
    assert len(exp.trials) == 2


def test_partial_report_tells_failed_from_not_run(tmp_path, capsys):
    more = "sweep:\n  seeds: [0, 1, 2]\n"
    graph = tiny_graph(tmp_path, more=more)
    exp = load_experiment(graph)
    store = Store(tmp_path / "s")
    exp_stored = load_experiment(graph)
    exp_stored.trials = exp_stored.trials[:2]  # seed 2 never ran
    fill(store, exp_stored, status={1: "failed"})
    graph_b = tiny_graph(tmp_path, name="b.yaml", more="sweep:\n  seeds: [1, 2]\n")
    assert main(["report", str(graph_b), "--store", str(store.root)]) == 0
    out = " ".join(capsys.readouterr().out.split())  # titles wrap to the table's width
    assert "0/2 trials done" in out
    assert "│ default │ failed │" in out  # seed 1 failed, seed 2 never ran: the cell says failed
    assert "'-' none yet (not run, or not evaluated)" in out
    assert main(["report", str(graph), "--store", str(store.root)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "1/3 trials done" in out and "│ default │ 0.500 ± 0.000 (1) │" in out
    assert len(exp.trials) == 3
