"""The training loop's promises (issue 8): exact resume with random objectives, stop on request, the
logged lr, warmup as a share of training, damaged checkpoints, and ranks that leave a step together."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import GRAPHS, ROOT, tiny_graph
from vlpgraph.engine.compile import compile_trial
from vlpgraph.errors import Interrupted, TrialFailed, UserError
from vlpgraph.engine.sweep import load_experiment
from vlpgraph.execution.train import Checkpointer, Hooks, cosine_with_warmup, fit, plan_steps, plan_warmup, warmup_warning

TIMIX = GRAPHS / "timix_sweep.yaml"
# the TiMix study at its tiny size, half the data: 8 steps, a loss row per step, no checkpoint unless asked
TIMIX_SETS = [("shapes.train_fraction", 0.5), ("train.log_every", 1), ("train.checkpoint_every", 0)]
TIMINGS = ("samples_per_s", "data_wait_s", "compute_s")  # wall-clock measurements, never equal twice


class Killed(Exception):
    """Stands for a SIGKILL right after a checkpoint: the process is gone, nothing else is saved."""


# exact resume is compared bit for bit, so the reference must be reproducible: one thread
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build(graph: Path, cache: Path, sets=(), variant: str | None = None, profile: str | None = None):
    """(the trial's TrainJob, its seed): every node built afresh, as a new process would."""
    exp = load_experiment(graph, sets=list(sets), profile=profile)
    trial = next(t for t in exp.trials if variant is None or t.variant == variant)
    plan = compile_trial(trial, cache, torch.device("cpu"), log=lambda message: None)
    return plan.model, trial.seed


def recording(**kw) -> tuple[Hooks, dict, list]:
    """Hooks that keep every logged value as {(step, name): value} and every note."""
    rows: dict = {}
    notes: list[str] = []
    hooks = Hooks(on_metrics=lambda rs: rows.update({(r["step"], r["name"]): r["value"] for r in rs}),
                  on_note=notes.append, **kw)
    return hooks, rows, notes


def stop_after(k: int):
    """A should_stop that turns True once step k has been taken (it is polled after every step)."""
    calls = [0]

    def should_stop() -> bool:
        calls[0] += 1
        return calls[0] >= k

    return should_stop


def assert_same_run(rows: dict, reference: dict, after: int, job, reference_job) -> None:
    """Every value logged after step ``after`` and every final weight match the reference run."""
    later = {key: v for key, v in reference.items() if key[0] > after and key[1] not in TIMINGS}
    assert later and set(later) <= set(rows), sorted(set(later) - set(rows))
    for key, v in later.items():
        assert math.isclose(rows[key], v, rel_tol=1e-5, abs_tol=1e-7), (key, rows[key], v)
    ours, theirs = job.modules.state_dict(), reference_job.modules.state_dict()
    assert ours.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def uninterrupted(cache):
    """{variant: (job, rows)} of the TiMix study's baseline (ITC + ITM + MLM) and TiMix variants, run
    through without a stop."""
    out = {}
    for variant in ("baseline", "timix"):
        job, seed = build(TIMIX, cache, TIMIX_SETS, variant, profile="tiny")
        hooks, rows, _ = recording()
        assert fit(job, seed, None, hooks).step == 8
        out[variant] = job, rows
    return out


# ------------------------------------------------------------------------------- item 1: exact resume


@pytest.mark.integration
@pytest.mark.parametrize("variant", ["baseline", "timix"])
def test_resume_after_a_kill_repeats_every_random_draw(variant, cache, uninterrupted, tmp_path):
    """Killed right after the checkpoint at step 3, then rerun: steps 4..8 log the same losses (MLM
    masks, ITM negatives, TiMix's mixing all drawn the same) and end with the same weights."""
    sets = TIMIX_SETS + [("train.checkpoint_every", 3), ("train.eval_every", 3)]
    ckpt = Checkpointer(tmp_path / "ckpt")
    job, seed = build(TIMIX, cache, sets, variant, profile="tiny")

    def kill(step):
        raise Killed

    with pytest.raises(Killed):
        fit(job, seed, ckpt, recording(on_eval=kill)[0])
    job, seed = build(TIMIX, cache, sets, variant, profile="tiny")
    hooks, rows, _ = recording(on_eval=lambda step: None)
    result = fit(job, seed, ckpt, hooks)
    assert result.resumed_from == 3 and result.step == 8
    reference_job, reference = uninterrupted[variant]
    assert {"itm", "mlm"} <= {name for _, name in reference}
    assert_same_run(rows, reference, 3, job, reference_job)


# ------------------------------------------------------------------- item 9 (loop half): should_stop


@pytest.mark.integration
def test_should_stop_checkpoints_the_step_and_resume_continues_from_it(cache, uninterrupted, tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt")
    job, seed = build(TIMIX, cache, TIMIX_SETS, "baseline", profile="tiny")
    hooks, rows, _ = recording(should_stop=stop_after(5))
    with pytest.raises(Interrupted) as stopped:
        fit(job, seed, ckpt, hooks)
    assert stopped.value.step == 5
    assert max(step for step, _ in rows) == 5  # it finished (and logged) step 5, and took no other
    assert ckpt.latest() == tmp_path / "ckpt" / "step-00000005"

    job, seed = build(TIMIX, cache, TIMIX_SETS, "baseline", profile="tiny")
    resumed: list[int] = []
    hooks, rows, _ = recording(on_resume=resumed.append)
    assert fit(job, seed, ckpt, hooks).step == 8
    assert resumed == [5] and min(step for step, _ in rows) == 6
    assert_same_run(rows, uninterrupted["baseline"][1], 5, job, uninterrupted["baseline"][0])


@pytest.mark.integration
def test_stop_between_log_rows_keeps_the_rows_whole(tmp_path):
    """log_every 4, stopped at step 2: the resumed run's row at step 4 still averages steps 1-4."""
    tiny_graph(tmp_path, train=dict(checkpoint_every=0, log_every=4, max_steps=8))
    cache = tmp_path / "cache"
    reference_job, seed = build(tmp_path / "tiny.yaml", cache)
    hooks, reference, _ = recording()
    fit(reference_job, seed, None, hooks)

    ckpt = Checkpointer(tmp_path / "ckpt")
    job, seed = build(tmp_path / "tiny.yaml", cache)
    with pytest.raises(Interrupted):
        fit(job, seed, ckpt, recording(should_stop=stop_after(2))[0])
    job, seed = build(tmp_path / "tiny.yaml", cache)
    hooks, rows, _ = recording()
    fit(job, seed, ckpt, hooks)
    assert {step for step, _ in rows} == {4, 8}
    assert_same_run(rows, reference, 0, job, reference_job)


# ------------------------------------------------------------------------------- item 7: logged lr


@pytest.mark.integration
def test_logged_lr_is_the_rate_the_step_used(tmp_path):
    job, seed = build(tiny_graph(tmp_path, train=dict(checkpoint_every=0, max_steps=6)), tmp_path / "cache")
    hooks, rows, _ = recording()
    fit(job, seed, None, hooks)
    p = job.params
    factor = cosine_with_warmup(p.warmup_steps, 6, p.min_lr_ratio)
    # the row at step s (s steps taken) describes step s-1, counted from 0 as the schedule counts
    logged = [rows[(s, "lr")] for s in range(1, 7)]
    assert logged == pytest.approx([factor(s - 1) * p.lr for s in range(1, 7)], rel=1e-9)
    assert logged[0] == pytest.approx(p.lr / p.warmup_steps)  # the first step warms up; it is not the peak


# ------------------------------------------------------------------------- item 5: warmup as a share


@pytest.mark.integration
def test_warmup_fraction_scales_with_the_trial(tmp_path):
    graph = tiny_graph(tmp_path, train=dict(warmup_steps=None, warmup_fraction=0.25, checkpoint_every=0, max_steps=8))
    job, seed = build(graph, tmp_path / "cache")
    hooks, rows, notes = recording()
    fit(job, seed, None, hooks)
    factor = cosine_with_warmup(2, 8, 0.0)  # round(0.25 x 8) = 2 warmup steps
    assert [rows[(s, "lr")] for s in range(1, 9)] == pytest.approx([factor(s - 1) * 1e-3 for s in range(1, 9)])
    assert rows[(1, "lr")] == pytest.approx(0.5e-3) and rows[(2, "lr")] == pytest.approx(1e-3)
    assert notes == []


def test_warmup_steps_and_fraction_together_are_refused(tmp_path):
    graph = tiny_graph(tmp_path, train=dict(warmup_steps=3, warmup_fraction=0.1))
    with pytest.raises(UserError, match=r"give warmup_steps \(3\) or warmup_fraction \(0.1\), not both"):
        load_experiment(graph)


@pytest.mark.integration
def test_warmup_over_half_of_the_trial_is_announced(tmp_path):
    # 64 of 256 samples in batches of 16: a 4-step trial with 6 warmup steps
    graph = tiny_graph(tmp_path, train=dict(warmup_steps=6, checkpoint_every=0))
    job, seed = build(graph, tmp_path / "cache", sets=[("shapes.train_fraction", 0.25)])
    hooks, rows, notes = recording()
    fit(job, seed, None, hooks)
    assert notes == ["trainer: warmup is 6 of this trial's 4 steps (150%); the learning rate never reaches "
                     "its peak lr 0.001 (it ends at 67% of it)"]
    assert max(v for (_, name), v in rows.items() if name == "lr") < 1e-3
    assert warmup_warning(3, 5, 1e-3) == "trainer: warmup is 3 of this trial's 5 steps (60%)"
    assert warmup_warning(2, 4, 1e-3) is None


def test_shipped_studies_warm_up_for_the_same_share_at_every_data_amount():
    for name in ("timix_sweep", "clip_baseline", "smoke"):
        exp = load_experiment(GRAPHS / f"{name}.yaml")
        shares = set()
        for trial in exp.trials:
            p = trial.graph.nodes[trial.graph.trainer].params
            data = trial.graph.nodes["shapes"].params
            n = max(1, math.ceil(round(data.train_fraction * data.train_size, 6)))  # as dataset.shapes takes it
            _, total = plan_steps(n, p.batch_size, 1, p.epochs, p.max_steps)
            shares.add(round(p.warmup_fraction, 6))
            assert 2 * plan_warmup(p.warmup_steps, p.warmup_fraction, total) <= total, (name, trial.grid, total)
        assert len(shares) == 1, (name, shares)


# --------------------------------------------------------------------------- item 10: damaged checkpoints


def _interrupted_with_two_checkpoints(tmp_path: Path, cache: Path) -> Checkpointer:
    """A trial killed after its checkpoint at step 4, with the one at step 2 kept too."""
    job, seed = build(tiny_graph(tmp_path, train=dict(checkpoint_every=2, max_steps=6, eval_every=4)), cache)
    ckpt = Checkpointer(tmp_path / "ckpt")

    def kill(step):
        raise Killed

    with pytest.raises(Killed):
        fit(job, seed, ckpt, Hooks(on_eval=kill))
    assert sorted(p.name for p in ckpt.dir.glob("step-*")) == ["step-00000002", "step-00000004"]
    return ckpt


def _rerun(tmp_path: Path, cache: Path, ckpt: Checkpointer):
    job, seed = build(tmp_path / "tiny.yaml", cache)
    hooks, rows, notes = recording()
    return fit(job, seed, ckpt, hooks), notes


def _truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def _scribble(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed
    file.write_bytes(bytes(data))


@pytest.mark.integration
@pytest.mark.parametrize("damage", [
    pytest.param(lambda d: _truncate(d / "model.safetensors"), id="truncated-weights"),
    pytest.param(lambda d: (d / "state.pt").unlink(), id="missing-state"),
    pytest.param(lambda d: _scribble(d / "state.pt"), id="corrupt-state"),
    pytest.param(lambda d: (d / "meta.json").write_text("{"), id="corrupt-meta"),
])
def test_damaged_latest_checkpoint_is_set_aside_and_the_previous_one_used(damage, tmp_path):
    cache = tmp_path / "cache"
    ckpt = _interrupted_with_two_checkpoints(tmp_path, cache)
    damage(ckpt.dir / "step-00000004")
    result, notes = _rerun(tmp_path, cache, ckpt)
    assert result.resumed_from == 2 and result.step == 6
    [note] = notes
    assert note.startswith(f"checkpoint {ckpt.dir / 'step-00000004'} is damaged (")
    assert note.endswith("; set aside as .damaged-step-00000004, resuming from step-00000002")
    assert (ckpt.dir / ".damaged-step-00000004").is_dir()  # kept for a post-mortem, not deleted
    assert ckpt.latest() == ckpt.dir / "step-00000006"
    # a third run finds the trial done and complains about nothing
    assert _rerun(tmp_path, cache, ckpt)[1] == []


@pytest.mark.integration
def test_no_intact_checkpoint_starts_the_trial_afresh(tmp_path):
    cache = tmp_path / "cache"
    ckpt = _interrupted_with_two_checkpoints(tmp_path, cache)
    _truncate(ckpt.dir / "step-00000004" / "model.safetensors")
    _truncate(ckpt.dir / "step-00000002" / "model.safetensors")
    result, notes = _rerun(tmp_path, cache, ckpt)
    assert result.resumed_from == 0 and result.step == 6
    assert len(notes) == 2 and all(n.endswith("starting the trial from scratch") for n in notes)
    assert {p.name for p in ckpt.dir.iterdir() if p.name.startswith(".damaged")} == {
        ".damaged-step-00000004", ".damaged-step-00000002"}


@pytest.mark.integration
def test_checkpoint_records_sizes_and_checksums(tmp_path):
    ckpt = _interrupted_with_two_checkpoints(tmp_path, tmp_path / "cache")
    import hashlib
    import json

    latest = ckpt.latest()
    files = json.loads((latest / "meta.json").read_text())["files"]
    for name in ("model.safetensors", "state.pt"):
        data = (latest / name).read_bytes()
        assert files[name] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.integration
@pytest.mark.parametrize("key, value, says", [
    ("processes", 2, "was written by 2 process(es) and this run has 1"),
    ("total_steps", 12, "belongs to a run of 12 steps and this one plans 6"),
])
def test_a_checkpoint_of_another_step_plan_is_refused_not_resumed(key, value, says, tmp_path):
    """The process count is not part of a trial's identity; resuming a checkpoint that torchrun wrote with
    another world size (or for another step count) would make one trial of two experiments."""
    import json

    cache = tmp_path / "cache"
    ckpt = _interrupted_with_two_checkpoints(tmp_path, cache)
    meta_file = ckpt.latest() / "meta.json"
    meta = json.loads(meta_file.read_text())
    assert (meta["processes"], meta["total_steps"]) == (1, 6)  # what the check reads is recorded
    meta_file.write_text(json.dumps({**meta, key: value}))  # meta.json is not among the checksummed files
    with pytest.raises(TrialFailed, match=re.escape(says)):
        _rerun(tmp_path, cache, ckpt)
    assert ckpt.latest() == ckpt.dir / "step-00000004"  # nothing trained on top of it


# ------------------------------------------------------------------ item 12: ranks leave a step together


def _torchrun(tmp_path: Path, mode: str, env: dict) -> subprocess.CompletedProcess:
    """_dist_job.py (beside this file) on 2 gloo ranks; a hang fails the test. torchrun starts each worker in a
    session of its own, so on a hang the workers are killed by the pids they wrote."""
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node", "2", "-m", "tests.execution._dist_job", mode, str(tmp_path)]
    log = tmp_path / "torchrun.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            for pid_file in tmp_path.glob("pid*"):
                try:
                    os.kill(int(pid_file.read_text()), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.kill()
            proc.wait()
            pytest.fail("the ranks hung:\n" + log.read_text()[-3000:])
    return subprocess.CompletedProcess(cmd, proc.returncode, log.read_text(), "")


@pytest.mark.integration
@pytest.mark.slow
def test_nan_on_one_rank_fails_the_trial_on_both(tmp_path, cli_env):
    res = _torchrun(tmp_path, "nan", dict(cli_env, NAN_RANK="1", NAN_STEP="2"))
    assert res.returncode == 0, res.stdout[-3000:]
    for rank in (0, 1):  # both ranks report the failure, with rank 1's message, and leave together
        assert f"rank {rank}: failed: loss is nan at step 2 (itc=" in res.stdout, res.stdout[-3000:]
        assert f"rank {rank}: done" in res.stdout
    assert "(process 1 of 2)" in res.stdout


@pytest.mark.integration
@pytest.mark.slow
def test_stop_on_one_rank_stops_both_at_the_same_step(tmp_path, cli_env):
    res = _torchrun(tmp_path, "stop", dict(cli_env, STOP_RANK="1", STOP_AFTER="2"))
    assert res.returncode == 0, res.stdout[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: interrupted at step 2" in res.stdout, res.stdout[-3000:]
    assert Checkpointer(tmp_path / "ckpt").latest() == tmp_path / "ckpt" / "step-00000002"
