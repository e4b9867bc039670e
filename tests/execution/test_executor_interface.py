"""The executor interface is enough to write an executor: a third one, written here with public
names only, runs a sweep end to end and leaves the store the sequential executor leaves. And no
module of the execution package (nor the command line) reaches into another's private names."""

from __future__ import annotations

import ast
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.helpers import tiny_graph
from vlpgraph.cli import main
from vlpgraph.engine.sweep import Experiment, load_experiment
from vlpgraph.execution.display import SweepDisplay
from vlpgraph.execution.executor import Executor, stop_on_signals
from vlpgraph.execution.ranks import resolve_device
from vlpgraph.execution.scheduler import Scheduler
from vlpgraph.execution.trial import TrialJob, TrialOutcome
from vlpgraph.store import Store

SWEEP = "sweep:\n  seeds: [0, 1]\n  grid:\n    train.lr: [1.0e-3, 2.0e-3]\n"
TIMING = ("compute_s", "data_wait_s", "samples_per_s")


class ReversedInAThread(Executor):
    """Runs the trials last to first, each trial's job on a pool of one worker thread (as an
    executor that hands jobs elsewhere would); leaves trials other runners hold to them."""

    def run(self, exp: Experiment) -> list[TrialOutcome]:
        s = self.scheduler
        s.queue(exp)
        outcomes: list[TrialOutcome] = []
        pending = list(reversed(exp.trials))
        # the worker thread trains with as many torch threads as this one (OpenMP's count is per thread)
        worker = ThreadPoolExecutor(max_workers=1, initializer=torch.set_num_threads, initargs=(torch.get_num_threads(),))
        with SweepDisplay(s.console) as display, worker as pool:
            while pending and not s.stopping():
                trial = pending.pop(0)
                claim = s.claim(exp, trial)
                if claim.held:
                    continue
                if not claim.claimed:
                    outcome = s.skipped(trial, claim)
                else:
                    display.add(trial.run_id, trial.run_id)
                    with s.holding(trial.run_id):
                        job = TrialJob(exp, trial, claim, s.sink(trial.run_id, display), root=s.store.root,
                                       device=s.device)
                        outcome = pool.submit(job.run).result()
                    display.remove(trial.run_id)
                outcomes.append(outcome)
                s.print_outcome(exp, outcome)
        s.not_run(pending)
        return outcomes


def _rows(store: Path) -> dict[str, list]:
    s = Store(store)
    keep = "run_id, graph, variant, seed, params, status, error, step, train_samples, device, attempts, owner, processes"
    timing = ", ".join(f"'{n}'" for n in TIMING)
    return {"runs": s.query(f"SELECT {keep} FROM runs ORDER BY run_id"),
            "metrics": s.query(f"SELECT run_id, step, epoch, name, value FROM metrics WHERE name NOT IN ({timing}) ORDER BY ALL"),
            "evals": s.query("SELECT * EXCLUDE (logged_at) FROM evals ORDER BY ALL")}


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # both executors' arithmetic bit for bit the same
    yield
    torch.set_num_threads(threads)


@pytest.mark.integration
def test_a_third_executor_from_public_names_gives_the_sequential_store(tmp_path, capsys, one_thread):
    graph = tiny_graph(tmp_path, train={"checkpoint_every": 2, "max_steps": 4}, more=SWEEP)
    exp = load_experiment(graph)
    assert main(["run", str(graph), "--store", str(tmp_path / "seq")]) == 0

    store = Store(tmp_path / "third")
    capsys.readouterr()
    executor = ReversedInAThread(Scheduler(store, resolve_device("cpu")))
    with executor, stop_on_signals(executor):
        outcomes = executor.run(exp)
    assert [o.trial.run_id for o in outcomes] == [t.run_id for t in reversed(exp.trials)]
    assert [o.status for o in outcomes] == ["completed"] * 4 and executor.stop_signal is None
    err = capsys.readouterr().err
    assert err.index("[4/4] ") < err.index("[1/4] ")  # the outcome lines, in the order the trials ended
    assert _rows(store.root) == _rows(tmp_path / "seq")

    # the same command again: every trial is skipped, nothing is written
    again = ReversedInAThread(Scheduler(store, resolve_device("cpu"))).run(exp)
    assert [o.status for o in again] == ["skipped"] * 4
    assert capsys.readouterr().err.count("already completed") == 4
    assert _rows(store.root) == _rows(tmp_path / "seq")


# ----------------------------------------------------------------------------------- privacy


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_the_third_executor_uses_no_private_name():
    """``x._name`` only on self or cls, and no ``from m import _name``, in this file: the executor above
    needs nothing private. (The package itself is held to the same by ruff's SLF001 and
    tests/test_architecture.py; tests are exempt from SLF001, so this file checks itself.)"""
    path = Path(__file__)
    hits = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                hits.append(f"{path.name}:{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.ImportFrom):
            hits += [f"{path.name}:{node.lineno}: import {a.name}" for a in node.names if _private(a.name)]
    assert not hits, hits
