"""head.attentive_pool: LCL's attentive pooler — the image latent z and the visual tokens for a language model."""

from __future__ import annotations

import torch
from pydantic import Field

from vlpgraph.engine import ports
from vlpgraph.errors import UserError
from vlpgraph.layers.pooling import AttentivePool
from vlpgraph.engine.registry import In, Params, register


class AttentivePoolParams(Params):
    heads: int = Field(4, ge=1, description="attention heads of the pooler's cross-attention (divides the tower's width)")


class AttentivePooler(ports.ImagePooler):
    """One learned query over a tower's patch tokens (``layers.pooling.AttentivePool``); see :func:`build`.

    ``forward(patches [M, P, Cv]) -> (z [M, Cv], visual_tokens [M, P, Cv])``.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.width = int(width)
        self.pool = AttentivePool(self.width, heads)

    def forward(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.pool(patches)  # [M, Cv]: softmax-weighted mix of the projected patches
        attn = self.pool.attn
        # what the attention gives when a patch is the only key (its softmax weight is 1): the value
        # projection, heads concatenated back, then the output projection — per patch, no mixing
        visual = attn.out(attn.value(patches))  # [M, P, Cv]
        return z, visual


@register(
    "head.attentive_pool",
    params=AttentivePoolParams,
    output=AttentivePooler,
    inputs={"vision": In(ports.VisionTower, doc="the vision tower whose patch tokens it pools (its width is the pooler's)")},
)
def build(params: AttentivePoolParams, inputs: dict, ctx: ports.BuildContext) -> AttentivePooler:
    """LCL's attentive pooler: the image latent z and the per-patch visual tokens of one block.

    Reads patch tokens [M, P, Cv] (the caller drops the tower's CLS, as LCL does). z = one learned query
    (normal(0, 0.02)) cross-attending over the patches with multi-head attention (query/key/value/output
    projections of width Cv, `heads` heads, through `attend()`): z = out(Σ_p softmax(q·k_p/√d)·value(p)),
    per head. The visual tokens the language model reads are the same block's value and output
    projections applied to each patch alone, out(value(p)) — exactly what the attention gives with that
    patch as its only key (softmax weight 1). So each head's part of z (before the output projection) is
    a convex combination of the patches' values (the weights sum to 1), and with heads = 1 z itself is a
    convex combination of the visual tokens. The n visual tokens per image are its P patches. The width
    is the tower's (Cv, not a param): the objective projects the visual tokens to the language model's
    width itself.

    Deviation from LCL's official code: the method's description gives only "one learned query,
    cross-attention over patches"; this block is ``layers.pooling.AttentivePool`` as it stands (PyTorch
    default Linear init, query normal(0, 0.02), no norm or MLP after the attention).
    """
    vision = inputs["vision"]
    width = int(vision.width)
    if width % params.heads:
        raise UserError(f"node '{ctx.node}' (head.attentive_pool): heads ({params.heads}) must divide the "
                        f"vision tower's width ({width})")
    return AttentivePooler(width, params.heads).to(ctx.device)
