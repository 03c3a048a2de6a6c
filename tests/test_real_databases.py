"""The consent extract and the SQL ledger on real database servers: PostgreSQL and MariaDB.

They connect through the providers' own common-sql hooks (``PostgresHook``, ``MySqlHook`` with
mysql-connector-python), to the servers this project's machines run on loopback (see the README).
Where a server is absent (a laptop), each test skips with the reason; with
``HUBSPOT_PROVIDER_REQUIRE_SERVICES=1`` (set by ``.ci/run``) an absent server fails the test instead,
so CI can never pass without having run them.
"""

from __future__ import annotations

import json
import tracemalloc
import uuid
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from hubspot_provider import consent
from hubspot_provider.ledger import LEDGER_DDL
from hubspot_provider.operators.hubspot import HubSpotWriteStatusesOperator

START = datetime(2026, 3, 10, tzinfo=timezone.utc)
END = START + timedelta(days=1)

def table_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def execute(conn, *statements: str, rows: list[tuple] | None = None, insert: str | None = None) -> None:
    cursor = conn.cursor()
    try:
        for statement in statements:
            cursor.execute(statement)
        if rows:
            cursor.executemany(insert, rows)
    finally:
        cursor.close()


@contextmanager
def consent_table(conn, timestamp_type: str, rows: list[tuple], *, text: str = "TEXT"):
    """A source-contract table holding ``rows`` (email, subscription_id, status, occurred_at); dropped after."""
    table = table_name("consent_events")
    execute(
        conn,
        f"CREATE TABLE {table} (email {text}, subscription_id BIGINT, status {text}, legal_basis {text}, "
        f"legal_basis_explanation TEXT, occurred_at {timestamp_type})",
        rows=[(email, sid, status, None, None, at) for email, sid, status, at in rows],
        insert=f"INSERT INTO {table} VALUES (%s, %s, %s, %s, %s, %s)",
    )
    try:
        yield table
    finally:
        execute(conn, f"DROP TABLE {table}")


def staged(run: Path) -> dict[str, str]:
    lines = (run / "staged" / "events.jsonl").read_text().splitlines()
    return {f"{e['input']['subscriberIdString']}/{e['input'].get('subscriptionId')}": e["input"]["statusState"]
            for e in map(json.loads, lines)}


def extract(conn_id: str, table: str, run: Path, **kwargs) -> dict:
    return consent.extract_consent_events(
        source_conn_id=conn_id, source_table=table, data_interval_start=START, data_interval_end=END,
        run_uri=run.as_uri(), **kwargs,
    )


def day_rows(naive: bool) -> list[tuple]:
    """Events around the interval: offsets, the interval's edges, a later event, a NULL time."""
    def moment(text: str) -> datetime:
        value = datetime.fromisoformat(text)
        return value.astimezone(timezone.utc).replace(tzinfo=None) if naive else value

    return [
        ("ada@example.com", 1001, "SUBSCRIBED", moment("2026-03-10T08:00:00+00:00")),
        ("ada@example.com", 1001, "UNSUBSCRIBED", moment("2026-03-10T09:00:00+00:00")),  # ada's latest
        ("bob@example.com", 1001, "SUBSCRIBED", moment("2026-03-11T01:30:00+02:00")),   # 23:30Z: in
        ("cy@example.com", 1001, "SUBSCRIBED", moment("2026-03-11T00:00:00+00:00")),    # the end: out
        ("dee@example.com", 1001, "SUBSCRIBED", moment("2026-03-09T23:59:59+00:00")),   # before: out
        ("eve@example.com", 1002, "SUBSCRIBED", moment("2026-03-10T12:00:00+00:00")),
        ("eve@example.com", 1002, "UNSUBSCRIBED", moment("2026-03-14T12:00:00+00:00")),  # later: eve left
        ("fay@example.com", None, "UNSUBSCRIBE_ALL", moment("2026-03-10T13:00:00+00:00")),
        ("gus@example.com", 1001, "SUBSCRIBED", None),                                    # unplaceable
        ("hal@example.com", 1002, "SUBSCRIBED", moment("2026-03-10T14:00:00+00:00")),
        (" HAL@Example.com", None, "UNSUBSCRIBE_ALL", moment("2026-03-20T14:00:00+00:00")),  # later, all
    ]


EXPECTED = {"ada@example.com/1001": "UNSUBSCRIBED", "bob@example.com/1001": "SUBSCRIBED",
            "fay@example.com/None": "UNSUBSCRIBE_ALL"}


@pytest.mark.parametrize("column", ["TIMESTAMPTZ", "TIMESTAMP"])
def test_postgres_extract_with_aware_and_naive_timestamp_columns(postgres, tmp_path, column, monkeypatch):
    # However few the later rows, ask about the interval's contacts (the path a backfill takes).
    monkeypatch.setattr(consent, "PROBE_ROWS_PER_CONTACT", 0)
    with consent_table(postgres, column, day_rows(naive=column == "TIMESTAMP")) as table:
        run = tmp_path / "run"
        counts = extract("pg_source", table, run)
        assert staged(run) == EXPECTED
        assert (counts["in_interval"], counts["superseded"], counts["superseded_later"], counts["unplaceable"]) == (
            6, 1, 2, 1)
        # The check is pushed down: one row per (email, subscription, kind) of the interval's contacts
        # from a day before the interval's end on (the slack for naive columns), not every later event:
        # cy, who has no event in the interval, is not read.
        assert counts["later_rows_read"] == 6


def test_postgres_a_later_event_counts_whatever_whitespace_or_case_its_email_carries(postgres, tmp_path):
    rows = [("ada@example.com\t", 1001, "SUBSCRIBED", "2026-03-10T10:00:00Z"),
            ("ADA@example.com", 1001, "UNSUBSCRIBED", "2026-03-12T10:00:00Z")]
    with consent_table(postgres, "TIMESTAMPTZ", rows) as table:
        counts = extract("pg_source", table, tmp_path / "run")
    assert (counts["in_interval"], counts["superseded_later"], counts["staged"]) == (1, 1, 0)


def test_mariadb_extract_with_datetime_columns(mariadb, tmp_path):
    with consent_table(mariadb, "DATETIME(6)", day_rows(naive=True), text="VARCHAR(254)") as table:
        run = tmp_path / "run"
        counts = extract("mariadb_source", table, run)
        assert staged(run) == EXPECTED
        assert (counts["in_interval"], counts["superseded_later"], counts["unplaceable"]) == (6, 2, 1)
        assert counts["later_rows_read"] == 6


# Emails whose case, whitespace and non-ASCII letters differ, some joined by Python's key: Turkish
# dotted I, the Kelvin sign, the long s (which MariaDB's case-insensitive regexes would take for an
# s), a no-break space, a zero-width space, CJK.
TRICKY_EMAILS = ["ada@example.com", " \u00c4DA@Example.COM\t", "\u0130NGA@example.com", "\u212aim@example.com",
                 "\u017fam@x.org", "bob+news@Example.com\u00a0", "\u674e@\u4f8b\u5b50.\u4e2d\u56fd",
                 "\u00dcn\u00efc\u00f6d\u00e9.\u03a9@EXAMPLE.org", "x\u200by@z.io", "KIKI_k@x.io"]


@pytest.mark.parametrize(("server", "text"), [
    ("postgres", "TEXT"), ("mariadb", "VARCHAR(254) CHARACTER SET utf8mb4"),
    # Bytes (a VARBINARY column, a view that decrypts): MariaDB neither lower-cases nor matches
    # characters in them unless converted.
    ("mariadb", "VARBINARY(1020)"),
])
def test_the_servers_coarse_email_key_is_the_one_python_probes_with(request, server, text):
    conn = request.getfixturevalue(server)
    dialect = "postgres" if server == "postgres" else "mysql"
    table = table_name("coarse_keys")
    execute(conn, f"CREATE TABLE {table} (n INT, email {text})", rows=list(enumerate(TRICKY_EMAILS)),
            insert=f"INSERT INTO {table} VALUES (%s, %s)")
    try:
        cursor = conn.cursor()
        cursor.execute(f"SELECT n, {consent.COARSE_EMAIL_KEY_SQL[dialect]} FROM {table} ORDER BY n")
        keys = [key for _, key in cursor.fetchall()]
        cursor.close()
    finally:
        execute(conn, f"DROP TABLE {table}")
    assert keys == [consent.coarse_email_key(email) for email in TRICKY_EMAILS]
    assert keys[1] == "da@example.com" and keys[4] == "am@x.org"


@pytest.mark.parametrize("server", ["postgres", "mariadb"])
def test_a_backfill_reads_the_later_events_of_its_own_contacts_only(request, tmp_path, server, monkeypatch):
    conn = request.getfixturevalue(server)
    naive = server == "mariadb"
    monkeypatch.setattr(consent, "PROBE_ROWS_PER_CONTACT", 0)  # asked about its contacts, however few the rows

    def at(moment: datetime):
        return moment.replace(tzinfo=None) if naive else moment

    rows = [
        ("\u00e4dA@example.com", 1001, "SUBSCRIBED", at(START + timedelta(hours=10))),
        # The same key five days later, in another case and with whitespace: it decides, not the interval.
        (" \u00c4DA@Example.com\t", 1001, "UNSUBSCRIBED", at(END + timedelta(days=5))),
        ("bo@example.com", 1001, "SUBSCRIBED", at(START + timedelta(hours=11))),
        # Fifty later events of contacts the interval does not have: the check does not read them.
        *((f"other{i}@example.com", 1001, "SUBSCRIBED", at(END + timedelta(hours=i))) for i in range(50)),
    ]
    timestamp = "DATETIME(6)" if naive else "TIMESTAMPTZ"
    text = "VARCHAR(254) CHARACTER SET utf8mb4" if naive else "TEXT"
    with consent_table(conn, timestamp, rows, text=text) as table:
        run = tmp_path / "run"
        counts = extract("mariadb_source" if naive else "pg_source", table, run)
    assert staged(run) == {"bo@example.com/1001": "SUBSCRIBED"}
    assert (counts["in_interval"], counts["superseded_later"], counts["staged"]) == (2, 1, 1)
    # One row per (email as stored, subscription, kind) of the interval's two contacts, the interval's
    # own rows included (the day of slack for naive columns).
    assert counts["later_rows_read"] == 3


def test_mariadb_probes_the_readme_s_generated_key_column_and_never_one_generated_otherwise(
    mariadb, tmp_path, caplog, monkeypatch
):
    naive_start, naive_end = START.replace(tzinfo=None), END.replace(tzinfo=None)
    rows = [
        ("\u00e4dA@example.com", 1001, "SUBSCRIBED", naive_start + timedelta(hours=10)),
        (" \u00c4DA@Example.com\t", 1001, "UNSUBSCRIBED", naive_end + timedelta(days=5)),  # decides äda
        ("bo@example.com", 1001, "SUBSCRIBED", naive_start + timedelta(hours=11)),
        *((f"other{i}@example.com", 1001, "SUBSCRIBED", naive_end + timedelta(hours=i)) for i in range(50)),
    ]

    def key_column(expression: str, length: int = 254) -> str:
        return (f"ADD COLUMN {consent.COARSE_KEY_COLUMN} VARCHAR({length}) CHARACTER SET utf8mb4 AS ({expression}) "
                f"VIRTUAL, ADD INDEX coarse_key_at ({consent.COARSE_KEY_COLUMN}, occurred_at)")

    def drop_key_column() -> None:
        execute(mariadb, f"ALTER TABLE {table} DROP INDEX coarse_key_at, DROP COLUMN {consent.COARSE_KEY_COLUMN}")

    def run(name: str) -> dict:
        caplog.clear()
        with caplog.at_level("INFO", logger="hubspot_provider.consent"):
            counts = extract("mariadb_source", table, tmp_path / name)
        assert staged(tmp_path / name) == {"bo@example.com/1001": "SUBSCRIBED"}
        return counts

    with consent_table(mariadb, "DATETIME(6)", rows, text="VARCHAR(254) CHARACTER SET utf8mb4") as table:
        execute(mariadb, f"ALTER TABLE {table} {key_column(consent.COARSE_EMAIL_KEY_SQL['mysql'])}")
        # 53 later rows, more than ten per contact of the interval: each contact is looked up in the index.
        probed = run("probed")
        assert "2 contacts of the interval, probed through the index on email_coarse_key (coarse_key_at" in caplog.text
        assert probed["later_rows_read"] == 3  # the two contacts' rows only, as without the column
        with monkeypatch.context() as patch:
            patch.setattr(consent, "PROBE_ROWS_PER_CONTACT", 100)
            few = run("few")  # 53 ≤ 200: one grouped scan of every later key costs less
        assert "later rows, read in one scan" in caplog.text and few["later_rows_read"] == 53
        # A column of that name computed otherwise (cut to its first three characters: probed with
        # 'da@example.com', it would miss äda's later opt-out), or too short for the emails, is not trusted.
        for expression, length in ((f"left({consent.COARSE_EMAIL_KEY_SQL['mysql']}, 3)", 254),
                                   (consent.COARSE_EMAIL_KEY_SQL["mysql"], 20)):
            drop_key_column()
            execute(mariadb, f"ALTER TABLE {table} {key_column(expression, length)}")
            other = run(f"other-{length}")
            assert "is not generated as the coarse email key, as long as the email column" in caplog.text
            assert "matched during one scan of the source's later rows" in caplog.text
            assert other["later_rows_read"] == 3 and other["superseded_later"] == 1


def test_mariadb_never_credits_one_contacts_later_event_to_another_its_collation_holds_equal(
    mariadb, tmp_path, monkeypatch
):
    # utf8mb4_general_ci holds 'ada@' and 'äda@' equal; Python's key (and HubSpot) does not.
    rows = [("ada@example.com", 1001, "SUBSCRIBED", START.replace(tzinfo=None) + timedelta(hours=9)),
            ("\u00e4da@example.com", 1001, "SUBSCRIBED", START.replace(tzinfo=None) + timedelta(hours=10)),
            ("\u00e4da@example.com", 1001, "UNSUBSCRIBED", END.replace(tzinfo=None) + timedelta(days=5))]
    text = "VARCHAR(254) CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci"
    with consent_table(mariadb, "DATETIME(6)", rows, text=text) as table:
        run = tmp_path / "run"
        counts = extract("mariadb_source", table, run)
    # äda's later opt-out decides äda; ada's event of the interval is staged.
    assert staged(run) == {"ada@example.com/1001": "SUBSCRIBED"}
    assert (counts["superseded_later"], counts["staged"]) == (1, 1)


@pytest.mark.parametrize("server", ["postgres", "mariadb"])
def test_the_replay_leaves_out_dead_letters_the_source_has_overtaken_on_a_real_server(
    request, tmp_path, server, monkeypatch
):
    conn = request.getfixturevalue(server)
    naive = server == "mariadb"
    monkeypatch.setattr(consent, "PROBE_ROWS_PER_CONTACT", 0)  # asked about its contacts, however few the rows

    def at(moment: datetime):
        return moment.replace(tzinfo=None) if naive else moment

    def letter(email: str, occurred_at: datetime) -> str:
        return json.dumps({
            "input": {"subscriberIdString": email, "subscriptionId": 1001, "statusState": "SUBSCRIBED",
                      "channel": "EMAIL"},
            "category": "NO_RESULT", "message": "no answer", "retryable": True,
            "occurredAt": occurred_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        })

    folder = tmp_path / "run" / "dead-letters"
    folder.mkdir(parents=True)
    (folder / "part-submit.jsonl").write_text("\n".join([
        letter("\u00e4da@example.com", START + timedelta(hours=10)),  # opted out later: not replayed
        letter("ada@example.com", START + timedelta(hours=10)),        # another contact: replayed
        letter("bo@example.com", START + timedelta(hours=11)),         # nothing since: replayed
    ]) + "\n")
    rows = [(" \u00c4DA@Example.com", 1001, "UNSUBSCRIBED", at(END + timedelta(days=2))),
            *((f"other{i}@example.com", 1001, "SUBSCRIBED", at(END + timedelta(hours=i))) for i in range(20))]
    text = "VARCHAR(254) CHARACTER SET utf8mb4" if naive else "TEXT"
    with consent_table(conn, "DATETIME(6)" if naive else "TIMESTAMPTZ", rows, text=text) as table:
        prepared = consent.prepare_replay(folder.as_uri(), run_id="manual__replay",
                                          source_conn_id="mariadb_source" if naive else "pg_source",
                                          source_table=table)
    assert (prepared["selected"], prepared["superseded_later"]) == (2, 1)
    replayed = [json.loads(line)["input"]["subscriberIdString"]
                for part in sorted(Path(prepared["input_uri"].removeprefix("file://")).rglob("*.jsonl"))
                for line in part.read_text().splitlines()]
    assert sorted(replayed) == ["ada@example.com", "bo@example.com"]


def test_postgres_reads_few_later_rows_in_one_scan_and_many_by_the_interval_s_contacts(postgres, tmp_path, caplog):
    # Two contacts in the interval; 50 later events of other contacts, then 5 more days of them.
    rows = [("ada@example.com", 1001, "SUBSCRIBED", START + timedelta(hours=10)),
            ("bo@example.com", 1001, "SUBSCRIBED", START + timedelta(hours=11)),
            *((f"other{i}@example.com", 1001, "SUBSCRIBED", END + timedelta(minutes=i)) for i in range(15))]
    with consent_table(postgres, "TIMESTAMPTZ", rows) as table:
        execute(postgres, f"ANALYZE {table}")  # the planner's estimate is the table's 17 rows
        with caplog.at_level("INFO", logger="hubspot_provider.consent"):
            few = extract("pg_source", table, tmp_path / "few")
        # 17 later rows ≤ 10 per contact: every later key in one grouped scan.
        assert "2 contacts of the interval, about 17 later rows, read in one scan" in caplog.text  # ANALYZE'd: exact
        assert few["later_rows_read"] == 17
        execute(postgres, f"INSERT INTO {table} SELECT 'more' || i || '@example.com', 1001, 'SUBSCRIBED', NULL, NULL, "
                f"TIMESTAMPTZ '2026-03-12 00:00:00+00' + i * INTERVAL '1 minute' FROM generate_series(1, 200) AS i",
                f"ANALYZE {table}")
        caplog.clear()
        with caplog.at_level("INFO", logger="hubspot_provider.consent"):
            many = extract("pg_source", table, tmp_path / "many")
    # 217 later rows for 2 contacts, and no index on the coarse key here: the contacts are matched
    # during one scan, and only theirs come back.
    assert "2 contacts of the interval, matched during one scan of the source's later rows (about 217;" in caplog.text
    assert many["later_rows_read"] == 2
    assert (few["staged"], many["staged"]) == (2, 2)


def test_postgres_extract_streams_a_million_rows_through_a_server_side_cursor_in_flat_memory(postgres, tmp_path):
    table = table_name("consent_million")
    execute(
        postgres,
        f"CREATE UNLOGGED TABLE {table} (email TEXT, subscription_id BIGINT, status TEXT, legal_basis TEXT, "
        "legal_basis_explanation TEXT, occurred_at TIMESTAMPTZ)",
        # 1,000,000 events of the interval over 100,000 keys, made by the server.
        f"INSERT INTO {table} SELECT 'c' || (i % 100000) || '@example.com', 1001 + (i % 2), "
        "(ARRAY['SUBSCRIBED','UNSUBSCRIBED','NOT_SPECIFIED'])[1 + i % 3], NULL, NULL, "
        "TIMESTAMPTZ '2026-03-10 00:00:00+00' + (i % 86400) * INTERVAL '1 second' "
        "FROM generate_series(1, 1000000) AS i",
    )
    seen: list[str] = []
    import hubspot_provider.consent as module

    original = module._open_cursor

    def spy(conn, conn_type):
        cursor = original(conn, conn_type)
        seen.append(type(cursor).__name__ + (" named" if getattr(cursor, "name", None) else ""))
        return cursor

    module._open_cursor = spy
    try:
        tracemalloc.start()
        counts = extract("pg_source", table, tmp_path / "run", later_events_supersede=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        module._open_cursor = original
        execute(postgres, f"DROP TABLE {table}")
    assert counts["rows_read"] == counts["in_interval"] == 1_000_000
    assert counts["staged"] == 100_000 and counts["superseded"] == 900_000
    assert seen and all(kind.endswith("named") for kind in seen)  # server-side: rows arrive in chunks
    # Flat: the rows are never all in memory (a million rows as tuples would take hundreds of MiB).
    assert peak < 64 * 2**20, f"peak Python memory {peak / 2**20:.1f} MiB"


def ledger_run(emulator_factory, hubspot_conn, tmp_path, conn_id: str) -> dict:
    emulator = emulator_factory()
    hubspot_conn(emulator, "hubspot_real_db")
    inputs = [{"input": {"subscriberIdString": f"u{i}@example.com", "subscriptionId": 1001,
                         "statusState": "SUBSCRIBED"}, "occurredAt": "2026-03-10T10:00:00Z"} for i in range(5)]
    inputs.append({"input": {"subscriberIdString": "all@example.com", "statusState": "UNSUBSCRIBE_ALL"},
                   "occurredAt": "2026-03-10T11:00:00Z"})
    op = HubSpotWriteStatusesOperator(
        task_id="submit", inputs=inputs, hubspot_conn_id="hubspot_real_db", audit_conn_id=conn_id,
        audit_table=tmp_path.name, ledger_uri=(tmp_path / "audit").as_uri(), max_concurrency=1,
    )
    summary = op.execute(context={"run_id": "manual__real_db"})
    # This provider opts u0 out now; another integration opts u9 out through the same public API.
    HubSpotWriteStatusesOperator(
        task_id="submit", hubspot_conn_id="hubspot_real_db", audit_conn_id=conn_id, audit_table=tmp_path.name,
        ledger_uri=(tmp_path / "audit1").as_uri(), max_concurrency=1,
        inputs=[{"input": {"subscriberIdString": "u0@example.com", "subscriptionId": 1001,
                           "statusState": "UNSUBSCRIBED"}, "occurredAt": "2026-03-10T11:00:00Z"}],
    ).execute(context={"run_id": "manual__real_db_1"})
    emulator.hubspot_side_change("u9@example.com", 1001, "UNSUBSCRIBED", source="Public status API")
    # Opt-ins that happened before both: the ledger explains u0's status (this provider's own write:
    # it never blocks an event) and not u9's (a change made elsewhere, newer than the event: it wins).
    again = HubSpotWriteStatusesOperator(
        task_id="submit", hubspot_conn_id="hubspot_real_db", audit_conn_id=conn_id, audit_table=tmp_path.name,
        ledger_uri=(tmp_path / "audit2").as_uri(), max_concurrency=1,
        inputs=[{"input": {"subscriberIdString": "u0@example.com", "subscriptionId": 1001,
                           "statusState": "SUBSCRIBED"}, "occurredAt": "2026-03-10T09:00:00Z"},
                {"input": {"subscriberIdString": "u9@example.com", "subscriptionId": 1001,
                           "statusState": "SUBSCRIBED"}, "occurredAt": "2026-03-10T09:00:00Z"}],
    ).execute(context={"run_id": "manual__real_db_2"})
    return {"summary": summary, "again": again}


@pytest.mark.parametrize("engine", ["postgres", "mariadb"])
def test_the_sql_ledger_on_a_real_server(engine, request, hubspot_emulator_factory, hubspot_conn, tmp_path):
    conn = request.getfixturevalue(engine)
    conn_id = {"postgres": "pg_source", "mariadb": "mariadb_source"}[engine]
    table = table_name("ledger")
    tmp_path = tmp_path.parent / table
    tmp_path.mkdir()
    execute(conn, LEDGER_DDL.replace("hubspot_consent_ledger", table))
    try:
        done = ledger_run(hubspot_emulator_factory, hubspot_conn, tmp_path, conn_id)
        cursor = conn.cursor()
        cursor.execute(f"SELECT run_id, subscriber_id_string, subscription_id, status_state, outcome, "
                       f"confirmed_status, correlation_id, retryable FROM {table} ORDER BY run_id, subscriber_id_string")
        rows = cursor.fetchall()
        cursor.close()
    finally:
        execute(conn, f"DROP TABLE {table}")
    assert done["summary"]["ledger_records"] == 6 and done["summary"]["succeeded"] == 6
    first = [r for r in rows if r[0] == "manual__real_db"]
    assert [r[4] for r in rows if r[0] == "manual__real_db_1"] == ["SUCCEEDED"]
    assert len(first) == 6 and all(r[4] == "SUCCEEDED" and r[6] for r in first)
    assert [r[2] for r in first if r[1] == "all@example.com"] == [None]  # an opt-out from all: no subscription
    second = {r[1]: r[4] for r in rows if r[0] == "manual__real_db_2"}
    assert second == {"u0@example.com": "SUCCEEDED", "u9@example.com": "WITHHELD"}
    assert done["again"]["withheld_by_category"] == {"NEWER_OPT_OUT_IN_HUBSPOT": 1}
