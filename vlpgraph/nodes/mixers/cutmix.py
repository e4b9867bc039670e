"""mixer.cutmix: CutMix (Yun et al. 2019) adapted to image-caption pairs, with timm's conventions
(flip pairing, ``mode`` batch | pair, ``prob``, ``correct_lam``, ``minmax``); the soft target is the
same λ-mixture over captions."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator

from vlpgraph.engine import ports
from vlpgraph.layers import mixing
from vlpgraph.engine.registry import register


class CutMixParams(mixing.PairMixParams):
    alpha: float = Field(1.0, gt=0, description="λ ~ Beta(alpha, alpha) (timm's cutmix_alpha)")
    prob: float = Field(1.0, ge=0, le=1, description="probability of mixing a batch (mode 'batch') or a pair (mode 'pair')")
    mode: Literal["batch", "pair"] = Field("batch", description="one box and λ per batch, or one per pair (i, B−1−i)")
    correct_lam: bool = Field(True, description="λ = 1 − (box area after clipping to the image) / image area")
    minmax: tuple[float, float] | None = Field(
        None, description="timm's cutmix_minmax: box sides uniform in [min, max) of the image sides instead of from λ "
        "(λ is then always the box's area share)")

    @field_validator("minmax")
    @classmethod
    def _minmax(cls, v):
        if v is not None and not 0 <= v[0] < v[1] <= 1:
            raise ValueError(f"minmax must be [min, max] with 0 ≤ min < max ≤ 1, got {list(v)}")
        return v


class CutMix(ports.Mixer):
    def __init__(self, params: CutMixParams, seed: int, node: str):
        self.params = params
        self.steps = params.steps
        self.seed, self.node = seed, node

    def boxes_and_lams(self, rng, lams, h: int, w: int) -> tuple[list[tuple[int, int, int, int]], list[float]]:
        """One box per distinct λ draw (one for the batch, or one per pair) -> (boxes, corrected λs),
        both for the first half of the pairs (or the single batch entry)."""
        p = self.params
        n = 1 if p.mode == "batch" else len(lams) // 2
        boxes, out = [], []
        for k in range(n):
            lam = float(lams[k])
            if lam == 1.0:  # pair left unmixed
                boxes.append((0, 0, 0, 0))
                out.append(1.0)
                continue
            box = (mixing.rand_bbox_minmax(rng, h, w, p.minmax) if p.minmax is not None
                   else mixing.rand_bbox(rng, h, w, lam))
            if p.correct_lam or p.minmax is not None:
                y0, y1, x0, x1 = box
                lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)
            boxes.append(box)
            out.append(lam)
        return boxes, out

    def mix(self, fwd: ports.Forward, batch: dict, embedder: ports.Embedder) -> ports.MixedBatch | None:
        p = self.params
        images = batch["images"]
        b, _, h, w = images.shape
        drawn = mixing.pair_draw(batch, p, self.seed, self.node, f"mixer.cutmix '{self.node}'")
        if drawn is None:
            return None
        gamma, rng, lams = drawn
        boxes, lam_list = self.boxes_and_lams(rng, lams, h, w)
        if p.mode == "batch":
            boxes, lam_list = boxes * b, lam_list * b
        else:  # pair k = (k, B-1-k) shares its box and λ (timm's _mix_pair)
            boxes, lam_list = boxes + boxes[::-1], lam_list + lam_list[::-1]
        box_t = torch.tensor(boxes, dtype=torch.long, device=images.device)  # [B, 4] (y0, y1, x0, x1)
        lam = torch.tensor(lam_list, dtype=torch.float32, device=images.device)
        partner = mixing.flip_partner(b, images.device)
        # same box in both images of a pair, so pasting is a select: box pixels come from the partner
        mixed = torch.where(mixing.box_mask(box_t, h, w), images[partner], images)
        base = (mixing.distilled_targets(fwd, embedder, p.target_temperature) if p.targets == "distilled"
                else torch.eye(b, device=images.device))
        targets = mixing.mix_targets(base, lam.to(base.device), partner.to(base.device))
        return ports.MixedBatch(mixed, targets, lam, partner, gamma, {"mode": p.mode, "boxes": box_t})


@register("mixer.cutmix", params=CutMixParams, output=CutMix, requires=frozenset({ports.PAIRED}))
def build(params: CutMixParams, inputs: dict, ctx: ports.BuildContext) -> CutMix:
    """CutMix of image-caption pairs (timm conventions): paste a box of image B−1−i into image i.

    Consumed by an objective's `mixer` input (objective.itc). Per step: λ ~ Beta(alpha, alpha), one
    per batch (`mode` 'batch') or per pair (i, B−1−i) ('pair'), applied with probability `prob` (a
    batch left unmixed returns None), drawn from a generator seeded by (trial seed, node, step); a box
    of side ≈ sqrt(1−λ)·(H, W) at a uniform centre, clipped to the image (or sides from `minmax`);
    both images of a pair swap that box's pixels. With `correct_lam`, λ = 1 − clipped box area /
    image area. Soft target Y = λ·I[i] + (1−λ)·I[p(i)] over the batch's own captions (`targets`
    'onehot': not self-distilled), or the same mixture of the objective's un-mixed prediction P
    ('distilled'). Requires an even batch size: a mixer node cannot see the trainer's batch at
    validation, so an odd batch fails the trial at the first mix. γ ramps over `ramp_epochs` (default
    0: γ = 1); none once progress ≥ `stop_fraction`.
    Output: a Mixer; mix() returns MixedBatch(images, soft_targets, lam, partner, gamma,
    info={mode, boxes [B,4] pixel (y0, y1, x0, x1)}) or None.
    """
    return CutMix(params, ctx.seed, ctx.node)
