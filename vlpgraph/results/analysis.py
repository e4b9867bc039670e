"""Read-side queries for the analysis app: whole tables, aggregated inside DuckDB.

The app (``app/``) draws what these functions return; they hold every SQL statement it runs, so
the app itself never builds a query. Rules they keep:

- Aggregates (mean, std, n over seeds; best/last values; curve downsampling) are computed by DuckDB
  over *all* matching rows, never on a sample, and only the aggregated rows travel to Python.
- A user's value (a filter string, a run id, a metric name) reaches SQL only as a bound parameter.
  A column name cannot be bound, so it must be one of the table's real columns (looked up in
  DuckDB's catalog) and is then quoted; anything else is a :class:`~vlpgraph.errors.UserError`.
- Nothing here imports torch or the node registry: the app starts in about a second.

Runs are read with the status a reader should see: a ``running`` run whose runner gave no sign of
life for longer than the lease (runs.heartbeat_at, $VLPGRAPH_LEASE_S) reads as ``stale`` everywhere
here, in filters too. Evaluations are read as their current version: when an evaluator was edited
and a trial re-evaluated, the rows an older version wrote at other steps (runs.evaluator_hash
differs from that of the evaluator's latest evaluation of the run) are left out.

Filters are tuples ``(column, op, value)`` (hashable, so the app can cache on them); the operators
and how each becomes SQL are vlpgraph.store.filter_clause's (``in``, ``contains``, ``between``,
``=``, ``!=``, ``>=``, ``<=``), shared with Store.runs(where=...).
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from vlpgraph.errors import UserError, did_you_mean
from vlpgraph.store import (
    STALE, STATUSES, Store, column_types_of, filter_clause, lease_cutoff, quote_ident, status_sql, validate_run_id,
)

Filter = tuple[str, str, Any]
# Core columns the runs page shows before the swept params.
RUN_COLUMNS = ("run_id", "status", "graph", "variant", "seed")
RUN_TAIL_COLUMNS = ("step", "wall_s", "created_at")
# A metric is minimised when its name contains one of these; every other metric is maximised.
LOWER_IS_BETTER = ("loss", "error", "wrong_object")
WALL_S = "wall_s"  # the pseudo-metric "training wall time of the run" (runs.wall_s)


def lower_is_better(name: str) -> bool:
    return any(word in name for word in LOWER_IS_BETTER)


# --------------------------------------------------------------------------- filters -> SQL


def _runs_columns(con) -> dict[str, tuple[str, str]]:
    return column_types_of(con, "runs")


def _column(columns: dict[str, tuple[str, str]], name: str) -> tuple[str, str]:
    found = columns.get(str(name).lower())
    if found is None:
        names = [n for n, _ in columns.values()]
        raise UserError(f"unknown runs column {str(name)!r}{did_you_mean(str(name), names)}")
    return found


def where_sql(columns: dict[str, tuple[str, str]], filters: Iterable[Filter], alias: str = "r") -> tuple[str, list]:
    """(" AND ..." clauses, bound values) for filters over the runs table aliased ``alias``."""
    clauses: list[str] = []
    values: list[Any] = []
    for column, op, value in filters:
        name, dtype = _column(columns, column)
        if op == "in" and not isinstance(value, (list, tuple, set, frozenset)):
            value = (value,)
        clause, bound = filter_clause(f"{alias}.{quote_ident(name)}", name, dtype, op, value)
        clauses.append(clause)
        values.extend(bound)
    return "".join(f" AND {c}" for c in clauses), values


def _runs(con, alias: str = "r") -> str:
    """``runs`` as readers see it (FROM clause text): status 'stale' for a running run whose runner
    fell silent longer than the lease (see vlpgraph.store.shown_status)."""
    status = status_sql(column_types_of(con, "runs"), "runs", lease_cutoff())
    return f"(SELECT * REPLACE ({status} AS status) FROM runs) {alias}"


def _evals(con) -> str:
    """``evals`` without the rows an older version of an evaluator wrote (FROM clause text, alias e):
    an evaluator's rows of a run are those with the hash of its latest evaluation of that run (rows
    without a hash, from stores older than the column, are kept)."""
    if "evaluator_hash" not in column_types_of(con, "evals"):
        return "evals e"
    return ("(SELECT x.* FROM evals x JOIN (SELECT run_id, evaluator, arg_max(evaluator_hash, step) AS h FROM evals "
            "GROUP BY run_id, evaluator) c ON c.run_id = x.run_id AND c.evaluator = x.evaluator "
            "WHERE x.evaluator_hash IS NULL OR c.h IS NULL OR x.evaluator_hash = c.h) e")


def _df(con, sql: str, values: Sequence[Any] = ()) -> pd.DataFrame:
    return con.execute(sql, list(values)).df()


# --------------------------------------------------------------------------- overview


def overview(store: Store) -> dict[str, Any]:
    """Counts by graph and status, newest graph first (one small query)."""
    rows = store.read(lambda con: [dict(zip(("graph", "status", "n", "newest"), row)) for row in con.execute(
        f"SELECT graph, status, count(*) AS n, max(created_at) AS newest FROM {_runs(con)} GROUP BY graph, status").fetchall()])
    graphs: dict[str, dict[str, Any]] = {}
    for r in rows:
        g = graphs.setdefault(r["graph"], {"graph": r["graph"], "runs": 0, "newest": r["newest"]})
        g["runs"] += r["n"]
        g[r["status"]] = r["n"]
        if r["newest"] is not None and (g["newest"] is None or r["newest"] > g["newest"]):
            g["newest"] = r["newest"]
    ordered = sorted(graphs.values(), key=lambda g: (g["newest"] is not None, g["newest"]), reverse=True)
    return {"runs": sum(g["runs"] for g in ordered), "graphs": ordered,
            "status": {s: sum(g.get(s, 0) for g in ordered) for s in (*STATUSES, STALE)}}


def filter_columns(store: Store) -> dict[str, str]:
    """Every runs column a filter or a grouping may use -> its SQL type."""
    skip = {"params", "error"}
    return {n: t for n, t in store.column_types("runs").items() if n not in skip}


def distinct_values(store: Store, columns: Sequence[str], filters: Sequence[Filter] = (), limit: int = 50) -> dict[str, list]:
    """For each column: its distinct values among the matching runs (None = more than ``limit``)."""
    if not columns:
        return {}

    def q(con):
        cols = _runs_columns(con)
        where, values = where_sql(cols, filters)
        out: dict[str, list | None] = {}
        for c in columns:
            ident = quote_ident(_column(cols, c)[0])
            rows = con.execute(f"SELECT DISTINCT r.{ident} FROM {_runs(con)} WHERE TRUE{where} ORDER BY 1 NULLS LAST "
                               f"LIMIT {int(limit) + 1}", values).fetchall()
            out[c] = None if len(rows) > limit else [v for (v,) in rows]
        return out

    return store.read(q)


def swept_columns(store: Store, filters: Sequence[Filter] = ()) -> list[str]:
    """The flattened params (``node.param`` columns) that take more than one value among the matching runs."""
    def q(con):
        cols = _runs_columns(con)
        params = [n for n, _ in cols.values() if "." in n]
        if not params:
            return []
        where, values = where_sql(cols, filters)
        # min != max is "more than one non-null value", ~10x cheaper than count(DISTINCT) per column
        varies = con.execute(
            "SELECT " + ", ".join(f"min(r.{quote_ident(p)}) IS DISTINCT FROM max(r.{quote_ident(p)})" for p in params)
            + f" FROM {_runs(con)} WHERE TRUE{where}", values).fetchone()
        return [p for p, v in zip(params, varies) if v]
    return store.read(q)


def eval_metrics(store: Store, filters: Sequence[Filter] = ()) -> pd.DataFrame:
    """Every ``evaluator.metric`` the matching runs have (name, headline: whether it is its
    evaluator's headline metric, runs: how many runs have it), by name."""
    def q(con):
        cols = _runs_columns(con)
        where, values = where_sql(cols, filters)
        has_flag = "headline" in column_types_of(con, "evals")
        flag = "bool_or(coalesce(e.headline, FALSE))" if has_flag else "FALSE"
        return _df(con, f"SELECT e.evaluator || '.' || e.metric AS name, {flag} AS headline, "
                        "count(DISTINCT e.run_id) AS runs "
                        f"FROM {_evals(con)} JOIN {_runs(con)} ON r.run_id = e.run_id WHERE TRUE{where} "
                        f"GROUP BY 1 ORDER BY 1", values)
    return store.read(q)


def headline_metrics(metrics: pd.DataFrame) -> list[str]:
    """The headline metrics of eval_metrics' table, those more runs have first. Stores written before evals had a headline flag
    get each evaluator's first metric that is not a count (n, n_*) or a chance level (chance*)."""
    if not len(metrics):
        return []
    metrics = metrics.sort_values("runs", ascending=False, kind="stable")  # metrics every run has first
    flagged = metrics.loc[metrics["headline"].astype(bool), "name"].tolist()
    if flagged:
        return flagged
    first: dict[str, str] = {}
    for name in metrics["name"]:
        evaluator, metric = name.split(".", 1)
        if metric != "n" and not metric.startswith(("n_", "chance")):
            first.setdefault(evaluator, name)
    return list(first.values())


# --------------------------------------------------------------------------- runs page


def runs_table(store: Store, filters: Sequence[Filter] = (), metrics: Sequence[str] = (),
               mode: str = "last", step: int | None = None, params: Sequence[str] = ()) -> pd.DataFrame:
    """One row per matching run: core columns, the given param columns, one column per metric, then
    step, wall_s and created_at.

    ``mode``: ``last`` = the value at the run's latest evaluation, ``best`` = max (min for losses)
    over its evaluations, ``step`` = the latest evaluation at or before ``step``.
    """
    if mode not in ("last", "best", "step"):
        raise UserError(f"mode must be last, best or step, got {mode!r}")
    if mode == "step" and step is None:
        raise UserError("mode 'step' needs a step")
    metrics = list(dict.fromkeys(metrics))

    def q(con):
        cols = _runs_columns(con)
        where, values = where_sql(cols, filters)
        shown = [quote_ident(_column(cols, c)[0]) for c in (*RUN_COLUMNS, *params, *RUN_TAIL_COLUMNS)]
        select = ", ".join(f"r.{c}" for c in shown)
        if not metrics:
            return _df(con, f"SELECT {select} FROM {_runs(con)} WHERE TRUE{where} ORDER BY r.created_at, r.run_id", values)
        if mode == "best":
            value = ("CASE WHEN " + " OR ".join(f"contains(name, '{w}')" for w in LOWER_IS_BETTER)
                     + " THEN min(value) ELSE max(value) END")
        else:
            value = "arg_max(value, step)"
        step_clause = " AND e.step <= ?" if mode == "step" else ""
        pivots = ", ".join(f"max(a.v) FILTER (WHERE a.name = ?) AS {quote_ident(m)}" for m in metrics)
        sql = (
            f"WITH sel AS (SELECT {select} FROM {_runs(con)} WHERE TRUE{where}), "
            f"e AS (SELECT e.run_id, e.evaluator || '.' || e.metric AS name, e.step, e.value FROM {_evals(con)} "
            "      WHERE e.run_id IN (SELECT run_id FROM sel) "
            f"      AND e.evaluator || '.' || e.metric IN (SELECT unnest(?::VARCHAR[])){step_clause}), "
            f"a AS (SELECT run_id, name, {value} AS v FROM e GROUP BY run_id, name) "
            f"SELECT sel.*, {pivots} FROM sel LEFT JOIN a ON a.run_id = sel.run_id "
            f"GROUP BY ALL ORDER BY sel.created_at, sel.run_id"
        )
        bound = values + [metrics] + ([int(step)] if mode == "step" else []) + metrics
        frame = _df(con, sql, bound)
        order = [*RUN_COLUMNS, *params, *metrics, *RUN_TAIL_COLUMNS]  # metrics before the bookkeeping
        return frame[[c for c in order if c in frame.columns]]

    return store.read(q)


def run_labels(table: pd.DataFrame, params: Sequence[str] = ()) -> dict[str, str]:
    """run_id -> a short readable label: graph/variant, the given params' values (those the run
    has), seed, id prefix."""
    out = {}
    for row in table.to_dict("records"):
        bits = [f"{row.get('graph')}/{row.get('variant')}"]
        bits += [f"{p.split('.')[-1]}={_short(row[p])}" for p in params if p in row and not _missing(row[p])]
        bits += [f"s{row.get('seed')}", str(row["run_id"])[:8]]
        out[row["run_id"]] = " · ".join(bits)
    return out


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def run_documents(store: Store, run_ids: Sequence[str]) -> dict[str, dict]:
    """run_id -> the resolved trial document (graph, variant, seed, grid, nodes) stored with the run."""
    ids = [validate_run_id(r) for r in run_ids]
    if not ids:
        return {}
    rows = store.query("SELECT run_id, params FROM runs WHERE run_id IN (SELECT unnest(?::VARCHAR[]))", [ids])
    return {r["run_id"]: json.loads(r["params"]) if r["params"] else {} for r in rows}


def flatten_document(doc: dict) -> dict[str, Any]:
    """A trial document as flat ``key -> value``: graph, variant, seed, then node.kind, node.inputs
    and node.param for every node."""
    flat: dict[str, Any] = {k: doc.get(k) for k in ("graph", "variant", "seed")}
    for name, node in (doc.get("nodes") or {}).items():
        flat[f"{name}.kind"] = node.get("kind")
        if node.get("inputs"):
            flat[f"{name}.inputs"] = json.dumps(node["inputs"], sort_keys=True)
        for key, value in (node.get("params") or {}).items():
            flat[f"{name}.{key}"] = value if not isinstance(value, (list, dict)) else json.dumps(value)
    return flat


def config_diff(store: Store, run_ids: Sequence[str]) -> pd.DataFrame:
    """Rows = the config keys whose values differ between the runs (a key missing from a run counts
    as different), columns = run ids in the order given."""
    docs = run_documents(store, run_ids)
    flats = {rid: flatten_document(docs[rid]) for rid in run_ids if rid in docs}
    keys = list(dict.fromkeys(k for f in flats.values() for k in f))
    missing = object()
    rows = {}
    for key in keys:
        vals = [f.get(key, missing) for f in flats.values()]
        if any(v != vals[0] for v in vals[1:]):
            rows[key] = ["—" if v is missing else _short(v) for v in vals]
    frame = pd.DataFrame.from_dict(rows, orient="index", columns=list(flats))
    frame.index.name = "key"
    return frame


def metric_names(store: Store, run_ids: Sequence[str]) -> list[str]:
    """Names of the training values (loss, lr, samples_per_s, ...) logged by any of the runs."""
    ids = [validate_run_id(r) for r in run_ids]
    if not ids:
        return []
    rows = store.query("SELECT DISTINCT name FROM metrics WHERE run_id IN (SELECT unnest(?::VARCHAR[])) ORDER BY name",
                       [ids])
    names = [r["name"] for r in rows]
    return sorted(names, key=lambda n: (n != "loss", n))


def curves(store: Store, run_ids: Sequence[str], name: str, max_points: int = 400) -> pd.DataFrame:
    """Training curves of ``name`` for the runs, downsampled in DuckDB to at most ``max_points``
    points per run: the step range is cut into equal buckets and each bucket gives its mean step,
    value and wall time (and how many rows it averages). Runs with fewer rows come back whole."""
    ids = [validate_run_id(r) for r in run_ids]
    if not ids:
        return pd.DataFrame(columns=["run_id", "step", "value", "wall_s", "n"])
    return store.query_df(
        "WITH m AS (SELECT run_id, step, value, wall_s FROM metrics "
        "           WHERE run_id IN (SELECT unnest(?::VARCHAR[])) AND name = ?), "
        "span AS (SELECT run_id, min(step) AS lo, max(step) AS hi FROM m GROUP BY run_id) "
        "SELECT m.run_id, avg(m.step) AS step, avg(m.value) AS value, avg(m.wall_s) AS wall_s, count(*) AS n "
        "FROM m JOIN span ON span.run_id = m.run_id "
        "GROUP BY m.run_id, floor((m.step - span.lo) * ? / (span.hi - span.lo + 1)) "
        "ORDER BY m.run_id, step",
        [ids, str(name), int(max_points)])


def ema(values: Sequence[float], weight: float) -> list[float]:
    """TensorBoard's debiased exponential moving average (weight 0 = raw, 0.99 = very smooth).
    Applied to the points the chart shows (already bucket means when a curve was downsampled)."""
    out, last, num = [], 0.0, 0
    for v in values:
        if v is None or not math.isfinite(v):
            out.append(v)
            continue
        last = last * weight + (1 - weight) * v
        num += 1
        out.append(last / (1 - weight ** num) if weight > 0 else v)
    return out


# --------------------------------------------------------------------------- ablations


def _metric_source(metric: str) -> tuple[str, list[Any]]:
    """(join + condition, bound values) giving ``v`` for a metric name: ``evaluator.metric`` is the
    evaluation at the run's final step; ``wall_s`` is the run's training wall time."""
    if metric == WALL_S:
        return "SELECT r.*, r.wall_s AS v FROM runs r WHERE r.status = 'completed'", []
    if "." not in metric:
        raise UserError(f"metric {metric!r}: expected evaluator.metric (e.g. retrieval.rsum) or wall_s")
    evaluator, name = metric.split(".", 1)
    return ("SELECT r.*, e.value AS v FROM runs r JOIN evals e ON e.run_id = r.run_id AND e.step = r.step "
            "WHERE r.status = 'completed' AND e.evaluator = ? AND e.metric = ?", [evaluator, name])


def aggregate(store: Store, metric: str, rows: str, cols: str | None = None,
              filters: Sequence[Filter] = ()) -> pd.DataFrame:
    """Long table (row, col, mean, std, n, wall_s): ``metric`` over completed runs grouped by the
    ``rows`` and ``cols`` columns, computed by DuckDB over every matching run (std is the sample
    std over seeds; 0 when n = 1). ``wall_s`` is the mean wall time of the group."""
    def q(con):
        columns = _runs_columns(con)
        row_ident = quote_ident(_column(columns, rows)[0])
        col_ident = quote_ident(_column(columns, cols)[0]) if cols else "NULL"
        where, values = where_sql(columns, filters, alias="r")
        source, bound = _metric_source(metric)
        sql = (f"WITH r AS ({source}) "
               f"SELECT r.{row_ident} AS row, {'r.' + col_ident if cols else 'NULL'} AS col, "
               "avg(r.v) AS mean, coalesce(stddev_samp(r.v), 0) AS std, count(r.v) AS n, "
               "coalesce(stddev_samp(r.wall_s), 0) AS wall_std, avg(r.wall_s) AS wall_s "
               f"FROM r WHERE r.v IS NOT NULL{where} GROUP BY 1, 2 ORDER BY 1 NULLS LAST, 2 NULLS LAST")
        return _df(con, sql, bound + values)
    return store.read(q)


def format_cell(mean: float, std: float, n: int, digits: int = 3) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f} ({int(n)})"


def pivot_table(long: pd.DataFrame, rows: str, cols: str | None, digits: int = 3) -> pd.DataFrame:
    """The table the ablations page shows (and downloads): rows x cols of 'mean ± std (n)' strings."""
    col_name = cols or "all"
    if long.empty:
        return pd.DataFrame(index=pd.Index([], name=rows))
    frame = long.assign(cell=[format_cell(m, s, n, digits) for m, s, n in zip(long["mean"], long["std"], long["n"])],
                        row=long["row"].map(_short), col=long["col"].map(_short) if cols else "all")
    row_order = list(dict.fromkeys(frame["row"]))
    col_order = list(dict.fromkeys(frame.sort_values("col", key=_numeric_first)["col"]))
    table = frame.pivot(index="row", columns="col", values="cell").reindex(index=row_order, columns=col_order)
    table = table.fillna("–")
    table.index.name = rows
    table.columns.name = col_name
    return table


def _numeric_first(series: pd.Series) -> pd.Series:
    as_num = pd.to_numeric(series, errors="coerce")
    return as_num.fillna(math.inf) if as_num.notna().any() else series


# --------------------------------------------------------------------------- data efficiency


def crossing(xs: list[float], ys: list[float], target: float) -> float | None:
    """Smallest x at which the piecewise-linear curve (xs ascending) reaches ``target``; None if never."""
    for i, (x, y) in enumerate(zip(xs, ys)):
        if y >= target:
            if i == 0:
                return x
            x0, y0 = xs[i - 1], ys[i - 1]
            return x0 + (target - y0) / (y - y0) * (x - x0)
    return None


def interpolate(xs: list[float], ys: list[float], x: float) -> float:
    for i in range(1, len(xs)):
        if x <= xs[i]:
            t = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
            return ys[i - 1] + t * (ys[i] - ys[i - 1])
    return ys[-1]


def efficiency(long: pd.DataFrame, baseline: str) -> tuple[float | None, pd.DataFrame]:
    """From aggregate(metric, rows='variant', cols=<fraction>): the baseline's value at its largest
    fraction (the target) and, per variant, the smallest fraction reaching it (linear interpolation
    between grid points), the wall time that takes (interpolated the same way) and its share of the
    baseline's full-data wall time."""
    columns = ["variant", "fraction", "wall_s", "time_share", "value_at_max"]
    if long.empty or baseline not in set(long["row"]):
        return None, pd.DataFrame(columns=columns)
    base = long[long["row"] == baseline].sort_values("col")
    target, base_time = float(base["mean"].iloc[-1]), float(base["wall_s"].iloc[-1])
    out = []
    for variant, group in long.groupby("row", sort=False):
        group = group.sort_values("col")
        xs, ys, ws = (group[c].astype(float).tolist() for c in ("col", "mean", "wall_s"))
        f = crossing(xs, ys, target)
        wall = interpolate(xs, ws, f) if f is not None else None
        out.append({"variant": variant, "fraction": f, "wall_s": wall,
                    "time_share": wall / base_time if wall is not None and base_time else None,
                    "value_at_max": ys[-1]})
    return target, pd.DataFrame(out, columns=columns)


# --------------------------------------------------------------------------- patch heatmaps


def patch_runs(store: Store, filters: Sequence[Filter] = ()) -> pd.DataFrame:
    """Runs that stored patch scores: one row per (run, evaluator, kind) with the latest step."""
    def q(con):
        where, values = where_sql(_runs_columns(con), filters)
        return _df(con, "SELECT p.run_id, p.evaluator, p.kind, max(p.step) AS step, count(DISTINCT p.sample_id) AS samples, "
                        "any_value(r.graph) AS graph, any_value(r.variant) AS variant, any_value(r.seed) AS seed, "
                        "any_value(r.created_at) AS created_at "
                        f"FROM patch_scores p JOIN {_runs(con)} ON r.run_id = p.run_id WHERE TRUE{where} "
                        "GROUP BY p.run_id, p.evaluator, p.kind ORDER BY created_at, p.run_id, p.evaluator, p.kind",
                   values)
    return store.read(q)


def patch_samples(store: Store, run_id: str, evaluator: str, kind: str = "heatmap") -> pd.DataFrame:
    """(sample_id, caption) of a run's stored samples at its latest step."""
    return store.query_df(
        "SELECT sample_id, caption FROM patch_scores WHERE run_id = ? AND evaluator = ? AND kind = ? "
        "AND step = (SELECT max(step) FROM patch_scores WHERE run_id = ? AND evaluator = ? AND kind = ?) "
        "ORDER BY sample_id", [validate_run_id(run_id), evaluator, kind] * 2)


def patch_sample(store: Store, run_id: str, evaluator: str, sample_id: int, kind: str = "heatmap") -> dict | None:
    """One stored sample (latest step): caption, grid, scores, image PNG, boxes, and for kind
    'mixed' the partner image, the mixed image and λ. None when the run has no such sample."""
    rows = store.query(
        "SELECT * FROM patch_scores WHERE run_id = ? AND evaluator = ? AND kind = ? AND sample_id = ? "
        "ORDER BY step DESC LIMIT 1", [validate_run_id(run_id), evaluator, kind, int(sample_id)])
    if not rows:
        return None
    row = rows[0]
    row["boxes"] = json.loads(row["boxes"]) if row.get("boxes") else []
    return row


def argmax_patch(scores: Sequence[float], grid_h: int, grid_w: int) -> tuple[int, int]:
    flat = int(np.nanargmax(np.asarray(scores, dtype=np.float64)))
    return divmod(flat, grid_w)


def patch_touches_box(row: int, col: int, box: Sequence[float], patch_h: float, patch_w: float,
                      grid_h: int, grid_w: int, eps: float = 1e-3) -> bool:
    """Whether a box (x0, y0, x1, y1 in pixels) touches patch (row, col) of a grid_h x grid_w grid:
    the rule of vlpgraph.layers.patches (floor on the low side, ceil on the high side, a box ending exactly
    on a patch edge does not reach the next one, clamped to the grid), restated without torch so
    the app need not import it; tests check the two agree."""
    x0, y0, x1, y1 = (float(v) for v in box)
    c0 = min(max(math.floor(x0 / patch_w + eps / patch_w), 0), grid_w - 1)
    r0 = min(max(math.floor(y0 / patch_h + eps / patch_h), 0), grid_h - 1)
    c1 = max(min(max(math.ceil(x1 / patch_w - eps / patch_w), 0), grid_w), c0 + 1)
    r1 = max(min(max(math.ceil(y1 / patch_h - eps / patch_h), 0), grid_h), r0 + 1)
    return r0 <= row < r1 and c0 <= col < c1


def pointing(sample: dict, image_size: tuple[int, int]) -> dict[str, Any]:
    """The pointing game on one stored sample: the highest-scoring patch and whether it touches a
    mentioned (ground-truth) box. ``hit`` is None when the sample has no boxes."""
    gh, gw = int(sample["grid_h"]), int(sample["grid_w"])
    r, c = argmax_patch(sample["scores"], gh, gw)
    h, w = image_size
    ph, pw = h / gh, w / gw
    boxes = sample.get("boxes") or []
    hit = any(patch_touches_box(r, c, b, ph, pw, gh, gw) for b in boxes) if boxes else None
    return {"row": r, "col": c, "patch_h": ph, "patch_w": pw, "hit": hit}


# --------------------------------------------------------------------------- graph


def graph_runs(store: Store, filters: Sequence[Filter] = ()) -> pd.DataFrame:
    """Runs to draw the graph of: run_id, graph, variant, seed (newest first)."""
    def q(con):
        where, values = where_sql(_runs_columns(con), filters)
        return _df(con, f"SELECT r.run_id, r.graph, r.variant, r.seed FROM {_runs(con)} WHERE TRUE{where} "
                        "ORDER BY r.created_at DESC, r.run_id", values)
    return store.read(q)


# --------------------------------------------------------------------------- samples


def sample_runs(store: Store, filters: Sequence[Filter] = ()) -> pd.DataFrame:
    """Runs that stored samples (the ``samples`` table that evaluators such as evaluator.captioning and
    evaluator.reconstruction write): one row per run with graph, variant, seed, created_at, its latest
    step with samples, how many distinct samples and which kinds ('caption, reconstruction'), oldest first."""
    def q(con):
        where, values = where_sql(_runs_columns(con), filters)
        return _df(con, "SELECT s.run_id, any_value(r.graph) AS graph, any_value(r.variant) AS variant, "
                        "any_value(r.seed) AS seed, any_value(r.created_at) AS created_at, max(s.step) AS step, "
                        "count(DISTINCT s.sample_id) AS samples, string_agg(DISTINCT s.kind, ', ' ORDER BY s.kind) AS kinds "
                        f"FROM samples s JOIN {_runs(con)} ON r.run_id = s.run_id WHERE TRUE{where} "
                        "GROUP BY s.run_id ORDER BY created_at, s.run_id", values)
    return store.read(q)


def sample_steps(store: Store, run_id: str) -> list[int]:
    """The steps at which a run stored samples, latest first."""
    rows = store.query("SELECT DISTINCT step FROM samples WHERE run_id = ? ORDER BY step DESC", [validate_run_id(run_id)])
    return [int(r["step"]) for r in rows]


def references(value: str | None) -> list[str]:
    """A samples row's reference as a list: Store.log_samples keeps a list of references as JSON text,
    a single one as plain text."""
    if value is None:
        return []
    if value.startswith("["):
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        if isinstance(parsed, list):
            return [str(v) for v in parsed]
    return [value]


def sample_table(store: Store, run_id: str, step: int) -> pd.DataFrame:
    """Every samples row of a run at a step without its images: sample_id, evaluator, kind, text,
    reference (several references joined by ' | '), and which images it has; by sample_id, evaluator, kind."""
    frame = store.query_df(
        "SELECT sample_id, evaluator, kind, text, reference, image IS NOT NULL AS has_image, "
        "masked_image IS NOT NULL AS has_masked_image, output_image IS NOT NULL AS has_output_image "
        "FROM samples WHERE run_id = ? AND step = ? ORDER BY sample_id, evaluator, kind",
        [validate_run_id(run_id), int(step)])
    frame["reference"] = [" | ".join(references(r)) if isinstance(r, str) else None for r in frame["reference"]]
    return frame


def sample_labels(table: pd.DataFrame, width: int = 60) -> dict[int, str]:
    """sample_id -> '#id · kinds · the first reference (or text)', from sample_table's rows, for a picker."""
    out: dict[int, str] = {}
    for sid, group in table.groupby("sample_id", sort=True):
        words = next((str(v) for col in ("reference", "text") for v in group[col] if isinstance(v, str) and v), "")
        words = words if len(words) <= width else words[: width - 1] + "…"
        out[int(sid)] = " · ".join(bit for bit in (f"#{int(sid)}", ", ".join(dict.fromkeys(group["kind"])), words) if bit)
    return out


def document_parts(info: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A stored document (evaluator.documents' ``info``) in reading order, for the Samples page: a text part
    ``{"text": str}`` per sentence and an image part ``{"image": j, "label": str}`` per image, the label
    saying where the image's ``<soi>`` stands in the sequence and what the contrastive term made of it
    (kept or cut by truncation; left out for lack of context; its own context's retrieval rank)."""
    images = {int(e["image"]): e for e in info.get("images", [])}
    pool = info.get("context_pool")
    parts: list[dict[str, Any]] = []
    for kind, k in info.get("layout", []):
        if kind == "text":
            parts.append({"text": info["texts"][int(k)]})
            continue
        e = images.get(int(k), {})
        if not e.get("kept", False):
            label = "cut by truncation: the language model never saw this image"
        else:
            label = f"<soi> at token {e['soi']}"
            if not e.get("context", False):
                label += " · no context before it: left out of the contrastive term"
            elif e.get("context_rank") is not None:
                label += f" · its context ranks it {e['context_rank']} of {pool}"
            if e.get("after_image_loss") is not None:
                label += f" · loss of the text after it {e['after_image_loss']:.2f}"
        parts.append({"image": int(k), "label": label})
    return parts


# How the Samples page groups a run's rows: kinds whose sample ids count something other than the test
# samples (questions, image pairs, documents) are shown apart, so that '#3' never mixes test image 3's
# caption with question 3 (about another image). Any kind not listed numbers test samples.
SAMPLE_GROUPS = ("test samples", "test questions", "test image pairs", "held-out documents")
_GROUP_OF_KIND = {"qa": "test questions", "nlvr": "test image pairs", "document": "held-out documents"}


def sample_group(kind: str) -> str:
    """Which of :data:`SAMPLE_GROUPS` a samples row of ``kind`` belongs to (what its sample id numbers)."""
    return _GROUP_OF_KIND.get(kind, SAMPLE_GROUPS[0])


def cmc_parts(text: str, info: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A sentence mixed by cross-modal CutMix (a 'cmc' row of evaluator.mixing / mixer.cmc.sample_rows) in
    reading order, for the Samples page: ``{"text": str}`` for each run of kept words and, where the text
    writes ``[concept #id]`` for the j-th replaced span of ``info['spans']``, ``{"region": j, "concept",
    "id", "label"}`` — j is also the region's place in the row's image (the regions side by side, in span
    order); the label says where the region was cut from. A span whose marker is not in the text (an
    edited row) still shows, after the sentence."""
    parts: list[dict[str, Any]] = []
    missing: list[dict[str, Any]] = []
    at = 0
    for j, span in enumerate(info.get("spans", [])):
        concept, rid = str(span.get("concept", "?")), span.get("region")
        label = f"region #{rid}"
        if span.get("source_image") is not None:
            label += f" of image {span['source_image']}"
        if span.get("box") is not None:
            label += " · box " + ", ".join(f"{float(v):.0f}" for v in span["box"])
        part = {"region": j, "concept": concept, "id": rid, "label": label}
        marker = f"[{concept} #{rid}]"
        k = text.find(marker, at)
        if k < 0:
            missing.append(part)
            continue
        if text[at:k].strip():
            parts.append({"text": text[at:k].strip()})
        parts.append(part)
        at = k + len(marker)
    if text[at:].strip():
        parts.append({"text": text[at:].strip()})
    return parts + missing


def concept_marks(sentence: str, concepts: Sequence[str]) -> list[tuple[str, bool]]:
    """The original of a mixed sentence cut into ``(words, replaced)`` pieces: each of ``concepts`` (the
    replaced spans' concepts, in order) found in turn, case-insensitively, after the previous one, is a
    replaced piece; everything else is kept words. A concept not found is skipped."""
    pieces: list[tuple[str, bool]] = []
    at, lower = 0, sentence.lower()
    for concept in concepts:
        k = lower.find(concept.lower(), at)
        if k < 0:
            continue
        if k > at:
            pieces.append((sentence[at:k], False))
        pieces.append((sentence[k:k + len(concept)], True))
        at = k + len(concept)
    if at < len(sentence):
        pieces.append((sentence[at:], False))
    return pieces


def answer_parts(row: Mapping[str, Any]) -> dict[str, Any]:
    """What the Samples page shows of a probe's answer (a 'qa' row of evaluator.qa, an 'nlvr' row of
    evaluator.nlvr; ``row`` as :func:`sample_detail` returns it): ``prompt_label`` ('question' or
    'statement') and ``prompt``, ``predicted`` (the model's answer), ``truth`` (the true one), ``correct``
    (the evaluator's verdict, else predicted == truth; None when either is missing), ``type`` (the
    question type) and ``image_caption`` (which test image(s) the picture is)."""
    info, kind = row.get("info") or {}, row.get("kind")
    refs = row.get("references") or []
    predicted, truth = row.get("text"), (refs[0] if refs else None)
    correct = info.get("correct")
    if correct is None and predicted is not None and truth is not None:
        correct = predicted == truth
    if kind == "nlvr":
        label, prompt = "statement", info.get("statement")
        caption = f"left: test image {info.get('left', '?')} · right: test image {info.get('right', '?')}"
    else:
        label, prompt = "question", info.get("question")
        caption = f"test image {info['image_index']}" if info.get("image_index") is not None else "image"
    return {"prompt_label": label, "prompt": prompt, "predicted": predicted, "truth": truth,
            "correct": None if correct is None else bool(correct), "type": info.get("type"), "image_caption": caption}


def sample_detail(store: Store, run_id: str, step: int, sample_id: int) -> list[dict[str, Any]]:
    """One sample of a run at a step: a row per (evaluator, kind) with text, ``references`` (a list),
    image / masked_image / output_image (PNG bytes or None) and ``info`` (a dict: the stored JSON, a
    non-object value under 'info'); rows with images first (the picture, then what was said about it),
    then by evaluator and kind. Empty when the run did not store that sample at that step."""
    rows = store.query("SELECT * FROM samples WHERE run_id = ? AND step = ? AND sample_id = ? "
                       "ORDER BY image IS NULL AND masked_image IS NULL AND output_image IS NULL, evaluator, kind",
                       [validate_run_id(run_id), int(step), int(sample_id)])
    for row in rows:
        row["references"] = references(row.pop("reference"))
        try:
            info = json.loads(row["info"]) if row.get("info") else {}
        except ValueError:
            info = row["info"]
        row["info"] = info if isinstance(info, dict) else {"info": info}
    return rows
