"""`vlpgraph report`: a metric by variant x grid point, mean ± std over seeds, from the store.

The trials come from expanding the graph file (so the report shows exactly that experiment, even
when its trials were computed by another graph with the same trainer); values are the evaluations
at each run's final step.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

from rich.table import Table

from vlpgraph.store import Store
from vlpgraph.sweep import Experiment


def mean_std(values: list[float]) -> tuple[float, float, int]:
    n = len(values)
    return statistics.fmean(values), (statistics.stdev(values) if n > 1 else 0.0), n


def fmt_cell(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    m, s, n = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f} ({n})"


def default_metrics(exp: Experiment) -> list[str]:
    graph = exp.trials[0].graph
    out = []
    for name in graph.by_role("evaluator"):
        headline = getattr(graph.nodes[name].kind.output, "headline", None)
        if headline:
            out.append(f"{name}.{headline}")
    return out


def final_values(exp: Experiment, store: Store) -> dict[str, dict[str, float]]:
    """run_id -> {"evaluator.metric": value at the run's final step} for completed runs."""
    ids = [t.run_id for t in exp.trials]
    runs = {r["run_id"]: r for r in store.runs() if r["run_id"] in set(ids)}
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for row in store.evals(run_ids=ids):
        run = runs.get(row["run_id"])
        if run is None or run.get("status") != "completed" or row["step"] != run.get("step"):
            continue
        out[row["run_id"]][f"{row['evaluator']}.{row['metric']}"] = row["value"]
    for rid, run in runs.items():
        if run.get("status") == "completed" and run.get("wall_s") is not None:
            out[rid]["wall_s"] = float(run["wall_s"])
    return out


def build_report(exp: Experiment, store: Store, metrics: list[str] | None = None) -> list[Table]:
    values = final_values(exp, store)
    metrics = list(metrics or default_metrics(exp) or sorted({k for v in values.values() for k in v if k != "wall_s"}))
    grid_keys = list(exp.trials[0].grid)
    points = list(dict.fromkeys(tuple(t.grid.get(k) for k in grid_keys) for t in exp.trials))
    variants = list(dict.fromkeys(t.variant for t in exp.trials))
    done = sum(1 for t in exp.trials if "wall_s" in values.get(t.run_id, {}))
    tables = []
    for metric in metrics + ["wall_s"]:
        cells: dict[tuple, list[float]] = defaultdict(list)
        for t in exp.trials:
            v = values.get(t.run_id, {}).get(metric)
            if v is not None:
                cells[(t.variant, tuple(t.grid.get(k) for k in grid_keys))].append(v)
        title = f"{exp.name}: {metric}" + (" (seconds per trial)" if metric == "wall_s" else "") + f" — mean ± std (n seeds); {done}/{len(exp.trials)} trials done"
        table = Table(title=title)
        table.add_column("variant \\ " + (", ".join(grid_keys) if grid_keys else ""))
        for pt in points:
            table.add_column(", ".join(str(x) for x in pt) if grid_keys else "all", justify="right")
        for v in variants:
            table.add_row(v, *[fmt_cell(cells.get((v, pt), []), 1 if metric == "wall_s" else 3) for pt in points])
        tables.append(table)
    return tables
