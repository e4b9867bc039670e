"""`vlpgraph report`: metrics by variant (x grid point), mean ± std over seeds, from the store.

The trials come from expanding the graph file (so the report shows exactly that experiment, even
when its trials were computed by another graph with the same trainer); values are the evaluations
at each run's final step. A sweep with a grid gets one table per metric (variant x grid point); a
sweep of variants and seeds only (graphs/mug.yaml) gets one variant x metric table.

A report never answers with an empty table and exit 0: when none of the experiment's trials is in
the store, or a ``--metric`` names nothing these trials have, :func:`build_report` raises a
:class:`UserError` that says what was looked for and what the store holds instead (runs of the same
graph under other params, and which of the file's profiles would find them).
"""

from __future__ import annotations

import json
import statistics
from collections import Counter, defaultdict
from typing import Any

from rich.table import Table
from rich.text import Text

from vlpgraph.results.analysis import crossing, format_cell, interpolate  # noqa: F401  (one copy, shared with the app)
from vlpgraph.errors import UserError, did_you_mean
from vlpgraph.store import Store
from vlpgraph.engine.sweep import Experiment, Trial


def mean_std(values: list[float]) -> tuple[float, float, int]:
    n = len(values)
    return statistics.fmean(values), (statistics.stdev(values) if n > 1 else 0.0), n


def fmt_cell(values: list[float], digits: int = 3, statuses: tuple[str, ...] = ()) -> str:
    """'mean ± std (n)'; without values, the cell's trials' unfinished statuses ('failed', 'running',
    ...; joined by '/') or '-' when none of them is in the store yet."""
    if not values:
        return "/".join(statuses) or "-"
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


def build_report(exp: Experiment, store: Store, metrics: list[str] | None = None, *,
                 sets: list[tuple[str, Any]] = (), profile: str | None = None) -> list[Table | Text]:
    """The report's tables: each metric (default: each evaluator's headline), then wall time, by
    variant x grid point; a sweep without a grid gets one variant x metric table instead (metrics,
    then wall time, as columns). Then a line explaining empty cells when some trial is not done, and
    the data-efficiency table where the grid allows one.

    sets, profile: the ``--set`` / ``--profile`` the experiment was expanded with; only used to say
    which other profile would find the stored runs when none of these trials is in the store.
    Raises UserError when none of the trials is in the store, or when a metric in ``metrics`` names
    nothing that these trials have logged (with a did-you-mean among those that exist)."""
    ids = {t.run_id for t in exp.trials}
    statuses = {r["run_id"]: r.get("status") for r in store.runs() if r["run_id"] in ids}
    if not statuses:
        raise UserError(nothing_stored(exp, store, sets=sets, profile=profile))
    values = final_values(exp, store)
    if metrics:
        check_metrics(exp, store, metrics, values)
    metrics = list(metrics or default_metrics(exp) or sorted({k for v in values.values() for k in v if k != "wall_s"}))
    metrics = [m for m in metrics if m != "wall_s"]  # wall time always gets its own table (or column)
    grid_keys = list(exp.trials[0].grid)
    points = list(dict.fromkeys(tuple(t.grid.get(k) for k in grid_keys) for t in exp.trials))
    variants = list(dict.fromkeys(t.variant for t in exp.trials))
    done = sum(1 for t in exp.trials if "wall_s" in values.get(t.run_id, {}))
    # why a cell is empty: its trials' statuses other than completed (absent from the store: none)
    unfinished: dict[tuple, set[str]] = defaultdict(set)
    for t in exp.trials:
        status = statuses.get(t.run_id)
        if status is not None and status != "completed":
            unfinished[(t.variant, tuple(t.grid.get(k) for k in grid_keys))].add(status)
    tables: list[Table | Text] = []
    if not grid_keys:  # variants x seeds only (graphs/mug.yaml): one table, a column per metric
        tables.append(variant_table(exp, values, metrics, unfinished, done))
    else:  # a table per metric, variant x grid point
        for metric in metrics + ["wall_s"]:
            cells: dict[tuple, list[float]] = defaultdict(list)
            for t in exp.trials:
                v = values.get(t.run_id, {}).get(metric)
                if v is not None:
                    cells[(t.variant, tuple(t.grid.get(k) for k in grid_keys))].append(v)
            title = f"{exp.name}: {metric}" + (" (seconds per trial)" if metric == "wall_s" else "") + f" — mean ± std (n seeds); {done}/{len(exp.trials)} trials done"
            table = Table(title=title)
            table.add_column("variant \\ " + ", ".join(grid_keys))
            for pt in points:
                table.add_column(", ".join(str(x) for x in pt), justify="right")
            for v in variants:
                table.add_row(v, *[fmt_cell(cells.get((v, pt), []), 1 if metric == "wall_s" else 3,
                                            tuple(sorted(unfinished.get((v, pt), ())))) for pt in points])
            tables.append(table)
    if done < len(exp.trials):
        tables.append(Text("a cell without results: '-' none yet (not run, or not evaluated); else the status of its trials "
                           "that did not complete (failed, running, ...)"))
    for metric in metrics:
        eff = data_efficiency(exp, store, metric)
        if eff is not None:
            tables.append(eff)
    return tables


def variant_table(exp: Experiment, values: dict[str, dict[str, float]], metrics: list[str],
                  unfinished: dict[tuple, set[str]], done: int) -> Table:
    """The report of a sweep without a grid: a row per variant, a column per metric and a last one for
    wall time, each cell 'mean ± std (n)' over the variant's seeds (or its trials' unfinished statuses)."""
    title = (f"{exp.name}: variant x metric — mean ± std (n seeds), at each run's final step; "
             f"{done}/{len(exp.trials)} trials done")
    table = Table(title=title)
    table.add_column("variant")
    for metric in metrics:
        table.add_column(metric, justify="right")
    table.add_column("wall_s (seconds per trial)", justify="right")
    for variant in dict.fromkeys(t.variant for t in exp.trials):
        runs = [values.get(t.run_id, {}) for t in exp.trials if t.variant == variant]
        statuses = tuple(sorted(unfinished.get((variant, ()), ())))
        table.add_row(variant, *[fmt_cell([v[m] for v in runs if m in v], 1 if m == "wall_s" else 3, statuses)
                                 for m in [*metrics, "wall_s"]])
    return table


def check_metrics(exp: Experiment, store: Store, metrics: list[str], values: dict[str, dict[str, float]]) -> None:
    """UserError for each requested metric that none of the trials has logged (at any step), with a
    did-you-mean among those they have; nothing to say while no trial has logged any evaluation."""
    known = {f"{r['evaluator']}.{r['metric']}" for r in store.evals(run_ids=[t.run_id for t in exp.trials])}
    known |= {k for v in values.values() for k in v}
    if not known:
        return
    known.add("wall_s")
    problems = []
    for m in metrics:
        if m in known:
            continue
        # list the evaluator's own metrics when it has some, else all of them
        same = sorted(k for k in known if k.split(".")[0] == m.split(".")[0])
        listed = f"{m.split('.')[0]}'s metrics: {', '.join(same)}" if same else f"metrics there: {', '.join(sorted(known))}"
        problems.append(f"--metric {m}: no trial of graph '{exp.name}' has this metric{did_you_mean(m, known)} ({listed})")
    if problems:
        raise UserError(problems)


# ---------------------------------------------------------------- nothing stored: say what is there


def _flat_document(document: dict, seed: Any) -> dict[str, Any]:
    """A trial document (runs.params) -> {'node.param': value, 'seed': seed}."""
    flat = {f"{node}.{k}": v for node, spec in (document.get("nodes") or {}).items()
            for k, v in (spec.get("params") or {}).items()}
    flat["seed"] = seed
    return flat


def _show(value: Any) -> str:
    """A param value as the YAML would spell it: 2 for 2.0 (JSON gives ints of float params as floats)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return value if isinstance(value, str) else json.dumps(value)


_ABSENT = object()


def _differences(stored: dict[str, Any], here: dict[str, Any]) -> tuple[tuple[str, str, str], ...]:
    """(key, stored value, value here) for every key whose values differ, sorted by key."""
    out = []
    for key in sorted(set(stored) | set(here)):
        a, b = stored.get(key, _ABSENT), here.get(key, _ABSENT)
        if a != b:
            out.append((key, "(absent)" if a is _ABSENT else _show(a), "(absent)" if b is _ABSENT else _show(b)))
    return tuple(out)


def describe_differences(runs: list[dict], trials: list[Trial], groups: int = 3, keys: int = 4) -> str:
    """How stored runs differ from the expanded trials: '15 runs with train.epochs=2 (here 5), ...'.

    Each run is compared with the closest trial (same variant where there is one); runs that differ in
    the same way are counted together; the largest ``groups`` groups, ``keys`` keys each, are named."""
    here = [(t.variant, _flat_document(t.document(), t.seed)) for t in trials]
    counts: Counter = Counter()
    for run in runs:
        try:
            document = json.loads(run.get("params") or "{}")
        except ValueError:
            document = {}
        stored = _flat_document(document, run.get("seed"))
        same_variant = [flat for variant, flat in here if variant == run.get("variant")]
        counts[min((_differences(stored, flat) for flat in same_variant or [f for _, f in here]), key=len)] += 1
    parts = []
    for diff, n in counts.most_common(groups):
        what = "s" if n > 1 else ""
        if not diff:
            parts.append(f"{n} run{what} with the same params (another vlpgraph version, other wiring or other data?)")
            continue
        named = ", ".join(f"{k}={a} (here {b})" for k, a, b in diff[:keys])
        more = f" and {len(diff) - keys} more params" if len(diff) > keys else ""
        parts.append(f"{n} run{what} with {named}{more}")
    if len(counts) > groups:
        parts.append(f"{sum(n for _, n in counts.most_common()[groups:])} more")
    return "; ".join(parts)


def matching_profiles(exp: Experiment, stored_ids: set[str], sets: list[tuple[str, Any]] = (),
                      profile: str | None = None) -> list[str | None]:
    """The file's profiles (None: no profile) other than ``profile`` whose expanded trials include a
    stored run id, with the same ``sets``; profiles that do not expand cleanly are skipped."""
    from vlpgraph.engine.spec import load_yaml
    from vlpgraph.engine.sweep import load_experiment

    data, _ = load_yaml(exp.file)
    names = list((data.get("profiles") or {}) if isinstance(data, dict) else {})
    found: list[str | None] = []
    for name in [None, *names]:
        if name == profile:
            continue
        try:
            other = load_experiment(exp.file, sets=list(sets), profile=name)
        except UserError:
            continue
        if any(t.run_id in stored_ids for t in other.trials):
            found.append(name)
    return found


def nothing_stored(exp: Experiment, store: Store, *, sets: list[tuple[str, Any]] = (),
                   profile: str | None = None) -> str:
    """One line for a report none of whose trials is in the store: what was looked for, what the store
    holds under this graph name (how those runs' params differ) or else which graphs it holds, and
    which profile of the file would find them."""
    looked = f"none of the {len(exp.trials)} trial(s) of graph '{exp.name}' ({exp.file}"
    looked += "".join(f", --set {k}={_show(v)}" for k, v in sets) + (f", --profile {profile}" if profile else "")
    looked += f") is in the store {store.root}"
    every = store.runs()
    same = [r for r in every if r.get("graph") == exp.name]
    if not same:
        graphs = sorted({r["graph"] for r in every if r.get("graph")})
        there = (f"graphs there: {', '.join(graphs)}{did_you_mean(exp.name, graphs)}" if graphs
                 else "it holds no runs")
        return f"{looked}, nor any run of that graph name ({there}); `vlpgraph run {exp.file}` runs them"
    line = f"{looked}; runs of graph '{exp.name}' exist there under other params: {describe_differences(same, exp.trials)}"
    profiles = matching_profiles(exp, {r["run_id"] for r in same}, sets, profile)
    if profiles and profile is None:
        line += f"; did you forget {' or '.join(f'--profile {p}' for p in profiles)}?"
    elif profiles:
        line += "; try " + " or ".join(f"--profile {p}" if p else "without --profile" for p in profiles)
    return line


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
