"""The result store: one DuckDB file plus per-run artifact folders.

Layout under the store root (``store/`` by default, ``--store DIR`` or ``$VLPGRAPH_STORE``)::

    vlpgraph.duckdb          runs, metrics, evals, patch_scores, samples (+ meta)
    runs/<run_id>/           per-run artifacts (checkpoints, logs)
    cache/<hash>/            cached node outputs (tokenizers, materialised datasets)

:class:`Store` is what callers hold; its parts, one job per module:

- ``schema.py``: tables, columns, statuses, the names allowed in SQL, the catalog lookup;
- ``values.py``: Python values -> stored values (timestamps, JSON text, param text forms);
- ``connection.py``: opening the file (locks between processes, retries, timeouts), ``Store.read``;
- ``runs.py``: a run's row, its param columns, claims, heartbeats and the lease (``stale``);
- ``writes.py``: metrics, evaluations, patch scores and samples;
- ``reads.py``: the reader API and the filter conditions.

Reading while a sweep writes, several runners on one store, and the limits: docs/concurrency.md.
"""

from __future__ import annotations

import os
from pathlib import Path

from vlpgraph.errors import UserError
from vlpgraph.store.connection import DEFAULT_TIMEOUT_S, StoreError, StoreLockTimeout
from vlpgraph.store.reads import FILTER_OPS, Reads, filter_clause
from vlpgraph.store.runs import (
    DEFAULT_LEASE_S, LEASE_ENV, RunLifecycle, flatten_params, lease_cutoff, lease_s, shown_status, status_sql,
)
from vlpgraph.store.schema import (
    DB_NAME, PARAM_COLUMN_RE, RUN_ID_RE, SCHEMA, STALE, STATUSES, TABLES, column_types_of, quote_ident,
    validate_run_id,
)
from vlpgraph.store.writes import ResultWrites

__all__ = [
    "DB_NAME", "DEFAULT_LEASE_S", "DEFAULT_TIMEOUT_S", "FILTER_OPS", "LEASE_ENV", "PARAM_COLUMN_RE", "RUN_ID_RE",
    "SCHEMA", "STALE", "STATUSES", "TABLES", "Store", "StoreError", "StoreLockTimeout", "column_types_of",
    "default_root", "filter_clause", "flatten_params", "lease_cutoff", "lease_s", "quote_ident", "shown_status",
    "status_sql", "validate_run_id",
]


def default_root() -> Path:
    """The store directory when none is given: $VLPGRAPH_STORE, else ./store."""
    return Path(os.environ.get("VLPGRAPH_STORE") or "store")


class Store(RunLifecycle, ResultWrites, Reads):
    """Results of all runs under one directory. Cheap to construct; holds no connection.

    ``Store(root, timeout=None)``: ``timeout`` bounds every wait for another process (default
    $VLPGRAPH_STORE_TIMEOUT, else 30 s). ``read(fn)`` runs fn on a read-only connection for callers
    that write their own SQL (vlpgraph.results.analysis); ``stats`` counts reads, writes and waits."""

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    # ---------------------------------------------------------------- paths

    def run_dir(self, run_id: str, *, create: bool = False) -> Path:
        path = self.root / "runs" / validate_run_id(run_id)
        if create:
            path.mkdir(parents=True, exist_ok=True)
        return path

    def cache_dir(self, key: str, *, create: bool = False) -> Path:
        if not isinstance(key, str) or not RUN_ID_RE.fullmatch(key) or key in (".", ".."):
            raise UserError(f"invalid cache key {key!r}: expected 1-128 characters of [A-Za-z0-9_.-]")
        path = self.root / "cache" / key
        if create:
            path.mkdir(parents=True, exist_ok=True)
        return path

    def exists(self) -> bool:
        return self.db_path.exists()

    def version(self) -> tuple:
        """A cheap token that changes whenever the database changes (size and mtime of the file and
        its write-ahead log): the app keys its caches on it. Takes no lock and opens nothing."""
        out = []
        for path in (self.db_path, self.db_path.with_name(DB_NAME + ".wal")):
            try:
                st = path.stat()
                out.append((st.st_mtime_ns, st.st_size))
            except FileNotFoundError:
                out.append(None)
        return tuple(out)
