"""A day written by many workers: a backfill through real Airflow services under CeleryExecutor.

Started as subprocesses on loopback, with an Airflow home of their own: ``airflow db migrate`` on a
fresh PostgreSQL database (created and dropped here), then the API server, the scheduler, the DAG
processor, the triggerer and two ``airflow celery worker`` processes (Redis broker, results on
PostgreSQL). The HubSpot emulator runs in the test process. ``airflow backfill create`` then runs
several days of consent events with a shard size small enough that every day is split into shards,
written by mapped ``submit`` tasks on both workers through the ``hubspot_api`` pool.

What it checks is what only a distributed run shows: every key ends at its latest event, every input
of every day is accounted for once across its shards, at most 1% of requests are answered 429 while
writers on two workers share the app's rate limit, and both workers wrote shards. It takes about
3½ minutes on 2 cores. Every process it starts is stopped afterwards, whatever happens: their process
groups are signalled, and any process still carrying this run's marker in its environment is killed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from consent_days import changes_over_days, latest_of_all_days, write_consent_table
from distributed_worker import WORKER_ENV
from test_backfill import Airflow, free_port
from services import fresh_postgres_database, unavailable

from hubspot_provider import consent

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
DAYS = [datetime(2026, 3, d, tzinfo=timezone.utc) for d in (8, 9, 10)]
CONTACTS = 6000  # a third of them last change on each day: 2,000 statuses a day
SHARD_SIZE = 1100  # two shards a day
# Small batches, so each shard is about 1,000 requests, as a real shard of 100,000 statuses is: a new
# writer learns the window only from its first answers, and a shard of a few dozen requests would make
# those first answers weigh far more than they do in a real sync.
BATCH_SIZE = 2
WORKERS = ("worker-a", "worker-b")
REDIS = {"host": os.environ.get("HUBSPOT_TEST_REDIS_HOST", "127.0.0.1"), "port": 6379,
         "db": int(os.environ.get("HUBSPOT_TEST_REDIS_DB", "11"))}
MARKER = "HUBSPOT_TEST_DISTRIBUTED_RUN"
# The rolling limit both workers' writers share, compressed: 96 requests per 2 s. One writer alone
# fills it; two writing at once must share it. Writers that paced only themselves had 3.8% of this
# run's requests answered 429.
RATE_LIMIT_MAX, RATE_LIMIT_INTERVAL_MS = 96, 2000


class CeleryAirflow(Airflow):
    """:class:`test_backfill.Airflow` with Celery workers, each told apart in the metadata DB by name."""

    def start_worker(self, name: str, queue: str) -> None:
        env = {
            **self.env,
            WORKER_ENV: name,
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "distributed_worker.worker_name",
            "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS), self.env.get("PYTHONPATH", "")) if p),
        }
        log = (self.home / f"{name}.log").open("w")
        # One task at a time per worker: with late acknowledgement, a busy worker takes no more work,
        # so the second of two queued shards goes to the other worker. Each worker has its own log
        # server port (none: logs are read from disk here).
        self.services.append(subprocess.Popen(
            [sys.executable, "-m", "airflow", "celery", "worker", "--queues", queue, "--concurrency", "1",
             "--celery-hostname", f"{name}-{queue}@%h", "--skip-serve-logs"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        ))


def kill_leftovers(marker: str) -> list[int]:
    """SIGKILL every process whose environment carries ``marker`` (``NAME=value``): only this test's.

    A task process that left its worker's process group (or a worker that ignored SIGTERM) would
    otherwise outlive a failed run.
    """
    token = marker.encode()
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if token in environ:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
            except ProcessLookupError:
                pass
    return killed


@pytest.fixture
def redis_broker():
    """``redis://…/<db>`` and a queue name of this run's own, so runs sharing the server never meet."""
    import redis

    client = redis.Redis(socket_connect_timeout=3, **REDIS)
    try:
        client.ping()
    except redis.RedisError as exc:
        unavailable(f"Redis at {REDIS['host']}:{REDIS['port']}", exc)
    queue = f"hubspot-test-{uuid.uuid4().hex[:10]}"
    try:
        yield f"redis://{REDIS['host']}:{REDIS['port']}/{REDIS['db']}", queue
    finally:
        for key in client.scan_iter(match=f"*{queue}*"):
            client.delete(key)
        client.close()


@pytest.fixture
def postgres_db():
    """A fresh PostgreSQL database for Airflow's metadata and Celery's results, dropped afterwards."""
    with fresh_postgres_database("airflow_celery") as url:
        yield url


@pytest.fixture
def celery_airflow(tmp_path, hubspot_emulator_factory, postgres_db, redis_broker):
    broker_url, queue = redis_broker
    home = tmp_path / "airflow"
    home.mkdir()
    source = tmp_path / "consent.db"
    api_port = free_port()
    marker = f"{MARKER}={uuid.uuid4().hex}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update({
        marker.split("=", 1)[0]: marker.split("=", 1)[1],
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": postgres_db,
        "AIRFLOW__CELERY__BROKER_URL": broker_url,
        "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{postgres_db}",
        "AIRFLOW__OPERATORS__DEFAULT_QUEUE": queue,
        # Only the backfill's runs: no scheduled run of today.
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
        "AIRFLOW__HUBSPOT__TASK_RETRIES": "0",
        "AIRFLOW_CONN_HUBSPOT_CONSENT_SOURCE": json.dumps({"conn_type": "sqlite", "host": str(source)}),
    })
    emulator = hubspot_emulator_factory(rate_limit_max=RATE_LIMIT_MAX, rate_limit_interval_ms=RATE_LIMIT_INTERVAL_MS,
                                        latency_s=(0.01, 0.05), seed=3)
    env["AIRFLOW_CONN_HUBSPOT_DEFAULT"] = emulator.airflow_connection()
    af = CeleryAirflow(home, env, postgres_db)
    af.emulator = emulator
    af.source = source
    af.storage = home / "hubspot_consent"
    try:
        af.cli("db", "migrate")
        af.start("api-server", "--host", "127.0.0.1", "--port", str(api_port))
        af.start("scheduler", "--skip-serve-logs")
        af.start("dag-processor")
        af.start("triggerer", "--skip-serve-logs")
        for name in WORKERS:
            af.start_worker(name, queue)
        yield af
    finally:
        try:
            af.stop()
        finally:
            kill_leftovers(marker)
            af.engine.dispose()


@pytest.mark.timeout(1500)
def test_a_backfill_written_by_two_celery_workers(celery_airflow):
    airflow = celery_airflow
    good = changes_over_days(DAYS, contacts=CONTACTS)
    latest = latest_of_all_days(good)
    # On each day one input HubSpot rejects and one that never validates; and one contact whose latest
    # opt-in was overtaken by an opt-out made in HubSpot afterwards (withheld, not written).
    bad = []
    for day in DAYS:
        at = (day + timedelta(hours=6)).strftime("%Y-%m-%d %H:%M:%S")
        bad += [(f"unknown{day.day}@example.com", 4242, "SUBSCRIBED", None, None, at),
                (f"not-an-email-{day.day}", 1001, "SUBSCRIBED", None, None, at)]
    footer = next(key for key, state in sorted(latest.items()) if state == "SUBSCRIBED")
    airflow.emulator.footer_unsubscribe(footer[0], footer[1], at=DAYS[-1] + timedelta(days=1))
    write_consent_table(airflow.source, good + bad)

    airflow.wait_for("the DAG processor to store the DAG", lambda: airflow.query(
        "SELECT 1 FROM serialized_dag WHERE dag_id = 'hubspot_consent_sync'"
    ))
    airflow.wait_for("both Celery workers to start", lambda: all(
        "ready." in (airflow.home / f"{name}.log").read_text(errors="replace") for name in WORKERS))
    airflow.cli("dags", "unpause", "hubspot_consent_sync")
    airflow.cli("backfill", "create", "--dag-id", "hubspot_consent_sync",
                "--from-date", DAYS[0].date().isoformat(), "--to-date", DAYS[-1].date().isoformat(),
                "--dag-run-conf", json.dumps({"shard_size": SHARD_SIZE, "batch_size": BATCH_SIZE}))

    runs = airflow.wait_for("the backfill to finish", lambda: airflow.finished_backfill(len(DAYS)), timeout_s=1200)
    assert runs == {day.date().isoformat(): "success" for day in DAYS}, runs

    # Every key at its latest event (the withheld one stays as the contact set it in HubSpot).
    expected = {**latest, footer: "UNSUBSCRIBED"}
    assert {key: value["status"] for key, value in airflow.emulator.statuses.items()} == expected

    # Every day was split into shards, each written by its own submit task, through the pool.
    shards_per_run = dict(airflow.query(
        "SELECT run_id, count(*) FROM task_instance WHERE task_id = 'submit' AND state = 'success' GROUP BY run_id"))
    assert len(shards_per_run) == len(DAYS) and min(shards_per_run.values()) > 1, shards_per_run
    assert airflow.query("SELECT DISTINCT pool FROM task_instance WHERE task_id = 'submit'") == [
        (consent.HUBSPOT_POOL,)]

    # Every input of every day accounted for once, across its shards.
    summaries = sorted(
        ((path.parent.name, json.loads(path.read_text())) for path in airflow.storage.glob("backfill__*/summary.json")),
        key=lambda item: item[1]["data_interval_start"])
    assert [s["data_interval_start"] for _folder, s in summaries] == [day.isoformat() for day in DAYS]
    shards_per_folder = {consent.safe_run_id(run_id): count for run_id, count in shards_per_run.items()}
    for folder, summary in summaries:
        assert summary["shards"] == shards_per_folder[folder]
        assert summary["inputs"] == summary["succeeded"] + summary["failed"] + summary["withheld"]
        assert summary["events_in_interval"] == summary["inputs"] + summary["superseded"] + summary["superseded_later"]
        assert summary["failed_by_category"] == {"INVALID_INPUT": 1, "OBJECT_NOT_FOUND": 1}
    summaries = [summary for _folder, summary in summaries]
    # Each key was written once, by the day of its latest event; later days' events superseded the rest.
    assert sum(s["succeeded"] for s in summaries) + sum(s["withheld"] for s in summaries) == len(latest)
    assert sum(s["withheld"] for s in summaries) == 1

    # The two workers shared the app's rate limit and kept within it.
    requests = airflow.emulator.requests
    answered_429 = sum(1 for r in requests if r.kind == "rate_limited")
    total = len(requests)
    assert total > len(latest) // BATCH_SIZE  # every write (and the reads before them) reached the emulator
    assert answered_429 <= 0.01 * total, f"{answered_429} of {total} requests answered 429"

    # Both workers ran tasks, and both wrote shards.
    by_worker = dict(airflow.query(
        "SELECT hostname, count(*) FROM task_instance WHERE task_id = 'submit' GROUP BY hostname"))
    assert set(by_worker) == set(WORKERS), by_worker
    assert {row[0] for row in airflow.query(
        "SELECT DISTINCT hostname FROM task_instance WHERE state = 'success'")} == set(WORKERS)

    # Nothing an Airflow component logged, task logs included, holds an email address.
    logs = [p for p in airflow.home.rglob("*.log") if p.is_file()]
    assert any("submit" in str(p) for p in logs)
    emails = re.compile(r"[A-Za-z0-9._%+-]+@example\.com")
    assert [str(p) for p in logs if emails.search(p.read_text(errors="replace"))] == []
