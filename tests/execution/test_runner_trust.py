"""Issue 8, runner side: stale evaluations (2), one bad grid point (8), SIGTERM/SIGINT and dead
runners (9), two runners on one store (11). (The store's side of claims and of older stores is in
tests/store/test_store.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import duckdb
import pytest
import torch

from tests.helpers import CLI, ROOT, node, start_run, tiny_graph
from vlpgraph.engine import registry
from vlpgraph.execution import trial as runner_mod
from vlpgraph.cli import main
from vlpgraph.errors import Interrupted, UserError
from vlpgraph.engine.ports import Objective, VisionTower
from vlpgraph.engine.registry import In, Params, register
from vlpgraph.results.report import final_values
from vlpgraph.store import Store
from vlpgraph.engine.sweep import load_experiment

pytestmark = pytest.mark.integration  # every test runs `vlpgraph run`, in this process or another


def _env(cli_env: dict, **extra: str) -> dict:
    env = dict(cli_env, PYTHONPATH=str(ROOT), **extra)  # subprocesses import this tree
    return env


# ----------------------------------------------------------------------------- 2. stale evaluations


def test_edited_evaluator_is_evaluated_again_without_retraining(tmp_path, capsys):
    graph = tiny_graph(tmp_path, train=dict(max_steps=4))
    store = Store(tmp_path / "s")
    assert main(["run", str(graph), "--store", str(store.root)]) == 0
    [run] = store.runs()
    rid = run["run_id"]
    metric_rows = store.metrics(rid)
    ckpt = store.run_dir(rid) / "checkpoints"
    weights = ckpt / (ckpt / "latest").read_text() / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert {r["metric"] for r in store.evals([rid])} >= {"i2t_r5", "i2t_r10"}

    edited = tiny_graph(tmp_path, name="edited.yaml", train=dict(max_steps=4), retrieval=dict(ks=[1, 2, 3]))
    exp = load_experiment(edited)
    assert [t.run_id for t in exp.trials] == [rid]  # the trial is the same; only its evaluator changed
    new_hash = exp.trials[0].graph.nodes["retrieval"].hash
    # before re-running, the report does not show the old evaluator's numbers as this graph's
    assert not any(k.startswith("retrieval.") for k in final_values(exp, store).get(rid, {}))

    capsys.readouterr()
    assert main(["run", str(edited), "--store", str(store.root)]) == 0
    err = capsys.readouterr().err
    assert "already completed" not in err and "evaluating again" in err
    assert store.metrics(rid) == metric_rows and weights.stat().st_mtime_ns == mtime  # not trained again
    after = store.run(rid)
    assert after["attempts"] == run["attempts"] and after["step"] == run["step"] == 4
    evals = store.evals([rid])
    metrics = {r["metric"] for r in evals}
    assert {"i2t_r1", "i2t_r2", "i2t_r3", "t2i_r3"} <= metrics
    assert not metrics & {"i2t_r5", "i2t_r10", "t2i_r5", "t2i_r10"}  # no old row beside the new ones
    assert {r["evaluator_hash"] for r in evals} == {new_hash}
    assert after["retrieval.ks"] == "[1, 2, 3]" and after["status"] == "completed"  # the document follows
    values = final_values(exp, store)[rid]
    assert "retrieval.i2t_r2" in values and "retrieval.i2t_r10" not in values
    # now it is current: a third run skips it
    assert main(["run", str(edited), "--store", str(store.root)]) == 0
    assert "already completed" in capsys.readouterr().err


def test_a_trial_completed_by_another_number_of_processes_is_kept_and_said(tmp_path, capsys):
    graph = tiny_graph(tmp_path, train=dict(max_steps=2))
    store = Store(tmp_path / "s")
    assert main(["run", str(graph), "--store", str(store.root)]) == 0
    [run] = store.runs()
    assert run["processes"] == 1  # this runner's world size, recorded with the trial
    capsys.readouterr()
    assert main(["run", str(graph), "--store", str(store.root)]) == 0
    assert "process(es)" not in capsys.readouterr().err  # same count: skipped without a word
    con = duckdb.connect(str(store.root / "vlpgraph.duckdb"))  # as if torchrun with 8 processes had run it
    con.execute("UPDATE runs SET processes = 8 WHERE run_id = ?", [run["run_id"]])
    con.close()
    assert main(["run", str(graph), "--store", str(store.root)]) == 0
    err = capsys.readouterr().err
    assert f"{run['run_id']} was completed by 8 process(es) and this command has 1" in err
    assert "already completed" in err and store.run(run["run_id"])["attempts"] == run["attempts"]  # not retrained


def test_a_damaged_final_checkpoint_is_trained_again_not_replaced_by_an_earlier_one(tmp_path, capsys):
    # a completed trial whose final weights are damaged: an edited evaluator must not run on the
    # previous (step 12) checkpoint as if it were the final model; the trial trains steps 13-16 again
    # from it, and since resume is exact the unchanged metric comes out the same
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-reproducible CPU kernels: the retrained steps must give the same weights
    try:
        _damaged_final_checkpoint(tmp_path, capsys)
    finally:
        torch.set_num_threads(threads)


def _damaged_final_checkpoint(tmp_path, capsys):
    graph = tiny_graph(tmp_path)
    store = Store(tmp_path / "s")
    assert main(["run", str(graph), "--store", str(store.root)]) == 0
    [run] = store.runs()
    rid = run["run_id"]
    before = {r["metric"]: r["value"] for r in store.evals([rid])}
    ckpt = store.run_dir(rid) / "checkpoints"
    assert sorted(p.name for p in ckpt.glob("step-*")) == ["step-00000012", "step-00000016"]
    weights = ckpt / "step-00000016" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])

    edited = tiny_graph(tmp_path, name="edited.yaml", retrieval=dict(ks=[1, 2, 3]))
    capsys.readouterr()
    assert main(["run", str(edited), "--store", str(store.root)]) == 0
    err = capsys.readouterr().err
    assert "its final checkpoint cannot be used (model.safetensors has 1000 bytes" in err, err
    assert "resuming" in err and "step 12" in err, err
    after = {r["metric"]: r["value"] for r in store.evals([rid])}
    assert after["i2t_r1"] == pytest.approx(before["i2t_r1"], abs=1e-6)
    assert after["t2i_r1"] == pytest.approx(before["t2i_r1"], abs=1e-6)
    assert "i2t_r2" in after and "i2t_r5" not in after
    assert store.run(rid)["status"] == "completed" and store.run(rid)["step"] == 16
    assert (ckpt / ".damaged-step-00000016").is_dir()


# ---------------------------------------------------------------------- 8. one bad grid point


class _BoomParams(Params):
    weight: float = 1.0
    explode: bool = False


class _Boom(Objective):
    def forward(self, fwd, batch):
        return {}


def _build_boom(params, inputs, ctx):
    if params.explode:  # a problem only building the node can find (like a missing pretrained file)
        raise UserError("objective.test_boom: cannot build this model (explode: true)")
    return _Boom()


if "objective.test_boom" not in registry.kinds():
    register("objective.test_boom", params=_BoomParams, output=_Boom, inputs={"vision": In(VisionTower)})(_build_boom)


def test_an_unbuildable_grid_point_fails_its_trial_and_the_sweep_goes_on(tmp_path, capsys):
    tiny_graph(tmp_path, boom=node("objective.test_boom", {"vision": "vision"}),
               train={"inputs": {"objectives": ["itc", "boom"]}, "max_steps": 2},
               more="sweep:\n  grid: {boom.explode: [true, false]}\n")
    store = Store(tmp_path / "s")
    for attempt in range(2):  # and a rerun does not get stuck on it either
        assert main(["run", str(tmp_path / "tiny.yaml"), "--store", str(store.root)]) == 1
        err = capsys.readouterr().err
        runs = {r["boom.explode"]: r for r in store.runs()}
        assert runs[True]["status"] == "failed" and "explode: true" in runs[True]["error"]
        assert runs[False]["status"] == "completed"
        assert "1/2 trial(s) completed, 1 failed" in err
        assert f"failed: default boom.explode=True seed=0 ({runs[True]['run_id']}): objective.test_boom" in err
        assert "fails the same way until the graph or the data changes" in err


# ------------------------------------------------------------------- 9. signals and dead runners


def test_a_stop_request_records_the_trial_as_interrupted_and_stops_the_sweep(tmp_path, capsys, monkeypatch):
    """The runner's half, in process: SIGTERM during a trial -> the flag the loop polls; the loop's
    Interrupted (faked here: the real loop is H1's) -> status interrupted, the next trial not
    started, exit 143, the handlers restored. Independent of the training loop."""
    seen = {}

    def fake_fit(job, seed, checkpoints, hooks):
        os.kill(os.getpid(), signal.SIGTERM)  # delivered to the handler cmd_run installed
        seen["stop"] = hooks.should_stop()
        raise Interrupted(3)

    def before(signum, frame):  # what was there before: without the run's own handler, this one fires
        raise RuntimeError("SIGTERM reached the previous handler")

    monkeypatch.setattr(runner_mod, "fit", fake_fit)
    previous = signal.signal(signal.SIGTERM, before)
    graph = tiny_graph(tmp_path, more="sweep:\n  seeds: [0, 1]\n", train=dict(max_steps=4))
    store = Store(tmp_path / "s")
    try:
        assert main(["run", str(graph), "--store", str(store.root)]) == 143
        assert seen["stop"] is True
        assert signal.getsignal(signal.SIGTERM) is before  # restored after the run
    finally:
        signal.signal(signal.SIGTERM, previous)
    first, second = (t.run_id for t in load_experiment(graph).trials)
    run = store.run(first)
    assert run["status"] == "interrupted" and run["step"] == 3 and run["owner"] is None
    assert "interrupted by SIGTERM at step 3" in run["error"]
    assert store.status(second) == "queued"
    err = capsys.readouterr().err
    assert "INTERRUPTED" in err and "1 not run" in err and "the same command resumes" in err


def _wait_for(predicate, proc, what: str, timeout: float = 240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}: " + proc.stderr.read().decode()[-2000:])
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _running_at(store: Store, run_id: str, step: int):
    def check():
        run = store.run(run_id) if store.exists() else None
        return bool(run) and run["status"] == "running" and (run["step"] or 0) >= step
    return check


@pytest.mark.slow
def test_sigterm_on_the_cli_exits_143_and_leaves_nothing_running(tmp_path, cli_env):
    """Works with or without the loop polling should_stop: the trial under way ends (interrupted at
    a checkpoint once the loop polls; completed before that), the rest are not started."""
    graph = tiny_graph(tmp_path, more="sweep:\n  seeds: [0, 1]\n", train=dict(epochs=4, checkpoint_every=0))
    first, second = (t.run_id for t in load_experiment(graph).trials)
    store = Store(tmp_path / "store")
    proc = start_run(graph, _env(cli_env))
    try:
        _wait_for(_running_at(store, first, 2), proc, "trial 1 trained 2 steps")
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read().decode()
    assert rc == 143, err[-2000:]
    assert "SIGTERM: stopping after the current step" in err
    assert store.status(first) in ("interrupted", "completed") and store.status(second) == "queued"
    assert not [r for r in store.runs() if r["status"] == "running"]


@pytest.mark.slow
def test_sigterm_mid_trial_checkpoints_and_the_rerun_resumes_there(tmp_path, cli_env):
    graph = tiny_graph(tmp_path, train=dict(epochs=8, checkpoint_every=0))
    [rid] = (t.run_id for t in load_experiment(graph).trials)
    store = Store(tmp_path / "store")
    proc = start_run(graph, _env(cli_env))
    try:
        _wait_for(_running_at(store, rid, 3), proc, "3 steps")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=300) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
    run = store.run(rid)
    assert run["status"] == "interrupted" and 3 <= run["step"] < 128, run
    rerun = subprocess.run([*CLI, "run", str(graph)], env=_env(cli_env), cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"from its checkpoint at step {run['step']}" in rerun.stderr
    assert store.status(rid) == "completed"


@pytest.mark.slow
def test_a_runner_killed_without_a_word_shows_as_stale(tmp_path, cli_env, capsys, monkeypatch):
    graph = tiny_graph(tmp_path, train=dict(epochs=16, checkpoint_every=0))
    [rid] = (t.run_id for t in load_experiment(graph).trials)
    store = Store(tmp_path / "store")
    proc = start_run(graph, _env(cli_env, VLPGRAPH_LEASE_S="1"))
    try:
        _wait_for(_running_at(store, rid, 1), proc, "the first step")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert store.status(rid) == "running"  # what the store holds: nobody could write anything else
    monkeypatch.setenv("VLPGRAPH_LEASE_S", "1")
    from vlpgraph.results import analysis

    deadline = time.time() + 60
    while analysis.runs_table(store)["status"].tolist() != ["stale"] and time.time() < deadline:
        time.sleep(0.2)  # until the heartbeat is older than the 1 s lease
    assert analysis.runs_table(store)["status"].tolist() == ["stale"]
    assert analysis.overview(store)["status"]["stale"] == 1
    capsys.readouterr()
    assert main(["runs", "--store", str(store.root), "--status", "stale"]) == 0
    out = capsys.readouterr().out
    assert rid[:10] in out and "stale" in out
    assert main(["runs", "--store", str(store.root), "--status", "running"]) == 0
    assert rid[:10] not in capsys.readouterr().out


# -------------------------------------------------------------------------- 11. claims


@pytest.mark.slow
def test_two_runners_on_one_store_train_each_trial_once(tmp_path, cli_env):
    graph = tiny_graph(tmp_path, more="sweep:\n  seeds: [0, 1, 2, 3]\n", train=dict(epochs=2, checkpoint_every=0))
    ids = [t.run_id for t in load_experiment(graph).trials]
    store = Store(tmp_path / "store")
    env = _env(cli_env)
    a = start_run(graph, env, text=True)
    try:
        _wait_for(_running_at(store, ids[0], 1), a, "runner A started trial 1")  # B arrives while A trains
        b = start_run(graph, env, text=True)
        try:
            err_b = b.communicate(timeout=600)[1]
        finally:
            if b.poll() is None:
                b.kill()
        err_a = a.communicate(timeout=600)[1]
    finally:
        if a.poll() is None:
            a.kill()
    assert a.returncode == 0, err_a[-2000:]
    assert b.returncode == 0, err_b[-2000:]
    assert err_a.count("completed in") + err_b.count("completed in") == 4, (err_a[-1500:], err_b[-1500:])
    runs = {r["run_id"]: r for r in store.runs()}
    assert sorted(runs) == sorted(ids)
    for rid in ids:
        assert runs[rid]["status"] == "completed" and runs[rid]["attempts"] == 1 and runs[rid]["owner"] is None
        steps = sorted(r["step"] for r in store.metrics(rid, "loss"))
        assert steps == list(range(1, 33))
