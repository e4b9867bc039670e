"""Cross-rank helpers for losses that score the global batch under ``torchrun``.

:func:`gather_with_grad` (equal row counts on every rank; objective.itc) and :func:`gather_rows_with_grad`
(any row count per rank; objective.lcl, whose kept images differ per rank) both keep the gradient: the
autograd-aware all-gather sums, in backward, every rank's gradient for a rank's rows into that rank.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world_size) of the default process group, or (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(features: torch.Tensor) -> torch.Tensor:
    """[B, D] on every rank -> [world*B, D], rank r's rows at ``r*B``; gradient reaches every rank's rows.

    Returns ``features`` unchanged when not distributed. Every rank must pass the same B (the trainer's
    loader drops the last incomplete batch).
    """
    _, size = world()
    if size == 1:
        return features
    from torch.distributed.nn.functional import all_gather  # autograd-aware, unlike dist.all_gather

    # torch 2.14 marks this public function deprecated in favour of a private module
    # (torch.distributed._functional_collectives); keep the public one and silence the notice.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(features), dim=0)


def gather_rows_with_grad(features: torch.Tensor) -> torch.Tensor:
    """[n_r, D] on rank r (n_r may differ, 0 included) -> [sum n_r, D], rank 0's rows first, then rank 1's...;
    gradient reaches every rank's rows.

    Returns ``features`` unchanged when not distributed. The row counts are exchanged first (one small
    all-gather), then every rank's rows, zero-padded to the largest count, go through
    :func:`gather_with_grad` and the padding is cut off again.
    """
    _, size = world()
    if size == 1:
        return features
    count = torch.tensor([features.shape[0]], device=features.device)
    counts = [torch.zeros_like(count) for _ in range(size)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    most = max(counts)
    if most == 0:  # no rank has a row: nothing to gather (every rank takes this branch)
        return features
    padded = torch.cat([features, features.new_zeros(most - features.shape[0], *features.shape[1:])])
    gathered = gather_with_grad(padded)  # [size*most, D]
    return torch.cat([gathered[r * most : r * most + n] for r, n in enumerate(counts)])
