"""`vlpgraph report`: aggregation over seeds and the data-efficiency headline, on a store filled by hand."""

from __future__ import annotations

import pytest
from rich.console import Console

from tests.helpers import tiny_graph
from vlpgraph.results.report import build_report, crossing, interpolate
from vlpgraph.store import Store
from vlpgraph.engine.sweep import load_experiment


def test_crossing_interpolates_the_first_reach():
    assert crossing([0.1, 0.5, 1.0], [0.2, 0.6, 0.8], 0.4) == pytest.approx(0.3)
    assert crossing([0.1, 0.5, 1.0], [0.5, 0.6, 0.8], 0.4) == 0.1
    assert crossing([0.1, 0.5, 1.0], [0.1, 0.2, 0.3], 0.4) is None
    assert interpolate([0.1, 0.5, 1.0], [10, 50, 100], 0.3) == pytest.approx(30)


def render(tables) -> str:
    console = Console(record=True, width=250)
    for t in tables:
        console.print(t)
    return console.export_text()


def test_report_tables_and_data_efficiency(tmp_path):
    more = """sweep:
  grid: {shapes.train_fraction: [0.25, 0.5, 1.0]}
  variants:
    baseline: {}
    better: {train.lr: 0.002}
  seeds: [0, 1]
"""
    exp = load_experiment(tiny_graph(tmp_path, more=more))
    store = Store(tmp_path / "s")
    # baseline reaches 0.6 at full data; "better" reaches it at fraction 0.375 (halfway 0.25 -> 0.5)
    curve = {"baseline": {0.25: 0.2, 0.5: 0.4, 1.0: 0.6}, "better": {0.25: 0.5, 0.5: 0.7, 1.0: 0.8}}
    for t in exp.trials:
        f = t.grid["shapes.train_fraction"]
        value = curve[t.variant][f] + (0.01 if t.seed else -0.01)
        store.start_run(t.run_id, graph=exp.name, variant=t.variant, seed=t.seed, params=t.document(),
                        flat_params=t.flat_params(), device="cpu")
        store.log_evals(t.run_id, [dict(step=10, evaluator="retrieval", metric="rsum", value=value)])
        store.finish_run(t.run_id, "completed", wall_s=100 * f, train_samples=1, step=10)
    text = render(build_report(exp, store))
    assert "0.600 ± 0.014 (2)" in text  # baseline at 1.0: mean 0.6, std of (0.59, 0.61)
    assert "12/12 trials done" in text
    eff = [ln for ln in text.splitlines() if ln.strip().startswith(("│ better", "│ baseline", "better", "baseline"))]
    better = [ln for ln in eff if "better" in ln][-1]
    baseline = [ln for ln in eff if "baseline" in ln][-1]
    assert "0.38" in better and "37.5%" in better  # fraction 0.375, wall 37.5 s of baseline's 100 s
    assert "1.00" in baseline and "100.0%" in baseline


def test_report_says_never_when_a_variant_does_not_reach(tmp_path):
    more = "sweep:\n  grid: {shapes.train_fraction: [0.5, 1.0]}\n  variants:\n    baseline: {}\n    worse: {train.lr: 0.002}\n"
    exp = load_experiment(tiny_graph(tmp_path, more=more))
    store = Store(tmp_path / "s")
    for t in exp.trials:
        value = {"baseline": 0.5, "worse": 0.3}[t.variant] * t.grid["shapes.train_fraction"]
        store.start_run(t.run_id, graph=exp.name, variant=t.variant, seed=t.seed, params=t.document(),
                        flat_params=t.flat_params(), device="cpu")
        store.log_evals(t.run_id, [dict(step=1, evaluator="retrieval", metric="rsum", value=value)])
        store.finish_run(t.run_id, "completed", wall_s=10.0, train_samples=1, step=1)
    assert "never" in render(build_report(exp, store))
