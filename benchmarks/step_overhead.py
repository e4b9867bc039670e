"""What the engine's training loop costs on top of a hand-written PyTorch loop, per optimiser step.

    python benchmarks/step_overhead.py [--graph graphs/clip_baseline.yaml] [--set node.param=value ...]
                                       [--steps 10] [--repeats 5] [--warmup 1] [--batch-size N] [--threads N]

One trial of the graph (the first one it expands to) is compiled into a temporary store cache. Both
sides then train the *same* modules (``plan.model.modules``: the towers and the ITC projections and
temperature) on the same batches (the same ``EpochBatches`` sampler, ``Collate`` and DataLoader
settings, so repeat r of either side sees the same K batches) with the same AdamW settings
(``train.param_groups``, betas, weight decay, warmup+cosine ``LambdaLR``) and the same gradient clip:

- engine: ``vlpgraph.execution.train.fit(job, seed, checkpoints=None, hooks)`` with ``max_steps=K``,
  ``log_every=1``, ``checkpoint_every=0``, ``eval_every=0``. ``checkpoints=None`` writes nothing.
  Per-step times are the ``data_wait_s`` and ``compute_s`` metrics fit itself logs (through
  ``Hooks.on_metrics``); the whole ``fit`` call is also timed from outside, and what it spends
  outside its steps (optimizer/loader set-up) is reported as per-call set-up.
- hand: a persistent AdamW + LambdaLR and a minimal loop: ``next(loader)`` -> vision(images),
  text(ids, mask) -> image CLS / caption feature (ITC's ``text_pool``) -> projections, L2-normalise -> ``itc.contrastive_loss`` -> zero_grad ->
  backward -> clip -> step. No Forward object, no dict of terms, no hooks. Timed with the same
  boundaries as fit: data = next() + to_device, compute = the rest up to ``scheduler.step()``.

After ``--warmup`` untimed rounds, the sides alternate: engine K steps, hand K steps, R times.
Both sides step the same parameters (each with its own optimiser state); only timing is compared.
The headline ratio is engine / hand median compute per step, taken per round (the two sides of a
round run back to back, so load from other processes affects both alike) and then the median over
rounds (goal: <= 1.05); the pooled ratio of all steps and the data-wait and total (data + compute)
rows are shown too. torch's intra-op threads are fixed (default: the CPUs this process may run on)
and printed. CPU only: on CUDA fit's timers do not synchronise.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from vlpgraph.engine.compile import compile_trial
from vlpgraph.nodes.objectives import itc as itc_mod
from vlpgraph.engine.ports import Forward
from vlpgraph.engine.spec import parse_set
from vlpgraph.engine.sweep import load_experiment
from vlpgraph.execution.train import (
    Collate,
    EpochBatches,
    Hooks,
    autocast_for,
    cosine_with_warmup,
    fit,
    param_groups,
    plan_steps,
    plan_warmup,
    to_device,
)

ROOT = Path(__file__).resolve().parent.parent


def itc_hand_loss(itc, batch: dict) -> torch.Tensor:
    """objective.itc's loss without the engine: towers -> [CLS] / pooled caption -> projections ->
    L2-normalise -> symmetric InfoNCE (the hand loop's loss; benchmarks/gpu.py uses it too)."""
    with torch.no_grad():  # ITC.forward keeps temp inside its range the same way
        itc.temp.clamp_(itc.temperature_min, itc.temperature_max)
    tokens = itc.vision(batch["images"])
    words = itc.text(batch["input_ids"], batch["attention_mask"])
    img = F.normalize(itc.vision_proj(tokens[:, 0]), dim=-1)
    if getattr(itc, "text_pool", "cls") == "cls":
        pooled = words[:, 0]
    else:  # mean of non-pad tokens, as ITC's text_pool "mean"
        m = batch["attention_mask"].unsqueeze(-1).to(words.dtype)
        pooled = (words * m).sum(1) / m.sum(1).clamp_min(1)
    txt = F.normalize(itc.text_proj(pooled), dim=-1)
    return itc_mod.contrastive_loss(img, txt, itc.temperature)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--graph", default=str(ROOT / "graphs" / "clip_baseline.yaml"), help="graph file (default graphs/clip_baseline.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="NODE.PARAM=VALUE", help="override a param, as in the CLI (repeatable)")
    ap.add_argument("--steps", type=int, default=10, help="K: steps per side per round (default 10)")
    ap.add_argument("--repeats", type=int, default=5, help="R: timed rounds (default 5)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds before the timed ones (default 1)")
    ap.add_argument("--batch-size", type=int, default=None, help="override train.batch_size (the trainer node's)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: CPUs available to this process)")
    return ap.parse_args()


def build(args: argparse.Namespace, cache_root: Path):
    sets = [parse_set(s) for s in args.set]
    exp = load_experiment(args.graph, sets=sets)
    trial = exp.trials[0]
    trainer = trial.graph.trainer
    if args.batch_size is not None:  # after the graph is bound, so the trainer node's name is known
        exp = load_experiment(args.graph, sets=sets + [(f"{trainer}.batch_size", args.batch_size)])
        trial = exp.trials[0]
    if len(exp.trials) > 1:
        print(f"note: {args.graph} expands to {len(exp.trials)} trials; timing the first ({trial.variant}, seed {trial.seed})")
    plan = compile_trial(trial, cache_root, torch.device("cpu"), log=lambda msg: None)
    return trial, plan


def main() -> None:
    args = parse_args()
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    K, R = args.steps, args.repeats

    with tempfile.TemporaryDirectory(prefix="vlpgraph-step-overhead-") as tmp:
        t0 = time.perf_counter()
        trial, plan = build(args, Path(tmp) / "cache")
        build_s = time.perf_counter() - t0
        job = plan.model
        if len(job.objectives) != 1 or not isinstance(next(iter(job.objectives.values())), itc_mod.ITC):
            sys.exit(f"the hand loop implements exactly one objective.itc; this trial has {list(job.objectives)}")
        itc = next(iter(job.objectives.values()))
        # fit-only knobs: K steps per call, every step logged, nothing saved, no mid-run evaluation
        base = job.params
        job.params = base.model_copy(update=dict(max_steps=K, log_every=1, checkpoint_every=0, eval_every=0))
        p = job.params
        device = job.device
        modules = job.modules.to(device).train()
        n_params = sum(q.numel() for q in {id(q): q for q in modules.parameters()}.values())
        bs = p.batch_size
        _, full_total = plan_steps(len(job.data.train), bs, 1, base.epochs, base.max_steps)

        print(f"graph {trial.graph.name} ({args.graph}), trial {trial.run_id}; built in {build_s:.1f} s")
        print(f"model: {', '.join(modules.keys())} = {n_params / 1e6:.2f} M parameters; batch {bs}, precision {p.precision} on {device}")
        print(f"torch {torch.__version__}: torch.set_num_threads({threads}) (CPUs available: {len(os.sched_getaffinity(0))}, "
              f"interop threads {torch.get_num_interop_threads()}); DataLoader num_workers {p.num_workers}")
        print(f"alternating: {args.warmup} warm-up + {R} timed rounds of engine {K} steps, hand {K} steps")

        # ------------------------------------------------------------------ engine
        eng_data: list[float] = []
        eng_comp: list[float] = []
        eng_setup: list[float] = []
        eng_first: list[bool] = []  # the first step of a fit() call: fresh AdamW state is allocated there
        eng_iter: list[tuple[float, float]] = []  # (wall, cpu) from one on_metrics call to the next

        def engine_round(record: bool) -> None:
            per_step: dict[int, dict[str, float]] = {}
            marks: list[tuple[float, float]] = []

            def on_metrics(rows: list[dict]) -> None:
                marks.append((time.perf_counter(), time.process_time()))
                for r in rows:
                    if r["name"] in ("data_wait_s", "compute_s"):
                        per_step.setdefault(r["step"], {})[r["name"]] = r["value"]

            t = time.perf_counter()
            res = fit(job, trial.seed, None, Hooks(on_metrics=on_metrics))
            wall = time.perf_counter() - t
            assert res.step == K and len(per_step) == K, (res.step, len(per_step))
            if record:
                d = [per_step[s]["data_wait_s"] for s in sorted(per_step)]
                c = [per_step[s]["compute_s"] for s in sorted(per_step)]
                eng_data.extend(d)
                eng_comp.extend(c)
                eng_first.extend(i == 0 for i in range(len(c)))
                eng_iter.extend((b[0] - a[0], b[1] - a[1]) for a, b in zip(marks, marks[1:]))
                eng_setup.append(wall - sum(d) - sum(c))

        # ------------------------------------------------------------------ hand
        optimizer = torch.optim.AdamW(param_groups(modules, p.weight_decay), lr=p.lr, betas=tuple(p.betas))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(plan_warmup(p.warmup_steps, p.warmup_fraction, full_total), full_total, p.min_lr_ratio))
        params = [q for g in optimizer.param_groups for q in g["params"]]
        collate = Collate(job.data.collate, job.tokenizer)
        hand_data: list[float] = []
        hand_comp: list[float] = []
        hand_iter: list[tuple[float, float]] = []  # (wall, cpu) from the end of one step to the end of the next

        def hand_loss(batch: dict) -> torch.Tensor:
            return itc_hand_loss(itc, batch)

        # same model, same loss: the hand loss equals the engine objective's term on one batch
        probe = to_device(collate([job.data.train[i] for i in range(min(bs, len(job.data.train)))]), device)
        with torch.no_grad(), autocast_for(p.precision, device):
            ref = float(sum(itc.weight * v for v in itc(Forward(probe), probe).values()))
            mine = float(hand_loss(probe))
        print(f"loss check on one batch: engine objective {ref:.6f}, hand loop {mine:.6f} (|diff| {abs(ref - mine):.2e})")
        if not abs(ref - mine) <= 1e-4 * max(1.0, abs(ref)):
            sys.exit("the hand loop does not compute the engine's loss; fix hand_loss before timing anything")

        def hand_round(record: bool) -> None:
            loader = DataLoader(
                job.data.train,
                batch_sampler=EpochBatches(len(job.data.train), bs, trial.seed, 0, K),
                collate_fn=collate,
                num_workers=p.num_workers,
            )
            it = iter(loader)
            mark = None
            for _ in range(K):
                t0 = time.perf_counter()
                batch = to_device(next(it), device)
                t1 = time.perf_counter()
                with autocast_for(p.precision, device):
                    loss = hand_loss(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if p.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, p.grad_clip)
                optimizer.step()
                scheduler.step()
                t2 = time.perf_counter()
                if record:
                    hand_data.append(t1 - t0)
                    hand_comp.append(t2 - t1)
                    now = (t2, time.process_time())
                    if mark is not None:
                        hand_iter.append((now[0] - mark[0], now[1] - mark[1]))
                    mark = now

        # ------------------------------------------------------------------ alternate
        round_ratio: list[float] = []
        for r in range(args.warmup + R):
            record = r >= args.warmup
            n_e, n_h = len(eng_comp), len(hand_comp)
            engine_round(record)
            hand_round(record)
            if record:
                e = statistics.median(eng_comp[n_e:])
                h = statistics.median(hand_comp[n_h:])
                round_ratio.append(e / h)
                print(f"  round {r - args.warmup + 1}/{R}: engine compute {e * 1e3:7.1f} ms/step, hand {h * 1e3:7.1f} ms/step, ratio {e / h:.3f}", flush=True)

    # ---------------------------------------------------------------------- report
    def stats(xs: list[float]) -> tuple[float, float, float]:
        return statistics.median(xs), min(xs), max(xs)

    eng_tot = [a + b for a, b in zip(eng_data, eng_comp)]
    hand_tot = [a + b for a, b in zip(hand_data, hand_comp)]
    print()
    print(f"per step over {R} x {K} steps each (median, [min .. max]); samples/s = batch {bs} / median")
    print(f"{'':<22}{'median ms':>10}{'min ms':>9}{'max ms':>9}{'samples/s':>11}")
    rows = [
        ("engine data wait", eng_data), ("engine compute", eng_comp), ("engine total", eng_tot),
        ("hand data wait", hand_data), ("hand compute", hand_comp), ("hand total", hand_tot),
    ]
    for name, xs in rows:
        med, lo, hi = stats(xs)
        print(f"{name:<22}{med * 1e3:>10.2f}{lo * 1e3:>9.2f}{hi * 1e3:>9.2f}{bs / med:>11.0f}")
    later = [c for c, first in zip(eng_comp, eng_first) if not first]
    if later:
        med, lo, hi = stats(later)
        print(f"{'engine compute 2..K':<22}{med * 1e3:>10.2f}{lo * 1e3:>9.2f}{hi * 1e3:>9.2f}{bs / med:>11.0f}"
              f"   (without each fit() call's first step)")
    print(f"{'engine fit() set-up':<22}{statistics.median(eng_setup) * 1e3:>10.2f}{min(eng_setup) * 1e3:>9.2f}"
          f"{max(eng_setup) * 1e3:>9.2f}   per call, outside the steps ({statistics.median(eng_setup) / K * 1e3:.2f} ms/step at K={K})")
    if eng_iter and hand_iter:
        ew, ecpu = (statistics.median(x[i] for x in eng_iter) for i in (0, 1))
        hw, hcpu = (statistics.median(x[i] for x in hand_iter) for i in (0, 1))
        print("whole loop iteration, steps 2..K (engine: on_metrics to on_metrics, so its logging is included):")
        print(f"  engine {ew * 1e3:.2f} ms wall, {ecpu * 1e3:.2f} ms process CPU; hand {hw * 1e3:.2f} ms wall, "
              f"{hcpu * 1e3:.2f} ms process CPU; ratio wall {ew / hw:.3f}, CPU {ecpu / hcpu:.3f}")
    print()
    ed, ec = statistics.median(eng_data), statistics.median(eng_comp)
    print(f"engine breakdown (its own logged metrics): data wait {ed * 1e3:.2f} ms ({100 * ed / (ed + ec):.1f}%), "
          f"compute {ec * 1e3:.2f} ms ({100 * ec / (ed + ec):.1f}%) per step (medians)")
    paired = statistics.median(round_ratio)
    print(f"ratio engine/hand compute: {paired:.3f} = median over rounds of (engine median / hand median) of the same round")
    print(f"  pooled: {ec / statistics.median(hand_comp):.3f} (median of all engine steps / of all hand steps; more exposed to load drift)"
          f"; total (data + compute): {statistics.median(eng_tot) / statistics.median(hand_tot):.3f}")
    if later:
        print(f"  engine steps 2..K only (pooled): {statistics.median(later) / statistics.median(hand_comp):.3f}")
    print(f"goal engine/hand <= 1.05: {'met' if paired <= 1.05 else 'NOT met'}")


if __name__ == "__main__":
    main()
