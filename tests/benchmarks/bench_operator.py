"""Memory of HubSpotWriteStatusesOperator over staged input: flat in the record count?

Run with ``./bin/bench operator`` (nothing is asserted). Writes staged JSONL files of growing size
(1% of lines invalid, so dead letters are written too), runs the operator over each against the
emulator (own process, rate limit lifted so the run is CPU-bound), and reports the peak of Python
allocations (tracemalloc) during ``execute`` and the throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import tracemalloc
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="hubspot-bench-"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_hook import Emulator  # noqa: E402


def stage(path: Path, n: int) -> None:
    states = ("SUBSCRIBED", "UNSUBSCRIBED", "NOT_SPECIFIED")
    with path.open("w") as handle:
        for i in range(n):
            email = "not-an-email" if i % 100 == 7 else f"contact{i}@example{i % 97}.com"
            record = {"subscriberIdString": email, "subscriptionId": 1001 + i % 3, "statusState": states[i % 3]}
            handle.write(json.dumps({"input": record, "occurredAt": "2026-03-10T12:00:00Z"}) + "\n")


def run(sizes: list[int], batch_size: int) -> list[dict]:
    from hubspot_provider.operators.hubspot import HubSpotWriteStatusesOperator

    emulator = Emulator(rate_limit_max=100_000, rate_limit_interval_ms=1000)
    results = []
    try:
        emulator.connection("hubspot_bench")
        for n in sizes:
            with tempfile.TemporaryDirectory() as folder:
                staged = Path(folder) / "statuses.jsonl"
                stage(staged, n)
                op = HubSpotWriteStatusesOperator(
                    task_id="bench", input_uri=staged.as_uri(), hubspot_conn_id="hubspot_bench",
                    batch_size=batch_size, max_failed_ratio=1.0,
                )
                tracemalloc.start()
                wall0 = time.perf_counter()
                summary = op.execute(context={})
                wall = time.perf_counter() - wall0
                _, peak = tracemalloc.get_traced_memory()
                tracemalloc.stop()
                results.append({
                    "records": n, "succeeded": summary["succeeded"], "failed": summary["failed"],
                    "dead_letter_files": summary["dead_letter_files"], "peak_python_mib": round(peak / 2**20, 2),
                    "wall_s": round(wall, 2), "records_per_s": round(n / wall),
                })
    finally:
        emulator.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated record counts")
    parser.add_argument("--batch-size", type=int, default=100)
    args = parser.parse_args()
    print(json.dumps({
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "operator_staged_input": run([int(s) for s in args.sizes.split(",")], args.batch_size),
    }, indent=2))


if __name__ == "__main__":
    main()
