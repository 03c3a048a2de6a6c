"""Memory of HubSpotWriteStatusesOperator over staged input: flat in the record count?

Run with ``./bin/bench operator`` (nothing is asserted). Writes staged JSONL files of growing size
(1% of lines invalid, so dead letters are written too), runs the operator over each against the
emulator (own process, rate limit lifted so the run is CPU-bound), and reports the peak of Python
allocations (tracemalloc) during ``execute`` and the throughput; then the ledger's cost: the same
run with and without it, timed without tracemalloc.
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


def ledger_cost(n: int, batch_size: int, repeats: int, rate_limit_max: int = 100_000) -> dict:
    """Wall time of the same staged run with and without the ledger (no tracemalloc: it slows allocation).

    With the default limit the run is CPU-bound (the worst case for the ledger); with HubSpot-like
    pacing (``rate_limit_max`` requests per second) it is bound by the rate limit, as real syncs are.
    """
    from hubspot_provider.operators.hubspot import HubSpotWriteStatusesOperator

    emulator = Emulator(rate_limit_max=rate_limit_max, rate_limit_interval_ms=1000)
    walls: dict[str, list[float]] = {"on": [], "off": []}
    try:
        emulator.connection("hubspot_bench")
        with tempfile.TemporaryDirectory() as folder:
            staged = Path(folder) / "statuses.jsonl"
            stage(staged, n)
            for _ in range(repeats):
                for mode in ("off", "on"):  # alternated, so drift hits both alike
                    op = HubSpotWriteStatusesOperator(
                        task_id="bench", input_uri=staged.as_uri(), hubspot_conn_id="hubspot_bench",
                        batch_size=batch_size, max_failed_ratio=1.0, ledger=mode == "on",
                    )
                    wall0 = time.perf_counter()
                    summary = op.execute(context={})
                    walls[mode].append(time.perf_counter() - wall0)
                    assert (summary["ledger_records"] > 0) == (mode == "on")
    finally:
        emulator.close()
    on, off = sorted(walls["on"])[len(walls["on"]) // 2], sorted(walls["off"])[len(walls["off"]) // 2]
    return {"records": n, "repeats": repeats, "rate_limit_per_s": rate_limit_max,
            "median_wall_s_ledger_off": round(off, 2), "median_wall_s_ledger_on": round(on, 2),
            "ledger_cost_pct": round(100 * (on - off) / off, 1),
            "ledger_us_per_record": round(1e6 * (on - off) / n, 1)}


def guard_cost(n: int, batch_size: int, repeats: int, rate_limit_max: int = 50) -> dict:
    """The ``hubspot_changes`` guard's cost under HubSpot-like pacing: extra requests per 1,000
    statuses and throughput against the ceiling (``rate_limit_max`` requests/s × ``batch_size``), with
    the guard off (``source_wins``) and on (``respect_opt_outs``). Two thirds of the staged statuses
    could (re)subscribe (SUBSCRIBED, NOT_SPECIFIED), so they are read first."""
    from hubspot_provider.operators.hubspot import HubSpotWriteStatusesOperator

    ceiling = rate_limit_max * batch_size
    emulator = Emulator(rate_limit_max=rate_limit_max, rate_limit_interval_ms=1000)
    runs: dict[str, list[dict]] = {"source_wins": [], "respect_opt_outs": []}
    try:
        emulator.connection("hubspot_bench")
        with tempfile.TemporaryDirectory() as folder:
            staged = Path(folder) / "statuses.jsonl"
            stage(staged, n)
            for _ in range(repeats):
                for policy in runs:
                    op = HubSpotWriteStatusesOperator(
                        task_id="bench", input_uri=staged.as_uri(), hubspot_conn_id="hubspot_bench",
                        batch_size=batch_size, max_failed_ratio=1.0, ledger=False, hubspot_changes=policy,
                    )
                    wall0 = time.perf_counter()
                    summary = op.execute(context={})
                    wall = time.perf_counter() - wall0
                    runs[policy].append({"wall": wall, "requests": summary["requests"], "reads": summary["reads"],
                                         "submitted": summary["submitted"]})
    finally:
        emulator.close()
    out: dict = {"records": n, "repeats": repeats, "rate_limit_per_s": rate_limit_max, "ceiling_records_per_s": ceiling}
    for policy, done in runs.items():
        median = sorted(done, key=lambda r: r["wall"])[len(done) // 2]
        out[policy] = {
            "median_wall_s": round(median["wall"], 2),
            "records_per_s": round(median["submitted"] / median["wall"]),
            "pct_of_ceiling": round(100 * median["submitted"] / median["wall"] / ceiling, 1),
            "write_requests": median["requests"], "read_requests": median["reads"],
            "read_requests_per_1000_statuses": round(1000 * median["reads"] / median["submitted"], 1),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated record counts")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--ledger-records", type=int, default=50_000, help="records of the ledger-cost runs")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps({
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "operator_staged_input": run([int(s) for s in args.sizes.split(",")], args.batch_size),
        "ledger_cost_cpu_bound": ledger_cost(args.ledger_records, args.batch_size, args.repeats),
        "ledger_cost_rate_limited": ledger_cost(args.ledger_records // 2, args.batch_size, args.repeats,
                                                rate_limit_max=50),
        "hubspot_changes_guard": guard_cost(args.ledger_records // 2, args.batch_size, args.repeats),
    }, indent=2))


if __name__ == "__main__":
    main()
