"""The sweep's bookkeeping in the store, which every executor shares: queueing a sweep's trials,
claiming one before it runs, skipping the completed ones, keeping claims alive, and saying how each
trial ended. Only rank 0 reads and writes the store (under torchrun every rank trains; rank 0
decides and the others follow its decisions).

Several runners may share one store (two terminals, several cluster jobs with the same command): a
trial is *claimed* by one live runner (runs.owner, Store.claim), which keeps its claim alive with a
heartbeat (runs.heartbeat_at, written every few seconds by a thread and with every metrics batch).
The others take the next unclaimed trial, and when only trials claimed by live runners remain they
wait for them; a claim whose heartbeat is older than the lease ($VLPGRAPH_LEASE_S, default 60 s) is
taken over and the trial resumes from its checkpoint.

A stop request (``request_stop``, which the command line's SIGTERM/SIGINT handler calls) makes the
training loop checkpoint after its current step and raise Interrupted; the trial is recorded as
``interrupted`` and the remaining trials are left for the next run.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
from contextlib import contextmanager
from dataclasses import fields
from datetime import datetime, timezone
from typing import Callable, Iterator

import torch
from rich.console import Console

from vlpgraph.engine.sweep import Experiment, Trial
from vlpgraph.execution.display import SweepDisplay, trial_label
from vlpgraph.execution.ranks import from_rank0, on_any_rank, world_size
from vlpgraph.execution.trial import Claim, StoreSink, TrialOutcome, run_fields
from vlpgraph.store import Store, lease_s

CLAIM_FIELDS = {f.name for f in fields(Claim)}  # what a claim keeps of a run's row


def dead_owner(owner: str | None) -> str | None:
    """``owner`` if it names a process of this host that no longer exists (its claim is dead
    without waiting for the lease: a rerun after a crash or SIGKILL starts at once), else None."""
    try:
        host, pid, _ = (owner or "").split(":")
        if host != socket.gethostname() or int(pid) == os.getpid():
            return None
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return owner
    except (ValueError, OSError):  # not ours to judge (another host, a malformed owner, no permission)
        return None
    return None


def evals_missing(store: Store, trial: Trial, run: dict | None, log: Callable[[str], None] | None = None) -> list[str]:
    """The evaluators with no result at the run's final step written by the evaluator as it is
    in this graph (new ones, and edited ones: another ks, prompt or scorer is another hash). Reads
    only; ``log`` hears which evaluators of a completed run changed."""
    names = trial.graph.by_role("evaluator")
    if not run or run.get("step") is None:
        return names
    step = int(run["step"])
    hashes = {n: trial.graph.nodes[n].hash for n in names}
    done = store.completed_evals(trial.run_id, hashes)
    missing = [n for n in names if (n, step) not in done]
    if missing and run.get("status") == "completed" and log is not None:
        present = store.completed_evals(trial.run_id)
        changed = [n for n in missing if (n, step) in present]
        if changed:
            log(f"{trial.run_id}: evaluator(s) {', '.join(changed)} changed since step {step} was "
                "evaluated (or the store did not record which version ran): evaluating again")
    return missing


def completed_trials(store: Store, exp: Experiment) -> list[Trial]:
    """The trials of ``exp`` a run would skip: completed, each evaluator's result at the final step
    written by the evaluator as it is now. Reads only; a store that does not exist has none."""
    if not store.exists() or not exp.trials:
        return []
    rows = {r["run_id"]: r for r in store.runs({"run_id": [t.run_id for t in exp.trials]})}
    # a store from before evaluations recorded their evaluator's version (its first write adds the
    # column) cannot be asked which are current: none is, so only a trial without evaluators is done
    versioned = "evaluator_hash" in store.columns("evals")
    return [t for t in exp.trials if (rows.get(t.run_id) or {}).get("status") == "completed"
            and not (evals_missing(store, t, rows[t.run_id]) if versioned else t.graph.by_role("evaluator"))]


class Heartbeats:
    """One thread that keeps a runner's claims alive while it holds them (``add`` / ``discard``),
    used as ``with Heartbeats(...) as beats:``. ``on_lost(run_id)`` hears, once per trial, that
    another runner took a claim over (this one was silent for longer than the lease)."""

    def __init__(self, store: Store, owner: str, every: float, on_lost: Callable[[str], None] | None = None):
        self.store, self.owner, self.every, self.on_lost = store, owner, every, on_lost
        self.run_ids: set[str] = set()
        self.lost: set[str] = set()
        self.guard = threading.Lock()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.beat, name="heartbeats", daemon=True)

    def add(self, run_id: str) -> None:
        with self.guard:
            self.run_ids.add(run_id)

    def discard(self, run_id: str) -> None:
        with self.guard:
            self.run_ids.discard(run_id)

    def beat(self) -> None:
        """The thread's loop: every ``every`` seconds, one heartbeat per claim held."""
        while not self.done.wait(self.every):
            with self.guard:
                ids = list(self.run_ids)
            for run_id in ids:
                try:
                    held = self.store.heartbeat(run_id, self.owner)
                except Exception:  # noqa: BLE001 - a busy store delays one beat; the next one retries
                    continue
                if not held and self.on_lost is not None and run_id not in self.lost:
                    self.lost.add(run_id)
                    self.on_lost(run_id)

    def __enter__(self) -> "Heartbeats":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()


class Scheduler:
    """A runner's side of the store for one sweep: its identity (``owner``), its claims, and what it
    prints. ``rank``: this process's torchrun rank (0 without torchrun); only rank 0 touches the
    store. Methods marked *collective* must be called by every rank at the same point."""

    def __init__(self, store: Store, device: torch.device, console: Console | None = None, rank: int = 0):
        self.store = store
        self.device = device
        self.console = console or Console(stderr=True)
        self.rank = rank
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.lease = lease_s()
        self.heartbeat_every = min(10.0, self.lease / 4)  # several beats per lease: one late beat is no death
        self.stop_signal: str | None = None  # set by request_stop (a signal handler)

    # ---------------------------------------------------------------------------------- stopping

    def request_stop(self, reason: str) -> None:
        """Ask the run to stop: the training loop checkpoints after its current step and leaves, and
        no further trial starts. Safe to call from a signal handler (sets a flag, writes one line)."""
        if self.stop_signal is None and self.rank == 0:
            os.write(2, f"\nvlpgraph: {reason}: stopping after the current step (a checkpoint is saved; "
                        f"the same command resumes). Send it again to stop at once.\n".encode())
        self.stop_signal = self.stop_signal or reason

    def stopping(self) -> bool:
        """Whether any rank was asked to stop (all ranks agree, so they leave the sweep together).
        Collective."""
        return on_any_rank(self.stop_signal is not None, self.device)

    # ------------------------------------------------------------------------------- the store

    def queue(self, exp: Experiment) -> None:
        """Give every trial of the sweep a row (queued) unless it has one."""
        if self.rank == 0:
            for trial in exp.trials:
                self.store.start_run(trial.run_id, **run_fields(exp, trial, self.device), status="queued", if_absent=True)

    def claim(self, exp: Experiment, trial: Trial) -> Claim:
        """What this runner may do with a trial, decided by rank 0 and shared with every rank
        (collective). A trial with something to do is claimed (``claimed``: this runner holds it
        now, and must ``release`` it); one held by another live runner is not (``held``); a
        completed one with nothing missing is not claimed either (no write): ``skipped`` says so."""
        row: dict = {}
        if self.rank == 0:
            row = self.store.run(trial.run_id) or {}
            if not row:  # deleted since it was queued (a claim needs a row)
                self.store.start_run(trial.run_id, **run_fields(exp, trial, self.device), status="queued", if_absent=True)
            if row.get("status") == "completed":
                row["missing"] = evals_missing(self.store, trial, row, self.log)
            row["claimed"] = not (row.get("status") == "completed" and not row["missing"])
            if row["claimed"]:
                granted, fresh = self.store.claim(trial.run_id, self.owner, self.lease,
                                                  dead_owner=dead_owner(row.get("owner")))
                fresh = dict(fresh or {})
                if not granted:
                    seen = fresh.get("heartbeat_at") or fresh.get("updated_at")
                    now = datetime.now(timezone.utc).replace(tzinfo=None)
                    row = {"held": True, "owner": fresh.get("owner"),
                           "age": max((now - seen).total_seconds(), 0.0) if seen else 0.0}
                elif (fresh.get("status"), fresh.get("step")) != (row.get("status"), row.get("step")):
                    # another runner got further between our read and our claim: look again
                    done = fresh.get("status") == "completed"
                    fresh["missing"] = evals_missing(self.store, trial, fresh, self.log) if done else None
                    fresh["claimed"] = not (done and not fresh["missing"])
                    if not fresh["claimed"]:  # it finished meanwhile: nothing to do, give the claim back
                        self.store.release(trial.run_id, self.owner)
                    row = fresh
            row = {k: v for k, v in row.items() if k in CLAIM_FIELDS}
            if row.get("missing") is not None:
                row["missing"] = tuple(row["missing"])
        return from_rank0(Claim(**row) if self.rank == 0 else None)

    def skipped(self, trial: Trial, claim: Claim) -> TrialOutcome:
        """The outcome of a trial already completed. The number of processes is not part of a trial's
        identity (trainer hash + seed: docs/architecture.md, "Identity"), but it sets the global batch
        (batch_size per process × processes): a trial completed with another number of processes is
        kept, and said."""
        done_with = claim.processes
        if done_with and int(done_with) != world_size():
            self.log(f"warning: {trial.run_id} was completed by {done_with} process(es) and this command has "
                     f"{world_size()}: its results stand for {done_with} (the global batch is batch_size × "
                     "processes); to train it with this many, use another --store (or change a param)")
        return TrialOutcome(trial, "skipped", wall_s=claim.wall_s or 0.0)

    def heartbeats(self, *, warn_taken_over: bool = True) -> Heartbeats:
        """A thread that keeps this runner's claims alive (enter it, then ``add`` each trial claimed
        and ``discard`` it when it ends); ``warn_taken_over``: say when another runner took one over."""
        return Heartbeats(self.store, self.owner, self.heartbeat_every, self.taken_over if warn_taken_over else None)

    def taken_over(self, run_id: str) -> None:
        """Say that another runner took this runner's claim on ``run_id`` over."""
        self.log(f"warning: another runner took over {run_id} (this one was silent for longer "
                 f"than the lease, {self.lease:.0f}s); both are now running it")

    @contextmanager
    def holding(self, run_id: str) -> Iterator[None]:
        """For a claimed trial run while the block runs: its claim is kept alive meanwhile and
        released on leaving (rank 0; the other ranks do nothing)."""
        if self.rank != 0:
            yield
            return
        try:
            with self.heartbeats() as beats:
                beats.add(run_id)
                yield
        finally:
            self.release(run_id)

    def release(self, run_id: str) -> None:
        """Give this runner's claim on a trial back (finish_run gives it back too)."""
        self.store.release(run_id, self.owner)

    def failed(self, trial: Trial, error: str, wall_s: float) -> TrialOutcome:
        """Record as failed a trial whose job could not record its own end (its worker died)."""
        self.store.finish_run(trial.run_id, "failed", error=error)
        return TrialOutcome(trial, "failed", wall_s=wall_s, error=error)

    def sink(self, run_id: str, display: SweepDisplay | None = None) -> StoreSink:
        """The sink of a trial whose job runs in this process: writes go to the store, notes to the
        console, steps to the trial's bar in ``display``; it stops on ``request_stop``."""
        step = None if display is None else (lambda *progress: display.step(run_id, *progress))
        return StoreSink(self.store, note=self.log, step=step, stop_reason=lambda: self.stop_signal)

    # ---------------------------------------------------------------------------------- output

    def log(self, message: str) -> None:
        """A line for the user (rank 0 only)."""
        if self.rank == 0:
            self.console.print(f"  {message}", highlight=False)

    def print_outcome(self, exp: Experiment, o: TrialOutcome) -> None:
        """The line that says how a trial ended (rank 0 only)."""
        if self.rank != 0:
            return
        n = len(exp.trials)
        i = next(k for k, t in enumerate(exp.trials, 1) if t.run_id == o.trial.run_id)
        label = trial_label(o.trial)
        if o.status == "skipped":
            self.console.print(f"[{i}/{n}] {label}: already completed ({o.trial.run_id}), skipped", highlight=False)
        elif o.status == "interrupted":
            self.console.print(f"[{i}/{n}] {label}: [yellow]INTERRUPTED[/yellow] after {o.wall_s:.0f}s: {o.error}", highlight=False)
        elif o.status == "failed":
            self.console.print(f"[{i}/{n}] {label}: [red]FAILED[/red] after {o.wall_s:.0f}s: {o.error}", highlight=False)
        else:
            shown = ", ".join(f"{k}={v:.3f}" for k, v in (o.metrics or {}).items() if not k.endswith((".n", ".chance")))
            self.console.print(f"[{i}/{n}] {label}: completed in {o.wall_s:.0f}s  {shown}", highlight=False)

    def not_run(self, pending: list[Trial]) -> None:
        """Say that the sweep stopped with ``pending`` trials left (nothing when there are none)."""
        if pending and self.rank == 0:
            self.log(f"stopped: {len(pending)} trial(s) not run; the same command runs them")
