"""The DuckDB result store: schema, upserts, idempotent logging, injection safety, concurrency."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import pytest

from vlpgraph.errors import UserError
from vlpgraph.store import Store, StoreLockTimeout, flatten_params
from vlpgraph.store import writes as store_writes

HERE = Path(__file__).resolve().parent


def _start(store: Store, run_id: str, flat: dict, **kw) -> None:
    params = {}
    for key, value in flat.items():
        node, param = key.split(".", 1)
        params.setdefault(node, {})[param] = value
    store.start_run(run_id, graph=kw.get("graph", "g"), variant=kw.get("variant", "baseline"),
                    seed=kw.get("seed", 0), params=params, flat_params=flat, device="cpu",
                    status=kw.get("status", "running"))


def _raw(store: Store, sql: str, params=None):
    con = duckdb.connect(str(store.db_path), read_only=True)
    try:
        return con.execute(sql, params or []).fetchall()
    finally:
        con.close()


# ------------------------------------------------------------------ schema and upserts


def test_start_run_twice_is_one_row_and_resume_keeps_it(tmp_path):
    s = Store(tmp_path)
    _start(s, "r1", {"shapes.train_fraction": 0.1, "train.lr": 1e-3})
    first = s.run("r1")
    s.log_metrics("r1", [dict(step=1, epoch=0, name="loss", value=2.0, wall_s=0.1)])
    s.finish_run("r1", "failed", error="boom", step=1)
    assert s.status("r1") == "failed"
    _start(s, "r1", {"shapes.train_fraction": 0.1, "train.lr": 1e-3})  # resume
    assert _raw(s, "SELECT count(*) FROM runs") == [(1,)]
    again = s.run("r1")
    assert again["status"] == "running" and again["error"] is None and again["finished_at"] is None
    assert again["started_at"] == first["started_at"]
    assert again["attempts"] == 2
    assert again["step"] == 1
    assert len(s.metrics("r1")) == 1
    assert json.loads(again["params"]) == {"shapes": {"train_fraction": 0.1}, "train": {"lr": 1e-3}}
    s.finish_run("r1", "completed", wall_s=1.5, train_samples=64, step=10)
    done = s.run("r1")
    assert (done["status"], done["wall_s"], done["train_samples"], done["step"]) == ("completed", 1.5, 64, 10)
    assert done["finished_at"] is not None and done["vlpgraph_version"]
    assert [r["run_id"] for r in s.runs()] == ["r1"]


def test_flattened_params_are_real_columns(tmp_path):
    s = Store(tmp_path)
    _start(s, "a", {"shapes.train_fraction": 0.1, "train.lr": 1e-3, "train.amp": True, "eval.ks": [1, 5]})
    _start(s, "b", {"shapes.train_fraction": 0.4, "train.lr": 1e-3, "train.amp": False, "eval.ks": [1]})
    assert _raw(s, 'SELECT "shapes.train_fraction" FROM runs ORDER BY 1') == [(0.1,), (0.4,)]
    types = s.column_types()
    assert types["shapes.train_fraction"] == "DOUBLE" and types["train.amp"] == "BOOLEAN"
    assert types["eval.ks"] == "VARCHAR"
    assert [r["run_id"] for r in s.runs({"shapes.train_fraction": 0.4})] == ["b"]
    assert [r["run_id"] for r in s.runs({"train.amp": "true"})] == ["a"]  # CLI-style string coerced
    assert [r["run_id"] for r in s.runs({"shapes.train_fraction": [0.1, 0.4]})] == ["a", "b"]
    assert json.loads(s.run("a")["eval.ks"]) == [1, 5]
    assert s.query('SELECT run_id FROM runs WHERE "shapes.train_fraction" > ? ORDER BY run_id', [0.2]) == [
        {"run_id": "b"}]
    # a later run with a param of a new name adds a column; older runs read NULL there
    assert "mix.alpha" not in s.columns()
    _start(s, "c", {"shapes.train_fraction": 1.0, "mix.alpha": 0.5})
    assert "mix.alpha" in s.columns() and "mix.alpha" in s.param_columns()
    assert {r["run_id"]: r["mix.alpha"] for r in s.runs()} == {"a": None, "b": None, "c": 0.5}
    assert [r["run_id"] for r in s.runs({"mix.alpha": None})] == ["a", "b"]


def test_type_conflict_widens_to_text_and_loses_nothing(tmp_path):
    s = Store(tmp_path)
    _start(s, "a", {"train.lr": 0.001, "train.amp": True, "train.epochs": 8})
    _start(s, "b", {"train.lr": "auto", "train.amp": 1, "train.epochs": 8})
    _start(s, "c", {"train.lr": 0.01, "train.amp": False, "train.epochs": 8})
    types = s.column_types()
    assert types["train.lr"] == "VARCHAR" and types["train.amp"] == "VARCHAR"
    assert types["train.epochs"] == "DOUBLE"  # ints and floats share DOUBLE: no conflict
    got = {r["run_id"]: (r["train.lr"], r["train.amp"]) for r in s.runs()}
    assert got == {"a": ("0.001", "true"), "b": ("auto", "1.0"), "c": ("0.01", "false")}
    assert [r["run_id"] for r in s.runs({"train.lr": 0.01})] == ["c"]  # number filter on a text column
    assert json.loads(s.run("b")["params"])["train"]["lr"] == "auto"


def test_flatten_params_helper():
    assert flatten_params({"shapes": {"train_fraction": 0.5}, "eval": {"ks": [1, 5]}}) == {
        "shapes.train_fraction": 0.5, "eval.ks": [1, 5]}


# ------------------------------------------------------------------ idempotent logging


def test_log_evals_replaces_on_same_key(tmp_path):
    s = Store(tmp_path)
    _start(s, "r", {"train.lr": 0.1})
    s.log_evals("r", [dict(step=100, evaluator="retrieval", metric="i2t_r1", value=0.2),
                      dict(step=100, evaluator="retrieval", metric="t2i_r1", value=0.3)])
    s.log_evals("r", [dict(step=100, evaluator="retrieval", metric="i2t_r1", value=0.25),
                      dict(step=200, evaluator="retrieval", metric="i2t_r1", value=0.4),
                      dict(step=200, evaluator="zeroshot", metric="acc", value=0.5)])
    rows = s.evals(["r"])
    assert len(rows) == 4
    assert {(r["step"], r["evaluator"], r["metric"]): r["value"] for r in rows}[(100, "retrieval", "i2t_r1")] == 0.25
    assert _raw(s, "SELECT count(*) FROM evals") == [(4,)]
    assert s.completed_evals("r") == {("retrieval", 100), ("retrieval", 200), ("zeroshot", 200)}
    assert s.evals([]) == [] and len(s.evals()) == 4


def test_delete_metrics_after_and_metrics_replace(tmp_path):
    s = Store(tmp_path)
    _start(s, "r", {"train.lr": 0.1})
    s.log_metrics("r", [dict(step=i, epoch=i // 5, name=n, value=float(i), wall_s=i / 10)
                        for i in range(10) for n in ("loss", "lr")])
    assert s.delete_metrics_after("r", 4) == 10
    assert sorted({m["step"] for m in s.metrics("r")}) == [0, 1, 2, 3, 4]
    # the resumed run logs steps 5.. again (and re-logs step 4): no duplicates
    s.log_metrics("r", [dict(step=i, epoch=i // 5, name=n, value=float(i) + 0.5, wall_s=i / 10)
                        for i in range(4, 10) for n in ("loss", "lr")])
    assert _raw(s, "SELECT count(*), count(DISTINCT (step, name)) FROM metrics") == [(20, 20)]
    loss = s.metrics("r", name="loss")
    assert [m["step"] for m in loss] == list(range(10))
    assert loss[4]["value"] == 4.5 and loss[3]["value"] == 3.0


def test_patch_scores_roundtrip_and_replace(tmp_path):
    np = pytest.importorskip("numpy")
    s = Store(tmp_path)
    _start(s, "r", {"train.lr": 0.1})
    png = b"\x89PNG\r\n\x1a\nfake"
    row = dict(step=50, sample_id=7, caption="a red square left of a blue circle", grid_h=2, grid_w=3,
               scores=np.arange(6, dtype=np.float32).reshape(2, 3), image=png, boxes=[[0, 0, 4, 4]])
    s.log_patch_scores("r", [row])
    s.log_patch_scores("r", [dict(row, caption="replaced"), dict(row, sample_id=8, image=None, boxes=None)])
    got = s.patch_scores("r", step=50)
    assert [(g["sample_id"], g["caption"]) for g in got] == [(7, "replaced"), (8, row["caption"])]
    assert got[0]["scores"] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0] and got[0]["image"] == png
    assert json.loads(got[0]["boxes"]) == [[0, 0, 4, 4]] and got[1]["image"] is None
    with pytest.raises(ValueError, match="grid"):
        s.log_patch_scores("r", [dict(row, grid_w=4)])


def test_a_failing_write_leaves_nothing(tmp_path, monkeypatch):
    s = Store(tmp_path)
    _start(s, "r", {"train.lr": 0.1})
    monkeypatch.setattr(store_writes, "INSERT_CHUNK", 2)  # several statements in one transaction
    rows = [dict(step=i, epoch=0, name="loss", value=1.0) for i in range(4)]
    rows.append(dict(step=10**30, epoch=0, name="loss", value=1.0))  # overflows BIGINT in DuckDB
    with pytest.raises(Exception):
        s.log_metrics("r", rows)
    assert s.metrics("r") == []
    with pytest.raises(ValueError):
        s.log_metrics("r", [dict(step=1, name=None, value=1.0)])


# ------------------------------------------------------------------ hostile input


def test_hostile_filters_are_bound_or_refused(tmp_path):
    s = Store(tmp_path)
    _start(s, "r", {"shapes.train_fraction": 0.5})
    evil = "x'; DROP TABLE runs; --"
    assert s.runs({"graph": evil}) == []
    assert s.runs({"shapes.train_fraction": 0.5})[0]["run_id"] == "r"  # table still there
    for bogus in ['graph" = graph OR "1', "graph; DROP TABLE runs", "nope", 'x"; DROP TABLE runs; --']:
        with pytest.raises(UserError, match="unknown column"):
            s.runs({bogus: "g"})
    with pytest.raises(UserError, match="did you mean 'graph'"):
        s.runs({"grap": "g"})
    with pytest.raises(UserError, match="not a valid double"):
        s.runs({"shapes.train_fraction": evil})
    assert _raw(s, "SELECT count(*) FROM runs") == [(1,)]
    # values written are bound too
    _start(s, evil.replace("'", "").replace(";", "").replace(" ", "_")[:20], {"shapes.train_fraction": 0.1},
           graph=evil)
    assert [r["graph"] for r in s.runs({"graph": evil})] == [evil]
    # identifiers and ids that could escape SQL or paths are refused
    with pytest.raises(ValueError, match="param name"):
        _start(s, "q", {'x.y" DOUBLE); DROP TABLE runs; --': 1})
    for run_id in ["../etc", "a/b", "", "x" * 129, "..", "a b", "r'1"]:
        with pytest.raises(UserError, match="invalid run id"):
            s.run(run_id)
    with pytest.raises(UserError):
        s.run_dir("../../outside")
    assert s.run_dir("r") == s.root / "runs" / "r"
    assert _raw(s, "SELECT count(*) FROM runs") == [(2,)]


def test_query_is_read_only_and_sandboxed(tmp_path):
    s = Store(tmp_path)
    _start(s, "r", {"train.lr": 0.1})
    with pytest.raises(duckdb.Error):
        s.query("DROP TABLE runs")
    with pytest.raises(duckdb.Error):
        s.query("SELECT * FROM read_csv(?)", [str(s.db_path)])
    assert s.query("SELECT count(*) AS n FROM runs WHERE run_id = ?", ["r"]) == [{"n": 1}]


def test_reading_a_missing_store_creates_nothing(tmp_path):
    s = Store(tmp_path / "nowhere")
    assert s.runs() == [] and s.metrics("r") == [] and s.evals() == [] and s.run("r") is None
    assert s.status("r") is None and s.completed_evals("r") == set()
    assert s.query("SELECT count(*) AS n FROM metrics") == [{"n": 0}]
    assert "shapes.train_fraction" not in s.columns()
    assert not (tmp_path / "nowhere").exists()
    # a file whose first writer died before creating any table reads as empty too
    (tmp_path / "empty").mkdir()
    duckdb.connect(str(tmp_path / "empty" / "vlpgraph.duckdb")).close()
    e = Store(tmp_path / "empty")
    assert e.runs() == [] and e.metrics("r") == []
    with pytest.raises(duckdb.CatalogException):  # a real catalog error is not hidden
        s.query("SELECT * FROM no_such_table")
    _start(e, "r", {"train.lr": 0.1})  # and the next writer creates the schema
    assert [r["run_id"] for r in e.runs()] == ["r"]
    with pytest.raises(duckdb.CatalogException):
        e.query("SELECT * FROM no_such_table")


# ------------------------------------------------------------------ concurrency


@pytest.mark.integration
def test_lock_held_by_another_process_times_out_clearly_then_retry_succeeds(tmp_path):
    s = Store(tmp_path)
    _start(s, "r", {"train.lr": 0.1})
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('locked', flush=True); "
         "time.sleep(float(sys.argv[2])); c.close()", str(s.db_path), "1.5"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        with pytest.raises(StoreLockTimeout, match="could not open .* for reading within 0.3 s"):
            Store(tmp_path, timeout=0.3).runs()
        assert time.monotonic() - t0 < 2.0
        with pytest.raises(StoreLockTimeout, match="for writing"):
            Store(tmp_path, timeout=0.2).finish_run("r", "completed")
        patient = Store(tmp_path, timeout=20)
        assert [r["run_id"] for r in patient.runs()] == ["r"]  # waits for the holder, then reads
        assert patient.stats["lock_retries"] > 0
    finally:
        holder.wait(timeout=20)
    assert holder.returncode == 0


def test_threads_in_one_process_share_the_file(tmp_path):
    writer, reader = Store(tmp_path), Store(tmp_path)
    _start(writer, "r", {"train.lr": 0.1})
    errors: list[BaseException] = []

    def write():
        try:
            for i in range(30):
                writer.log_metrics("r", [dict(step=i, epoch=0, name="loss", value=1.0)])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=write)
    thread.start()
    seen = []
    while thread.is_alive():
        seen.append(len(reader.metrics("r")))
        time.sleep(0.002)
    thread.join()
    assert not errors
    assert seen == sorted(seen) and len(reader.metrics("r")) == 30


@pytest.mark.integration
@pytest.mark.slow
def test_readers_and_writer_in_separate_processes(tmp_path):
    """A subprocess writes a running trial in many small transactions while this process and a
    second subprocess read 50 times each: no errors anywhere, counts never go down, nothing lost."""
    root, run_id = tmp_path / "store", "trial_0"
    batches, per_batch = 80, 4  # 320 metric rows in 80 transactions
    wout, rout = tmp_path / "writer.json", tmp_path / "reader.json"
    writer = subprocess.Popen(
        [sys.executable, str(HERE / "_store_writer.py"), str(root), run_id, str(batches), str(per_batch),
         "0.02", str(wout)], stderr=subprocess.PIPE, text=True)
    reader = subprocess.Popen(
        [sys.executable, str(HERE / "_store_reader.py"), str(root), run_id, "50", "0.04", str(rout)],
        stderr=subprocess.PIPE, text=True)
    try:
        s = Store(root)
        deadline = time.monotonic() + 20
        while not s.runs():  # wait for the trial to appear
            assert time.monotonic() < deadline, "writer never started"
            time.sleep(0.02)
        counts, statuses, latencies = [], [], []
        for _ in range(50):
            t0 = time.perf_counter()
            runs = s.runs()
            counts.append(len(s.metrics(run_id)))
            latencies.append(time.perf_counter() - t0)
            statuses.append(runs[0]["status"])
            time.sleep(0.03)
        _, werr = writer.communicate(timeout=60)
        _, rerr = reader.communicate(timeout=60)
    finally:
        for proc in (writer, reader):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert writer.returncode == 0, werr
    assert reader.returncode == 0, rerr
    wres, rres = json.loads(wout.read_text()), json.loads(rout.read_text())

    for name, seen, status_seq in [("test process", counts, statuses), ("subprocess", rres["counts"],
                                                                         rres["statuses"])]:
        assert seen == sorted(seen), f"{name}: metric count went down: {seen}"
        assert any(0 < c < batches * per_batch for c in seen), f"{name} never read mid-write: {seen}"
        order = {None: 0, "running": 1, "completed": 2}
        assert [order[x] for x in status_seq] == sorted(order[x] for x in status_seq), status_seq

    final = s.metrics(run_id)
    written = {(step, name) for step, name in wres["written"]}
    assert len(wres["written"]) == batches * per_batch == len(written)
    assert len(final) == len(written) and {(m["step"], m["name"]) for m in final} == written
    assert all(m["value"] == m["step"] + int(m["name"][1:]) / 10 for m in final)
    run = s.run(run_id)
    assert run["status"] == "completed" and run["step"] == batches - 1
    assert run["train_samples"] == batches * per_batch

    print(f"\nwriter: {batches} transactions in {wres['duration_s']:.2f} s; open+write+close median "
          f"{wres['write_median_ms']:.1f} ms, p90 {wres['write_p90_ms']:.1f} ms, max {wres['write_max_ms']:.1f} ms; "
          f"waited {wres['lock_waits']}x, duckdb open retries {wres['lock_retries']}, {wres['lock_wait_s']:.2f} s waiting")
    print(f"test-process reader: 50 reads, median {1e3 * statistics.median(latencies):.1f} ms, max "
          f"{1e3 * max(latencies):.1f} ms, waited {s.stats['lock_waits']}x, duckdb open retries {s.stats['lock_retries']} "
          f"({s.stats['lock_wait_s']:.2f} s waiting)")
    print(f"subprocess reader: 50 reads, max {rres['read_max_ms']:.1f} ms, waited {rres['lock_waits']}x, "
          f"duckdb open retries {rres['lock_retries']} "
          f"({rres['lock_wait_s']:.2f} s waiting)")


def test_waits_behind_a_cooperating_process_then_times_out_clearly(tmp_path):
    fcntl = pytest.importorskip("fcntl")
    s = Store(tmp_path)
    _start(s, "r", {"train.lr": 0.1})
    fd = os.open(tmp_path / "vlpgraph.duckdb.writer.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a writer of another process would, while it waits/writes
        with pytest.raises(StoreLockTimeout, match="could not open .* for reading within 0.2 s"):
            Store(tmp_path, timeout=0.2).runs()
        with pytest.raises(StoreLockTimeout, match="for writing within 0.2 s"):
            Store(tmp_path, timeout=0.2).log_metrics("r", [dict(step=1, name="loss", value=1.0)])
        releaser = threading.Timer(0.3, fcntl.flock, args=(fd, fcntl.LOCK_UN))
        releaser.start()
        patient = Store(tmp_path, timeout=10)
        assert [r["run_id"] for r in patient.runs()] == ["r"]
        assert patient.stats["lock_waits"] == 1 and patient.stats["lock_wait_s"] >= 0.2
        releaser.join()
    finally:
        os.close(fd)
    assert Store(tmp_path).metrics("r") == []


def test_patch_scores_of_two_evaluators_and_mixed_samples_do_not_collide(tmp_path):
    store = Store(tmp_path)
    store.start_run("r1", graph="g", variant="v", seed=0, params={}, flat_params={}, device="cpu")
    row = dict(step=5, sample_id=3, caption="a red circle", grid_h=2, grid_w=2, scores=[0.1, 0.2, 0.3, 0.4], image=b"png")
    store.log_patch_scores("r1", [dict(row, evaluator="grounding"), dict(row, evaluator="grounding_sim", scores=[1, 2, 3, 4])])
    store.log_patch_scores("r1", [dict(row, evaluator="grounding", kind="mixed", partner_id=7, partner_image=b"p",
                                       mixed_image=b"m", lam=0.75)])
    rows = store.query("SELECT evaluator, kind, scores, partner_id, lam FROM patch_scores ORDER BY evaluator, kind")
    assert [(r["evaluator"], r["kind"]) for r in rows] == [("grounding", "heatmap"), ("grounding", "mixed"), ("grounding_sim", "heatmap")]
    assert rows[1]["partner_id"] == 7 and rows[1]["lam"] == 0.75
    assert rows[2]["scores"] == [1.0, 2.0, 3.0, 4.0]
    with pytest.raises(ValueError, match="mixed_image must be PNG bytes"):
        store.log_patch_scores("r1", [dict(row, evaluator="g", kind="mixed", mixed_image=[1, 2])])


# ------------------------------------------------------ the runner's bookkeeping: claims, older stores


def test_a_store_from_before_evaluator_hashes_and_claims_gains_the_columns(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    con = duckdb.connect(str(tmp_path / "vlpgraph.duckdb"))
    con.execute("CREATE TABLE runs (run_id VARCHAR PRIMARY KEY, graph VARCHAR, variant VARCHAR, seed BIGINT, "
                "params VARCHAR, status VARCHAR, error VARCHAR, created_at TIMESTAMP, started_at TIMESTAMP, "
                "finished_at TIMESTAMP, updated_at TIMESTAMP, wall_s DOUBLE, train_samples BIGINT, step BIGINT, "
                "device VARCHAR, vlpgraph_version VARCHAR, attempts INTEGER)")
    con.execute("CREATE TABLE evals (run_id VARCHAR NOT NULL, step BIGINT NOT NULL, evaluator VARCHAR NOT NULL, "
                "metric VARCHAR NOT NULL, value DOUBLE, logged_at TIMESTAMP, headline BOOLEAN, "
                "PRIMARY KEY (run_id, step, evaluator, metric))")
    con.execute("INSERT INTO evals VALUES ('r-s0', 4, 'retrieval', 'i2t_r5', 0.5, NULL, FALSE)")
    con.close()
    store = Store(tmp_path)
    store.start_run("r-s0", graph="g", variant="v", seed=0, params={}, flat_params={}, device="cpu")
    assert {"owner", "heartbeat_at", "processes"} <= set(store.columns("runs"))
    assert store.run("r-s0")["processes"] == 1
    assert "evaluator_hash" in store.columns("evals")
    # a row nobody knows the evaluator of is not a completed evaluation of any particular version
    assert store.completed_evals("r-s0") == {("retrieval", 4)}
    assert store.completed_evals("r-s0", {"retrieval": "abc"}) == set()
    store.log_evaluation("r-s0", 4, "retrieval", "abc", {"i2t_r2": 0.25})
    assert [(r["metric"], r["evaluator_hash"]) for r in store.evals(["r-s0"])] == [("i2t_r2", "abc")]
    assert store.completed_evals("r-s0", {"retrieval": "abc"}) == {("retrieval", 4)}


def test_a_claim_is_held_by_one_live_runner_and_taken_over_when_its_lease_expires(tmp_path):
    store = Store(tmp_path)
    store.start_run("t-s0", graph="g", variant="v", seed=0, params={}, flat_params={}, device="cpu", status="queued")
    granted, row = store.claim("t-s0", "a:1:x", lease=60)
    assert granted and row["owner"] == "a:1:x"
    granted, row = store.claim("t-s0", "b:2:y", lease=60)
    assert not granted and row["owner"] == "a:1:x"  # a is alive
    assert store.claim("t-s0", "a:1:x", lease=60)[0]  # the owner may claim again (a resume)
    assert store.heartbeat("t-s0", "a:1:x") and not store.heartbeat("t-s0", "b:2:y")
    assert store.claim("t-s0", "b:2:y", lease=60, dead_owner="a:1:x")[0]  # a is known dead
    time.sleep(0.05)
    assert store.claim("t-s0", "c:3:z", lease=0.01)[0]  # b fell silent for longer than the lease
    assert not store.heartbeat("t-s0", "b:2:y")
    store.finish_run("t-s0", "completed")
    assert store.run("t-s0")["owner"] is None
    # queueing again never resets a trial another runner has moved on
    store.start_run("t-s0", graph="g", variant="v", seed=0, params={}, flat_params={}, device="cpu",
                    status="queued", if_absent=True)
    assert store.status("t-s0") == "completed"
