"""Cost of the consent extract, and of its check for later events, over a month of source rows.

Run with ``./bin/bench extract`` (nothing is asserted). Seeds a SQLite ``consent_events`` table
with ``--days`` days of ``--events-per-day`` events over ``--contacts`` contacts, then extracts
the newest day (the later-events check reads about one more day) and the oldest day (a backfill:
the check reads every later day), each with and without the check. It reports wall time, rows read
and the peak of Python allocations (tracemalloc).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sqlite3
import tempfile
import time
import tracemalloc
from datetime import datetime, timedelta, timezone
from pathlib import Path

os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="hubspot-bench-"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING")

FIRST_DAY = datetime(2026, 3, 1, tzinfo=timezone.utc)


def seed(path: Path, days: int, per_day: int, contacts: int) -> int:
    rng = random.Random(7)
    states = ("SUBSCRIBED", "UNSUBSCRIBED", "NOT_SPECIFIED")
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE consent_events (email TEXT, subscription_id INTEGER, status TEXT, "
            "legal_basis TEXT, legal_basis_explanation TEXT, occurred_at TEXT)"
        )
        for day in range(days):
            start = FIRST_DAY + timedelta(days=day)
            db.executemany("INSERT INTO consent_events VALUES (?, ?, ?, ?, ?, ?)", (
                (f"contact{(c := rng.randrange(contacts))}@example{c % 97}.com", 1001 + rng.randrange(3),
                 rng.choice(states), None, None,
                 (start + timedelta(seconds=rng.randrange(86_400))).strftime("%Y-%m-%d %H:%M:%S"))
                for _ in range(per_day)
            ))
    db.close()
    return days * per_day


def extract(day: datetime, check: bool, storage: Path) -> dict:
    """Time one extract, then repeat it under tracemalloc (which slows allocation) for its peak."""
    from hubspot_provider import consent

    def once() -> dict:
        return consent.extract_consent_events(
            source_conn_id="hubspot_bench_source", source_table="consent_events", data_interval_start=day,
            data_interval_end=day + timedelta(days=1), run_uri=(storage / f"{day:%Y%m%d}-{check}").as_uri(),
            later_events_supersede=check,
        )

    wall0 = time.perf_counter()
    counts = once()
    wall = time.perf_counter() - wall0
    tracemalloc.start()
    once()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "day": day.date().isoformat(), "later_events_check": check, "rows_read": counts["rows_read"],
        "in_interval": counts["in_interval"], "staged": counts["staged"],
        "superseded_later": counts["superseded_later"], "wall_s": round(wall, 2),
        "peak_python_mib": round(peak / 2**20, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--events-per-day", type=int, default=20_000)
    parser.add_argument("--contacts", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hubspot-bench-extract-") as folder:
        source = Path(folder) / "consent.db"
        rows = seed(source, args.days, args.events_per_day, args.contacts)
        os.environ["AIRFLOW_CONN_HUBSPOT_BENCH_SOURCE"] = json.dumps({"conn_type": "sqlite", "host": str(source)})
        last = FIRST_DAY + timedelta(days=args.days - 1)
        runs = [extract(day, check, Path(folder)) for day in (last, FIRST_DAY) for check in (False, True)]
    print(json.dumps({
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "source_rows": rows,
        "extract": runs,
    }, indent=2))


if __name__ == "__main__":
    main()
