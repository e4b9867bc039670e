"""What every mixer node shares: per-step random draws, the γ ramp, flip pairing, sliding-window sums,
pasting on a grid, and soft targets over the batch's captions.

Mixer nodes (``vlpgraph/nodes/mixers/*``) import this module, never each other. Everything here is a
plain function of tensors; nothing knows about a particular mixer.

Conventions: images ``[B, 3, H, W]``; score maps ``[B, S, S]``; window positions ``[B, 2]`` long
(row, col) of a window's top-left cell; partner ``[B]`` long; λ ``[B]``, the share of image i kept.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F

from typing import Literal

from pydantic import Field

from vlpgraph.errors import TrialFailed
from vlpgraph.engine.registry import Params

# --------------------------------------------------------------------------------- random draws


def step_seed(seed: int, node: str, step: int) -> int:
    """A 63-bit seed that depends only on (trial seed, mixer node name, training step).

    A resumed run, another rank of the same run, or a second call in the same step (a separate
    optimiser step group) all draw the same values for a step; two mixers of one trial draw
    independently."""
    digest = hashlib.sha256(f"{seed}:{node}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def step_generator(seed: int, node: str, step: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from (seed, node, step); draws never touch the global RNG."""
    return torch.Generator().manual_seed(step_seed(seed, node, step))


def step_rng(seed: int, node: str, step: int) -> np.random.Generator:
    """A numpy Generator seeded from (seed, node, step), for Beta draws (torch has no seeded Beta)."""
    return np.random.default_rng(step_seed(seed, node, step))


# ------------------------------------------------------------------------------------ schedule


def ramp(step: int, steps_per_epoch: int | None, ramp_epochs: float) -> float:
    """γ = min(1, step / (ramp_epochs · steps_per_epoch)): 0 at step 0, 1 after ``ramp_epochs`` epochs
    (ALBEF's α ramp). 1 when ``ramp_epochs`` is 0 or the batch does not say how long an epoch is."""
    if ramp_epochs <= 0 or not steps_per_epoch:
        return 1.0
    return min(1.0, step / (ramp_epochs * steps_per_epoch))


def schedule(batch: dict, ramp_epochs: float, stop_fraction: float) -> float | None:
    """γ for this step from the loop position the trainer puts into ``batch`` (``step``,
    ``steps_per_epoch``, ``progress``), or None when the mixer is off: progress ≥ ``stop_fraction``
    (1.0 never stops, progress < 1), or γ = 0 (nothing to gain, and a separate step group would
    otherwise take an optimiser step on zero gradients)."""
    if float(batch.get("progress", 0.0)) >= stop_fraction:
        return None
    gamma = ramp(int(batch.get("step", 0)), batch.get("steps_per_epoch"), ramp_epochs)
    return gamma if gamma > 0 else None


# ------------------------------------------------------------------------------------- pairing


def flip_partner(b: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """timm's flip pairing: p(i) = B − 1 − i (the batch reversed). For odd B the middle image is its
    own partner."""
    return torch.arange(b - 1, -1, -1, device=device)


def require_even(b: int, what: str) -> None:
    """Flip pairing without a self-paired middle image needs an even batch (timm asserts the same).

    A mixer node cannot see the trainer's batch size at validation time, so this runs at mix() time."""
    if b % 2:
        raise TrialFailed(
            f"{what}: got a batch of {b} images; flip pairing (image i with image B-1-i) needs an even "
            f"batch size — set the trainer's batch_size to an even number (per process under torchrun)"
        )


def draw_lams(rng: np.random.Generator, alpha: float, prob: float, mode: str, b: int) -> np.ndarray | None:
    """timm's λ draws, adapted to flip pairs: [B] float64 λ ~ Beta(alpha, alpha), or None (no mixing).

    mode 'batch': one λ for the whole batch, applied with probability ``prob`` (else None).
    mode 'pair':  one λ per pair (i, B−1−i), each pair mixed with probability ``prob`` (λ = 1 for the
    others; None if no pair is mixed); λ[i] = λ[B−1−i]. B must be even."""
    if mode == "batch":
        if rng.random() >= prob:
            return None
        return np.full(b, float(rng.beta(alpha, alpha)))
    half = b // 2
    lam = np.where(rng.random(half) < prob, rng.beta(alpha, alpha, size=half), 1.0)
    if np.all(lam == 1.0):
        return None
    return np.concatenate((lam, lam[::-1]))



def pair_draw(batch: dict, params, seed: int, node: str, what: str):
    """The start every pair mixer (mixer.mixup, mixer.cutmix) shares: check the batch is even, apply
    the schedule, draw λ. Returns (gamma, rng, lams [B]) or None when this step is not mixed."""
    b = batch["images"].shape[0]
    require_even(b, what)
    gamma = schedule(batch, params.ramp_epochs, params.stop_fraction)
    if gamma is None:
        return None
    rng = step_rng(seed, node, int(batch.get("step", 0)))
    lams = draw_lams(rng, params.alpha, params.prob, params.mode, b)
    return None if lams is None else (gamma, rng, lams)


# ------------------------------------------------------------------------------ window search


def window_sums(maps: torch.Tensor, r: int) -> torch.Tensor:
    """Sum of every r×r window of each map: [B, S, S] -> [B, S−r+1, S−r+1] (float64).

    Entry (b, y, x) is ``maps[b, y:y+r, x:x+r].sum()``. A 2-D cumulative sum (integral image) in
    float64, so the result matches a brute-force sum to ~1e-12 and ties break the same way."""
    if maps.dim() != 3 or maps.shape[1] != maps.shape[2]:
        raise ValueError(f"window_sums: maps must be [B, S, S], got {tuple(maps.shape)}")
    s = maps.shape[-1]
    if not 1 <= r <= s:
        raise ValueError(f"window_sums: window side r={r} must lie in [1, S={s}]")
    integral = F.pad(maps.double().cumsum(1).cumsum(2), (1, 0, 1, 0))  # [B, S+1, S+1], 0 row/col first
    return integral[:, r:, r:] - integral[:, :-r, r:] - integral[:, r:, :-r] + integral[:, :-r, :-r]


def _position(flat: torch.Tensor, width: int) -> torch.Tensor:
    return torch.stack((flat // width, flat % width), dim=1)  # [B, 2] (row, col)


def window_argmin(sums: torch.Tensor) -> torch.Tensor:
    """[B, P, Q] window sums -> [B, 2] (row, col) of each map's smallest window (first in row-major
    order on ties)."""
    return _position(sums.flatten(1).argmin(1), sums.shape[-1])


def window_argmax(sums: torch.Tensor) -> torch.Tensor:
    """[B, P, Q] window sums -> [B, 2] (row, col) of each map's largest window (first on ties)."""
    return _position(sums.flatten(1).argmax(1), sums.shape[-1])


def window_values(sums: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """sums[b, pos[b, 0], pos[b, 1]] for every b: [B]."""
    b = torch.arange(sums.shape[0], device=sums.device)
    return sums[b, pos[:, 0], pos[:, 1]]


# ------------------------------------------------------------------------------------- pasting


def paste_windows(
    images: torch.Tensor, partner: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, size: int, cell: int = 1
) -> torch.Tensor:
    """A copy of ``images`` where, in image i, the ``size``×``size``-cell window at ``dst[i]`` holds
    image ``partner[i]``'s window at ``src[i]`` (positions and size in cells of ``cell`` pixels: patch
    units with cell = patch size). Reads come from the un-mixed images, so pairs may swap. One gather,
    no Python loop over the batch. A row with partner i and src = dst is left as it was."""
    out = images.clone()
    if size == 0:
        return out
    b = images.shape[0]
    offs = torch.arange(size * cell, device=images.device)
    src_px, dst_px = src.to(images.device) * cell, dst.to(images.device) * cell
    rows_d, cols_d = dst_px[:, :1] + offs, dst_px[:, 1:] + offs  # [B, size·cell]
    rows_s, cols_s = src_px[:, :1] + offs, src_px[:, 1:] + offs
    i = torch.arange(b, device=images.device)[:, None, None]
    p = partner.to(images.device)[:, None, None]
    # advanced indices around a slice: both sides come out as [B, h, w, C]
    out[i, :, rows_d[:, :, None], cols_d[:, None, :]] = images[p, :, rows_s[:, :, None], cols_s[:, None, :]]
    return out


def box_mask(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, 4] pixel boxes (y0, y1, x0, x1), half-open -> bool [B, 1, H, W], True inside the box."""
    ys = torch.arange(height, device=boxes.device)
    xs = torch.arange(width, device=boxes.device)
    in_y = (ys >= boxes[:, 0:1]) & (ys < boxes[:, 1:2])  # [B, H]
    in_x = (xs >= boxes[:, 2:3]) & (xs < boxes[:, 3:4])  # [B, W]
    return (in_y[:, :, None] & in_x[:, None, :])[:, None]


def rand_bbox(rng: np.random.Generator, height: int, width: int, lam: float) -> tuple[int, int, int, int]:
    """timm's ``rand_bbox``: a box of side ≈ sqrt(1−λ)·(H, W) centred at a uniform pixel, clipped to
    the image -> (y0, y1, x0, x1)."""
    ratio = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    y0, y1 = np.clip(cy - cut_h // 2, 0, height), np.clip(cy + (cut_h + 1) // 2, 0, height)
    x0, x1 = np.clip(cx - cut_w // 2, 0, width), np.clip(cx + (cut_w + 1) // 2, 0, width)
    return int(y0), int(y1), int(x0), int(x1)


def rand_bbox_minmax(rng: np.random.Generator, height: int, width: int, minmax: tuple[float, float]) -> tuple[int, int, int, int]:
    """timm's ``rand_bbox_minmax``: side lengths uniform in [min, max) × (H, W), placed inside the image."""
    cut_h = int(rng.integers(int(height * minmax[0]), max(int(height * minmax[0]) + 1, int(height * minmax[1]))))
    cut_w = int(rng.integers(int(width * minmax[0]), max(int(width * minmax[0]) + 1, int(width * minmax[1]))))
    y0 = int(rng.integers(0, height - cut_h + 1))
    x0 = int(rng.integers(0, width - cut_w + 1))
    return y0, y0 + cut_h, x0, x0 + cut_w


# -------------------------------------------------------------------------------- soft targets


def mix_targets(base: torch.Tensor, lam: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
    """Y = λ_i·base[i] + (1 − λ_i)·base[p(i)]: [B, B] rows over the batch's captions.

    ``base`` is one-hot (``eye(B)``) or a self-distilled prediction P (rows sum to 1, so do Y's)."""
    lam = lam.to(base.dtype)[:, None]
    return lam * base + (1 - lam) * base[partner]


def distilled_targets(fwd, embedder, temperature: float | None = None) -> torch.Tensor:
    """P = softmax(image→text similarity / τ) of the *un-mixed* batch, [B, B] float32, no gradient.

    The embeddings come from ``embedder`` on ``fwd`` (memoised: the consuming objective's own
    un-mixed pass, no extra tower call). They are computed in the caller's grad mode and detached
    here — not under ``no_grad``, which would memoise gradient-free embeddings for the objective's own
    loss. τ: ``temperature`` if given, else the embedder's ``.temperature`` when it has one, else
    0.07 (ALBEF's initial value)."""
    images = embedder.embed_images(fwd).detach().float()
    texts = embedder.embed_texts(fwd).detach().float()
    if temperature is None:
        temperature = getattr(embedder, "temperature", 0.07)
    tau = temperature.detach().float() if isinstance(temperature, torch.Tensor) else float(temperature)
    return torch.softmax(images @ texts.T / tau, dim=1)


class PairMixParams(Params):
    """Params every pair mixer (mixer.mixup, mixer.cutmix) shares: targets and schedule."""

    targets: Literal["onehot", "distilled"] = Field(
        "onehot",
        description="soft targets mix 'onehot' captions (λ·I[i] + (1−λ)·I[p(i)]) or the objective's un-mixed "
        "prediction P ('distilled', as mixer.timix)",
    )
    target_temperature: float | None = Field(None, gt=0, description="τ of P for targets 'distilled' (null: the objective's)")
    ramp_epochs: float = Field(0.0, ge=0, description="γ ramps linearly 0 -> 1 over this many epochs (0: γ = 1)")
    stop_fraction: float = Field(1.0, ge=0, le=1, description="no mixing once training progress ≥ this (1.0: never stop)")
    steps: Literal["summed", "separate"] = Field("summed", description="mixed loss in the main step, or its own optimiser step")
