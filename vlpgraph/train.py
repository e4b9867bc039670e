"""The training loop: one trial's TrainJob -> trained modules, with checkpoints, resume and a NaN guard.

Read top to bottom: set up the optimiser and schedule, restore the last checkpoint if there is one,
then for each step: batch -> Forward -> every objective's named terms -> weighted sum -> backward ->
clip -> step. Metrics go out through ``Hooks`` (the runner writes them to the store), so this module
knows nothing about the store or the command line.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from safetensors.torch import load_model, save_model
from torch import nn
from torch.utils.data import DataLoader, Sampler

from vlpgraph.errors import TrialFailed, UserError
from vlpgraph.ports import Forward, Model, Tokenizer


# ------------------------------------------------------------------------------------------ data


class EpochBatches(Sampler):
    """Index batches for steps ``start_step .. total_steps``: epoch e is a permutation seeded by
    (seed, e), so resuming at step s replays exactly the batches an uninterrupted run would see.
    Under torchrun each rank takes its slice of the global batch."""

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int, total_steps: int, rank: int = 0, world: int = 1):
        self.n, self.bs, self.seed = n, batch_size, seed
        self.start, self.total, self.rank, self.world = start_step, total_steps, rank, world
        self.per_epoch = n // (batch_size * world)

    def __len__(self) -> int:
        return self.total - self.start

    def __iter__(self):
        perm, perm_epoch = None, -1
        global_bs = self.bs * self.world
        for step in range(self.start, self.total):
            epoch, k = divmod(step, self.per_epoch)
            if epoch != perm_epoch:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                perm, perm_epoch = torch.randperm(self.n, generator=g), epoch
            lo = k * global_bs + self.rank * self.bs
            yield perm[lo : lo + self.bs].tolist()


class Collate:
    """Dataset items -> batch dict, with the captions tokenised (picklable, for worker processes)."""

    def __init__(self, collate: Callable[[list[dict]], dict], tokenizer: Tokenizer | None):
        self.collate, self.tokenizer = collate, tokenizer

    def __call__(self, items: list[dict]) -> dict:
        batch = self.collate(items)
        if self.tokenizer is not None and "captions" in batch:
            batch.update(self.tokenizer(batch["captions"]))
        return batch


def to_device(batch: dict, device: torch.device) -> dict:
    nb = device.type == "cuda"
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device, non_blocking=nb)
        elif isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
            out[k] = [t.to(device, non_blocking=nb) for t in v]
        else:
            out[k] = v
    return out


# ------------------------------------------------------------------------------------ checkpoints


class Checkpointer:
    """``dir/step-XXXXXXXX/{model.safetensors,state.pt,meta.json}`` plus ``dir/latest`` naming the last
    complete one. A checkpoint is written under a temporary name and renamed, and ``latest`` is
    replaced atomically, so a kill at any moment never leaves a partial checkpoint that looks complete."""

    def __init__(self, directory: Path, keep: int = 1):
        self.dir = Path(directory)
        self.keep = keep

    def latest(self) -> Path | None:
        pointer = self.dir / "latest"
        if not pointer.exists():
            return None
        path = self.dir / pointer.read_text().strip()
        return path if (path / "meta.json").exists() else None

    def save(self, step: int, modules: nn.Module, optimizer, scheduler, meta: dict) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"step-{step:08d}"
        tmp = self.dir / f".tmp-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_model(modules, str(tmp / "model.safetensors"))  # handles towers shared by several objectives
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state()}
        torch.save(state, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}))
        final = self.dir / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer_tmp = self.dir / f".latest-{os.getpid()}"
        pointer_tmp.write_text(name)
        os.replace(pointer_tmp, self.dir / "latest")
        for old in sorted(self.dir.glob("step-*"))[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load_weights(self, modules: nn.Module, path: Path | None = None) -> dict:
        path = path or self.latest()
        if path is None:
            raise FileNotFoundError(f"no checkpoint in {self.dir}")
        try:  # strict: safetensors itself accounts for tensors shared by two names
            load_model(modules, str(path / "model.safetensors"), strict=True)
        except RuntimeError as e:
            raise TrialFailed(f"checkpoint {path} does not match the model: {str(e)[:300]}") from None
        return json.loads((path / "meta.json").read_text())

    def load(self, modules: nn.Module, optimizer, scheduler, device: torch.device) -> dict:
        path = self.latest()
        meta = self.load_weights(modules, path)
        state = torch.load(path / "state.pt", map_location=device, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"].cpu())
        return meta


# ------------------------------------------------------------------------------------ the loop


@dataclass
class Hooks:
    """Where the loop reports; every hook is optional."""

    on_metrics: Callable[[list[dict]], None] = lambda rows: None
    on_resume: Callable[[int], None] = lambda step: None
    on_step: Callable[[int, int, float, float], None] = lambda step, total, loss, sps: None
    on_eval: Callable[[int], None] = lambda step: None
    # polled after every step: True asks the loop to checkpoint and raise errors.Interrupted
    should_stop: Callable[[], bool] = lambda: False
    # a one-line note for the user (a warning about the schedule, say); the runner prints it
    on_note: Callable[[str], None] = lambda message: None


@dataclass
class FitResult:
    step: int
    wall_s: float
    train_samples: int
    resumed_from: int = 0
    last_losses: dict[str, float] = field(default_factory=dict)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def param_groups(modules: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norm weights and scalars (temperatures), as in OpenCLIP."""
    decay, no_decay, seen = [], [], set()
    for name, p in modules.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if p.ndim < 2 or "norm" in name or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_with_warmup(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def autocast_for(precision: str, device: torch.device):
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def plan_steps(n_train: int, batch_size: int, world: int, epochs: float, max_steps: int | None) -> tuple[int, int]:
    per_epoch = n_train // (batch_size * world)
    if per_epoch == 0:
        raise UserError(f"trainer: batch_size {batch_size} x {world} process(es) is larger than the training set ({n_train} samples)")
    total = max(1, math.ceil(epochs * per_epoch))
    return per_epoch, min(total, max_steps) if max_steps else total


def _group_terms(objectives: dict, batch: dict, group: str, precision: str, device: torch.device, single: bool) -> dict:
    """Weighted loss terms of the objectives in ``group``, from a fresh Forward (weights may have
    changed since the previous group's step)."""
    terms: dict[str, torch.Tensor] = {}
    with autocast_for(precision, device):
        fwd = Forward(batch)
        for obj in objectives.values():
            if group not in getattr(obj, "step_groups", ("main",)):
                continue
            out = obj(fwd, batch) if single else obj(fwd, batch, group=group)
            for term, value in out.items():
                terms[term] = terms.get(term, 0) + obj.weight * value
    return terms


def fit(job: Model, seed: int, checkpoints: Checkpointer | None, hooks: Hooks | None = None) -> FitResult:
    """Train ``job`` (a trainer node's output) in place; resume from ``checkpoints`` if it has one."""
    hooks = hooks or Hooks()
    p = job.params
    device = job.device
    rank, world = _world()
    modules = job.modules.to(device).train()
    optimizer = torch.optim.AdamW(param_groups(modules, p.weight_decay), lr=p.lr, betas=tuple(p.betas))
    per_epoch, total = plan_steps(len(job.data.train), p.batch_size, world, p.epochs, p.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(p.warmup_steps, total, p.min_lr_ratio))

    start, wall_before = 0, 0.0
    if checkpoints is not None and checkpoints.latest() is not None:
        meta = checkpoints.load(modules, optimizer, scheduler, device)
        start, wall_before = int(meta["step"]), float(meta.get("wall_s", 0.0))
        hooks.on_resume(start)
    else:
        torch.manual_seed(seed)

    loader = DataLoader(
        job.data.train,
        batch_sampler=EpochBatches(len(job.data.train), p.batch_size, seed, start, total, rank, world),
        collate_fn=Collate(job.data.collate, job.tokenizer),
        num_workers=p.num_workers,
        pin_memory=device.type == "cuda",
    )
    params = [q for g in optimizer.param_groups for q in g["params"]]
    t_start = time.perf_counter()
    window: dict[str, float] = {}
    n_window, data_wait, compute = 0, 0.0, 0.0
    step = start
    last: dict[str, float] = {}

    def wall() -> float:
        return wall_before + time.perf_counter() - t_start

    def save(step: int) -> None:
        if checkpoints is not None and rank == 0:
            checkpoints.save(step, modules, optimizer, scheduler, {"wall_s": wall(), "total_steps": total})

    groups = list(dict.fromkeys(g for obj in job.objectives.values() for g in getattr(obj, "step_groups", ("main",))))
    it = iter(loader)
    while step < total:
        t0 = time.perf_counter()
        batch = to_device(next(it), device)
        batch.update(progress=step / total, step=step, total_steps=total, steps_per_epoch=per_epoch)
        t1 = time.perf_counter()
        step_terms: dict[str, torch.Tensor] = {}
        for group in groups:  # one optimiser step per group; usually a single "main" group
            terms = _group_terms(job.objectives, batch, group, p.precision, device, single=len(groups) == 1)
            if not terms:  # e.g. a mixer that is off for this step
                continue
            loss = sum(terms.values())
            if not torch.isfinite(loss):
                parts = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items())
                raise TrialFailed(f"loss is {float(loss.detach())} at step {step} ({parts}); lower trainer.lr or check the data")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:  # average gradients across ranks (towers are called through Forward, not a DDP wrapper)
                for q in params:
                    if q.grad is not None:
                        dist.all_reduce(q.grad, op=dist.ReduceOp.AVG)
            if p.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, p.grad_clip)
            optimizer.step()
            step_terms.update({k: v.detach() for k, v in terms.items()})
        scheduler.step()
        terms = step_terms
        loss = sum(terms.values())
        step += 1
        t2 = time.perf_counter()
        data_wait += t1 - t0
        compute += t2 - t1
        n_window += 1
        window["loss"] = window.get("loss", 0.0) + float(loss)
        for k, v in terms.items():
            window[k] = window.get(k, 0.0) + float(v)

        if step % p.log_every == 0 or step == total:
            sps = n_window * p.batch_size * world / max(1e-9, data_wait + compute)
            last = {k: v / n_window for k, v in window.items()}
            epoch = step / per_epoch
            rows = [dict(step=step, epoch=epoch, name=k, value=v, wall_s=wall()) for k, v in last.items()]
            extra = {"lr": scheduler.get_last_lr()[0], "samples_per_s": sps, "data_wait_s": data_wait, "compute_s": compute}
            rows += [dict(step=step, epoch=epoch, name=k, value=v, wall_s=wall()) for k, v in extra.items()]
            if rank == 0:
                hooks.on_metrics(rows)
            hooks.on_step(step, total, last["loss"], sps)
            window, n_window, data_wait, compute = {}, 0, 0.0, 0.0
        if p.checkpoint_every and step % p.checkpoint_every == 0 and step < total:
            save(step)
        if p.eval_every and step % p.eval_every == 0 and step < total:
            hooks.on_eval(step)
            modules.train()
    if start < total or checkpoints is None or checkpoints.latest() is None:
        save(step)
    n_samples = len(job.data.train)
    return FitResult(step=step, wall_s=wall(), train_samples=n_samples, resumed_from=start, last_losses=last)
