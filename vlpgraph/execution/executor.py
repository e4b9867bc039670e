"""The executor interface: how a sweep's trials get run. An executor decides where and in what order
each trial's job runs (``SequentialExecutor``: one after another in this process; ``RayExecutor``:
as Ray tasks); the store bookkeeping every executor shares is its ``Scheduler``'s, and one trial's
work is a ``TrialJob`` reporting through a ``TrialSink`` (vlpgraph.execution.trial). A new executor
(a SLURM array, say) subclasses ``Executor`` and implements ``run`` with those public names.

Also here: the SIGTERM/SIGINT handling around ``run`` and the exit code of a stopped run.
"""

from __future__ import annotations

import signal
import threading
from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import Iterator, Protocol

from vlpgraph.engine.sweep import Experiment
from vlpgraph.execution.scheduler import Scheduler
from vlpgraph.execution.trial import TrialOutcome


class Executor(ABC):
    """Runs a sweep's trials into the store, used as::

        with executor, stop_on_signals(executor):
            outcomes = executor.run(exp)

    Entering sets up what the executor needs (a Ray cluster, say) and leaving tears it down; the
    base class needs neither. Enter it before stop_on_signals: setting up may install signal
    handlers of its own (ray.init does), which must not replace the run's."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler

    @abstractmethod
    def run(self, exp: Experiment) -> list[TrialOutcome]:
        """Run every trial of ``exp`` not yet done (skipping completed ones; a trial another live
        runner holds is not run here unless that runner falls silent); returns one outcome per
        trial this executor finished or skipped, in the order they ended. After ``request_stop`` running trials checkpoint and are
        recorded as interrupted, no new one starts, and the rest get no outcome."""

    def request_stop(self, reason: str) -> None:
        """Ask the run to stop after the current step (safe in a signal handler)."""
        self.scheduler.request_stop(reason)

    @property
    def stop_signal(self) -> str | None:
        """Why the run was asked to stop (a signal's name), or None."""
        return self.scheduler.stop_signal

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc) -> None:
        return None


class Stoppable(Protocol):
    """What stop_on_signals asks of its target (an Executor, a Scheduler)."""

    def request_stop(self, reason: str) -> None: ...


@contextmanager
def stop_on_signals(target: Stoppable) -> Iterator[None]:
    """While the block runs, the first SIGTERM or SIGINT asks ``target`` (an executor) to stop after
    the current step (checkpoint, trial recorded as interrupted); the handlers that were there
    before come back at once, so a second signal does what it did before (SIGTERM's default ends
    the process, SIGINT's raises KeyboardInterrupt). Restored on leaving. Python delivers signals
    to the main thread only, so elsewhere this does nothing."""
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
        target.request_stop(signal.Signals(signum).name)

    for s in signals:
        signal.signal(s, handler)
    try:
        yield
    finally:
        restore()


def exit_code(signal_name: str) -> int:
    """The shell's code for a process ended by a signal: 128 + its number (130 SIGINT, 143 SIGTERM)."""
    return 128 + int(signal.Signals[signal_name])
