"""Issue 12, item 1: sweep trials on Ray (``vlpgraph run --executor ray`` / ``--jobs N``).

One local 2-CPU Ray for the module (started in this process: the in-process CLI finds it already
running and uses it). Timing metrics (compute_s, data_wait_s, samples_per_s) differ between any two
runs; every other metric value is compared exactly (each trial trains with one torch thread on
both executors, so the arithmetic is the same)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import CLI, ROOT, tiny_graph
from vlpgraph.cli import main
from vlpgraph.errors import UserError
from vlpgraph.store import Store
from vlpgraph.engine.sweep import load_experiment
from vlpgraph.execution.train import Checkpointer

TIMING = ("compute_s", "data_wait_s", "samples_per_s")
SWEEP = "sweep:\n  seeds: [0, 1]\n  grid:\n    train.lr: [1.0e-3, 2.0e-3]\n"


def _env(**extra: str) -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **extra)  # subprocesses import this tree


def _rows(store: Path, sql: str) -> list[tuple]:
    # through Store, which coordinates with the driver's own connections when it runs in this process
    # (DuckDB refuses a read-only connection beside a read-write one of the same process)
    return [tuple(r.values()) for r in Store(store).query(sql)]


def _sequential(graph: Path, store: Path) -> int:
    """The sequential executor on one torch thread, as each Ray worker of these tests runs (cpu=1): the
    two stores are then equal bit for bit (two thread counts differ by float noise)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(["run", str(graph), "--store", str(store)])
    finally:
        torch.set_num_threads(threads)


def _metrics(store: Path) -> list[tuple]:
    names = ", ".join(f"'{n}'" for n in TIMING)
    return _rows(store, f"SELECT run_id, step, name, value FROM metrics WHERE name NOT IN ({names}) ORDER BY ALL")


def _counts(store: Path) -> dict[str, int]:
    return {t: _rows(store, f"SELECT count(*) FROM {t}")[0][0] for t in ("runs", "metrics", "evals")}


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def sequential(tmp_path_factory) -> tuple[Path, Path]:
    """(graph, store) of the 4-trial sweep run by the sequential executor."""
    tmp = tmp_path_factory.mktemp("seq")
    graph = tiny_graph(tmp, more=SWEEP)
    assert _sequential(graph, tmp / "store") == 0
    return graph, tmp / "store"


# ------------------------------------------------------------------------------- without Ray


@pytest.mark.integration
@pytest.mark.slow
def test_the_sequential_executor_never_imports_ray(tmp_path):
    graph = tiny_graph(tmp_path)
    code = ("import sys; from vlpgraph.cli import main; rc = main(['run', sys.argv[1], '--store', sys.argv[2]]); "
            "print('ray imported' if 'ray' in sys.modules else 'no ray'); sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code, str(graph), str(tmp_path / "store")], env=_env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1] == "no ray"


@pytest.mark.integration
@pytest.mark.parametrize("flags", [["--executor", "ray"], ["--jobs", "2"]])
def test_asking_for_ray_without_it_installed_exits_2_with_the_install_hint(tmp_path, flags):
    graph = tiny_graph(tmp_path)
    code = ("import sys; sys.modules['ray'] = None  # import ray now raises ImportError\n"
            "from vlpgraph.cli import main; sys.exit(main(sys.argv[1:]))")
    p = subprocess.run([sys.executable, "-c", code, "run", str(graph), "--store", str(tmp_path / "store"), *flags],
                       env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Ray is not installed" in p.stderr and "pip install -e '.[ray]'" in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "store").exists()  # nothing ran


def test_trial_resources_are_parsed_and_bad_ones_refused(capsys):
    from vlpgraph.execution.ray_executor import TrialResources

    assert TrialResources.parse("cpu=2,gpu=1") == TrialResources(2.0, 1.0)
    assert TrialResources.parse("gpu=0.5") == TrialResources(1.0, 0.5)
    for bad in ("cpu=two", "cpus=2", "cpu=-1", "cpu=0", "cpu=1,cpu=2", "cpu"):
        with pytest.raises(UserError, match="--trial-resources"):
            TrialResources.parse(bad)


def test_a_worker_that_cannot_see_the_store_fails_clearly(tmp_path):
    from vlpgraph.execution.ray_executor import run_trial

    exp = load_experiment(tiny_graph(tmp_path))
    with pytest.raises(UserError, match="cannot see the store directory .* shared filesystem"):
        run_trial(exp, exp.trials[0], {}, str(tmp_path / "elsewhere"), ".ray/abcd/driver", "cpu", 1, mailbox=None)


# ---------------------------------------------------------------------------------- on Ray


@pytest.mark.integration
@pytest.mark.slow
def test_a_ray_sweep_completes_every_trial_once_and_equals_the_sequential_store(tmp_path, ray_local, sequential, capsys):
    graph, seq_store = sequential
    store = tmp_path / "store"
    assert main(["run", str(graph), "--store", str(store), "--executor", "ray", "--trial-resources", "cpu=1"]) == 0
    err = capsys.readouterr().err
    assert "Ray: 2 trial(s) at once (1 CPU each)" in err
    runs = _rows(store, "SELECT run_id, status, attempts, owner FROM runs ORDER BY run_id")
    assert [r[0] for r in runs] == [r[0] for r in _rows(seq_store, "SELECT run_id FROM runs ORDER BY run_id")]
    assert len(runs) == 4 and all(r[1:] == ("completed", 1, None) for r in runs), runs  # each trained once, released
    assert _metrics(store) == _metrics(seq_store)
    evals = "SELECT run_id, step, evaluator, metric, value FROM evals ORDER BY ALL"
    assert _rows(store, evals) == _rows(seq_store, evals)
    assert _counts(store) == _counts(seq_store)
    # the same command again: every trial is skipped, nothing is written twice
    assert main(["run", str(graph), "--store", str(store), "--executor", "ray"]) == 0
    assert capsys.readouterr().err.count("already completed") == 4
    assert _counts(store) == _counts(seq_store)


def _worker_pids(name: str = "run_trial") -> list[int]:
    """This test's Ray workers (descendants of this process) now running a ``name`` task (Ray sets
    a busy worker's process title to ``ray::<task>``). Linux /proc."""
    def parent(pid: int) -> int:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])

    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if f"ray::{name}" not in (entry / "cmdline").read_bytes().decode(errors="replace"):
                continue
            pid = int(entry.name)
            while pid > 1 and pid != os.getpid():
                pid = parent(pid)
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
        if pid == os.getpid():
            out.append(int(entry.name))
    return out


@pytest.mark.integration
@pytest.mark.slow
def test_a_killed_worker_costs_only_the_steps_since_its_checkpoint(tmp_path, ray_local, capsys):
    graph = tiny_graph(tmp_path, train=dict(epochs=6, checkpoint_every=8))  # 96 steps, a checkpoint every 8
    [rid] = (t.run_id for t in load_experiment(graph).trials)
    seq_store = tmp_path / "seq"
    assert _sequential(graph, seq_store) == 0
    store_dir = tmp_path / "store"
    done: list[int] = []
    driver = threading.Thread(target=lambda: done.append(main(["run", str(graph), "--store", str(store_dir), "--jobs", "2"])))
    driver.start()
    store = Store(store_dir)
    ckpts = store_dir / "runs" / rid / "checkpoints"
    try:
        deadline = time.monotonic() + 240
        while not (Checkpointer(ckpts).latest() and _worker_pids()):
            assert driver.is_alive() and time.monotonic() < deadline, "the trial ended before a checkpoint was seen"
            time.sleep(0.05)
        # `vlpgraph runs` (another process) reads the store while the worker trains and the driver writes
        runs = subprocess.run([*CLI, "runs", "--store", str(store_dir)], env=_env(), cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        assert runs.returncode == 0 and rid in runs.stdout and "running" in runs.stdout, runs.stdout + runs.stderr
        [pid] = _worker_pids()
        os.kill(pid, signal.SIGKILL)
        last = int(Checkpointer(ckpts).latest().name.removeprefix("step-"))  # the dead worker writes no more
        at_kill = _counts(store_dir)
    finally:
        driver.join(timeout=300)
    assert done == [0]
    err = capsys.readouterr().err
    run = store.run(rid)
    assert run["status"] == "completed" and run["attempts"] == 2, run  # Ray ran the task again, once
    resumed = [line for line in err.splitlines() if f"resuming {rid} from its checkpoint at step" in line]
    assert len(resumed) == 1 and int(resumed[0].rsplit(" ", 1)[1]) == last < 96, err[-2000:]
    # resume is exact and rows are keyed: the store equals an uninterrupted run's, nothing duplicated or lost
    assert _metrics(store_dir) == _metrics(seq_store)
    assert _counts(store_dir) == _counts(seq_store)
    print(f"worker killed after checkpoint {last}: row counts then {at_kill}, after the retry {_counts(store_dir)}")


@pytest.mark.integration
@pytest.mark.slow
def test_a_killed_driver_leaves_a_store_the_same_command_resumes(tmp_path):
    graph = tiny_graph(tmp_path, more=SWEEP, train=dict(epochs=3, checkpoint_every=8))  # 4 trials of 48 steps
    ids = [t.run_id for t in load_experiment(graph).trials]
    store_dir = tmp_path / "store"
    store = Store(store_dir)
    cmd = [*CLI, "run", str(graph), "--store", str(store_dir), "--jobs", "2"]
    proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:  # until one trial completed and another is on its way
            assert proc.poll() is None and time.monotonic() < deadline, "the sweep ended before it could be killed"
            statuses = [store.status(r) for r in ids] if store.exists() else []
            if "completed" in statuses and "running" in statuses:
                break
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = {r["run_id"]: r for r in store.runs()}
    completed = {r for r, row in before.items() if row["status"] == "completed"}
    counts_before = _counts(store_dir)
    rerun = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    after = {r["run_id"]: r for r in store.runs()}
    assert all(row["status"] == "completed" for row in after.values())
    for rid in completed:  # completed trials were not trained again
        assert after[rid]["attempts"] == before[rid]["attempts"] == 1 and f"({rid}), skipped" in rerun.stdout + rerun.stderr
    trained = [r for r in ids if r not in completed]
    assert trained and all(after[r]["attempts"] == before[r]["attempts"] + 1 for r in trained if before[r]["attempts"])
    print(f"row counts before the rerun {counts_before}, after {_counts(store_dir)}")
    # nothing lost (rows the dead driver never wrote are logged again by the resumed trials: a worker
    # checkpoints only once the driver wrote its rows), nothing doubled: the sequential executor's store
    assert _sequential(graph, tmp_path / "seq") == 0
    assert _metrics(store_dir) == _metrics(tmp_path / "seq")
    assert _counts(store_dir) == _counts(tmp_path / "seq")


@pytest.mark.integration
@pytest.mark.slow
def test_sigterm_stops_ray_trials_at_a_checkpoint_and_the_rerun_resumes_them(tmp_path):
    # 2 trials of 256 steps
    graph = tiny_graph(tmp_path, more="sweep:\n  seeds: [0, 1]\n", train=dict(epochs=16, checkpoint_every=0))
    ids = [t.run_id for t in load_experiment(graph).trials]
    store = Store(tmp_path / "store")
    cmd = [*CLI, "run", str(graph), "--store", str(store.root), "--jobs", "2"]
    proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (store.exists() and all(((store.run(r) or {}).get("step") or 0) >= 3 for r in ids)):
            assert proc.poll() is None and time.monotonic() < deadline, "the sweep ended before it could be stopped"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-2000:]
    runs = {r: store.run(r) for r in ids}
    assert all(run["status"] == "interrupted" and 3 <= run["step"] < 256 for run in runs.values()), runs
    rerun = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    for r, run in runs.items():  # stopped at a checkpoint of the step it had reached: nothing trained twice
        assert f"resuming {r} from its checkpoint at step {run['step']}" in rerun.stderr
        assert store.status(r) == "completed"
