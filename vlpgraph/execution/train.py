"""The training loop: one trial's TrainJob -> trained modules, with checkpoints, resume and a NaN guard.

Read top to bottom: the data order, the random state a step draws from, checkpoints (verified
before use), then the loop: set up the optimiser and schedule, restore the newest intact checkpoint
if there is one, then for each step: batch -> Forward -> every objective's named terms -> weighted
sum -> (every rank's loss finite?) -> backward -> clip -> step; after it, log, stop if asked
(checkpoint first), checkpoint, evaluate. Metrics and notes go out through ``Hooks`` (the runner
writes them to the store and prints them), so this module knows nothing about the store or the
command line. A resumed run takes exactly the steps the uninterrupted run would have taken.
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
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn
from torch.utils.data import DataLoader, Sampler

from vlpgraph.files.local import sha256_of
from vlpgraph.errors import Interrupted, TrialFailed, UserError
from vlpgraph.engine.ports import Forward, Model, Tokenizer


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


# ----------------------------------------------------------------------------------- random state
# A step draws from torch's global generators: MLM masks and ITM hard negatives (on the CPU, or on the
# GPU for a GPU tensor), dropout (the device's). Mixers draw from generators of their own, seeded by
# (trial seed, node, step), and so does the data loader (see fit), so these are all a step uses. They
# are saved with every checkpoint as they stand after its step, so that a resumed run draws exactly
# what the uninterrupted run drew. Nodes must not draw from Python's `random` or numpy's global state
# (nothing does): those are not saved.


def rng_state(device: torch.device) -> dict:
    """This process's generator states: torch's CPU generator and, on CUDA, the trial's device's."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restores what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def all_rng_states(device: torch.device, world: int) -> list[dict]:
    """Every process's :func:`rng_state`, in rank order (under torchrun a collective: all ranks call it;
    each rank's draws differ with its data, so each resumes from its own)."""
    mine = rng_state(device)
    if world == 1:
        return [mine]
    states: list = [None] * world
    dist.all_gather_object(states, mine)
    return states


# ------------------------------------------------------------------------------------ checkpoints


def file_record(path: Path) -> dict:
    """{"bytes": size, "sha256": hex digest} of one file, as a checkpoint's meta.json records it."""
    return {"bytes": path.stat().st_size, "sha256": sha256_of(path)}


class Checkpointer:
    """``dir/step-XXXXXXXX/{model.safetensors,state.pt,meta.json}`` plus ``dir/latest`` naming the last
    complete one. A checkpoint is written under a temporary name and renamed, and ``latest`` is
    replaced atomically, so a kill at any moment never leaves a partial checkpoint that looks complete.

    meta.json, written last, records each file's size and sha256, so a file damaged afterwards (a
    full disk, a copy cut short) is recognised before it is read: :meth:`last_good` sets a damaged
    checkpoint aside as ``.damaged-step-XXXXXXXX`` (never deleted) and falls back to the one before.
    The ``keep`` newest checkpoints are kept so that there is one to fall back to."""

    FILES = ("model.safetensors", "state.pt")

    def __init__(self, directory: Path, keep: int = 2):
        self.dir = Path(directory)
        self.keep = keep

    def latest(self) -> Path | None:
        """The checkpoint ``latest`` points to, if it is complete (not verified: see :meth:`last_good`)."""
        pointer = self.dir / "latest"
        if not pointer.exists():
            return None
        path = self.dir / pointer.read_text().strip()
        return path if (path / "meta.json").exists() else None

    def save(self, step: int, modules: nn.Module, optimizer, scheduler, meta: dict, rng: list[dict]) -> Path:
        """Writes the checkpoint of ``step``; ``rng`` holds each process's generator states (see rng_state)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"step-{step:08d}"
        tmp = self.dir / f".tmp-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_model(modules, str(tmp / "model.safetensors"))  # handles towers shared by several objectives
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng}
        torch.save(state, tmp / "state.pt")
        files = {f: file_record(tmp / f) for f in self.FILES}
        (tmp / "meta.json").write_text(json.dumps({"step": step, **meta, "files": files}))
        final = self.dir / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        self._point_to(final)
        for old in self._steps()[self.keep :]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def last_good(self, note: Callable[[str], None]) -> Path | None:
        """The newest checkpoint that passes :meth:`damage`, or None. Each damaged one on the way is
        renamed ``.damaged-<name>`` and reported through ``note``; ``latest`` is repointed to the
        good one (removed when there is none)."""
        good, damaged = None, []
        for path in self._steps():
            problem = self.damage(path)
            if problem is None:
                good = path
                break
            damaged.append((path, problem, self._set_aside(path)))
        then = f"resuming from {good.name}" if good else "starting the trial from scratch"
        for path, problem, aside in damaged:
            note(f"checkpoint {path} is damaged ({problem}); set aside as {aside.name}, {then}")
        if good is not None:
            self._point_to(good)
        else:
            (self.dir / "latest").unlink(missing_ok=True)
        return good

    def damage(self, path: Path) -> str | None:
        """What is wrong with the checkpoint at ``path`` (one line), or None when it is intact."""
        try:
            meta = json.loads((path / "meta.json").read_text())
            int(meta["step"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"meta.json unreadable: {type(e).__name__}: {e}"
        recorded = meta.get("files")
        for name in self.FILES:
            file = path / name
            if not file.is_file():
                return f"{name} is missing"
            if recorded is None:
                continue
            want = recorded.get(name, {})
            size = file.stat().st_size
            if size != want.get("bytes"):
                return f"{name} has {size} bytes, {want.get('bytes')} were written"
            if file_record(file)["sha256"] != want.get("sha256"):
                return f"{name} does not match its sha256"
        if recorded is None:  # written before checksums were recorded: check that the files parse
            try:
                with safe_open(str(path / "model.safetensors"), "pt"):
                    pass
                torch.load(path / "state.pt", map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - any reason it cannot be read makes it unusable
                return f"cannot be read: {type(e).__name__}: {str(e)[:200]}"
        return None

    def load_weights(self, modules: nn.Module, path: Path | None = None) -> dict:
        """Loads the model weights of ``path`` (default: latest) into ``modules``; returns its meta."""
        path = path or self.latest()
        if path is None:
            raise FileNotFoundError(f"no checkpoint in {self.dir}")
        try:  # strict: safetensors itself accounts for tensors shared by two names
            load_model(modules, str(path / "model.safetensors"), strict=True)
        except RuntimeError as e:
            raise TrialFailed(f"checkpoint {path} does not match the model: {str(e)[:300]}") from None
        return json.loads((path / "meta.json").read_text())

    def load(self, path: Path, modules: nn.Module, optimizer, scheduler, device: torch.device, rank: int = 0) -> dict:
        """Restores weights, optimiser, schedule and this process's generators from ``path``."""
        meta = self.load_weights(modules, path)
        state = torch.load(path / "state.pt", map_location=device, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rng = state["rng"]
        if isinstance(rng, torch.Tensor):  # written before every generator was saved: the CPU one only
            torch.set_rng_state(rng.cpu())
        else:
            set_rng_state(rng[rank] if rank < len(rng) else rng[0], device)
        return meta

    def _steps(self) -> list[Path]:
        """Complete-looking checkpoints, newest first."""
        return sorted((p for p in self.dir.glob("step-*") if p.is_dir()), reverse=True)

    def _point_to(self, path: Path) -> None:
        pointer_tmp = self.dir / f".latest-{os.getpid()}"
        pointer_tmp.write_text(path.name)
        os.replace(pointer_tmp, self.dir / "latest")

    def _set_aside(self, path: Path) -> Path:
        aside, n = self.dir / f".damaged-{path.name}", 1
        while aside.exists():
            aside, n = self.dir / f".damaged-{path.name}-{n}", n + 1
        os.replace(path, aside)
        return aside


# ------------------------------------------------------------------------------------ the loop


@dataclass
class Hooks:
    """Where the loop reports; every hook is optional."""

    on_metrics: Callable[[list[dict]], None] = lambda rows: None
    on_resume: Callable[[int], None] = lambda step: None
    on_step: Callable[[int, int, float, float], None] = lambda step, total, loss, sps: None
    on_eval: Callable[[int], None] = lambda step: None  # the runner evaluates on rank 0 only
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


def plan_warmup(warmup_steps: int, warmup_fraction: float | None, total: int) -> int:
    """Warmup steps of a trial of ``total`` steps: ``warmup_fraction`` of them when given, else ``warmup_steps``."""
    return warmup_steps if warmup_fraction is None else round(warmup_fraction * total)


def warmup_warning(warmup: int, total: int, lr: float) -> str | None:
    """A one-line warning when warmup takes more than half of the trial, else None."""
    if 2 * warmup <= total:
        return None
    message = f"trainer: warmup is {warmup} of this trial's {total} steps ({warmup / total:.0%})"
    if warmup > total:
        message += f"; the learning rate never reaches its peak lr {lr:g} (it ends at {total / warmup:.0%} of it)"
    return message


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


# Under torchrun every process runs this loop, and every collective (gradient all-reduce, feature
# gathers) must be entered by all of them in the same order. So no process may leave a step alone:
# a NaN, a stop request or an evaluation on rank 0 is made known to every rank first.


def any_rank(flag: bool, device: torch.device, world: int) -> bool:
    """True on every process when ``flag`` is True on any of them (a collective when world > 1)."""
    if world == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def check_finite(loss: torch.Tensor, terms: dict, step: int, world: int) -> None:
    """Raises TrialFailed, on every process together, when the loss is not finite on any of them.
    Called before backward, so no process is left waiting in the gradient all-reduce."""
    message = None
    if not torch.isfinite(loss):
        parts = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items())
        message = f"loss is {float(loss.detach())} at step {step} ({parts}); lower trainer.lr or check the data"
    if world == 1:
        if message:
            raise TrialFailed(message)
        return
    if not any_rank(message is not None, loss.device, world):
        return
    messages: list = [None] * world
    dist.all_gather_object(messages, message)
    rank, first = next((r, m) for r, m in enumerate(messages) if m)
    raise TrialFailed(f"{first} (process {rank} of {world})")


def check_same_plan(meta: dict, path: Path, total: int, world: int) -> None:
    """Refuse to resume from a checkpoint of another step plan: written by another number of processes
    (the global batch is batch_size × processes) or for another step count. Its steps and this run's
    would make one trial of two experiments; trial identity does not include the process count."""
    was_world, was_total = meta.get("processes"), meta.get("total_steps")
    if was_world is not None and int(was_world) != world:
        raise TrialFailed(f"the checkpoint {path} was written by {was_world} process(es) and this run has {world}: "
                          f"resuming would change the global batch mid-trial. Run it with {was_world} process(es), "
                          "or delete the trial's checkpoints to train it from the start")
    if was_total is not None and int(was_total) != total:
        raise TrialFailed(f"the checkpoint {path} belongs to a run of {was_total} steps and this one plans {total} "
                          "(another training set size?): resuming would mix two schedules. Delete the trial's "
                          "checkpoints to train it from the start")


def find_checkpoint(checkpoints: Checkpointer | None, note: Callable[[str], None], rank: int, world: int) -> Path | None:
    """The checkpoint to resume from: rank 0 verifies and sets damaged ones aside, every rank gets its answer."""
    if checkpoints is None:
        return None
    found = [checkpoints.last_good(note) if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(found, src=0)
    return found[0]


def fit(job: Model, seed: int, checkpoints: Checkpointer | None, hooks: Hooks | None = None) -> FitResult:
    """Train ``job`` (a trainer node's output) in place; resume from ``checkpoints`` if it has a good one.

    Raises TrialFailed when the loss is not finite, and errors.Interrupted (after a checkpoint at the
    step reached) when ``hooks.should_stop()`` turned True."""
    hooks = hooks or Hooks()
    p = job.params
    device = job.device
    rank, world = _world()
    modules = job.modules.to(device).train()
    optimizer = torch.optim.AdamW(param_groups(modules, p.weight_decay), lr=p.lr, betas=tuple(p.betas))
    per_epoch, total = plan_steps(len(job.data.train), p.batch_size, world, p.epochs, p.max_steps)
    warmup = plan_warmup(p.warmup_steps, p.warmup_fraction, total)
    if note := warmup_warning(warmup, total, p.lr):
        hooks.on_note(note)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(warmup, total, p.min_lr_ratio))

    # training metrics are averaged over log_every steps; a checkpoint carries the unfinished window
    window: dict[str, float] = {}
    n_window, data_wait, compute = 0, 0.0, 0.0
    start, wall_before = 0, 0.0
    path = find_checkpoint(checkpoints, hooks.on_note, rank, world)
    if path is not None:
        meta = checkpoints.load(path, modules, optimizer, scheduler, device, rank)
        check_same_plan(meta, path, total, world)
        start, wall_before = int(meta["step"]), float(meta.get("wall_s", 0.0))
        logged = meta.get("log_window", {})
        window, n_window = dict(logged.get("sums", {})), int(logged.get("n", 0))
        data_wait, compute = float(logged.get("data_wait_s", 0.0)), float(logged.get("compute_s", 0.0))
        hooks.on_resume(start)
    else:
        torch.manual_seed(seed)  # the CPU generator and every CUDA device's

    loader = DataLoader(
        job.data.train,
        batch_sampler=EpochBatches(len(job.data.train), p.batch_size, seed, start, total, rank, world),
        collate_fn=Collate(job.data.collate, job.tokenizer),
        num_workers=p.num_workers,
        pin_memory=device.type == "cuda",
        # its own generator: the loader draws a seed when its iterator starts, which must not move the
        # global one the objectives draw from (it would start at a different step after a resume)
        generator=torch.Generator().manual_seed(seed),
    )
    params = [q for g in optimizer.param_groups for q in g["params"]]
    t_start = time.perf_counter()
    step = start
    last: dict[str, float] = {}

    def wall() -> float:
        return wall_before + time.perf_counter() - t_start

    def save(step: int) -> None:
        if checkpoints is None:
            return
        rng = all_rng_states(device, world)  # every rank's, as they stand after this step
        if rank == 0:
            log_window = {"sums": window, "n": n_window, "data_wait_s": data_wait, "compute_s": compute}
            meta = {"wall_s": wall(), "total_steps": total, "processes": world, "log_window": log_window}
            checkpoints.save(step, modules, optimizer, scheduler, meta, rng)
        if world > 1:
            dist.barrier()  # no rank goes on (or leaves) before the checkpoint is written

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
            check_finite(loss, terms, step, world)
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
        lr = scheduler.get_last_lr()[0]  # the rate this step used; scheduler.step() sets the next one
        scheduler.step()
        terms = step_terms
        loss = sum(terms.values())
        step += 1
        # float() waits for the device, so on CUDA compute_s covers the step's kernels, not only their launch
        values = {"loss": float(loss), **{k: float(v) for k, v in terms.items()}}
        t2 = time.perf_counter()
        data_wait += t1 - t0
        compute += t2 - t1
        n_window += 1
        for k, v in values.items():
            window[k] = window.get(k, 0.0) + v

        if step % p.log_every == 0 or step == total:
            sps = n_window * p.batch_size * world / max(1e-9, data_wait + compute)
            last = {k: v / n_window for k, v in window.items()}
            epoch = step / per_epoch
            rows = [dict(step=step, epoch=epoch, name=k, value=v, wall_s=wall()) for k, v in last.items()]
            extra = {"lr": lr, "samples_per_s": sps, "data_wait_s": data_wait, "compute_s": compute}
            rows += [dict(step=step, epoch=epoch, name=k, value=v, wall_s=wall()) for k, v in extra.items()]
            if rank == 0:
                hooks.on_metrics(rows)
            hooks.on_step(step, total, last["loss"], sps)
            window, n_window, data_wait, compute = {}, 0, 0.0, 0.0
        if any_rank(hooks.should_stop(), device, world):  # a signal: finish here, resumable at this step
            save(step)
            raise Interrupted(step)
        if p.checkpoint_every and step % p.checkpoint_every == 0 and step < total:
            save(step)
        if p.eval_every and step % p.eval_every == 0 and step < total:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                hooks.on_eval(step)  # whatever an evaluation draws is not taken from training's generators
            modules.train()
            if world > 1:
                dist.barrier()  # the runner evaluates on rank 0: the others wait here, not in a collective
    if start < total:
        save(step)
    n_samples = len(job.data.train)
    return FitResult(step=step, wall_s=wall(), train_samples=n_samples, resumed_from=start, last_losses=last)
