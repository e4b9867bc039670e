"""What the database holds: its tables and columns, the run statuses, the names allowed in SQL.

Keys: ``runs``: run_id (upsert; a resumed run keeps its row). ``metrics``: (run_id, step, name).
``evals``: (run_id, step, evaluator, metric). ``patch_scores`` and ``samples``: (run_id, step,
evaluator, kind, sample_id). All are PRIMARY KEYs and every log_* call replaces rows with the same
key, so repeating a write never duplicates. Timestamps are UTC. Besides its core columns, ``runs``
has one column per flattened hyper-parameter (``node.param``, see vlpgraph/store/runs.py).
"""

from __future__ import annotations

import re

import duckdb

from vlpgraph.errors import UserError

DB_NAME = "vlpgraph.duckdb"
RUN_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")
# node.param (possibly deeper): no quotes, no spaces, at least one dot, never a core column name.
PARAM_COLUMN_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)+")
STATUSES = ("queued", "running", "completed", "failed", "interrupted")
# Not stored: what readers show for a `running` run whose heartbeat is older than the lease (its
# process died without a word, e.g. SIGKILL or a lost node). See shown_status / status_sql.
STALE = "stale"

# The columns each log_* call writes, in the order of its rows (with the SQL type each is bound as).
METRIC_COLUMNS = [("run_id", "VARCHAR"), ("step", "BIGINT"), ("epoch", "DOUBLE"), ("name", "VARCHAR"),
                  ("value", "DOUBLE"), ("wall_s", "DOUBLE")]
EVAL_COLUMNS = [("run_id", "VARCHAR"), ("step", "BIGINT"), ("evaluator", "VARCHAR"), ("metric", "VARCHAR"),
                ("value", "DOUBLE"), ("logged_at", "TIMESTAMP"), ("headline", "BOOLEAN"),
                ("evaluator_hash", "VARCHAR")]
PATCH_COLUMNS = [("run_id", "VARCHAR"), ("step", "BIGINT"), ("evaluator", "VARCHAR"), ("kind", "VARCHAR"),
                 ("sample_id", "BIGINT"), ("caption", "VARCHAR"),
                 ("grid_h", "INTEGER"), ("grid_w", "INTEGER"), ("scores", "FLOAT[]"), ("image", "BLOB"),
                 ("boxes", "VARCHAR"), ("partner_id", "BIGINT"), ("partner_image", "BLOB"),
                 ("mixed_image", "BLOB"), ("lam", "DOUBLE")]
SAMPLE_COLUMNS = [("run_id", "VARCHAR"), ("step", "BIGINT"), ("evaluator", "VARCHAR"), ("kind", "VARCHAR"),
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
