"""Patch-level helpers shared by patch heads, objectives and evaluators (node modules may not import
each other, so their common code lives here).

- :func:`patch_labels` / :func:`batch_patch_labels`: which patches of the S_h x S_w grid the boxes of
  a caption's mentioned objects touch (the PTA labels of TiMix, also the grounding evaluator's masks);
- :func:`znormalize`: standardise scores over the patches of each image;
- :func:`pointing_hits`, :func:`topk_iou`, :func:`chance_pointing`: grounding metrics per sample;
- :func:`png_bytes`: an image tensor as PNG bytes (for the store's ``patch_scores.image``).

Grids are row-major: patch n = row * S_w + col, row 0 at the top, as in a ViT's token order.
"""

from __future__ import annotations

import io
import math
from typing import Literal, Sequence

import numpy as np
import torch

# Box edges within this many pixels of a patch boundary count as on it: float32 box coordinates
# (e.g. 7.9999995 or 8.0000005 for an edge at 8) must not touch a neighbouring patch by rounding.
EDGE_TOLERANCE_PX = 1e-4

Empty = Literal["all", "none"]


def _pair(v: int | float | Sequence[int | float]) -> tuple[float, float]:
    if isinstance(v, torch.Tensor):
        v = v.tolist()
    if isinstance(v, (int, float)):
        return float(v), float(v)
    h, w = v
    return float(h), float(w)


def grid_of(image_size: int | Sequence[int], patch_size: int | float | Sequence[int | float]) -> tuple[int, int]:
    """(S_h, S_w) = image size / patch size, rounded up (a partial last patch is still a patch)."""
    (h, w), (ph, pw) = _pair(image_size), _pair(patch_size)
    return math.ceil(h / ph - EDGE_TOLERANCE_PX), math.ceil(w / pw - EDGE_TOLERANCE_PX)


def _box_masks(boxes: torch.Tensor, image_size, patch_size) -> torch.Tensor:
    """Bool [K, S_h, S_w]: box k touches patch (r, c). boxes: [K, 4] x0, y0, x1, y1 in pixels."""
    (ph, pw) = _pair(patch_size)
    gh, gw = grid_of(image_size, patch_size)
    b = boxes.detach().to(torch.float64).reshape(-1, 4)
    eps = EDGE_TOLERANCE_PX
    # In patch units: floor on the low side, ceil on the high side (a box touching one pixel of a
    # patch labels it); a box ending exactly on a patch edge does not reach the next patch.
    c0 = torch.floor(b[:, 0] / pw + eps / pw).clamp(0, gw - 1)
    r0 = torch.floor(b[:, 1] / ph + eps / ph).clamp(0, gh - 1)
    c1 = torch.ceil(b[:, 2] / pw - eps / pw).clamp(0, gw)
    r1 = torch.ceil(b[:, 3] / ph - eps / ph).clamp(0, gh)
    # A degenerate (zero-width) box still touches the patch it lies in.
    c1 = torch.maximum(c1, c0 + 1)
    r1 = torch.maximum(r1, r0 + 1)
    rows = torch.arange(gh, device=b.device, dtype=b.dtype)
    cols = torch.arange(gw, device=b.device, dtype=b.dtype)
    in_rows = (rows[None, :] >= r0[:, None]) & (rows[None, :] < r1[:, None])  # [K, S_h]
    in_cols = (cols[None, :] >= c0[:, None]) & (cols[None, :] < c1[:, None])  # [K, S_w]
    return in_rows[:, :, None] & in_cols[:, None, :]


def patch_labels(
    boxes: torch.Tensor,
    mentioned: torch.Tensor | None,
    image_size: int | Sequence[int],
    patch_size: int | float | Sequence[int | float],
    *,
    empty: Empty = "all",
) -> torch.Tensor:
    """PTA labels of one (image, caption) pair: bool [N] (N = S_h * S_w, row-major).

    boxes: [K, 4] (x0, y0, x1, y1) in pixels; mentioned: bool [K], which objects the caption names
    (None: all of them). image_size: H or (H, W); patch_size: p or (p_h, p_w) in pixels.

    Patch n is True when the box of a mentioned object touches it at all: in patch units the box spans
    columns floor(x0/p) .. ceil(x1/p) - 1 (rows likewise), so a box that covers one pixel of a patch
    labels it, and a box edge lying exactly on a patch boundary does not reach the next patch
    (within ``EDGE_TOLERANCE_PX``). Boxes are clipped to the image.

    A caption that mentions no object gets ``empty``: "all" (every patch True: TiMix's rule for a
    whole-image caption) or "none" (every patch False).
    """
    gh, gw = grid_of(image_size, patch_size)
    boxes = torch.as_tensor(boxes).reshape(-1, 4)
    if mentioned is not None:
        mentioned = torch.as_tensor(mentioned, dtype=torch.bool, device=boxes.device).reshape(-1)
        if mentioned.shape[0] != boxes.shape[0]:
            raise ValueError(f"patch_labels: {boxes.shape[0]} boxes but {mentioned.shape[0]} mentioned flags")
        boxes = boxes[mentioned]
    if boxes.shape[0] == 0:
        fill = empty == "all"
        return torch.full((gh * gw,), fill, dtype=torch.bool, device=boxes.device)
    return _box_masks(boxes, image_size, patch_size).any(0).reshape(-1)


def batch_patch_labels(
    boxes: Sequence[torch.Tensor],
    mentioned: Sequence[torch.Tensor] | None,
    image_size: int | Sequence[int],
    patch_size: int | float | Sequence[int | float],
    *,
    empty: Empty = "all",
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`patch_labels` for a batch of ragged boxes, in one vectorised pass.

    boxes: B tensors [K_i, 4]; mentioned: B bool tensors [K_i] (None: all mentioned).
    Returns (labels bool [B, N], has_mention bool [B]); rows without a mentioned object are filled
    according to ``empty``.
    """
    gh, gw = grid_of(image_size, patch_size)
    b = len(boxes)
    dev = torch.device(device) if device is not None else (boxes[0].device if b else torch.device("cpu"))
    kept, owner = [], []
    for i, bx in enumerate(boxes):
        bx = torch.as_tensor(bx).reshape(-1, 4).to(dev)
        if mentioned is not None:
            m = torch.as_tensor(mentioned[i], dtype=torch.bool).reshape(-1).to(dev)
            if m.shape[0] != bx.shape[0]:
                raise ValueError(f"batch_patch_labels: sample {i} has {bx.shape[0]} boxes but {m.shape[0]} mentioned flags")
            bx = bx[m]
        kept.append(bx)
        owner.append(torch.full((bx.shape[0],), i, dtype=torch.long, device=dev))
    labels = torch.zeros(b, gh * gw, dtype=torch.float32, device=dev)
    has = torch.zeros(b, dtype=torch.bool, device=dev)
    if b:
        all_boxes = torch.cat(kept) if kept else torch.zeros(0, 4, device=dev)
        who = torch.cat(owner)
        if all_boxes.shape[0]:
            masks = _box_masks(all_boxes, image_size, patch_size).reshape(-1, gh * gw).float()
            labels.index_add_(0, who, masks)
            has[who] = True
    labels = labels > 0
    if empty == "all":
        labels[~has] = True
    return labels, has


def znormalize(scores: torch.Tensor, dim: int = -1, eps: float = 1e-10) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) along ``dim`` (population variance): mean 0, std 1 per image.

    ``eps`` is small on purpose: an untrained TPP's log-probabilities vary by ~1e-5 across patches,
    and a larger floor would shrink (not standardise) exactly those maps; a constant map gives zeros."""
    mean = scores.mean(dim, keepdim=True)
    var = scores.var(dim, unbiased=False, keepdim=True)
    return (scores - mean) / torch.sqrt(var + eps)


# -------------------------------------------------------------------------------------- metrics


def _flat(scores: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = scores.shape[0]
    s = scores.detach().reshape(b, -1).float().nan_to_num(nan=float("-inf"))
    m = masks.reshape(b, -1).to(device=s.device, dtype=torch.bool)
    if s.shape != m.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and masks {tuple(masks.shape)} do not match")
    return s, m


def pointing_hits(scores: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Pointing game per sample: float [B] in [0, 1].

    scores: [B, N] or [B, S_h, S_w]; masks: bool, same shape (patches the mentioned boxes touch).
    1 when the highest-scoring patch lies in the mask. When several patches tie for the maximum, the
    credit is the share of them in the mask (the expected hit of a random tie-break), so a constant
    map scores exactly :func:`chance_pointing`.
    """
    s, m = _flat(scores, masks)
    top = s == s.amax(dim=1, keepdim=True)
    return (top & m).sum(1).float() / top.sum(1).clamp_min(1).float()


def chance_pointing(masks: torch.Tensor) -> torch.Tensor:
    """Expected pointing-game hit of a uniformly random patch: float [B] = |mask| / N."""
    m = masks.reshape(masks.shape[0], -1).bool()
    return m.float().mean(1)


def topk_iou(
    scores: torch.Tensor,
    masks: torch.Tensor,
    k: int | torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """IoU between the top-k patches and the mask, per sample: float [B] in [0, 1].

    k: one count for every sample, or a Long [B] of counts (e.g. each mask's own size). Ties at the
    k-th score are broken at random with ``generator`` (deterministic for a seeded generator; by
    index order without one).
    """
    s, m = _flat(scores, masks)
    b, n = s.shape
    ks = torch.as_tensor(k, device=s.device).reshape(-1).expand(b).clamp(1, n)
    if generator is not None:
        # Rank by score, then by a random key: permute, then a stable sort on the score.
        perm = torch.randperm(n, generator=generator).to(s.device)
        order = perm[s[:, perm].argsort(dim=1, descending=True, stable=True)]
    else:
        order = s.argsort(dim=1, descending=True, stable=True)
    chosen = torch.arange(n, device=s.device)[None, :] < ks[:, None]  # [B, N] by rank
    top = torch.zeros_like(m).scatter_(1, order, chosen)
    inter = (top & m).sum(1).float()
    union = (top | m).sum(1).float()
    return inter / union.clamp_min(1)


def resolve_topk(topk: float | str, masks: torch.Tensor) -> torch.Tensor:
    """Counts Long [B] for :func:`topk_iou`: "target" = each mask's own size; a number below 1 = that
    share of the N patches (rounded up); otherwise that many patches."""
    m = masks.reshape(masks.shape[0], -1)
    n = m.shape[1]
    if topk == "target":
        k = m.bool().sum(1)
    else:
        k = torch.full((m.shape[0],), math.ceil(topk * n) if topk < 1 else round(topk), dtype=torch.long)
    return k.clamp(1, n)


# ---------------------------------------------------------------------------------------- images


def png_bytes(image: torch.Tensor | np.ndarray) -> bytes:
    """PNG bytes of one RGB image: a float tensor [3, H, W] in [0, 1] or a uint8 array [H, W, 3]."""
    from PIL import Image

    if isinstance(image, torch.Tensor):
        t = image.detach().float().cpu()
        if t.dim() != 3 or t.shape[0] not in (1, 3):
            raise ValueError(f"png_bytes: expected [3, H, W], got {tuple(t.shape)}")
        arr = (t.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    else:
        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
    if arr.shape[-1] == 1:
        arr = arr[..., 0]
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return buf.getvalue()
