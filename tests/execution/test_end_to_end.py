"""End to end through the engine: run, store, reproducibility, failure, kill-and-resume, caching."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import CLI, ROOT, evaluator, register_vision_objective, start_run, tiny_graph
from vlpgraph.cli import main
from vlpgraph.store import Store
from vlpgraph.engine.sweep import load_experiment

pytestmark = pytest.mark.integration  # every test runs `vlpgraph run`, in this process or another


def losses(store: Store, run_id: str) -> list[tuple[int, float]]:
    return [(r["step"], r["value"]) for r in sorted(store.metrics(run_id, "loss"), key=lambda r: r["step"])]


def test_tiny_graph_trains_evaluates_and_stores(tmp_path, capsys):
    graph = tiny_graph(tmp_path)
    store_dir = tmp_path / "store"
    assert main(["run", str(graph), "--store", str(store_dir)]) == 0
    store = Store(store_dir)
    [run] = store.runs()
    assert run["status"] == "completed" and run["graph"] == "tiny" and run["step"] == 16
    assert run["train_samples"] == 256 and run["wall_s"] > 0
    assert run["shapes.train_size"] == 256  # params are columns
    names = {r["name"] for r in store.metrics(run["run_id"])}
    assert {"loss", "itc", "lr", "samples_per_s", "data_wait_s", "compute_s"} <= names
    evals = {r["metric"]: r["value"] for r in store.evals([run["run_id"]])}
    assert {"i2t_r1", "t2i_r1", "i2t_r10"} <= set(evals)
    assert all(0.0 <= evals[m] <= 1.0 for m in ("i2t_r1", "t2i_r10"))
    ckpt = store.run_dir(run["run_id"]) / "checkpoints"
    assert (ckpt / (ckpt / "latest").read_text()).joinpath("model.safetensors").exists()
    # a second run skips the completed trial and trains nothing
    assert main(["run", str(graph), "--store", str(store_dir)]) == 0
    assert "already completed" in capsys.readouterr().err
    assert len(store.metrics(run["run_id"], "loss")) == 16


def test_same_graph_and_seed_give_the_same_metrics(tmp_path):
    graph = tiny_graph(tmp_path, train=dict(max_steps=6))
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    assert main(["run", str(graph), "--store", str(a.root)]) == 0
    assert main(["run", str(graph), "--store", str(b.root)]) == 0
    rid = a.runs()[0]["run_id"]
    assert losses(a, rid) == losses(b, rid)
    ea = sorted((r["metric"], r["value"]) for r in a.evals([rid]))
    eb = sorted((r["metric"], r["value"]) for r in b.evals([rid]))
    assert ea == eb
    # and a different seed gives different losses
    tiny_graph(tmp_path, name="tiny2.yaml", seed=1, train=dict(max_steps=6))
    assert main(["run", str(tmp_path / "tiny2.yaml"), "--store", str(a.root)]) == 0
    other = [r["run_id"] for r in a.runs() if r["run_id"] != rid][0]
    assert other.endswith("-s1") and losses(a, other) != losses(a, rid)


# A kind that yields NaN, registered only in this test process.
register_vision_objective("objective.test_nan", lambda image_mean, batch: {"nan": image_mean * float("nan")})


def test_failing_trial_is_recorded_and_the_sweep_goes_on(tmp_path, capsys):
    more = """sweep:
  variants:
    broken:
      nodes:
        bad: {kind: objective.test_nan, inputs: {vision: vision}}
        train: {inputs: {objectives: [itc, bad]}}
    ok: {}
"""
    graph = tiny_graph(tmp_path, more=more, train=dict(max_steps=3))
    rc = main(["run", str(graph), "--store", str(tmp_path / "s")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and "loss is nan at step 0" in err and "1/2 trial(s) completed, 1 failed" in err
    runs = {r["variant"]: r for r in Store(tmp_path / "s").runs()}
    assert runs["broken"]["status"] == "failed" and "loss is nan" in runs["broken"]["error"]
    assert runs["ok"]["status"] == "completed"


def _run_ids(graph: Path) -> list[str]:
    return [t.run_id for t in load_experiment(graph).trials]


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_without_duplicates(tmp_path, cli_env):
    more = "sweep:\n  grid: {shapes.train_fraction: [0.25, 1.0]}\n"
    graph = tiny_graph(tmp_path, more=more, train=dict(epochs=2, checkpoint_every=3))
    first, second = _run_ids(graph)
    store = Store(tmp_path / "store")
    cmd = [*CLI, "run", str(graph)]
    proc = start_run(graph, cli_env)
    pointer = store.run_dir(second) / "checkpoints" / "latest"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if pointer.exists() and int(pointer.read_text().split("-")[1]) >= 6:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the sweep finished before it could be killed: " + proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = int(pointer.read_text().split("-")[1])
    assert store.status(first) == "completed" and store.status(second) == "running"

    rerun = subprocess.run(cmd, env=cli_env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "already completed" in rerun.stderr
    assert f"from its checkpoint at step {killed_at}" in rerun.stderr
    assert store.status(second) == "completed"
    steps = [s for s, _ in losses(store, second)]
    assert steps == sorted(set(steps)) == list(range(1, 33)), steps  # every step once, none twice
    assert len(store.runs()) == 2
    n_evals = len(store.evals([second]))
    assert n_evals == len({(r["evaluator"], r["metric"], r["step"]) for r in store.evals([second])})

    # the resumed trial matches an uninterrupted run of the same trial exactly
    clean = Store(tmp_path / "clean")  # same process settings (thread count) as the killed run
    env = dict(cli_env, VLPGRAPH_STORE=str(clean.root))
    assert subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, timeout=300).returncode == 0
    resumed, uninterrupted = losses(store, second), losses(clean, second)
    assert [s for s, _ in resumed] == [s for s, _ in uninterrupted]
    # Not bit-exact: float32 sums on CPU vary ~1e-5 with what the process ran before (here, trial 1
    # in the same process); a resume that lost optimizer or schedule state is off by far more.
    assert max(abs(a - b) for (_, a), (_, b) in zip(resumed, uninterrupted)) < 1e-3


def test_evaluator_added_later_runs_on_the_cached_checkpoint(tmp_path, capsys):
    graph = tiny_graph(tmp_path, train=dict(max_steps=4))
    store = Store(tmp_path / "s")
    assert main(["run", str(graph), "--store", str(store.root)]) == 0
    rid = store.runs()[0]["run_id"]
    n_loss = len(store.metrics(rid, "loss"))
    graph2 = tiny_graph(tmp_path, name="tiny_zs.yaml", train=dict(max_steps=4), zeroshot=evaluator("zeroshot"))
    assert _run_ids(graph2) == [rid]  # adding an evaluator does not change the trial's identity
    capsys.readouterr()
    assert main(["run", str(graph2), "--store", str(store.root)]) == 0
    assert len(store.metrics(rid, "loss")) == n_loss  # no retraining
    evaluators = {r["evaluator"] for r in store.evals([rid])}
    assert evaluators == {"retrieval", "zeroshot"}


def test_report_prints_mean_and_std_over_seeds(tmp_path, capsys):
    more = "sweep:\n  grid: {shapes.train_fraction: [0.5, 1.0]}\n  seeds: [0, 1]\n"
    graph = tiny_graph(tmp_path, more=more, train=dict(max_steps=2))
    store = Store(tmp_path / "s")
    assert main(["run", str(graph), "--store", str(store.root)]) == 0
    capsys.readouterr()
    assert main(["report", str(graph), "--store", str(store.root), "--metric", "retrieval.i2t_r10"]) == 0
    out = capsys.readouterr().out
    exp = load_experiment(graph)
    vals = {(t.grid["shapes.train_fraction"], t.seed): [r["value"] for r in store.evals([t.run_id]) if r["metric"] == "i2t_r10"][0] for t in exp.trials}
    import statistics

    a = [vals[(0.5, 0)], vals[(0.5, 1)]]
    assert f"{statistics.fmean(a):.3f} ± {statistics.stdev(a):.3f} (2)" in out
    assert "retrieval.i2t_r10" in out and "wall_s" in out and "4/4 trials done" in out


@pytest.mark.slow
def test_concurrent_cli_reads_while_a_sweep_writes(tmp_path, cli_env, capsys):
    """`vlpgraph runs` and the store's query API, 50 times each, while another process trains."""
    graph = tiny_graph(tmp_path, train=dict(epochs=2, checkpoint_every=0))
    store = Store(tmp_path / "store")
    proc = start_run(graph, cli_env)
    try:
        deadline = time.time() + 120
        while not store.exists() and time.time() < deadline:
            time.sleep(0.05)
        counts = []
        for _ in range(50):
            assert main(["runs", "--store", str(store.root)]) == 0
            counts.append(store.query("SELECT count(*) AS n FROM metrics")[0]["n"])
        assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    out = capsys.readouterr()
    assert "lock" not in out.err.lower() and "lock" not in out.out.lower()
    assert counts == sorted(counts) and counts[-1] > counts[0], counts  # reads saw the sweep progress
    rid = store.runs()[0]["run_id"]
    steps = [r["step"] for r in store.metrics(rid, "loss")]
    assert sorted(steps) == list(range(1, 33))  # nothing lost, nothing twice


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path, cli_env):
    """torchrun with 2 gloo ranks: both train (features gathered, gradients averaged); rank 0 writes."""
    graph = tiny_graph(tmp_path, train=dict(max_steps=3))
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node", "2", "-m", "vlpgraph.cli", "run", str(graph), "--device", "cpu"]
    res = subprocess.run(cmd, env=cli_env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.count("1/1 trial(s) completed") == 1  # only rank 0 reports
    store = Store(tmp_path / "store")
    [run] = store.runs()
    assert run["status"] == "completed" and run["step"] == 3
    # a global batch of 2 x 16: the first loss is near ln(32), not ln(16)
    first = sorted(store.metrics(run["run_id"], "loss"), key=lambda r: r["step"])[0]["value"]
    assert abs(first - torch.log(torch.tensor(32.0)).item()) < 0.5
    assert sorted(r["step"] for r in store.metrics(run["run_id"], "loss")) == [1, 2, 3]
