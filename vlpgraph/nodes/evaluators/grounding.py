"""evaluator.grounding: do a model's patch scores point at the objects its caption mentions?"""

from __future__ import annotations

import json
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from vlpgraph.engine import ports
from vlpgraph.errors import TrialFailed
from vlpgraph.nodes.evaluators.evaluation import evaluation_mode, to_device, tokenize
from vlpgraph.layers.patches import (
    batch_patch_labels,
    chance_pointing,
    png_bytes,
    pointing_hits,
    resolve_topk,
    topk_iou,
)
from vlpgraph.engine.registry import In, Params, register


class GroundingParams(Params):
    batch_size: int = Field(256, ge=1, description="test samples scored per forward pass")
    topk: float | Literal["target"] = Field(
        "target",
        description="size of the top-k set of topk_iou: 'target' (as many patches as the sample's target "
        "covers, so a perfect map scores 1), a count (>= 1) or, below 1, a share of the N patches",
    )
    max_samples: int | None = Field(None, ge=1, description="use only the first N test samples (None: all)")
    heatmaps: int = Field(16, ge=0, description="write the patch scores of this many test samples (the first with a mention) to patch_scores")
    mixed_samples: int = Field(4, ge=0, description="with a mixer wired: write this many mixed test samples (image, partner, mixed image, λ) to patch_scores")
    seed: int = Field(0, description="seed of the random tie-break among equal scores at the k-th place of topk_iou")

    @field_validator("topk")
    @classmethod
    def _positive(cls, v):
        if v != "target" and not v > 0:
            raise ValueError(f"topk must be 'target' or a number > 0, got {v}")
        return v


class GroundingEvaluator(ports.Evaluator):
    """Pointing game and top-k IoU of a PatchScorer on the test split; see :func:`build`."""

    headline = "pointing"  # the metric `vlpgraph report` shows by default

    def __init__(self, params: GroundingParams, data: ports.PairedData, scorer: ports.PatchScorer, mixer: ports.Mixer | None = None):
        self.params = params
        self.data = data
        self.scorer = scorer
        self.mixer = mixer

    def evaluate(self, model: ports.Model, ctx: ports.BuildContext) -> ports.EvalResult:
        p, data, scorer = self.params, self.data, self.scorer
        test = data.test
        n_total = len(test) if p.max_samples is None else min(len(test), p.max_samples)
        gh, gw = scorer.grid_size
        gen = torch.Generator().manual_seed(p.seed)
        pointing, ious, chance, distracted, wrong = [], [], [], [], []
        rows: list[dict] = []
        # The scorer may not belong to the model (a training-free head): put it in eval mode too.
        scorer_flags = {m: m.training for m in scorer.modules()} if isinstance(scorer, nn.Module) else {}
        try:
            for m in scorer_flags:
                m.training = False
            with evaluation_mode(model):
                for start in range(0, n_total, p.batch_size):
                    items = [test[i] for i in range(start, min(n_total, start + p.batch_size))]
                    if "boxes" not in items[0] or "mentioned" not in items[0]:
                        raise TrialFailed("evaluator.grounding: test items have no 'boxes'/'mentioned'")
                    batch = data.collate(items)
                    batch.update(tokenize(model.tokenizer, list(batch["captions"]), "evaluator.grounding"))
                    batch = to_device(batch, model.device)
                    images = batch["images"]
                    h, w = images.shape[-2:]
                    patch = getattr(scorer, "patch_size", None) or (h / gh, w / gw)
                    masks, has = batch_patch_labels(batch["boxes"], batch["mentioned"], (h, w), patch,
                                                    empty="none", device="cpu")
                    if not bool(has.any()):
                        continue
                    scores = scorer.patch_scores(ports.Forward(batch)).detach().float().cpu()  # [B, S, S]
                    if tuple(scores.shape[1:]) != (gh, gw):
                        raise TrialFailed(f"evaluator.grounding: the scorer returned {tuple(scores.shape)}, expected [B, {gh}, {gw}]")
                    flat = scores.reshape(len(items), -1)
                    pointing.append(pointing_hits(flat[has], masks[has]))
                    k = resolve_topk(p.topk, masks[has])
                    ious.append(topk_iou(flat[has], masks[has], k, generator=gen))
                    chance.append(chance_pointing(masks[has]))
                    # Samples that also show an object the caption does not mention: a text-blind
                    # saliency map can point at that one instead.
                    others = [~torch.as_tensor(flag, dtype=torch.bool) for flag in batch["mentioned"]]
                    other_masks, has_other = batch_patch_labels(batch["boxes"], others, (h, w), patch,
                                                                empty="none", device="cpu")
                    sel = has & has_other
                    if bool(sel.any()):
                        distracted.append(pointing_hits(flat[sel], masks[sel]))
                        wrong.append(pointing_hits(flat[sel], other_masks[sel] & ~masks[sel]))
                    if len(rows) < p.heatmaps:
                        rows += self._heatmap_rows(batch, flat, has, p.heatmaps - len(rows), (gh, gw))
                if self.mixer is not None and p.mixed_samples:
                    rows += self._mixed_rows(model, min(n_total, 2 * p.mixed_samples), (gh, gw))
        finally:
            for m, was in scorer_flags.items():
                m.training = was
        if not pointing:
            raise TrialFailed("evaluator.grounding: no test caption mentions an object with a box")
        pointing_t, iou_t, chance_t = torch.cat(pointing), torch.cat(ious), torch.cat(chance)
        metrics = {
            "pointing": pointing_t.mean().item(),
            "topk_iou": iou_t.mean().item(),
            "chance_pointing": chance_t.mean().item(),
            "n": float(pointing_t.numel()),
            "pointing_distractor": torch.cat(distracted).mean().item() if distracted else float("nan"),
            "wrong_object": torch.cat(wrong).mean().item() if wrong else float("nan"),
            "n_distractor": float(sum(t.numel() for t in distracted)),
        }
        return ports.EvalResult(metrics=metrics, patch_scores=rows)

    def _mixed_rows(self, model: ports.Model, n: int, grid) -> list[dict]:
        """What the mixer makes of the first n test samples, as it would mid-training (γ = 1)."""
        items = [self.data.test[i] for i in range(n)]
        batch = self.data.collate(items)
        batch.update(tokenize(model.tokenizer, list(batch["captions"]), "evaluator.grounding"))
        batch = to_device(batch, model.device)
        batch.update(progress=0.0, step=10**9, steps_per_epoch=1, total_steps=10**9 + 1)  # past any ramp
        fwd = ports.Forward(batch)
        mixed = self.mixer.mix(fwd, batch, model.embedder())
        if mixed is None:
            return []
        scores = self.scorer.patch_scores(fwd).detach().float().cpu().reshape(n, -1)
        pixels = self.data.denormalize(batch["images"]).cpu()
        mixed_pixels = self.data.denormalize(mixed.images).cpu()
        ids = batch.get("sample_ids")
        rows = []
        for i in range(min(n, self.params.mixed_samples)):
            j = int(mixed.partner[i])
            rows.append({
                "kind": "mixed",
                "sample_id": int(ids[i]) if ids is not None else i,
                "caption": batch["captions"][i],
                "grid_h": int(grid[0]),
                "grid_w": int(grid[1]),
                "scores": [float(v) for v in scores[i].tolist()],
                "image": png_bytes(pixels[i]),
                "partner_id": int(ids[j]) if ids is not None else j,
                "partner_image": png_bytes(pixels[j]),
                "mixed_image": png_bytes(mixed_pixels[i]),
                "lam": float(mixed.lam[i]),
            })
        return rows

    def _heatmap_rows(self, batch: dict, flat: torch.Tensor, has: torch.Tensor, limit: int, grid) -> list[dict]:
        picked = [i for i in range(flat.shape[0]) if bool(has[i])][:limit]
        if not picked:
            return []
        pixels = self.data.denormalize(batch["images"][picked]).cpu()
        ids = batch.get("sample_ids")
        rows = []
        for j, i in enumerate(picked):
            boxes = batch["boxes"][i][batch["mentioned"][i].bool()].detach().cpu().tolist()
            sample_id = int(ids[i]) if ids is not None else i
            rows.append({
                "sample_id": sample_id,
                "caption": batch["captions"][i],
                "grid_h": int(grid[0]),
                "grid_w": int(grid[1]),
                "scores": [float(v) for v in flat[i].tolist()],
                "image": png_bytes(pixels[j]),
                "boxes": json.dumps([[round(float(v), 3) for v in b] for b in boxes]),
            })
        return rows


@register(
    "evaluator.grounding",
    params=GroundingParams,
    output=GroundingEvaluator,
    inputs={
        "model": In(ports.Model, doc="the trained model (its towers run the scorer)"),
        "data": In(ports.PairedData, needs=frozenset({ports.BOXES}), doc="data with object boxes; its test split is scored"),
        "scorer": In(ports.PatchScorer, doc="patch scores to test: head.tpp, or head.patch_similarity for models without one"),
        "mixer": In(ports.Mixer, optional=True, doc="a mixer whose output on a few test samples is stored for the app"),
    },
)
def build(params: GroundingParams, inputs: dict, ctx: ports.BuildContext) -> GroundingEvaluator:
    """Grounding: do the scorer's patch scores point at the objects the caption mentions?

    On the (first `max_samples` of the) clean test split, for each sample whose caption mentions at
    least one boxed object, the scorer rates every patch of the image for its caption. A patch belongs
    to the target when a mentioned object's box touches it at all (the same rule as objective.pta's
    labels: positive-area overlap). Metrics: pointing (share of samples whose highest-scoring patch is
    a target patch; tied maxima earn the share of them on target), topk_iou (mean IoU between the
    `topk` highest-scoring patches and the target patches: by default as many patches as the target
    covers, since a fixed k smaller than the target caps the IoU at k / |target|; ties at the k-th
    place broken at random with `seed`), chance_pointing (the pointing score of a uniformly random patch: mean target share of the
    grid) and n (samples scored). On the n_distractor samples whose image also holds an object the
    caption does not mention, pointing_distractor is the pointing score and wrong_object the share
    whose top patch lies on an unmentioned object only: a text-blind "where are the objects" map does
    well on pointing (objects are salient) but not here. It also writes the patch scores of the first `heatmaps` scored test
    samples to the store's patch_scores table (caption, S x S scores, the de-normalised image as PNG,
    the mentioned boxes in pixels as JSON) for the app's heatmaps. With a `mixer` wired it also writes
    `mixed_samples` rows of kind 'mixed': a test image, its partner, the mixed image and λ kept, as the
    mixer makes them past its ramp. Runs in eval mode without gradients.
    """
    return GroundingEvaluator(params, inputs["data"], inputs["scorer"], inputs.get("mixer"))
