"""Subprocess for tests/store/test_store.py: writes one running trial in many small transactions.

usage: python _store_writer.py ROOT RUN_ID BATCHES ROWS_PER_BATCH SLEEP_S OUT_JSON
"""

import json
import statistics
import sys
import time

from vlpgraph.store import Store


def main() -> None:
    root, run_id, batches, per_batch, sleep_s, out = sys.argv[1:7]
    batches, per_batch, sleep_s = int(batches), int(per_batch), float(sleep_s)
    store = Store(root)
    store.start_run(run_id, graph="concurrency", variant="baseline", seed=0,
                    params={"shapes": {"train_fraction": 0.5}}, flat_params={"shapes.train_fraction": 0.5},
                    device="cpu")
    written, latencies = [], []
    t_start = time.perf_counter()
    for b in range(batches):
        rows = [dict(step=b, epoch=0, name=f"m{k}", value=b + k / 10, wall_s=time.perf_counter() - t_start)
                for k in range(per_batch)]
        t0 = time.perf_counter()
        store.log_metrics(run_id, rows, through_step=b)
        latencies.append(time.perf_counter() - t0)
        written += [[r["step"], r["name"]] for r in rows]
        time.sleep(sleep_s)
    store.finish_run(run_id, "completed", wall_s=time.perf_counter() - t_start,
                     train_samples=len(written), step=batches - 1)
    latencies.sort()
    with open(out, "w") as f:
        json.dump({
            "written": written,
            "write_median_ms": 1e3 * statistics.median(latencies),
            "write_p90_ms": 1e3 * latencies[int(0.9 * len(latencies))],
            "write_max_ms": 1e3 * latencies[-1],
            "lock_retries": store.stats["lock_retries"], "lock_waits": store.stats["lock_waits"],
            "lock_wait_s": store.stats["lock_wait_s"],
            "duration_s": time.perf_counter() - t_start,
        }, f)


if __name__ == "__main__":
    main()
