"""Opening the database: one short-lived DuckDB connection per operation, queued behind other processes.

Every operation opens a connection, runs one short transaction, fetches everything it needs and
closes it, so the app and ``vlpgraph runs`` can read while a sweep writes. Processes queue on
flock'ed sidecar files, ``duckdb.connect`` is retried while another process holds the file, both
within ``timeout`` (:class:`StoreLockTimeout` after it). How and why, and the limits:
docs/concurrency.md.
"""

from __future__ import annotations

import errno
import os
import random
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import duckdb

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

from vlpgraph.errors import UserError
from vlpgraph.store.schema import DB_NAME, SCHEMA, TABLES

DEFAULT_TIMEOUT_S = 30.0

_CONFIG = {"threads": 1, "enable_external_access": False}


class StoreError(Exception):
    """The store could not do what was asked (not the user's input)."""


class StoreLockTimeout(StoreError):
    """Another process kept the database file locked for longer than the timeout."""


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


def dict_rows(cursor: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    """Every row of an executed statement, as {column: value}."""
    names = [d[0] for d in cursor.description or []]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


class Connections:
    """The store's root, its database file, the timeout and the machinery that opens the file: the
    base of every part of :class:`vlpgraph.store.Store`."""

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
