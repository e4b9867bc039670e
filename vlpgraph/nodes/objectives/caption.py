"""objective.caption: next-token captioning loss of a caption decoder reading the full image's tokens
(a CapPa-style captioner) or the masked encoding of an MAE objective on the same step (MUG)."""

from __future__ import annotations

import torch
from pydantic import Field

from vlpgraph.engine import ports
from vlpgraph.errors import UserError
from vlpgraph.layers.decoder import caption_loss
from vlpgraph.engine.registry import In, Params, register


class CaptionParams(Params):
    weight: float = Field(1.0, ge=0, description="weight of the 'caption' term in the total loss (MUG: 0.1 beside "
                          "objective.mae at 1.0)")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="label smoothing of the next-token cross-entropy")


class CaptionObjective(ports.Objective):
    """The decoder's captioning loss on the batch's tokenised captions; see :func:`build`."""

    def __init__(self, decoder: ports.CaptionDecoder, vision: ports.VisionTower,
                 masked: ports.MaskedImageModel | None, params: CaptionParams):
        super().__init__()
        # held by reference: they are their own graph nodes (their own entry in the trial's modules)
        self._refs = (decoder, vision, masked)
        self.weight = params.weight
        self.label_smoothing = params.label_smoothing

    @property
    def decoder(self) -> ports.CaptionDecoder:
        return self._refs[0]

    @property
    def vision(self) -> ports.VisionTower:
        return self._refs[1]

    @property
    def masked(self) -> ports.MaskedImageModel | None:
        return self._refs[2]

    def image_tokens(self, fwd: ports.Forward) -> torch.Tensor:
        """What the decoder reads this step: the masked encoding's tokens (shared with the MAE objective,
        memoised in ``fwd``) or the full image's tokens (memoised too)."""
        if self.masked is not None:
            return self.masked.masked_encoding(fwd).tokens
        return fwd.image_tokens(self.vision)

    def forward(self, fwd: ports.Forward, batch: dict, group: str | None = None) -> dict[str, torch.Tensor]:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        logits = self.decoder(ids, mask, self.image_tokens(fwd))
        return {"caption": caption_loss(logits, ids, mask, self.label_smoothing)}


@register(
    "objective.caption",
    params=CaptionParams,
    output=CaptionObjective,
    requires=frozenset({ports.PAIRED}),
    inputs={
        "decoder": In(ports.CaptionDecoder, doc="the caption decoder it trains (decoder.caption)"),
        "vision": In(ports.VisionTower, doc="the vision tower whose tokens the decoder reads"),
        "masked": In(ports.MaskedImageModel, optional=True,
                     doc="an MAE objective: read its masked encoding of the step instead of the full image (MUG)"),
    },
)
def build(params: CaptionParams, inputs: dict, ctx: ports.BuildContext) -> CaptionObjective:
    """Next-token captioning: the decoder predicts each caption token from the ones before it and the image.

    Loss 'caption' = mean cross-entropy (with `label_smoothing`) over every real caption token after
    [CLS] ([SEP] included, padding excluded), times `weight`. The captions are the batch's, tokenised by
    the trial's one tokenizer (the decoder's, equal to any text tower's). The decoder reads the vision
    tower's tokens of the full image (CLS + every patch: a CapPa-style captioner) or, with `masked` wired,
    the masked encoding that MAE objective computes this step (CLS + the visible patches) — the same
    memoised forward, as in MUG, where the loss is 1.0 * L_image + 0.1 * L_text (give `weight: 0.1`).
    Both paths train the vision tower through the decoder's cross-attention.
    """
    decoder, vision, masked = inputs["decoder"], inputs["vision"], inputs.get("masked")
    if int(decoder.image_width) != int(vision.width):
        raise UserError(f"node '{ctx.node}' (objective.caption): the decoder reads image tokens of width "
                        f"{decoder.image_width} but the vision tower's are {vision.width}")
    if masked is not None and getattr(masked, "vision", vision) is not vision:
        raise UserError(f"node '{ctx.node}' (objective.caption): 'masked' encodes with another vision tower than "
                        "'vision'; wire the MAE objective's tower")
    return CaptionObjective(decoder, vision, masked, params).to(ctx.device)
