"""Benchmarks of HubSpotHook. Run with ``./bin/bench`` (not part of the test suite; nothing is asserted).

(a) throughput against the emulator's rate ceiling (``batch_size x max / interval``) over many
    windows, with the number of 429s;
(b) client CPU per record for validate + serialise + parse;
(c) the same records through a plain ``HttpHook`` loop of the same batch size (what one would write
    in an afternoon: ``run_with_advanced_retry`` retrying on errors), side by side.

The emulator runs in its own process, so it does not share the client's interpreter lock.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="hubspot-bench-"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING")

TOKEN = "pat-bench-token"


def records(n: int, offset: int = 0) -> list[dict]:
    states = ("SUBSCRIBED", "UNSUBSCRIBED", "NOT_SPECIFIED")
    return [
        {
            "channel": "EMAIL",
            "subscriberIdString": f"contact{i}@example{i % 97}.com",
            "subscriptionId": 1001 + i % 3,
            "statusState": states[i % 3],
            "legalBasis": "CONSENT_WITH_NOTICE",
            "legalBasisExplanation": "Opted in on the preference centre",
        }
        for i in range(offset, offset + n)
    ]


class Emulator:
    """The emulator CLI in a subprocess."""

    def __init__(self, **options: object) -> None:
        args = [sys.executable, "-m", "hubspot_provider.testing.emulator", "--token", TOKEN]
        for name, value in options.items():
            args += [f"--{name.replace('_', '-')}", str(value)]
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if not match:
            self.process.kill()
            raise RuntimeError(f"emulator did not start: {line!r}")
        self.port = int(match.group(1))

    def connection(self, conn_id: str) -> None:
        os.environ[f"AIRFLOW_CONN_{conn_id.upper()}"] = json.dumps(
            {"conn_type": "hubspot" if conn_id.startswith("hubspot") else "http", "host": "127.0.0.1",
             "schema": "http", "port": self.port, "password": TOKEN}
        )

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def bench_throughput(windows: int, rate_max: int, interval_ms: int, batch_size: int, latency_s: float = 0.0) -> dict:
    from hubspot_provider.hooks.hubspot import HubSpotHook

    ceiling = batch_size * rate_max / (interval_ms / 1000)
    n = int(ceiling * windows * interval_ms / 1000)
    emulator = Emulator(rate_limit_max=rate_max, rate_limit_interval_ms=interval_ms, latency_s=latency_s)
    try:
        emulator.connection("hubspot_bench")
        hook = HubSpotHook("hubspot_bench")
        data = records(n)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        report = hook.write_statuses(data, batch_size=batch_size)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    finally:
        emulator.close()
    rate = report.succeeded / wall
    return {
        "records": n, "succeeded": report.succeeded, "failed": report.failed_count, "wall_s": round(wall, 2),
        "records_per_s": round(rate), "ceiling_per_s": round(ceiling), "of_ceiling_pct": round(100 * rate / ceiling, 1),
        "requests": report.requests, "answered_429": report.rate_limited,
        "pct_429": round(100 * report.rate_limited / max(1, report.requests), 2), "client_cpu_s": round(cpu, 2),
    }


def bench_plain_http_hook(windows: int, rate_max: int, interval_ms: int, batch_size: int) -> dict:
    import tenacity
    from airflow.providers.http.hooks.http import HttpHook
    from airflow.sdk.exceptions import AirflowException

    ceiling = batch_size * rate_max / (interval_ms / 1000)
    n = int(ceiling * windows * interval_ms / 1000)
    emulator = Emulator(rate_limit_max=rate_max, rate_limit_interval_ms=interval_ms)
    failures = {"errors": 0}

    def count(_state: tenacity.RetryCallState) -> None:
        failures["errors"] += 1

    try:
        emulator.connection("plain_http")
        hook = HttpHook(method="POST", http_conn_id="plain_http")
        data = records(n)
        retry_args = {
            "retry": tenacity.retry_if_exception_type((AirflowException, OSError)),
            "wait": tenacity.wait_exponential(multiplier=0.5, max=10),
            "stop": tenacity.stop_after_attempt(10),
            "before_sleep": count,
        }
        sent = 0
        wall0 = time.perf_counter()
        for start in range(0, n, batch_size):
            batch = data[start : start + batch_size]
            hook.run_with_advanced_retry(
                retry_args,
                endpoint="/communication-preferences/v4/statuses/batch/write",
                json={"inputs": batch},
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
            sent += len(batch)
        wall = time.perf_counter() - wall0
    finally:
        emulator.close()
    rate = sent / wall
    requests_made = n // batch_size + failures["errors"]
    return {
        "records": n, "wall_s": round(wall, 2), "records_per_s": round(rate), "ceiling_per_s": round(ceiling),
        "of_ceiling_pct": round(100 * rate / ceiling, 1), "requests": requests_made,
        "answered_429_or_error": failures["errors"],
        "pct_429": round(100 * failures["errors"] / max(1, requests_made), 2),
        "note": "no per-input outcomes, no validation, no dedupe",
    }


def bench_cpu(n: int, batch_size: int) -> dict:
    from hubspot_provider.models import BatchResponsePublicStatus, PublicStatusRequest

    data = records(n)
    response_bodies = []
    for start in range(0, n, batch_size):
        results = [
            {**r, "status": r["statusState"], "source": "Public status API", "timestamp": "2026-03-10T12:00:00.123Z",
             "businessUnitId": 0, "setStatusSuccessReason": "REQUESTED_CHANGE_OCCURRED", "subscriptionName": "News"}
            for r in data[start : start + batch_size]
        ]
        for r in results:
            del r["statusState"]
        response_bodies.append(json.dumps({
            "status": "COMPLETE", "results": results, "startedAt": "2026-03-10T12:00:00Z",
            "completedAt": "2026-03-10T12:00:00.2Z", "requestedAt": "2026-03-10T12:00:00Z",
        }).encode())

    t0 = time.process_time()
    wires = [PublicStatusRequest.model_validate(r).to_wire() for r in data]
    t1 = time.process_time()
    bodies = [json.dumps({"inputs": wires[s : s + batch_size]}, separators=(",", ":")) for s in range(0, n, batch_size)]
    t2 = time.process_time()
    parsed = sum(len(BatchResponsePublicStatus.model_validate_json(b).results) for b in response_bodies)
    t3 = time.process_time()
    assert parsed == n and len(bodies) == len(response_bodies)
    per = lambda seconds: round(seconds / n * 1e6, 2)  # noqa: E731
    return {
        "records": n, "validate_us": per(t1 - t0), "serialise_us": per(t2 - t1), "parse_us": per(t3 - t2),
        "total_us_per_record": per(t3 - t0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--rate-max", type=int, default=50, help="emulator requests per window")
    parser.add_argument("--interval-ms", type=int, default=1000, help="emulator window (compressed from 10 s)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--latency-s", type=float, default=0.0,
                        help="emulator latency per request (HubSpot's real window: --interval-ms 10000 --rate-max 100)")
    parser.add_argument("--cpu-records", type=int, default=100_000)
    parser.add_argument("--only", choices=["throughput", "cpu", "plain"], default=None)
    args = parser.parse_args()

    results: dict[str, object] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}",
    }
    shape = (args.windows, args.rate_max, args.interval_ms, args.batch_size)
    if args.only in (None, "cpu"):
        results["cpu_per_record"] = bench_cpu(args.cpu_records, args.batch_size)
    if args.only in (None, "throughput"):
        results["hubspot_hook"] = bench_throughput(*shape, latency_s=args.latency_s)
    if args.only in (None, "plain"):
        results["plain_http_hook"] = bench_plain_http_hook(*shape)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
