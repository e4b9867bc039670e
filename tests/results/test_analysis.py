"""vlpgraph.results.analysis (the app's queries) and vlpgraph.results.plots on stores whose values are known by hand."""

from __future__ import annotations

import io
import json
import statistics

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import SYN_FRACTIONS, SYN_SEEDS, SYN_STEPS, SYN_VARIANTS, syn_rsum, syn_wall
from vlpgraph.results import analysis, plots
from vlpgraph.errors import UserError
from vlpgraph.layers.patches import _box_masks
from vlpgraph.store import Store

SYN = (("graph", "in", ("syn",)),)


def test_aggregate_is_mean_std_n_over_every_completed_run(synthetic_store):
    store = Store(synthetic_store)
    long = analysis.aggregate(store, "retrieval.rsum", "variant", "shapes.train_fraction", SYN)
    assert len(long) == len(SYN_VARIANTS) * len(SYN_FRACTIONS)
    for row in long.to_dict("records"):
        values = [syn_rsum(row["row"], row["col"], s) for s in SYN_SEEDS]  # the failed run's 100.0 is not here
        assert row["n"] == len(SYN_SEEDS)
        assert row["mean"] == pytest.approx(statistics.fmean(values))
        assert row["std"] == pytest.approx(statistics.stdev(values))
        assert row["wall_s"] == pytest.approx(statistics.fmean(syn_wall(row["row"], row["col"], s) for s in SYN_SEEDS))
    table = analysis.pivot_table(long, "variant", "shapes.train_fraction")
    assert list(table.index) == list(SYN_VARIANTS) and list(table.columns) == ["0.1", "0.2", "0.4", "0.7", "1"]
    values = [syn_rsum("timix", 0.4, s) for s in SYN_SEEDS]
    assert table.loc["timix", "0.4"] == f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f} (6)"


def test_aggregate_other_groupings_and_wall_time(synthetic_store):
    store = Store(synthetic_store)
    by_seed = analysis.aggregate(store, "retrieval.rsum", "seed", None, SYN)
    assert by_seed["row"].tolist() == list(SYN_SEEDS) and set(by_seed["n"]) == {10}
    table = analysis.pivot_table(by_seed, "seed", None)
    assert list(table.columns) == ["all"]
    wall = analysis.aggregate(store, "wall_s", "variant", "shapes.train_fraction", SYN + (("variant", "in", ("timix",)),))
    assert wall["mean"].tolist() == pytest.approx([statistics.fmean(syn_wall("timix", f, s) for s in SYN_SEEDS)
                                                   for f in SYN_FRACTIONS])
    with pytest.raises(UserError, match="expected evaluator.metric"):
        analysis.aggregate(store, "rsum", "variant")


def test_runs_table_last_best_and_at_step(synthetic_store):
    store = Store(synthetic_store)
    flt = SYN + (("variant", "in", ("timix",)), ("shapes.train_fraction", "=", 0.7))
    last = analysis.runs_table(store, flt, ["retrieval.rsum"], "last", params=["shapes.train_fraction"])
    assert len(last) == len(SYN_SEEDS)
    assert sorted(last["retrieval.rsum"]) == pytest.approx(sorted(syn_rsum("timix", 0.7, s) for s in SYN_SEEDS))
    assert list(last.columns[:6]) == ["run_id", "status", "graph", "variant", "seed", "shapes.train_fraction"]
    assert list(last.columns[6:]) == ["retrieval.rsum", "step", "wall_s", "created_at"]
    early = analysis.runs_table(store, flt, ["retrieval.rsum"], "step", step=SYN_STEPS - 1)
    assert sorted(early["retrieval.rsum"]) == pytest.approx(sorted(syn_rsum("timix", 0.7, s) / 2 for s in SYN_SEEDS))
    assert analysis.runs_table(store, flt, ["retrieval.rsum"], "step", step=5)["retrieval.rsum"].isna().all()
    best = analysis.runs_table(store, flt, ["retrieval.rsum"], "best")
    assert (best["retrieval.rsum"] >= early["retrieval.rsum"]).all()
    failed = analysis.runs_table(store, SYN + (("status", "in", ("failed",)),), ["retrieval.rsum"])
    assert failed["run_id"].tolist() == ["baseline-1.0-s99"] and failed["retrieval.rsum"].tolist() == [100.0]


def test_headline_flag_and_swept_columns(synthetic_store):
    store = Store(synthetic_store)
    metrics = analysis.eval_metrics(store, SYN)
    assert set(metrics["name"]) == {"retrieval.rsum", "retrieval.n"}
    assert analysis.headline_metrics(metrics) == ["retrieval.rsum"]
    # a store written before the flag existed: no metric flagged -> first non-count metric per evaluator
    legacy = metrics.assign(headline=False)
    assert analysis.headline_metrics(legacy) == ["retrieval.rsum"]
    assert analysis.swept_columns(store, SYN) == ["shapes.train_fraction"]  # vision.width and train.lr never vary


def test_hostile_filter_values_are_bound_not_spliced(synthetic_store):
    store = Store(synthetic_store)
    before = len(store.runs())
    for value in ["x'; DROP TABLE runs; --", "' OR '1'='1", 'baseline" OR 1=1 --', "%", "\\"]:
        assert analysis.runs_table(store, SYN + (("variant", "contains", value),)).empty
        assert analysis.runs_table(store, SYN + (("variant", "in", (value,)),)).empty
        assert analysis.aggregate(store, "retrieval.rsum", "variant", None, (("graph", "=", value),)).empty
    with pytest.raises(UserError, match="unknown runs column"):
        analysis.runs_table(store, (('variant" OR 1=1 --', "=", "x"),))
    with pytest.raises(UserError, match="unknown runs column"):
        analysis.aggregate(store, "retrieval.rsum", "variant; DROP TABLE runs")
    with pytest.raises(UserError, match="unknown filter operator"):
        analysis.runs_table(store, (("variant", "; DROP TABLE runs", "x"),))
    with pytest.raises(UserError, match="invalid run id"):
        analysis.curves(store, ["x' OR '1'='1"], "loss")
    assert len(store.runs()) == before


def test_curves_are_downsampled_in_sql_to_bucket_means(synthetic_store):
    store = Store(synthetic_store)
    ids = ["baseline-0.1-s0", "timix-1.0-s5"]
    full = analysis.curves(store, ids, "loss", max_points=10_000)
    assert len(full) == 2 * SYN_STEPS and set(full["n"]) == {1}
    small = analysis.curves(store, ids, "loss", max_points=20)
    assert len(small) == 2 * 20 and set(small["n"]) == {SYN_STEPS // 20}
    for rid in ids:
        raw = [r["value"] for r in store.metrics(rid, "loss")]
        buckets = small[small["run_id"] == rid]
        assert buckets["value"].iloc[0] == pytest.approx(statistics.fmean(raw[:10]))
        assert (buckets["value"] * buckets["n"]).sum() == pytest.approx(sum(raw))  # every row counted once
    assert analysis.metric_names(store, ids) == ["loss", "lr"]


def test_config_diff_shows_only_what_differs(synthetic_store):
    store = Store(synthetic_store)
    diff = analysis.config_diff(store, ["baseline-0.1-s0", "timix-0.1-s3"])
    assert set(diff.index) == {"variant", "seed"}
    assert diff.loc["variant"].tolist() == ["baseline", "timix"]
    diff = analysis.config_diff(store, ["baseline-0.1-s0", "baseline-0.7-s0", "baseline-1.0-s0"])
    assert set(diff.index) == {"shapes.train_fraction"}
    assert analysis.config_diff(store, ["baseline-0.1-s0"]).empty


def test_efficiency_marks_where_each_variant_reaches_the_baseline(synthetic_store):
    store = Store(synthetic_store)
    long = analysis.aggregate(store, "retrieval.rsum", "variant", "shapes.train_fraction", SYN)
    target, marks = analysis.efficiency(long, "baseline")
    base_top = statistics.fmean(syn_rsum("baseline", 1.0, s) for s in SYN_SEEDS)
    assert target == pytest.approx(base_top)
    marks = marks.set_index("variant")
    assert marks.loc["baseline", "fraction"] == pytest.approx(1.0)
    assert marks.loc["baseline", "time_share"] == pytest.approx(1.0)
    # timix: mean rsum = 1.3 f + 0.025 -> reaches 1.025 at f = 0.769..., between the 0.7 and 1.0 grid points
    xs = list(SYN_FRACTIONS)
    ys = [statistics.fmean(syn_rsum("timix", f, s) for s in SYN_SEEDS) for f in xs]
    assert marks.loc["timix", "fraction"] == pytest.approx(analysis.crossing(xs, ys, base_top))
    assert 0.7 < marks.loc["timix", "fraction"] < 1.0
    fig = plots.efficiency_figure(long, "retrieval.rsum", "col", "fraction", "baseline", target, marks.reset_index())
    stars = [t for t in fig.data if t.mode == "markers"]
    assert len(stars) == 2 and all(t.marker.symbol == "star" for t in stars)
    bands = [t for t in fig.data if t.fill == "toself"]
    assert len(bands) == 2 and len(bands[0].x) == 2 * len(SYN_FRACTIONS)
    assert all(b.mode == "lines" for b in bands)  # no markers at the band's corners


def test_pointing_rule_matches_the_training_code():
    """The app's NumPy restatement of 'box touches patch' agrees with vlpgraph.layers.patches (torch)."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        size, patch = 32, int(rng.choice([4, 8]))
        x0, y0 = rng.uniform(0, size - 1, 2)
        box = [x0, y0, min(size, x0 + rng.uniform(0, 16)), min(size, y0 + rng.uniform(0, 16))]
        if rng.random() < 0.3:  # edges exactly on patch borders
            box = [float(round(v / patch) * patch) for v in box]
            box[2], box[3] = max(box[2], box[0]), max(box[3], box[1])
        mask = _box_masks(torch.tensor([box]), size, patch)[0]
        grid = size // patch
        mine = np.array([[analysis.patch_touches_box(r, c, box, patch, patch, grid, grid) for c in range(grid)] for r in range(grid)])
        assert (mine == mask.numpy()).all(), box


def _png(size=32) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), (10, 20, 30)).save(out, format="PNG")
    return out.getvalue()


def test_heatmap_figure_marks_a_hit_and_a_miss():
    scores = np.zeros(16)
    scores[5] = 3.0  # row 1, col 1 of a 4x4 grid over 32 px: pixels 8..16
    sample = {"image": _png(), "grid_h": 4, "grid_w": 4, "scores": scores.tolist(), "boxes": [[9, 9, 14, 14]]}
    assert analysis.pointing(sample, (32, 32))["hit"] is True
    fig = plots.heatmap_figure(sample, opacity=0.3)
    heat = next(t for t in fig.data if t.type == "heatmap")
    assert heat.opacity == 0.3 and np.asarray(heat.z).shape == (4, 4)
    assert "hit" in fig.layout.title.text
    rects = [s for s in fig.layout.shapes]
    assert len(rects) == 2 and rects[0].line.color == "#00FF66" and rects[1].line.color == "white"
    miss = dict(sample, boxes=[[24, 24, 31, 31]])
    assert analysis.pointing(miss, (32, 32))["hit"] is False
    assert plots.heatmap_figure(miss).layout.shapes[-1].line.color == "red"
    assert analysis.pointing(dict(sample, boxes=[]), (32, 32))["hit"] is None


def test_dag_figure_colours_nodes_by_role_and_puts_params_on_hover(synthetic_store):
    doc = analysis.run_documents(Store(synthetic_store), ["timix-0.4-s1"])["timix-0.4-s1"]
    fig = plots.dag_figure(doc)
    by_role = {t.name: t for t in fig.data if t.mode == "markers+text"}
    assert set(by_role) == {"dataset", "encoder", "trainer"}
    assert by_role["trainer"].marker.color == plots.ROLE_COLOURS["trainer"]
    assert "lr: 0.001" in by_role["trainer"].hovertext[0]
    assert len(fig.layout.annotations) == 1  # one edge: shapes -> train
    g, pos = plots.dag_layout(doc)
    assert pos["train"][0] > pos["shapes"][0]


def test_ema_smoothing():
    assert analysis.ema([1.0, 5.0, 3.0], 0.0) == [1.0, 5.0, 3.0]
    assert analysis.ema([2.0] * 5, 0.9) == pytest.approx([2.0] * 5)  # debiased: no ramp from zero
    smooth = analysis.ema([0.0, 10.0] * 20, 0.9)
    assert max(smooth[10:]) - min(smooth[10:]) < 5  # smoother than the raw 0/10 zig-zag
    assert json.dumps(analysis.ema([float("nan"), 1.0], 0.5)) == "[NaN, 1.0]"


def test_parallel_figure_has_an_axis_per_column_and_a_line_per_run(synthetic_store):
    store = Store(synthetic_store)
    runs = analysis.runs_table(store, SYN, ["retrieval.rsum"], params=["shapes.train_fraction"])
    fig = plots.parallel_figure(runs, ["shapes.train_fraction", "retrieval.rsum"], "retrieval.rsum")
    [trace] = fig.data
    assert [d.label for d in trace.dimensions] == ["shapes.train_fraction", "retrieval.rsum"]
    assert len(trace.dimensions[1].values) == len(runs) == 61


def test_in_filters_match_typed_columns(synthetic_store):
    store = Store(synthetic_store)
    runs = analysis.runs_table(store, SYN + (("seed", "in", (0, "1")), ("shapes.train_fraction", "in", (1.0, 0.1))))
    assert len(runs) == 2 * 2 * 2 and set(runs["seed"]) == {0, 1}
    one = runs.iloc[0]
    exact = analysis.runs_table(store, (("created_at", "in", (one["created_at"].to_pydatetime(),)),))
    assert exact["run_id"].tolist() == [one["run_id"]]
    with pytest.raises(UserError, match="not a valid double"):
        analysis.runs_table(store, (("shapes.train_fraction", "in", ("lots",)),))
