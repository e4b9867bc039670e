"""Errors meant for the person who typed the YAML or the command line (exit code 2, no traceback)."""

from __future__ import annotations

import difflib
from typing import Iterable


class UserError(Exception):
    """One or more problems with the user's input; each message is one line, already formatted."""

    def __init__(self, messages: str | Iterable[str]):
        self.messages = [messages] if isinstance(messages, str) else list(messages)
        super().__init__("\n".join(self.messages))


class TrialFailed(Exception):
    """A trial could not finish (NaN loss, a node's error at run time); the sweep records it and goes on."""


class Interrupted(Exception):
    """A signal (SIGTERM, SIGINT) asked the run to stop: the training loop finished its step, saved a
    checkpoint at ``step`` and left; the sweep records the trial as interrupted and stops."""

    def __init__(self, step: int, signal_name: str = "a signal"):
        self.step = step
        self.signal_name = signal_name
        super().__init__(f"interrupted by {signal_name} at step {step}")


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
