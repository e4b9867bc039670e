"""head.patch_similarity: a training-free PatchScorer, cosine similarity of patch tokens to the caption."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from vlpgraph.engine import ports
from vlpgraph.errors import UserError
from vlpgraph.layers.patches import znormalize
from vlpgraph.engine.registry import In, Params, register


class PatchSimilarityParams(Params):
    text_pool: Literal["cls", "mean"] = Field(
        "mean", description="caption vector: the text CLS token or the mean of non-pad tokens"
    )


class PatchSimilarity(ports.PatchScorer):
    """score[i, n] = cos(final patch token n of image i, caption vector i), z-normalised over n.

    No parameters; the towers are held by reference (they are their own graph nodes).
    """

    def __init__(self, vision: ports.VisionTower, text: ports.TextTower, params: PatchSimilarityParams):
        super().__init__()
        self._towers = (vision, text)
        self.text_pool = params.text_pool
        self.grid_size = tuple(vision.grid_size)
        self.patch_size = int(vision.patch_size)  # declared by the VisionTower port
        self.num_prefix_tokens = int(vision.num_prefix_tokens)

    def patch_scores(self, fwd: ports.Forward, images_key: str = "images") -> torch.Tensor:
        """[B, S, S] z-normalised cosine similarities. Memoised in ``fwd``."""
        vision, text = self._towers

        def compute() -> torch.Tensor:
            patches = fwd.image_tokens(vision, images_key)[:, self.num_prefix_tokens:]  # [B, N, C]
            tokens = fwd.text_tokens(text)  # [B, L, C]
            caption = ports.pool_caption(tokens, fwd.batch["attention_mask"], self.text_pool)
            cos = torch.einsum("bnc,bc->bn", F.normalize(patches.float(), dim=-1), F.normalize(caption.float(), dim=-1))
            gh, gw = self.grid_size
            return znormalize(cos, dim=1).reshape(cos.shape[0], gh, gw)

        return fwd.memo(("head.patch_similarity", id(self), images_key), compute)


@register(
    "head.patch_similarity",
    params=PatchSimilarityParams,
    output=PatchSimilarity,
    inputs={
        "vision": In(ports.VisionTower, doc="image tower; its final patch tokens are compared with the caption"),
        "text": In(ports.TextTower, doc="text tower of the same width; its caption vector (text_pool)"),
    },
)
def build(params: PatchSimilarityParams, inputs: dict, ctx: ports.BuildContext) -> PatchSimilarity:
    """Training-free baseline PatchScorer: cosine similarity of each patch token to the caption.

    score[i, n] = cos(final patch token n of image i, caption vector of caption i), z-normalised over
    the N patches of the image, as B x S x S. It reads the towers' raw features (final tokens after the
    vision tower's last norm; the text tower's mean non-pad token or CLS, `text_pool`), so both towers
    must have the same width; nothing is learned or projected. It is the fallback scorer for models
    without a TPP (evaluator.grounding, mixer.timix on data without boxes). With towers trained only
    through a CLS-level contrastive loss, raw patch tokens need not live in the text's space: read its
    grounding scores as a baseline, not as an upper bound.
    """
    vision, text = inputs["vision"], inputs["text"]
    if int(vision.width) != int(text.width):
        raise UserError(
            f"node '{ctx.node}' (head.patch_similarity): the vision tower is {vision.width} wide and the text "
            f"tower {text.width}; raw-feature cosine similarity needs equal widths"
        )
    return PatchSimilarity(vision, text, params).to(ctx.device)
