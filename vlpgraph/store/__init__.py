"""The result store: one DuckDB file plus per-run artifact folders.

Layout under the store root (``store/`` by default, ``--store DIR`` or ``$VLPGRAPH_STORE``)::

    vlpgraph.duckdb          runs, metrics, evals, patch_scores, samples (+ meta)
    runs/<run_id>/           per-run artifacts (checkpoints, logs)
    cache/<hash>/            cached node outputs (tokenizers, materialised datasets)

Concurrency
-----------
DuckDB lets one *process* hold a database file: while a writer has it open, nobody else can open
it, not even read-only, and while any reader has it open, a writer cannot open it. So the store
never keeps a connection: every operation opens a connection, runs one short transaction, fetches
everything it needs and closes it. Readers open ``read_only``.

Waiting happens in two layers, both bounded by ``timeout`` (default 30 s,
``$VLPGRAPH_STORE_TIMEOUT``), after which :class:`StoreLockTimeout` says what happened:

1. vlpgraph processes queue on two ``flock``'ed sidecar files beside the database
   (``vlpgraph.duckdb.lock``: shared for readers, exclusive for a writer; and
   ``vlpgraph.duckdb.writer.lock``, held by a writer while it waits, so a stream of overlapping
   readers cannot starve the training loop). Polling a flock is a microsecond syscall, whereas a
   failed ``duckdb.connect`` burns ~10 ms of CPU; the DuckDB connection is closed before the
   sidecar lock is released, so the next process finds the file free.
2. ``duckdb.connect`` itself is retried with small jittered, growing sleeps (2 ms .. 100 ms) while it
   fails on the file lock (``IOException: ... Conflicting lock is held``) - this covers processes
   that do not know the protocol (the duckdb CLI, a notebook) and platforms without ``fcntl``.

Inside one process, operations on the same file are serialised by a process-wide lock (DuckDB
refuses a read-only and a read-write connection to one file in one process at the same time). A
reader of a store that does not exist yet sees empty tables and creates nothing.

An uncontended open+write+close costs about 20-30 ms on a 2-core machine, a read about 15-20 ms
(``Store.stats`` counts them), so the training loop should log metrics in batches (every N steps /
every second or so), not one row per call.

Flattened hyper-parameters
--------------------------
Every flattened param (``node.param``) of a run is also a column of ``runs`` (quoted identifier),
added with ``ALTER TABLE ADD COLUMN IF NOT EXISTS`` in the same transaction as the run's upsert.
Types: numbers DOUBLE, bools BOOLEAN, strings VARCHAR, lists/dicts JSON text (VARCHAR). A param
whose value is ``None`` adds no column (absent columns read as NULL anyway).

Type conflicts never lose data: when a run brings a value whose type does not fit an existing
DOUBLE/BOOLEAN column (e.g. ``train.lr`` was 0.001 and is now ``"auto"``), the column is widened to
VARCHAR (``ALTER COLUMN ... TYPE VARCHAR``) in that transaction; existing values become their text
form (0.001 -> '0.001', 8 -> '8.0', true -> 'true') and every later value of any type is stored as
the same text form (numbers as ``repr(float(v))``, bools 'true'/'false', lists/dicts as JSON). A
column's type therefore only ever changes once, from DOUBLE/BOOLEAN to VARCHAR; the ``params`` JSON
column always keeps the exact resolved values.

Runners, claims and heartbeats
------------------------------
``runs.status`` is one of queued, running, completed, failed, interrupted (a signal stopped the
trial at a checkpoint; the same command resumes it). A trial being run is claimed by one runner:
``runs.owner`` (``host:pid:token``) and ``runs.heartbeat_at``, which that runner renews every few
seconds and with every metrics batch. ``claim`` grants a trial in one write transaction when it has
no owner, is the caller's, or its owner's heartbeat is older than the lease (``$VLPGRAPH_LEASE_S``,
default 60 s: that runner is dead); finish_run and release clear the owner. Readers show a
``running`` run whose heartbeat (else its last update) is older than the lease as ``stale`` - its
process died without a word (SIGKILL, a lost node) - without writing anything (shown_status,
status_sql).

Evaluations and their evaluator's version
-----------------------------------------
``evals.evaluator_hash`` is the content hash of the evaluator node that wrote the row (its kind,
params and inputs' hashes). ``log_evaluation`` writes one evaluator's result at one step and deletes
whatever that evaluator had at that step first (evals, patch_scores and samples, one transaction), so an
edited evaluator's rows never sit beside its older version's. ``completed_evals(run, hashes)``
counts an evaluation as done only when its rows carry the hash asked for (rows from before the
column have none and count as not done for that purpose).

Keys and idempotence
--------------------
``runs``: run_id (upsert; a resumed run keeps its row). ``metrics``: (run_id, step, name).
``evals``: (run_id, step, evaluator, metric). ``patch_scores`` and ``samples``: (run_id, step, evaluator, kind, sample_id). All are
PRIMARY KEYs and every log_* call replaces rows with the same key, so repeating a write never
duplicates; ``delete_metrics_after`` drops what a resumed run will log again. Timestamps are UTC.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import re
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import duckdb

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


from vlpgraph import __version__
from vlpgraph.errors import UserError, did_you_mean

DB_NAME = "vlpgraph.duckdb"
DEFAULT_TIMEOUT_S = 30.0
RUN_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")
# node.param (possibly deeper): no quotes, no spaces, at least one dot, never a core column name.
PARAM_COLUMN_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)+")
STATUSES = ("queued", "running", "completed", "failed", "interrupted")
# Not stored: what readers show for a `running` run whose heartbeat is older than the lease (its
# process died without a word, e.g. SIGKILL or a lost node). See shown_status / status_sql.
STALE = "stale"
DEFAULT_LEASE_S = 60.0
LEASE_ENV = "VLPGRAPH_LEASE_S"

_CONFIG = {"threads": 1, "enable_external_access": False}
_INSERT_CHUNK = 5000  # rows per INSERT statement
_METRIC_COLUMNS = [("run_id", "VARCHAR"), ("step", "BIGINT"), ("epoch", "DOUBLE"), ("name", "VARCHAR"),
                   ("value", "DOUBLE"), ("wall_s", "DOUBLE")]
_EVAL_COLUMNS = [("run_id", "VARCHAR"), ("step", "BIGINT"), ("evaluator", "VARCHAR"), ("metric", "VARCHAR"),
                 ("value", "DOUBLE"), ("logged_at", "TIMESTAMP"), ("headline", "BOOLEAN"),
                 ("evaluator_hash", "VARCHAR")]
_PATCH_COLUMNS = [("run_id", "VARCHAR"), ("step", "BIGINT"), ("evaluator", "VARCHAR"), ("kind", "VARCHAR"),
                  ("sample_id", "BIGINT"), ("caption", "VARCHAR"),
                  ("grid_h", "INTEGER"), ("grid_w", "INTEGER"), ("scores", "FLOAT[]"), ("image", "BLOB"),
                  ("boxes", "VARCHAR"), ("partner_id", "BIGINT"), ("partner_image", "BLOB"),
                  ("mixed_image", "BLOB"), ("lam", "DOUBLE")]
_SAMPLE_COLUMNS = [("run_id", "VARCHAR"), ("step", "BIGINT"), ("evaluator", "VARCHAR"), ("kind", "VARCHAR"),
                   ("sample_id", "BIGINT"), ("text", "VARCHAR"), ("reference", "VARCHAR"), ("image", "BLOB"),
                   ("masked_image", "BLOB"), ("output_image", "BLOB"), ("info", "VARCHAR")]

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS meta (
        key VARCHAR PRIMARY KEY,
        value VARCHAR
    )""",
    """CREATE TABLE IF NOT EXISTS runs (
        run_id VARCHAR PRIMARY KEY,
        graph VARCHAR,
        variant VARCHAR,
        seed BIGINT,
        params VARCHAR,
        status VARCHAR,
        error VARCHAR,
        created_at TIMESTAMP,
        started_at TIMESTAMP,
        finished_at TIMESTAMP,
        updated_at TIMESTAMP,
        wall_s DOUBLE,
        train_samples BIGINT,
        step BIGINT,
        device VARCHAR,
        vlpgraph_version VARCHAR,
        attempts INTEGER,
        owner VARCHAR,                  -- the runner holding the trial (host:pid:token), NULL when free
        heartbeat_at TIMESTAMP          -- last sign of life of that runner (the lease)
    )""",
    # stores made before claims and heartbeats gain the columns at their next write
    "ALTER TABLE runs ADD COLUMN IF NOT EXISTS owner VARCHAR",
    "ALTER TABLE runs ADD COLUMN IF NOT EXISTS heartbeat_at TIMESTAMP",
    # the number of training processes (torchrun's world size) of the runner that last started the trial
    "ALTER TABLE runs ADD COLUMN IF NOT EXISTS processes INTEGER",
    """CREATE TABLE IF NOT EXISTS metrics (
        run_id VARCHAR NOT NULL,
        step BIGINT NOT NULL,
        epoch DOUBLE,
        name VARCHAR NOT NULL,
        value DOUBLE,
        wall_s DOUBLE,
        PRIMARY KEY (run_id, step, name)
    )""",
    """CREATE TABLE IF NOT EXISTS evals (
        run_id VARCHAR NOT NULL,
        step BIGINT NOT NULL,
        evaluator VARCHAR NOT NULL,
        metric VARCHAR NOT NULL,
        value DOUBLE,
        logged_at TIMESTAMP,
        headline BOOLEAN,               -- the evaluator's headline metric (what tables show by default)
        evaluator_hash VARCHAR,         -- content hash of the evaluator node that produced the row
        PRIMARY KEY (run_id, step, evaluator, metric)
    )""",
    # stores made before the headline flag / the evaluator hash existed gain the column at their next write
    "ALTER TABLE evals ADD COLUMN IF NOT EXISTS headline BOOLEAN",
    "ALTER TABLE evals ADD COLUMN IF NOT EXISTS evaluator_hash VARCHAR",
    """CREATE TABLE IF NOT EXISTS patch_scores (
        run_id VARCHAR NOT NULL,
        step BIGINT NOT NULL,
        evaluator VARCHAR NOT NULL,     -- the evaluator node that wrote the row
        kind VARCHAR NOT NULL,          -- 'heatmap' (a test sample's patch scores) | 'mixed' (a mixer's output)
        sample_id BIGINT NOT NULL,
        caption VARCHAR,
        grid_h INTEGER,
        grid_w INTEGER,
        scores FLOAT[],
        image BLOB,
        boxes VARCHAR,
        partner_id BIGINT,              -- kind 'mixed': the partner sample, its image, the mixed image, λ kept
        partner_image BLOB,
        mixed_image BLOB,
        lam DOUBLE,
        PRIMARY KEY (run_id, step, evaluator, kind, sample_id)
    )""",
    # What evaluators produce to look at, one row per (evaluator, kind, sample): generated captions beside
    # their references, MAE reconstructions, later QA answers and mixed sentences (ports.EvalResult.samples).
    """CREATE TABLE IF NOT EXISTS samples (
        run_id VARCHAR NOT NULL,
        step BIGINT NOT NULL,
        evaluator VARCHAR NOT NULL,     -- the evaluator node that wrote the row
        kind VARCHAR NOT NULL,          -- 'caption' | 'reconstruction' | ... (what the row shows)
        sample_id BIGINT NOT NULL,      -- the test sample's id
        text VARCHAR,                   -- what the model produced (a generated caption, an answer)
        reference VARCHAR,              -- what it should be (the reference caption(s), the true answer)
        image BLOB,                     -- the input image (PNG)
        masked_image BLOB,              -- what the model saw of it (e.g. MAE's visible patches; PNG)
        output_image BLOB,              -- what the model made of it (e.g. MAE's reconstruction; PNG)
        info VARCHAR,                   -- anything else, JSON (scores, the question, the mask ratio)
        PRIMARY KEY (run_id, step, evaluator, kind, sample_id)
    )""",
    "INSERT OR IGNORE INTO meta VALUES ('schema_version', '2')",
]
TABLES = ("runs", "metrics", "evals", "patch_scores", "samples", "meta")


class StoreError(Exception):
    """The store could not do what was asked (not the user's input)."""


class StoreLockTimeout(StoreError):
    """Another process kept the database file locked for longer than the timeout."""


# --------------------------------------------------------------------------------------------
# helpers


def default_root() -> Path:
    """The store directory when none is given: $VLPGRAPH_STORE, else ./store."""
    return Path(os.environ.get("VLPGRAPH_STORE") or "store")


def lease_s() -> float:
    """Seconds without a heartbeat after which a `running` trial's runner counts as dead: its
    claim may be taken over and readers show the run as ``stale``. $VLPGRAPH_LEASE_S, default 60."""
    raw = os.environ.get(LEASE_ENV) or DEFAULT_LEASE_S
    try:
        value = float(raw)
    except ValueError:
        raise UserError(f"{LEASE_ENV}={raw!r}: expected seconds, e.g. 60") from None
    if value <= 0:
        raise UserError(f"{LEASE_ENV}={raw!r}: expected a positive number of seconds")
    return value


def lease_cutoff(lease: float | None = None) -> datetime:
    """The UTC time before which a heartbeat is too old (now - lease)."""
    return _now() - timedelta(seconds=lease_s() if lease is None else lease)


def shown_status(run: Mapping[str, Any], cutoff: datetime | None = None) -> str:
    """A run's status as readers show it: ``stale`` for a `running` run whose runner has given no
    sign of life (heartbeat, or else the last update) since ``cutoff``; the stored status otherwise."""
    if run.get("status") != "running":
        return run.get("status")
    seen = run.get("heartbeat_at") or run.get("updated_at")
    return STALE if seen is not None and seen < (cutoff or lease_cutoff()) else "running"


def status_sql(columns: Mapping[str, Any], alias: str, cutoff: datetime) -> str:
    """SQL for shown_status over ``alias``'s runs columns (``columns``: lower name -> ...), with the
    cutoff inlined as a literal (it is our own datetime, never user input)."""
    seen = f"coalesce({alias}.heartbeat_at, {alias}.updated_at)" if "heartbeat_at" in columns else f"{alias}.updated_at"
    stamp = cutoff.strftime("%Y-%m-%d %H:%M:%S.%f")
    return (f"CASE WHEN {alias}.status = 'running' AND {seen} < TIMESTAMP '{stamp}' "
            f"THEN '{STALE}' ELSE {alias}.status END")


def validate_run_id(run_id: str) -> str:
    """Return run_id if it is safe to use in SQL and in paths, else raise UserError."""
    if not isinstance(run_id, str) or not RUN_ID_RE.fullmatch(run_id) or run_id in (".", ".."):
        raise UserError(f"invalid run id {run_id!r}: expected 1-128 characters of [A-Za-z0-9_.-]")
    return run_id


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def column_types_of(con: duckdb.DuckDBPyConnection, table: str) -> dict[str, tuple[str, str]]:
    """lower(name) -> (name, type) for table's columns (DuckDB identifiers are case-insensitive), read
    from the catalog on an open connection (e.g. inside Store.read)."""
    rows = con.execute(
        "SELECT column_name, data_type FROM duckdb_columns() "
        "WHERE table_name = ? AND schema_name = 'main' AND database_name = current_database() "
        "ORDER BY column_index",
        [table],
    ).fetchall()
    return {name.lower(): (name, dtype) for name, dtype in rows}


def flatten_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """{node: {param: value}} -> {"node.param": value}; dict/list values stay whole (stored as JSON)."""
    flat: dict[str, Any] = {}
    for node, node_params in params.items():
        if isinstance(node_params, Mapping):
            for key, value in node_params.items():
                flat[f"{node}.{key}"] = value
    return flat


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=_json_default)


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy / torch
        return value.tolist()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _scalar(value: Any) -> Any:
    """numpy/torch 0-d values -> Python scalars."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        return value.item()
    return value


def _param_kind(value: Any) -> str | None:
    """SQL type a param value asks for (None for None)."""
    value = _scalar(value)
    if value is None:
        return None
    if isinstance(value, bool):
        return "BOOLEAN"
    if isinstance(value, (int, float)):
        return "DOUBLE"
    return "VARCHAR"


def _as_text(value: Any) -> str | None:
    """The text form of a param value in a VARCHAR column (matches DuckDB's casts when widening)."""
    value = _scalar(value)
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(float(value))
    if isinstance(value, str):
        return value
    return _json(value)


def _param_value(value: Any, column_type: str) -> Any:
    value = _scalar(value)
    if value is None:
        return None
    if column_type == "VARCHAR":
        return _as_text(value)
    if column_type == "BOOLEAN":
        return bool(value)
    return float(value)


def _float_or_none(value: Any) -> float | None:
    value = _scalar(value)
    return None if value is None else float(value)


def _int_or_none(value: Any) -> int | None:
    value = _scalar(value)
    return None if value is None else int(value)


def _name(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string name, got {value!r}")
    return value


def _is_lock_error(exc: BaseException) -> bool:
    msg = str(exc).lower()
    if isinstance(exc, duckdb.IOException):
        return "lock" in msg
    if isinstance(exc, duckdb.ConnectionException):
        # same process, another connection with a different read_only setting (outside our lock)
        return "different configuration" in msg
    return False


_PROCESS_LOCKS: dict[str, threading.RLock] = {}
_PROCESS_LOCKS_GUARD = threading.Lock()


def _process_lock(path: Path) -> threading.RLock:
    key = str(path)
    with _PROCESS_LOCKS_GUARD:
        lock = _PROCESS_LOCKS.get(key)
        if lock is None:
            lock = _PROCESS_LOCKS[key] = threading.RLock()
        return lock


def _rows(cursor: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    names = [d[0] for d in cursor.description or []]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


# --------------------------------------------------------------------------------------------


class Store:
    """Results of all runs under one directory. Cheap to construct; holds no connection."""

    def __init__(self, root: Path | str, *, timeout: float | None = None):
        self.root = Path(root).expanduser().resolve()
        self.db_path = self.root / DB_NAME
        if timeout is None:
            raw = os.environ.get("VLPGRAPH_STORE_TIMEOUT") or DEFAULT_TIMEOUT_S
            try:
                timeout = float(raw)
            except ValueError:
                raise UserError(f"VLPGRAPH_STORE_TIMEOUT={raw!r}: expected seconds, e.g. 30") from None
        self.timeout = max(float(timeout), 0.0)
        self._lock = _process_lock(self.db_path)
        self._schema_ready = False
        # counters for diagnostics / benchmarks
        self.stats: dict[str, float] = {
            "reads": 0, "writes": 0, "lock_retries": 0, "lock_waits": 0, "lock_wait_s": 0.0,
            "last_read_s": 0.0, "last_write_s": 0.0, "max_write_s": 0.0, "max_read_s": 0.0,
        }

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

    # ---------------------------------------------------------------- connections

    def _wait_flock(self, fd: int, op: int, deadline: float, what: str) -> None:
        """Take an flock on fd, polling (cheap syscalls) with jittered backoff until the deadline."""
        delay = 0.0005
        while True:
            try:
                fcntl.flock(fd, op | fcntl.LOCK_NB)
                return
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
            now = time.monotonic()
            if now >= deadline:
                raise StoreLockTimeout(
                    f"could not open {self.db_path} for {what} within {self.timeout:g} s: another "
                    f"vlpgraph process kept the store busy (a long query or a stuck process?)"
                )
            time.sleep(min(delay * random.uniform(0.5, 1.5), max(deadline - now, 0.0)))
            delay = min(delay * 1.5, 0.01)

    def _open_lock_file(self, name: str) -> int | None:
        if fcntl is None:  # no flock (Windows): rely on DuckDB's lock and the retry loop alone
            return None
        path = self.root / name
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            try:
                return os.open(path, os.O_RDONLY)  # a read-only store directory
            except OSError:
                return None

    @contextmanager
    def _coordinate(self, read_only: bool, deadline: float) -> Iterator[None]:
        """Cooperative locks between vlpgraph processes (sidecar files beside the database).

        DuckDB's own lock cannot be waited on, only retried, and a failed open costs ~10 ms of CPU,
        so vlpgraph processes queue on two flock'ed sidecar files first: readers share
        ``<db>.lock``, a writer takes it exclusively; a writer also holds ``<db>.writer.lock``
        while it waits, which new readers must pass, so a writer never starves behind a stream of
        overlapping readers. Non-vlpgraph openers (the duckdb CLI, a notebook) are still handled by
        the retry loop in _connect.
        """
        turn = self._open_lock_file(DB_NAME + ".writer.lock")
        main = self._open_lock_file(DB_NAME + ".lock") if turn is not None else None
        t0 = time.monotonic()
        try:
            what = "reading" if read_only else "writing"
            if turn is not None and main is not None:
                if read_only:
                    self._wait_flock(turn, fcntl.LOCK_SH, deadline, what)
                    try:
                        self._wait_flock(main, fcntl.LOCK_SH, deadline, what)
                    finally:
                        fcntl.flock(turn, fcntl.LOCK_UN)
                else:
                    self._wait_flock(turn, fcntl.LOCK_EX, deadline, what)
                    self._wait_flock(main, fcntl.LOCK_EX, deadline, what)
            waited = time.monotonic() - t0
            if waited > 0.002:
                self.stats["lock_waits"] += 1
                self.stats["lock_wait_s"] += waited
            yield
        finally:
            for fd in (main, turn):  # closing releases the flock
                if fd is not None:
                    os.close(fd)

    def _connect(self, read_only: bool, deadline: float) -> duckdb.DuckDBPyConnection:
        """duckdb.connect, retried with jittered backoff while another process holds the file."""
        delay = 0.002
        while True:
            try:
                return duckdb.connect(str(self.db_path), read_only=read_only, config=_CONFIG)
            except (duckdb.IOException, duckdb.ConnectionException) as exc:
                if not _is_lock_error(exc):
                    raise
                now = time.monotonic()
                if now >= deadline:
                    mode = "reading" if read_only else "writing"
                    raise StoreLockTimeout(
                        f"could not open {self.db_path} for {mode} within {self.timeout:g} s: another "
                        f"process kept it locked (DuckDB lets one process hold the file; a long query "
                        f"or a stuck process may be holding it). Last error: {exc}"
                    ) from exc
                self.stats["lock_retries"] += 1
                time.sleep(min(delay * random.uniform(0.5, 1.5), max(deadline - now, 0.0)))
                delay = min(delay * 1.6, 0.1)
                self.stats["lock_wait_s"] += time.monotonic() - now

    @contextmanager
    def _connection(self, read_only: bool) -> Iterator[duckdb.DuckDBPyConnection]:
        """Open (waiting for other processes), yield, close - the connection is closed before the
        cooperative lock is released, so the next process finds the file free."""
        deadline = time.monotonic() + self.timeout
        with self._coordinate(read_only, deadline):
            con = self._connect(read_only, deadline)
            try:
                yield con
            finally:
                con.close()

    @contextmanager
    def _writing(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """One write transaction: open, BEGIN, yield, COMMIT (ROLLBACK on error), close."""
        with self._lock:
            t0 = time.perf_counter()
            self.root.mkdir(parents=True, exist_ok=True)
            if not self.db_path.exists():
                self._schema_ready = False  # new store, or someone removed the file
            try:
                with self._connection(read_only=False) as con:
                    if not self._schema_ready:
                        con.begin()
                        for stmt in SCHEMA:
                            con.execute(stmt)
                        con.commit()
                        self._schema_ready = True
                    con.begin()
                    try:
                        yield con
                        con.commit()
                    except BaseException:
                        con.rollback()
                        raise
            finally:
                dt = time.perf_counter() - t0
                self.stats["writes"] += 1
                self.stats["last_write_s"] = dt
                self.stats["max_write_s"] = max(self.stats["max_write_s"], dt)

    def read(self, fn: Callable[[duckdb.DuckDBPyConnection], Any]) -> Any:
        """Run ``fn(con)`` on a short-lived read-only connection and return what it returns.

        Waits for other processes like every read (and raises StoreLockTimeout after the timeout).
        ``fn`` must fetch everything it needs before it returns: the connection is closed right
        after. A store with no database file yet (or one whose first writer died before creating
        the tables) reads as an empty in-memory schema; nothing is created on disk."""
        with self._lock:
            t0 = time.perf_counter()
            try:
                if self.db_path.exists():
                    with self._connection(read_only=True) as con:
                        try:
                            return fn(con)
                        except duckdb.CatalogException:
                            # a file whose first writer died before creating the schema reads as
                            # empty, like a missing one; any other catalog error is real
                            present = {r[0] for r in con.execute(
                                "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main'").fetchall()}
                            if set(TABLES) <= present:
                                raise
                con = duckdb.connect(":memory:", config=_CONFIG)
                try:
                    for stmt in SCHEMA:
                        con.execute(stmt)
                    return fn(con)
                finally:
                    con.close()
            finally:
                dt = time.perf_counter() - t0
                self.stats["reads"] += 1
                self.stats["last_read_s"] = dt
                self.stats["max_read_s"] = max(self.stats["max_read_s"], dt)

    # ---------------------------------------------------------------- writer API

    def start_run(
        self,
        run_id: str,
        *,
        graph: str,
        variant: str | None,
        seed: int | None,
        params: Mapping[str, Any],
        flat_params: Mapping[str, Any],
        device: str | None,
        status: str = "running",
        if_absent: bool = False,
        processes: int = 1,
    ) -> None:
        """Insert the run, or update it in place if it exists (resume): one row per run_id, always.

        On an existing row: core fields and the given params are overwritten, error/finished_at are
        cleared, started_at keeps the first start, attempts counts starts with status="running".
        It does whatever status it is told (a completed run set back to "queued" becomes queued):
        the sweep checks ``status(run_id)`` first if it wants to skip finished trials.
        ``if_absent``: only insert a new row, leave an existing one alone (checked in the same
        transaction, so two runners queueing the same sweep never reset each other's trials).
        ``processes``: how many processes train the trial (torchrun's world size; 1 otherwise).
        """
        validate_run_id(run_id)
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        for name in flat_params:
            if not isinstance(name, str) or len(name) > 128 or not PARAM_COLUMN_RE.fullmatch(name):
                raise ValueError(f"invalid flattened param name {name!r}: expected node.param")
        params_json = _json(params)
        now = _now()
        running = status == "running"
        with self._writing() as con:
            exists = con.execute("SELECT 1 FROM runs WHERE run_id = ?", [run_id]).fetchone()
            if exists and if_absent:
                return
            param_cols = self._param_columns(con, flat_params)  # 1. columns that can hold every param
            # 2. upsert the row
            core = {
                "graph": graph, "variant": variant, "seed": _int_or_none(seed), "params": params_json,
                "status": status, "device": device, "processes": int(processes), "vlpgraph_version": __version__,
                "updated_at": now,
            }
            if exists:
                sets = [f"{quote_ident(k)} = ?" for k in core] + [f"{quote_ident(c)} = ?" for c, _ in param_cols]
                values = list(core.values()) + [v for _, v in param_cols]
                sets += ["error = NULL", "finished_at = NULL"]
                if running:
                    sets += ["started_at = COALESCE(started_at, ?)", "attempts = COALESCE(attempts, 0) + 1"]
                    values.append(now)
                con.execute(f"UPDATE runs SET {', '.join(sets)} WHERE run_id = ?", values + [run_id])
            else:
                row = {"run_id": run_id, **core, "created_at": now,
                       "started_at": now if running else None, "attempts": 1 if running else 0}
                names = [quote_ident(k) for k in row] + [quote_ident(c) for c, _ in param_cols]
                values = list(row.values()) + [v for _, v in param_cols]
                con.execute(
                    f"INSERT INTO runs ({', '.join(names)}) VALUES ({', '.join('?' * len(values))})", values
                )

    def _param_columns(self, con, flat_params: Mapping[str, Any]) -> list[tuple[str, Any]]:
        """Make sure every param has a column of a type that can hold its value (adding or widening
        columns); returns (column, value to store) pairs."""
        columns = column_types_of(con, "runs")
        param_cols: list[tuple[str, Any]] = []
        for name, raw in flat_params.items():
            kind = _param_kind(raw)
            existing = columns.get(name.lower())
            if existing is None:
                if kind is None:
                    continue
                con.execute(f"ALTER TABLE runs ADD COLUMN IF NOT EXISTS {quote_ident(name)} {kind}")
                existing = columns[name.lower()] = (name, kind)
            col, col_type = existing
            if kind is not None and kind != col_type and col_type != "VARCHAR":
                con.execute(f"ALTER TABLE runs ALTER COLUMN {quote_ident(col)} TYPE VARCHAR")
                col_type = "VARCHAR"
                columns[name.lower()] = (col, col_type)
            param_cols.append((col, _param_value(raw, col_type)))
        return param_cols

    def set_document(self, run_id: str, params: Mapping[str, Any], flat_params: Mapping[str, Any]) -> None:
        """Replace a run's resolved trial document and param columns, nothing else (its status and
        timings stay): a completed trial re-evaluated by an edited evaluator records the graph that
        produced its current evaluations."""
        validate_run_id(run_id)
        for name in flat_params:
            if not isinstance(name, str) or len(name) > 128 or not PARAM_COLUMN_RE.fullmatch(name):
                raise ValueError(f"invalid flattened param name {name!r}: expected node.param")
        with self._writing() as con:
            param_cols = self._param_columns(con, flat_params)
            sets = ["params = ?", "updated_at = ?"] + [f"{quote_ident(c)} = ?" for c, _ in param_cols]
            con.execute(f"UPDATE runs SET {', '.join(sets)} WHERE run_id = ?",
                        [_json(params), _now()] + [v for _, v in param_cols] + [run_id])

    def finish_run(
        self,
        run_id: str,
        status: str,
        error: str | None = None,
        wall_s: float | None = None,
        train_samples: int | None = None,
        step: int | None = None,
    ) -> None:
        """Record how a trial ended (any status but queued/running) and release its claim."""
        validate_run_id(run_id)
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        now = _now()
        with self._writing() as con:
            updated = con.execute(
                "UPDATE runs SET status = ?, error = ?, finished_at = ?, updated_at = ?, owner = NULL, "
                "wall_s = COALESCE(?, wall_s), train_samples = COALESCE(?, train_samples), "
                "step = COALESCE(?, step) WHERE run_id = ? RETURNING run_id",
                [status, error, now if status in ("completed", "failed", "interrupted") else None, now,
                 _float_or_none(wall_s), _int_or_none(train_samples), _int_or_none(step), run_id],
            ).fetchall()
            if not updated:
                raise StoreError(f"finish_run: no run {run_id!r} in {self.db_path} (call start_run first)")

    def update_progress(self, run_id: str, *, step: int | None = None,
                        train_samples: int | None = None, wall_s: float | None = None) -> None:
        """Record how far a running trial got (shown by `vlpgraph runs` while it runs)."""
        validate_run_id(run_id)
        with self._writing() as con:
            con.execute(
                "UPDATE runs SET step = COALESCE(?, step), train_samples = COALESCE(?, train_samples), "
                "wall_s = COALESCE(?, wall_s), updated_at = ? WHERE run_id = ?",
                [_int_or_none(step), _int_or_none(train_samples), _float_or_none(wall_s), _now(), run_id],
            )

    # ---------------------------------------------------------------- claims (one live runner per trial)

    def claim(self, run_id: str, owner: str, lease: float | None = None,
              dead_owner: str | None = None) -> tuple[bool, dict[str, Any] | None]:
        """Try to make ``owner`` the runner of a trial, in one write transaction: granted when the
        row has no owner, is owned by ``owner`` already, or its owner's heartbeat (else its last
        update) is older than the lease (that runner died). Granting sets owner and heartbeat_at.
        Returns (granted, the row as read in that transaction: None when there is no such run).
        ``dead_owner``: an owner the caller knows is dead (a process of this host that no longer
        exists), taken over without waiting for the lease. A finished trial can be claimed too (to
        add evaluations); the caller checks its status."""
        validate_run_id(run_id)
        cutoff = lease_cutoff(lease)
        with self._writing() as con:
            rows = _rows(con.execute("SELECT * FROM runs WHERE run_id = ?", [run_id]))
            if not rows:
                return False, None
            row = rows[0]
            seen = row.get("heartbeat_at") or row.get("updated_at")
            free = row.get("owner") in (None, owner, dead_owner) or seen is None or seen < cutoff
            if free:
                now = _now()
                con.execute("UPDATE runs SET owner = ?, heartbeat_at = ? WHERE run_id = ?", [owner, now, run_id])
                row.update(owner=owner, heartbeat_at=now)
            return free, row

    def heartbeat(self, run_id: str, owner: str) -> bool:
        """Mark ``owner``'s claim on a trial alive; False when it no longer holds it."""
        validate_run_id(run_id)
        with self._writing() as con:
            return bool(con.execute("UPDATE runs SET heartbeat_at = ? WHERE run_id = ? AND owner = ? RETURNING run_id",
                                    [_now(), run_id, owner]).fetchall())

    def release(self, run_id: str, owner: str) -> None:
        """Give up ``owner``'s claim on a trial (finish_run releases it too)."""
        validate_run_id(run_id)
        with self._writing() as con:
            con.execute("UPDATE runs SET owner = NULL WHERE run_id = ? AND owner = ?", [run_id, owner])

    def _insert_replace(self, con, table: str, columns: Sequence[tuple[str, str]], rows: list[list[Any]]) -> None:
        """INSERT OR REPLACE rows, one bound list per column (unnest): 4-5x faster than VALUES."""
        names = ", ".join(quote_ident(c) for c, _ in columns)
        select = ", ".join(f"unnest(?::{sql_type}[])" for _, sql_type in columns)
        for i in range(0, len(rows), _INSERT_CHUNK):
            chunk = rows[i:i + _INSERT_CHUNK]
            con.execute(f"INSERT OR REPLACE INTO {table} ({names}) SELECT {select}",
                        [list(col) for col in zip(*chunk)])

    @staticmethod
    def _dedupe(rows: Iterable[list[Any]], key: Callable[[list[Any]], tuple]) -> list[list[Any]]:
        """Last row wins per key (one INSERT OR REPLACE statement may not touch a key twice)."""
        out: dict[tuple, list[Any]] = {}
        for row in rows:
            out[key(row)] = row
        return list(out.values())

    def log_metrics(self, run_id: str, rows: Sequence[Mapping[str, Any]], *, through_step: int | None = None) -> None:
        """Write training values; a row with the same (run_id, step, name) is replaced.

        ``through_step`` also records the run's progress (runs.step) and a heartbeat in the same
        transaction.
        """
        validate_run_id(run_id)
        try:
            prepared = [
                [run_id, int(_scalar(r["step"])), _float_or_none(r.get("epoch")), _name(r["name"]),
                 _float_or_none(r["value"]), _float_or_none(r.get("wall_s"))]
                for r in rows
            ]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"log_metrics: each row needs step, name, value (+ epoch, wall_s): {exc!r}") from exc
        prepared = self._dedupe(prepared, key=lambda r: (r[1], r[3]))
        if not prepared and through_step is None:
            return
        with self._writing() as con:
            self._insert_replace(con, "metrics", _METRIC_COLUMNS, prepared)
            if through_step is not None:
                now = _now()
                con.execute("UPDATE runs SET step = ?, updated_at = ?, heartbeat_at = ? WHERE run_id = ?",
                            [int(through_step), now, now, run_id])

    def delete_metrics_after(self, run_id: str, step: int) -> int:
        """Drop metric rows with step > `step` (a run resumed from a checkpoint logs them again)."""
        validate_run_id(run_id)
        with self._writing() as con:
            deleted = con.execute(
                "DELETE FROM metrics WHERE run_id = ? AND step > ? RETURNING step", [run_id, int(step)]
            ).fetchall()
        return len(deleted)

    def log_evals(self, run_id: str, rows: Sequence[Mapping[str, Any]]) -> None:
        """Write evaluation results; (run_id, step, evaluator, metric) is replaced, never duplicated.

        Row keys: step, evaluator, metric, value, and optionally headline (True for the evaluator's
        headline metric, the one tables and the app show by default) and evaluator_hash (the
        content hash of the evaluator node). To replace a whole evaluation, use log_evaluation.
        """
        validate_run_id(run_id)
        prepared = self._prepare_evals(run_id, rows)
        if not prepared:
            return
        with self._writing() as con:
            self._insert_replace(con, "evals", _EVAL_COLUMNS, prepared)

    def _prepare_evals(self, run_id: str, rows: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
        now = _now()
        try:
            prepared = [
                [run_id, int(_scalar(r["step"])), _name(r["evaluator"]), _name(r["metric"]),
                 _float_or_none(r["value"]), now, bool(r.get("headline", False)), r.get("evaluator_hash")]
                for r in rows
            ]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"log_evals: each row needs step, evaluator, metric, value: {exc!r}") from exc
        return self._dedupe(prepared, key=lambda r: (r[1], r[2], r[3]))

    def log_evaluation(self, run_id: str, step: int, evaluator: str, evaluator_hash: str | None,
                       metrics: Mapping[str, float], headline: str | None = None,
                       patch_rows: Sequence[Mapping[str, Any]] = (),
                       sample_rows: Sequence[Mapping[str, Any]] = ()) -> None:
        """One evaluator's result at one step, replacing whatever that evaluator wrote at that step
        before (evals, patch_scores and samples, in one transaction): an edited evaluator's new metrics
        never sit beside its old ones. ``patch_rows`` as for log_patch_scores, ``sample_rows`` as for
        log_samples (step/evaluator filled in)."""
        validate_run_id(run_id)
        rows = [dict(step=step, evaluator=evaluator, metric=k, value=v, headline=k == headline,
                     evaluator_hash=evaluator_hash) for k, v in metrics.items()]
        evals = self._prepare_evals(run_id, rows)
        patches = self._prepare_patches(run_id, [dict(r, step=step, evaluator=evaluator) for r in patch_rows])
        samples = self._prepare_samples(run_id, [dict(r, step=step, evaluator=evaluator) for r in sample_rows])
        with self._writing() as con:
            for table in ("evals", "patch_scores", "samples"):
                con.execute(f"DELETE FROM {table} WHERE run_id = ? AND step = ? AND evaluator = ?",
                            [run_id, int(step), evaluator])
            if evals:
                self._insert_replace(con, "evals", _EVAL_COLUMNS, evals)
            if patches:
                self._insert_replace(con, "patch_scores", _PATCH_COLUMNS, patches)
            if samples:
                self._insert_replace(con, "samples", _SAMPLE_COLUMNS, samples)

    def log_samples(self, run_id: str, rows: Sequence[Mapping[str, Any]]) -> None:
        """Write things an evaluator produced to look at (the ``samples`` table).

        Row keys: step, evaluator, kind (e.g. 'caption', 'reconstruction'), sample_id; optional text,
        reference (a str, or a list of str stored as JSON), image / masked_image / output_image (PNG
        bytes), info (JSON-able or JSON text). (run_id, step, evaluator, kind, sample_id) is replaced.
        """
        validate_run_id(run_id)
        prepared = self._prepare_samples(run_id, rows)
        if prepared:
            with self._writing() as con:
                self._insert_replace(con, "samples", _SAMPLE_COLUMNS, prepared)

    def _prepare_samples(self, run_id: str, rows: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
        prepared = []
        for r in rows:
            try:
                blobs = []
                for key in ("image", "masked_image", "output_image"):
                    blob = r.get(key)
                    if blob is not None and not isinstance(blob, (bytes, bytearray, memoryview)):
                        raise TypeError(f"{key} must be PNG bytes, got {type(blob).__name__}")
                    blobs.append(None if blob is None else bytes(blob))
                ref, info = r.get("reference"), r.get("info")
                if ref is not None and not isinstance(ref, str):
                    ref = _json(list(ref))
                if info is not None and not isinstance(info, str):
                    info = _json(info)
                kind = str(r.get("kind") or "")
                if not kind:
                    raise ValueError("kind is required")
                prepared.append([
                    run_id, int(_scalar(r["step"])), str(r.get("evaluator") or ""), kind, int(_scalar(r["sample_id"])),
                    None if r.get("text") is None else str(r["text"]), ref, *blobs, info,
                ])
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"log_samples: bad row (sample {r.get('sample_id')!r}): {exc}") from exc
        return self._dedupe(prepared, key=lambda r: (r[1], r[2], r[3], r[4]))

    def log_patch_scores(self, run_id: str, rows: Sequence[Mapping[str, Any]]) -> None:
        """Write scored (image, caption) pairs and mixed samples for the app.

        Row keys: step, evaluator, kind ('heatmap' default | 'mixed'), sample_id, caption, grid_h,
        grid_w, scores (grid_h*grid_w floats: list, numpy array or tensor), image (PNG bytes or None),
        boxes (JSON-able or JSON text, optional); for kind 'mixed' also partner_id, partner_image,
        mixed_image (PNG bytes) and lam. (run_id, step, evaluator, kind, sample_id) is replaced.
        """
        validate_run_id(run_id)
        prepared = self._prepare_patches(run_id, rows)
        if not prepared:
            return
        with self._writing() as con:
            self._insert_replace(con, "patch_scores", _PATCH_COLUMNS, prepared)

    def _prepare_patches(self, run_id: str, rows: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
        prepared = []
        for r in rows:
            try:
                scores = r.get("scores")
                if scores is not None:
                    if hasattr(scores, "detach"):
                        scores = scores.detach().cpu()
                    scores = scores.tolist() if hasattr(scores, "tolist") else list(scores)
                    if scores and isinstance(scores[0], list):  # a [H, W] grid
                        scores = [float(v) for line in scores for v in line]
                    else:
                        scores = [float(v) for v in scores]
                grid_h, grid_w = _int_or_none(r.get("grid_h")), _int_or_none(r.get("grid_w"))
                if scores is not None and grid_h is not None and grid_w is not None \
                        and len(scores) != grid_h * grid_w:
                    raise ValueError(f"{len(scores)} scores for a {grid_h}x{grid_w} grid")
                image = r.get("image")
                if image is not None and not isinstance(image, (bytes, bytearray, memoryview)):
                    raise TypeError(f"image must be PNG bytes, got {type(image).__name__}")
                boxes = r.get("boxes")
                if boxes is not None and not isinstance(boxes, str):
                    boxes = _json(boxes)
                blobs = {}
                for key in ("partner_image", "mixed_image"):
                    blob = r.get(key)
                    if blob is not None and not isinstance(blob, (bytes, bytearray, memoryview)):
                        raise TypeError(f"{key} must be PNG bytes, got {type(blob).__name__}")
                    blobs[key] = None if blob is None else bytes(blob)
                prepared.append([
                    run_id, int(_scalar(r["step"])), str(r.get("evaluator") or ""), str(r.get("kind") or "heatmap"),
                    int(_scalar(r["sample_id"])),
                    None if r.get("caption") is None else str(r["caption"]), grid_h, grid_w, scores,
                    None if image is None else bytes(image), boxes,
                    _int_or_none(r.get("partner_id")), blobs["partner_image"], blobs["mixed_image"],
                    _float_or_none(r.get("lam")),
                ])
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"log_patch_scores: bad row (sample {r.get('sample_id')!r}): {exc}") from exc
        return self._dedupe(prepared, key=lambda r: (r[1], r[2], r[3], r[4]))

    def delete_run(self, run_id: str) -> None:
        """Remove a run's rows from every table (one transaction); artifacts on disk are left alone."""
        validate_run_id(run_id)
        with self._writing() as con:
            for table in ("metrics", "evals", "patch_scores", "samples", "runs"):
                con.execute(f"DELETE FROM {table} WHERE run_id = ?", [run_id])

    # ---------------------------------------------------------------- reader API

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
            return _rows(con.execute(
                f"SELECT * FROM runs{clause} ORDER BY created_at NULLS LAST, run_id", values))
        return self.read(q)

    def run(self, run_id: str) -> dict[str, Any] | None:
        validate_run_id(run_id)
        rows = self.read(lambda con: _rows(con.execute("SELECT * FROM runs WHERE run_id = ?", [run_id])))
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
        return self.read(lambda con: _rows(con.execute(sql + " ORDER BY step, name", values)))

    def evals(self, run_ids: Iterable[str] | None = None) -> list[dict[str, Any]]:
        sql, values = "SELECT * FROM evals", []
        if run_ids is not None:
            values = [validate_run_id(r) for r in run_ids]
            if not values:
                return []
            sql += f" WHERE run_id IN ({', '.join('?' * len(values))})"
        return self.read(lambda con: _rows(con.execute(sql + " ORDER BY run_id, evaluator, metric, step", values)))

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
        return self.read(lambda con: _rows(con.execute(sql, values)))

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
        return self.read(lambda con: _rows(con.execute(sql, values)))

    def query(self, sql: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """A read-only query with bound parameters (the connection is read-only and has no file access)."""
        return self.read(lambda con: _rows(con.execute(sql, params or [])))

    def query_df(self, sql: str, params: Sequence[Any] | Mapping[str, Any] | None = None):
        """Like query, as a pandas DataFrame (for the app)."""
        return self.read(lambda con: con.execute(sql, params or []).df())


FILTER_OPS = ("in", "contains", "between", "=", "!=", ">=", "<=")


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
    value = _scalar(value)
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
            return value if isinstance(value, str) else _as_text(value)
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"filter {column}={value!r}: not a valid {dtype.lower()} value") from None
    return value
