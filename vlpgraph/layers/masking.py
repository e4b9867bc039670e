"""MAE's building blocks: per-sample random patch masking, patches <-> pixels, normalised-pixel targets,
and the pictures MAE's visualisation draws (the masked view, the reconstruction pasted into the image).

Conventions (as MAE's ``models_mae.py``): images ``[B, 3, H, W]``; patches ``[B, N, p*p*3]`` with
N = (H/p)·(W/p) in row-major order (patch n = row·S_w + col, as a ViT's tokens) and each patch's values
ordered (pixel row, pixel column, channel); masks ``[B, N]`` float, 1 = masked (hidden), 0 = visible;
``ids_keep`` ``[B, V]`` long, the visible patches, each row sorted ascending.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch

# --------------------------------------------------------------------------------- random masks


def sample_seed(seed: int, node: str, step: int, sample_id: int) -> int:
    """A 63-bit seed that depends only on (trial seed, node name, training step, sample id).

    Why a hash of these four and not a draw from a generator: which patches a sample hides must not
    depend on anything else — not on the global RNG (a resumed run, or an evaluation that ran in
    between, would mask differently), not on the other samples of the batch or their order (another
    rank, batch size or data order masks sample s at step t the same), not on how many times the
    step's Forward is rebuilt (separate optimiser step groups). As :func:`vlpgraph.layers.mixing.step_seed`,
    one level finer: per sample rather than per step."""
    digest = hashlib.sha256(f"{seed}:{node}:{step}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def num_visible(num_patches: int, ratio: float) -> int:
    """V = round((1 − ratio)·N), at least 1 (the encoder needs a patch to read) and at most N."""
    return min(num_patches, max(1, round((1.0 - ratio) * num_patches)))


def random_masking(
    seed: int,
    node: str,
    step: int,
    sample_ids: Sequence[int] | torch.Tensor,
    num_patches: int,
    ratio: float,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """MAE's per-sample random masking, drawn as a pure function of (seed, node, step, sample id).

    Each sample gets uniform noise over its N patches from a generator seeded by :func:`sample_seed`;
    the V = :func:`num_visible` patches with the smallest noise stay visible (MAE's ``random_masking``:
    argsort of per-sample noise, keep the first V). Returns ``(ids_keep [B, V] long, sorted ascending;
    mask [B, N] float, 1 = masked)`` on ``device``.
    """
    ids = sample_ids.tolist() if isinstance(sample_ids, torch.Tensor) else [int(s) for s in sample_ids]
    v = num_visible(num_patches, ratio)
    keep = []
    for sid in ids:  # B small hashes and draws on the CPU: negligible beside a forward pass
        gen = torch.Generator().manual_seed(sample_seed(seed, node, step, int(sid)))
        noise = torch.rand(num_patches, generator=gen)
        keep.append(noise.argsort()[:v].sort().values)
    ids_keep = torch.stack(keep) if keep else torch.zeros(0, v, dtype=torch.long)
    mask = torch.ones(len(ids), num_patches)
    mask.scatter_(1, ids_keep, 0.0)
    return ids_keep.to(device), mask.to(device)


# ------------------------------------------------------------------------------ patches, pixels


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """[B, 3, H, W] -> [B, N, p*p*3] (MAE's ``patchify``: 'nchpwq -> nhwpqc'). H and W divisible by p."""
    b, c, h, w = images.shape
    if h % p or w % p:
        raise ValueError(f"patchify: image {h}x{w} is not divisible by the patch size {p}")
    x = images.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, p: int, grid: tuple[int, int] | None = None, channels: int = 3) -> torch.Tensor:
    """[B, N, p*p*C] -> [B, C, H, W], the inverse of :func:`patchify`. ``grid`` = (S_h, S_w); square
    (S = √N) when left out."""
    b, n, _ = patches.shape
    if grid is None:
        s = int(round(n**0.5))
        if s * s != n:
            raise ValueError(f"unpatchify: {n} patches are not a square grid; pass grid=(S_h, S_w)")
        grid = (s, s)
    gh, gw = grid
    x = patches.reshape(b, gh, gw, p, p, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, channels, gh * p, gw * p)


def norm_pix_targets(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MAE's ``norm_pix_loss`` targets: each patch standardised by its own mean and variance,
    (x − mean) / √(var + eps) over the patch's p*p*3 values. As MAE, var is the unbiased (N−1) one."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps) ** 0.5


def denorm_pix(predicted: torch.Tensor, patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The inverse of :func:`norm_pix_targets` with the true patches' statistics: predictions made in
    normalised-pixel space, back in the images' space (MAE's visualisation does this: a norm_pix model
    predicts no patch's mean or contrast, so they come from the input)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return predicted * (var + eps) ** 0.5 + mean


def masked_patch_errors(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MAE's loss on masked patches only: ``(loss, per_sample)``. The squared error is averaged over each
    patch's values, then over the masked patches: loss = Σ err·mask / Σ mask (a scalar, fp32);
    per_sample [B] = the same within each sample. Predictions at visible patches do not count."""
    err = (predicted.float() - target.float()).pow(2).mean(dim=-1)  # [B, N]
    mask = mask.to(err.dtype)
    loss = (err * mask).sum() / mask.sum().clamp_min(1)
    per_sample = (err * mask).sum(1) / mask.sum(1).clamp_min(1)
    return loss, per_sample


# ------------------------------------------------------------------------------------- pictures


def paint_masked(images: torch.Tensor, mask: torch.Tensor, p: int, fill: float = 0.5) -> torch.Tensor:
    """The masked view for display: ``images`` [B, 3, H, W] (pixels in [0, 1]) with every masked patch
    painted ``fill`` (grey); visible patches unchanged."""
    grid = (images.shape[-2] // p, images.shape[-1] // p)
    m = mask.to(images.dtype).reshape(images.shape[0], 1, *grid)
    m = m.repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)  # [B, 1, H, W]
    return images * (1 - m) + fill * m


def paste_reconstruction(images: torch.Tensor, predicted: torch.Tensor, mask: torch.Tensor, p: int,
                         norm_pix: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """MAE's "reconstruction + visible" picture, in the images' space: visible patches from ``images``
    [B, 3, H, W], masked ones from ``predicted`` [B, N, p*p*3] (un-normalised with each true patch's mean
    and variance first when ``norm_pix``). Returns [B, 3, H, W]."""
    patches = patchify(images, p)
    if norm_pix:
        predicted = denorm_pix(predicted, patches, eps)
    m = mask.to(patches.dtype).unsqueeze(-1)
    grid = (images.shape[-2] // p, images.shape[-1] // p)
    return unpatchify(patches * (1 - m) + predicted.to(patches.dtype) * m, p, grid, images.shape[1])
