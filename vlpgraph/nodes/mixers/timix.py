"""mixer.timix: text-aware image mixing (TiMix, Jiang et al. 2023).

Image i's least text-relevant r×r patch window is replaced by its partner's most text-relevant one,
and image i's soft target over the batch's captions mixes the un-mixed prediction of both images.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from vlpgraph.engine import ports
from vlpgraph.errors import TrialFailed
from vlpgraph.layers import mixing
from vlpgraph.engine.registry import In, Params, register


class TiMixParams(Params):
    min_ratio: float = Field(0.35, ge=0, le=1, description="smallest window side, as a share of the grid side S (r ≥ ⌊min_ratio·S⌋)")
    max_ratio: float = Field(0.75, ge=0, le=1, description="largest window side, as a share of S (r ≤ ⌊max_ratio·S⌋)")
    label: Literal["area", "score"] = Field(
        "area",
        description="λ_keep: 'area' = (S²−r²)/S² (the reference); 'score' = kept / (kept + pasted) text-relevance "
        "mass, each image's scores turned into a distribution over its patches by softmax(score / score_temperature)",
    )
    score_temperature: float = Field(1.0, gt=0, description="softmax temperature of the patch scores for label 'score'")
    target_temperature: float | None = Field(
        None, gt=0, description="τ of the self-distilled prediction P (null: the consuming objective's own temperature)"
    )
    ramp_epochs: float = Field(1.0, ge=0, description="γ ramps linearly 0 -> 1 over this many epochs (0: γ = 1 from the start)")
    stop_fraction: float = Field(0.667, ge=0, le=1, description="no mixing once training progress ≥ this (1.0: never stop)")
    steps: Literal["summed", "separate"] = Field(
        "summed", description="'summed': the mixed loss joins the main step; 'separate': its own optimiser step (the reference)"
    )

    def problems(self) -> list[tuple[str, str]]:
        if self.min_ratio > self.max_ratio:
            return [("min_ratio", f"min_ratio ({self.min_ratio}) is larger than max_ratio ({self.max_ratio})")]
        return []


class TiMix(ports.Mixer):
    """Holds the scorer by reference (it is its own graph node and module)."""

    def __init__(self, scorer: ports.PatchScorer, params: TiMixParams, seed: int, node: str):
        self.scorer = scorer
        self.params = params
        self.steps = params.steps
        self.seed, self.node = seed, node

    def side_range(self, s: int) -> tuple[int, int]:
        """(lowest, highest) window side in patches for an S×S grid."""
        return int(self.params.min_ratio * s), int(self.params.max_ratio * s)

    def draw_side(self, s: int, step: int) -> int:
        """r uniform in {⌊min_ratio·S⌋ … ⌊max_ratio·S⌋}, one per batch, from (seed, node, step)."""
        lo, hi = self.side_range(s)
        g = mixing.step_generator(self.seed, self.node, step)
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    def mix(self, fwd: ports.Forward, batch: dict, embedder: ports.Embedder) -> ports.MixedBatch | None:
        gamma = mixing.schedule(batch, self.params.ramp_epochs, self.params.stop_fraction)
        if gamma is None:
            return None
        images = batch["images"]
        b, _, h, w = images.shape
        # computed in the step's grad mode (another objective may train the scorer from the same
        # memoised scores), used without gradient
        scores = self.scorer.patch_scores(fwd).detach()  # [B, S, S]
        s = scores.shape[-1]
        if scores.shape != (b, s, s) or h % s or w != h:
            raise TrialFailed(f"mixer.timix '{self.node}': patch scores {tuple(scores.shape)} do not tile images "
                              f"{tuple(images.shape)} (square images, S×S patches of H/S pixels expected)")
        cell = h // s
        r = self.draw_side(s, int(batch.get("step", 0)))
        partner = mixing.flip_partner(b, images.device)
        # odd B: the middle image is its own partner; it is left unmixed (λ = 1, target P[i])
        active = partner != torch.arange(b, device=images.device)

        if r == 0:
            src = dst = torch.full((b, 2), -1, dtype=torch.long, device=images.device)
            mixed, lam = images.clone(), torch.ones(b, device=images.device)
        else:
            sums = mixing.window_sums(scores, r)  # [B, S-r+1, S-r+1]
            dst = mixing.window_argmin(sums)  # i's least relevant window
            src = mixing.window_argmax(sums)[partner]  # the partner's most relevant window
            src = torch.where(active[:, None], src, dst)  # middle of an odd batch: a no-op paste
            mixed = mixing.paste_windows(images, partner, src, dst, r, cell)
            lam = self._lam(scores, r, partner, src, dst)
            lam = torch.where(active, lam, torch.ones_like(lam))
            src = torch.where(active[:, None], src, torch.full_like(src, -1))
            dst = torch.where(active[:, None], dst, torch.full_like(dst, -1))

        probs = mixing.distilled_targets(fwd, embedder, self.params.target_temperature)
        targets = mixing.mix_targets(probs, lam.to(probs.device), partner.to(probs.device))
        info = {"r": r, "patch_size": cell, "src": src, "dst": dst, "label": self.params.label}
        return ports.MixedBatch(mixed, targets, lam, partner, gamma, info)

    def _lam(self, scores: torch.Tensor, r: int, partner, src, dst) -> torch.Tensor:
        """λ_keep per image, [B] float32.

        area:  (S² − r²) / S².
        score: with w_i = softmax(scores_i / score_temperature) over image i's S² patches,
               kept = 1 − Σ_{dst window} w_i, pasted = Σ_{src window} w_{p(i)},
               λ_keep = kept / (kept + pasted) — the share of text-relevance mass in the mixed image
               that comes from image i.
        """
        b, s, _ = scores.shape
        if self.params.label == "area":
            return torch.full((b,), (s * s - r * r) / (s * s), device=scores.device)
        weights = torch.softmax(scores.flatten(1).float() / self.params.score_temperature, dim=1).view(b, s, s)
        wsums = mixing.window_sums(weights, r)
        kept = 1 - mixing.window_values(wsums, dst)
        pasted = mixing.window_values(wsums[partner], src)
        return (kept / (kept + pasted).clamp_min(1e-12)).float()


@register(
    "mixer.timix",
    params=TiMixParams,
    output=TiMix,
    requires=frozenset({ports.PAIRED}),
    inputs={"scorer": In(ports.PatchScorer, doc="per-patch text relevance [B,S,S] of the un-mixed batch (e.g. head.tpp)")},
)
def build(params: TiMixParams, inputs: dict, ctx: ports.BuildContext) -> TiMix:
    """Text-aware image mixing (TiMix): swap least- for most-relevant patch windows; soft targets.

    Consumed by an objective's `mixer` input (objective.itc). Per step, from the un-mixed Forward:
    scores = scorer.patch_scores [B,S,S] (no gradient); one window side r drawn uniformly from
    {⌊min_ratio·S⌋ … ⌊max_ratio·S⌋} by a generator seeded from (trial seed, node, step), so a resumed
    run draws the same r; every r×r window's score sum (2-D cumulative sum); image i is paired with
    p(i) = B−1−i, and its least relevant window receives p(i)'s most relevant window (pixels move on
    the patch grid; image i keeps caption i). λ_keep: `label` 'area' = (S²−r²)/S², or 'score' = kept /
    (kept + pasted) softmax score mass. Soft targets Y = λ·P[i] + (1−λ)·P[p(i)], P = softmax of the
    un-mixed image->text similarity / τ from the consuming objective (no gradient). Odd batch: the
    middle image pairs with itself and is left unmixed (λ = 1, target P[i]). γ ramps 0 -> 1 over
    `ramp_epochs`; no mixing at γ = 0 (step 0) or once progress ≥ `stop_fraction`.
    Output: a Mixer; mix() returns MixedBatch(images, soft_targets, lam, partner, gamma,
    info={r, patch_size, src, dst (window (row, col) in patches, −1 where unmixed), label}) or None.
    """
    return TiMix(inputs["scorer"], params, ctx.seed, ctx.node)
