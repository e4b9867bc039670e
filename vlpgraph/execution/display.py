"""What a sweep shows while it runs: a trial's label, and one progress bar per running trial
(step, loss, samples/s, ETA), with a plain line per 10% of a trial where the console is no terminal
(logs and CI, where a bar would not be seen)."""

from __future__ import annotations

from typing import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from vlpgraph.engine.sweep import Trial


def trial_label(trial: Trial) -> str:
    """``variant grid... seed=N``: how the console names a trial."""
    grid = " ".join(f"{k}={v}" for k, v in trial.grid.items())
    return f"{trial.variant} {grid} seed={trial.seed}".replace("  ", " ")


class SweepDisplay:
    """The sweep's live display, used as ``with SweepDisplay(console) as display:``. ``add`` gives a
    trial its bar, ``step`` moves it, ``remove`` hides it when the trial ends. ``enabled=False``
    (every torchrun rank but 0) shows nothing."""

    def __init__(self, console: Console, enabled: bool = True):
        self.console = console
        self.plain = enabled and not console.is_terminal
        self.progress = Progress(
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
            disable=not enabled,
        )
        self.bars: dict[str, int] = {}  # run_id -> its progress task
        self.steppers: dict[str, Callable[[int, int, float, float, int], None]] = {}  # run_id -> its on_step

    def __enter__(self) -> "SweepDisplay":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def add(self, run_id: str, label: str) -> None:
        """A bar for the trial ``run_id``, named ``label`` (its number in the sweep, ``i/n``)."""
        self.bars[run_id] = self.progress.add_task("", total=None, trial=label, loss="-", sps="-")

    def step(self, run_id: str, step: int, total: int, loss: float, samples_per_s: float, batch_size: int) -> None:
        """The trial reached ``step`` of ``total`` (ignored for a trial without a bar)."""
        if run_id not in self.bars:
            return
        if run_id not in self.steppers:
            self.steppers[run_id] = self._stepper(run_id, batch_size)
        self.steppers[run_id](step, total, loss, samples_per_s)

    def remove(self, run_id: str) -> None:
        """The trial ended: hide its bar."""
        self.steppers.pop(run_id, None)
        task = self.bars.pop(run_id, None)
        if task is not None:
            self.progress.update(task, visible=False)

    def _stepper(self, run_id: str, batch: int) -> Callable[[int, int, float, float], None]:
        task = self.bars[run_id]
        label = next(t.fields["trial"] for t in self.progress.tasks if t.id == task)
        next_line = [0]

        def on_step(step: int, total: int, loss: float, sps: float) -> None:
            self.progress.update(task, completed=step, total=total, loss=f"{loss:.3f}", sps=f"{sps:.0f}")
            if self.plain and (step >= next_line[0] or step == total):
                next_line[0] = step + max(1, total // 10)
                eta = (total - step) * batch / max(sps, 1e-9)
                self.console.print(f"  trial {label}: step {step}/{total} loss {loss:.3f} {sps:.0f} samples/s "
                                   f"ETA {eta:.0f}s", highlight=False)

        return on_step
