"""What an LCL step costs next to a CLIP step at equal image counts, and the language model's share of it,
on graphs/lcl.yaml's own towers and data.

    python benchmarks/lcl.py [--steps 6] [--repeats 3] [--warmup 1] [--threads N]

Three variants of ``graphs/lcl.yaml`` (seed 0, ``train.max_steps`` = K, nothing saved) — ``clip`` (ITC on
64 pairs a step), ``lcl_pairs`` (objective.lcl on documents of one image, 64 a step) and ``lcl`` (on
interleaved documents of 1-6 images, 18 a step: ~63 images) — run back to back for K steps per round
through ``vlpgraph.execution.train.fit``, so load from other processes affects them alike; per-step compute is the
``compute_s`` metric fit logs, the first step of each fit call (fresh AdamW state) left out. Images per
step are counted at the vision tower's input (a forward hook), so the comparison is per image as well
as per step. Printed:

- each variant's median ms/step, images/step, ms/image, and ms/image relative to ``clip``;
- the language model's share of an LCL step: the LM's forward, its output layer, the generation
  cross-entropy and the backward through them, timed alone on the very inputs it got in that step
  (its input embeddings captured by a hook, detached, with requires_grad so the backward runs to them)
  over the whole step's compute time; the rest is the vision tower, the pooler, the contrastive heads,
  the sequence building and the optimiser.

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
import torch.nn.functional as F

from vlpgraph.engine.compile import compile_trial
from vlpgraph.engine.sweep import load_experiment
from vlpgraph.execution.train import Hooks, fit

ROOT = Path(__file__).resolve().parents[1]
GRAPH = ROOT / "graphs" / "lcl.yaml"
ORDER = ("clip", "lcl_pairs", "lcl")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="K: steps per variant per round (default 6)")
    ap.add_argument("--repeats", type=int, default=3, help="R: timed rounds (default 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: CPUs available)")
    return ap.parse_args()


def lm_seconds(lm, inputs: list[tuple[torch.Tensor, torch.Tensor]], labels: list[torch.Tensor]) -> list[float]:
    """The LM alone on each captured step input: forward, logits, generation CE, backward."""
    out = []
    for (embeds, mask), target in zip(inputs, labels):
        x = embeds.detach().requires_grad_()
        t0 = time.perf_counter()
        hidden = lm(x, mask)
        loss = F.cross_entropy(lm.logits(hidden).flatten(0, 1).float(), target.flatten(), ignore_index=-100)
        loss.backward()
        out.append(time.perf_counter() - t0)
        lm.zero_grad(set_to_none=True)
    return out


def main() -> None:
    args = parse_args()
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    K, R = args.steps, args.repeats
    sets = [("train.max_steps", K), ("train.checkpoint_every", 0), ("train.log_every", 1),
            ("train.warmup_fraction", 0.0)]
    with tempfile.TemporaryDirectory(prefix="vlpgraph-lcl-bench-") as tmp:
        t0 = time.perf_counter()
        exp = load_experiment(GRAPH, sets=sets)
        plans = {}
        for trial in sorted((t for t in exp.trials if t.seed == 0 and t.variant in ORDER),
                            key=lambda t: ORDER.index(t.variant)):
            plans[trial.variant] = compile_trial(trial, Path(tmp) / "cache", torch.device("cpu"), log=lambda m: None)
        print(f"{len(plans)} variants of {GRAPH.name} ({', '.join(plans)}) built in {time.perf_counter() - t0:.1f} s; "
              f"torch {torch.__version__}, {threads} threads (CPUs available {len(os.sched_getaffinity(0))}, "
              f"load average {os.getloadavg()[0]:.1f})")
        print(f"alternating: {args.warmup} warm-up + {R} timed rounds, each variant {K} steps per round "
              f"(step 1 of each fit call left out)")

        comp: dict[str, list[float]] = {v: [] for v in plans}
        images: dict[str, list[int]] = {v: [] for v in plans}
        lm_share: list[float] = []
        for r in range(args.warmup + R):
            line = []
            for variant, plan in plans.items():
                steps: dict[int, float] = {}
                seen: list[int] = []
                captured: list[tuple[torch.Tensor, torch.Tensor]] = []
                labels: list[torch.Tensor] = []

                def on_metrics(rows, steps=steps):
                    for row in rows:
                        if row["name"] == "compute_s":
                            steps[row["step"]] = row["value"]

                vision = plan.built["vision"]
                hooks = [vision.register_forward_pre_hook(lambda m, a, seen=seen: seen.append(a[0].shape[0]))]
                if "lm" in plan.built:
                    lm, obj = plan.built["lm"], plan.built["lcl"]
                    hooks.append(lm.register_forward_pre_hook(
                        lambda m, a, captured=captured: captured.append((a[0].detach().clone(), a[1].clone()))))
                    step_fn = obj.step

                    def spy(fwd, labels=labels, step_fn=step_fn):
                        out = step_fn(fwd)
                        labels.append(out.labels.clone())
                        return out

                    obj.step = spy
                try:
                    res = fit(plan.model, plan.trial.seed, None, Hooks(on_metrics=on_metrics))
                finally:
                    for h in hooks:
                        h.remove()
                    if "lm" in plan.built:
                        del plan.built["lcl"].step  # back to the class's method
                assert res.step == K and len(steps) == K, (res.step, len(steps))
                later = [steps[s] for s in sorted(steps)][1:]
                if r >= args.warmup:
                    comp[variant].extend(later)
                    images[variant].extend(seen[1:K])
                    if variant == "lcl":
                        alone = lm_seconds(plan.built["lm"], captured[1:], labels[1:])
                        lm_share.append(statistics.median(a / b for a, b in zip(alone, later)))
                line.append(f"{variant} {statistics.median(later) * 1e3:.0f}")
            if r >= args.warmup:
                print(f"  round {r - args.warmup + 1}/{R}: median compute ms/step: " + ", ".join(line), flush=True)

    print()
    per_image = {v: statistics.median(t / n for t, n in zip(comp[v], images[v])) for v in plans}
    print(f"{'variant':<11}{'images/step':>12}{'median ms/step':>15}{'ms/image':>10}{'vs clip (per image)':>21}")
    for variant in plans:
        print(f"{variant:<11}{statistics.mean(images[variant]):>12.1f}{statistics.median(comp[variant]) * 1e3:>15.1f}"
              f"{per_image[variant] * 1e3:>10.2f}{per_image[variant] / per_image['clip']:>21.2f}")
    print("ms/image: median over steps of (step compute / images the vision tower saw in it)")
    print(f"\nthe language model's share of an LCL step on interleaved documents (forward, logits, generation CE "
          f"and backward, timed alone on the step's own inputs; median over rounds): {100 * statistics.median(lm_share):.0f}%")


if __name__ == "__main__":
    main()
