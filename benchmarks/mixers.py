"""What mixing costs per optimiser step: ITC alone vs ITC + mixer.cutmix vs ITC + mixer.timix.

    python benchmarks/mixers.py [--steps 6] [--repeats 3] [--warmup 1] [--batch-size 128]
                                [--train-size 2048] [--mix-calls 50] [--threads N] [--no-pta]

One graph (below, clip_baseline's towers: 32 px images, 4 px patches so S = 8, width 128, depth 4)
expands through its ``sweep.variants`` into the trials compared, each compiled into a temporary
store cache:

- ``itc``:       objective.itc alone
- ``cutmix``:    + mixer.cutmix (mode batch)
- ``timix``:     + head.tpp (middle block) + mixer.timix (area label)
- ``timix_pta``: + objective.pta training the TPP, i.e. the whole TiMix recipe (``--no-pta`` drops it)

Every mixer runs with ``ramp_epochs: 0`` and ``stop_fraction: 1.0`` and ``steps: summed`` so that
every timed step mixes (the defaults would skip step 0 and the last third of the run). Each round
runs every variant for K steps through ``vlpgraph.execution.train.fit`` (``max_steps=K``, nothing saved), the
variants back to back, so load from other processes on the machine affects them alike; per-step
compute is the ``compute_s`` metric fit logs. The first step of each fit call (fresh AdamW state) is
left out. Ratios are variant / itc of the per-round medians, then the median over rounds; on a
shared machine the ratio of the fastest steps is printed too.

The mixing operation alone: ``mixer.mix(fwd, batch, itc)`` timed ``--mix-calls`` times on one
training batch whose un-mixed passes are already memoised in ``fwd`` (the patch scores and the ITC
embeddings, which the step computes anyway), at varying steps (so TiMix draws varying r). Its share
is that time over the variant's median step compute (goal: <= 1%). The extra cost of a mixing step
is mostly the second image-tower pass on the mixed images (and, for TiMix, the TPP head), not the
mixing. CPU only: on CUDA fit's timers do not synchronise.
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
from vlpgraph.engine.ports import Forward
from vlpgraph.engine.sweep import load_experiment
from vlpgraph.execution.train import Collate, Hooks, fit, to_device

GRAPH = """\
graph: mixer_bench
seed: 0
nodes:
  shapes:
    kind: dataset.shapes
    params: {{train_size: {train_size}, test_size: 64, image_size: 32, caption_noise: 0.3}}
  vision:
    kind: encoder.vit
    params: {{image_size: 32, patch_size: 4, width: 128, depth: 4, heads: 2}}
  text:
    kind: encoder.text
    inputs: {{data: shapes}}
    params: {{width: 128, depth: 4, heads: 2, max_len: 32}}
  itc:
    kind: objective.itc
    inputs: {{vision: vision, text: text}}
    params: {{embed_dim: 128}}
  train:
    kind: trainer
    inputs: {{data: shapes, objectives: [itc]}}
    params: {{batch_size: {batch_size}, max_steps: {steps}, warmup_steps: 1, log_every: 1, checkpoint_every: 0}}
sweep:
  variants:
    itc: {{}}
    cutmix:
      nodes:
        mix: {{kind: mixer.cutmix, params: {{ramp_epochs: 0.0, stop_fraction: 1.0}}}}
        itc: {{inputs: {{mixer: mix}}}}
    timix:
      nodes:
        tpp: {{kind: head.tpp, inputs: {{vision: vision, text: text}}}}
        mix: {{kind: mixer.timix, inputs: {{scorer: tpp}}, params: {{ramp_epochs: 0.0, stop_fraction: 1.0}}}}
        itc: {{inputs: {{mixer: mix}}}}
{pta}"""

PTA_VARIANT = """\
    timix_pta:
      nodes:
        tpp: {kind: head.tpp, inputs: {vision: vision, text: text}}
        pta: {kind: objective.pta, inputs: {tpp: tpp, data: shapes}}
        mix: {kind: mixer.timix, inputs: {scorer: tpp}, params: {ramp_epochs: 0.0, stop_fraction: 1.0}}
        itc: {inputs: {mixer: mix}}
        train: {inputs: {objectives: [pta, itc]}}
"""


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="K: steps per variant per round (default 6)")
    ap.add_argument("--repeats", type=int, default=3, help="R: timed rounds (default 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--train-size", type=int, default=2048)
    ap.add_argument("--mix-calls", type=int, default=50, help="timed mixer.mix calls per mixer (default 50)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: CPUs available)")
    ap.add_argument("--no-pta", action="store_true", help="leave out the timix_pta variant")
    return ap.parse_args()


def time_mix(job, itc, n_calls: int) -> list[float]:
    """Seconds per ``mixer.mix`` call on one training batch with the un-mixed passes memoised."""
    mixer = itc.mixer
    collate = Collate(job.data.collate, job.tokenizer)
    batch = to_device(collate([job.data.train[i] for i in range(job.params.batch_size)]), job.device)
    batch.update(progress=0.1, step=0, total_steps=10**6, steps_per_epoch=100)
    fwd = Forward(batch)
    itc.embed_images(fwd), itc.embed_texts(fwd)
    if mixer.mix(fwd, batch, itc) is None:  # also memoises the patch scores
        raise SystemExit("the mixer did not mix; the benchmark's params should make it mix every step")
    times = []
    for k in range(n_calls):
        batch["step"] = 1000 + k  # fresh draws (TiMix: r) on every call
        t = time.perf_counter()
        out = mixer.mix(fwd, batch, itc)
        times.append(time.perf_counter() - t)
        assert out is not None
    return times


def main() -> None:
    args = parse_args()
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    K, R = args.steps, args.repeats
    text = GRAPH.format(train_size=args.train_size, batch_size=args.batch_size, steps=K,
                        pta="" if args.no_pta else PTA_VARIANT)

    with tempfile.TemporaryDirectory(prefix="vlpgraph-mixers-") as tmp:
        path = Path(tmp) / "mixer_bench.yaml"
        path.write_text(text)
        t0 = time.perf_counter()
        exp = load_experiment(path)
        plans = {}
        for trial in exp.trials:
            plans[trial.variant] = compile_trial(trial, Path(tmp) / "cache", torch.device("cpu"), log=lambda m: None)
        print(f"{len(plans)} variants ({', '.join(plans)}) built in {time.perf_counter() - t0:.1f} s; "
              f"batch {args.batch_size}, 32 px images, S = 8; torch {torch.__version__}, {threads} threads "
              f"(CPUs available {len(os.sched_getaffinity(0))}, load average {os.getloadavg()[0]:.1f})")
        print(f"alternating: {args.warmup} warm-up + {R} timed rounds, each variant {K} steps per round "
              f"(step 1 of each fit call left out)")

        comp: dict[str, list[float]] = {v: [] for v in plans}
        per_round: dict[str, list[float]] = {v: [] for v in plans}
        for r in range(args.warmup + R):
            record = r >= args.warmup
            line = []
            for variant, plan in plans.items():
                steps: dict[int, float] = {}

                def on_metrics(rows, steps=steps):
                    for row in rows:
                        if row["name"] == "compute_s":
                            steps[row["step"]] = row["value"]

                res = fit(plan.model, plan.trial.seed, None, Hooks(on_metrics=on_metrics))
                assert res.step == K and len(steps) == K
                if "mix_itc" not in res.last_losses and variant != "itc":
                    raise SystemExit(f"variant {variant}: no 'mix_itc' term at the last step; it did not mix")
                later = [steps[s] for s in sorted(steps)][1:]
                if record:
                    comp[variant].extend(later)
                    per_round[variant].append(statistics.median(later))
                line.append(f"{variant} {statistics.median(later) * 1e3:.0f}")
            if record:
                print(f"  round {r - args.warmup + 1}/{R}: median compute ms/step: " + ", ".join(line), flush=True)

        mix_times = {}
        for variant, plan in plans.items():
            itc = plan.model.objectives["itc"]
            if itc.mixer is not None:
                mix_times[variant] = time_mix(plan.model, itc, args.mix_calls)

    print()
    base_rounds = per_round["itc"]
    print(f"{'variant':<11}{'median ms/step':>15}{'min':>8}{'max':>8}{'vs itc':>8}{'min vs min':>12}")
    for variant in plans:
        xs = comp[variant]
        ratio = statistics.median(a / b for a, b in zip(per_round[variant], base_rounds))
        lo = min(xs) / min(comp["itc"])
        print(f"{variant:<11}{statistics.median(xs) * 1e3:>15.1f}{min(xs) * 1e3:>8.1f}{max(xs) * 1e3:>8.1f}{ratio:>8.3f}{lo:>12.3f}")
    print("vs itc: median over rounds of (variant / itc per-round median); min vs min: fastest step / fastest "
          "itc step (least exposed to load from other processes)")
    print()
    print("mixer.mix alone (un-mixed passes memoised), vs the same variant's median step compute:")
    for variant, times in mix_times.items():
        med = statistics.median(times)
        step = statistics.median(comp[variant])
        share = med / step
        print(f"  {variant:<10} {med * 1e3:7.3f} ms per call (min {min(times) * 1e3:.3f}, {len(times)} calls) = "
              f"{100 * share:.2f}% of a {step * 1e3:.0f} ms step  (goal <= 1%: {'met' if share <= 0.01 else 'NOT met'})")


if __name__ == "__main__":
    main()
