"""head.tpp: TiMix's text-aware patch predictor (TPP), a PatchScorer trained by objective.pta."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from vlpgraph.engine import ports
from vlpgraph.errors import UserError
from vlpgraph.layers.patches import znormalize
from vlpgraph.engine.registry import In, Params, register


class TPPParams(Params):
    block: int = Field(
        -1,
        ge=-1,
        description="which ViT block's patch tokens to read (0-based, tokens after that block); -1: the "
        "middle block, depth // 2 (the reference reads block 6 of a 12-block ViT)",
    )
    text_pool: Literal["cls", "mean"] = Field(
        "mean",
        description="caption vector: 'cls' (the reference: the text CLS) or the mean of non-pad tokens; a "
        "from-scratch post-LN BERT gives nearly the same CLS vector for every caption at init",
    )
    detach_text: bool = Field(False, description="stop PTA's gradient at the caption vector (the text tower is not trained by PTA)")


def block_tokens(fwd: ports.Forward, vision: ports.VisionTower, block: int, images_key: str = "images") -> torch.Tensor:
    """Tokens [B, P+N, C] after ``block`` of ``vision`` on ``fwd.batch[images_key]``, memoised in ``fwd``.

    Runs ``vision.forward_blocks`` once per (tower, images, block, grad mode) and hands its final tokens
    to ``fwd.image_tokens`` (same cache key), so objectives that read the final tokens afterwards share
    the pass. Under ``no_grad`` in training mode the final tokens are not shared: an objective that
    needs their gradient would otherwise receive constants.
    """
    grad = torch.is_grad_enabled()

    def run():
        final, blocks = vision.forward_blocks(fwd.batch[images_key], [block])
        if grad or not vision.training:
            fwd.memo(("image", id(vision), images_key), lambda: final)  # only fills it when absent
        return blocks[block]

    return fwd.memo(("vision.blocks", id(vision), images_key, block, grad), run)


class TextAwarePatchPredictor(ports.PatchScorer):
    """TiMix's TPP on a ViT block's patch tokens and the caption vector; see :func:`build`.

    The towers are held by reference, not as submodules: they are their own graph nodes (their own
    entry in the trial's modules); registering them here would save their weights twice.
    """

    def __init__(self, vision: ports.VisionTower, text: ports.TextTower, block: int, params: TPPParams):
        super().__init__()
        self._towers = (vision, text)
        self.block = block
        self.text_pool = params.text_pool
        self.detach_text = params.detach_text
        self.grid_size = tuple(vision.grid_size)
        self.patch_size = int(vision.patch_size)  # declared by the VisionTower port
        self.num_prefix_tokens = int(vision.num_prefix_tokens)
        c, ct = int(vision.width), int(text.width)
        self.width = c
        self.norm = nn.LayerNorm(c)
        self.fc = nn.Linear(c, c)
        # z = [local C/2 | global C - C/2 | caption Ct] -> C/2 -> C/4 -> 2 (2C -> C/2 -> C/4 -> 2 when Ct = C)
        self.mlp = nn.Sequential(
            nn.Linear(c + ct, c // 2), nn.GELU(), nn.Linear(c // 2, c // 4), nn.GELU(), nn.Linear(c // 4, 2)
        )

    @property
    def vision(self) -> ports.VisionTower:
        return self._towers[0]

    @property
    def text(self) -> ports.TextTower:
        return self._towers[1]

    def caption_vector(self, fwd: ports.Forward) -> torch.Tensor:
        """[B, Ct]: the text CLS or the mean of non-pad tokens (``text_pool``) of the batch's captions."""
        tokens = fwd.text_tokens(self.text)  # [B, L, Ct]
        pooled = ports.pool_caption(tokens, fwd.batch["attention_mask"], self.text_pool)
        return pooled.detach() if self.detach_text else pooled

    def patch_logits(self, fwd: ports.Forward, images_key: str = "images") -> torch.Tensor:
        """Log-probabilities [B, N, 2] (index 1: the patch is relevant to the caption), fp32. Memoised."""

        def compute() -> torch.Tensor:
            tokens = block_tokens(fwd, self.vision, self.block, images_key)
            patches = tokens[:, self.num_prefix_tokens:]  # [B, N, C]
            h = F.gelu(self.fc(self.norm(patches)))
            half = h.shape[-1] // 2
            local, glob = h[..., :half], h[..., half:].mean(1, keepdim=True)
            text = self.caption_vector(fwd)[:, None, :]  # [B, 1, Ct]
            n = h.shape[1]
            z = torch.cat([local, glob.expand(-1, n, -1), text.to(h.dtype).expand(-1, n, -1)], dim=-1)
            return F.log_softmax(self.mlp(z).float(), dim=-1)

        return fwd.memo(("head.tpp/logits", id(self), images_key, torch.is_grad_enabled()), compute)

    def patch_scores(self, fwd: ports.Forward, images_key: str = "images") -> torch.Tensor:
        """Text relevance [B, S, S]: log p(relevant) z-normalised over each image's N patches. Memoised.

        Carries gradient when grad mode is on; a consumer that wants constants should ``detach()`` them
        (that shares the pass with PTA) rather than call this under ``no_grad`` (a second pass).
        """

        def compute() -> torch.Tensor:
            logp = self.patch_logits(fwd, images_key)
            gh, gw = self.grid_size
            return znormalize(logp[..., 1], dim=1).reshape(logp.shape[0], gh, gw)

        return fwd.memo(("head.tpp/scores", id(self), images_key, torch.is_grad_enabled()), compute)


def resolve_block(block: int, vision: ports.VisionTower, node: str) -> int:
    depth = getattr(vision, "depth", None)
    if block == -1:
        if depth is None:
            raise UserError(f"node '{node}' (head.tpp): its vision tower does not say its depth; give 'block' explicitly")
        return int(depth) // 2
    if depth is not None and block >= depth:
        raise UserError(f"node '{node}' (head.tpp): block {block} does not exist; the vision tower has blocks 0..{depth - 1}")
    return block


@register(
    "head.tpp",
    params=TPPParams,
    output=TextAwarePatchPredictor,
    inputs={
        "vision": In(ports.VisionTower, doc="image tower; the patch tokens after `block` are scored"),
        "text": In(ports.TextTower, doc="text tower; the caption vector (text_pool) conditions the scores"),
    },
)
def build(params: TPPParams, inputs: dict, ctx: ports.BuildContext) -> TextAwarePatchPredictor:
    """Text-aware patch predictor (TiMix TPP): how relevant each image patch is to the caption.

    Reads the vision tower's patch tokens after block `block` (the middle block by default; prefix
    tokens dropped) and the caption vector, and computes, as in TiMix::

        h = GELU(Linear(LayerNorm(patches)))                          # B x N x C
        local, glob = h[..., :C/2], mean over N of h[..., C/2:]
        z = concat(local, glob, caption)                              # B x N x (C + Ct)
        logp = LogSoftmax(Linear(GELU(Linear(GELU(Linear(z))))))      # (C + Ct) -> C/2 -> C/4 -> 2
        patch_scores = z-normalise over N of logp[..., 1], as B x S x S

    Output: a PatchScorer (`patch_scores`, used by mixer.timix and evaluator.grounding) that also
    gives `patch_logits` [B, N, 2] for objective.pta, which trains it (an untrained TPP scores noise).
    The caption vector is the mean of the non-pad text tokens by default rather than the reference's
    CLS: a from-scratch post-LN BERT gives nearly the same CLS vector for every caption at init, so a
    CLS-conditioned TPP first learns a caption-blind map. With `detach_text`, PTA does not train the
    text tower. The block pass runs `forward_blocks` once per Forward and shares its final tokens with
    the objectives that read them, provided it runs first: when PTA is summed into the main step, list
    objective.pta before objective.itc in the trainer, or the vision tower runs twice (with PTA's
    `separate_step` each step group has its own Forward anyway).
    """
    vision, text = inputs["vision"], inputs["text"]
    if int(vision.width) < 4:
        raise UserError(f"node '{ctx.node}' (head.tpp): the vision tower is {vision.width} wide; the TPP needs >= 4")
    block = resolve_block(params.block, vision, ctx.node)
    return TextAwarePatchPredictor(vision, text, block, params).to(ctx.device)
