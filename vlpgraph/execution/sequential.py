"""The default executor: a sweep's trials one after another in the command's own process (never
imports Ray). Under torchrun every rank runs here, each trial on all of them together: rank 0
claims and writes, and every rank follows its decisions (the scheduler's collectives)."""

from __future__ import annotations

import time

from vlpgraph.engine.sweep import Experiment, Trial
from vlpgraph.execution.display import SweepDisplay, trial_label
from vlpgraph.execution.executor import Executor
from vlpgraph.execution.trial import Claim, TrialJob, TrialOutcome


class SequentialExecutor(Executor):
    """Runs each trial not yet done in file order in this process; when only trials that other
    live runners hold are left, waits for them (taking over a claim whose runner fell silent)."""

    def run(self, exp: Experiment) -> list[TrialOutcome]:
        s = self.scheduler
        n = len(exp.trials)
        s.queue(exp)
        number = {t.run_id: i for i, t in enumerate(exp.trials, 1)}
        pending = list(exp.trials)
        announced: dict[str, str] = {}  # run_id -> the owner we said we wait for
        outcomes: list[TrialOutcome] = []
        with SweepDisplay(s.console, enabled=s.rank == 0) as display:
            # every rank calls stopping() and claim() at the same points: they are collectives under torchrun
            while pending and not s.stopping():
                held: dict[str, Claim] = {}
                for trial in list(pending):
                    if s.stopping():
                        break
                    claim = s.claim(exp, trial)
                    if claim.held:
                        held[trial.run_id] = claim
                        continue
                    pending.remove(trial)
                    if not claim.claimed:
                        outcome = s.skipped(trial, claim)
                    else:
                        display.add(trial.run_id, f"{number[trial.run_id]}/{n}")
                        outcome = self.run_claimed(exp, trial, claim, display)
                        display.remove(trial.run_id)
                    outcomes.append(outcome)
                    s.print_outcome(exp, outcome)
                if pending and len(held) == len(pending) and not s.stopping():
                    for trial in pending:  # every trial left runs elsewhere: wait for them
                        claim = held[trial.run_id]
                        if announced.get(trial.run_id) != claim.owner:
                            announced[trial.run_id] = claim.owner
                            s.log(f"waiting for trial {number[trial.run_id]}/{n} {trial_label(trial)} "
                                  f"({trial.run_id}): another runner holds it ({claim.owner}, alive "
                                  f"{claim.age:.0f}s ago; taken over if silent for {s.lease:.0f}s)")
                    time.sleep(min(2.0, s.lease / 4))
        s.not_run(pending)
        return outcomes

    def run_claimed(self, exp: Experiment, trial: Trial, claim: Claim, display: SweepDisplay) -> TrialOutcome:
        """One claimed trial's job, here and now, its claim kept alive meanwhile and released after."""
        s = self.scheduler
        with s.holding(trial.run_id):
            job = TrialJob(exp, trial, claim, s.sink(trial.run_id, display), root=s.store.root, device=s.device,
                           rank=s.rank)
            return job.run()
