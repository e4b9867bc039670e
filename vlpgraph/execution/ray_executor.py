"""The Ray executor: a sweep's trials as Ray tasks (``vlpgraph run GRAPH --executor ray`` / ``--jobs N``).

The sequential executor (vlpgraph.execution.sequential, the default) trains one trial after another
in the command's own process and never imports Ray. This module is imported only when Ray is asked for.

How the work is split:

- The **driver** (the ``vlpgraph run`` process) is the only process that writes the store. It queues
  every trial, claims the ones it dispatches (the same claims, owner and heartbeats as the sequential
  runner, so several drivers and sequential runners can share a store), submits one Ray task per
  claimed trial, applies the rows its workers send, shows one progress bar per running trial and
  records what happened to each.
- A **worker** (a Ray task, sized by ``--trial-resources``) compiles, trains and evaluates one trial
  with the same ``TrialJob`` as the sequential executor, reporting through a ``MailboxSink``: every
  store write, note and step becomes a message in one ``Mailbox`` (a small Ray actor) that the driver
  drains. Checkpoints, tokenizers and data caches are files under the store directory, which every
  worker must see (a shared filesystem); a worker checks that first (the driver's marker file) and
  fails clearly otherwise.

The message protocol (tuples in the mailbox, in the order one worker produced them):

- ``("store", run_id, method, args, kwargs)``: call ``Store.method(*args, **kwargs)`` on the driver;
  ``method`` is one of ``STORE_WRITES`` (start_run, finish_run, log_metrics, delete_metrics_after,
  log_evaluation, set_document). Every one of them replaces by key, so a retried trial writes the
  same rows again, never beside the old ones.
- ``("step", run_id, step, total, loss, samples_per_s, batch_size)``: move the trial's progress bar.
- ``("note", run_id, text)``: a line for the user (resuming from a checkpoint, a warning).

A worker's put returns once the mailbox holds the message, so when a task's result is ready every
message it sent is in the mailbox: the driver drains it before it looks at a result. Before each
checkpoint a worker waits until the driver has written every message it sent (its sink's
``before_checkpoint``, ``Mailbox.wait_applied``): a checkpoint is never ahead of the store, so a
driver killed with rows still in the mailbox loses nothing that the resumed trial does not log again.

Failures: a worker process that dies (SIGKILL, lost node) makes Ray run the task again, up to
``max_retries`` times; the new attempt resumes from the trial's last checkpoint (its first write,
``delete_metrics_after``, drops the rows logged after that checkpoint, which are then logged again).
Past the retries the trial is recorded as failed and the sweep goes on. A driver that dies leaves
its trials "running" with its dead claim; the next ``vlpgraph run`` takes them over and resumes them.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from vlpgraph.engine.sweep import Experiment, Trial
from vlpgraph.errors import UserError
from vlpgraph.execution.display import SweepDisplay, trial_label
from vlpgraph.execution.executor import Executor
from vlpgraph.execution.ranks import resolve_device
from vlpgraph.execution.scheduler import Scheduler
from vlpgraph.execution.trial import STORE_WRITES, Claim, TrialJob, TrialOutcome, TrialSink

INSTALL_HINT = "pip install -e '.[ray]'"
MARKER_DIR = ".ray"  # under the store: the driver's marker and stop files


def import_ray():
    """The ray module, or UserError (exit 2) saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UserError(f"--executor ray / --jobs: Ray is not installed; install the extra: {INSTALL_HINT}") from None
    return ray


@dataclass(frozen=True)
class TrialResources:
    """What one trial asks of Ray: CPUs (also its torch threads) and GPUs."""

    cpu: float = 1.0
    gpu: float = 0.0

    @classmethod
    def parse(cls, text: str | None) -> "TrialResources":
        """``cpu=N,gpu=M`` (either part may be left out) -> TrialResources; UserError on anything else."""
        if not text:
            return cls()
        values: dict[str, float] = {}
        for part in text.split(","):
            key, sep, raw = part.partition("=")
            key = key.strip()
            try:
                value = float(raw)
            except ValueError:
                value = -1.0
            if not sep or key not in ("cpu", "gpu") or value < 0 or key in values:
                raise UserError(f"--trial-resources {text}: expected cpu=N,gpu=M (non-negative numbers), e.g. cpu=4,gpu=1")
            values[key] = value
        res = cls(**values)
        if res.cpu <= 0:
            raise UserError(f"--trial-resources {text}: a trial needs at least some CPU (cpu > 0)")
        return res


class Mailbox:
    """The one channel from workers to the driver (a Ray actor with no CPU of its own): workers
    ``put`` messages and may wait until the driver has applied them; the driver ``take``s them all,
    in order, and says how far it got (``applied``). Messages are numbered in arrival order."""

    def __init__(self):
        import asyncio

        self.items: list[tuple] = []
        self.sent = 0
        self.done = 0
        self.changed = asyncio.Condition()

    async def put(self, msg: tuple) -> int:
        """Keep ``msg``; returns its number."""
        self.items.append(msg)
        self.sent += 1
        return self.sent

    async def take(self) -> tuple[int, list[tuple]]:
        """Every waiting message, oldest first, and the number of the last one."""
        items, self.items = self.items, []
        return self.sent, items

    async def applied(self, through: int) -> None:
        """The driver has written every message up to number ``through``."""
        async with self.changed:
            self.done = max(self.done, through)
            self.changed.notify_all()

    async def wait_applied(self, through: int) -> None:
        """Returns once the driver has written message number ``through`` and all before it."""
        async with self.changed:
            await self.changed.wait_for(lambda: self.done >= through)


# ----------------------------------------------------------------------------------- worker side


class MailboxSink(TrialSink):
    """A Ray worker's sink: every store write, note and step becomes a message to the driver (in
    ``mailbox``, a Mailbox actor); the job stops (checkpoint, Interrupted) once the driver's
    ``stop_file`` appears."""

    def __init__(self, mailbox, run_id: str, stop_file: Path):
        self.mailbox = mailbox
        self.run_id = run_id
        self.stop_file = stop_file
        self.stop_signal: str | None = None
        self.last = 0  # the number of this worker's last message
        self.last_step_at = 0.0

    def send(self, msg: tuple) -> None:
        import ray

        self.last = ray.get(self.mailbox.put.remote(msg))

    def write(self, method: str, *args, **kwargs) -> None:
        if method not in STORE_WRITES:
            raise ValueError(f"a Ray worker sends the driver {', '.join(STORE_WRITES)}, not Store.{method}")
        self.send(("store", self.run_id, method, args, kwargs))

    def note(self, message: str) -> None:
        self.send(("note", self.run_id, message))

    def step(self, step: int, total: int, loss: float, samples_per_s: float, batch_size: int) -> None:
        # a put is a round trip to the mailbox actor: a few a second are enough for a progress bar
        now = time.monotonic()
        if now - self.last_step_at >= 0.25 or step == total:
            self.last_step_at = now
            self.send(("step", self.run_id, step, total, loss, samples_per_s, batch_size))

    def stop_reason(self) -> str | None:
        if self.stop_signal is None and self.stop_file.exists():  # one stat per step
            self.stop_signal = self.stop_file.read_text().strip() or "the driver"
        return self.stop_signal

    def before_checkpoint(self, timeout: float = 600.0) -> None:
        """Wait until the driver has written every message this worker sent."""
        import ray

        ray.get(self.mailbox.wait_applied.remote(self.last), timeout=timeout)


def run_trial(exp: Experiment, trial: Trial, claim: Claim, store_root: str, marker: str, device: str,
              threads: int, mailbox) -> dict:
    """The body of one Ray task: train and evaluate ``trial`` (claimed by the driver, which found
    ``claim``), sending every store write to ``mailbox`` (a Mailbox actor). Returns the outcome as
    a dict (status, wall_s, error, metrics). Raises UserError when this worker cannot see the store
    directory (the driver's ``marker`` file is not there)."""
    root = Path(store_root)
    if not (root / marker).is_file():
        raise UserError(f"this Ray worker ({os.uname().nodename}, pid {os.getpid()}) cannot see the store directory "
                        f"{root} (no {marker} there): checkpoints and caches live under it, so every node must mount "
                        "it at the same path (a shared filesystem)")
    torch.set_num_threads(max(1, threads))
    sink = MailboxSink(mailbox, trial.run_id, root / Path(marker).parent / "stop")
    o = TrialJob(exp, trial, claim, sink, root=root, device=resolve_device(device)).run()
    return {"status": o.status, "wall_s": o.wall_s, "error": o.error, "metrics": o.metrics}


# ----------------------------------------------------------------------------------- driver side


class RayExecutor(Executor):
    """Runs a sweep's trials as Ray tasks, as many at once as the cluster fits; the driver writes
    the store. ``device_name``: ``--device`` as given. ``address``: a running cluster's address
    (None: ``$RAY_ADDRESS`` if set, else a local Ray started here; ``jobs`` sizes it to that many
    trials at once). ``max_retries``: how many times a trial whose worker died is run again (from
    its checkpoint). Enter it before ``stop_on_signals``: ray.init installs its own SIGTERM
    handler, which would end the driver at once instead of stopping the trials at a checkpoint."""

    def __init__(self, scheduler: Scheduler, device_name: str, *, address: str | None = None, jobs: int | None = None,
                 resources: TrialResources = TrialResources(), max_retries: int = 2):
        super().__init__(scheduler)
        self.ray = import_ray()
        # where a worker trains: --device auto means the GPU Ray gave the task (it sets CUDA_VISIBLE_DEVICES),
        # or the CPU when a trial asks for none (never a GPU that Ray did not hand out)
        self.device_name = ("cuda" if resources.gpu else "cpu") if device_name == "auto" else device_name
        self.address = address
        self.jobs = jobs
        self.resources = resources
        self.max_retries = max_retries

    # -------------------------------------------------------------------------------- cluster

    def _connect(self) -> bool:
        """Join or start Ray; True when this call started it (and so shuts it down)."""
        ray = self.ray
        if ray.is_initialized():  # a caller (a test, a notebook) started it already
            return False
        if self.address or os.environ.get("RAY_ADDRESS"):
            ray.init(address=self.address, log_to_driver=False)
        else:
            cpus = None if self.jobs is None else max(1, round(self.jobs * self.resources.cpu))
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        return True

    def _capacity(self) -> int:
        """How many trials the cluster runs at once with these resources (at least 1)."""
        total = self.ray.cluster_resources()
        fits = [total.get("CPU", 0.0) / self.resources.cpu]
        if self.resources.gpu:
            fits.append(total.get("GPU", 0.0) / self.resources.gpu)
        n = int(min(fits) + 1e-9)
        if n < 1:
            raise UserError(f"--trial-resources cpu={self.resources.cpu:g},gpu={self.resources.gpu:g}: this Ray cluster "
                            f"cannot fit one trial (it has {total.get('CPU', 0):g} CPU, {total.get('GPU', 0):g} GPU)")
        return n

    # -------------------------------------------------------------------------------- the sweep

    def __enter__(self) -> "RayExecutor":
        """Join or start Ray, and leave the marker file workers look for."""
        self._started = self._connect()
        self._marker_dir = self.scheduler.store.root / MARKER_DIR / secrets.token_hex(4)
        self._marker_dir.mkdir(parents=True, exist_ok=True)
        (self._marker_dir / "driver").write_text(f"{self.scheduler.owner}\n")
        return self

    def __exit__(self, *exc) -> None:
        for f in ("driver", "stop"):
            (self._marker_dir / f).unlink(missing_ok=True)
        try:
            self._marker_dir.rmdir()
        except OSError:
            pass
        if self._started:
            self.ray.shutdown()

    def run(self, exp: Experiment) -> list[TrialOutcome]:
        """As ``Executor.run``; call it inside ``with executor:``. After ``request_stop`` running
        trials checkpoint and are recorded as interrupted, the others stay queued."""
        ray, s, marker_dir = self.ray, self.scheduler, self._marker_dir
        store = s.store
        n = len(exp.trials)
        number = {t.run_id: i for i, t in enumerate(exp.trials, 1)}
        s.queue(exp)
        capacity = self._capacity()
        mailbox = ray.remote(num_cpus=0)(Mailbox).remote()
        exp_ref = ray.put(exp)
        task = ray.remote(run_trial).options(num_cpus=self.resources.cpu, num_gpus=self.resources.gpu,
                                             max_retries=self.max_retries, retry_exceptions=False)
        marker = str((marker_dir / "driver").relative_to(store.root))
        threads = max(1, int(self.resources.cpu))
        pending = list(exp.trials)
        running: dict = {}  # ObjectRef -> (trial, when it was submitted)
        outcomes: list[TrialOutcome] = []
        announced: dict[str, str] = {}
        # the workers write nothing themselves, so the driver beats for them (as before, without a
        # warning when another runner took one over: the worker trains on either way)
        beating = s.heartbeats(warn_taken_over=False)
        s.console.print(f"  Ray: {capacity} trial(s) at once ({self.resources.cpu:g} CPU"
                        + (f", {self.resources.gpu:g} GPU" if self.resources.gpu else "") + " each)", highlight=False)
        with SweepDisplay(s.console) as display, beating:
            stop_written = False
            while pending or running:
                if s.stop_signal and not stop_written:  # running trials checkpoint and stop; no new ones
                    (marker_dir / "stop").write_text(s.stop_signal)
                    stop_written = True
                for trial in list(pending):
                    if s.stop_signal or len(running) >= capacity:
                        break
                    claim = s.claim(exp, trial)
                    if claim.held:
                        if announced.get(trial.run_id) != claim.owner:
                            announced[trial.run_id] = claim.owner
                            s.log(f"trial {number[trial.run_id]}/{n} {trial_label(trial)} ({trial.run_id}): another "
                                  f"runner holds it ({claim.owner}); taken over if silent for {s.lease:.0f}s")
                        continue
                    pending.remove(trial)
                    if not claim.claimed:
                        outcome = s.skipped(trial, claim)
                        outcomes.append(outcome)
                        s.print_outcome(exp, outcome)
                        continue
                    display.add(trial.run_id, f"{number[trial.run_id]}/{n}")
                    ref = task.remote(exp_ref, trial, claim, str(store.root), marker, self.device_name, threads, mailbox)
                    running[ref] = (trial, time.perf_counter())
                    beating.add(trial.run_id)
                self._drain(mailbox, display)
                if not running:
                    if pending and s.stop_signal:
                        break
                    if pending:  # every trial left is held by another live runner: wait for them
                        time.sleep(min(2.0, s.lease / 4))
                    continue
                ready, _ = ray.wait(list(running), num_returns=1, timeout=0.1)
                for ref in ready:
                    self._drain(mailbox, display)  # every message of this task is in the mailbox by now
                    trial, t0 = running.pop(ref)
                    outcome = self._outcome(ref, trial, t0)
                    beating.discard(trial.run_id)
                    s.release(trial.run_id)
                    display.remove(trial.run_id)
                    outcomes.append(outcome)
                    s.print_outcome(exp, outcome)
            self._drain(mailbox, display)
        s.not_run(pending)
        return outcomes

    def _outcome(self, ref, trial: Trial, t0: float) -> TrialOutcome:
        """The trial's outcome from its task; a task that failed outside the job's own handling
        (its worker died more than max_retries times, the store not visible) is recorded as failed."""
        try:
            got = self.ray.get(ref)
            return TrialOutcome(trial, got["status"], wall_s=got["wall_s"], error=got["error"], metrics=got["metrics"])
        except Exception as e:  # noqa: BLE001 - recorded, and the sweep goes on
            cause = getattr(e, "cause", None)
            if isinstance(e, UserError) or isinstance(cause, UserError):
                msg = "; ".join((cause if isinstance(cause, UserError) else e).messages)
            elif isinstance(e, self.ray.exceptions.WorkerCrashedError) or "died" in str(e).lower():
                msg = (f"its Ray worker died {self.max_retries + 1} time(s) (the last checkpoint is kept; the same "
                       f"command resumes): {type(e).__name__}")
            else:
                msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            return self.scheduler.failed(trial, msg, wall_s=time.perf_counter() - t0)

    def _drain(self, mailbox, display: SweepDisplay) -> None:
        """Apply every message waiting in the mailbox, in order (the driver is the store's one
        writer), then tell the mailbox how far it got (a worker about to checkpoint waits for that)."""
        through, messages = self.ray.get(mailbox.take.remote())
        for msg in messages:
            kind, run_id = msg[0], msg[1]
            if kind == "store":
                method, args, kwargs = msg[2], msg[3], msg[4]
                if method not in STORE_WRITES:
                    raise RuntimeError(f"a Ray worker asked the driver for Store.{method}: not a worker's write")
                getattr(self.scheduler.store, method)(*args, **kwargs)
            elif kind == "step":
                display.step(run_id, *msg[2:])
            elif kind == "note":
                self.scheduler.log(msg[2])
        if messages:
            mailbox.applied.remote(through)
