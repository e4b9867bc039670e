"""What MUG's pieces cost per optimiser step, on graphs/mug.yaml's own towers and data.

    python benchmarks/mug.py [--steps 6] [--repeats 3] [--warmup 1] [--batch-size 64] [--threads N]

The shipped study's four variants (``clip``: ITC; ``mae``: masked image modelling; ``captioner``: a
caption decoder on the full image; ``mug``: MAE + the caption decoder on the masked encoding of the same
forward) are compiled from ``graphs/mug.yaml`` (seed 0, ``train.max_steps`` = K, nothing saved) and run
back to back for K steps per round through ``vlpgraph.execution.train.fit``, so load from other processes on the
machine affects them alike; per-step compute is the ``compute_s`` metric fit logs, the first step of each
fit call (fresh AdamW state) left out. Printed:

- each variant's median ms/step and its ratio to ``clip`` (median over rounds of the per-round ratio):
  the MAE encoder sees 25% of the patches (+ CLS), so an MAE step should cost less than an ITC step on
  the same tower, which encodes every patch and a caption besides;
- the caption objective's share of a MUG step: 1 - mae/mug per round (what adding the caption decoder
  on the masked encoding costs, the masked forward being shared);
- the token count the vision tower's blocks see per image in each variant (from a forward hook), which
  is where the MAE saving comes from.

CPU only: on CUDA fit's timers do not synchronise (benchmarks/gpu.py is the GPU check).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vlpgraph.engine.compile import compile_trial
from vlpgraph.engine.sweep import load_experiment
from vlpgraph.execution.train import Hooks, fit

ROOT = Path(__file__).resolve().parents[1]
GRAPH = ROOT / "graphs" / "mug.yaml"
ORDER = ("clip", "mae", "captioner", "mug")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="K: steps per variant per round (default 6)")
    ap.add_argument("--repeats", type=int, default=3, help="R: timed rounds (default 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the graph's train.batch_size")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: CPUs available)")
    return ap.parse_args()


def block_tokens(plan) -> int:
    """Tokens per image entering the vision tower's first block in one training step of this plan."""
    vision = plan.built["vision"]
    seen: list[int] = []
    handle = vision.vit.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    try:
        fit(plan.model, plan.trial.seed, None, Hooks())
    finally:
        handle.remove()
    return seen[0]


def main() -> None:
    args = parse_args()
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    K, R = args.steps, args.repeats
    sets = [("train.max_steps", K), ("train.checkpoint_every", 0), ("train.log_every", 1),
            ("train.warmup_fraction", 0.0)]
    if args.batch_size:
        sets.append(("train.batch_size", args.batch_size))
    with tempfile.TemporaryDirectory(prefix="vlpgraph-mug-bench-") as tmp:
        t0 = time.perf_counter()
        exp = load_experiment(GRAPH, sets=sets)
        plans = {}
        for trial in sorted((t for t in exp.trials if t.seed == 0), key=lambda t: ORDER.index(t.variant)):
            plans[trial.variant] = compile_trial(trial, Path(tmp) / "cache", torch.device("cpu"), log=lambda m: None)
        batch = next(iter(plans.values())).model.params.batch_size
        print(f"{len(plans)} variants of {GRAPH.name} ({', '.join(plans)}) built in {time.perf_counter() - t0:.1f} s; "
              f"batch {batch}; torch {torch.__version__}, {threads} threads "
              f"(CPUs available {len(os.sched_getaffinity(0))}, load average {os.getloadavg()[0]:.1f})")
        tokens = {v: block_tokens(p) for v, p in plans.items()}
        print("tokens per image into the vision blocks: " + ", ".join(f"{v} {n}" for v, n in tokens.items()))
        print(f"alternating: {args.warmup} warm-up + {R} timed rounds, each variant {K} steps per round "
              f"(step 1 of each fit call left out)")

        comp: dict[str, list[float]] = {v: [] for v in plans}
        per_round: dict[str, list[float]] = {v: [] for v in plans}
        for r in range(args.warmup + R):
            line = []
            for variant, plan in plans.items():
                steps: dict[int, float] = {}

                def on_metrics(rows, steps=steps):
                    for row in rows:
                        if row["name"] == "compute_s":
                            steps[row["step"]] = row["value"]

                res = fit(plan.model, plan.trial.seed, None, Hooks(on_metrics=on_metrics))
                assert res.step == K and len(steps) == K, (res.step, len(steps))
                later = [steps[s] for s in sorted(steps)][1:]
                if r >= args.warmup:
                    comp[variant].extend(later)
                    per_round[variant].append(statistics.median(later))
                line.append(f"{variant} {statistics.median(later) * 1e3:.0f}")
            if r >= args.warmup:
                print(f"  round {r - args.warmup + 1}/{R}: median compute ms/step: " + ", ".join(line), flush=True)

    print()
    base = per_round["clip"]
    print(f"{'variant':<11}{'tokens':>7}{'median ms/step':>15}{'min':>8}{'max':>8}{'vs clip':>9}{'min vs min':>12}")
    for variant in plans:
        xs = comp[variant]
        ratio = statistics.median(a / b for a, b in zip(per_round[variant], base))
        lo = min(xs) / min(comp["clip"])
        print(f"{variant:<11}{tokens[variant]:>7}{statistics.median(xs) * 1e3:>15.1f}{min(xs) * 1e3:>8.1f}"
              f"{max(xs) * 1e3:>8.1f}{ratio:>9.3f}{lo:>12.3f}")
    print("vs clip: median over rounds of (variant / clip per-round median); min vs min: fastest step / fastest "
          "clip step (least exposed to load from other processes)")
    share = statistics.median(1 - a / b for a, b in zip(per_round["mae"], per_round["mug"]))
    print(f"\ncaption objective's share of a MUG step (1 - mae/mug, median over rounds): {100 * share:.1f}%")
    print(f"MAE step vs ITC step on the same tower: {statistics.median(a / b for a, b in zip(per_round['mae'], base)):.3f}x"
          f" ({'cheaper' if statistics.median(per_round['mae']) < statistics.median(base) else 'NOT cheaper'})")


if __name__ == "__main__":
    main()
