"""mixer.mixup: Mixup (Zhang et al. 2018) adapted to image-caption pairs, with timm's conventions
(flip pairing, ``mode`` batch | pair, ``prob``); the soft target is the same λ-mixture over captions."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from vlpgraph.engine import ports
from vlpgraph.layers import mixing
from vlpgraph.engine.registry import register


class MixupParams(mixing.PairMixParams):
    alpha: float = Field(0.8, gt=0, description="λ ~ Beta(alpha, alpha) (timm's mixup_alpha)")
    prob: float = Field(1.0, ge=0, le=1, description="probability of mixing a batch (mode 'batch') or a pair (mode 'pair')")
    mode: Literal["batch", "pair"] = Field("batch", description="one λ per batch, or one per pair (i, B−1−i)")


class Mixup(ports.Mixer):
    def __init__(self, params: MixupParams, seed: int, node: str):
        self.params = params
        self.steps = params.steps
        self.seed, self.node = seed, node

    def mix(self, fwd: ports.Forward, batch: dict, embedder: ports.Embedder) -> ports.MixedBatch | None:
        p = self.params
        images = batch["images"]
        b = images.shape[0]
        drawn = mixing.pair_draw(batch, p, self.seed, self.node, f"mixer.mixup '{self.node}'")
        if drawn is None:
            return None
        gamma, _, lams = drawn
        lam = torch.as_tensor(lams, dtype=torch.float32, device=images.device)
        partner = mixing.flip_partner(b, images.device)
        w = lam.to(images.dtype)[:, None, None, None]
        mixed = w * images + (1 - w) * images[partner]
        base = (mixing.distilled_targets(fwd, embedder, p.target_temperature) if p.targets == "distilled"
                else torch.eye(b, device=images.device))
        targets = mixing.mix_targets(base, lam.to(base.device), partner.to(base.device))
        return ports.MixedBatch(mixed, targets, lam, partner, gamma, {"mode": p.mode})


@register("mixer.mixup", params=MixupParams, output=Mixup, requires=frozenset({ports.PAIRED}))
def build(params: MixupParams, inputs: dict, ctx: ports.BuildContext) -> Mixup:
    """Mixup of image-caption pairs (timm conventions): blend image i with image B−1−i.

    Consumed by an objective's `mixer` input (objective.itc). Per step: λ ~ Beta(alpha, alpha), one
    per batch (`mode` 'batch') or per pair (i, B−1−i) ('pair'), applied with probability `prob`
    (a batch left unmixed returns None), drawn from a generator seeded by (trial seed, node, step);
    mixed image i = λ_i·x_i + (1−λ_i)·x_{B−1−i}, keeping caption i. Soft target Y = λ·I[i] +
    (1−λ)·I[p(i)] over the batch's own captions (`targets` 'onehot': not self-distilled), or the same
    mixture of the objective's un-mixed prediction P ('distilled'). Requires an even batch size: a
    mixer node cannot see the trainer's batch at validation, so an odd batch fails the trial at the
    first mix. γ ramps over `ramp_epochs` (default 0: γ = 1); none once progress ≥ `stop_fraction`.
    Output: a Mixer; mix() returns MixedBatch(images, soft_targets, lam, partner, gamma) or None.
    """
    return Mixup(params, ctx.seed, ctx.node)
