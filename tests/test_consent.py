"""Extract, validate and dead-letter logic of the consent sync, against a real SQLite source."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from airflow.sdk.exceptions import AirflowFailException
from consent_days import write_consent_table

from hubspot_provider import consent
from hubspot_provider.notifications import DeadLetterNotifier

START = datetime(2026, 3, 10, tzinfo=timezone.utc)
END = START + timedelta(days=1)
COLUMNS = consent.SOURCE_COLUMNS


def event(email: str, occurred_at: object, status: str = "SUBSCRIBED", subscription_id: object = 1001,
          legal_basis: str | None = None, explanation: str | None = None) -> tuple:
    return (email, subscription_id, status, legal_basis, explanation, occurred_at)


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def source(tmp_path, monkeypatch):
    """Write rows to a SQLite source reachable as connection ``hubspot_consent_source``."""
    db = tmp_path / "consent.db"
    monkeypatch.setenv(
        "AIRFLOW_CONN_HUBSPOT_CONSENT_SOURCE", json.dumps({"conn_type": "sqlite", "host": str(db)})
    )

    def write(rows: list[tuple]) -> Path:
        return write_consent_table(db, rows)

    return write


@pytest.fixture
def run(tmp_path):
    return tmp_path / "storage" / "run-1"


def extract(run: Path, **kwargs) -> dict:
    kwargs.setdefault("source_table", "consent_events")
    return consent.extract_consent_events(
        source_conn_id="hubspot_consent_source",
        data_interval_start=kwargs.pop("start", START),
        data_interval_end=kwargs.pop("end", END),
        run_uri=run.as_uri(),
        **kwargs,
    )


def staged(run: Path) -> list[dict]:
    return read_jsonl(run / "staged" / "events.jsonl")


# --------------------------------------------------------------------------- small pieces


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-03-10 08:15:00", datetime(2026, 3, 10, 8, 15, tzinfo=timezone.utc)),
        ("2026-03-10T08:15:00Z", datetime(2026, 3, 10, 8, 15, tzinfo=timezone.utc)),
        ("2026-03-10T08:15:00.250+02:00", datetime(2026, 3, 10, 6, 15, 0, 250000, tzinfo=timezone.utc)),
        ("2026-03-09T22:00:00-05:30", datetime(2026, 3, 10, 3, 30, tzinfo=timezone.utc)),
        (datetime(2026, 3, 10, 8), datetime(2026, 3, 10, 8, tzinfo=timezone.utc)),
        (
            datetime(2026, 3, 10, 8, tzinfo=timezone(timedelta(hours=-1))),
            datetime(2026, 3, 10, 9, tzinfo=timezone.utc),
        ),
        ("yesterday", None),
        ("2026-03-10 25:00:00", None),
        ("10/03/2026 10:00", None),
        ("", None),
        (None, None),
        (1741600000, None),
    ],
)
def test_parse_occurred_at_gives_aware_utc_or_none(text, expected):
    assert consent.parse_occurred_at(text) == expected


def test_source_table_must_be_a_plain_identifier():
    assert consent.check_identifier("consent_events") == "consent_events"
    assert consent.check_identifier("analytics.consent_events") == "analytics.consent_events"
    for bad in ("consent_events; DROP TABLE x", "1table", "a..b", "a.", "events e", "", '"quoted"', None):
        with pytest.raises(ValueError, match="plain SQL identifier"):
            consent.check_identifier(bad)


def test_run_folder_sanitises_the_run_id(tmp_path):
    folder = consent.run_folder(tmp_path.as_uri(), "manual__2026-03-11T00:00:00+00:00")
    assert folder.name == "manual__2026-03-11T00_00_00_00_00"
    assert str(folder.parent) == tmp_path.as_uri()
    assert consent.safe_run_id("../../etc") == "etc"


def test_default_storage_is_under_airflow_home(monkeypatch, tmp_path):
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))
    assert consent.default_storage_uri() == (tmp_path / "hubspot_consent").as_uri()
    assert str(consent.run_folder(None, "r1")) == (tmp_path / "hubspot_consent" / "r1").as_uri()


# --------------------------------------------------------------------------- extract


def test_extract_keeps_exactly_the_interval_with_offsets_and_naive_utc_text(source, run):
    source([
        event("start@example.com", "2026-03-10 00:00:00"),              # naive = UTC: first instant, in
        event("before@example.com", "2026-03-09 23:59:59"),             # out
        event("last@example.com", "2026-03-10T23:59:59.999999Z"),       # in
        event("end@example.com", "2026-03-11 00:00:00"),                # the end is exclusive: out
        event("east-in@example.com", "2026-03-11T00:30:00+01:00"),      # 23:30Z on the 10th: in
        event("east-out@example.com", "2026-03-10T00:30:00+01:00"),     # 23:30Z on the 9th: out
        event("west-in@example.com", "2026-03-09T23:30:00-01:00"),      # 00:30Z on the 10th: in
        event("west-out@example.com", "2026-03-10T23:30:00-01:00"),     # 00:30Z on the 11th: out
        event("kiribati@example.com", "2026-03-11T09:00:00+14:00"),     # 19:00Z on the 10th: in
        event("samoa@example.com", "2026-03-09T14:00:00-10:00"),        # 00:00Z on the 10th: in
        event("old@example.com", "2026-02-01 10:00:00"),                # far away: not even read
    ])
    counts = extract(run)
    assert {e["input"]["subscriberIdString"] for e in staged(run)} == {
        "start@example.com", "last@example.com", "east-in@example.com", "west-in@example.com",
        "kiribati@example.com", "samoa@example.com",
    }
    assert counts["rows_read"] == 10  # the SQL window left out the far-away row
    assert (counts["in_interval"], counts["outside_interval"], counts["staged"]) == (6, 4, 6)
    assert counts["unplaceable"] == 0
    assert staged(run)[0] == {
        "input": {"subscriberIdString": "start@example.com", "subscriptionId": 1001,
                  "statusState": "SUBSCRIBED", "channel": "EMAIL"},
        "occurredAt": "2026-03-10T00:00:00Z",
    }
    by_email = {e["input"]["subscriberIdString"]: e["occurredAt"] for e in staged(run)}
    assert by_email["east-in@example.com"] == "2026-03-10T23:30:00Z"
    assert counts["staged_uri"] == (run / "staged" / "events.jsonl").as_uri()
    assert counts["data_interval_start"] == START.isoformat()
    json.dumps(counts)  # XCom-safe: counts and paths only
    assert "@" not in json.dumps(counts).replace(counts["run_uri"], "")


def test_extract_keeps_the_latest_event_per_key_and_the_later_row_on_ties(source, run):
    source([
        event("Ada@Example.com", "2026-03-10 10:00:00", "SUBSCRIBED"),
        event("ada@example.com", "2026-03-10 12:00:00", "UNSUBSCRIBED", legal_basis="NON_GDPR"),
        event(" ada@example.com ", "2026-03-10 11:00:00", "SUBSCRIBED"),  # older, though read later
        event("ada@example.com", "2026-03-10 09:00:00", "SUBSCRIBED", subscription_id=1002),  # other key
        event("tie@example.com", "2026-03-10 09:00:00", "SUBSCRIBED"),
        event("tie@example.com", "2026-03-10T10:00:00+01:00", "UNSUBSCRIBED"),  # same instant, later row
        event("ada@example.com", "2026-03-11 08:00:00", "SUBSCRIBED"),  # next day: not this interval's
    ])
    counts = extract(run, later_events_supersede=False)
    latest = {}
    for line in staged(run):
        latest[(line["input"]["subscriberIdString"].strip().lower(), line["input"]["subscriptionId"])] = line
    assert set(latest) == {("ada@example.com", 1001), ("ada@example.com", 1002), ("tie@example.com", 1001)}
    assert latest[("ada@example.com", 1001)]["input"] == {
        "subscriberIdString": "ada@example.com", "subscriptionId": 1001, "statusState": "UNSUBSCRIBED",
        "channel": "EMAIL", "legalBasis": "NON_GDPR",
    }
    assert latest[("tie@example.com", 1001)]["input"]["statusState"] == "UNSUBSCRIBED"
    assert (counts["in_interval"], counts["superseded"], counts["staged"]) == (6, 3, 3)


def test_keys_the_source_changed_after_the_interval_are_left_to_their_later_event(source, run):
    rows = [
        event("ada@example.com", "2026-03-10 10:00:00", "SUBSCRIBED"),
        event("ada@example.com", "2026-03-12T01:00:00+02:00", "UNSUBSCRIBED"),   # later: ada is not synced
        event("bob@example.com", "2026-03-10 10:00:00", "SUBSCRIBED"),
        event("bob@example.com", "2026-03-12 10:00:00", "UNSUBSCRIBED", subscription_id=1002),  # other key
        event("cy@example.com", "2026-03-10 22:00:00", "SUBSCRIBED"),
        event("cy@example.com", "2026-03-11T00:30:00+01:00", "UNSUBSCRIBED"),    # 23:30Z on the 10th: in
        event("dee@example.com", "2026-03-10 10:00:00", "SUBSCRIBED"),
        event("dee@example.com", "2026-03-11 00:00:00", "UNSUBSCRIBED"),         # the end itself is later
        event("eve@example.com", "2026-03-10 10:00:00", "SUBSCRIBED"),
        event("eve@example.com", "soon", "UNSUBSCRIBED"),                        # no time: cannot be later
        event("frank@example.com", "2026-03-10 10:00:00", "SUBSCRIBED"),
        event(" FRANK@Example.com", "2026-03-11 09:00:00", "UNSUBSCRIBED"),      # same key, other case
        event("gus@example.com", "2026-03-10 10:00:00", "UNSUBSCRIBED"),
        event("gus@example.com", "2026-09-01 10:00:00", "SUBSCRIBED"),           # months later still counts
        event("hal@example.com", "2026-03-09 10:00:00", "UNSUBSCRIBED"),         # earlier day: irrelevant
        event("hal@example.com", "2026-03-10 10:00:00", "SUBSCRIBED"),
    ]
    source(rows)
    counts = extract(run)
    assert {e["input"]["subscriberIdString"]: e["input"]["statusState"] for e in staged(run)} == {
        "bob@example.com": "SUBSCRIBED", "cy@example.com": "UNSUBSCRIBED", "eve@example.com": "SUBSCRIBED",
        "hal@example.com": "SUBSCRIBED",
    }
    assert (counts["in_interval"], counts["superseded"], counts["superseded_later"], counts["staged"]) == (
        9, 1, 4, 4
    )
    assert counts["unplaceable"] == 1  # eve's "soon" is listed by this run, as by every run

    everything = extract(run, later_events_supersede=False)
    assert (everything["superseded_later"], everything["staged"]) == (0, 8)


def test_an_opt_out_from_all_email_is_staged_first_and_supersedes_the_contacts_earlier_events(source, run):
    rows = [
        event("ada@example.com", "2026-03-10 09:00:00", "SUBSCRIBED", 1001),
        event("ada@example.com", "2026-03-10 12:00:00", "UNSUBSCRIBE_ALL", None),  # NULL subscription_id
        event("ADA@example.com", "2026-03-10 12:00:00", "SUBSCRIBED", 1003),   # same instant: the opt-out wins
        event("ada@example.com", "2026-03-10 15:00:00", "SUBSCRIBED", 1002),   # later: kept, after the opt-out
        event("bob@example.com", "2026-03-10 08:00:00", "UNSUBSCRIBE_ALL", 1001),  # an id is ignored
        event("bob@example.com", "2026-03-10 10:00:00", "UNSUBSCRIBE_ALL", None),  # the later one is kept
        event("cy@example.com", "2026-03-10 10:00:00", "SUBSCRIBED", 1001),
        event("cy@example.com", "2026-03-12 10:00:00", "UNSUBSCRIBE_ALL", None),  # after the interval
    ]
    source(rows)
    counts = extract(run)
    lines = [(e["input"]["subscriberIdString"], e["input"]["statusState"], e["input"].get("subscriptionId"))
             for e in staged(run)]
    assert lines == [
        ("ada@example.com", "UNSUBSCRIBE_ALL", None),
        ("bob@example.com", "UNSUBSCRIBE_ALL", None),
        ("ada@example.com", "SUBSCRIBED", 1002),
    ]
    assert (counts["in_interval"], counts["staged"], counts["superseded"], counts["superseded_later"]) == (7, 3, 3, 1)
    named = {(e["input"]["subscriberIdString"], e["input"].get("subscriptionId")): e["message"]
             for e in read_jsonl(run / "superseded" / "part-extract.jsonl")}
    assert "opt-out from all email at 2026-03-10T12:00:00Z" in named[("ada@example.com", 1001)]
    assert "opt-out from all email" in named[("ADA@example.com", 1003)]
    assert "later event of the same key at 2026-03-10T10:00:00Z" in named[("bob@example.com", None)]
    assert "after this run's interval" in named[("cy@example.com", 1001)]
    # The validate step checks both kinds with the one validation.
    checked = consent.validate_staged_events(run.as_uri())
    assert (checked["valid"], checked["invalid"]) == (3, 0)


def test_the_later_event_check_is_pushed_down_where_timestamps_are_typed():
    kind = "CASE WHEN status = 'UNSUBSCRIBE_ALL' THEN 'UNSUBSCRIBE_ALL' ELSE 'LATER' END"
    # PostgreSQL and MariaDB/MySQL: only the interval's contacts, by their coarse key, which the
    # query spells exactly as the README's index does.
    sql, parameters = consent._later_query("crm.consent_events", "postgres", "%s", END, ["da@example.com", "b@x"])
    assert sql == (
        f"SELECT email, subscription_id, {kind}, max(occurred_at) FROM crm.consent_events WHERE "
        "lower(regexp_replace(email, '[^A-HJLM-Za-hjlm-z0-9@._+-]', '', 'g')) = ANY(%s) AND occurred_at >= %s "
        f"GROUP BY email, subscription_id, {kind}")
    assert parameters == [["da@example.com", "b@x"], END - timedelta(days=1)]
    sql, parameters = consent._later_query("consent_events", "mysql", "%s", END, ["da@example.com", "b@x"])
    assert sql == (
        f"SELECT max(email), subscription_id, {kind}, max(occurred_at) FROM consent_events WHERE "
        "lower(regexp_replace(convert(email using utf8mb4), '(?-i)[^A-HJLM-Za-hjlm-z0-9@._+-]', '')) IN (%s, %s) "
        f"AND occurred_at >= %s GROUP BY CAST(email AS BINARY), subscription_id, {kind}")
    assert parameters == ["da@example.com", "b@x", END - timedelta(days=1)]
    assert consent._probes_contacts("postgres") and consent._probes_contacts("mysql")
    # Other typed engines: the latest later event per key of every contact.
    assert not consent._probes_contacts("snowflake")
    sql, parameters = consent._later_query("crm.consent_events", "snowflake", "%s", END)
    assert sql == (
        f"SELECT email, subscription_id, {kind}, max(occurred_at) FROM crm.consent_events WHERE occurred_at >= %s "
        f"GROUP BY email, subscription_id, {kind}")
    assert parameters == [END - timedelta(days=1)]
    # SQLite's text timestamps carry varying offsets: the latest text is not the latest instant.
    sql, parameters = consent._later_query("consent_events", "sqlite", "?", END)
    assert sql.endswith("WHERE occurred_at >= ?") and parameters == ["2026-03-10"]
    assert not consent._probes_contacts("sqlite")


def test_the_contacts_are_asked_about_in_chunks_of_bounded_count_and_text():
    keys = [f"c{i}@example.com" for i in range(10)]
    assert list(consent._chunks(keys, 4, 10_000)) == [keys[:4], keys[4:8], keys[8:]]
    # 18 bytes of text a key here (14, and the quotes and a comma): three fit in 60 bytes.
    assert list(consent._chunks(keys[:7], 100, 60)) == [keys[:3], keys[3:6], keys[6:7]]
    assert list(consent._chunks(["x" * 100], 100, 10)) == [["x" * 100]]  # a key longer than the bound: alone
    assert list(consent._chunks([], 4, 10)) == []


def test_the_coarse_email_key_never_separates_two_emails_pythons_key_joins():
    # What makes the probe safe: no character outside the kept set lower-cases (in Python) to one
    # inside it, so the coarse key of an email is the coarse key of its Python key. Checked over
    # every code point, not a sample.
    kept = set("ABCDEFGHJLMNOPQRSTUVWXYZabcdefghjlmnopqrstuvwxyz0123456789@._+-")
    assert {c for c in map(chr, range(0x110000)) if consent.coarse_email_key(c)} == kept
    leaks = [hex(i) for i in range(0x110000) if chr(i) not in kept and any(c in kept for c in chr(i).lower())]
    assert leaks == []
    for email in [" ÄDA@Example.COM\t", "\u0130NGA@example.com", "\u212aIM@example.com", "\u017fam@x.org",
                  "bob+news@Example.com\u00a0", "\u674e@\u4f8b\u5b50.\u4e2d\u56fd"]:
        assert consent.coarse_email_key(email) == consent.coarse_email_key(email.strip().lower()), email
    assert consent.coarse_email_key(" ÄDA@Example.COM\t") == "da@example.com"


def test_unplaceable_rows_are_listed_by_every_run_never_dropped(source, run):
    bad = {
        "garbage@example.com": "yesterday",
        "null@example.com": None,
        "hour@example.com": "2026-03-10 25:00:00",  # the right day, an impossible hour
        "us-style@example.com": "10/03/2026 10:00",
        "feb30@example.com": "2026-02-30 10:00:00",  # looks like a date: no run's window held it before
        "month13@example.com": "2026-13-45 10:00:00",
        "year0@example.com": "0000-03-10 10:00:00",
        "blank@example.com": "",
    }
    source([event("ok@example.com", "2026-03-10 10:00:00")] + [event(e, t) for e, t in bad.items()])
    counts = extract(run)
    letters = read_jsonl(run / "unplaceable" / "part-extract.jsonl")
    assert counts["unplaceable"] == 8 and counts["staged"] == 1
    assert counts["undecodable"] == 0 and not (run / "dead-letters" / "part-extract.jsonl").exists()
    assert {d["input"]["subscriberIdString"] for d in letters} == set(bad)
    assert all(d["category"] == "UNPLACEABLE" and d["retryable"] is False for d in letters)
    assert all("occurred_at" in d["message"] and "fixed at the source" in d["message"] for d in letters)
    assert any("'yesterday'" in d["message"] for d in letters)
    # A run of another day lists them too (except the impossible hour, which only the runs whose
    # window holds its date can find), and a day with no events of its own stays quiet otherwise.
    other = extract(run, start=START + timedelta(days=40), end=END + timedelta(days=40))
    assert other["unplaceable"] == 7 and other["in_interval"] == 0 and other["staged"] == 0


def test_every_superseded_event_is_named_with_the_event_that_superseded_it(source, run):
    source([
        event("ada@example.com", "2026-03-10 08:00:00", "SUBSCRIBED"),
        event("ADA@example.com", "2026-03-10 09:00:00", "UNSUBSCRIBED"),  # same key: supersedes the first
        event("ada@example.com", "2026-03-10 10:00:00", "SUBSCRIBED"),    # ...and this one wins
        event("bob@example.com", "2026-03-10 10:00:00", "SUBSCRIBED"),
        event("bob@example.com", "2026-03-12 10:00:00", "UNSUBSCRIBED"),  # after the interval
        event("cy@example.com", "2026-03-10 10:00:00", "SUBSCRIBED"),
    ])
    counts = extract(run)
    assert (counts["staged"], counts["superseded"], counts["superseded_later"]) == (2, 2, 1)
    named = read_jsonl(run / "superseded" / "part-extract.jsonl")
    assert len(named) == counts["superseded"] + counts["superseded_later"]
    assert [(d["input"]["subscriberIdString"], d["occurredAt"]) for d in named] == [
        ("ada@example.com", "2026-03-10T08:00:00Z"), ("ADA@example.com", "2026-03-10T09:00:00Z"),
        ("bob@example.com", "2026-03-10T10:00:00Z"),
    ]
    assert all(d["category"] == "SUPERSEDED" for d in named)
    assert "at 2026-03-10T10:00:00Z in this interval" in named[0]["message"]
    assert "at 2026-03-12T10:00:00Z, after this run's interval" in named[2]["message"]


def test_rows_without_a_key_never_share_one(source, run):
    source([event(None, "2026-03-10 10:00:00"), event(None, "2026-03-10 11:00:00"),
            event(None, "2026-03-10 12:00:00"), event("ok@example.com", "2026-03-10 10:00:00")])
    counts = extract(run)
    assert (counts["in_interval"], counts["superseded"], counts["staged"]) == (4, 0, 4)
    validated = consent.validate_staged_events(run.as_uri())
    assert (validated["valid"], validated["invalid"]) == (1, 3)
    letters = read_jsonl(run / "dead-letters" / "part-validate.jsonl")
    assert len(letters) == 3 and all("subscriberIdString" in d["message"] for d in letters)


def test_a_value_that_is_not_utf8_is_that_rows_dead_letter(source, run):
    db = source([event("ok@example.com", "2026-03-10 10:00:00"), event("ok2@example.com", "2026-03-10 11:00:00")])
    conn = sqlite3.connect(db)
    conn.execute("INSERT INTO consent_events VALUES (CAST(? AS TEXT), 1001, 'SUBSCRIBED', NULL, NULL, "
                 "'2026-03-10 12:00:00')", (b"bad\xff\xfe@example.com",))
    conn.commit()
    conn.close()
    counts = extract(run)
    assert (counts["in_interval"], counts["undecodable"], counts["staged"], counts["superseded"]) == (3, 1, 2, 0)
    (letter,) = read_jsonl(run / "dead-letters" / "part-extract.jsonl")
    assert letter["category"] == "INVALID_INPUT" and "email: not valid UTF-8" in letter["message"]
    assert letter["input"]["subscriberIdString"] == "bad\ufffd\ufffd@example.com"


def test_rerunning_an_interval_rewrites_its_files(source, run):
    rows = [event("ok@example.com", "2026-03-10 10:00:00"), event("bad@example.com", "not a time")]
    source(rows)
    first = extract(run)
    again = extract(run)
    assert first == again
    assert len(staged(run)) == 1 and len(read_jsonl(run / "unplaceable" / "part-extract.jsonl")) == 1
    source(rows[:1])  # fixed at the source: the stale list goes away
    assert extract(run)["unplaceable"] == 0
    assert not (run / "unplaceable" / "part-extract.jsonl").exists()


def test_extract_streams_the_source_in_chunks(source, run, monkeypatch):
    db = source([event(f"user{i}@example.com", f"2026-03-10 10:{i % 60:02d}:00") for i in range(250)])
    fetches: list[int] = []

    class Cursor:
        def __init__(self, inner):
            self._inner = inner

        def execute(self, sql, parameters):
            self._inner.execute(sql, parameters)

        def fetchmany(self, size):
            rows = self._inner.fetchmany(size)
            fetches.append(len(rows))
            return rows

        def fetchall(self):
            raise AssertionError("the whole result must never be loaded at once")

        def close(self):
            self._inner.close()

    class Hook:
        placeholder = "?"

        def get_conn(self):
            conn = sqlite3.connect(db)
            return type("Conn", (), {
                "cursor": lambda _self: Cursor(conn.cursor()),
                "close": lambda _self: conn.close(),
            })()

    monkeypatch.setattr(consent, "_source_hook", lambda conn_id: (Hook(), "sqlite"))
    counts = extract(run, fetch_size=40)
    assert counts["staged"] == 250
    # The interval (with any rows no interval can hold), then the events after it (the SQLite window
    # starts a day early), both streamed.
    assert fetches == ([40] * 6 + [10, 0]) * 2


def test_typed_timestamp_sources_are_filtered_in_sql_with_a_day_of_slack():
    sql, parameters = consent._source_query("consent_events", "postgres", "%s", START, END)
    assert sql.startswith(
        "SELECT email, subscription_id, status, legal_basis, legal_basis_explanation, occurred_at FROM"
    )
    # NULLs fit no interval: every run reads them, in the same query.
    assert sql.endswith("WHERE occurred_at IS NULL OR (occurred_at >= %s AND occurred_at < %s)")
    assert parameters == [START - timedelta(days=1), END + timedelta(days=1)]


def test_extract_refuses_a_table_name_that_is_not_an_identifier(source, run):
    source([])
    with pytest.raises(ValueError, match="plain SQL identifier"):
        extract(run, source_table="consent_events; DELETE FROM consent_events")


def test_extract_needs_a_data_interval(source, run):
    source([])
    with pytest.raises(ValueError, match="no data interval"):
        extract(run, start=None)


def test_extract_needs_a_sql_connection(run, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_NOT_SQL", json.dumps({"conn_type": "http", "host": "example.com"}))
    with pytest.raises(TypeError, match="does not give a SQL hook"):
        consent.extract_consent_events(source_conn_id="not_sql", source_table="t", data_interval_start=START,
                                       data_interval_end=END, run_uri=run.as_uri())


# --------------------------------------------------------------------------- validate


def test_validate_splits_valid_inputs_from_dead_letters_with_reasons(source, run):
    source([
        event("ok@example.com", "2026-03-10 10:00:00", legal_basis="CONSENT_WITH_NOTICE",
              explanation="Signed up"),
        event("text-id@example.com", "2026-03-10 10:00:00", subscription_id="1003"),
        event("not-an-email", "2026-03-10 10:00:00"),
        event("lower@example.com", "2026-03-10 10:00:00", status="subscribed"),
        event("basis@example.com", "2026-03-10 10:00:00", legal_basis="BECAUSE"),
        event("id@example.com", "2026-03-10 10:00:00", subscription_id="abc"),
        event("negative@example.com", "2026-03-10 10:00:00", subscription_id=-5),
    ])
    extract(run)
    (run / "validated").mkdir(parents=True)
    (run / "validated" / "_checkpoint.json").write_text("{}")  # left by an earlier attempt of the write step
    result = consent.validate_staged_events(run.as_uri())

    assert (result["valid"], result["invalid"]) == (2, 5)
    assert result["validated_uri"] == (run / "validated").as_uri()
    assert result["dead_letter_uri"] == (run / "dead-letters").as_uri()
    assert [p.name for p in (run / "validated").iterdir()] == ["statuses.jsonl"]
    good = read_jsonl(run / "validated" / "statuses.jsonl")
    assert good[0] == {
        "input": {"channel": "EMAIL", "legalBasis": "CONSENT_WITH_NOTICE",
                  "legalBasisExplanation": "Signed up", "statusState": "SUBSCRIBED",
                  "subscriberIdString": "ok@example.com", "subscriptionId": 1001},
        "occurredAt": "2026-03-10T10:00:00Z",
    }
    assert good[1]["input"]["subscriptionId"] == 1003
    part = run / "dead-letters" / "part-validate.jsonl"
    letters = {d["input"]["subscriberIdString"]: d for d in read_jsonl(part)}
    assert set(letters) == {"not-an-email", "lower@example.com", "basis@example.com", "id@example.com",
                            "negative@example.com"}
    assert all(d["category"] == "INVALID_INPUT" and d["retryable"] is False for d in letters.values())
    assert letters["not-an-email"]["message"].startswith("subscriberIdString")
    assert letters["lower@example.com"]["message"].startswith("statusState")
    assert letters["basis@example.com"]["message"].startswith("legalBasis")
    assert letters["id@example.com"]["message"].startswith("subscriptionId")
    assert letters["not-an-email"]["occurredAt"] == "2026-03-10T10:00:00Z"


def test_validate_can_require_the_legal_basis_and_rewrites_its_files(source, run):
    source([event("ok@example.com", "2026-03-10 10:00:00")])
    extract(run)
    strict = consent.validate_staged_events(run.as_uri(), require_legal_basis=True)
    assert (strict["valid"], strict["invalid"]) == (0, 1)
    assert "legalBasis" in read_jsonl(run / "dead-letters" / "part-validate.jsonl")[0]["message"]
    relaxed = consent.validate_staged_events(run.as_uri())
    assert (relaxed["valid"], relaxed["invalid"]) == (1, 0)
    assert not (run / "dead-letters" / "part-validate.jsonl").exists()
    assert len(read_jsonl(run / "validated" / "statuses.jsonl")) == 1


# --------------------------------------------------------------------------- outcome


def write_letters(path: Path, letters: list[tuple[str, str, bool]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for email, category, retryable in letters:
        value = {"subscriberIdString": email, "subscriptionId": 1001, "statusState": "SUBSCRIBED",
                 "channel": "EMAIL"}
        lines.append(json.dumps({"input": value, "category": category, "message": "m", "retryable": retryable,
                                 "occurredAt": None}))
    path.write_text("".join(line + "\n" for line in lines))


def test_count_dead_letters_reads_every_part(tmp_path):
    folder = tmp_path / "dead-letters"
    write_letters(folder / "part-validate.jsonl",
                  [("a", "INVALID_INPUT", False), ("b", "INVALID_INPUT", False)])
    write_letters(folder / "part-validated-0000000001.jsonl", [("c@x.io", "NO_RESULT", True)])
    (folder / "_checkpoint.json").write_text("{}")
    assert consent.count_dead_letters(folder.as_uri()) == {
        "dead_letter_uri": folder.as_uri(), "files": 2, "total": 3, "retryable": 1,
        "by_category": {"INVALID_INPUT": 2, "NO_RESULT": 1},
    }
    assert consent.count_dead_letters((tmp_path / "none").as_uri())["total"] == 0


EXTRACTED = {"rows_read": 13, "in_interval": 10, "outside_interval": 2, "undecodable": 1, "unplaceable": 1,
             "superseded": 1,
             "staged": 8, "run_uri": "file:///r", "dead_letter_uri": "file:///r/dead-letters",
             "data_interval_start": START.isoformat(), "data_interval_end": END.isoformat()}
VALIDATED = {"valid": 7, "invalid": 1, "validated_uri": "file:///r/validated",
             "dead_letter_uri": "file:///r/dead-letters"}
SUBMITTED = {"submitted": 7, "succeeded": 6, "changed": 4, "unchanged": 2, "superseded": 0, "failed": 1,
             "failed_by_category": {"OBJECT_NOT_FOUND": 1}, "requests": 1, "records_per_s": 70.0}


def test_run_totals_merge_the_failures_of_every_step():
    totals = consent.run_totals(EXTRACTED, VALIDATED, SUBMITTED)
    assert (totals["inputs"], totals["failed"], totals["succeeded"], totals["changed"]) == (9, 3, 6, 4)
    assert totals["failed_by_category"] == {"INVALID_INPUT": 2, "OBJECT_NOT_FOUND": 1}
    assert consent.has_failures(EXTRACTED, VALIDATED, SUBMITTED)
    assert consent.has_failures({**EXTRACTED, "undecodable": 0}, {**VALIDATED, "invalid": 0},
                                {**SUBMITTED, "failed": 0})  # unplaceable rows are reported too
    assert not consent.has_failures({**EXTRACTED, "undecodable": 0, "unplaceable": 0}, {**VALIDATED, "invalid": 0},
                                    {**SUBMITTED, "failed": 0})


def test_failure_policy_counts_the_whole_run():
    totals = consent.run_totals(EXTRACTED, VALIDATED, SUBMITTED)  # 3 of 9 failed
    consent.apply_failure_policy(totals, 0.34)
    expected = r"3 of 9 consent events failed .*INVALID_INPUT 2, OBJECT_NOT_FOUND 1"
    with pytest.raises(AirflowFailException, match=expected):
        consent.apply_failure_policy(totals, 0.25)
    consent.apply_failure_policy({**totals, "inputs": 0, "failed": 0}, 0.0)
    # Unplaceable rows are in no ratio; only their own limit fails a run.
    quiet = {**totals, "inputs": 0, "failed": 0, "unplaceable": 23}
    consent.apply_failure_policy(quiet, 0.0, max_unplaceable_rows=23)
    with pytest.raises(AirflowFailException, match="23 rows whose occurred_at fits no data interval"):
        consent.apply_failure_policy(quiet, 0.0, max_unplaceable_rows=22)


def test_summarise_alerts_with_counts_only_then_applies_the_policy(tmp_path):
    run = tmp_path / "run"
    write_letters(run / "dead-letters" / "part-validate.jsonl",
                  [("secret@example.com", "INVALID_INPUT", False)])
    extracted = {**EXTRACTED, "run_uri": run.as_uri(), "dead_letter_uri": (run / "dead-letters").as_uri(),
                 "undecodable": 0, "unplaceable": 0}
    validated = {**VALIDATED, "dead_letter_uri": (run / "dead-letters").as_uri()}
    collector = Collecting()
    alerts = collector.delivered
    context = {"run_id": "manual__1"}
    totals = consent.summarise_run(extracted, validated, {**SUBMITTED, "failed": 0, "failed_by_category": {}},
                                   max_failed_ratio=0.5, notifiers=[collector], context=context)
    assert alerts == [totals]
    assert totals["dead_letters"] == 1 and totals["dead_letters_by_category"] == {"INVALID_INPUT": 1}
    assert "secret@example.com" not in json.dumps(totals)
    assert json.loads((run / "summary.json").read_text()) == totals
    with pytest.raises(AirflowFailException):
        consent.summarise_run(extracted, validated, SUBMITTED, max_failed_ratio=0.0, notifiers=[collector],
                              context=context)
    assert len(alerts) == 2  # the alert goes out before the run is failed


class Collecting(DeadLetterNotifier):
    """A notifier that keeps what it would deliver."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.delivered: list[dict] = []

    def deliver(self, summary):
        self.delivered.append(summary)


def test_the_notifier_alerts_a_failed_task_with_the_dead_letters_so_far(tmp_path):
    write_letters(tmp_path / "manual__1" / "dead-letters" / "part-validate.jsonl",
                  [("a", "INVALID_INPUT", False)])
    callback = Collecting()  # what the DAGs set as on_failure_callback
    alerts = callback.delivered
    ti = type("TI", (), {"task_id": "submit"})()
    callback({"params": {"storage_uri": tmp_path.as_uri()}, "run_id": "manual__1", "ti": ti,
              "exception": RuntimeError("HubSpot down")})
    assert alerts == [{
        "failed_task": "submit",
        "run_id": "manual__1",
        "error": "RuntimeError",
        "dead_letters": 1,
        "failed_by_category": {"INVALID_INPUT": 1},
        "dead_letter_uri": (tmp_path / "manual__1" / "dead-letters").as_uri(),
    }]
    callback({"params": {"storage_uri": "file:///nonexistent/place"}, "run_id": "r"})  # never raises
    assert alerts[-1]["dead_letters"] == 0


# --------------------------------------------------------------------------- replay


def test_prepare_replay_selects_retryable_dead_letters(tmp_path):
    folder = tmp_path / "run" / "dead-letters"
    write_letters(folder / "part-validate.jsonl", [("bad", "INVALID_INPUT", False)])
    write_letters(folder / "part-validated-0000000001.jsonl",
                  [("a@example.com", "NO_RESULT", True), ("b@example.com", "OBJECT_NOT_FOUND", False)])
    (folder / "part-junk.jsonl").write_text("not json\n\n")

    prepared = consent.prepare_replay(folder.as_uri(), run_id="manual__2026-03-12T00:00:00+00:00")
    replay = tmp_path / "run" / "replay-manual__2026-03-12T00_00_00_00_00"
    assert prepared["replay_uri"] == replay.as_uri()
    assert prepared["input_uri"] == (replay / "input").as_uri()
    assert prepared["dead_letter_uri"] == (replay / "dead-letters").as_uri()
    assert (prepared["files"], prepared["selected"], prepared["skipped"]) == (3, 1, 3)
    assert prepared["skipped_by_category"] == {
        "INVALID_INPUT": 1, "NOT_A_DEAD_LETTER": 1, "OBJECT_NOT_FOUND": 1,
    }
    lines = read_jsonl(replay / "input" / "dead-letters.jsonl")
    assert lines == [{"input": {"subscriberIdString": "a@example.com", "subscriptionId": 1001,
                                "statusState": "SUBSCRIBED", "channel": "EMAIL"}, "occurredAt": None}]

    everything = consent.prepare_replay(folder.as_uri(), run_id="manual__2", include_non_retryable=True)
    assert (everything["selected"], everything["skipped"]) == (3, 1)
    one_file = consent.prepare_replay((folder / "part-validate.jsonl").as_uri(), run_id="r3",
                                      include_non_retryable=True)
    assert one_file["replay_uri"] == (folder / "replay-r3").as_uri() and one_file["selected"] == 1
    # The originals are left untouched (the junk line counts as one UNKNOWN).
    assert consent.count_dead_letters(folder.as_uri())["total"] == 4
    with pytest.raises(FileNotFoundError, match="neither a file nor a folder"):
        consent.prepare_replay((tmp_path / "missing").as_uri(), run_id="r")


def test_replay_leaves_out_dead_letters_the_source_has_overtaken(tmp_path, source):
    def letter(email: str, status: str, occurred_at: str | None, subscription_id: int = 1001) -> str:
        return json.dumps({
            "input": {"subscriberIdString": email, "subscriptionId": subscription_id, "statusState": status,
                      "channel": "EMAIL"},
            "category": "NO_RESULT", "message": "no answer", "retryable": True, "occurredAt": occurred_at,
        })

    folder = tmp_path / "run" / "dead-letters"
    folder.mkdir(parents=True)
    (folder / "part-a.jsonl").write_text("\n".join([
        letter("ada@example.com", "SUBSCRIBED", "2026-03-10T10:00:00Z"),    # opted out later: not replayed
        letter("bob@example.com", "SUBSCRIBED", "2026-03-10T10:00:00Z"),    # nothing since: replayed
        letter("cy@example.com", "SUBSCRIBED", "2026-03-10T10:00:00Z"),     # its own event only: replayed
        letter("dee@example.com", "UNSUBSCRIBED", None),                    # cannot be compared: replayed
        letter("eve@example.com", "SUBSCRIBED", "2026-03-08T10:00:00Z"),    # an older letter for eve ...
        letter("fay@example.com", "SUBSCRIBED", "2026-03-10T10:00:00Z"),    # fay opted out of all later
    ]) + "\n")
    (folder / "part-b.jsonl").write_text(
        letter("EVE@example.com", "UNSUBSCRIBED", "2026-03-09T10:00:00Z") + "\n"  # ... and the later one
    )
    source([
        event("ada@example.com", "2026-03-10 10:00:00", "SUBSCRIBED"),
        event("ada@example.com", "2026-03-12T09:00:00+01:00", "UNSUBSCRIBED"),
        event("bob@example.com", "2026-03-10 10:00:00", "SUBSCRIBED"),
        event("bob@example.com", "2026-03-12 09:00:00", "UNSUBSCRIBED", subscription_id=1002),
        event("cy@example.com", "2026-03-10T11:00:00+01:00", "SUBSCRIBED"),  # the same instant as the letter
        event("eve@example.com", "2026-03-09 10:00:00", "UNSUBSCRIBED"),
        event("FAY@example.com", "2026-03-11 10:00:00", "UNSUBSCRIBE_ALL", None),
    ])

    prepared = consent.prepare_replay(folder.as_uri(), run_id="r1", source_conn_id="hubspot_consent_source")
    lines = read_jsonl(Path(prepared["input_uri"].removeprefix("file://")) / "dead-letters.jsonl")
    assert {line["input"]["subscriberIdString"]: line["input"]["statusState"] for line in lines} == {
        "bob@example.com": "SUBSCRIBED", "cy@example.com": "SUBSCRIBED", "dee@example.com": "UNSUBSCRIBED",
        "EVE@example.com": "UNSUBSCRIBED",
    }
    assert (prepared["selected"], prepared["superseded"], prepared["superseded_later"]) == (4, 1, 2)

    unchecked = consent.prepare_replay(folder.as_uri(), run_id="r2")
    assert (unchecked["selected"], unchecked["superseded"], unchecked["superseded_later"]) == (7, 0, 0)

    with pytest.raises(ValueError, match="source_conn_id 'nowhere' cannot be used.*or to null"):
        consent.prepare_replay(folder.as_uri(), run_id="r3", source_conn_id="nowhere")


def test_a_plan_that_cannot_be_read_falls_back_to_asking_about_the_contacts_in_a_scan(tmp_path, caplog):
    # A server registered as postgres that does not speak PostgreSQL's EXPLAIN (here: SQLite).
    class Hook:
        def get_conn(self):
            return sqlite3.connect(tmp_path / "not-postgres.db")

    latest = consent._LatestPerKey(str(tmp_path))
    try:
        latest.add("ada@example.com/1001/EMAIL", END - timedelta(hours=1), "{}", "ada@example.com")
        with caplog.at_level("INFO", logger="hubspot_provider.consent"):
            queries = list(latest._later_queries(Hook(), "postgres", "consent_events", "%s", END))
    finally:
        latest.close()
    assert "could not read PostgreSQL's plan (OperationalError); the later rows are scanned" in caplog.text
    assert "1 contacts of the interval, matched during one scan of the source's later rows" in caplog.text
    assert queries == [consent._later_query("consent_events", "postgres", "%s", END, ["ada@example.com"])]
