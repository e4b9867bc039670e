"""objective.mae: masked image modelling (MAE): the vision tower encodes a random 25% of the patches, a
light decoder with mask tokens reconstructs the pixels of the rest."""

from __future__ import annotations

from functools import partial
from typing import Literal

import torch
from pydantic import Field
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import nn

from vlpgraph.engine import ports
from vlpgraph.errors import TrialFailed, UserError
from vlpgraph.layers.attention import RoutedAttention, route_timm_attention
from vlpgraph.layers.masking import masked_patch_errors, norm_pix_targets, num_visible, patchify, random_masking
from vlpgraph.engine.registry import In, Params, register


class MAEParams(Params):
    mask_ratio: float = Field(0.75, gt=0, lt=1, description="share of each image's patches hidden from the encoder "
                              "(MAE: 0.75); the encoder sees round((1 - mask_ratio) x N) of them, at least 1")
    decoder_depth: int = Field(2, ge=1, le=32, description="decoder transformer blocks (MAE reference: 8)")
    decoder_width: int = Field(64, ge=8, le=4096, description="decoder token width (MAE reference: 512); divisible "
                               "by decoder_heads and by 4 (2-D sin-cos positions)")
    decoder_heads: int = Field(4, ge=1, le=64, description="decoder attention heads (MAE reference: 16)")
    decoder_mlp_ratio: float = Field(4.0, gt=0, le=16, description="decoder MLP hidden width / decoder width")
    norm_pix: bool = Field(True, description="targets are each patch's pixels standardised by the patch's own mean "
                           "and variance (MAE's norm_pix_loss); false: the (dataset-normalised) pixels")
    norm_pix_eps: float = Field(1e-6, gt=0, description="added to each patch's variance before the square root "
                                "(MAE: 1e-6)")
    weight: float = Field(1.0, ge=0, description="weight of the 'mae' term in the total loss")
    attention: Literal["auto", "sdpa", "math", "xformers"] = Field(
        "auto", description="attention backend of the decoder blocks: auto | sdpa | math | xformers")

    def problems(self) -> list[tuple[str, str]]:
        found = []
        if self.decoder_width % self.decoder_heads:
            found.append(("decoder_width", f"decoder_width ({self.decoder_width}) must be divisible by "
                                           f"decoder_heads ({self.decoder_heads})"))
        if self.decoder_width % 4:
            found.append(("decoder_width", f"decoder_width ({self.decoder_width}) must be divisible by 4 "
                                           "(2-D sin-cos position embedding)"))
        return found


class MAEDecoder(nn.Module):
    """MAE's decoder: encoder tokens [B, prefix + V, C] and ids_keep [B, V] -> pixel predictions
    [B, N, patch*patch*3] for every patch (the prefix tokens are read, not predicted).

    Linear(C -> width); a learned mask token fills the N - V hidden places and the visible tokens go back
    to their own (``ids_keep`` is sorted, so one scatter unshuffles); fixed 2-D sin-cos positions (zeros
    for the prefix, as MAE's CLS); timm Blocks whose attention runs through ``attend()``; LayerNorm;
    Linear(width -> patch*patch*3).
    """

    def __init__(self, in_width: int, grid: tuple[int, int], patch_size: int, prefix: int, p: MAEParams):
        super().__init__()
        self.grid, self.prefix = tuple(grid), prefix
        self.embed = nn.Linear(in_width, p.decoder_width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, p.decoder_width))
        pos = build_sincos2d_pos_embed(list(self.grid), p.decoder_width)  # [N, width], fixed (not trained)
        self.register_buffer("pos_embed", torch.cat((torch.zeros(prefix, p.decoder_width), pos))[None], persistent=False)
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.Sequential(*[
            Block(p.decoder_width, p.decoder_heads, p.decoder_mlp_ratio, qkv_bias=True, norm_layer=norm,
                  attn_layer=RoutedAttention)
            for _ in range(p.decoder_depth)
        ])
        route_timm_attention(self.blocks, p.attention)
        self.norm = norm(p.decoder_width)
        self.pred = nn.Linear(p.decoder_width, patch_size * patch_size * 3)
        self._init_weights()

    def _init_weights(self) -> None:
        # MAE's initialize_weights: mask token N(0, 0.02), xavier-uniform Linears with zero bias, LayerNorm 1/0
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)  # [B, prefix + V, D]
        b, _, d = x.shape
        n = self.grid[0] * self.grid[1]
        prefix, visible = x[:, : self.prefix], x[:, self.prefix:]
        full = self.mask_token.to(x.dtype).expand(b, n, d)
        index = ids_keep.unsqueeze(-1).expand(-1, -1, d)
        full = full.scatter(1, index, visible)  # visible tokens back at their patch, mask tokens elsewhere
        x = torch.cat((prefix, full), dim=1) + self.pos_embed.to(x.dtype)
        x = self.norm(self.blocks(x))
        return self.pred(x[:, self.prefix:])


class MAE(ports.MaskedImageModel):
    """Masked image modelling on a vision tower with a masked forward; see :func:`build`.

    The tower is held by reference, not as a submodule: it is its own graph node (its own entry in the
    trial's modules); registering it here would put its weights into this module's state_dict twice.

    Masks are a pure function of (seed, node, step, sample id) (:func:`vlpgraph.layers.masking.random_masking`):
    the seed is the trial's, or ``batch["mask_seed"]`` when the batch carries one (evaluator.reconstruction
    sets it, with a fixed step, so every evaluation of every trial hides the same patches); the step is
    ``batch["step"]`` (0 when absent).
    """

    def __init__(self, vision: ports.VisionTower, params: MAEParams, seed: int = 0, node: str = "mae"):
        super().__init__()
        self._refs = (vision,)
        self.weight = params.weight
        self.mask_ratio = params.mask_ratio
        self.norm_pix = params.norm_pix
        self.norm_pix_eps = params.norm_pix_eps
        self.seed, self.node = int(seed), node
        self.patch_size = int(vision.patch_size)
        self.grid_size = tuple(vision.grid_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.num_visible = num_visible(self.num_patches, params.mask_ratio)
        self.decoder = MAEDecoder(vision.width, self.grid_size, self.patch_size,
                                  int(getattr(vision, "num_prefix_tokens", 1)), params)

    @property
    def vision(self) -> ports.VisionTower:
        return self._refs[0]

    def masks(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids_keep [B, V], mask [B, N]) of this batch, on the images' device."""
        if "sample_ids" not in batch:
            raise TrialFailed(f"objective.mae '{self.node}': the batch has no 'sample_ids' (masks are drawn per "
                              "sample id; every PairedData item carries a sample_id)")
        seed = int(batch.get("mask_seed", self.seed))
        step = int(batch.get("step", 0))
        return random_masking(seed, self.node, step, batch["sample_ids"], self.num_patches, self.mask_ratio,
                              device=batch["images"].device)

    def masked_encoding(self, fwd: ports.Forward) -> ports.MaskedEncoding:
        """The step's masked encoding of ``batch["images"]`` (un-mixed), once per Forward however many
        objectives ask."""

        def compute() -> ports.MaskedEncoding:
            ids_keep, mask = self.masks(fwd.batch)
            tokens = self.vision.forward_masked(fwd.batch["images"], ids_keep)
            return ports.MaskedEncoding(tokens=tokens, ids_keep=ids_keep, mask=mask)

        return fwd.memo(("objective.mae/masked", id(self)), compute)

    def reconstruct(self, fwd: ports.Forward) -> torch.Tensor:
        """The decoder's predictions [B, N, patch*patch*3] (per-patch normalised pixels with norm_pix)."""

        def compute() -> torch.Tensor:
            enc = self.masked_encoding(fwd)
            return self.decoder(enc.tokens, enc.ids_keep)

        return fwd.memo(("objective.mae/reconstruct", id(self)), compute)

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """What the decoder should predict for ``images``: [B, N, patch*patch*3]."""
        patches = patchify(images.float(), self.patch_size)
        return norm_pix_targets(patches, self.norm_pix_eps) if self.norm_pix else patches

    def errors(self, fwd: ports.Forward) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, per-sample loss [B]): MSE over the masked patches only."""
        enc = self.masked_encoding(fwd)
        return masked_patch_errors(self.reconstruct(fwd), self.targets(fwd.batch["images"]), enc.mask)

    def forward(self, fwd: ports.Forward, batch: dict, group: str | None = None) -> dict[str, torch.Tensor]:
        return {"mae": self.errors(fwd)[0]}


@register(
    "objective.mae",
    params=MAEParams,
    output=MAE,
    inputs={"vision": In(ports.VisionTower, doc="the vision tower; it needs a masked forward (encoder.vit has one)")},
)
def build(params: MAEParams, inputs: dict, ctx: ports.BuildContext) -> MAE:
    """Masked image modelling (MAE): reconstruct the pixels of the patches the encoder did not see.

    Each step hides `mask_ratio` of every image's patches at random; which ones is a pure function of
    (trial seed, this node's name, step, sample id), so a resumed run masks the same and a sample masks
    the same whatever else its batch holds. The vision tower's masked forward encodes only the
    round((1 - mask_ratio) x N) visible patches plus CLS (the blocks never see the masked ones: MAE's
    saving). The masked encoding is memoised in the step's Forward, so objective.caption reading it
    (MUG) shares this one forward. A light decoder (Linear to `decoder_width`, a learned mask token in
    every hidden place, fixed 2-D sin-cos positions, `decoder_depth` transformer blocks whose attention
    goes through attend(), LayerNorm, Linear to patch x patch x 3 pixels) predicts every patch; loss
    'mae' = mean squared error over the masked patches only (the mean over each patch's values, then
    over the masked patches), with each target patch standardised by its own mean and variance when
    `norm_pix`. Images are batch['images'], never a mixer's output. Deviations from MAE:
    the decoder is scaled down by default (2 blocks x 64 wide, 4 heads; the reference is 8 x 512, 16
    heads); the sin-cos position table is timm's build_sincos2d_pos_embed (MAE's frequencies, its
    channels in another order); masks come from a hash per sample instead of torch.rand on the batch.
    """
    vision = inputs["vision"]
    if getattr(type(vision), "forward_masked", None) in (None, ports.VisionTower.forward_masked):
        raise UserError(
            f"node '{ctx.node}' (objective.mae): its vision tower ({type(vision).__name__}) has no masked forward "
            "(forward_masked); use encoder.vit"
        )
    return MAE(vision, params, seed=ctx.seed, node=ctx.node).to(ctx.device)
