"""A backfill on PostgreSQL: the later-events check probed, grouped and streamed. ``./bin/bench backfill``.

Seeds ``--days`` days × ``--per-day`` events over ``--contacts`` contacts in a PostgreSQL table
(TIMESTAMPTZ, with the README's two indexes; made by the server with ``generate_series``; event i
is contact (i × 7919) mod contacts, so each contact comes back every contacts/per-day days), then
extracts the oldest day (a backfill: every later day is after it), the middle day and the newest
day, each with the check done three ways:

- ``probe`` (the default on PostgreSQL and MariaDB): the latest later event per key of the
  interval's contacts only, found through the index on the coarse email key;
- ``grouped``: the latest later event per key of every contact since the interval (what other
  SQL engines get);
- ``streamed``: every later event sent to Python (what SQLite gets).

Reports the rows the check read, the check's own time and the extract's wall time. Needs PostgreSQL
at 127.0.0.1:5432 (trust auth, user postgres, database test). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="hubspot-bench-"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING")
os.environ["AIRFLOW_CONN_PG_BENCH"] = json.dumps(
    {"conn_type": "postgres", "host": "127.0.0.1", "port": 5432, "login": "postgres", "schema": "test"})

FIRST_DAY = datetime(2026, 3, 1, tzinfo=timezone.utc)


def main() -> None:
    import psycopg2

    from hubspot_provider import consent

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--per-day", type=int, default=200_000)
    parser.add_argument("--contacts", type=int, default=2_000_000)
    parser.add_argument("--extract", default="oldest,middle,newest",
                        help="the days to extract, comma-separated: oldest, middle, newest")
    args = parser.parse_args()
    table = f"bench_consent_{uuid.uuid4().hex[:8]}"
    conn = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="test")
    conn.autocommit = True
    total = args.days * args.per_day
    with conn.cursor() as cursor:
        cursor.execute(
            f"CREATE UNLOGGED TABLE {table} (email TEXT, subscription_id BIGINT, status TEXT, legal_basis TEXT, "
            "legal_basis_explanation TEXT, occurred_at TIMESTAMPTZ)")
        cursor.execute(
            f"INSERT INTO {table} SELECT 'c' || ((i::bigint * 7919) %% %s) || '@example.com', 1001 + (i %% 3), "
            "(ARRAY['SUBSCRIBED','UNSUBSCRIBED','NOT_SPECIFIED'])[1 + i %% 3], NULL, NULL, "
            "%s::timestamptz + (i / %s) * INTERVAL '1 day' + (i %% 86400) * INTERVAL '1 second' "
            "FROM generate_series(0, %s - 1) AS i",
            (args.contacts, FIRST_DAY, args.per_day, total))
        began = time.perf_counter()
        cursor.execute(f"CREATE INDEX ON {table} (occurred_at)")
        cursor.execute(f"CREATE INDEX ON {table} (({consent.COARSE_EMAIL_KEY_SQL['postgres']}), occurred_at)")
        indexes_s = time.perf_counter() - began
        cursor.execute(f"VACUUM ANALYZE {table}")
    later_query, probes, check = consent._later_query, consent._probes_contacts, consent._LatestPerKey.mark_changed_since
    modes = {
        "probe": (later_query, probes),
        "grouped": (later_query, lambda conn_type: False),
        "streamed": (lambda table_, conn_type, placeholder, since, contacts=None: later_query(
            table_, "sqlite", placeholder, since)[:1] + ([since - timedelta(days=1)],), lambda conn_type: False),
    }
    check_s: list[float] = []

    def timed_check(self, *args_, **kwargs):
        began_ = time.perf_counter()
        try:
            return check(self, *args_, **kwargs)
        finally:
            check_s.append(time.perf_counter() - began_)

    results = []
    consent._LatestPerKey.mark_changed_since = timed_check
    try:
        chosen = set(args.extract.split(","))
        for label, day in (("oldest (backfill)", 0), ("middle", args.days // 2), ("newest", args.days - 1)):
            if label.split()[0] not in chosen:
                continue
            start = FIRST_DAY + timedelta(days=day)
            for mode, (query, probing) in modes.items():
                consent._later_query, consent._probes_contacts = query, probing
                with tempfile.TemporaryDirectory() as folder:
                    began = time.perf_counter()
                    counts = consent.extract_consent_events(
                        source_conn_id="pg_bench", source_table=table, data_interval_start=start,
                        data_interval_end=start + timedelta(days=1), run_uri=Path(folder).as_uri())
                    wall = time.perf_counter() - began
                results.append({"day": label, "mode": mode, "interval_rows": counts["in_interval"],
                                "later_days": args.days - 1 - day, "later_rows_read": counts["later_rows_read"],
                                "superseded_later": counts["superseded_later"], "staged": counts["staged"],
                                "check_s": round(check_s[-1], 2), "wall_s": round(wall, 2)})
                print(json.dumps(results[-1]), flush=True)
    finally:
        consent._later_query, consent._probes_contacts = later_query, probes
        consent._LatestPerKey.mark_changed_since = check
        with conn.cursor() as cursor:
            cursor.execute(f"DROP TABLE {table}")
        conn.close()
    print(json.dumps({
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "source": f"PostgreSQL, {args.days} days x {args.per_day:,} events over {args.contacts:,} contacts",
        "indexes_s": round(indexes_s, 1),
        "runs": results,
    }, indent=2))


if __name__ == "__main__":
    main()
