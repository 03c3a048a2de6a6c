"""Several writer processes sharing one app's rate limit. Run with ``./bin/bench writers``.

Starts the emulator (in this process, which otherwise only waits) and N writer processes (each its own ``HubSpotHook``, as tasks on
different workers would be). Once every process has imported Airflow and read its connection, they
start together (or ``--stagger-s`` apart, to watch newcomers join a full window) and each writes an
equal part of the records. Prints, for each N, the records per second of all writers together
against the ceiling (``rate_max`` requests per window × ``batch_size``), the requests answered 429,
and when each writer started and finished: with fair shares, writers that start together finish
together. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="hubspot-bench-"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "ERROR")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_hook import records  # noqa: E402

from hubspot_provider.testing.emulator import HubSpotEmulator  # noqa: E402


def writer(conn_env: str, offset: int, n: int, batch_size: int, delay_s: float, ready: multiprocessing.Queue,
           go: Go, out: multiprocessing.Queue) -> None:
    os.environ["AIRFLOW_CONN_HUBSPOT_BENCH"] = conn_env
    from hubspot_provider.hooks.hubspot import HubSpotHook

    hook = HubSpotHook("hubspot_bench")
    data = records(n, offset)
    hook.settings  # read the connection before the clock starts
    ready.put(os.getpid())
    go.wait()
    time.sleep(max(0.0, go.start_at.value + delay_s - time.time()))
    began = time.time()
    report = hook.write_statuses(data, batch_size=batch_size)
    out.put({"began": began, "ended": time.time(), "succeeded": report.succeeded, "failed": report.failed_count,
             "requests": report.requests, "answered_429": report.rate_limited})


class Go:
    """The start signal: set once every writer is ready, with the instant to start at."""

    def __init__(self, context) -> None:
        self.event = context.Event()
        self.start_at = context.Value("d", 0.0)

    def wait(self) -> None:
        self.event.wait()

    def set(self, start_at: float) -> None:
        self.start_at.value = start_at
        self.event.set()


def run(writers: int, windows: int, rate_max: int, interval_ms: int, batch_size: int, stagger_s: float = 0.0) -> dict:
    ceiling = batch_size * rate_max / (interval_ms / 1000)
    total = int(ceiling * windows * interval_ms / 1000)
    # In this process, which only waits for the writers: its request log says when each 429 came.
    emulator = HubSpotEmulator(rate_limit_max=rate_max, rate_limit_interval_ms=interval_ms).start()
    try:
        conn_env = emulator.airflow_connection()
        context = multiprocessing.get_context("spawn")
        out: multiprocessing.Queue = context.Queue()
        ready: multiprocessing.Queue = context.Queue()
        go = Go(context)
        share = total // writers
        processes = [
            context.Process(
                target=writer, args=(conn_env, i * share, share, batch_size, i * stagger_s, ready, go, out))
            for i in range(writers)
        ]
        for process in processes:
            process.start()
        for _ in processes:  # every process has imported Airflow and read its connection
            ready.get(timeout=600)
        go.set(time.time() + 0.5)
        results = [out.get(timeout=600) for _ in processes]
        for process in processes:
            process.join()
        log = emulator.requests
    finally:
        emulator.stop()
    first_at = min(r.at for r in log)
    answered_429_by_window: dict[int, int] = {}
    for r in log:
        if r.kind == "rate_limited":
            window = int((r.at - first_at) // (interval_ms / 1000))
            answered_429_by_window[window] = answered_429_by_window.get(window, 0) + 1
    first = min(r["began"] for r in results)
    wall = max(r["ended"] for r in results) - first
    succeeded = sum(r["succeeded"] for r in results)
    requests = sum(r["requests"] for r in results)
    answered_429 = sum(r["answered_429"] for r in results)
    return {
        "writers": writers, "records": succeeded, "failed": sum(r["failed"] for r in results),
        "wall_s": round(wall, 2), "records_per_s": round(succeeded / wall),
        "of_ceiling_pct": round(100 * succeeded / wall / ceiling, 1), "requests": requests,
        "answered_429": answered_429, "pct_429": round(100 * answered_429 / max(1, requests), 2),
        "answered_429_by_window": dict(sorted(answered_429_by_window.items())),
        "writers_began_s": sorted(round(r["began"] - first, 2) for r in results),
        "writers_ended_s": sorted(round(r["ended"] - first, 1) for r in results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--writers", default="1,2,4,8")
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--rate-max", type=int, default=50)
    parser.add_argument("--interval-ms", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--stagger-s", type=float, default=0.0,
                        help="start writer i this many seconds × i after the first (newcomers joining)")
    args = parser.parse_args()
    print(json.dumps({
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "runs": [run(int(n), args.windows, args.rate_max, args.interval_ms, args.batch_size, args.stagger_s)
                 for n in args.writers.split(",")],
    }, indent=2))


if __name__ == "__main__":
    main()
