"""Run an Experiment's trials into a Store: skip what is done, resume what was interrupted, record
what fails and go on. Only rank 0 writes (under torchrun every rank trains; rank 0 decides and the
others follow its decisions).

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
import signal
import socket
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from vlpgraph.engine.compile import Plan, compile_trial
from vlpgraph.errors import Interrupted, TrialFailed, UserError
from vlpgraph.engine.ports import BuildContext
from vlpgraph.store import Store, lease_s
from vlpgraph.engine.sweep import Experiment, Trial
from vlpgraph.execution.train import Checkpointer, Hooks, fit


@dataclass
class TrialOutcome:
    trial: Trial
    status: str  # completed | failed | skipped | interrupted
    wall_s: float = 0.0
    error: str | None = None
    metrics: dict[str, float] | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: CUDA is not available on this machine (use --device cpu or auto)")
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        name = f"cuda:{os.environ['LOCAL_RANK']}"
    return torch.device(name)


def init_distributed(device: torch.device) -> int:
    """Join the torchrun process group when launched by torchrun; returns this process's rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank() if dist.is_initialized() else 0


def shutdown_distributed() -> None:
    """Leave the process group together: no rank tears it down while another still talks to it."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _dead_owner(owner: str | None) -> str | None:
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


def trial_label(trial: Trial) -> str:
    grid = " ".join(f"{k}={v}" for k, v in trial.grid.items())
    return f"{trial.variant} {grid} seed={trial.seed}".replace("  ", " ")


def trial_progress(console: Console, disable: bool = False) -> Progress:
    """The sweep's live display: one bar per running trial (step, loss, samples/s, ETA)."""
    return Progress(
        TextColumn("[bold]trial {task.fields[trial]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[sps]} samples/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=disable,
    )


def step_display(progress: Progress, task, batch: int, console: Console, plain: bool) -> Callable[[int, int, float, float], None]:
    """on_step(step, total, loss, samples_per_s) for one trial: moves its bar in ``progress`` and,
    when ``plain`` (logs and CI, where the console is no terminal), prints a line per 10%."""
    label = next(t.fields["trial"] for t in progress.tasks if t.id == task)
    next_line = [0]

    def on_step(step: int, total: int, loss: float, sps: float) -> None:
        progress.update(task, completed=step, total=total, loss=f"{loss:.3f}", sps=f"{sps:.0f}")
        if plain and (step >= next_line[0] or step == total):
            next_line[0] = step + max(1, total // 10)
            eta = (total - step) * batch / max(sps, 1e-9)
            console.print(f"  trial {label}: step {step}/{total} loss {loss:.3f} {sps:.0f} samples/s ETA {eta:.0f}s", highlight=False)

    return on_step


class Runner:
    def __init__(self, store: Store, device: torch.device, console: Console | None = None, rank: int = 0):
        self.store = store
        self.device = device
        self.console = console or Console(stderr=True)
        self.rank = rank
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.lease = lease_s()
        self.heartbeat_every = min(10.0, self.lease / 4)  # several beats per lease: one late beat is no death
        self.stop_signal: str | None = None  # set by request_stop (a signal handler)

    # ---------------------------------------------------------------------------------- public

    def request_stop(self, reason: str) -> None:
        """Ask the run to stop: the training loop checkpoints after its current step and leaves, and
        no further trial starts. Safe to call from a signal handler (sets a flag, writes one line)."""
        if self.stop_signal is None and self.rank == 0:
            os.write(2, f"\nvlpgraph: {reason}: stopping after the current step (a checkpoint is saved; "
                        f"the same command resumes). Send it again to stop at once.\n".encode())
        self.stop_signal = self.stop_signal or reason

    def run(self, exp: Experiment) -> list[TrialOutcome]:
        """Run every trial not yet done (in file order, skipping those other live runners hold,
        then waiting for them); returns one outcome per trial this runner finished or skipped, in
        the order they ended. Stops early (without an outcome for the rest) after request_stop."""
        n = len(exp.trials)
        if self.rank == 0:
            for t in exp.trials:
                self._start(exp, t, status="queued", if_absent=True)
        number = {t.run_id: i for i, t in enumerate(exp.trials, 1)}
        pending = list(exp.trials)
        announced: dict[str, str] = {}  # run_id -> the owner we said we wait for
        outcomes: list[TrialOutcome] = []
        with trial_progress(self.console, disable=self.rank != 0) as progress:
            while pending and not self._stopping():
                held: dict[str, dict] = {}
                for trial in list(pending):
                    if self._stopping():
                        break
                    i = number[trial.run_id]
                    row = self._claim(exp, trial)
                    if row.get("held"):
                        held[trial.run_id] = row
                        continue
                    pending.remove(trial)
                    if not row["claimed"]:
                        outcome = self._skipped(trial, row)
                    else:
                        task = progress.add_task("", total=None, trial=f"{i}/{n}", loss="-", sps="-")
                        outcome = self._run_claimed(exp, trial, row, progress, task)
                        progress.update(task, visible=False)
                    outcomes.append(outcome)
                    if self.rank == 0:
                        self._print_outcome(i, n, outcome)
                if pending and len(held) == len(pending) and not self._stopping():
                    for trial in pending:  # every trial left runs elsewhere: wait for them
                        row = held[trial.run_id]
                        if announced.get(trial.run_id) != row["owner"]:
                            announced[trial.run_id] = row["owner"]
                            self._log(f"waiting for trial {number[trial.run_id]}/{n} {trial_label(trial)} "
                                      f"({trial.run_id}): another runner holds it ({row['owner']}, alive "
                                      f"{row['age']:.0f}s ago; taken over if silent for {self.lease:.0f}s)")
                    time.sleep(min(2.0, self.lease / 4))
        if pending and self.rank == 0:
            self._log(f"stopped: {len(pending)} trial(s) not run; the same command runs them")
        return outcomes

    # ------------------------------------------------------------------------------ coordination

    @property
    def world(self) -> int:
        """How many processes train each trial (torchrun's world size; 1 without torchrun)."""
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    def _skipped(self, trial: Trial, row: dict) -> TrialOutcome:
        """The outcome of a trial already completed. The number of processes is not part of a trial's
        identity (trainer hash + seed: docs/architecture.md, "Identity"), but it sets the global batch (batch_size per
        process × processes): a trial completed with another number of processes is kept, and said."""
        done_with = row.get("processes")
        if done_with and int(done_with) != self.world:
            self._log(f"warning: {trial.run_id} was completed by {done_with} process(es) and this command has "
                      f"{self.world}: its results stand for {done_with} (the global batch is batch_size × "
                      "processes); to train it with this many, use another --store (or change a param)")
        return TrialOutcome(trial, "skipped", wall_s=row.get("wall_s") or 0.0)

    def _stopping(self) -> bool:
        """Whether any rank was asked to stop (all ranks agree, so they leave the sweep together)."""
        if dist.is_available() and dist.is_initialized():
            flag = torch.tensor([1 if self.stop_signal else 0], device=self.device)  # nccl needs it on the GPU
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return bool(flag.item())
        return self.stop_signal is not None

    def _from_rank0(self, value):
        """Rank 0's value on every rank (the store decisions are rank 0's alone)."""
        if dist.is_available() and dist.is_initialized():
            box = [value]
            dist.broadcast_object_list(box, src=0)
            return box[0]
        return value

    def _barrier(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()

    def _claim(self, exp: Experiment, trial: Trial) -> dict:
        """What this runner may do with a trial, decided by rank 0 and shared with every rank:
        {"held": True, owner, age} when a live runner holds it; else its row's status, step, wall_s,
        ``missing`` (the evaluators to run on a completed trial) and ``claimed`` (False for a trial
        with nothing left to do, which is not claimed: no write)."""
        row: dict = {}
        if self.rank == 0:
            row = self.store.run(trial.run_id) or {}
            if not row:  # deleted since it was queued (a claim needs a row)
                self._start(exp, trial, status="queued", if_absent=True)
            if row.get("status") == "completed":
                row["missing"] = self._evals_missing(trial, row)
            row["claimed"] = not (row.get("status") == "completed" and not row["missing"])
            if row["claimed"]:
                granted, fresh = self.store.claim(trial.run_id, self.owner, self.lease, dead_owner=_dead_owner(row.get("owner")))
                fresh = dict(fresh or {})
                if not granted:
                    seen = fresh.get("heartbeat_at") or fresh.get("updated_at")
                    now = datetime.now(timezone.utc).replace(tzinfo=None)
                    row = {"held": True, "owner": fresh.get("owner"),
                           "age": max((now - seen).total_seconds(), 0.0) if seen else 0.0}
                elif (fresh.get("status"), fresh.get("step")) != (row.get("status"), row.get("step")):
                    # another runner got further between our read and our claim: look again
                    fresh["missing"] = self._evals_missing(trial, fresh) if fresh.get("status") == "completed" else None
                    fresh["claimed"] = True
                    row = fresh
            row = {k: v for k, v in row.items()
                   if k in ("held", "owner", "age", "status", "step", "wall_s", "missing", "claimed", "processes")}
        return self._from_rank0(row)

    @contextmanager
    def _heartbeat(self, run_id: str) -> Iterator[None]:
        """While the block runs, a daemon thread renews this runner's claim on the trial every few
        seconds (rank 0 only); it warns once if another runner took the trial over."""
        if self.rank != 0:
            yield
            return
        done = threading.Event()

        def beat() -> None:
            warned = False
            while not done.wait(self.heartbeat_every):
                try:
                    held = self.store.heartbeat(run_id, self.owner)
                except Exception:  # noqa: BLE001 - a busy store delays one beat; the next one retries
                    continue
                if not held and not warned:
                    warned = True
                    self._log(f"warning: another runner took over {run_id} (this one was silent for longer "
                              f"than the lease, {self.lease:.0f}s); both are now running it")

        thread = threading.Thread(target=beat, name=f"heartbeat-{run_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    # --------------------------------------------------------------------------------- one trial

    def _start(self, exp: Experiment, trial: Trial, status: str, if_absent: bool = False) -> None:
        self.store.start_run(
            trial.run_id,
            graph=exp.name,
            variant=trial.variant,
            seed=trial.seed,
            params=trial.document(),
            flat_params=trial.flat_params(),
            device=str(self.device),
            status=status,
            if_absent=if_absent,
            processes=self.world,
        )

    def _evals_missing(self, trial: Trial, run: dict | None) -> list[str]:
        """The evaluators with no result at the run's final step written by the evaluator as it is
        in this graph (new ones, and edited ones: another ks, prompt or scorer is another hash)."""
        names = trial.graph.by_role("evaluator")
        if not run or run.get("step") is None:
            return names
        step = int(run["step"])
        hashes = {n: trial.graph.nodes[n].hash for n in names}
        done = self.store.completed_evals(trial.run_id, hashes)
        missing = [n for n in names if (n, step) not in done]
        if missing and run.get("status") == "completed":
            present = self.store.completed_evals(trial.run_id)
            changed = [n for n in missing if (n, step) in present]
            if changed:
                self._log(f"{trial.run_id}: evaluator(s) {', '.join(changed)} changed since step {step} was "
                          "evaluated (or the store did not record which version ran): evaluating again")
        return missing

    def _run_claimed(self, exp: Experiment, trial: Trial, run: dict, progress: Progress, task) -> TrialOutcome:
        try:
            with self._heartbeat(trial.run_id):
                return self._run_one(exp, trial, run, progress, task)
        finally:
            if self.rank == 0:
                self.store.release(trial.run_id, self.owner)

    def _run_one(self, exp: Experiment, trial: Trial, run: dict, progress: Progress, task) -> TrialOutcome:
        status, missing_evals = run.get("status"), run.get("missing")
        if status == "completed" and not missing_evals:  # finished by another runner meanwhile
            return self._skipped(trial, run)
        t0 = time.perf_counter()
        try:
            if self.rank == 0 and status != "completed":
                self._start(exp, trial, status="running")
            plan = compile_trial(trial, self.store.root / "cache", self.device, log=self._log)
            ckpt = self._checkpointer(trial.run_id)
            if status == "completed":  # only evaluators added or edited since: run them on the final checkpoint
                final, problem = self._final_checkpoint(ckpt, int(run["step"]))
                if problem is None:
                    ckpt.load_weights(plan.model.modules, final)
                    metrics = self._evaluate(plan, int(run["step"]), only=missing_evals)
                    if self.rank == 0:  # the run's document now names the evaluators its evaluations came from
                        self.store.set_document(trial.run_id, trial.document(), trial.flat_params())
                    self._barrier()
                    return TrialOutcome(trial, "completed", wall_s=run.get("wall_s") or 0.0, metrics=metrics)
                # never evaluate another step's weights as if they were the final ones: train the rest again
                # from the last intact checkpoint (resume is exact, so the final model is the same one)
                self._log(f"{trial.run_id}: its final checkpoint cannot be used ({problem}); training again from "
                          f"its last intact checkpoint to run {', '.join(missing_evals)}")
                if self.rank == 0:
                    self._start(exp, trial, status="running")
            result = fit(plan.model, trial.seed, ckpt, self._hooks(plan, progress, task))
            metrics = self._evaluate(plan, result.step)
            if self.rank == 0:
                self.store.finish_run(
                    trial.run_id, "completed", wall_s=result.wall_s, train_samples=result.train_samples, step=result.step
                )
            self._barrier()  # rank 0 evaluated alone: the others wait here, not in the next trial's collectives
            return TrialOutcome(trial, "completed", wall_s=result.wall_s, metrics=metrics)
        except Interrupted as e:
            msg = f"interrupted by {self.stop_signal or e.signal_name} at step {e.step} (checkpoint saved; the same command resumes)"
            if self.rank == 0:
                self.store.finish_run(trial.run_id, "interrupted", error=msg, step=e.step)
            return TrialOutcome(trial, "interrupted", wall_s=time.perf_counter() - t0, error=msg)
        except KeyboardInterrupt:  # a second Ctrl-C: stop at once, from the last checkpoint on the next run
            if self.rank == 0:
                self.store.finish_run(trial.run_id, "interrupted",
                                      error="interrupted at once by a second SIGINT (resumes from the last checkpoint)")
            raise
        except Exception as e:  # noqa: BLE001 - a failing trial (even on a UserError) is recorded and the sweep goes on
            user = isinstance(e, (TrialFailed, UserError))
            msg = str(e) if user else f"{type(e).__name__}: {e}"
            if self.rank == 0:
                self.store.finish_run(trial.run_id, "failed", error=msg + ("" if user else "\n" + traceback.format_exc()))
            return TrialOutcome(trial, "failed", wall_s=time.perf_counter() - t0, error=msg)

    def _checkpointer(self, run_id: str) -> Checkpointer:
        """Where a trial's checkpoints go (a Ray worker's also waits, before each save, until the
        driver has written every row it sent: a checkpoint is never ahead of the store)."""
        return Checkpointer(self.store.run_dir(run_id) / "checkpoints")

    @staticmethod
    def _final_checkpoint(ckpt: Checkpointer, step: int):
        """(the checkpoint of a completed run's final ``step``, None) or (None, why it cannot be used)."""
        final = ckpt.latest()
        problem = "there is none" if final is None else ckpt.damage(final)
        if problem is None and final.name != f"step-{step:08d}":
            problem = f"the newest one is {final.name}, the run ended at step {step}"
        return (final, None) if problem is None else (None, problem)

    def _step_reporter(self, plan: Plan, progress: Progress, task) -> Callable[[int, int, float, float], None]:
        """The training loop's on_step (see step_display). A Ray worker sends its steps to the driver instead."""
        return step_display(progress, task, plan.model.params.batch_size, self.console,
                            plain=self.rank == 0 and not self.console.is_terminal)

    def _should_stop_training(self) -> bool:
        """Polled after every training step: True makes the loop checkpoint and raise Interrupted."""
        return self.stop_signal is not None

    def _hooks(self, plan: Plan, progress: Progress, task) -> Hooks:
        run_id = plan.trial.run_id
        on_step = self._step_reporter(plan, progress, task)

        def should_stop() -> bool:
            return self._should_stop_training()

        if self.rank != 0:
            return Hooks(on_step=on_step, should_stop=should_stop)

        def on_resume(step: int) -> None:
            self._log(f"resuming {run_id} from its checkpoint at step {step}")
            self.store.delete_metrics_after(run_id, step)

        return Hooks(
            on_metrics=lambda rows: self.store.log_metrics(run_id, rows, through_step=rows[0]["step"]),
            on_resume=on_resume,
            on_step=on_step,
            on_eval=lambda step: self._evaluate(plan, step),
            on_note=self._log,
            should_stop=should_stop,
        )

    def _evaluate(self, plan: Plan, step: int, only: list[str] | None = None) -> dict[str, float]:
        if self.rank != 0:
            return {}
        out: dict[str, float] = {}
        for name, evaluator in plan.evaluators.items():
            if only is not None and name not in only:
                continue
            node = plan.trial.graph.nodes[name]
            ctx = BuildContext(name, node.hash, plan.trial.seed, self.store.root / "cache", self.device, self._log)
            result = evaluator.evaluate(plan.model, ctx)
            # one transaction replaces whatever this evaluator wrote at this step (an older version's rows)
            self.store.log_evaluation(plan.trial.run_id, step, name, node.hash,
                                      {k: float(v) for k, v in result.metrics.items()},
                                      headline=getattr(evaluator, "headline", None), patch_rows=result.patch_scores or (),
                                      sample_rows=result.samples or ())
            out.update({f"{name}.{k}": float(v) for k, v in result.metrics.items()})
        return out

    # ---------------------------------------------------------------------------------- output

    def _log(self, message: str) -> None:
        if self.rank == 0:
            self.console.print(f"  {message}", highlight=False)

    def _print_outcome(self, i: int, n: int, o: TrialOutcome) -> None:
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


@contextmanager
def stop_on_signals(runner: Runner) -> Iterator[None]:
    """While the block runs, the first SIGTERM or SIGINT asks ``runner`` to stop after the current
    step (checkpoint, trial recorded as interrupted); the handlers that were there before come back
    at once, so a second signal does what it did before (SIGTERM's default ends the process,
    SIGINT's raises KeyboardInterrupt). Restored on leaving. Python delivers signals to the main
    thread only, so elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {s: signal.getsignal(s) for s in signals}

    def restore() -> None:
        for s in signals:
            signal.signal(s, previous[s] if previous[s] is not None else signal.SIG_DFL)

    def handler(signum, frame) -> None:
        restore()
        runner.request_stop(signal.Signals(signum).name)

    for s in signals:
        signal.signal(s, handler)
    try:
        yield
    finally:
        restore()


def exit_code(signal_name: str) -> int:
    """The shell's code for a process ended by a signal: 128 + its number (130 SIGINT, 143 SIGTERM)."""
    return 128 + int(signal.Signals[signal_name])
