"""Node kind ``encoder.vit``: a timm VisionTransformer whose attention goes through vlpgraph.layers.attention."""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from pydantic import Field
from timm.models.vision_transformer import VisionTransformer

from vlpgraph.files.local import files_fingerprint, load_matching, read_state_dict, resolve_path
from vlpgraph.errors import UserError
from vlpgraph.layers.attention import RoutedAttention, resolve_backend, route_timm_attention
from vlpgraph.engine.ports import BuildContext, PairedData, VisionTower
from vlpgraph.engine.registry import In, Params, register

Backend = Literal["auto", "sdpa", "math", "xformers"]


class ViTParams(Params):
    image_size: int | None = Field(
        None, ge=8, le=4096, description="input size in pixels; default: the data input's image_size, else 32"
    )
    patch_size: int = Field(4, ge=1, le=64, description="square patch side in pixels (must divide image_size)")
    width: int = Field(128, ge=8, le=4096, description="token width (embedding dim); divisible by heads")
    depth: int = Field(4, ge=1, le=64, description="number of transformer blocks")
    heads: int = Field(2, ge=1, le=64, description="attention heads per block")
    mlp_ratio: float = Field(4.0, gt=0.0, le=16.0, description="MLP hidden width / token width")
    drop_path: float = Field(0.0, ge=0.0, lt=1.0, description="stochastic depth rate (linearly increasing per block)")
    attention: Backend = Field("auto", description="attention backend: auto | sdpa | math | xformers")
    pretrained: str | None = Field(
        None, description="local state dict (.safetensors or .pth/.pt) to start from, relative to the graph "
        "file's folder; its content is part of the node's identity; none = random init"
    )

    def problems(self) -> list[tuple[str, str]]:
        found = []
        if self.width % self.heads:
            found.append(("width", f"width ({self.width}) must be divisible by heads ({self.heads})"))
        if self.image_size is not None:  # known from the params alone: a params error, as early as it can be
            _, problem = image_size_problem(self, None)
            found += [problem] if problem else []
        return found


DEFAULT_IMAGE_SIZE = 32  # without image_size and without data


def image_size_problem(p: ViTParams, data_size: int | None, data_name: str = "") -> tuple[int, tuple[str, str] | None]:
    """(the image size S the tower is built for, the one problem with it or None): S is ``image_size``,
    else the data's image size, else 32; it must equal the data's size when both are given, and
    ``patch_size`` must divide it. The one check of patch_size against the image size, run by
    validation (:func:`check`, with the size the data declares before building) and by :func:`build`."""
    named = f" '{data_name}'" if data_name else ""
    if p.image_size is not None and data_size is not None and p.image_size != data_size:
        return p.image_size, ("image_size", f"image_size {p.image_size} but its data{named} makes {data_size} px "
                                            "images (leave image_size out to inherit it)")
    size = p.image_size or data_size or DEFAULT_IMAGE_SIZE
    if size % p.patch_size:
        if p.image_size is not None:
            return size, ("patch_size", f"image_size ({size}) must be divisible by patch_size ({p.patch_size})")
        return size, ("patch_size", f"patch_size {p.patch_size} does not divide the image size {size}"
                                    + (f" of its data{named}" if data_size else ""))
    return size, None


def check(p: ViTParams, inputs: dict) -> list[tuple[str, str]]:
    """The image size against patch_size and the data's image size (when the data knows it before building)."""
    data = inputs.get("data", [])
    sizes = [(d["image_size"], d["node"]) for d in data if d.get("image_size") is not None]
    if not data:
        sizes = [(None, "")]  # no data input: the default size
    problems = [image_size_problem(p, size, name)[1] for size, name in sizes]
    return [found for found in problems if found]


def fingerprint(p: ViTParams, base_dir) -> dict | None:
    """What the tower reads from disk: ``{"pretrained": sha256 of the checkpoint}`` (None without one),
    so a checkpoint replaced at the same path is a new trial and the same file reached from another
    folder is the same trial."""
    return files_fingerprint({"pretrained": p.pretrained}, base_dir)


# ------------------------------------------------------------------------------------------ tower


class ViTTower(VisionTower):
    """A timm ViT (class token, learned positions, final LayerNorm, no head) as a VisionTower."""

    def __init__(self, vit: VisionTransformer, patch_size: int):
        super().__init__()
        self.vit = vit
        self.width = vit.embed_dim
        self.patch_size = patch_size
        self.grid_size = tuple(vit.patch_embed.grid_size)
        self.num_prefix_tokens = vit.num_prefix_tokens
        self.depth = len(vit.blocks)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_features(images)

    def forward_blocks(self, images: torch.Tensor, blocks: Sequence[int]):
        depth = self.depth
        want: dict[int, list[int]] = {}
        for b in blocks:
            i = int(b)
            if not -depth <= i < depth:
                raise IndexError(f"block {b} does not exist: this ViT has blocks 0..{depth - 1}")
            want.setdefault(i % depth, []).append(b)
        vit = self.vit
        x = vit.patch_embed(images)
        x = vit._pos_embed(x)  # noqa: SLF001  timm's own position rule (cls/reg tokens, dynamic size); no public twin
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        out: dict[int, torch.Tensor] = {}
        for i, blk in enumerate(vit.blocks):
            x = blk(x)
            for key in want.get(i, ()):
                out[key] = x
        return vit.norm(x), out

    def forward_masked(self, images: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """MAE's encoder pass: images [B, 3, H, W], ids_keep [B, V] long (row-major patch indices, each row
        sorted) -> [B, prefix + V, C], final norm applied, CLS first.

        Every patch is embedded and gets its position (cheap: one conv and an add), then only the listed
        patches go on, after the CLS token with its own position; the blocks run on prefix + V tokens and
        never see the masked patches. With every patch listed this is exactly ``forward``."""
        if ids_keep.dim() != 2 or ids_keep.shape[0] != images.shape[0]:
            raise ValueError(f"forward_masked: ids_keep must be [B, V] for {images.shape[0]} images, got {tuple(ids_keep.shape)}")
        vit = self.vit
        x = vit._pos_embed(vit.patch_embed(images))  # noqa: SLF001  [B, prefix + N, C], positions added by timm's own rule
        prefix, patches = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens:]
        index = ids_keep.to(patches.device).unsqueeze(-1).expand(-1, -1, patches.shape[-1])
        x = torch.cat((prefix, patches.gather(1, index)), dim=1)
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        x = vit.blocks(x)
        return vit.norm(x)

    @torch.no_grad()
    def attention_maps(self, images: torch.Tensor, blocks: Sequence[int] = (-1,)) -> dict[int, torch.Tensor]:
        """Attention weights [B, H, 1+N, 1+N] of the listed blocks (math backend), for attention maps."""
        attns = [blk.attn for blk in self.vit.blocks]
        idx = {int(b) % self.depth: b for b in blocks}
        for i in idx:
            attns[i].keep_weights = True
        try:
            self.forward(images)
            return {b: attns[i].last_weights for i, b in idx.items()}
        finally:
            for i in idx:
                attns[i].keep_weights = False
                attns[i].last_weights = None


# ------------------------------------------------------------------------------------ checkpoints


def _load_pretrained(vit: VisionTransformer, path: str, log) -> None:
    sd = read_state_dict(path, "encoder.vit")
    for prefix in ("module.", "vit.", "visual.trunk."):
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    own = vit.state_dict()
    pe = sd.get("pos_embed")
    if pe is not None and pe.shape != own["pos_embed"].shape and pe.shape[-1] == own["pos_embed"].shape[-1]:
        from timm.layers import resample_abs_pos_embed

        sd["pos_embed"] = resample_abs_pos_embed(
            pe, new_size=list(vit.patch_embed.grid_size), num_prefix_tokens=vit.num_prefix_tokens
        )
        log(f"encoder.vit: resampled pos_embed {tuple(pe.shape)} -> {tuple(sd['pos_embed'].shape)}")
    load_matching(vit, sd, kind="encoder.vit", path=path, what="the ViT", decided_by="width/depth/patch_size", log=log)


# ------------------------------------------------------------------------------------------ build


def build_vit(p: ViTParams, image_size: int) -> ViTTower:
    vit = VisionTransformer(
        img_size=image_size,
        patch_size=p.patch_size,
        in_chans=3,
        num_classes=0,
        global_pool="",
        embed_dim=p.width,
        depth=p.depth,
        num_heads=p.heads,
        mlp_ratio=p.mlp_ratio,
        qkv_bias=True,
        class_token=True,
        drop_path_rate=p.drop_path,
        attn_layer=RoutedAttention,
    )
    route_timm_attention(vit, p.attention)
    return ViTTower(vit, p.patch_size)


@register(
    "encoder.vit",
    params=ViTParams,
    output=ViTTower,
    inputs={"data": In(PairedData, optional=True, doc="optional: image_size defaults to the data's")},
    check=check,
    fingerprint=fingerprint,
)
def build(params: ViTParams, inputs: dict, ctx: BuildContext) -> ViTTower:
    """Vision Transformer image tower (timm), trained from scratch or from a local checkpoint.

    Produces a VisionTower: images [B, 3, S, S] -> tokens [B, 1 + (S/patch_size)^2, width], class
    token first, final LayerNorm applied. ``forward_blocks(images, blocks)`` also returns the tokens
    after the listed blocks (before the final norm); block indices are 0 .. depth-1 (negative
    indices count from the end). ``forward_masked(images, ids_keep)`` encodes only the listed patches
    plus CLS (MAE's encoder: the blocks run on 1 + V tokens; objective.mae uses it). Attention runs through vlpgraph.layers.attention with the ``attention``
    backend. S is ``image_size``, or the data input's image size when left out (32 without data);
    validation checks that ``patch_size`` divides S, also when S comes from the data.
    ``pretrained`` loads a local .safetensors/.pth state dict (timm ViT keys, optionally prefixed
    ``vit.``; a relative path is relative to the graph file's folder); the position embedding is
    resampled if its grid differs. The checkpoint's content hash is part of the node's hash.
    Never downloads.
    """
    data_size = getattr(inputs.get("data"), "image_size", None)
    image_size, problem = image_size_problem(params, int(data_size) if data_size else None)
    if problem:
        raise UserError(f"node '{ctx.node}' (encoder.vit): {problem[1]}")
    if params.attention == "xformers":
        try:
            resolve_backend("xformers", ctx.device, torch.bfloat16)
        except UserError as e:
            raise UserError(f"node '{ctx.node}' (encoder.vit): {e}")
    tower = build_vit(params, image_size)
    if params.pretrained:
        _load_pretrained(tower.vit, str(resolve_path(params.pretrained, ctx.base_dir)), ctx.log)
    return tower
