"""What a run logs: training metrics, evaluations, patch scores and samples (each log_* call is one
write transaction; rows with the same key are replaced, never duplicated - keys in schema.py).

``evals.evaluator_hash`` is the content hash of the evaluator node that wrote the row (its kind,
params and inputs' hashes). ``log_evaluation`` writes one evaluator's result at one step and deletes
whatever that evaluator had at that step first (evals, patch_scores and samples, one transaction),
so an edited evaluator's rows never sit beside its older version's (``completed_evals`` in reads.py
counts an evaluation as done only when its rows carry the hash asked for). ``delete_metrics_after``
drops what a resumed run will log again. Log in batches: each call opens the file once
(docs/concurrency.md).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

from vlpgraph.store.connection import Connections
from vlpgraph.store.schema import EVAL_COLUMNS, METRIC_COLUMNS, PATCH_COLUMNS, SAMPLE_COLUMNS, quote_ident, validate_run_id
from vlpgraph.store.values import float_or_none, int_or_none, nonempty_name, scalar, to_json, utc_now

INSERT_CHUNK = 5000  # rows per INSERT statement


class ResultWrites(Connections):
    """The log_* calls of a run (and delete_metrics_after)."""

    def _insert_replace(self, con, table: str, columns: Sequence[tuple[str, str]], rows: list[list[Any]]) -> None:
        """INSERT OR REPLACE rows, one bound list per column (unnest): 4-5x faster than VALUES."""
        names = ", ".join(quote_ident(c) for c, _ in columns)
        select = ", ".join(f"unnest(?::{sql_type}[])" for _, sql_type in columns)
        for i in range(0, len(rows), INSERT_CHUNK):
            chunk = rows[i:i + INSERT_CHUNK]
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
                [run_id, int(scalar(r["step"])), float_or_none(r.get("epoch")), nonempty_name(r["name"]),
                 float_or_none(r["value"]), float_or_none(r.get("wall_s"))]
                for r in rows
            ]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"log_metrics: each row needs step, name, value (+ epoch, wall_s): {exc!r}") from exc
        prepared = self._dedupe(prepared, key=lambda r: (r[1], r[3]))
        if not prepared and through_step is None:
            return
        with self._writing() as con:
            self._insert_replace(con, "metrics", METRIC_COLUMNS, prepared)
            if through_step is not None:
                now = utc_now()
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
            self._insert_replace(con, "evals", EVAL_COLUMNS, prepared)

    def _prepare_evals(self, run_id: str, rows: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
        now = utc_now()
        try:
            prepared = [
                [run_id, int(scalar(r["step"])), nonempty_name(r["evaluator"]), nonempty_name(r["metric"]),
                 float_or_none(r["value"]), now, bool(r.get("headline", False)), r.get("evaluator_hash")]
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
                self._insert_replace(con, "evals", EVAL_COLUMNS, evals)
            if patches:
                self._insert_replace(con, "patch_scores", PATCH_COLUMNS, patches)
            if samples:
                self._insert_replace(con, "samples", SAMPLE_COLUMNS, samples)

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
                self._insert_replace(con, "samples", SAMPLE_COLUMNS, prepared)

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
                    ref = to_json(list(ref))
                if info is not None and not isinstance(info, str):
                    info = to_json(info)
                kind = str(r.get("kind") or "")
                if not kind:
                    raise ValueError("kind is required")
                prepared.append([
                    run_id, int(scalar(r["step"])), str(r.get("evaluator") or ""), kind, int(scalar(r["sample_id"])),
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
            self._insert_replace(con, "patch_scores", PATCH_COLUMNS, prepared)

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
                grid_h, grid_w = int_or_none(r.get("grid_h")), int_or_none(r.get("grid_w"))
                if scores is not None and grid_h is not None and grid_w is not None \
                        and len(scores) != grid_h * grid_w:
                    raise ValueError(f"{len(scores)} scores for a {grid_h}x{grid_w} grid")
                image = r.get("image")
                if image is not None and not isinstance(image, (bytes, bytearray, memoryview)):
                    raise TypeError(f"image must be PNG bytes, got {type(image).__name__}")
                boxes = r.get("boxes")
                if boxes is not None and not isinstance(boxes, str):
                    boxes = to_json(boxes)
                blobs = {}
                for key in ("partner_image", "mixed_image"):
                    blob = r.get(key)
                    if blob is not None and not isinstance(blob, (bytes, bytearray, memoryview)):
                        raise TypeError(f"{key} must be PNG bytes, got {type(blob).__name__}")
                    blobs[key] = None if blob is None else bytes(blob)
                prepared.append([
                    run_id, int(scalar(r["step"])), str(r.get("evaluator") or ""), str(r.get("kind") or "heatmap"),
                    int(scalar(r["sample_id"])),
                    None if r.get("caption") is None else str(r["caption"]), grid_h, grid_w, scores,
                    None if image is None else bytes(image), boxes,
                    int_or_none(r.get("partner_id")), blobs["partner_image"], blobs["mixed_image"],
                    float_or_none(r.get("lam")),
                ])
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"log_patch_scores: bad row (sample {r.get('sample_id')!r}): {exc}") from exc
        return self._dedupe(prepared, key=lambda r: (r[1], r[2], r[3], r[4]))
