"""Node kind ``encoder.fusion``: ALBEF's fusion encoder (text self-attention + cross-attention to the
image), as extra layers on top of a text tower and a vision tower. The layers live in vlpgraph.layers.fusion."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from vlpgraph.layers.attention import resolve_backend
from vlpgraph.errors import UserError
from vlpgraph.layers.fusion import FusionTower
from vlpgraph.engine.ports import BuildContext, TextTower, VisionTower
from vlpgraph.engine.registry import In, Params, register

Backend = Literal["auto", "sdpa", "math", "xformers"]


class FusionParams(Params):
    depth: int = Field(2, ge=1, le=64, description="number of fusion layers (ALBEF: 6, the second half of BERT-base)")
    heads: int = Field(2, ge=1, le=64, description="attention heads per layer; the text tower's width must be divisible by it")
    mlp_ratio: float = Field(4.0, gt=0.0, le=16.0, description="feed-forward width / text width")
    attention: Backend = Field("auto", description="attention backend: auto | sdpa | math | xformers")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on hidden states and attention weights")


def check(p: FusionParams, inputs: dict) -> list[tuple[str, str]]:
    """heads against the text tower's width, when the tower states it before building (encoder.text does)."""
    return [("heads", f"heads ({p.heads}) must divide the width ({t['width']}) of its text tower '{t['node']}'")
            for t in inputs.get("text", []) if t.get("width") is not None and t["width"] % p.heads]


@register(
    "encoder.fusion",
    params=FusionParams,
    output=FusionTower,
    inputs={
        "text": In(TextTower, doc="text tower whose output tokens are fused (its width is the fusion width)"),
        "vision": In(VisionTower, doc="vision tower whose tokens (CLS and patches) every text token cross-attends to"),
    },
    check=check,
)
def build(params: FusionParams, inputs: dict, ctx: BuildContext) -> FusionTower:
    """Fusion encoder (ALBEF): caption tokens attend to each other and cross-attend to the image's tokens.

    Reads the text tower's output tokens [B, L, C] (with the caption's padding mask) and the vision
    tower's tokens [B, 1+N, Cv]; `depth` post-LN layers, each bidirectional self-attention over the
    caption (padded keys masked) -> cross-attention to every image token -> MLP, each sublayer with a
    residual and a LayerNorm (BERT's layer with cross-attention). Output: fused tokens [B, L, C],
    position 0 the fused [CLS] that objective.itm classifies; objective.mlm and objective.prefixlm
    predict words from the other positions. The width is the text tower's; image tokens of another
    width are projected to it by the cross-attention's key/value projections (ALBEF's
    `encoder_width`). Tower and fusion passes are memoised per step, so several objectives share them.
    Deviation from ALBEF: ALBEF splits one 12-layer BERT into 6 text-only and 6 fusion layers; here
    the fusion layers are added on top of the whole text tower (text tower depth + `depth` layers).
    Attention runs through vlpgraph.layers.attention with the `attention` backend.
    """
    text, vision = inputs["text"], inputs["vision"]
    where = f"node '{ctx.node}' (encoder.fusion)"
    if text.width % params.heads:
        raise UserError(f"{where}: the text tower's width ({text.width}) must be divisible by heads ({params.heads})")
    if params.attention == "xformers":
        try:
            resolve_backend("xformers", ctx.device, torch.bfloat16)
        except UserError as e:
            raise UserError(f"{where}: {e}")
    tower = FusionTower(text, vision, depth=params.depth, heads=params.heads, mlp_ratio=params.mlp_ratio,
                        dropout=params.dropout, attention=params.attention)
    return tower.to(ctx.device)
