"""The learnable, clamped temperature τ of a contrastive loss (logits = cosine / τ).

objective.itc, objective.lcl and objective.cmcl share it. ALBEF's convention: τ starts at a value, is
learned (or kept fixed), and stays inside [minimum, maximum] two ways — the parameter itself is clamped
in place before each training forward, and the value read in the loss is clamped straight-through, so
the gradient still reaches τ at a bound and τ can come back from it.

A mixin rather than a submodule: the tensor stays the objective's own ``temp`` attribute, so state-dict
keys, optimiser groups (a scalar: no weight decay) and existing checkpoints are unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


def check_temperature_range(temperature: float, minimum: float, maximum: float) -> None:
    """Raise ValueError unless minimum <= temperature <= maximum (for the node kinds' params validators)."""
    if not minimum <= temperature <= maximum:
        raise ValueError(f"temperature {temperature} must lie in [temperature_min, temperature_max] = "
                         f"[{minimum}, {maximum}]")


class LearnedTemperature:
    """Mixin for an ``nn.Module``: call :meth:`init_temperature` in ``__init__`` and
    :meth:`clamp_temperature_` at the start of ``forward``; read τ as :attr:`temperature`."""

    temp: torch.Tensor
    temperature_min: float
    temperature_max: float

    def init_temperature(self, value: float, minimum: float, maximum: float, learn: bool) -> None:
        """``temp``: an ``nn.Parameter`` when ``learn``, else a buffer (saved, never optimised)."""
        self.temperature_min, self.temperature_max = minimum, maximum
        temp = torch.tensor(float(value))
        if learn:
            self.temp = nn.Parameter(temp)
        else:
            self.register_buffer("temp", temp)  # type: ignore[attr-defined]  (an nn.Module's)

    @property
    def temperature(self) -> torch.Tensor:
        """τ clamped into [temperature_min, temperature_max] (0-d tensor).

        Straight-through: the value is clamped, the gradient reaches ``temp`` unchanged, so τ can come
        back from a bound. Nothing here saves ``temp`` itself for backward, so the in-place clamp in
        :meth:`clamp_temperature_` never invalidates a graph built earlier in the step.
        """
        with torch.no_grad():
            delta = self.temp.clamp(self.temperature_min, self.temperature_max) - self.temp
        return self.temp + delta

    def clamp_temperature_(self) -> None:
        """In training, clamp the learned parameter itself into the range (ALBEF); a no-op otherwise."""
        if self.training and isinstance(self.temp, nn.Parameter):  # type: ignore[attr-defined]
            with torch.no_grad():
                self.temp.clamp_(self.temperature_min, self.temperature_max)
