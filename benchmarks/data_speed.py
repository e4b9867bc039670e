"""How fast dataset.shapes generates and serves samples, against what a training step consumes.

    python benchmarks/data_speed.py [--n 4096] [--repeats 3]

Prints generation images/s at 32 and 64 px (drawing + captions, in memory, and a full build that
also writes the cache), item access and batch access (batch 128 through ``ports.default_collate``)
in samples/s, each as a ratio to 300 samples/s: a CPU training step of the reference model
(ViT + BERT, width 128, depth 4, 32 px) on a 2-core machine. A ratio well above 1 means data never
starves training.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from vlpgraph.nodes.datasets import shapes
from vlpgraph.engine.ports import BuildContext, default_collate

STEP_SAMPLES_PER_S = 300.0


def best_rate(fn, n: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n / best


def row(name: str, rate: float) -> None:
    print(f"{name:<44} {rate:>10,.0f} /s   x{rate / STEP_SAMPLES_PER_S:>7.1f} of a training step")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096, help="images per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"reference: training step consumes {STEP_SAMPLES_PER_S:.0f} samples/s (2-core CPU, 32 px)")
    for size in (32, 64):
        p = shapes.ShapesParams(train_size=args.n, test_size=args.n // 8, image_size=size)
        shapes.generate_split(p, "train", 256)  # warm up
        rate = best_rate(lambda: shapes.generate_split(p, "train", args.n), args.n, args.repeats)
        row(f"generate {size} px (in memory)", rate)

    with tempfile.TemporaryDirectory() as tmp:
        ctx = BuildContext(node="shapes", node_hash="bench", seed=0, cache_root=Path(tmp), log=lambda m: None)
        p = shapes.ShapesParams(train_size=args.n, test_size=args.n // 8, image_size=32)
        t0 = time.perf_counter()
        data = shapes.build(p, {}, ctx)
        row("build 32 px (generate + write cache)", (args.n + args.n // 8) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        data = shapes.build(p, {}, ctx)
        print(f"{'second build (cache hit)':<44} {time.perf_counter() - t0:>10.3f} s")

        ds = data.train
        n = len(ds)
        row("item access ds[i]", best_rate(lambda: [ds[i] for i in range(n)], n, args.repeats))

        def per_item_batches():
            for a in range(0, n, 128):
                default_collate([ds[i] for i in range(a, min(n, a + 128))])

        def batched():
            for a in range(0, n, 128):
                default_collate(ds.__getitems__(list(range(a, min(n, a + 128)))))

        row("batch 128: ds[i] + default_collate", best_rate(per_item_batches, n, args.repeats))
        row("batch 128: ds.__getitems__ + default_collate", best_rate(batched, n, args.repeats))
        loader = torch.utils.data.DataLoader(ds, batch_size=128, shuffle=True, collate_fn=data.collate)
        row("DataLoader(shuffle, batch 128, 0 workers)", best_rate(lambda: [b for b in loader], n, args.repeats))


if __name__ == "__main__":
    main()
