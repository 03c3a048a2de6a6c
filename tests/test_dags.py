"""The example DAGs: integrity, and whole runs with ``dag.test()`` against the emulator over loopback.

Each ``dag.test()`` costs a few seconds of fixed Airflow start-up, so every run checks several things.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from consent_days import changes_over_days, latest_of_all_days, write_consent_table

from hubspot_provider import consent

REPO = Path(__file__).resolve().parents[1]
DAY = datetime(2026, 3, 10, tzinfo=timezone.utc)
# `airflow dags test hubspot_consent_sync 2026-03-11` covers the last whole day before it: DAY.
LOGICAL_DATE = DAY + timedelta(days=1)
TASKS = {
    "extract", "validate", "shard", "submit", "branch_on_outcome", "report", "summarise_dead_letters",
}
CLEAN = {**dict.fromkeys(TASKS - {"summarise_dead_letters"}, "success"), "summarise_dead_letters": "skipped"}
WITH_FAILURES = {**dict.fromkeys(TASKS - {"report"}, "success"), "report": "skipped"}


@pytest.fixture(scope="module")
def airflow_db():
    """Airflow's metadata DB in the test session's AIRFLOW_HOME (set by conftest), migrated once."""
    done = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags"))


@pytest.fixture(scope="module")
def sync_dag(dagbag):
    return dagbag.dags["hubspot_consent_sync"]


@pytest.fixture(scope="module")
def replay_dag(dagbag):
    return dagbag.dags["hubspot_dead_letter_replay"]


# --------------------------------------------------------------------------- integrity


def test_dags_import_without_errors(dagbag):
    assert dagbag.import_errors == {}
    assert {"hubspot_consent_sync", "hubspot_dead_letter_replay"} <= set(dagbag.dag_ids)


def test_consent_sync_shape(sync_dag):
    dag = sync_dag
    assert set(dag.task_ids) == TASKS
    dag.check_cycle()
    assert not dag.catchup and dag.max_active_runs <= 3
    assert dag.start_date < datetime.now(timezone.utc)
    downstream = {t.task_id: set(t.downstream_task_ids) for t in dag.tasks}
    assert "shard" in downstream["validate"] and downstream["shard"] == {"submit"}
    assert downstream["branch_on_outcome"] == {"report", "summarise_dead_letters"}
    assert dag.get_task("submit").pool == consent.HUBSPOT_POOL
    assert {t.task_id for t in dag.tasks if t.pool == consent.HUBSPOT_POOL} == {"submit"}
    assert dag.get_task("submit").on_failure_callback
    assert dag.get_task("submit").retries == 2  # resumes from its checkpoint after a long outage

    params = {name: dag.params[name] for name in dag.params}
    assert params == {
        "source_conn_id": "hubspot_consent_source",
        "source_table": "consent_events",
        "hubspot_conn_id": "hubspot_default",
        "storage_uri": None,
        "batch_size": 100,
        "shard_size": consent.DEFAULT_SHARD_SIZE,
        "max_failed_ratio": 0.25,
        "max_unplaceable_rows": 100,
        "audit_conn_id": None,
        "audit_table": "hubspot_consent_ledger",
        "hubspot_changes": "respect_opt_outs",
        "dry_run": False,
        "later_events_win": True,
    }
    dag.params.validate()


BAD_PARAMS = [
    ("source_table", "consent_events; DROP TABLE consent_events",
     "source_table must be a plain table name like consent_events or analytics.consent_events"),
    ("batch_size", 0, "batch_size must be a whole number from 1 to 1000 (HubSpot's batch maximum)"),
    ("batch_size", 1001, "batch_size must be a whole number from 1 to 1000"),
    ("max_failed_ratio", 1.5, "max_failed_ratio must be a share from 0 to 1"),
    ("shard_size", 0, "shard_size must be a whole number of at least 1"),
    ("max_unplaceable_rows", -1, "max_unplaceable_rows must be a whole number of at least 0"),
    ("audit_table", "ledger; --", "audit_table must be a plain table name"),
]
REPLAY_PARAMS = {"source_table", "batch_size", "max_failed_ratio"}


@pytest.mark.parametrize(("dag_id", "param", "value", "message"), [
    *(("hubspot_consent_sync", *case) for case in BAD_PARAMS),
    *(("hubspot_dead_letter_replay", *case) for case in BAD_PARAMS if case[0] in REPLAY_PARAMS),
])
def test_a_trigger_with_a_bad_param_is_refused_with_a_sentence_naming_it(dagbag, dag_id, param, value, message):
    # What the API server does with a trigger's conf: the serialized DAG's params, merged and validated.
    from airflow.serialization.serialized_objects import DagSerialization

    dag = dagbag.dags[dag_id]
    served = DagSerialization.from_dict(DagSerialization.to_dict(dag))
    # The replay's one required param, so that only the bad one is refused.
    given = {"dead_letter_uri": "file:///data/dead-letters"} if dag_id == "hubspot_dead_letter_replay" else {}
    with pytest.raises(Exception, match=f"Invalid input for param {param}") as refused:
        served.params.deep_merge({**given, param: value}).validate()
    # The failing part of the schema is printed with long strings split over lines ('...'\n '...').
    assert message in re.sub(r"['\"]\n\s*['\"]", "", str(refused.value))
    served.params.deep_merge({**given, param: dag.params[param]}).validate()  # its default passes
    # The trigger form's number input clamps to a top-level minimum or maximum without a word: the
    # bounds are nested where it does not look.
    schema = dag.params.get_param(param).schema
    assert not {"minimum", "maximum", "pattern"} & set(schema)


def test_consent_sync_runs_cover_one_utc_day(sync_dag):
    from airflow.serialization.encoders import coerce_to_core_timetable
    from airflow.timetables.base import DataInterval, TimeRestriction

    timetable = coerce_to_core_timetable(sync_dag.timetable)
    manual = timetable.infer_manual_data_interval(run_after=LOGICAL_DATE)
    assert (manual.start, manual.end) == (DAY, LOGICAL_DATE)
    scheduled = timetable.next_dagrun_info(
        last_automated_data_interval=DataInterval(DAY - timedelta(days=1), DAY),
        restriction=TimeRestriction(earliest=None, latest=None, catchup=True),
    )
    assert (scheduled.data_interval.start, scheduled.data_interval.end) == (DAY, DAY + timedelta(days=1))


def test_replay_dag_shape(replay_dag):
    dag = replay_dag
    assert set(dag.task_ids) == {"prepare", "submit", "report"}
    dag.check_cycle()
    assert type(dag.timetable).__name__ == "NullTimetable"  # manual trigger only
    submit = dag.get_task("submit")
    assert submit.pool == consent.HUBSPOT_POOL and submit.only_retryable is True
    assert dag.params["include_non_retryable"] is False
    assert dag.params["source_conn_id"] == "hubspot_consent_source"
    assert dag.params["source_table"] == "consent_events"
    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError):  # the dead-letter URI must be given
        dag.params.validate()


# --------------------------------------------------------------------------- the pool


def test_ensure_pool_creates_a_missing_pool_once(airflow_db):
    from airflow.models.pool import Pool

    Pool.delete_pool("hubspot_api") if Pool.get_pool("hubspot_api") else None
    assert consent.ensure_pool() == {"pool": "hubspot_api", "slots": 2, "created": True, "checked": True}
    Pool.create_or_update_pool("hubspot_api", slots=5, description="set by an admin", include_deferred=True)
    assert consent.ensure_pool() == {"pool": "hubspot_api", "slots": 5, "created": False, "checked": True}
    Pool.delete_pool("hubspot_api")


def test_ensure_pool_on_a_worker_without_db_access_warns_instead_of_failing():
    # What Airflow 3 workers do to task processes: the ORM is blocked.
    code = (
        "from airflow.sdk.execution_time.supervisor import block_orm_access; block_orm_access()\n"
        "import json; from hubspot_provider.consent import ensure_pool; print(json.dumps(ensure_pool()))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        "pool": "hubspot_api", "slots": None, "created": False, "checked": False,
    }
    assert "airflow pools set hubspot_api 2" in done.stdout + done.stderr


# --------------------------------------------------------------------------- end to end


def day_events(n_keys: int, *, prefix: str = "user", per_key: int = 3) -> list[tuple]:
    """Several events per (email, subscription) through DAY, in mixed timestamp styles, plus neighbours."""
    rows = []
    states = ("SUBSCRIBED", "UNSUBSCRIBED", "SUBSCRIBED", "UNSUBSCRIBED")
    for i in range(n_keys):
        email = f"{prefix}{i}@example.com"
        subscription_id = 1001 + i % 3
        for j in range(per_key):
            moment = DAY + timedelta(hours=1 + (i * 7 + j * 5) % 22, minutes=j)
            state = states[(i + j) % len(states)]
            text = (moment.strftime("%Y-%m-%d %H:%M:%S") if j % 2 == 0
                    else moment.astimezone(timezone(timedelta(hours=2))).isoformat())
            rows.append((email.upper() if j == 1 else email, subscription_id, state, None, None, text))
        # Events of the neighbouring days must not be synced by this run. (The next day's is for another
        # key: a later event for the same key would leave this key to that event's run.)
        rows.append((f"next.{email}", subscription_id, "UNSUBSCRIBED" if i % 2 else "SUBSCRIBED", None, None,
                     (DAY + timedelta(days=1, hours=3)).strftime("%Y-%m-%d %H:%M:%S")))
        rows.append((email, subscription_id, "NOT_SPECIFIED", None, None, "2026-03-09T23:00:00-00:30"))
    return rows


def expected_latest(rows: list[tuple]) -> dict[tuple[str, int, str], str]:
    """The statuses HubSpot should end with: latest event of DAY per key (later row on ties)."""
    latest: dict[tuple[str, int, str], tuple[datetime, str]] = {}
    for email, subscription_id, status, _lb, _lbe, occurred_at in rows:
        moment = consent.parse_occurred_at(occurred_at)
        if moment is None or not DAY <= moment < DAY + timedelta(days=1):
            continue
        key = (email.strip().lower(), subscription_id, "EMAIL")
        if key not in latest or moment >= latest[key][0]:
            latest[key] = (moment, status)
    return {key: status for key, (_moment, status) in latest.items()}


def hubspot_state(emulator) -> dict[tuple[str, int, str], str]:
    return {key: value["status"] for key, value in emulator.statuses.items()}


@pytest.fixture
def consent_source(tmp_path, monkeypatch):
    db = tmp_path / "consent.db"
    monkeypatch.setenv(
        "AIRFLOW_CONN_HUBSPOT_CONSENT_SOURCE", json.dumps({"conn_type": "sqlite", "host": str(db)})
    )

    def write(rows: list[tuple]) -> Path:
        return write_consent_table(db, rows)

    return write


@pytest.fixture
def storage(tmp_path):
    return tmp_path / "storage"


def run_dag(
    dag, conf: dict, *, logical_date: datetime | None = LOGICAL_DATE, run_after: datetime | None = None
):
    # dag.test() writes run_conf into the (module-shared) DAG's params, so a param one test sets would
    # leak into the next test's runs: every run states the params the tests vary.
    if dag.dag_id == "hubspot_consent_sync":
        conf = {"audit_conn_id": None, "max_unplaceable_rows": 100, "batch_size": 100,
                "shard_size": consent.DEFAULT_SHARD_SIZE, "hubspot_changes": "respect_opt_outs", "dry_run": False,
                **conf}
    dr = dag.test(logical_date=logical_date, run_after=run_after, run_conf=conf)
    return dr, {ti.task_id: str(ti.state) for ti in dr.get_task_instances()}


def run_files(storage: Path, dr) -> Path:
    return storage / consent.safe_run_id(dr.run_id)


def letters(folder: Path) -> list[dict]:
    return [
        json.loads(line) for part in sorted(folder.glob("*.jsonl")) for line in part.read_text().splitlines()
    ]


def xcom_values(dr) -> list:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        query = select(XComModel).where(XComModel.run_id == dr.run_id, XComModel.dag_id == dr.dag_id)
        rows = session.scalars(query)
        return [XComModel.deserialize_value(row) for row in rows]


def test_clean_day_takes_the_report_branch(
    airflow_db, sync_dag, hubspot_emulator_factory, hubspot_conn, consent_source, storage, tmp_path, monkeypatch
):
    import sqlite3

    from hubspot_provider.ledger import LEDGER_DDL

    emulator = hubspot_emulator_factory()
    hubspot_conn(emulator)
    rows = day_events(60)
    consent_source(rows)
    audit_db = tmp_path / "audit.db"
    with sqlite3.connect(audit_db) as db:
        db.execute(LEDGER_DDL)
    monkeypatch.setenv("AIRFLOW_CONN_AUDIT_DB", json.dumps({"conn_type": "sqlite", "host": str(audit_db)}))

    dr, states = run_dag(sync_dag, {"storage_uri": storage.as_uri(), "batch_size": 25, "audit_conn_id": "audit_db"})

    assert states == CLEAN
    assert str(dr.state) == "success"
    assert (dr.data_interval_start, dr.data_interval_end) == (DAY, LOGICAL_DATE)
    assert hubspot_state(emulator) == expected_latest(rows)
    folder = run_files(storage, dr)
    summary = json.loads((folder / "summary.json").read_text())
    assert (summary["inputs"], summary["succeeded"], summary["failed"]) == (60, 60, 0)
    assert summary["events_in_interval"] == 180
    assert summary["changed"] == 60 and summary["superseded"] == 120 and summary["outside_interval"] == 120
    assert letters(folder / "dead-letters") == []
    assert not (folder / "validated" / "_checkpoint.json").exists()
    # XCom carries paths and counts only, one small summary per task.
    assert "@example.com" not in json.dumps(xcom_values(dr), default=str).lower()
    assert len(xcom_values(dr)) <= len(TASKS)
    # The ledger: one audit record per status written, with HubSpot's answer and the run that wrote it.
    ledger = letters(folder / "audit")
    assert len(ledger) == summary["ledger_records"] == 60
    assert {(r["subscriberIdString"].lower(), r["subscriptionId"], r["channel"]) for r in ledger} == set(
        expected_latest(rows))  # the email as sent, case kept
    assert all(r["outcome"] == "SUCCEEDED" and r["correlationId"] and r["runId"] == dr.run_id for r in ledger)
    assert all(r["confirmedStatus"] == r["statusState"] and r["occurredAt"].startswith("2026-03-10") for r in ledger)
    assert {r["dataIntervalStart"] for r in ledger} == {"2026-03-10T00:00:00Z"}
    with sqlite3.connect(audit_db) as db:
        assert db.execute("SELECT count(*), count(DISTINCT correlation_id) FROM hubspot_consent_ledger").fetchone() == (
            60, summary["requests"])

    # A day without events is a clean, empty run that sends nothing.
    requests_before = len(emulator.requests)
    quiet_day = LOGICAL_DATE + timedelta(days=5)
    dr, states = run_dag(sync_dag, {"storage_uri": storage.as_uri()}, logical_date=quiet_day)
    assert states == CLEAN
    summary = json.loads((run_files(storage, dr) / "summary.json").read_text())
    assert (summary["rows_read"], summary["inputs"], summary["submitted"], summary["failed"]) == (0, 0, 0, 0)
    assert len(emulator.requests) == requests_before


def test_consent_changed_inside_hubspot_is_respected_and_a_dry_run_plans_what_the_run_does(
    airflow_db, sync_dag, hubspot_emulator_factory, hubspot_conn, consent_source, storage, tmp_path, monkeypatch
):
    import sqlite3

    from hubspot_provider.ledger import LEDGER_DDL
    from hubspot_provider.operators.hubspot import HubSpotWriteStatusesOperator
    from hubspot_provider.testing.emulator import SOURCE_PUBLIC_API

    emulator = hubspot_emulator_factory()
    hubspot_conn(emulator)
    audit_db = tmp_path / "audit.db"
    with sqlite3.connect(audit_db) as db:
        db.execute(LEDGER_DDL)
    monkeypatch.setenv("AIRFLOW_CONN_AUDIT_DB", json.dumps({"conn_type": "sqlite", "host": str(audit_db)}))

    def hour(h: int) -> str:
        return (DAY + timedelta(hours=h)).strftime("%Y-%m-%d %H:%M:%S")

    # Before the run, in HubSpot: a footer opt-out at 20:00 (after the contact's 10:00 opt-in at the
    # source) and one at 08:00 (before it); an opt-out from all email at 20:00; another integration's
    # opt-out through the public API. And this provider's own opt-out, written "at 02:00" (now), of a
    # contact whose opt-in happened at 01:00 and arrives late.
    emulator.footer_unsubscribe("late@example.com", 1001, at=DAY + timedelta(hours=20))
    emulator.footer_unsubscribe("early@example.com", 1001, at=DAY + timedelta(hours=8))
    emulator.unsubscribe_all_in_hubspot("wide@example.com", at=DAY + timedelta(hours=20))
    emulator.hubspot_side_change("other@example.com", 1001, "UNSUBSCRIBED", source=SOURCE_PUBLIC_API)
    HubSpotWriteStatusesOperator(
        task_id="earlier_sync", inputs=[{"subscriberIdString": "own@example.com", "subscriptionId": 1001,
                                         "statusState": "UNSUBSCRIBED"}],
        audit_conn_id="audit_db", ledger=True, ledger_uri=(tmp_path / "earlier").as_uri(),
    ).execute(context={"run_id": "earlier"})
    rows = [
        ("late@example.com", 1001, "SUBSCRIBED", None, None, hour(10)),
        ("early@example.com", 1001, "SUBSCRIBED", None, None, hour(10)),
        ("own@example.com", 1001, "SUBSCRIBED", None, None, hour(1)),
        ("wide@example.com", 1002, "SUBSCRIBED", None, None, hour(10)),
        ("other@example.com", 1001, "SUBSCRIBED", None, None, hour(10)),
        # A global opt-out: its subscription_id is NULL. The contact's earlier opt-in is superseded by it,
        # the later one lands after it.
        ("all@example.com", 1002, "SUBSCRIBED", None, None, hour(9)),
        ("all@example.com", None, "UNSUBSCRIBE_ALL", None, None, hour(12)),
        ("all@example.com", 1003, "SUBSCRIBED", None, None, hour(15)),
    ]
    consent_source(rows)
    conf = {"storage_uri": storage.as_uri(), "audit_conn_id": "audit_db"}
    before = {key: dict(value) for key, value in emulator.statuses.items()}
    writes_before = emulator.writes_applied

    dr, states = run_dag(sync_dag, {**conf, "dry_run": True})
    assert states == CLEAN
    assert emulator.statuses == before and emulator.writes_applied == writes_before
    folder = run_files(storage, dr)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["dry_run"] is True and summary["plan"]["withhold"] == 3 and summary["plan"]["change"] == 4
    plan = {(r["input"]["subscriberIdString"], r["input"].get("subscriptionId")): r["action"]
            for r in letters(folder / "plan")}
    assert not (folder / "audit").exists()

    dr, states = run_dag(sync_dag, conf)
    assert states == CLEAN  # withheld writes are decisions, not failures
    folder = run_files(storage, dr)
    summary = json.loads((folder / "summary.json").read_text())
    state = hubspot_state(emulator)
    assert state[("late@example.com", 1001, "EMAIL")] == "UNSUBSCRIBED"  # the 20:00 footer opt-out stays
    assert state[("early@example.com", 1001, "EMAIL")] == "SUBSCRIBED"  # the 08:00 one is overwritten
    assert state[("own@example.com", 1001, "EMAIL")] == "SUBSCRIBED"  # the own 02:00 write does not block
    assert state[("wide@example.com", 1002, "EMAIL")] == "UNSUBSCRIBED"
    assert state[("other@example.com", 1001, "EMAIL")] == "UNSUBSCRIBED"  # not in the ledger: not ours
    assert emulator.wide_status_of("all@example.com")["status"] == "UNSUBSCRIBED"
    assert state[("all@example.com", 1002, "EMAIL")] == "UNSUBSCRIBED"
    assert state[("all@example.com", 1003, "EMAIL")] == "SUBSCRIBED"
    assert (summary["withheld"], summary["failed"]) == (3, 0)
    assert summary["withheld_by_category"] == {"NEWER_OPT_OUT_IN_HUBSPOT": 3} and summary["superseded"] == 1
    withheld = {(r["input"]["subscriberIdString"]) for r in letters(folder / "dead-letters")}
    assert withheld == {"late@example.com", "wide@example.com", "other@example.com"}
    superseded = letters(folder / "superseded")
    assert [r["input"]["subscriptionId"] for r in superseded] == [1002]
    assert "opt-out from all email at 2026-03-10T12:00:00Z" in superseded[0]["message"]
    # The plan was what the run did.
    ledger = letters(folder / "audit")
    done = {(r["subscriberIdString"], r["subscriptionId"]): r["outcome"] for r in ledger}
    assert {key: {"withhold": "WITHHELD", "change": "SUCCEEDED"}[action] for key, action in plan.items()} == done
    writes = [r.path.rsplit("/", 1)[-1] for r in emulator.requests if not r.path.endswith("/read")]
    assert writes[-2:] == ["unsubscribe-all", "write"]  # the opt-out from all email went first

    # source_wins overwrites HubSpot, reading nothing.
    reads_before = sum(r.path.endswith("/read") for r in emulator.requests)
    dr, states = run_dag(sync_dag, {**conf, "hubspot_changes": "source_wins"})
    assert states == CLEAN
    assert hubspot_state(emulator)[("late@example.com", 1001, "EMAIL")] == "SUBSCRIBED"
    assert sum(r.path.endswith("/read") for r in emulator.requests) == reads_before


def test_respect_all_keeps_a_newer_subscribe_made_in_hubspot(
    airflow_db, sync_dag, hubspot_emulator_factory, hubspot_conn, consent_source, storage
):
    emulator = hubspot_emulator_factory()
    hubspot_conn(emulator)
    emulator.preferences_page("pref@example.com", 1001, "SUBSCRIBED", at=DAY + timedelta(hours=20))
    consent_source([("pref@example.com", 1001, "NOT_SPECIFIED", None, None,
                     (DAY + timedelta(hours=10)).strftime("%Y-%m-%d %H:%M:%S"))])
    dr, states = run_dag(sync_dag, {"storage_uri": storage.as_uri(), "hubspot_changes": "respect_all"})
    assert states == CLEAN
    summary = json.loads((run_files(storage, dr) / "summary.json").read_text())
    assert summary["withheld_by_category"] == {"NEWER_CHANGE_IN_HUBSPOT": 1}
    assert hubspot_state(emulator)[("pref@example.com", 1001, "EMAIL")] == "SUBSCRIBED"


def test_bad_rows_take_the_summarise_branch_and_a_rerun_is_a_harmless_replay(
    airflow_db, sync_dag, replay_dag, hubspot_emulator_factory, hubspot_conn, consent_source, storage
):
    emulator = hubspot_emulator_factory()
    hubspot_conn(emulator)
    good = day_events(40)
    bad = [
        ("not-an-email", 1001, "SUBSCRIBED", None, None, "2026-03-10 09:00:00"),
        ("lower@example.com", 1001, "subscribed", None, None, "2026-03-10 09:00:00"),
        ("unknown-sub@example.com", 4242, "SUBSCRIBED", None, None, "2026-03-10 09:00:00"),
        ("unknown-sub2@example.com", 4243, "UNSUBSCRIBED", None, None, "2026-03-10T11:00:00+01:00"),
        ("when@example.com", 1001, "SUBSCRIBED", None, None, "sometime on tuesday"),
    ]
    rows = good + bad
    consent_source(rows)
    run_after = datetime(2026, 3, 11, 6, tzinfo=timezone.utc)

    dr, states = run_dag(sync_dag, {"storage_uri": storage.as_uri()}, run_after=run_after)

    assert states == WITH_FAILURES
    assert str(dr.state) == "success"  # 4 of 44 failed: under max_failed_ratio
    assert hubspot_state(emulator) == expected_latest(good)
    folder = run_files(storage, dr)
    dead = letters(folder / "dead-letters")
    by_email = {d["input"].get("subscriberIdString"): d["category"] for d in dead}
    assert by_email == {
        "not-an-email": "INVALID_INPUT",
        "lower@example.com": "INVALID_INPUT",
        "unknown-sub@example.com": "OBJECT_NOT_FOUND",
        "unknown-sub2@example.com": "OBJECT_NOT_FOUND",
    }
    # The event with no readable time belongs to no day: listed apart, in no day's failure ratio.
    assert [d["input"]["subscriberIdString"] for d in letters(folder / "unplaceable")] == ["when@example.com"]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["failed_by_category"] == {"INVALID_INPUT": 2, "OBJECT_NOT_FOUND": 2}
    assert summary["unplaceable"] == 1 and summary["inputs"] == 44
    assert summary["dead_letters"] == 4 and summary["dead_letter_uri"] == (folder / "dead-letters").as_uri()
    first_state = emulator.statuses
    first_files = sorted(p.name for p in (folder / "dead-letters").iterdir())

    # The same interval again, as a re-run of the same run id: same final state, dead letters rewritten.
    dr2, states2 = run_dag(sync_dag, {"storage_uri": storage.as_uri()}, run_after=run_after)
    assert dr2.run_id == dr.run_id and states2 == states
    assert emulator.statuses == first_state  # nothing changed, so not even HubSpot's timestamps moved
    assert sorted(p.name for p in (folder / "dead-letters").iterdir()) == first_files
    assert sorted(map(json.dumps, letters(folder / "dead-letters"))) == sorted(map(json.dumps, dead))
    again = json.loads((folder / "summary.json").read_text())
    assert (again["changed"], again["unchanged"], again["dead_letters"]) == (0, 40, 4)

    # Replay: one retryable dead letter (an answer HubSpot never gave) next to the permanent failures,
    # and a stale one from the day before, for a contact whose later events the source holds.
    current = emulator.status_of("user0@example.com", 1001)["status"]
    stale = "UNSUBSCRIBED" if current == "SUBSCRIBED" else "SUBSCRIBED"
    (folder / "dead-letters" / "part-lost.jsonl").write_text("".join(json.dumps({
        "input": {"subscriberIdString": email, "subscriptionId": subscription_id,
                  "statusState": status, "channel": "EMAIL"},
        "category": "NO_RESULT",
        "message": "no answer",
        "retryable": True,
        "occurredAt": occurred_at,
    }) + "\n" for email, subscription_id, status, occurred_at in [
        ("late@example.com", 1002, "SUBSCRIBED", "2026-03-10T10:00:00Z"),
        ("user0@example.com", 1001, stale, "2026-03-09T10:00:00Z"),
    ]))
    rdr, rstates = run_dag(
        replay_dag, {"dead_letter_uri": (folder / "dead-letters").as_uri()}, logical_date=None
    )
    assert rstates == dict.fromkeys(["prepare", "submit", "report"], "success")
    assert emulator.status_of("late@example.com", 1002)["status"] == "SUBSCRIBED"
    assert emulator.status_of("unknown-sub@example.com", 4242) is None
    assert emulator.status_of("user0@example.com", 1001)["status"] == current  # the stale letter was left out
    replay = folder / f"replay-{consent.safe_run_id(rdr.run_id)}"
    replay_summary = json.loads((replay / "summary.json").read_text())
    assert (replay_summary["selected"], replay_summary["skipped"], replay_summary["succeeded"]) == (1, 4, 1)
    assert replay_summary["superseded_later"] == 1
    assert letters(replay / "dead-letters") == []
    assert len(letters(folder / "dead-letters")) == 6  # the originals are left as they were


def test_every_row_is_accounted_for_once_and_quiet_days_stay_green(
    airflow_db, sync_dag, hubspot_emulator_factory, hubspot_conn, consent_source, storage
):
    import sqlite3

    emulator = hubspot_emulator_factory()
    hubspot_conn(emulator)
    good = day_events(20)
    null_emails = [(None, 1001, "SUBSCRIBED", None, None, f"2026-03-10 0{h}:00:00") for h in (1, 2, 3)]
    unplaceable = {"2026-02-30 10:00:00", "2026-13-45 10:00:00", "0000-03-10 10:00:00", "yesterday", None}
    strays = [(f"stray{i}@example.com", 1001, "SUBSCRIBED", None, None, when) for i, when in enumerate(unplaceable)]
    db = consent_source(good + null_emails + strays)
    conn = sqlite3.connect(db)
    conn.execute("INSERT INTO consent_events VALUES (CAST(? AS TEXT), 1001, 'SUBSCRIBED', NULL, NULL, "
                 "'2026-03-10 08:00:00')", (b"caf\xe9@example.com",))  # Latin-1, not UTF-8
    conn.commit()
    conn.close()

    dr, states = run_dag(sync_dag, {"storage_uri": storage.as_uri()})

    assert states == WITH_FAILURES and str(dr.state) == "success"
    assert hubspot_state(emulator) == expected_latest(good)  # the good rows landed
    folder = run_files(storage, dr)
    dead = letters(folder / "dead-letters")
    assert len(dead) == 4  # three NULL emails are three dead letters, plus the undecodable one
    assert sum(d["input"]["subscriberIdString"] is None for d in dead) == 3
    assert any("not valid UTF-8" in d["message"] for d in dead)
    listed = letters(folder / "unplaceable")
    assert {d["input"]["subscriberIdString"] for d in listed} == {r[0] for r in strays}
    summary = json.loads((folder / "summary.json").read_text())
    assert (summary["inputs"], summary["succeeded"], summary["failed"], summary["unplaceable"]) == (24, 20, 4, 5)
    assert summary["superseded"] == 40

    # A quiet day a month later: no events of its own, the same unplaceable rows. Green, not "100% failed".
    quiet_dr, quiet_states = run_dag(sync_dag, {"storage_uri": storage.as_uri()},
                                     logical_date=LOGICAL_DATE + timedelta(days=30))
    assert str(quiet_dr.state) == "success", quiet_states
    quiet = json.loads((run_files(storage, quiet_dr) / "summary.json").read_text())
    assert (quiet["inputs"], quiet["failed"], quiet["unplaceable"]) == (0, 0, 5)

    # More unplaceable rows than the limit allows fail the run, naming where they are listed.
    limited_dr, limited_states = run_dag(sync_dag, {"storage_uri": storage.as_uri(), "max_unplaceable_rows": 4},
                                         logical_date=LOGICAL_DATE + timedelta(days=31))
    assert str(limited_dr.state) == "failed" and limited_states["summarise_dead_letters"] == "failed"


def test_flaky_hubspot_loses_nothing(
    airflow_db, sync_dag, hubspot_emulator_factory, hubspot_conn, consent_source, storage
):
    emulator = hubspot_emulator_factory(fault_rate_5xx=0.2, fault_rate_drop_after_write=0.1, seed=7)
    hubspot_conn(emulator)
    rows = day_events(400, per_key=2)
    consent_source(rows)

    dr, states = run_dag(sync_dag, {"storage_uri": storage.as_uri(), "batch_size": 20})

    assert states["submit"] == "success" and states["report"] == "success", states
    assert hubspot_state(emulator) == expected_latest(rows)
    summary = json.loads((run_files(storage, dr) / "summary.json").read_text())
    assert (summary["inputs"], summary["succeeded"], summary["failed"]) == (400, 400, 0)
    assert summary["retries"] > 0
    assert any(r.kind == "fault" for r in emulator.requests)


def test_hubspot_down_fails_the_run_and_a_rerun_applies_everything(
    airflow_db, sync_dag, hubspot_emulator_factory, hubspot_conn, consent_source, storage
):
    emulator = hubspot_emulator_factory(fault_rate_5xx=1.0)
    hubspot_conn(emulator, max_retries=1)
    rows = day_events(30)
    consent_source(rows)
    run_after = datetime(2026, 3, 11, 7, tzinfo=timezone.utc)
    submit = sync_dag.get_task("submit")
    retries = submit.retries
    submit.retries = 0  # the DAG's task retries wait minutes; the hook's retry budget is what is tested here
    from hubspot_provider.notifications import DeadLetterNotifier

    class Collecting(DeadLetterNotifier):
        delivered: list = []

        def deliver(self, summary):
            self.delivered.append(summary)

    callbacks = submit.on_failure_callback
    submit.on_failure_callback = [*callbacks, Collecting()]
    try:
        dr, states = run_dag(sync_dag, {"storage_uri": storage.as_uri()}, run_after=run_after)
        assert states == {
            "extract": "success", "validate": "success", "shard": "success", "submit": "failed",
            "branch_on_outcome": "upstream_failed", "report": "upstream_failed",
            "summarise_dead_letters": "upstream_failed",
        }
        assert str(dr.state) == "failed"
        assert emulator.statuses == {}
        folder = run_files(storage, dr)
        assert not (folder / "summary.json").exists()  # nothing reported as done
        assert (folder / "validated" / "_checkpoint.json").exists()  # where a task retry would resume
        # The failed write alerts through the DAG's notifiers, with counts only.
        (alert,) = Collecting.delivered
        assert alert["failed_task"] == "submit" and alert["error"] == "HubSpotUnavailableError"
        assert alert["dead_letters"] == 0

        emulator.fault_rate_5xx = 0.0
        dr2, states2 = run_dag(sync_dag, {"storage_uri": storage.as_uri()}, run_after=run_after)
    finally:
        submit.retries = retries
        submit.on_failure_callback = callbacks
    assert dr2.run_id == dr.run_id
    assert states2 == CLEAN
    assert hubspot_state(emulator) == expected_latest(rows)
    summary = json.loads((folder / "summary.json").read_text())
    assert (summary["succeeded"], summary["failed"]) == (30, 0)
    assert not (folder / "validated" / "_checkpoint.json").exists()


def test_daily_limit_defers_the_write_and_the_run_resumes_after_the_reset(
    airflow_db, sync_dag, hubspot_emulator_factory, hubspot_conn, consent_source, storage
):
    # A "day" of 3 requests that resets 2 s after it starts: submit hits the DAILY limit part-way,
    # defers to DateTimeTrigger (run inline by dag.test()), and resumes from its checkpoint.
    emulator = hubspot_emulator_factory(daily_limit=3, daily_reset_s=2)
    hubspot_conn(emulator)
    rows = day_events(100, per_key=1)
    consent_source(rows)

    dr, states = run_dag(sync_dag, {"storage_uri": storage.as_uri(), "batch_size": 10})

    assert states == CLEAN, states
    assert hubspot_state(emulator) == expected_latest(rows)
    assert any(r.kind == "daily_limited" for r in emulator.requests)
    summary = json.loads((run_files(storage, dr) / "summary.json").read_text())
    assert (summary["inputs"], summary["succeeded"], summary["failed"]) == (100, 100, 0)
    submitted = next(v for v in xcom_values(dr) if isinstance(v, dict) and "deferrals" in v)
    assert submitted["deferrals"] >= 1



def test_backfilling_old_days_after_an_outage_never_puts_back_a_stale_status(
    airflow_db, sync_dag, hubspot_emulator_factory, hubspot_conn, consent_source, storage
):
    # Three days of events for the same contacts. The runs of the first two days failed (an outage);
    # the third day ran as soon as HubSpot was back. The backfill of the two missed days runs after it.
    days = [DAY - timedelta(days=2), DAY - timedelta(days=1), DAY]
    rows = changes_over_days(days)  # a third of the contacts last changed on each day
    consent_source(rows)
    emulator = hubspot_emulator_factory()
    hubspot_conn(emulator)
    conf = {"storage_uri": storage.as_uri()}
    run_for_day = lambda day, **extra: run_dag(  # noqa: E731
        sync_dag, {**conf, **extra}, logical_date=day + timedelta(days=1)
    )

    _dr, states = run_for_day(DAY)
    assert states == CLEAN
    after_newest_day = hubspot_state(emulator)

    summaries = []
    for day in days[:2]:  # the backfill, oldest first
        dr, states = run_for_day(day)
        assert states == CLEAN
        summaries.append(json.loads((run_files(storage, dr) / "summary.json").read_text()))

    assert hubspot_state(emulator) == latest_of_all_days(rows)
    # Nothing the newest day wrote was overwritten by an older day's event.
    assert {k: v for k, v in hubspot_state(emulator).items() if k in after_newest_day} == after_newest_day
    # Keys the later days changed again were left to those days; the rest of each old day landed.
    assert [(s["superseded_later"], s["succeeded"], s["changed"], s["failed"]) for s in summaries] == [
        (20, 10, 10, 0), (10, 10, 10, 0),
    ]

    # The control: syncing the oldest day's latest events regardless of what came later would put
    # stale statuses back, which is what the default prevents.
    run_for_day(days[0], later_events_win=False)
    assert hubspot_state(emulator) != latest_of_all_days(rows)



# --------------------------------------------------------------------------- a day written by several shards


def submit_tis(dr) -> list:
    return sorted((ti for ti in dr.get_task_instances() if ti.task_id == "submit"), key=lambda ti: ti.map_index)


def test_a_day_split_into_shards_ends_with_every_key_at_its_latest_event(
    airflow_db, sync_dag, hubspot_emulator_factory, hubspot_conn, consent_source, storage
):
    emulator = hubspot_emulator_factory()
    hubspot_conn(emulator)
    emulator.footer_unsubscribe("late@example.com", 1001, at=DAY + timedelta(hours=20))

    def hour(h: int) -> str:
        return (DAY + timedelta(hours=h)).strftime("%Y-%m-%d %H:%M:%S")

    good = day_events(40)  # three events per key, in mixed case and offsets
    rows = good + [
        # An opt-out from all email between two of the contact's events: the earlier opt-in is
        # superseded by it, the later one must land after it, in the same shard.
        ("all@example.com", 1002, "SUBSCRIBED", None, None, hour(9)),
        ("ALL@example.com", None, "UNSUBSCRIBE_ALL", None, None, hour(12)),
        ("all@example.com", 1003, "SUBSCRIBED", None, None, hour(15)),
        ("late@example.com", 1001, "SUBSCRIBED", None, None, hour(10)),  # a newer footer opt-out wins
        ("unknown-sub@example.com", 4242, "SUBSCRIBED", None, None, hour(9)),  # HubSpot rejects it
        ("not-an-email", 1001, "SUBSCRIBED", None, None, hour(9)),  # never reaches a shard
    ]
    consent_source(rows)
    conf = {"storage_uri": storage.as_uri(), "shard_size": 10}
    run_after = datetime(2026, 3, 11, 5, tzinfo=timezone.utc)

    dr, states = run_dag(sync_dag, conf, run_after=run_after)

    assert states == WITH_FAILURES and str(dr.state) == "success"
    folder = run_files(storage, dr)
    summary = json.loads((folder / "summary.json").read_text())
    # 40 + 2 + 1 + 1 valid statuses, 10 a shard: five shards, each written by its own task.
    shards = consent.shard_count(44, 10)
    assert shards == 5 and summary["shards"] == shards and summary["valid"] == 44
    tis = submit_tis(dr)
    assert [ti.map_index for ti in tis] == list(range(shards))
    assert {str(ti.state) for ti in tis} == {"success"}
    shard_files = sorted((folder / "validated").glob("shard-*/statuses.jsonl"))
    assert [p.parent.name for p in shard_files] == [f"shard-{i:05d}" for i in range(shards)]
    assert not list((folder / "validated").glob("shard-*/_checkpoint.json"))  # each shard finished

    # Every key at its latest event; the opt-out from all email landed before the contact's later opt-in.
    state = hubspot_state(emulator)
    assert {key: value for key, value in state.items() if key[0].startswith("user")} == expected_latest(good)
    assert emulator.wide_status_of("all@example.com")["status"] == "UNSUBSCRIBED"
    assert state[("all@example.com", 1002, "EMAIL")] == "UNSUBSCRIBED"
    assert state[("all@example.com", 1003, "EMAIL")] == "SUBSCRIBED"
    assert state[("late@example.com", 1001, "EMAIL")] == "UNSUBSCRIBED"
    assert emulator.status_of("unknown-sub@example.com", 4242) is None

    # Every input accounted for once, over all shards.
    assert summary["events_in_interval"] == 40 * 3 + 6
    assert summary["inputs"] == summary["staged"] == 45
    assert summary["events_in_interval"] == summary["inputs"] + summary["superseded"] + summary["superseded_later"]
    assert summary["superseded"] == 40 * 2 + 1
    assert (summary["succeeded"], summary["failed"], summary["withheld"]) == (42, 2, 1)
    assert summary["inputs"] == summary["succeeded"] + summary["failed"] + summary["withheld"]
    assert summary["failed_by_category"] == {"INVALID_INPUT": 1, "OBJECT_NOT_FOUND": 1}
    assert summary["withheld_by_category"] == {"NEWER_OPT_OUT_IN_HUBSPOT": 1}
    # The summary is one set of counts, whatever the number of shards.
    assert "shard-0" not in json.dumps(summary) and len(json.dumps(summary)) < 4000
    assert "@example.com" not in json.dumps(xcom_values(dr), default=str).lower()

    # Each contact is in exactly one shard, and its lines kept their order there.
    contact_shards: dict[str, set[str]] = {}
    for path in shard_files:
        lines = [json.loads(line)["input"] for line in path.read_text().splitlines()]
        for line in lines:
            contact_shards.setdefault(line["subscriberIdString"].lower(), set()).add(path.parent.name)
        mine = [line["statusState"] for line in lines if line["subscriberIdString"].lower() == "all@example.com"]
        if mine:
            assert mine == ["UNSUBSCRIBE_ALL", "SUBSCRIBED"]
    assert all(len(names) == 1 for names in contact_shards.values())
    assert sum(1 for path in shard_files for _line in path.read_text().splitlines()) == 44
    assert len({name for names in contact_shards.values() for name in names}) > 1  # really spread

    # Dead letters and the ledger: each shard's parts are its own, and every contact's are in its shard's.
    dead = {p.name: letters_of(p) for p in (folder / "dead-letters").glob("*.jsonl")}
    assert sorted(d["category"] for part in dead.values() for d in part) == [
        "INVALID_INPUT", "NEWER_OPT_OUT_IN_HUBSPOT", "OBJECT_NOT_FOUND"]
    ledger_parts = sorted((folder / "audit").glob("*.jsonl"))
    assert ledger_parts and all(p.name.startswith("part-shard-") for p in ledger_parts)
    ledger = [record for part in ledger_parts for record in letters_of(part)]
    assert len(ledger) == summary["ledger_records"] == 44  # every status sent or withheld
    for part in ledger_parts:
        shard = part.name[len("part-"):len("part-shard-00000")]
        assert all(contact_shards[r["subscriberIdString"].lower()] == {shard} for r in letters_of(part))
    first = {
        "summary": {k: summary[k] for k in ("succeeded", "failed", "withheld", "superseded", "inputs")},
        "dead": sorted(json.dumps(d, sort_keys=True) for part in dead.values() for d in part),
        "state": state,
    }

    # A re-run of the same run as one shard: same outcome; the five shards' parts and folders are gone,
    # so nothing is listed twice.
    dr2, states2 = run_dag(sync_dag, {**conf, "shard_size": 1000}, run_after=run_after)
    assert dr2.run_id == dr.run_id and states2 == WITH_FAILURES
    again = json.loads((folder / "summary.json").read_text())
    assert again["shards"] == 1 and len(submit_tis(dr2)) == 1
    assert {k: again[k] for k in first["summary"]} == first["summary"]
    assert again["unchanged"] >= 40  # HubSpot already held the statuses
    assert hubspot_state(emulator) == first["state"]
    assert not list((folder / "validated").glob("shard-*"))
    assert not list((folder / "dead-letters").glob("part-shard-*")) and not list((folder / "audit").glob("part-shard-*"))
    assert sorted(json.dumps(d, sort_keys=True) for d in letters(folder / "dead-letters")) == first["dead"]
    assert len(letters(folder / "audit")) == again["ledger_records"] == 44


def letters_of(part: Path) -> list[dict]:
    return [json.loads(line) for line in part.read_text().splitlines()]


def test_a_failed_shard_retries_alone_and_resumes_from_its_own_checkpoint(
    airflow_db, sync_dag, hubspot_emulator_factory, hubspot_conn, consent_source, storage
):
    emulator = hubspot_emulator_factory(rate_limit_max=1000)
    hubspot_conn(emulator, max_retries=1)
    rows = day_events(90, per_key=1)
    consent_source(rows)
    # One status per request and one request in flight, so a shard of 30 is two checkpointed segments
    # (20 × batch_size lines, then 10) and the faults below land on known requests whatever the timing:
    # the first 20 writes go through, then the 21st fails on both of its attempts (max_retries=1), which
    # fails the shard that was writing its second segment; nothing else fails.
    emulator.inject("slow:0", count=20)
    emulator.inject("503", count=2)
    submit = sync_dag.get_task("submit")
    retries, retry_delay = submit.retries, submit.retry_delay
    submit.retries, submit.retry_delay = 1, timedelta(0)
    submit.partial_kwargs["max_concurrency"] = 1
    try:
        dr, states = run_dag(sync_dag, {"storage_uri": storage.as_uri(), "shard_size": 30, "batch_size": 1,
                                        "hubspot_changes": "source_wins"})
    finally:
        submit.retries, submit.retry_delay = retries, retry_delay
        submit.partial_kwargs.pop("max_concurrency")

    assert states == CLEAN and str(dr.state) == "success"
    assert hubspot_state(emulator) == expected_latest(rows)
    tis = submit_tis(dr)
    assert len(tis) == 3
    assert sorted(ti.try_number for ti in tis) == [1, 1, 2]  # only the failed shard ran again
    summary = json.loads((run_files(storage, dr) / "summary.json").read_text())
    assert (summary["inputs"], summary["succeeded"], summary["failed"], summary["shards"]) == (90, 90, 0, 3)
    assert summary["ledger_records"] == len(letters(run_files(storage, dr) / "audit")) == 90
    # The retry resumed after the failed shard's first segment: those 20 were not sent again. (Batches of
    # the interrupted second segment that landed before the failure are sent again: at most its 10.)
    landed = sum(1 for r in emulator.requests if r.path.endswith("/statuses/batch/write") and r.status == 200)
    assert 90 <= landed <= 90 + 10
