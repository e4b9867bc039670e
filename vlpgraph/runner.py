"""Run an Experiment's trials one after another into a Store: skip what is done, resume what was
interrupted, record what fails and go on. Only rank 0 writes (under torchrun every rank trains)."""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from vlpgraph.compile import Plan, compile_trial
from vlpgraph.errors import TrialFailed, UserError
from vlpgraph.ports import BuildContext
from vlpgraph.store import Store
from vlpgraph.sweep import Experiment, Trial
from vlpgraph.train import Checkpointer, Hooks, fit


@dataclass
class TrialOutcome:
    trial: Trial
    status: str  # completed | failed | skipped
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


def trial_label(trial: Trial) -> str:
    grid = " ".join(f"{k}={v}" for k, v in trial.grid.items())
    return f"{trial.variant} {grid} seed={trial.seed}".replace("  ", " ")


class Runner:
    def __init__(self, store: Store, device: torch.device, console: Console | None = None, rank: int = 0):
        self.store = store
        self.device = device
        self.console = console or Console(stderr=True)
        self.rank = rank

    # ---------------------------------------------------------------------------------- public

    def run(self, exp: Experiment) -> list[TrialOutcome]:
        n = len(exp.trials)
        if self.rank == 0:
            for t in exp.trials:
                if self.store.status(t.run_id) is None:
                    self._start(exp, t, status="queued")
        outcomes: list[TrialOutcome] = []
        with Progress(
            TextColumn("[bold]trial {task.fields[trial]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[sps]} samples/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
            disable=self.rank != 0,
        ) as progress:
            for i, trial in enumerate(exp.trials, 1):
                task = progress.add_task("", total=None, trial=f"{i}/{n}", loss="-", sps="-")
                outcome = self._run_one(exp, trial, progress, task)
                progress.update(task, visible=False)
                outcomes.append(outcome)
                if self.rank == 0:
                    self._print_outcome(i, n, outcome)
        return outcomes

    # --------------------------------------------------------------------------------- one trial

    def _start(self, exp: Experiment, trial: Trial, status: str) -> None:
        self.store.start_run(
            trial.run_id,
            graph=exp.name,
            variant=trial.variant,
            seed=trial.seed,
            params=trial.document(),
            flat_params=trial.flat_params(),
            device=str(self.device),
            status=status,
        )

    def _evals_missing(self, trial: Trial, run: dict | None) -> list[str]:
        names = trial.graph.by_role("evaluator")
        if not run or run.get("step") is None:
            return names
        done = self.store.completed_evals(trial.run_id)
        return [n for n in names if (n, int(run["step"])) not in done]

    def _run_one(self, exp: Experiment, trial: Trial, progress: Progress, task) -> TrialOutcome:
        run = self.store.run(trial.run_id)
        status = run["status"] if run else None
        missing_evals = self._evals_missing(trial, run)
        if status == "completed" and not missing_evals:
            return TrialOutcome(trial, "skipped", wall_s=run.get("wall_s") or 0.0)
        t0 = time.perf_counter()
        try:
            if self.rank == 0 and status != "completed":
                self._start(exp, trial, status="running")
            plan = compile_trial(trial, self.store.root / "cache", self.device, log=self._log)
            ckpt = Checkpointer(self.store.run_dir(trial.run_id) / "checkpoints")
            if status == "completed":  # only evaluators added since: run them on the final checkpoint
                ckpt.load_weights(plan.model.modules)
                metrics = self._evaluate(plan, int(run["step"]), only=missing_evals)
                return TrialOutcome(trial, "completed", wall_s=run.get("wall_s") or 0.0, metrics=metrics)
            result = fit(plan.model, trial.seed, ckpt, self._hooks(plan, progress, task))
            metrics = self._evaluate(plan, result.step)
            if self.rank == 0:
                self.store.finish_run(
                    trial.run_id, "completed", wall_s=result.wall_s, train_samples=result.train_samples, step=result.step
                )
            return TrialOutcome(trial, "completed", wall_s=result.wall_s, metrics=metrics)
        except KeyboardInterrupt:
            if self.rank == 0:
                self.store.finish_run(trial.run_id, "failed", error="interrupted (run again to resume)")
            raise
        except UserError as e:
            if self.rank == 0:
                self.store.finish_run(trial.run_id, "failed", error=str(e))
            raise
        except Exception as e:  # noqa: BLE001 - a failing trial is recorded and the sweep goes on
            msg = str(e) if isinstance(e, TrialFailed) else f"{type(e).__name__}: {e}"
            if self.rank == 0:
                self.store.finish_run(
                    trial.run_id, "failed", error=msg + ("" if isinstance(e, TrialFailed) else "\n" + traceback.format_exc())
                )
            return TrialOutcome(trial, "failed", wall_s=time.perf_counter() - t0, error=msg)

    def _hooks(self, plan: Plan, progress: Progress, task) -> Hooks:
        run_id = plan.trial.run_id

        label = next(t.fields["trial"] for t in progress.tasks if t.id == task)
        batch = plan.model.params.batch_size
        plain = self.rank == 0 and not self.console.is_terminal  # logs and CI: a plain line per 10%
        next_line = [0]

        def on_step(step: int, total: int, loss: float, sps: float) -> None:
            progress.update(task, completed=step, total=total, loss=f"{loss:.3f}", sps=f"{sps:.0f}")
            if plain and (step >= next_line[0] or step == total):
                next_line[0] = step + max(1, total // 10)
                eta = (total - step) * batch / max(sps, 1e-9)
                self.console.print(f"  trial {label}: step {step}/{total} loss {loss:.3f} {sps:.0f} samples/s ETA {eta:.0f}s", highlight=False)

        if self.rank != 0:
            return Hooks(on_step=on_step)

        def on_resume(step: int) -> None:
            self._log(f"resuming {run_id} from its checkpoint at step {step}")
            self.store.delete_metrics_after(run_id, step)

        return Hooks(
            on_metrics=lambda rows: self.store.log_metrics(run_id, rows, through_step=rows[0]["step"]),
            on_resume=on_resume,
            on_step=on_step,
            on_eval=lambda step: self._evaluate(plan, step),
            on_note=self._log,
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
            headline = getattr(evaluator, "headline", None)
            self.store.log_evals(plan.trial.run_id, [
                dict(step=step, evaluator=name, metric=k, value=float(v), headline=k == headline)
                for k, v in result.metrics.items()
            ])
            if result.patch_scores:
                self.store.log_patch_scores(plan.trial.run_id, [dict(step=step, evaluator=name, **row) for row in result.patch_scores])
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
        elif o.status == "failed":
            self.console.print(f"[{i}/{n}] {label}: [red]FAILED[/red] after {o.wall_s:.0f}s: {o.error}", highlight=False)
        else:
            shown = ", ".join(f"{k}={v:.3f}" for k, v in (o.metrics or {}).items() if not k.endswith((".n", ".chance")))
            self.console.print(f"[{i}/{n}] {label}: completed in {o.wall_s:.0f}s  {shown}", highlight=False)
