"""The README's outage backfill, run by a real Airflow: API server, scheduler (LocalExecutor) and DAG processor.

``dag.test()`` runs one DAG run in-process; this test checks what only the real services do: backfill
runs created by ``airflow backfill create``, scheduled concurrently, each syncing the day of its
logical date; failed runs re-run with ``--reprocess-behavior failed``; the ``hubspot_api`` pool made by
the scheduler's start. It costs about two minutes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy.exc import DBAPIError
from consent_days import changes_over_days, latest_of_all_days, write_consent_table
from services import fresh_postgres_database, stop_process_groups

from hubspot_provider import consent

REPO = Path(__file__).resolve().parents[1]
DAYS = [datetime(2026, 3, d, tzinfo=timezone.utc) for d in (8, 9, 10)]
WAIT_S = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Airflow:
    """One Airflow home with its services started as subprocesses; the CLI and the metadata DB."""

    def __init__(self, home: Path, env: dict[str, str], metadata_url: str) -> None:
        from sqlalchemy import create_engine, event
        from sqlalchemy.pool import NullPool

        self.home = home
        self.env = env
        self.engine = create_engine(metadata_url, poolclass=NullPool)  # no connection held between checks
        if self.engine.dialect.name == "sqlite":
            # As Airflow connects: deleting a run deletes its task instances.
            event.listen(self.engine, "connect", lambda dbapi, _record: dbapi.execute("PRAGMA foreign_keys=ON"))
        self.services: list[subprocess.Popen] = []

    def cli(self, *args: str) -> str:
        failures: list[str] = []
        for _attempt in range(5):
            done = subprocess.run([sys.executable, "-m", "airflow", *args], env=self.env, capture_output=True,
                                  text=True, timeout=300)
            # SQLite has one writer at a time: with four processes writing, a command can find the
            # database locked. Its transaction was rolled back, so it is run again.
            if done.returncode == 0 or "database is locked" not in done.stderr:
                break
            failures.append(done.stderr[-1500:])
            if args[:2] == ("backfill", "create"):
                self.remove_unfinished_backfills()
            time.sleep(2)
        earlier = "".join(f"\n--- an earlier attempt, database locked:\n{text}" for text in failures)
        assert done.returncode == 0, f"airflow {' '.join(args)}:\n{done.stderr[-3000:]}{earlier}"
        return done.stdout

    def remove_unfinished_backfills(self) -> None:
        """Remove the backfill a ``backfill create`` left when the database was locked under it.

        Airflow commits the backfill before it creates its runs, so that no second one starts beside it;
        a lock error while creating the runs leaves it open (Airflow's own clean-up is best-effort and
        meets the same lock), and every later ``backfill create`` for the DAG is then refused. The
        tests create a backfill only once the one before has completed, so an open one is that leftover:
        it goes the way Airflow's clean-up would take it, with its runs, and the command runs again.
        """
        from sqlalchemy import text

        def remove() -> bool:
            with self.engine.begin() as conn:
                ids = [row[0] for row in conn.execute(text(
                    "SELECT id FROM backfill WHERE dag_id = :dag AND completed_at IS NULL"),
                    {"dag": "hubspot_consent_sync"})]
                for table, column in (("backfill_dag_run", "backfill_id"), ("dag_run", "backfill_id"),
                                      ("backfill", "id")):
                    for backfill_id in ids:
                        conn.execute(text(f"DELETE FROM {table} WHERE {column} = :id"), {"id": backfill_id})
            return True

        self.wait_for("the unfinished backfill's removal", remove)

    def start(self, name: str, *args: str) -> None:
        log = (self.home / f"{name}.log").open("w")
        # A session of its own, so that stopping it also stops the workers it forked.
        self.services.append(subprocess.Popen(
            [sys.executable, "-m", "airflow", name, *args], env=self.env, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        ))

    def stop(self) -> None:
        stop_process_groups(self.services)

    def query(self, sql: str, **parameters: object) -> list[tuple]:
        from sqlalchemy import text

        with self.engine.connect() as conn:
            return [tuple(row) for row in conn.execute(text(sql), parameters)]

    def wait_for(self, what: str, check, timeout_s: float = WAIT_S):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for process in self.services:
                assert process.poll() is None, f"an Airflow service exited; see the logs in {self.home}"
            try:
                value = check()
            except DBAPIError:  # the DB is busy, or a table is not there yet
                value = None
            if value:
                return value
            time.sleep(2)
        raise AssertionError(f"timed out waiting for {what}; see the logs in {self.home}")

    def backfill_runs(self) -> dict[str, str]:
        rows = self.query("SELECT logical_date, state FROM dag_run WHERE dag_id = :dag AND run_type = 'backfill'",
                          dag="hubspot_consent_sync")
        return {str(logical_date)[:10]: state for logical_date, state in rows}

    def finished_backfill(self, count: int):
        """The backfill's runs by day once all ``count`` have ended and the scheduler closed the backfill.

        Airflow allows one open backfill per DAG, so the next ``backfill create`` must wait for both.
        """
        runs = self.backfill_runs()
        done = len(runs) == count and all(state in ("success", "failed") for state in runs.values())
        open_backfills = self.query(
            "SELECT count(*) FROM backfill WHERE dag_id = :dag AND completed_at IS NULL", dag="hubspot_consent_sync"
        )
        return runs if done and open_backfills == [(0,)] else None


@pytest.fixture
def metadata_db(request, tmp_path):
    """The metadata DB's URL: embedded SQLite, or a fresh database on the PostgreSQL server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'airflow' / 'airflow.db'}?timeout=60"
        return
    with fresh_postgres_database("airflow") as url:
        yield url


@pytest.fixture
def airflow(tmp_path, hubspot_emulator_factory, metadata_db):
    home = tmp_path / "airflow"
    home.mkdir()
    source = tmp_path / "consent.db"
    api_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "4",
        # SQLite takes one writer at a time; its URL says to wait for the lock rather than fail after 5 s.
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_db,
        # Only the backfill's runs: no scheduled run of today competing for the one SQLite writer.
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
        # A failed run should fail now, not after the DAG's 5-minute task retries.
        "AIRFLOW__HUBSPOT__TASK_RETRIES": "0",
        "AIRFLOW_CONN_HUBSPOT_CONSENT_SOURCE": json.dumps({"conn_type": "sqlite", "host": str(source)}),
    })
    emulator = hubspot_emulator_factory()
    env["AIRFLOW_CONN_HUBSPOT_DEFAULT"] = emulator.airflow_connection(max_retries=1)
    af = Airflow(home, env, metadata_db)
    af.emulator = emulator
    af.source = source
    af.storage = home / "hubspot_consent"
    af.cli("db", "migrate")
    try:
        af.start("api-server", "--host", "127.0.0.1", "--port", str(api_port))
        af.start("scheduler", "--skip-serve-logs")
        af.start("dag-processor")
        yield af
    finally:
        af.stop()
        af.engine.dispose()


@pytest.mark.timeout(900)
@pytest.mark.parametrize("metadata_db", ["sqlite", "postgres"], indirect=True)
def test_the_readme_backfill_after_an_outage_under_a_real_scheduler(airflow):
    rows = changes_over_days(DAYS)
    write_consent_table(airflow.source, rows)
    airflow.emulator.fault_rate_5xx = 1.0  # HubSpot is down
    airflow.wait_for("the DAG processor to store the DAG", lambda: airflow.query(
        "SELECT 1 FROM serialized_dag WHERE dag_id = 'hubspot_consent_sync'"
    ))
    airflow.cli("dags", "unpause", "hubspot_consent_sync")
    backfill = ["backfill", "create", "--dag-id", "hubspot_consent_sync",
                "--from-date", DAYS[0].date().isoformat(), "--to-date", DAYS[-1].date().isoformat()]

    # The outage: the runs of the three days fail, and nothing is marked done.
    airflow.cli(*backfill)
    runs = airflow.wait_for("the backfill runs to finish", lambda: airflow.finished_backfill(3))
    assert runs == {"2026-03-08": "failed", "2026-03-09": "failed", "2026-03-10": "failed"}
    assert airflow.emulator.statuses == {}
    assert list(airflow.storage.glob("backfill__*/summary.json")) == []

    # HubSpot is back: the README's command re-runs the failed days.
    airflow.emulator.fault_rate_5xx = 0.0
    airflow.cli(*backfill, "--reprocess-behavior", "failed")
    runs = airflow.wait_for(
        "the re-run backfill to finish",
        lambda: (r := airflow.finished_backfill(3)) and "failed" not in r.values() and r,
    )
    assert runs == {"2026-03-08": "success", "2026-03-09": "success", "2026-03-10": "success"}

    # However the scheduler ordered the three runs, HubSpot ends with each contact's latest event.
    assert {key: value["status"] for key, value in airflow.emulator.statuses.items()} == latest_of_all_days(rows)

    # Each backfill run for logical date D synced exactly day D, and left later changes to later days.
    summaries = sorted(
        (json.loads(path.read_text()) for path in airflow.storage.glob("backfill__*/summary.json")),
        key=lambda s: s["data_interval_start"],
    )
    assert [(s["data_interval_start"], s["data_interval_end"]) for s in summaries] == [
        (day.isoformat(), (day + timedelta(days=1)).isoformat()) for day in DAYS
    ]
    assert [(s["events_in_interval"], s["superseded_later"], s["succeeded"], s["failed"]) for s in summaries] == [
        (30, 20, 10, 0), (20, 10, 10, 0), (10, 0, 10, 0),
    ]

    # The writes went through the pool that the scheduler created on its start.
    assert airflow.query("SELECT slots FROM slot_pool WHERE pool = :pool", pool=consent.HUBSPOT_POOL) == [
        (consent.HUBSPOT_POOL_SLOTS,)
    ]
    pools = airflow.query("SELECT DISTINCT pool FROM task_instance WHERE task_id = 'submit'")
    assert pools == [(consent.HUBSPOT_POOL,)]
