"""One trial's job: compile it, train it (resuming from its last checkpoint) and run its evaluators,
reporting everything through a ``TrialSink``.

The job never reads the store: what is left to do comes with its ``Claim`` (the scheduler decided
it before the job started), so the same job runs wherever its sink sends the writes: straight into
the store of this process (``StoreSink``, the sequential executor's) or, from a Ray worker, as
messages to the driver that writes them. Checkpoints and caches are files under the store
directory, which the job reads and writes itself (a worker on another node needs it mounted).

Under torchrun every rank runs the job together; rank 0 alone writes, notes and evaluates, and the
others wait for it at the end (``rank`` says which one this is).
"""

from __future__ import annotations

import time
import traceback
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from vlpgraph.engine.compile import Plan, compile_trial
from vlpgraph.engine.ports import BuildContext
from vlpgraph.engine.sweep import Experiment, Trial
from vlpgraph.errors import Interrupted, TrialFailed, UserError
from vlpgraph.execution.ranks import barrier, world_size
from vlpgraph.execution.train import Checkpointer, Hooks, fit
from vlpgraph.store import Store

# The store writes a trial's job makes (Store methods). Every one replaces by key, so a retried trial
# writes the same rows again, never beside the old ones.
STORE_WRITES = ("start_run", "finish_run", "log_metrics", "delete_metrics_after", "log_evaluation", "set_document")


@dataclass
class TrialOutcome:
    """How one trial ended for this run of the sweep."""

    trial: Trial
    status: str  # completed | failed | skipped | interrupted
    wall_s: float = 0.0
    error: str | None = None
    metrics: dict[str, float] | None = None


@dataclass(frozen=True)
class Claim:
    """What the scheduler found for one trial (the same on every rank): either ``held`` by another
    live runner (``owner``, last heard of ``age`` seconds ago), or what its row says (``status``,
    ``step``, ``wall_s``, ``processes``) and whether this runner now holds it to do something
    (``claimed``; False for a trial with nothing left to do). ``missing``: for a completed trial,
    the evaluators to run on its final checkpoint."""

    claimed: bool = False
    held: bool = False
    owner: str | None = None
    age: float = 0.0
    status: str | None = None
    step: int | None = None
    wall_s: float | None = None
    processes: int | None = None
    missing: tuple[str, ...] | None = None


def run_fields(exp: Experiment, trial: Trial, device: torch.device | str) -> dict[str, Any]:
    """``Store.start_run``'s keyword arguments for ``trial`` (all but its status), the same whoever
    writes the row: the scheduler queueing it, the job starting it."""
    return dict(graph=exp.name, variant=trial.variant, seed=trial.seed, params=trial.document(),
                flat_params=trial.flat_params(), device=str(device), processes=world_size())


class TrialSink(ABC):
    """Where one trial's job reports (its store writes, lines for the user, step progress) and what
    it asks while it trains (whether to stop). The job calls ``write`` and ``note`` on rank 0 only."""

    @abstractmethod
    def write(self, method: str, *args, **kwargs) -> None:
        """Have the store do ``Store.<method>(*args, **kwargs)``; ``method`` is one of STORE_WRITES.
        They must reach the store in the order they were made."""

    @abstractmethod
    def note(self, message: str) -> None:
        """A line for the user (a cache reused, resuming from a checkpoint, a warning)."""

    def step(self, step: int, total: int, loss: float, samples_per_s: float, batch_size: int) -> None:
        """Training reached ``step`` of ``total`` (for a progress bar). Shows nothing by default."""

    def stop_reason(self) -> str | None:
        """Polled after every training step: a reason (a signal's name, say) makes the job
        checkpoint, record the trial as interrupted and return. None (the default) trains on."""
        return None

    def before_checkpoint(self) -> None:
        """Called before each checkpoint is saved; returns once every write made so far is in the
        store, so a checkpoint is never ahead of the store. Nothing to wait for by default."""


class StoreSink(TrialSink):
    """A sink that writes to a Store of this process, for executors whose trials run where the
    store is. ``note``, ``step`` and ``stop_reason`` are the callables to forward those to."""

    def __init__(self, store: Store, *, note: Callable[[str], None] | None = None,
                 step: Callable[[int, int, float, float, int], None] | None = None,
                 stop_reason: Callable[[], str | None] | None = None):
        self.store = store
        self.on_note = note
        self.on_step = step
        self.on_stop_reason = stop_reason

    def write(self, method: str, *args, **kwargs) -> None:
        if method not in STORE_WRITES:
            raise ValueError(f"a trial's job writes {', '.join(STORE_WRITES)}, not Store.{method}")
        getattr(self.store, method)(*args, **kwargs)

    def note(self, message: str) -> None:
        if self.on_note is not None:
            self.on_note(message)

    def step(self, step: int, total: int, loss: float, samples_per_s: float, batch_size: int) -> None:
        if self.on_step is not None:
            self.on_step(step, total, loss, samples_per_s, batch_size)

    def stop_reason(self) -> str | None:
        return self.on_stop_reason() if self.on_stop_reason is not None else None


class TrialJob:
    """Runs one claimed trial: ``TrialJob(exp, trial, claim, sink, root=..., device=...).run()``.
    ``root``: the store directory (checkpoints and caches are files under it). A trial that failed
    or was interrupted is recorded as such and returned, not raised (a second Ctrl-C,
    KeyboardInterrupt, is recorded and raised)."""

    def __init__(self, exp: Experiment, trial: Trial, claim: Claim, sink: TrialSink, *, root: Path | str,
                 device: torch.device, rank: int = 0):
        self.exp = exp
        self.trial = trial
        self.claim = claim
        self.sink = sink
        self.paths = Store(root)  # for its paths only: a Store holds no connection, and this one never opens one
        self.device = device
        self.rank = rank

    def note(self, message: str) -> None:
        if self.rank == 0:
            self.sink.note(message)

    def run(self) -> TrialOutcome:
        trial, claim, run_id = self.trial, self.claim, self.trial.run_id
        status, missing_evals = claim.status, claim.missing
        if status == "completed" and not missing_evals:  # nothing to do (the scheduler does not hand out such claims)
            return TrialOutcome(trial, "skipped", wall_s=claim.wall_s or 0.0)
        t0 = time.perf_counter()
        try:
            if self.rank == 0 and status != "completed":
                self.start()
            plan = compile_trial(trial, self.paths.root / "cache", self.device, log=self.note)
            ckpt = SinkCheckpointer(self.sink, self.paths.run_dir(run_id) / "checkpoints")
            if status == "completed":  # only evaluators added or edited since: run them on the final checkpoint
                final, problem = final_checkpoint(ckpt, int(claim.step))
                if problem is None:
                    ckpt.load_weights(plan.model.modules, final)
                    metrics = self.evaluate(plan, int(claim.step), only=missing_evals)
                    if self.rank == 0:  # the run's document now names the evaluators its evaluations came from
                        self.sink.write("set_document", run_id, trial.document(), trial.flat_params())
                    barrier()
                    return TrialOutcome(trial, "completed", wall_s=claim.wall_s or 0.0, metrics=metrics)
                # never evaluate another step's weights as if they were the final ones: train the rest again
                # from the last intact checkpoint (resume is exact, so the final model is the same one)
                self.note(f"{run_id}: its final checkpoint cannot be used ({problem}); training again from "
                          f"its last intact checkpoint to run {', '.join(missing_evals)}")
                if self.rank == 0:
                    self.start()
            result = fit(plan.model, trial.seed, ckpt, self.hooks(plan))
            metrics = self.evaluate(plan, result.step)
            if self.rank == 0:
                self.sink.write("finish_run", run_id, "completed", wall_s=result.wall_s,
                                train_samples=result.train_samples, step=result.step)
            barrier()  # rank 0 evaluated alone: the others wait here, not in the next trial's collectives
            return TrialOutcome(trial, "completed", wall_s=result.wall_s, metrics=metrics)
        except Interrupted as e:
            msg = (f"interrupted by {self.sink.stop_reason() or e.signal_name} at step {e.step} "
                   "(checkpoint saved; the same command resumes)")
            if self.rank == 0:
                self.sink.write("finish_run", run_id, "interrupted", error=msg, step=e.step)
            return TrialOutcome(trial, "interrupted", wall_s=time.perf_counter() - t0, error=msg)
        except KeyboardInterrupt:  # a second Ctrl-C: stop at once, from the last checkpoint on the next run
            if self.rank == 0:
                self.sink.write("finish_run", run_id, "interrupted",
                                error="interrupted at once by a second SIGINT (resumes from the last checkpoint)")
            raise
        except Exception as e:  # noqa: BLE001 - a failing trial (even on a UserError) is recorded and the sweep goes on
            user = isinstance(e, (TrialFailed, UserError))
            msg = str(e) if user else f"{type(e).__name__}: {e}"
            if self.rank == 0:
                self.sink.write("finish_run", run_id, "failed", error=msg + ("" if user else "\n" + traceback.format_exc()))
            return TrialOutcome(trial, "failed", wall_s=time.perf_counter() - t0, error=msg)

    def start(self) -> None:
        """Mark the trial running (a new attempt)."""
        self.sink.write("start_run", self.trial.run_id, **run_fields(self.exp, self.trial, self.device), status="running")

    def hooks(self, plan: Plan) -> Hooks:
        """The training loop's hooks: every rank polls the sink to stop; rank 0 also reports."""
        run_id, batch = plan.trial.run_id, plan.model.params.batch_size

        def on_step(step: int, total: int, loss: float, sps: float) -> None:
            self.sink.step(step, total, loss, sps, batch)

        def should_stop() -> bool:
            return self.sink.stop_reason() is not None

        if self.rank != 0:
            return Hooks(on_step=on_step, should_stop=should_stop)

        def on_resume(step: int) -> None:
            self.note(f"resuming {run_id} from its checkpoint at step {step}")
            self.sink.write("delete_metrics_after", run_id, step)

        return Hooks(
            on_metrics=lambda rows: self.sink.write("log_metrics", run_id, rows, through_step=rows[0]["step"]),
            on_resume=on_resume,
            on_step=on_step,
            on_eval=lambda step: self.evaluate(plan, step),
            on_note=self.note,
            should_stop=should_stop,
        )

    def evaluate(self, plan: Plan, step: int, only: tuple[str, ...] | None = None) -> dict[str, float]:
        """Run the plan's evaluators (``only`` those, if given) on the model as it is at ``step`` and
        record their results; rank 0 alone evaluates ({} elsewhere)."""
        if self.rank != 0:
            return {}
        out: dict[str, float] = {}
        for name, evaluator in plan.evaluators.items():
            if only is not None and name not in only:
                continue
            node = plan.trial.graph.nodes[name]
            ctx = BuildContext(name, node.hash, plan.trial.seed, self.paths.root / "cache", self.device, self.note)
            result = evaluator.evaluate(plan.model, ctx)
            # one transaction replaces whatever this evaluator wrote at this step (an older version's rows)
            self.sink.write("log_evaluation", plan.trial.run_id, step, name, node.hash,
                            {k: float(v) for k, v in result.metrics.items()},
                            headline=getattr(evaluator, "headline", None), patch_rows=result.patch_scores or (),
                            sample_rows=result.samples or ())
            out.update({f"{name}.{k}": float(v) for k, v in result.metrics.items()})
        return out


class SinkCheckpointer(Checkpointer):
    """A Checkpointer that saves only once the sink has every write made so far in the store (the
    rows up to this step): a checkpoint is never ahead of the store."""

    def __init__(self, sink: TrialSink, directory: Path):
        super().__init__(directory)
        self.sink = sink

    def save(self, *args, **kwargs) -> Path:
        self.sink.before_checkpoint()
        return super().save(*args, **kwargs)


def final_checkpoint(ckpt: Checkpointer, step: int):
    """(the checkpoint of a completed run's final ``step``, None) or (None, why it cannot be used)."""
    final = ckpt.latest()
    problem = "there is none" if final is None else ckpt.damage(final)
    if problem is None and final.name != f"step-{step:08d}":
        problem = f"the newest one is {final.name}, the run ended at step {step}"
    return (final, None) if problem is None else (None, problem)
