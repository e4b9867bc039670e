"""`vlpgraph report`: a metric by variant x grid point, mean ± std over seeds, from the store.

The trials come from expanding the graph file (so the report shows exactly that experiment, even
when its trials were computed by another graph with the same trainer); values are the evaluations
at each run's final step.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

from rich.table import Table

from vlpgraph.analysis import crossing, format_cell, interpolate  # noqa: F401  (one copy, shared with the app)
from vlpgraph.store import Store
from vlpgraph.sweep import Experiment


def mean_std(values: list[float]) -> tuple[float, float, int]:
    n = len(values)
    return statistics.fmean(values), (statistics.stdev(values) if n > 1 else 0.0), n


def fmt_cell(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    return format_cell(*mean_std(values), digits)


def default_metrics(exp: Experiment) -> list[str]:
    """Each evaluator's headline metric, evaluators in file order across all variants."""
    out: list[str] = []
    for trial in exp.trials:
        for name, node in trial.graph.nodes.items():
            headline = getattr(node.kind.output, "headline", None) if node.kind.role == "evaluator" else None
            if headline and f"{name}.{headline}" not in out:
                out.append(f"{name}.{headline}")
    return out


def final_values(exp: Experiment, store: Store) -> dict[str, dict[str, float]]:
    """run_id -> {"evaluator.metric": value at the run's final step} for completed runs.

    Only rows the evaluator as it is in this graph wrote count: a row whose evaluator_hash differs
    from the node's hash now (the evaluator was edited and the trial not re-run since) is left out;
    a row without a hash (a store older than the column) is kept, as nothing says it is stale."""
    ids = [t.run_id for t in exp.trials]
    runs = {r["run_id"]: r for r in store.runs() if r["run_id"] in set(ids)}
    current = {t.run_id: {n: t.graph.nodes[n].hash for n in t.graph.by_role("evaluator")} for t in exp.trials}
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for row in store.evals(run_ids=ids):
        run = runs.get(row["run_id"])
        if run is None or run.get("status") != "completed" or row["step"] != run.get("step"):
            continue
        found = row.get("evaluator_hash")
        if found is not None and found != current[row["run_id"]].get(row["evaluator"]):
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
    for metric in metrics:
        eff = data_efficiency(exp, store, metric)
        if eff is not None:
            tables.append(eff)
    return tables


def data_efficiency(exp: Experiment, store: Store, metric: str, baseline: str | None = None) -> Table | None:
    """TiMix's headline, generalised: for each variant, the smallest train fraction at which its mean
    ``metric`` reaches the baseline's at the largest fraction (linear interpolation between grid
    points), and the share of the baseline's training time that took. Needs a grid over exactly one
    ``*.train_fraction`` param; the baseline is the variant named ``baseline`` or else the first."""
    grid_keys = list(exp.trials[0].grid)
    if len(grid_keys) != 1 or not grid_keys[0].endswith(".train_fraction"):
        return None
    key = grid_keys[0]
    variants = list(dict.fromkeys(t.variant for t in exp.trials))
    baseline = baseline or ("baseline" if "baseline" in variants else variants[0])
    values = final_values(exp, store)
    curves: dict[str, dict[float, tuple[list[float], list[float]]]] = defaultdict(lambda: defaultdict(lambda: ([], [])))
    for t in exp.trials:
        v = values.get(t.run_id, {})
        if metric in v and "wall_s" in v:
            m, w = curves[t.variant][float(t.grid[key])]
            m.append(v[metric])
            w.append(v["wall_s"])
    if baseline not in curves:
        return None
    base = curves[baseline]
    top = max(base)
    target = statistics.fmean(base[top][0])
    base_time = statistics.fmean(base[top][1])
    table = Table(title=f"data efficiency: fraction of the data (and of {baseline}'s training time) at which each "
                        f"variant reaches {baseline}'s {metric} at {key}={top} ({target:.3f})")
    for col in ("variant", "fraction needed", "time share", f"{metric} at {key}={top}"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for variant in variants:
        curve = curves.get(variant)
        if not curve:
            table.add_row(variant, "-", "-", "-")
            continue
        xs = sorted(curve)
        ys = [statistics.fmean(curve[x][0]) for x in xs]
        ws = [statistics.fmean(curve[x][1]) for x in xs]
        f = crossing(xs, ys, target)
        at_top = f"{ys[-1]:.3f}" if xs[-1] == top else "-"
        if f is None:
            table.add_row(variant, "never (within the grid)", "-", at_top)
        else:
            table.add_row(variant, f"{f:.2f}", f"{interpolate(xs, ws, f) / base_time:.1%}", at_top)
    return table
