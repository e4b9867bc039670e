"""Run under torchrun by tests/execution/test_train_trust.py: one tiny trial on 2 gloo ranks, where one rank alone
meets a NaN loss (``nan`` mode: NAN_RANK, NAN_STEP) or a stop request (``stop`` mode: STOP_RANK,
STOP_AFTER). Each rank prints what fit() raised, then meets the other at a barrier, as a sweep that
goes on to its next trial would, and prints "done". Usage: python -m tests.execution._dist_job MODE DIR."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from tests.helpers import node, register_vision_objective, tiny_graph
from vlpgraph.engine.compile import compile_trial
from vlpgraph.errors import Interrupted, TrialFailed
from vlpgraph.engine.sweep import load_experiment
from vlpgraph.execution.train import Checkpointer, Hooks, fit


def nan_on_one_rank(image_mean, batch) -> dict:
    """A zero term, NaN on rank NAN_RANK at step NAN_STEP."""
    zero = image_mean * 0.0
    hit = dist.get_rank() == int(os.environ.get("NAN_RANK", -1)) and batch["step"] == int(os.environ.get("NAN_STEP", -1))
    return {"probe": zero * float("nan") if hit else zero}


register_vision_objective("objective.test_nan_on_one_rank", nan_on_one_rank)


def main(mode: str, folder: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    (folder / f"pid{rank}").write_text(str(os.getpid()))  # for the test to kill a hung rank
    torch.set_num_threads(1)
    probe = node("objective.test_nan_on_one_rank", {"vision": "vision"})
    graph = tiny_graph(folder, name=f"rank{rank}.yaml", probe=probe,
                       train={"inputs": {"objectives": ["itc", "probe"]}, "checkpoint_every": 0, "max_steps": 6})
    trial = load_experiment(graph).trials[0]
    plan = compile_trial(trial, folder / "cache", torch.device("cpu"), log=lambda message: None)
    stop_rank, stop_after = int(os.environ.get("STOP_RANK", -1)), int(os.environ.get("STOP_AFTER", 0))
    steps = [0]

    def should_stop() -> bool:
        steps[0] += 1
        return rank == stop_rank and steps[0] >= stop_after

    try:
        fit(plan.model, trial.seed, Checkpointer(folder / "ckpt"), Hooks(should_stop=should_stop))
        print(f"rank {rank}: completed", flush=True)
    except TrialFailed as e:
        print(f"rank {rank}: failed: {e}", flush=True)
    except Interrupted as e:
        print(f"rank {rank}: interrupted at step {e.step}", flush=True)
    dist.barrier()
    print(f"rank {rank}: done", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
