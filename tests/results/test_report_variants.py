"""`vlpgraph report` on a sweep of variants and seeds without a grid (the shape of graphs/mug.yaml): one
variant x metric table, mean ± std over seeds, on a store filled by hand."""

from __future__ import annotations

import statistics

from rich.table import Table

from tests.helpers import evaluator, tiny_graph
from vlpgraph.cli import main
from vlpgraph.results.report import build_report
from vlpgraph.store import Store
from vlpgraph.engine.sweep import load_experiment

SWEEP = """\
sweep:
  variants:
    clip: {}
    slow: {train.lr: 0.0001}
    wide: {itc.embed_dim: 64}
  seeds: [0, 1, 2]
"""


def variants_graph(tmp_path):
    """The tiny graph with two evaluators (headlines retrieval.rsum and zeroshot.top1), three variants,
    three seeds, no grid."""
    return tiny_graph(tmp_path, zeroshot=evaluator("zeroshot"), more=SWEEP)


def value(variant: str, metric: str, seed: int) -> float:
    """A distinct value per (variant, metric, seed), spread over seeds so the std is not 0."""
    base = {"clip": 1.0, "slow": 2.0, "wide": 3.0}[variant] * (1 + len(metric) / 10)
    return round(base + 0.05 * seed * (1 + len(metric) % 3), 6)


METRICS = {"retrieval": ("rsum", "i2t_r1"), "zeroshot": ("top1", "top5")}


def fill(store: Store, exp, failed: set[tuple[str, int]] = frozenset(), absent: str | None = None) -> None:
    """Every trial completed with its metrics (two per evaluator), except ``failed`` (variant, seed)
    pairs and the ``absent`` variant (never run)."""
    for t in exp.trials:
        if t.variant == absent:
            continue
        store.start_run(t.run_id, graph=exp.name, variant=t.variant, seed=t.seed, params=t.document(),
                        flat_params=t.flat_params(), device="cpu")
        if (t.variant, t.seed) in failed:
            store.finish_run(t.run_id, "failed", error="boom")
            continue
        for name, names in METRICS.items():
            store.log_evaluation(t.run_id, 8, name, None, {m: value(t.variant, m, t.seed) for m in names},
                                 headline=names[0])
        store.finish_run(t.run_id, "completed", wall_s=10.0 + t.seed, train_samples=128, step=8)


def cell(variant: str, metric: str, seeds) -> str:
    values = [value(variant, metric, s) for s in seeds]
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f} ({len(values)})"


def rows(table: Table) -> dict[str, dict[str, str]]:
    """variant -> {column header: cell text} of a rich table."""
    headers = [str(c.header) for c in table.columns]
    cells = [list(c.cells) for c in table.columns]
    return {cells[0][i]: dict(zip(headers[1:], (col[i] for col in cells[1:]))) for i in range(len(cells[0]))}


def test_a_sweep_without_a_grid_gets_one_variant_by_metric_table(tmp_path):
    exp = load_experiment(variants_graph(tmp_path))
    assert not exp.trials[0].grid and len(exp.trials) == 9
    store = Store(tmp_path / "s")
    fill(store, exp)
    [table] = build_report(exp, store)  # all done: no explanation line, no data-efficiency table
    assert isinstance(table, Table)
    assert [str(c.header) for c in table.columns] == ["variant", "retrieval.rsum", "zeroshot.top1",
                                                      "wall_s (seconds per trial)"]
    got = rows(table)
    assert list(got) == ["clip", "slow", "wide"]  # the file's variant order
    for variant in got:
        assert got[variant]["retrieval.rsum"] == cell(variant, "rsum", [0, 1, 2])
        assert got[variant]["zeroshot.top1"] == cell(variant, "top1", [0, 1, 2])
        assert got[variant]["wall_s (seconds per trial)"] == "11.0 ± 1.0 (3)"
    assert "9/9 trials done" in str(table.title)


def test_metric_flags_choose_the_columns(tmp_path):
    exp = load_experiment(variants_graph(tmp_path))
    store = Store(tmp_path / "s")
    fill(store, exp)
    [table] = build_report(exp, store, metrics=["zeroshot.top5", "retrieval.i2t_r1"])
    assert [str(c.header) for c in table.columns][1:-1] == ["zeroshot.top5", "retrieval.i2t_r1"]
    assert rows(table)["wide"]["retrieval.i2t_r1"] == cell("wide", "i2t_r1", [0, 1, 2])


def test_failed_and_missing_trials_show_in_their_variant_row(tmp_path):
    exp = load_experiment(variants_graph(tmp_path))
    store = Store(tmp_path / "s")
    # slow: seed 1 failed (two seeds left); wide: every seed failed; "clip" never ran
    fill(store, exp, failed={("slow", 1), ("wide", 0), ("wide", 1), ("wide", 2)}, absent="clip")
    tables = build_report(exp, store)
    got = rows(tables[0])
    assert got["clip"]["retrieval.rsum"] == "-"  # not in the store
    assert got["slow"]["retrieval.rsum"] == cell("slow", "rsum", [0, 2])
    assert got["wide"]["zeroshot.top1"] == "failed"
    assert "2/9 trials done" in str(tables[0].title)
    assert "'-' none yet" in str(tables[1])


def test_the_cli_prints_the_table(tmp_path, capsys):
    graph = variants_graph(tmp_path)
    exp = load_experiment(graph)
    store = Store(tmp_path / "s")
    fill(store, exp)
    assert main(["report", str(graph), "--store", str(store.root)]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("│ slow"))
    assert cell("slow", "rsum", [0, 1, 2]) in line and cell("slow", "top1", [0, 1, 2]) in line
    assert out.count("│ clip") == 1  # one table, not one per metric
