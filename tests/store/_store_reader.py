"""Subprocess for tests/store/test_store.py: reads the store N times while another process writes.

usage: python _store_reader.py ROOT RUN_ID READS SLEEP_S OUT_JSON
"""

import json
import sys
import time

from vlpgraph.store import Store


def main() -> None:
    root, run_id, reads, sleep_s, out = sys.argv[1:6]
    store = Store(root)
    counts, statuses, latencies = [], [], []
    for _ in range(int(reads)):
        t0 = time.perf_counter()
        runs = store.runs()
        n = len(store.metrics(run_id))
        latencies.append(time.perf_counter() - t0)
        counts.append(n)
        statuses.append(runs[0]["status"] if runs else None)
        time.sleep(float(sleep_s))
    with open(out, "w") as f:
        json.dump({"counts": counts, "statuses": statuses, "lock_retries": store.stats["lock_retries"], "lock_waits": store.stats["lock_waits"],
                   "lock_wait_s": store.stats["lock_wait_s"],
                   "read_max_ms": 1e3 * max(latencies)}, f)


if __name__ == "__main__":
    main()
