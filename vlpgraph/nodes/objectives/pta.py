"""objective.pta: TiMix's patch-text alignment, the task that trains the text-aware patch predictor."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from vlpgraph.engine import ports
from vlpgraph.errors import TrialFailed, UserError
from vlpgraph.layers.patches import batch_patch_labels
from vlpgraph.engine.registry import In, Params, register


class PTAParams(Params):
    weight: float = Field(1.0, ge=0, description="weight of the 'pta' term in the total loss")
    separate_step: bool = Field(
        False,
        description="give PTA its own optimiser step each iteration (step group 'pta'; the reference's "
        "choice) instead of adding it to the main step",
    )
    unmentioned: Literal["skip", "all", "none"] = Field(
        "skip",
        description="captions that mention no object: 'skip' them (default; on shapes these are misaligned "
        "captions), label 'all' patches 1 (TiMix's whole-image-caption rule) or 'none' of them",
    )


class PTA(ports.Objective):
    """2-way cross-entropy of the TPP's patch log-probabilities against box-derived patch labels."""

    def __init__(self, tpp: ports.PatchScorer, params: PTAParams):
        super().__init__()
        self._tpp = (tpp,)  # by reference: the head is its own graph node
        self.weight = params.weight
        self.unmentioned = params.unmentioned
        self.step_groups = ("pta",) if params.separate_step else ("main",)

    @property
    def tpp(self) -> ports.PatchScorer:
        return self._tpp[0]

    def labels(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(labels bool [B, N], rows to use bool [B]) for the batch's images and captions."""
        if "boxes" not in batch or "mentioned" not in batch:
            raise TrialFailed("objective.pta: the batch has no 'boxes'/'mentioned' (the data must provide boxes)")
        images = batch["images"]
        h, w = images.shape[-2:]
        gh, gw = self.tpp.grid_size
        patch = getattr(self.tpp, "patch_size", None) or (h / gh, w / gw)
        empty = "none" if self.unmentioned == "none" else "all"
        labels, has = batch_patch_labels(batch["boxes"], batch["mentioned"], (h, w), patch, empty=empty,
                                         device=images.device)
        if labels.shape[1] != gh * gw:
            raise TrialFailed(f"objective.pta: labels for {labels.shape[1]} patches but the TPP scores {gh}x{gw}")
        rows = has if self.unmentioned == "skip" else torch.ones_like(has)
        return labels, rows

    def forward(self, fwd: ports.Forward, batch: dict, group: str | None = None) -> dict[str, torch.Tensor]:
        logp = self.tpp.patch_logits(fwd)  # [B, N, 2] log-probabilities
        labels, rows = self.labels(batch)
        if not bool(rows.any()):  # nothing to learn from this batch: a zero that keeps the graph
            return {"pta": logp.sum() * 0.0}
        loss = F.nll_loss(logp[rows].reshape(-1, 2).float(), labels[rows].reshape(-1).long())
        return {"pta": loss}


@register(
    "objective.pta",
    params=PTAParams,
    output=PTA,
    requires=frozenset({ports.PAIRED}),
    inputs={
        "tpp": In(ports.PatchScorer, doc="the text-aware patch predictor to train (head.tpp: needs patch_logits)"),
        "data": In(ports.PairedData, needs=frozenset({ports.BOXES}), doc="data with object boxes and mentions"),
    },
)
def build(params: PTAParams, inputs: dict, ctx: ports.BuildContext) -> PTA:
    """Patch-text alignment (TiMix PTA): trains the TPP to find the patches a caption talks about.

    For each (image, caption) of the batch, a patch's label is 1 when the box of an object the caption
    mentions touches it at all (in patch units: floor on the low side, ceil on the high side of the box;
    a box edge lying exactly on a patch boundary does not reach the next patch), else 0. Loss 'pta' =
    2-way cross-entropy of the TPP's `patch_logits` over every patch of the used rows. A caption that
    mentions no object is skipped by default (`unmentioned`): on the shapes benchmark that is a
    misaligned caption, and TiMix's whole-image rule (every patch 1, `unmentioned: all`) would teach
    the TPP that a wrong caption is relevant everywhere. With `separate_step`, PTA takes its own
    optimiser step each iteration (step group 'pta', the reference's schedule); otherwise its term is
    added to the main step. The reference draws up to 5 regions per image; here all mentioned objects
    of the caption form one label map.
    """
    tpp = inputs["tpp"]
    if not callable(getattr(tpp, "patch_logits", None)):
        raise UserError(
            f"node '{ctx.node}' (objective.pta): input 'tpp' scores patches but has no patch_logits to train "
            f"(got {type(tpp).__name__}; use a head.tpp)"
        )
    return PTA(tpp, params).to(ctx.device)
