"""A run's row in ``runs``: its lifecycle (start, progress, finish, delete), its hyper-parameter
columns, and the claim of the one runner that runs it (owner, heartbeat, lease, ``stale``).

Statuses: queued, running, completed, failed, interrupted (a signal stopped the trial at a
checkpoint; the same command resumes it). A trial being run is claimed by one runner: ``runs.owner``
(``host:pid:token``) and ``runs.heartbeat_at``, which that runner renews every few seconds and with
every metrics batch. ``claim`` grants a trial in one write transaction when it has no owner, is the
caller's, or its owner's heartbeat is older than the lease (``$VLPGRAPH_LEASE_S``, default 60 s:
that runner is dead); finish_run and release clear the owner. Readers show a ``running`` run whose
heartbeat (else its last update) is older than the lease as ``stale`` without writing anything
(shown_status, status_sql). Several runners on one store: docs/concurrency.md.

Flattened hyper-parameters: every ``node.param`` of a run is also a column of ``runs`` (quoted
identifier), added with ``ALTER TABLE ADD COLUMN IF NOT EXISTS`` in the same transaction as the
run's upsert; a param whose value is ``None`` adds no column (absent columns read as NULL anyway).
Type conflicts never lose data: a value whose type does not fit an existing DOUBLE/BOOLEAN column
(``train.lr`` was 0.001 and is now ``"auto"``) widens the column to VARCHAR in that transaction;
existing values become their text form (0.001 -> '0.001', 8 -> '8.0', true -> 'true') and every
later value is stored as the same text form (values.as_text). A column's type therefore changes at
most once; the ``params`` JSON column always keeps the exact resolved values.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from typing import Any, Mapping

from vlpgraph import __version__
from vlpgraph.errors import UserError
from vlpgraph.store.connection import Connections, StoreError, dict_rows
from vlpgraph.store.schema import PARAM_COLUMN_RE, STALE, STATUSES, column_types_of, quote_ident, validate_run_id
from vlpgraph.store.values import float_or_none, int_or_none, param_kind, param_value, to_json, utc_now

DEFAULT_LEASE_S = 60.0
LEASE_ENV = "VLPGRAPH_LEASE_S"


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
    return utc_now() - timedelta(seconds=lease_s() if lease is None else lease)


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


def flatten_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """{node: {param: value}} -> {"node.param": value}; dict/list values stay whole (stored as JSON)."""
    flat: dict[str, Any] = {}
    for node, node_params in params.items():
        if isinstance(node_params, Mapping):
            for key, value in node_params.items():
                flat[f"{node}.{key}"] = value
    return flat


class RunLifecycle(Connections):
    """The writes of a run's ``runs`` row, and the claims on it (one live runner per trial)."""

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
        params_json = to_json(params)
        now = utc_now()
        running = status == "running"
        with self._writing() as con:
            exists = con.execute("SELECT 1 FROM runs WHERE run_id = ?", [run_id]).fetchone()
            if exists and if_absent:
                return
            param_cols = self._param_columns(con, flat_params)  # 1. columns that can hold every param
            # 2. upsert the row
            core = {
                "graph": graph, "variant": variant, "seed": int_or_none(seed), "params": params_json,
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
            kind = param_kind(raw)
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
            param_cols.append((col, param_value(raw, col_type)))
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
                        [to_json(params), utc_now()] + [v for _, v in param_cols] + [run_id])

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
        now = utc_now()
        with self._writing() as con:
            updated = con.execute(
                "UPDATE runs SET status = ?, error = ?, finished_at = ?, updated_at = ?, owner = NULL, "
                "wall_s = COALESCE(?, wall_s), train_samples = COALESCE(?, train_samples), "
                "step = COALESCE(?, step) WHERE run_id = ? RETURNING run_id",
                [status, error, now if status in ("completed", "failed", "interrupted") else None, now,
                 float_or_none(wall_s), int_or_none(train_samples), int_or_none(step), run_id],
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
                [int_or_none(step), int_or_none(train_samples), float_or_none(wall_s), utc_now(), run_id],
            )

    def delete_run(self, run_id: str) -> None:
        """Remove a run's rows from every table (one transaction); artifacts on disk are left alone."""
        validate_run_id(run_id)
        with self._writing() as con:
            for table in ("metrics", "evals", "patch_scores", "samples", "runs"):
                con.execute(f"DELETE FROM {table} WHERE run_id = ?", [run_id])

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
            rows = dict_rows(con.execute("SELECT * FROM runs WHERE run_id = ?", [run_id]))
            if not rows:
                return False, None
            row = rows[0]
            seen = row.get("heartbeat_at") or row.get("updated_at")
            free = row.get("owner") in (None, owner, dead_owner) or seen is None or seen < cutoff
            if free:
                now = utc_now()
                con.execute("UPDATE runs SET owner = ?, heartbeat_at = ? WHERE run_id = ?", [owner, now, run_id])
                row.update(owner=owner, heartbeat_at=now)
            return free, row

    def heartbeat(self, run_id: str, owner: str) -> bool:
        """Mark ``owner``'s claim on a trial alive; False when it no longer holds it."""
        validate_run_id(run_id)
        with self._writing() as con:
            return bool(con.execute("UPDATE runs SET heartbeat_at = ? WHERE run_id = ? AND owner = ? RETURNING run_id",
                                    [utc_now(), run_id, owner]).fetchall())

    def release(self, run_id: str, owner: str) -> None:
        """Give up ``owner``'s claim on a trial (finish_run releases it too)."""
        validate_run_id(run_id)
        with self._writing() as con:
            con.execute("UPDATE runs SET owner = NULL WHERE run_id = ? AND owner = ?", [run_id, owner])
