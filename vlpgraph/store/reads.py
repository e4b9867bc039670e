"""Reading the store: tables, runs, metrics, evaluations, samples, free read-only queries, and the
WHERE conditions of filters (:func:`filter_clause`, shared with vlpgraph/results/analysis.py).

Every read is one short-lived read-only connection (Store.read), so it can run while a sweep writes
(docs/concurrency.md); a store with no database file yet reads as empty tables. A value from the
user reaches SQL only as a bound parameter; a column name must be one of the table's real columns
and is then quoted.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

from vlpgraph.errors import UserError, did_you_mean
from vlpgraph.store.connection import Connections, dict_rows
from vlpgraph.store.schema import TABLES, column_types_of, quote_ident, validate_run_id
from vlpgraph.store.values import as_text, scalar

FILTER_OPS = ("in", "contains", "between", "=", "!=", ">=", "<=")


class Reads(Connections):
    """The reader API of the store."""

    def columns(self, table: str = "runs") -> list[str]:
        """Column names of a table, in order (for runs: core columns, then flattened params)."""
        if table not in TABLES:
            raise UserError(f"unknown table {table!r}; tables: {', '.join(TABLES)}{did_you_mean(table, TABLES)}")
        return self.read(lambda con: [n for n, _ in column_types_of(con, table).values()])

    def column_types(self, table: str = "runs") -> dict[str, str]:
        if table not in TABLES:
            raise UserError(f"unknown table {table!r}; tables: {', '.join(TABLES)}{did_you_mean(table, TABLES)}")
        return self.read(lambda con: dict(column_types_of(con, table).values()))

    def param_columns(self) -> list[str]:
        """The flattened hyper-parameter columns of runs (those with a dot)."""
        return [c for c in self.columns("runs") if "." in c]

    def _where_sql(self, con, table: str, where: Mapping[str, Any] | None) -> tuple[str, list[Any]]:
        if not where:
            return "", []
        columns = column_types_of(con, table)
        clauses, values = [], []
        for key, value in where.items():
            found = columns.get(str(key).lower())
            if found is None:
                names = [n for n, _ in columns.values()]
                raise UserError(f"unknown column {str(key)!r} in table {table}{did_you_mean(str(key), names)}")
            name, dtype = found
            many = isinstance(value, (list, tuple, set, frozenset))
            clause, bound = filter_clause(quote_ident(name), name, dtype, "in" if many or value is None else "=",
                                          value if many else (value,) if value is None else value)
            clauses.append(clause)
            values.extend(bound)
        return " WHERE " + " AND ".join(clauses), values

    def runs(self, where: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """All runs (optionally filtered by column equality; a list value means IN), oldest first."""
        def q(con):
            clause, values = self._where_sql(con, "runs", where)
            return dict_rows(con.execute(
                f"SELECT * FROM runs{clause} ORDER BY created_at NULLS LAST, run_id", values))
        return self.read(q)

    def run(self, run_id: str) -> dict[str, Any] | None:
        validate_run_id(run_id)
        rows = self.read(lambda con: dict_rows(con.execute("SELECT * FROM runs WHERE run_id = ?", [run_id])))
        return rows[0] if rows else None

    def status(self, run_id: str) -> str | None:
        validate_run_id(run_id)
        row = self.read(lambda con: con.execute("SELECT status FROM runs WHERE run_id = ?", [run_id]).fetchone())
        return row[0] if row else None

    def metrics(self, run_id: str, name: str | None = None) -> list[dict[str, Any]]:
        validate_run_id(run_id)
        sql = "SELECT * FROM metrics WHERE run_id = ?"
        values: list[Any] = [run_id]
        if name is not None:
            sql += " AND name = ?"
            values.append(name)
        return self.read(lambda con: dict_rows(con.execute(sql + " ORDER BY step, name", values)))

    def evals(self, run_ids: Iterable[str] | None = None) -> list[dict[str, Any]]:
        sql, values = "SELECT * FROM evals", []
        if run_ids is not None:
            values = [validate_run_id(r) for r in run_ids]
            if not values:
                return []
            sql += f" WHERE run_id IN ({', '.join('?' * len(values))})"
        return self.read(lambda con: dict_rows(con.execute(sql + " ORDER BY run_id, evaluator, metric, step", values)))

    def completed_evals(self, run_id: str, hashes: Mapping[str, str] | None = None) -> set[tuple[str, int]]:
        """{(evaluator, step)} that already have results for this run (to skip on re-run).

        With ``hashes`` ({evaluator: its node's content hash now}), only evaluations every row of
        which was written by that same evaluator count: an edited evaluator's, or one whose rows
        carry no hash (written before the store recorded it), are not completed."""
        validate_run_id(run_id)
        rows = self.read(lambda con: con.execute(
            "SELECT evaluator, step, list(DISTINCT evaluator_hash) FROM evals WHERE run_id = ? GROUP BY ALL",
            [run_id]).fetchall())
        if hashes is None:
            return {(e, int(s)) for e, s, _ in rows}
        return {(e, int(s)) for e, s, found in rows if e in hashes and found == [hashes[e]]}

    def patch_scores(self, run_id: str, step: int | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """Scored pairs of a run (latest step first when step is None), ordered by sample_id."""
        validate_run_id(run_id)
        sql, values = "SELECT * FROM patch_scores WHERE run_id = ?", [run_id]
        if step is not None:
            sql += " AND step = ?"
            values.append(int(step))
        sql += " ORDER BY step DESC, sample_id"
        if limit is not None:
            sql += " LIMIT ?"
            values.append(int(limit))
        return self.read(lambda con: dict_rows(con.execute(sql, values)))

    def samples(self, run_id: str, step: int | None = None, kind: str | None = None,
                evaluator: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """Rows of the ``samples`` table for a run (latest step first), ordered by sample_id; optionally one
        step, kind and/or evaluator."""
        validate_run_id(run_id)
        sql, values = "SELECT * FROM samples WHERE run_id = ?", [run_id]
        for column, value in (("step", step), ("kind", kind), ("evaluator", evaluator)):
            if value is not None:
                sql += f" AND {column} = ?"
                values.append(int(value) if column == "step" else str(value))
        sql += " ORDER BY step DESC, evaluator, kind, sample_id"
        if limit is not None:
            sql += " LIMIT ?"
            values.append(int(limit))
        return self.read(lambda con: dict_rows(con.execute(sql, values)))

    def query(self, sql: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """A read-only query with bound parameters (the connection is read-only and has no file access)."""
        return self.read(lambda con: dict_rows(con.execute(sql, params or [])))

    def query_df(self, sql: str, params: Sequence[Any] | Mapping[str, Any] | None = None):
        """Like query, as a pandas DataFrame (for the app)."""
        return self.read(lambda con: con.execute(sql, params or []).df())


def filter_clause(ident: str, column: str, dtype: str, op: str, value: Any) -> tuple[str, list[Any]]:
    """One WHERE condition on a column already checked against the table and quoted (``ident``):
    the SQL text and its bound values - a value never becomes SQL text. ``in``: value is a
    collection (None in it matches NULL, an empty one matches nothing); ``contains``:
    case-insensitive substring of the text form; ``between``: (lo, hi), either may be None;
    ``=``, ``!=``, ``>=``, ``<=``: one value. Values are made to fit the column's type first."""
    if op == "in":
        items = list(value)
        present = [_coerce_filter(v, column, dtype) for v in items if v is not None]
        parts = [f"{ident} IN ({', '.join('?' * len(present))})"] if present else []
        if len(present) < len(items):
            parts.append(f"{ident} IS NULL")
        return "(" + (" OR ".join(parts) or "FALSE") + ")", present
    if op == "contains":
        return f"contains(lower(CAST({ident} AS VARCHAR)), lower(?))", [str(value)]
    if op == "between":
        bounds = [(o, _coerce_filter(v, column, dtype)) for o, v in zip((">=", "<="), value) if v is not None]
        return "(" + (" AND ".join(f"{ident} {o} ?" for o, _ in bounds) or "TRUE") + ")", [v for _, v in bounds]
    if op in ("=", "!=", ">=", "<="):
        return f"{ident} {op} ?", [_coerce_filter(value, column, dtype)]
    raise UserError(f"unknown filter operator {op!r}; use one of {', '.join(FILTER_OPS)}")


def _coerce_filter(value: Any, column: str, dtype: str) -> Any:
    """Make a filter value fit its column's type (CLI values arrive as strings); bound, never spliced."""
    value = scalar(value)
    try:
        if dtype == "BOOLEAN":
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("true", "1", "yes"):
                    return True
                if low in ("false", "0", "no"):
                    return False
                raise ValueError(value)
            return bool(value)
        if dtype in ("DOUBLE", "FLOAT", "REAL", "DECIMAL") or dtype.startswith("DECIMAL"):
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if dtype in ("BIGINT", "INTEGER", "SMALLINT", "TINYINT", "HUGEINT", "UBIGINT", "UINTEGER"):
            if isinstance(value, bool):
                raise ValueError(value)
            number = float(value)
            if not math.isfinite(number) or number != int(number):
                raise ValueError(value)
            return int(number)
        if dtype == "VARCHAR":
            return value if isinstance(value, str) else as_text(value)
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"filter {column}={value!r}: not a valid {dtype.lower()} value") from None
    return value
