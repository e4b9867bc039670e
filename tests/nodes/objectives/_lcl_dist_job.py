"""Run under torchrun by tests/nodes/objectives/test_lcl.py: objective.lcl's contrastive term on 2 gloo ranks, each with
its own documents (tests.test_lcl.RANK_DOCS) and the same weights. Each rank saves its 'lcl_con', how
many of its images have context, and its gradients. Usage: python -m tests.nodes.objectives._lcl_dist_job DIR."""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from tests.nodes.objectives.test_lcl import RANK_DOCS, make_batch, make_lcl, named_grads
from vlpgraph.engine import ports


def main(folder: Path) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        rank = dist.get_rank()
        obj, vision, pool, lm = make_lcl(gen_weight=0.0, con_weight=1.0)  # same seed: same weights everywhere
        batch = make_batch(RANK_DOCS[rank], seed=rank)
        fwd = ports.Forward(batch)
        loss = obj(fwd, batch)["lcl_con"]
        loss.backward()
        torch.save({"loss": loss.detach(), "n_context": obj.step(fwd).has_context.sum(),
                    "grads": named_grads(obj, vision, pool, lm)}, folder / f"rank{rank}.pt")
        dist.barrier()  # neither rank tears gloo down while the other still talks
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
