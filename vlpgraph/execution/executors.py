"""Running a sweep's trials on Ray (``vlpgraph run GRAPH --executor ray`` / ``--jobs N``).

The sequential executor (``Runner.run``, the default) trains one trial after another in the
command's own process and never imports Ray. This module is imported only when Ray is asked for.

How the work is split:

- The **driver** (the ``vlpgraph run`` process) is the only process that writes the store. It queues
  every trial, claims the ones it dispatches (the same claims, owner and heartbeats as the sequential
  runner, so several drivers and sequential runners can share a store), submits one Ray task per
  claimed trial, applies the rows its workers send, shows one progress bar per running trial and
  records what happened to each.
- A **worker** (a Ray task, sized by ``--trial-resources``) compiles, trains and evaluates one trial
  with the runner's own code (``Runner._run_one``), but its store is a ``StoreProxy``: every write
  becomes a message in one ``Mailbox`` (a small Ray actor) that the driver drains. Checkpoints, tokenizers
  and data caches are files under the store directory, which every worker must see (a shared
  filesystem); a worker checks that first (the driver's marker file) and fails clearly otherwise.

The message protocol (tuples in the mailbox, in the order one worker produced them):

- ``("store", run_id, method, args, kwargs)``: call ``Store.method(*args, **kwargs)`` on the driver;
  ``method`` is one of ``WORKER_WRITES`` (start_run, finish_run, log_metrics, delete_metrics_after,
  log_evaluation, set_document). Every one of them replaces by key, so a retried trial writes the
  same rows again, never beside the old ones.
- ``("step", run_id, step, total, loss, samples_per_s, batch_size)``: move the trial's progress bar.
- ``("note", run_id, text)``: a line for the user (resuming from a checkpoint, a warning).

A worker's put returns once the mailbox holds the message, so when a task's result is ready every
message it sent is in the mailbox: the driver drains it before it looks at a result. Before each
checkpoint a worker waits until the driver has written every message it sent (``Mailbox.wait_applied``):
a checkpoint is never ahead of the store, so a driver killed with rows still in the mailbox loses
nothing that the resumed trial does not log again.

Failures: a worker process that dies (SIGKILL, lost node) makes Ray run the task again, up to
``max_retries`` times; the new attempt resumes from the trial's last checkpoint (its first write,
``delete_metrics_after``, drops the rows logged after that checkpoint, which are then logged again).
Past the retries the trial is recorded as failed and the sweep goes on. A driver that dies leaves
its trials "running" with its dead claim; the next ``vlpgraph run`` takes them over and resumes them.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from vlpgraph.errors import UserError
from vlpgraph.execution.runner import Runner, TrialOutcome, resolve_device, step_display, trial_label, trial_progress
from vlpgraph.store import Store
from vlpgraph.engine.sweep import Experiment, Trial
from vlpgraph.execution.train import Checkpointer

INSTALL_HINT = "pip install -e '.[ray]'"
WORKER_WRITES = ("start_run", "finish_run", "log_metrics", "delete_metrics_after", "log_evaluation", "set_document")
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


class StoreProxy:
    """What a worker's runner sees as its store: the store's paths (shared filesystem) and its
    write methods, each of which becomes a message to the driver. Reading is not offered: the
    driver decides what a trial needs before it dispatches it."""

    def __init__(self, root: Path, mailbox, run_id: str):
        self._paths = Store(root)  # paths only: a Store holds no connection and this one never opens one
        self.root = self._paths.root
        self._mailbox = mailbox
        self._run_id = run_id
        self._last = 0  # the number of this worker's last message

    def send(self, msg: tuple) -> None:
        import ray

        self._last = ray.get(self._mailbox.put.remote(msg))

    def flush(self, timeout: float = 600.0) -> None:
        """Wait until the driver has written every message this worker sent."""
        import ray

        ray.get(self._mailbox.wait_applied.remote(self._last), timeout=timeout)

    def run_dir(self, run_id: str, *, create: bool = False) -> Path:
        return self._paths.run_dir(run_id, create=create)

    def cache_dir(self, key: str, *, create: bool = False) -> Path:
        return self._paths.cache_dir(key, create=create)

    def __getattr__(self, name: str):
        if name not in WORKER_WRITES:
            raise AttributeError(f"a Ray worker's store offers {', '.join(WORKER_WRITES)} (writes the driver makes), not {name}")
        return lambda *args, **kwargs: self.send(("store", self._run_id, name, args, kwargs))


class WorkerRunner(Runner):
    """The runner inside a Ray task: trains one claimed trial; reports steps and notes as messages;
    stops (checkpoint, Interrupted) when the driver's stop file appears."""

    def __init__(self, proxy: StoreProxy, device: torch.device, run_id: str, stop_file: Path):
        super().__init__(proxy, device, Console(stderr=True, quiet=True))
        self.proxy = proxy
        self._run_id = run_id
        self._stop_file = stop_file

    def _checkpointer(self, run_id: str) -> Checkpointer:
        return _FlushingCheckpointer(self.proxy, super()._checkpointer(run_id).dir)

    def _step_reporter(self, plan, progress, task):
        last, batch = [0.0], plan.model.params.batch_size

        def on_step(step: int, total: int, loss: float, sps: float) -> None:
            # a put is a round trip to the mailbox actor: a few a second are enough for a progress bar
            now = time.monotonic()
            if now - last[0] >= 0.25 or step == total:
                last[0] = now
                self.proxy.send(("step", self._run_id, step, total, loss, sps, batch))

        return on_step

    def _should_stop_training(self) -> bool:
        if self.stop_signal is None and self._stop_file.exists():  # one stat per step
            self.stop_signal = self._stop_file.read_text().strip() or "the driver"
        return self.stop_signal is not None

    def _log(self, message: str) -> None:
        self.proxy.send(("note", self._run_id, message))


class _FlushingCheckpointer(Checkpointer):
    """Saves only after the driver has written every row sent so far (the rows up to this step)."""

    def __init__(self, proxy: StoreProxy, directory: Path):
        super().__init__(directory)
        self.proxy = proxy

    def save(self, *args, **kwargs) -> Path:
        self.proxy.flush()
        return super().save(*args, **kwargs)


def run_trial(exp: Experiment, trial: Trial, run: dict, store_root: str, marker: str, device: str,
              threads: int, mailbox) -> dict:
    """The body of one Ray task: train and evaluate ``trial`` (claimed by the driver; ``run`` is
    what the driver's claim found), sending every store write to ``mailbox`` (a Mailbox actor). Returns the outcome as
    a dict (status, wall_s, error, metrics). Raises UserError when this worker cannot see the store
    directory (the driver's ``marker`` file is not there)."""
    root = Path(store_root)
    if not (root / marker).is_file():
        raise UserError(f"this Ray worker ({os.uname().nodename}, pid {os.getpid()}) cannot see the store directory "
                        f"{root} (no {marker} there): checkpoints and caches live under it, so every node must mount "
                        "it at the same path (a shared filesystem)")
    torch.set_num_threads(max(1, threads))
    runner = WorkerRunner(StoreProxy(root, mailbox, trial.run_id), resolve_device(device), trial.run_id,
                          root / Path(marker).parent / "stop")
    o = runner._run_one(exp, trial, run, None, None)
    return {"status": o.status, "wall_s": o.wall_s, "error": o.error, "metrics": o.metrics}


# ----------------------------------------------------------------------------------- driver side


class RayExecutor:
    """Runs a sweep's trials as Ray tasks, as many at once as the cluster fits; the driver writes
    the store. ``address``: a running cluster's address (None: ``$RAY_ADDRESS`` if set, else a
    local Ray started here; ``jobs`` sizes it to that many trials at once). ``max_retries``: how many
    times a trial whose worker died is run again (from its checkpoint)."""

    def __init__(self, runner: Runner, device_name: str, *, address: str | None = None, jobs: int | None = None,
                 resources: TrialResources = TrialResources(), max_retries: int = 2):
        self.ray = import_ray()
        self.runner = runner
        self.store: Store = runner.store
        self.console = runner.console
        # where a worker trains: --device auto means the GPU Ray gave the task (it sets CUDA_VISIBLE_DEVICES),
        # or the CPU when a trial asks for none (never a GPU that Ray did not hand out)
        self.device_name = ("cuda" if resources.gpu else "cpu") if device_name == "auto" else device_name
        self.address = address
        self.jobs = jobs
        self.resources = resources
        self.max_retries = max_retries
        self._shown: dict[str, object] = {}  # run_id -> its step_display

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
        """Join or start Ray, and leave the marker file workers look for. Enter it before
        ``stop_on_signals``: ray.init installs its own SIGTERM handler, which would end the driver
        at once instead of stopping the trials at a checkpoint."""
        self._started = self._connect()
        self._marker_dir = self.store.root / MARKER_DIR / secrets.token_hex(4)
        self._marker_dir.mkdir(parents=True, exist_ok=True)
        (self._marker_dir / "driver").write_text(f"{self.runner.owner}\n")
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
        """Run every trial not yet done; one outcome per trial this driver finished or skipped, in
        the order they ended (as ``Runner.run``). Stops early after ``runner.request_stop``: running
        trials checkpoint and are recorded as interrupted, the others stay queued. Call it inside
        ``with executor:``."""
        return self._sweep(exp, self._marker_dir)

    def _sweep(self, exp: Experiment, marker_dir: Path) -> list[TrialOutcome]:
        ray, runner, store = self.ray, self.runner, self.store

        n = len(exp.trials)
        number = {t.run_id: i for i, t in enumerate(exp.trials, 1)}
        for t in exp.trials:
            runner._start(exp, t, status="queued", if_absent=True)
        capacity = self._capacity()
        mailbox = ray.remote(num_cpus=0)(Mailbox).remote()
        exp_ref = ray.put(exp)
        task = ray.remote(run_trial).options(num_cpus=self.resources.cpu, num_gpus=self.resources.gpu,
                                             max_retries=self.max_retries, retry_exceptions=False)
        marker = str((marker_dir / "driver").relative_to(store.root))
        threads = max(1, int(self.resources.cpu))
        pending = list(exp.trials)
        running: dict = {}  # ObjectRef -> (trial, when it was submitted)
        bars: dict[str, int] = {}  # run_id -> progress task id
        outcomes: list[TrialOutcome] = []
        announced: dict[str, str] = {}
        beating = _Heartbeats(store, runner.owner, runner.heartbeat_every)
        self.console.print(f"  Ray: {capacity} trial(s) at once ({self.resources.cpu:g} CPU"
                           + (f", {self.resources.gpu:g} GPU" if self.resources.gpu else "") + " each)", highlight=False)
        with trial_progress(self.console) as progress, beating:
            stop_written = False
            while pending or running:
                if runner.stop_signal and not stop_written:  # running trials checkpoint and stop; no new ones
                    (marker_dir / "stop").write_text(runner.stop_signal)
                    stop_written = True
                held = 0
                for trial in list(pending):
                    if runner.stop_signal or len(running) >= capacity:
                        break
                    row = runner._claim(exp, trial)
                    if row.get("held"):
                        held += 1
                        if announced.get(trial.run_id) != row["owner"]:
                            announced[trial.run_id] = row["owner"]
                            runner._log(f"trial {number[trial.run_id]}/{n} {trial_label(trial)} ({trial.run_id}): another "
                                        f"runner holds it ({row['owner']}); taken over if silent for {runner.lease:.0f}s")
                        continue
                    pending.remove(trial)
                    if not row["claimed"]:
                        outcome = runner._skipped(trial, row)
                        outcomes.append(outcome)
                        runner._print_outcome(number[trial.run_id], n, outcome)
                        continue
                    bars[trial.run_id] = progress.add_task("", total=None, trial=f"{number[trial.run_id]}/{n}", loss="-", sps="-")
                    ref = task.remote(exp_ref, trial, row, str(store.root), marker, self.device_name, threads, mailbox)
                    running[ref] = (trial, time.perf_counter())
                    beating.add(trial.run_id)
                self._drain(mailbox, progress, bars)
                if not running:
                    if pending and runner.stop_signal:
                        break
                    if pending:  # every trial left is held by another live runner: wait for them
                        time.sleep(min(2.0, runner.lease / 4))
                    continue
                ready, _ = ray.wait(list(running), num_returns=1, timeout=0.1)
                for ref in ready:
                    self._drain(mailbox, progress, bars)  # every message of this task is in the mailbox by now
                    trial, t0 = running.pop(ref)
                    outcome = self._outcome(ref, trial, t0)
                    beating.discard(trial.run_id)
                    store.release(trial.run_id, runner.owner)
                    progress.update(bars.pop(trial.run_id), visible=False)
                    self._shown.pop(trial.run_id, None)
                    outcomes.append(outcome)
                    runner._print_outcome(number[trial.run_id], n, outcome)
            self._drain(mailbox, progress, bars)
        if pending:
            runner._log(f"stopped: {len(pending)} trial(s) not run; the same command runs them")
        return outcomes

    def _outcome(self, ref, trial: Trial, t0: float) -> TrialOutcome:
        """The trial's outcome from its task; a task that failed outside the runner's own handling
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
            self.store.finish_run(trial.run_id, "failed", error=msg)
            return TrialOutcome(trial, "failed", wall_s=time.perf_counter() - t0, error=msg)

    def _drain(self, mailbox, progress, bars: dict[str, int]) -> None:
        """Apply every message waiting in the mailbox, in order (the driver is the store's one
        writer), then tell the mailbox how far it got (a worker about to checkpoint waits for that)."""
        through, messages = self.ray.get(mailbox.take.remote())
        for msg in messages:
            kind, run_id = msg[0], msg[1]
            if kind == "store":
                method, args, kwargs = msg[2], msg[3], msg[4]
                if method not in WORKER_WRITES:
                    raise RuntimeError(f"a Ray worker asked the driver for Store.{method}: not a worker's write")
                getattr(self.store, method)(*args, **kwargs)
            elif kind == "step" and run_id in bars:
                step, total, loss, sps, batch = msg[2:]
                if run_id not in self._shown:
                    self._shown[run_id] = step_display(progress, bars[run_id], batch, self.console,
                                                       plain=not self.console.is_terminal)
                self._shown[run_id](step, total, loss, sps)
            elif kind == "note":
                self.runner._log(msg[2])
        if messages:
            mailbox.applied.remote(through)


class _Heartbeats:
    """One thread that keeps the driver's claims on its running trials alive (the workers write
    nothing themselves, so the driver beats for them)."""

    def __init__(self, store: Store, owner: str, every: float):
        self.store, self.owner, self.every = store, owner, every
        self.run_ids: set[str] = set()
        self._guard = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="ray-heartbeats", daemon=True)

    def add(self, run_id: str) -> None:
        with self._guard:
            self.run_ids.add(run_id)

    def discard(self, run_id: str) -> None:
        with self._guard:
            self.run_ids.discard(run_id)

    def _beat(self) -> None:
        while not self._done.wait(self.every):
            with self._guard:
                ids = list(self.run_ids)
            for run_id in ids:
                try:
                    self.store.heartbeat(run_id, self.owner)
                except Exception:  # noqa: BLE001 - a busy store delays one beat; the next one retries
                    continue

    def __enter__(self) -> "_Heartbeats":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

