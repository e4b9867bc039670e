"""The device a run trains on and torchrun's processes: joining and leaving the process group, and
the few collectives the sweep needs so that every rank takes rank 0's decisions (rank 0 alone reads
and writes the store). Without torchrun every function here is a no-op on one process."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from vlpgraph.errors import UserError


def resolve_device(name: str) -> torch.device:
    """``--device``'s torch device: auto is CUDA when there is one; under torchrun ``cuda`` is this
    process's GPU (``cuda:$LOCAL_RANK``). UserError when CUDA is asked for and not there."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: CUDA is not available on this machine (use --device cpu or auto)")
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        name = f"cuda:{os.environ['LOCAL_RANK']}"
    return torch.device(name)


def init_distributed(device: torch.device) -> int:
    """Join the torchrun process group when launched by torchrun; returns this process's rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank() if dist.is_initialized() else 0


def shutdown_distributed() -> None:
    """Leave the process group together: no rank tears it down while another still talks to it."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def joined() -> bool:
    """Whether this process is one of several torchrun ranks (in an initialised process group)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """How many processes train each trial (torchrun's world size; 1 without torchrun)."""
    return dist.get_world_size() if joined() else 1


def barrier() -> None:
    """Every rank waits here for the others (nothing to wait for on one process)."""
    if joined():
        dist.barrier()


def from_rank0(value):
    """Rank 0's ``value`` on every rank (the store decisions are rank 0's alone). A collective:
    every rank calls it at the same point."""
    if joined():
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def on_any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is True on any of them, so all ranks leave a loop together.
    A collective: every rank calls it at the same point."""
    if joined():
        box = torch.tensor([1 if flag else 0], device=device)  # nccl needs it on the GPU
        dist.all_reduce(box, op=dist.ReduceOp.MAX)
        return bool(box.item())
    return flag
