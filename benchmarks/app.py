"""How long each page of the analysis app (``app/``) takes on the server with a large store.

    python benchmarks/app.py [--store DIR] [--rebuild] [--runs 1000] [--metric-rows 2000]
                             [--patch-runs 50] [--repeats 5]

1. Store. A synthetic sweep is written to ``--store`` (default: ``$TMPDIR/vlpgraph-app-bench-<runs>x<rows>``),
   or reused when that store already holds exactly this sweep (same run and metric-row counts) and
   ``--rebuild`` is not given. It looks like a real ``vlpgraph run`` of a sweep: graph
   ``synthetic_sweep``; variants baseline / cutmix / timix; a grid over ``shapes.train_fraction``
   [0.1, 0.2, 0.4, 0.7, 1.0] x ``train.lr`` (4 values); as many seeds as it takes to reach ``--runs``;
   ~35 flattened ``node.param`` columns and a ``params`` document shaped like
   ``vlpgraph.engine.sweep.Trial.document()``; ``--metric-rows`` training values per run (loss, itc, itm,
   mlm, lr, samples_per_s, data_wait_s, compute_s every 10 steps); retrieval (rsum headline + r@k)
   and grounding (pointing headline + more) evals at 4 steps; ~97% completed runs (wall_s, final
   step), a few failed and running ones; 16 heatmap samples (8x8 grid, 32x32 PNG, boxes) for
   ``--patch-runs`` runs, plus 4 'mixed' samples for those of them that use a mixer. Everything goes
   through ``vlpgraph.store.Store``'s writer API (start_run, log_metrics with a whole run per call,
   log_evals, log_patch_scores, finish_run), as a sweep writes it. The build time is printed.

2. Pages. Each page of ``app/main.py`` runs under ``streamlit.testing.v1.AppTest`` (server side
   only: the script run, its queries and figure building, not the browser) with
   ``$VLPGRAPH_STORE`` pointing at the store. ``cold`` = the first run after
   ``st.cache_data.clear()`` (every query of the page and the sidebar runs; modules are already
   imported - the very first run of the process, which also imports plotly, pandas, ..., is shown
   on its own line); ``warm`` = median of ``--repeats`` further runs (cache hits: what a page costs
   when the user only changes a widget that asks for nothing new). Interactions (5 runs picked for
   comparison, ablation rows = seed, a second heatmap side by side) also show ``first``: the run
   right after setting the widget with the page's other queries still cached, which is what the
   user waits for. ``at.exception`` is checked after every run.

3. Queries. The vlpgraph.results.analysis calls each page makes, with the same arguments, timed without
   Streamlit (each opens its own read-only connection, as the app does): first call and median of
   ``--repeats``. The page table shows their summed medians beside the whole-page time.

The goal is "every page under 1 s" (cold). Nothing is asserted: it prints. Needs only the app's
dependencies (streamlit, duckdb, pandas, plotly, PIL); no torch.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "app" / "main.py"
GRAPH = "synthetic_sweep"
VARIANTS = ("baseline", "cutmix", "timix")
FRACTIONS = (0.1, 0.2, 0.4, 0.7, 1.0)
LRS = (1e-4, 3e-4, 1e-3, 3e-3)
METRIC_NAMES = ("loss", "itc", "itm", "mlm", "lr", "samples_per_s", "data_wait_s", "compute_s")
LOG_EVERY = 10
GOAL_S = 1.0


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default=None,
                    help="store directory (default: $TMPDIR/vlpgraph-app-bench-<runs>x<metric-rows>)")
    ap.add_argument("--rebuild", action="store_true", help="rewrite the synthetic store even if --store holds it")
    ap.add_argument("--runs", type=int, default=1000, help="runs in the synthetic sweep (default 1000)")
    ap.add_argument("--metric-rows", type=int, default=2000, help="training-value rows per run (default 2000)")
    ap.add_argument("--patch-runs", type=int, default=50, help="runs that store heatmap samples (default 50)")
    ap.add_argument("--repeats", type=int, default=5, help="warm runs per page / query repeats (default 5)")
    args = ap.parse_args()
    if args.store is None:
        args.store = str(Path(tempfile.gettempdir()) / f"vlpgraph-app-bench-{args.runs}x{args.metric_rows}")
    return args


# --------------------------------------------------------------------------------------------- store


def trials(n_runs: int) -> list[dict]:
    """The sweep's trials in the order a sweep runs them: seed-major, then variant, lr, fraction."""
    per_seed = len(VARIANTS) * len(LRS) * len(FRACTIONS)
    out = []
    for seed in range(math.ceil(n_runs / per_seed)):
        for variant in VARIANTS:
            for lr in LRS:
                for fraction in FRACTIONS:
                    if len(out) < n_runs:
                        out.append({"variant": variant, "lr": lr, "fraction": fraction, "seed": seed})
    return out


def nodes_of(t: dict) -> dict[str, dict]:
    """The resolved graph of a trial, shaped like Trial.document()['nodes']."""
    nodes = {
        "shapes": {"kind": "dataset.shapes", "inputs": {},
                   "params": {"train_size": 4000, "test_size": 500, "image_size": 32, "max_objects": 4,
                              "min_objects": 1, "caption_noise": 0.3, "noise_partial": 0.5,
                              "train_fraction": t["fraction"], "data_seed": 0}},
        "vision": {"kind": "encoder.vit", "inputs": {},
                   "params": {"image_size": 32, "patch_size": 4, "width": 96, "depth": 4, "heads": 2,
                              "mlp_ratio": 4.0, "attention": "auto", "pretrained": None}},
        "text": {"kind": "encoder.text", "inputs": {"data": "shapes"},
                 "params": {"width": 96, "depth": 2, "heads": 2, "max_len": 24, "vocab_size": 2000,
                            "tokenizer": None}},
        "itc": {"kind": "objective.itc", "inputs": {"vision": "vision", "text": "text"},
                "params": {"embed_dim": 96, "weight": 1.0, "temperature": 0.07, "learn_temperature": True,
                           "text_pool": "mean"}},
        "train": {"kind": "trainer", "inputs": {"data": "shapes", "objectives": ["itc"]},
                  "params": {"epochs": 6.0, "max_steps": None, "batch_size": 64, "lr": t["lr"],
                             "weight_decay": 0.02, "betas": [0.9, 0.98], "warmup_steps": 20,
                             "grad_clip": 1.0, "precision": "auto", "log_every": LOG_EVERY}},
        "retrieval": {"kind": "evaluator.retrieval", "inputs": {"model": "train", "data": "shapes"},
                      "params": {"batch_size": 256, "ks": [1, 5, 10], "max_samples": None}},
        "grounding": {"kind": "evaluator.grounding", "inputs": {"model": "train", "data": "shapes", "scorer": "simscore"},
                      "params": {"batch_size": 256, "topk": "target", "heatmaps": 16, "mixed_samples": 4, "seed": 0}},
        "simscore": {"kind": "head.patch_similarity", "inputs": {"vision": "vision", "text": "text"},
                     "params": {"text_pool": "mean"}},
    }
    if t["variant"] != "baseline":
        kind = "mixer.cutmix" if t["variant"] == "cutmix" else "mixer.timix"
        nodes["mix"] = {"kind": kind, "inputs": {"scorer": "simscore"} if t["variant"] == "timix" else {},
                        "params": {"prob": 0.5, "alpha": 1.0, "ramp_epochs": 1.0, "stop_fraction": 1.0}}
        nodes["itc"]["inputs"]["mixer"] = "mix"
        nodes["grounding"]["inputs"]["mixer"] = "mix"
    return nodes


def run_id_of(t: dict) -> str:
    key = json.dumps({k: t[k] for k in ("variant", "lr", "fraction")}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16] + f"-s{t['seed']}"


def png(rng: random.Random, boxes: list[list[int]]):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (32, 32), tuple(rng.randrange(40, 90) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for x0, y0, x1, y1 in boxes:
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=tuple(rng.randrange(120, 256) for _ in range(3)))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def patch_rows(rng: random.Random, step: int, mixed: bool) -> list[dict]:
    rows = []
    for sample_id in range(16):
        x0, y0 = rng.randrange(0, 20), rng.randrange(0, 20)
        box = [x0, y0, x0 + rng.randrange(6, 12), y0 + rng.randrange(6, 12)]
        cx, cy = (box[0] + box[2]) / 8, (box[1] + box[3]) / 8  # box centre in patch units (4 px patches)
        scores = [math.exp(-((c + 0.5 - cx) ** 2 + (r + 0.5 - cy) ** 2) / 4) + rng.random() * 0.3
                  for r in range(8) for c in range(8)]
        rows.append({"step": step, "evaluator": "grounding", "kind": "heatmap", "sample_id": sample_id,
                     "caption": f"a {rng.choice(['red', 'green', 'blue'])} {rng.choice(['square', 'circle', 'triangle'])}",
                     "grid_h": 8, "grid_w": 8, "scores": scores, "image": png(rng, [box]), "boxes": [box]})
    if mixed:
        for sample_id in range(4):
            box = [4, 4, 14, 14]
            rows.append({"step": step, "evaluator": "grounding", "kind": "mixed", "sample_id": sample_id,
                         "caption": "a blue circle", "grid_h": 8, "grid_w": 8,
                         "scores": [rng.random() for _ in range(64)], "image": png(rng, [box]),
                         "partner_id": sample_id + 100, "partner_image": png(rng, [[16, 16, 28, 28]]),
                         "mixed_image": png(rng, [box, [16, 16, 28, 28]]), "lam": rng.uniform(0.5, 1.0)})
    return rows


def store_counts(store) -> dict[str, int]:
    return {t: store.query(f"SELECT count(*) AS n FROM {t}")[0]["n"]
            for t in ("runs", "metrics", "evals", "patch_scores")}


def store_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.glob("vlpgraph.duckdb*") if p.is_file())


def build_store(args: argparse.Namespace):
    """Reuse the store if it holds this sweep, else (re)write it through Store's writer API."""
    from vlpgraph.store import DB_NAME, Store

    root = Path(args.store).expanduser().resolve()
    store = Store(root, timeout=120)
    want_runs = args.runs
    if store.exists():
        counts = store_counts(store)
        graphs = {r["graph"] for r in store.query("SELECT DISTINCT graph FROM runs")}
        if graphs - {GRAPH}:
            sys.exit(f"{root} holds runs of other graphs ({', '.join(sorted(map(str, graphs - {GRAPH})))}): "
                     "not a synthetic benchmark store; pick another --store")
        per_run = store.query("SELECT max(n) AS n FROM (SELECT count(*) AS n FROM metrics GROUP BY run_id)")[0]["n"]
        if not args.rebuild and counts["runs"] == want_runs and per_run == args.metric_rows:
            print(f"reusing {root} ({want_runs} runs x {args.metric_rows} metric rows; --rebuild to rewrite it)")
            return store, None
        if not args.rebuild:
            print(f"{root} holds {counts['runs']} runs x {per_run} metric rows, not "
                  f"{want_runs} x {args.metric_rows}: rebuilding it")
        for p in root.glob(DB_NAME + "*"):
            p.unlink()
        shutil.rmtree(root / "runs", ignore_errors=True)
        store = Store(root, timeout=120)

    rng = random.Random(0)
    ts = trials(args.runs)
    log_points = math.ceil(args.metric_rows / len(METRIC_NAMES))
    final_step = log_points * LOG_EVERY
    eval_steps = [final_step * k // 4 for k in range(1, 5)]
    every = max(1, len(ts) // max(1, args.patch_runs))
    n_running = 3 if len(ts) > 10 else 0  # the newest runs are still running
    # runs with heatmaps: spread out over the sweep, the newest finished run among them
    patch_at = set(range(len(ts) - 1 - n_running, -1, -every)[: args.patch_runs])
    n_failed = 0
    t0 = time.perf_counter()
    t_metrics = 0.0
    for i, t in enumerate(ts):
        run_id = run_id_of(t)
        nodes = nodes_of(t)
        doc = {"graph": GRAPH, "variant": t["variant"], "seed": t["seed"],
               "grid": {"shapes.train_fraction": t["fraction"], "train.lr": t["lr"]}, "nodes": nodes}
        flat = {f"{n}.{k}": v for n, node in nodes.items() for k, v in node["params"].items()}
        store.start_run(run_id, graph=GRAPH, variant=t["variant"], seed=t["seed"], params=doc, flat_params=flat,
                        device="cpu")
        # status: the last 3 runs are still running, ~2% failed, the rest completed
        running = i >= len(ts) - n_running
        failed = not running and rng.random() < 0.02
        points = log_points // 2 if (running or failed) else log_points
        quality = {"baseline": 0.0, "cutmix": 0.08, "timix": 0.15}[t["variant"]] + 0.6 * math.log10(1 + 9 * t["fraction"])
        quality -= 0.1 * abs(math.log10(t["lr"] / 1e-3))
        speed = {"baseline": 900.0, "cutmix": 860.0, "timix": 690.0}[t["variant"]] * rng.uniform(0.9, 1.1)
        rows = []
        for p in range(points):
            step = (p + 1) * LOG_EVERY
            wall = step * 64 / speed
            epoch = 6.0 * step / final_step
            loss = 4.0 * math.exp(-3 * step / final_step * (0.5 + quality)) + 0.3 + rng.gauss(0, 0.05)
            values = {"loss": loss, "itc": loss * 0.6, "itm": loss * 0.25, "mlm": loss * 0.15,
                      "lr": t["lr"] * min(1.0, step / 20) * 0.5 * (1 + math.cos(math.pi * step / final_step)),
                      "samples_per_s": speed * rng.uniform(0.95, 1.05), "data_wait_s": rng.uniform(0.01, 0.05),
                      "compute_s": LOG_EVERY * 64 / speed}
            rows += [{"step": step, "epoch": epoch, "name": n, "value": values[n], "wall_s": wall}
                     for n in METRIC_NAMES]
        rows = rows[: args.metric_rows]
        tm = time.perf_counter()
        store.log_metrics(run_id, rows, through_step=rows[-1]["step"] if rows else None)  # a whole run per call
        t_metrics += time.perf_counter() - tm
        evals = []
        for step in eval_steps:
            if step > points * LOG_EVERY:
                break
            q = quality * step / final_step
            r = {f"{d}_r{k}": min(1.0, max(0.0, (0.12 + 0.35 * q) * (1 + 0.6 * math.log(k)) + rng.gauss(0, 0.02)))
                 for d in ("i2t", "t2i") for k in (1, 5, 10)}
            evals += [{"step": step, "evaluator": "retrieval", "metric": m, "value": v} for m, v in r.items()]
            evals += [{"step": step, "evaluator": "retrieval", "metric": "rsum", "value": sum(r.values()), "headline": True},
                      {"step": step, "evaluator": "retrieval", "metric": "n", "value": 500.0}]
            pointing = min(1.0, 0.3 + 0.4 * q + rng.gauss(0, 0.02))
            evals += [{"step": step, "evaluator": "grounding", "metric": "pointing", "value": pointing, "headline": True},
                      {"step": step, "evaluator": "grounding", "metric": "topk_iou", "value": pointing * 0.6},
                      {"step": step, "evaluator": "grounding", "metric": "chance_pointing", "value": 0.18},
                      {"step": step, "evaluator": "grounding", "metric": "n", "value": 500.0}]
        store.log_evals(run_id, evals)
        if i in patch_at and not running:
            store.log_patch_scores(run_id, patch_rows(rng, points * LOG_EVERY, mixed=t["variant"] != "baseline"))
        wall_s = points * LOG_EVERY * 64 / speed + 5.0
        if running:
            store.update_progress(run_id, wall_s=wall_s)
        elif failed:
            n_failed += 1
            store.finish_run(run_id, "failed", error="RuntimeError: synthetic failure", wall_s=wall_s,
                             step=points * LOG_EVERY)
        else:
            store.finish_run(run_id, "completed", wall_s=wall_s, train_samples=int(64 * final_step * t["fraction"]),
                             step=final_step)
        if (i + 1) % 100 == 0:
            print(f"  {i + 1}/{len(ts)} runs written ({time.perf_counter() - t0:.0f} s)", flush=True)
    build_s = time.perf_counter() - t0
    print(f"built {root}: {len(ts)} runs ({len(ts) - n_failed - n_running} completed, {n_failed} failed, "
          f"{n_running} running) in {build_s:.1f} s (log_metrics {t_metrics:.1f} s, "
          f"{store.stats['writes']} write transactions)")
    return store, build_s


# --------------------------------------------------------------------------------------------- timing


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def check(at, what: str) -> None:
    if len(at.exception):
        msgs = "\n".join(f"  {e.message}\n{''.join(e.stack_trace) if e.stack_trace else ''}" for e in at.exception)
        raise SystemExit(f"FAILED: {what} raised in the app:\n{msgs}")


def bare_queries(store, repeats: int, compare_ids: list[str], other_key: str | None) -> dict[str, list[tuple]]:
    """page -> [(call, first s, median s)] for the analysis calls that page makes (same arguments)."""
    from vlpgraph.results import analysis

    ov = analysis.overview(store)
    graph = ov["graphs"][0]["graph"]
    base = (("graph", "in", (graph,)),)  # the sidebar's default: the newest graph
    swept = analysis.swept_columns(store, base)
    headline = analysis.headline_metrics(analysis.eval_metrics(store, base))
    types = analysis.filter_columns(store)
    fraction = next(c for c in swept if c.endswith("train_fraction"))
    numeric = [c for c in swept if types.get(c) in ("DOUBLE", "BIGINT", "INTEGER")]
    x = ([c for c in numeric if c.endswith("train_fraction")] + [c for c in numeric if not c.endswith("train_fraction")])[0]
    patch = analysis.patch_runs(store, base)
    heat = patch[patch["kind"] == "heatmap"].reset_index(drop=True)
    run, ev = heat["run_id"].iloc[-1], heat["evaluator"].iloc[-1]
    sample0 = int(analysis.patch_samples(store, run, ev)["sample_id"].iloc[0])
    mixed = patch[patch["kind"] == "mixed"].reset_index(drop=True)
    newest = analysis.graph_runs(store, base)["run_id"].iloc[0]
    sidebar = [("overview", lambda: analysis.overview(store))]
    calls = {
        "runs": sidebar + [
            ("filter_columns", lambda: analysis.filter_columns(store)),
            ("swept_columns", lambda: analysis.swept_columns(store, base)),
            ("distinct_values status,variant", lambda: analysis.distinct_values(store, ["status", "variant"], base)),
            ("eval_metrics", lambda: analysis.eval_metrics(store, base)),
            ("runs_table last", lambda: analysis.runs_table(store, base, tuple(headline), "last", None, tuple(swept))),
        ],
        "runs + compare 5": [
            ("config_diff", lambda: analysis.config_diff(store, tuple(compare_ids))),
            ("metric_names", lambda: analysis.metric_names(store, tuple(compare_ids))),
            ("curves loss", lambda: analysis.curves(store, tuple(compare_ids), "loss")),
        ],
        "ablations": sidebar + [
            ("filter_columns", lambda: analysis.filter_columns(store)),
            ("swept_columns", lambda: analysis.swept_columns(store, base)),
            ("eval_metrics", lambda: analysis.eval_metrics(store, base)),
            (f"aggregate variant x {fraction.split('.')[-1]}",
             lambda: analysis.aggregate(store, headline[0], "variant", fraction, base)),
        ],
        "ablations rows=seed": [
            (f"aggregate seed x {fraction.split('.')[-1]}",
             lambda: analysis.aggregate(store, headline[0], "seed", fraction, base)),
        ],
        "efficiency": sidebar + [
            ("swept_columns", lambda: analysis.swept_columns(store, base)),
            ("filter_columns", lambda: analysis.filter_columns(store)),
            ("eval_metrics", lambda: analysis.eval_metrics(store, base)),
            ("distinct_values variant", lambda: analysis.distinct_values(store, ["variant"], base)),
            (f"aggregate variant x {x.split('.')[-1]}", lambda: analysis.aggregate(store, headline[0], "variant", x, base)),
        ],
        "heatmaps": sidebar + [
            ("patch_runs", lambda: analysis.patch_runs(store, base)),
            ("patch_samples", lambda: analysis.patch_samples(store, run, ev)),
            ("patch_sample", lambda: analysis.patch_sample(store, run, ev, sample0)),
        ],
        "graph": sidebar + [
            ("graph_runs", lambda: analysis.graph_runs(store, base)),
            ("run_documents", lambda: analysis.run_documents(store, (newest,))),
        ],
    }
    if len(mixed):
        mrun, mev = mixed["run_id"].iloc[-1], mixed["evaluator"].iloc[-1]
        msample = int(analysis.patch_samples(store, mrun, mev, "mixed")["sample_id"].iloc[0])
        calls["heatmaps"] += [
            ("patch_samples mixed", lambda: analysis.patch_samples(store, mrun, mev, "mixed")),
            ("patch_sample mixed", lambda: analysis.patch_sample(store, mrun, mev, msample, "mixed")),
        ]
    if other_key:
        orun, oev = other_key.split("|", 1)
        calls["heatmaps + side by side"] = [("patch_sample", lambda: analysis.patch_sample(store, orun, oev, sample0))]
    out = {}
    for page, fns in calls.items():
        out[page] = []
        for name, fn in fns:
            first = timed(fn)
            med = statistics.median(timed(fn) for _ in range(repeats))
            out[page].append((name, first, med))
    return out


def expect(ok: bool, message: str) -> None:
    """The interaction did what it should (so its time is the time of the right thing)."""
    if not ok:
        raise SystemExit(f"FAILED: {message}")


class Pages:
    """Times app pages under AppTest."""

    def __init__(self, repeats: int):
        import streamlit as st
        from streamlit.logger import set_log_level
        from streamlit.testing.v1 import AppTest

        # "No runtime found" / "missing ScriptRunContext" are expected under AppTest; each app run
        # re-applies the configured log level, so this is repeated before every cache clear
        self.quiet = lambda: set_log_level("error")
        self.quiet()
        self.st = st
        self.repeats = repeats
        self.at = AppTest.from_file(str(APP), default_timeout=120)
        self.rows: list[tuple[str, float | None, float, float]] = []  # (what, first, cold, warm)

    def run(self, what: str) -> float:
        dt = timed(self.at.run)
        check(self.at, what)
        return dt

    def measure(self, what: str, first: float | None = None) -> None:
        """Cold (caches cleared) + warm median of the page as its widgets now stand."""
        self.quiet()
        self.st.cache_data.clear()
        cold = self.run(f"{what} (cold)")
        warm = statistics.median(self.run(f"{what} (warm)") for _ in range(self.repeats))
        self.rows.append((what, first, cold, warm))
        print(f"  {what:<28} cold {cold:6.3f} s  warm {warm:6.3f} s" + ("" if first is None else f"  first {first:6.3f} s"),
              flush=True)

    def page(self, path: str) -> None:
        self.at.switch_page(path)
        self.measure(Path(path).stem)


def main() -> None:
    args = parse_args()
    store, build_s = build_store(args)
    os.environ["VLPGRAPH_STORE"] = str(store.root)
    counts = store_counts(store)
    size = store_bytes(store.root)

    # runs to compare: 5 completed runs that differ (variant, fraction, seed), as a user would pick
    ids = [r["run_id"] for r in store.query(
        "SELECT run_id FROM runs WHERE graph = ? AND status = 'completed' ORDER BY created_at, run_id", [GRAPH])]
    compare = [ids[int(i * (len(ids) - 1) / 4)] for i in range(5)] if len(ids) >= 5 else ids

    print(f"\npages (AppTest, server side; {args.repeats} warm runs each):", flush=True)
    pages = Pages(args.repeats)
    import streamlit as st

    st.cache_data.clear()
    first_process = pages.run("runs (first run of the process)")
    print(f"  {'first run of the process':<28} {first_process:6.3f} s (imports included)", flush=True)
    pages.measure("runs")
    at = pages.at
    first = timed(lambda: at.multiselect(key="runs_compare").set_value(compare).run())
    check(at, "runs + compare 5 (first)")
    expect(list(at.multiselect(key="runs_compare").value) == compare
           and any(el.proto.id.endswith("runs_curves_fig") for el in at.get("plotly_chart")),
           "runs: the compared runs' curves did not appear")
    pages.measure("runs + compare 5", first)

    pages.page("views/ablations.py")
    first = timed(lambda: at.selectbox(key="abl_rows").set_value("seed").run())
    check(at, "ablations rows=seed (first)")
    expect(at.selectbox(key="abl_rows").value == "seed" and len(at.dataframe) == 1
           and at.dataframe[0].value.index.name == "seed", "ablations: rows did not switch to seed")
    pages.measure("ablations rows=seed", first)

    pages.page("views/efficiency.py")

    pages.page("views/heatmaps.py")
    # the widget's options are "run_id|evaluator" keys (AppTest lists only their formatted labels)
    from vlpgraph.results import analysis

    patch = analysis.patch_runs(store, (("graph", "in", (GRAPH,)),))
    heat = patch[patch["kind"] == "heatmap"]
    current = at.selectbox(key="hm_run").value
    other = next((k for k in (f"{r}|{e}" for r, e in zip(heat["run_id"], heat["evaluator"])) if k != current), None)
    if other is not None:
        first = timed(lambda: at.selectbox(key="hm_other").set_value(other).run())
        check(at, "heatmaps + side by side (first)")
        expect(at.selectbox(key="hm_other").value == other and len(at.get("plotly_chart")) == 2,
               "heatmaps: the second run did not appear side by side")
        pages.measure("heatmaps + side by side", first)

    pages.page("views/graph.py")

    print("\nbare queries (vlpgraph.results.analysis, no Streamlit; each opens its own connection):", flush=True)
    queries = bare_queries(store, args.repeats, compare, other)
    for page, items in queries.items():
        for name, f, med in items:
            print(f"  {page:<24} {name:<36} first {f:6.3f} s  median {med:6.3f} s")

    # ---- summary
    print(f"\nstore: {store.root}")
    print(f"  {size / 2**20:.1f} MiB on disk; rows: " + ", ".join(f"{t} {n:,}" for t, n in counts.items()))
    if build_s is not None:
        print(f"  built in {build_s:.1f} s")
    header = f"{'page / interaction':<28} {'cold s':>7} {'warm s':>7} {'first s':>8} {'queries s':>10}  cold < {GOAL_S:g} s"
    print("\n" + header)
    print("-" * len(header))
    for what, first_s, cold, warm in pages.rows:
        q = sum(med for _, _, med in queries.get(what, []))
        ok = "yes" if cold < GOAL_S else "NO"
        print(f"{what:<28} {cold:7.3f} {warm:7.3f} {'-' if first_s is None else f'{first_s:.3f}':>8} {q:10.3f}  {ok}")
    print(f"(first run of the process, imports included: {first_process:.3f} s; queries s = summed medians of "
          "the page's bare analysis calls; for an interaction, only the calls it adds; first s = the run right "
          "after setting the widget, the page's other queries cached)")
    slow = [w for w, _, c, _ in pages.rows if c >= GOAL_S]
    print(f"goal 'every page under {GOAL_S:g} s' (cold): " + ("met" if not slow else "NOT met: " + ", ".join(slow)))


if __name__ == "__main__":
    main()
