"""HubSpotWriteStatusesOperator against the emulator over real loopback sockets (no mocked HTTP)."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from airflow.providers.standard.triggers.temporal import DateTimeTrigger
from airflow.sdk.exceptions import AirflowFailException, TaskDeferred

from hubspot_provider.exceptions import HubSpotAuthError, HubSpotDailyLimitError, HubSpotUnavailableError
from hubspot_provider.operators import HubSpotWriteStatusesOperator

OCCURRED_AT = "2024-05-01T12:00:00Z"
SUMMARY_KEYS = {
    "submitted", "succeeded", "changed", "unchanged", "superseded", "failed", "retryable_failed", "skipped",
    "failed_by_category",
    "reasons", "dead_letter_uri", "dead_letter_files", "ledger_uri", "ledger_records", "requests", "retries",
    "rate_limited", "deferrals", "elapsed_s", "records_per_s", "report",
    "withheld", "withheld_by_category", "hubspot_changes", "reads", "dry_run", "plan", "plan_uri",
}


def rows(n: int, *, start: int = 0, state: str = "SUBSCRIBED", subscription_id: int = 1001) -> list[dict]:
    return [
        {"subscriberIdString": f"user{i}@example.com", "subscriptionId": subscription_id,
         "statusState": state}
        for i in range(start, start + n)
    ]


def staged(path: Path, items: list, *, envelope: bool = True) -> str:
    """Write ``items`` as a staged JSONL file (strings are written verbatim) and return its file:// URI."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for item in items:
        if isinstance(item, str):
            lines.append(item)
        else:
            lines.append(json.dumps({"input": item, "occurredAt": OCCURRED_AT} if envelope else item))
    path.write_text("\n".join(lines) + "\n")
    return path.as_uri()


def dead_letters(folder: Path) -> list[dict]:
    return [
        json.loads(line)
        for part in sorted(folder.glob("part-*.jsonl"))
        for line in part.read_text().splitlines()
    ]


def operator(**kwargs) -> HubSpotWriteStatusesOperator:
    kwargs.setdefault("max_concurrency", 1)
    # These tests are about writing; the hubspot_changes guard (and its reads) has tests of its own.
    kwargs.setdefault("hubspot_changes", "source_wins")
    return HubSpotWriteStatusesOperator(task_id="write_statuses", **kwargs)


def written(emulator) -> int:
    """Inputs the emulator accepted in batch writes (requests it refused carry none)."""
    return sum(
        r.n_inputs
        for r in emulator.requests
        if r.path.endswith("/statuses/batch/write") and r.status in (200, 207)
    )


@pytest.fixture
def emulator(hubspot_emulator_factory):
    return hubspot_emulator_factory()


@pytest.fixture
def conn(emulator, hubspot_conn):
    return hubspot_conn(emulator)


# --------------------------------------------------------------------------- construction


def test_exactly_one_input_source_is_required():
    with pytest.raises(ValueError, match="exactly one of inputs"):
        operator()
    with pytest.raises(ValueError, match="exactly one of inputs"):
        operator(inputs=rows(1), input_uri="file:///tmp/x.jsonl")
    with pytest.raises(ValueError, match="max_failed_ratio"):
        operator(inputs=rows(1), max_failed_ratio=1.5)
    op = operator(inputs=rows(1))
    assert op.template_fields == ("inputs", "input_uri", "dead_letter_uri", "hubspot_conn_id", "batch_size",
                                  "ledger_uri", "audit_conn_id", "audit_table", "input_count", "hubspot_changes", "dry_run")


# --------------------------------------------------------------------------- inline input


def test_inline_inputs_land_and_the_summary_accounts_for_each(emulator, conn, task_log):
    inputs = rows(12)
    inputs[3] = {**inputs[3], "subscriberIdString": "not-an-email"}
    inputs[7] = {**inputs[7], "subscriptionId": 424242}
    summary = operator(inputs=inputs, batch_size=5).execute(context={})

    assert set(summary) == SUMMARY_KEYS
    json.dumps(summary)  # XCom-ready
    assert (summary["submitted"], summary["succeeded"], summary["failed"]) == (12, 10, 2)
    assert summary["failed_by_category"] == {"INVALID_INPUT": 1, "OBJECT_NOT_FOUND": 1}
    assert summary["reasons"] == {"REQUESTED_CHANGE_OCCURRED": 10}
    assert (summary["changed"], summary["unchanged"], summary["superseded"]) == (10, 0, 0)
    assert summary["dead_letter_uri"] is None and summary["dead_letter_files"] == 0
    assert summary["requests"] == 3 and summary["deferrals"] == 0
    assert emulator.status_of("user11@example.com", 1001)["status"] == "SUBSCRIBED"
    info = task_log()
    assert "HubSpot status sync" in info and "@example.com" not in info


def test_inline_dead_letters_are_written_when_a_folder_is_given(emulator, conn, tmp_path):
    inputs = [
        *rows(3),
        {"input": {"subscriber_id_string": "snake@example.com", "subscription_id": "1001",
                   "status_state": "SUBSCRIBED"}, "occurredAt": OCCURRED_AT},
    ]
    summary = operator(inputs=inputs, dead_letter_uri=(tmp_path / "dl").as_uri()).execute(context={})
    assert summary["dead_letter_uri"] == (tmp_path / "dl").as_uri()
    assert [p.name for p in (tmp_path / "dl").iterdir()] == ["part-0000000001.jsonl"]
    [letter] = dead_letters(tmp_path / "dl")
    assert letter["input"] == {"subscriberIdString": "snake@example.com", "subscriptionId": "1001",
                               "statusState": "SUBSCRIBED"}
    assert letter["category"] == "INVALID_INPUT" and "subscription_id" in letter["message"]
    assert letter["retryable"] is False and letter["occurredAt"] == OCCURRED_AT


def test_inline_inputs_rendered_as_text_are_parsed(emulator, conn):
    assert operator(inputs=json.dumps(rows(2))).execute(context={})["succeeded"] == 2
    assert operator(inputs=str(rows(3))).execute(context={})["succeeded"] == 3


def test_inline_inputs_stay_out_of_the_rendered_template_view(emulator, conn):
    # What the task runner stores as the task's rendered fields (and the UI shows), built by Airflow's
    # own function after rendering, as in a real task run.
    from airflow.sdk.execution_time.task_runner import _serialize_rendered_fields

    op = operator(inputs="{{ params.contacts | tojson }}", batch_size="{{ params.batch }}")
    op.render_template_fields({"params": {"contacts": rows(7), "batch": 3}})
    rendered = _serialize_rendered_fields(op)

    assert rendered["inputs"] == "<7 inline inputs, not shown: they hold email addresses>"
    assert rendered["batch_size"] == "3"
    assert "@example.com" not in json.dumps(rendered)
    summary = op.execute(context={})
    assert (summary["succeeded"], summary["requests"]) == (7, 3)
    assert emulator.status_of("user6@example.com", 1001)["status"] == "SUBSCRIBED"

    # Text that is no list is left as rendered, and execute() says what is wrong.
    bad = operator(inputs="{{ params.contacts }}")
    bad.render_template_fields({"params": {"contacts": "ada@example.com"}})
    with pytest.raises(TypeError, match="neither JSON nor a Python list literal"):
        bad.execute(context={})


# --------------------------------------------------------------------------- staged input


def test_staged_file_streams_in_segments_and_writes_dead_letters(emulator, conn, tmp_path):
    good = rows(20)
    items = [
        *good[:5],
        {"subscriberIdString": "bad-address", "subscriptionId": 1001, "statusState": "SUBSCRIBED"},
        *good[5:12],
        '{"input": {"subscriberIdString": "cut@example.com", "subscr',
        "",
        {"subscriberIdString": "ghost@example.com", "subscriptionId": 515151, "statusState": "UNSUBSCRIBED"},
        *good[12:],
    ]
    uri = staged(tmp_path / "staging" / "consent.jsonl", items)
    summary = operator(input_uri=uri, batch_size=5, segment_size=10).execute(context={})

    assert (summary["submitted"], summary["succeeded"], summary["failed"]) == (23, 20, 3)
    assert summary["failed_by_category"] == {"INVALID_INPUT": 2, "OBJECT_NOT_FOUND": 1}
    folder = tmp_path / "staging" / "dead-letters"
    assert summary["dead_letter_uri"] == folder.as_uri()
    # 23 non-blank lines in segments of 10 start at lines 1, 11 and 22 (line 15 is blank).
    assert sorted(p.name for p in folder.iterdir()) == [
        "part-consent-0000000001.jsonl",
        "part-consent-0000000011.jsonl",
    ]
    assert summary["dead_letter_files"] == 2
    bad, cut, ghost = dead_letters(folder)
    assert bad == {
        "input": {"subscriberIdString": "bad-address", "subscriptionId": 1001, "statusState": "SUBSCRIBED"},
        "category": "INVALID_INPUT", "message": bad["message"], "retryable": False, "occurredAt": OCCURRED_AT,
    }
    assert "subscriberIdString" in bad["message"]
    assert cut["category"] == "INVALID_INPUT" and cut["retryable"] is False and cut["occurredAt"] is None
    assert f"{uri} line 14: not valid JSON (Unterminated string" in cut["message"]
    assert ghost["category"] == "OBJECT_NOT_FOUND" and ghost["input"]["subscriptionId"] == 515151
    assert ghost["input"]["channel"] == "EMAIL" and ghost["occurredAt"] == OCCURRED_AT
    assert all(emulator.status_of(f"user{i}@example.com", 1001) for i in range(20))
    # Per segment: 9 sendable (5 + 4), 9 sendable (5 + 4), 3; invalid lines are never sent.
    assert sorted(r.n_inputs for r in emulator.requests) == [3, 4, 4, 5, 5]
    assert not (tmp_path / "staging" / "consent.jsonl.checkpoint.json").exists()


def test_bare_input_lines_are_accepted(emulator, conn, tmp_path):
    uri = staged(tmp_path / "bare.jsonl", rows(4), envelope=False)
    assert operator(input_uri=uri).execute(context={})["succeeded"] == 4


def test_staged_folder_reads_jsonl_files_in_name_order(emulator, conn, tmp_path):
    folder = tmp_path / "run-1"
    flip = {"subscriberIdString": "flip@example.com", "subscriptionId": 1002}
    staged(folder / "b.jsonl", [*rows(3, start=10), {**flip, "statusState": "UNSUBSCRIBED"},
                                {**flip, "subscriptionId": 999}])
    staged(folder / "a.jsonl", [{**flip, "statusState": "SUBSCRIBED"}, *rows(3)])
    staged(folder / "_ignored.jsonl", rows(5, start=100))
    (folder / "notes.txt").write_text("not input\n")
    summary = operator(input_uri=folder.as_uri(), batch_size=2, segment_size=3).execute(context={})

    assert (summary["submitted"], summary["succeeded"], summary["failed"]) == (9, 8, 1)
    assert emulator.status_of("flip@example.com", 1002)["status"] == "UNSUBSCRIBED"  # b.jsonl comes last
    assert emulator.status_of("user100@example.com", 1001) is None
    dl_folder = tmp_path / "dead-letters"
    assert summary["dead_letter_uri"] == dl_folder.as_uri()
    assert [p.name for p in dl_folder.iterdir()] == ["part-run-1-0000000007.jsonl"]
    assert not (folder / "_checkpoint.json").exists()


def test_missing_input_is_a_clear_error(conn, tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a file nor a folder"):
        operator(input_uri=(tmp_path / "nope.jsonl").as_uri()).execute(context={})


# --------------------------------------------------------------------------- failure policy


@pytest.mark.parametrize(("n_bad", "fails"), [(1, False), (2, True)])
def test_failure_policy_applies_after_everything_is_sent(emulator, conn, tmp_path, n_bad, fails):
    bad = {"subscriberIdString": "x@example.com", "subscriptionId": 777777, "statusState": "SUBSCRIBED"}
    bad_rows = [{**bad, "subscriberIdString": f"x{i}@example.com"} for i in range(n_bad)]
    uri = staged(tmp_path / "in.jsonl", [*rows(4 - n_bad), *bad_rows])
    op = operator(input_uri=uri, max_failed_ratio=0.25)
    if not fails:  # 1 of 4 is exactly the ratio
        assert op.execute(context={})["failed"] == 1
        return
    with pytest.raises(AirflowFailException) as caught:
        op.execute(context={})
    message = str(caught.value)
    assert "2 of 4 inputs failed" in message and "OBJECT_NOT_FOUND 2" in message
    assert (tmp_path / "dead-letters").as_uri() in message
    assert len(dead_letters(tmp_path / "dead-letters")) == 2
    assert emulator.status_of("user1@example.com", 1001) is not None  # the good ones still landed


# --------------------------------------------------------------------------- rate limits and deferral


def test_without_a_ratio_the_operator_leaves_the_judgement_to_the_run(emulator, conn, tmp_path):
    uri = staged(tmp_path / "in.jsonl", rows(3, subscription_id=424242))  # every input fails
    summary = operator(input_uri=uri, max_failed_ratio=None).execute(context={})
    assert (summary["submitted"], summary["failed"]) == (3, 3)


def test_inputs_a_validate_step_wrote_are_sent_without_a_second_check(emulator, conn, tmp_path, monkeypatch):
    from hubspot_provider.hooks.hubspot import HubSpotHook

    checked: list = []
    original = HubSpotHook.validate
    monkeypatch.setattr(HubSpotHook, "validate", lambda self, value: checked.append(value) or original(self, value))
    good = rows(3)
    for item in good:
        item["channel"] = "EMAIL"  # the wire form validate writes
    snake = {"subscriber_id_string": "snake@example.com", "subscription_id": 1001, "status_state": "SUBSCRIBED"}
    bad = {"subscriberIdString": "x@example.com", "subscriptionId": "1001", "statusState": "SUBSCRIBED"}
    uri = staged(tmp_path / "in.jsonl", good + [snake, bad])
    summary = operator(input_uri=uri, inputs_validated=True).execute(context={})
    # Wire lines go as they are; the rest is still checked: snake_case is accepted, a string id is not.
    assert (summary["succeeded"], summary["failed_by_category"]) == (4, {"INVALID_INPUT": 1})
    assert emulator.status_of("snake@example.com", 1001)["status"] == "SUBSCRIBED"
    assert checked == [snake, bad]  # only the lines not in wire form were validated again


def test_progress_is_logged_in_words_against_the_count_an_earlier_step_made(emulator, conn, tmp_path, task_log):
    uri = staged(tmp_path / "in.jsonl", rows(12))
    operator(input_uri=uri, batch_size=5, segment_size=6, input_count="24").execute(context={})
    assert "6 of 24 statuses (25%)" in task_log()  # the given count, not a recount of the file
    operator(input_uri=uri, batch_size=5, segment_size=6).execute(context={})  # counted by the operator
    assert "6 of 12 statuses (50%)" in task_log() and "12 of 12 statuses (100%)" in task_log()


def _daily_limited(hubspot_emulator_factory, hubspot_conn, **kwargs):
    emulator = hubspot_emulator_factory(daily_limit=3, **kwargs)
    hubspot_conn(emulator)
    return emulator


def _fire(trigger: DateTimeTrigger):
    return asyncio.run(anext(trigger.run()))


@pytest.mark.parametrize("source", ["staged", "inline"])
def test_daily_limit_defers_and_resumes_without_losing_inputs(
    hubspot_emulator_factory, hubspot_conn, tmp_path, source
):
    emulator = _daily_limited(hubspot_emulator_factory, hubspot_conn, daily_reset_s=2)
    inputs = rows(20)
    inputs[2] = {**inputs[2], "subscriptionId": 888888}
    params = dict(batch_size=5, segment_size=10, deferrable=True)
    if source == "staged":
        params["input_uri"] = staged(tmp_path / "in.jsonl", inputs)
    else:
        params.update(inputs=inputs, dead_letter_uri=(tmp_path / "dead-letters").as_uri())

    before = datetime.now(timezone.utc)
    with pytest.raises(TaskDeferred) as caught:
        operator(**params).execute(context={})
    deferred = caught.value
    assert isinstance(deferred.trigger, DateTimeTrigger)
    assert deferred.method_name == "execute_complete"
    assert before < deferred.trigger.moment <= before + timedelta(seconds=3)
    if source == "staged":
        checkpoint = json.loads((tmp_path / "in.jsonl.checkpoint.json").read_text())
        assert checkpoint["progress"]["lines_done"] == 10 and checkpoint["progress"]["deferrals"] == 1
    else:
        assert deferred.kwargs["progress"]["lines_done"] == 10

    event = _fire(deferred.trigger)
    # Airflow builds a new operator instance to resume.
    summary = operator(**params).execute_complete(context={}, event=event.payload, **(deferred.kwargs or {}))

    assert (summary["submitted"], summary["succeeded"], summary["failed"]) == (20, 19, 1)
    assert summary["deferrals"] == 1 and summary["rate_limited"] >= 1
    assert len(emulator.statuses) == 19
    # Segment 2 was interrupted after one batch and sent again whole: 25 inputs sent for 20 lines.
    assert written(emulator) == 25
    assert len(dead_letters(tmp_path / "dead-letters")) == 1
    assert not (tmp_path / "in.jsonl.checkpoint.json").exists()


def test_short_rate_limit_waits_are_slept_through_when_not_deferrable(hubspot_emulator_factory, hubspot_conn):
    emulator = _daily_limited(hubspot_emulator_factory, hubspot_conn, daily_reset_s=1)
    summary = operator(inputs=rows(20), batch_size=5, segment_size=10).execute(context={})
    assert summary["succeeded"] == 20 and summary["deferrals"] == 0 and summary["rate_limited"] >= 1
    assert len(emulator.statuses) == 20


def test_long_rate_limit_wait_fails_and_a_retry_resumes_from_the_checkpoint(
    hubspot_emulator_factory, hubspot_conn, tmp_path
):
    emulator = _daily_limited(hubspot_emulator_factory, hubspot_conn)  # resets at midnight
    uri = staged(tmp_path / "in.jsonl", rows(30))
    with pytest.raises(HubSpotDailyLimitError):
        operator(input_uri=uri, batch_size=5, segment_size=10).execute(context={})
    checkpoint = json.loads((tmp_path / "in.jsonl.checkpoint.json").read_text())
    assert checkpoint["progress"]["lines_done"] == 10

    emulator.daily_limit = None  # the next day, with room to spare
    sent_before = written(emulator)
    summary = operator(input_uri=uri, batch_size=5, segment_size=10).execute(context={})
    assert written(emulator) - sent_before == 20
    assert summary["submitted"] == 30 and summary["succeeded"] == 30
    assert len(emulator.statuses) == 30


def test_writes_that_landed_before_an_interruption_keep_their_own_audit_records(emulator, hubspot_conn, tmp_path):
    hubspot_conn(emulator, max_retries=1)
    uri = staged(tmp_path / "in.jsonl", rows(10))
    emulator.inject("slow:0", count=1)  # the segment's first batch lands...
    emulator.inject("503", count=2)  # ...its second fails, retry included
    with pytest.raises(HubSpotUnavailableError):
        operator(input_uri=uri, batch_size=5, segment_size=10).execute(context={})
    [interrupted] = sorted((tmp_path / "audit").glob("*.interrupted-*.jsonl"))
    landed = [json.loads(line) for line in interrupted.read_text().splitlines()]
    assert len(landed) == 5 and {r["setStatusSuccessReason"] for r in landed} == {"REQUESTED_CHANGE_OCCURRED"}

    # The retry sends the segment again: HubSpot already holds the first five, and says so.
    summary = operator(input_uri=uri, batch_size=5, segment_size=10).execute(context={})
    assert summary["succeeded"] == 10 and summary["ledger_records"] == 15  # the 5 kept, and 10 now
    again = [json.loads(line) for part in sorted((tmp_path / "audit").glob("part-*.jsonl"))
             if ".interrupted-" not in part.name for line in part.read_text().splitlines()]
    assert sorted(r["setStatusSuccessReason"] for r in again) == ["NO_STATUS_CHANGE"] * 5 + [
        "REQUESTED_CHANGE_OCCURRED"] * 5


# --------------------------------------------------------------------------- crashes, retries, re-runs


def test_a_new_try_resumes_from_the_checkpoint_after_hubspot_stays_unavailable(
    emulator, hubspot_conn, tmp_path
):
    hubspot_conn(emulator, max_retries=1)
    uri = staged(tmp_path / "in.jsonl", rows(60))
    emulator.inject("slow:0", count=4)  # the first two segments go through...
    emulator.inject("503", count=2)  # ...then the third's first batch fails, retry included
    with pytest.raises(HubSpotUnavailableError):
        operator(input_uri=uri, batch_size=5, segment_size=10).execute(context={})
    assert json.loads((tmp_path / "in.jsonl.checkpoint.json").read_text())["progress"]["lines_done"] == 20
    assert len(emulator.statuses) == 20

    requests_before = len(emulator.requests)
    summary = operator(input_uri=uri, batch_size=5, segment_size=10).execute(context={})
    resumed = emulator.requests[requests_before:]
    assert len(resumed) == 8 and sum(r.n_inputs for r in resumed) == 40  # done segments not re-sent
    assert len(emulator.statuses) == 60
    assert (summary["submitted"], summary["succeeded"]) == (60, 60)
    assert summary["requests"] == 14 and summary["retries"] == 1


def test_the_ledger_records_every_status_sent_with_hubspots_answer(emulator, conn, tmp_path, monkeypatch):
    import sqlite3

    from hubspot_provider.ledger import LEDGER_DDL, LEDGER_FIELDS

    audit_db = tmp_path / "audit.db"
    with sqlite3.connect(audit_db) as db:
        db.execute(LEDGER_DDL)
    monkeypatch.setenv("AIRFLOW_CONN_AUDIT_DB", json.dumps({"conn_type": "sqlite", "host": str(audit_db)}))
    inputs = rows(12)
    inputs[3] = {**inputs[3], "subscriberIdString": "not-an-email"}  # never sent: no ledger record
    inputs[7] = {**inputs[7], "subscriptionId": 424242}  # sent, rejected by HubSpot: a FAILED record
    inputs[5] = {**inputs[5], "legalBasis": "CONSENT_WITH_NOTICE", "legalBasisExplanation": "Form on /join"}
    uri = staged(tmp_path / "run" / "staged" / "events.jsonl", inputs)
    context = {"run_id": "scheduled__2026-03-10", "data_interval_start": datetime(2026, 3, 10, tzinfo=timezone.utc),
               "data_interval_end": datetime(2026, 3, 11, tzinfo=timezone.utc)}

    summary = operator(input_uri=uri, batch_size=5, segment_size=6, audit_conn_id="audit_db").execute(context)

    ledger = tmp_path / "run" / "staged" / "audit"
    records = [json.loads(line) for part in sorted(ledger.glob("part-*.jsonl")) for line in part.read_text().splitlines()]
    assert summary["ledger_records"] == len(records) == 11 and summary["ledger_uri"] == ledger.as_uri()
    assert all(list(r) == list(LEDGER_FIELDS) for r in records)
    by_email = {r["subscriberIdString"]: r for r in records}
    assert "not-an-email" not in by_email
    ok = by_email["user5@example.com"]
    assert ok["outcome"] == "SUCCEEDED" and ok["confirmedStatus"] == "SUBSCRIBED"
    assert ok["setStatusSuccessReason"] == "REQUESTED_CHANGE_OCCURRED"
    assert (ok["legalBasis"], ok["legalBasisExplanation"]) == ("CONSENT_WITH_NOTICE", "Form on /join")
    assert ok["occurredAt"] == OCCURRED_AT and ok["attempts"] == 1 and ok["sentAt"].endswith("Z")
    def instant(text):
        return datetime.fromisoformat(text.replace("Z", "+00:00"))

    assert instant(ok["hubspotTimestamp"]) == instant(emulator.status_of("user5@example.com", 1001)["timestamp"])
    assert ok["hubspotSource"] and ok["correlationId"]
    assert (ok["runId"], ok["dataIntervalStart"]) == ("scheduled__2026-03-10", "2026-03-10T00:00:00Z")
    failed = by_email["user7@example.com"]
    assert (failed["outcome"], failed["failureCategory"], failed["confirmedStatus"]) == (
        "FAILED", "OBJECT_NOT_FOUND", None)
    # HubSpot's correlation id of the request that carried each record: one per request.
    assert len({r["correlationId"] for r in records}) == len(emulator.requests) == 3

    # The same records in SQL, where "every write for this contact" is one query.
    with sqlite3.connect(audit_db) as db:
        assert db.execute("SELECT count(*) FROM hubspot_consent_ledger").fetchone() == (11,)
        history = db.execute(
            "SELECT sent_at, status_state, legal_basis, outcome, confirmed_status, correlation_id "
            "FROM hubspot_consent_ledger WHERE lower(subscriber_id_string) = lower(?) ORDER BY sent_at",
            ("USER5@example.com",),
        ).fetchall()
    assert len(history) == 1 and history[0][1:5] == ("SUBSCRIBED", "CONSENT_WITH_NOTICE", "SUCCEEDED", "SUBSCRIBED")

    # A re-run rewrites the part files (and appends to SQL: both writes really happened).
    operator(input_uri=uri, batch_size=5, segment_size=6, audit_conn_id="audit_db").execute(context)
    again = [json.loads(line) for part in sorted(ledger.glob("part-*.jsonl")) for line in part.read_text().splitlines()]
    assert len(again) == 11 and {r["setStatusSuccessReason"] for r in again} == {"NO_STATUS_CHANGE", None}
    with sqlite3.connect(audit_db) as db:
        assert db.execute("SELECT count(*) FROM hubspot_consent_ledger").fetchone() == (22,)


def test_a_segment_is_checkpointed_only_once_its_ledger_is_written(emulator, conn, tmp_path, monkeypatch):
    import sqlite3

    audit_db = tmp_path / "audit.db"
    sqlite3.connect(audit_db).close()  # no ledger table: the SQL write-back fails
    monkeypatch.setenv("AIRFLOW_CONN_AUDIT_DB", json.dumps({"conn_type": "sqlite", "host": str(audit_db)}))
    uri = staged(tmp_path / "in.jsonl", rows(20))
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        operator(input_uri=uri, batch_size=5, segment_size=5, audit_conn_id="audit_db").execute(context={})
    checkpoint = tmp_path / "in.jsonl.checkpoint.json"
    # Segments were sent, but none is marked done: a retry sends them again and writes their ledger.
    assert not checkpoint.exists() or json.loads(checkpoint.read_text())["progress"]["lines_done"] == 0


def _interrupted_after_20_of_60(emulator, hubspot_conn, tmp_path) -> tuple[str, Path]:
    hubspot_conn(emulator, max_retries=1)
    uri = staged(tmp_path / "in.jsonl", rows(60))
    emulator.inject("slow:0", count=4)  # two segments of 10 land...
    emulator.inject("503", count=2)  # ...then HubSpot stays down
    with pytest.raises(HubSpotUnavailableError):
        operator(input_uri=uri, batch_size=5, segment_size=10).execute(context={})
    checkpoint = tmp_path / "in.jsonl.checkpoint.json"
    assert json.loads(checkpoint.read_text())["progress"]["lines_done"] == 20
    return uri, checkpoint


def test_a_checkpoint_is_bound_to_the_lines_it_covers(emulator, hubspot_conn, tmp_path, task_log):
    uri, _ = _interrupted_after_20_of_60(emulator, hubspot_conn, tmp_path)
    # Someone edits a line the checkpoint says is done, keeping the file's size.
    staged_file = tmp_path / "in.jsonl"
    text = staged_file.read_text()
    staged_file.write_text(text.replace("user5@example.com", "zser5@example.com"))
    assert len(staged_file.read_text()) == len(text)
    emulator.reset()
    summary = operator(input_uri=uri, batch_size=5, segment_size=10).execute(context={})
    assert "the lines it covers changed" in task_log()
    assert (summary["submitted"], summary["succeeded"]) == (60, 60)  # started over: nothing skipped
    assert emulator.status_of("zser5@example.com", 1001)["status"] == "SUBSCRIBED"
    assert len(emulator.statuses) == 60


@pytest.mark.parametrize("resign", [False, True], ids=["position-edited", "position-edited-and-re-signed"])
def test_a_checkpoint_with_an_altered_position_is_not_trusted(emulator, hubspot_conn, tmp_path, task_log, resign):
    import hashlib

    uri, checkpoint = _interrupted_after_20_of_60(emulator, hubspot_conn, tmp_path)
    doc = json.loads(checkpoint.read_text())
    doc["progress"].update(lines_done=40, file_line=40)  # still parses, would skip 20 lines
    if resign:
        doc.pop("sha256")
        doc["sha256"] = hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    checkpoint.write_text(json.dumps(doc))
    emulator.reset()
    summary = operator(input_uri=uri, batch_size=5, segment_size=10).execute(context={})
    reason = "the lines it covers changed" if resign else "not intact"
    assert reason in task_log()
    assert summary["succeeded"] == 60 and len(emulator.statuses) == 60


def test_auth_errors_fail_the_task_without_marking_anything_done(emulator, conn, tmp_path):
    uri = staged(tmp_path / "in.jsonl", rows(30))
    emulator.inject("slow:0", count=2)
    emulator.inject("401")
    with pytest.raises(AirflowFailException, match="rejected the access token") as caught:
        operator(input_uri=uri, batch_size=5, segment_size=10).execute(context={})
    assert isinstance(caught.value.__cause__, HubSpotAuthError)  # no task retries for a bad token
    assert json.loads((tmp_path / "in.jsonl.checkpoint.json").read_text())["progress"]["lines_done"] == 10


def test_rerun_after_success_replays_without_duplicating_dead_letters(emulator, conn, tmp_path):
    inputs = rows(25)
    for i in (4, 13, 22):
        inputs[i] = {**inputs[i], "subscriptionId": 900000 + i}
    uri = staged(tmp_path / "in.jsonl", inputs)
    first = operator(input_uri=uri, batch_size=5, segment_size=10).execute(context={})
    letters = dead_letters(tmp_path / "dead-letters")
    assert first["failed"] == 3 and len(letters) == 3

    again = operator(input_uri=uri, batch_size=5, segment_size=10).execute(context={})
    assert again["submitted"] == 25 and again["unchanged"] == 22 and again["changed"] == 0
    assert dead_letters(tmp_path / "dead-letters") == letters

    # Other segment boundaries name other parts; the stale ones must not survive next to them.
    operator(input_uri=uri, batch_size=5, segment_size=7).execute(context={})
    rewritten = dead_letters(tmp_path / "dead-letters")
    assert sorted(map(json.dumps, rewritten)) == sorted(map(json.dumps, letters))


def test_only_retryable_replays_a_dead_letter_folder(emulator, conn, tmp_path):
    inputs = rows(6)
    inputs[1] = {**inputs[1], "subscriptionId": 123456}  # OBJECT_NOT_FOUND: not retryable
    inputs[4] = {**inputs[4], "statusState": "MAYBE"}  # INVALID_INPUT: not retryable
    operator(input_uri=staged(tmp_path / "in.jsonl", inputs), max_failed_ratio=1).execute(context={})
    folder = tmp_path / "dead-letters"
    assert [d["retryable"] for d in dead_letters(folder)] == [False, False]
    # Outcomes HubSpot left open (NO_RESULT) are retryable; one of them will fail again.
    retryable = [
        {"input": row, "category": "NO_RESULT", "message": "no result", "retryable": True,
         "occurredAt": OCCURRED_AT}
        for row in [*rows(2, start=50), {**rows(1, start=52)[0], "subscriptionId": 654321}]
    ]
    (folder / "part-manual-0000000001.jsonl").write_text("".join(json.dumps(d) + "\n" for d in retryable))

    sent_before = written(emulator)
    replay = operator(input_uri=folder.as_uri(), only_retryable=True, max_failed_ratio=0.5)
    summary = replay.execute(context={})
    assert written(emulator) - sent_before == 3
    assert (summary["submitted"], summary["succeeded"], summary["failed"], summary["skipped"]) == (3, 2, 1, 2)
    assert summary["failed_by_category"] == {"OBJECT_NOT_FOUND": 1}
    assert emulator.status_of("user51@example.com", 1001)["status"] == "SUBSCRIBED"
    # The replay's own dead letters nest inside the folder being read, so no input part is overwritten.
    assert summary["dead_letter_uri"] == (folder / "dead-letters").as_uri()
    [again] = dead_letters(folder / "dead-letters")
    assert again["input"]["subscriptionId"] == 654321 and again["occurredAt"] == OCCURRED_AT
    assert len(dead_letters(folder)) == 5  # the replayed folder itself is untouched
    assert not (folder / "_checkpoint.json").exists()


def test_dead_letter_folder_may_not_be_the_input_folder(conn, tmp_path):
    staged(tmp_path / "in" / "a.jsonl", rows(1))
    with pytest.raises(ValueError, match="is the input folder"):
        operator(input_uri=(tmp_path / "in").as_uri(), dead_letter_uri=(tmp_path / "in").as_uri()).execute({})


def test_a_segment_larger_than_the_limit_allows_still_finishes(hubspot_emulator_factory, hubspot_conn):
    emulator = hubspot_emulator_factory(daily_limit=1, daily_reset_s=1)
    hubspot_conn(emulator)
    # Each "day" allows one request and a segment needs two: after the first stop the operator
    # goes one batch per segment, so every acknowledged request counts and the sync completes.
    summary = operator(inputs=rows(10), batch_size=5, segment_size=10).execute(context={})
    assert (summary["submitted"], summary["succeeded"]) == (10, 10)
    assert len(emulator.statuses) == 10
    assert "daily_limited" in [r.kind for r in emulator.requests]


def test_waits_that_make_no_headway_end_in_a_failure(hubspot_emulator_factory, hubspot_conn, monkeypatch):
    from hubspot_provider.operators import hubspot as module

    monkeypatch.setattr(module, "MAX_STALLED_WAITS", 1)
    emulator = hubspot_emulator_factory(daily_reset_s=1)
    hubspot_conn(emulator)
    emulator.inject("429_daily", count=5)  # something else keeps the daily budget used up
    with pytest.raises(HubSpotDailyLimitError):
        operator(inputs=rows(10), batch_size=5, segment_size=10).execute(context={})
    assert [r.kind for r in emulator.requests] == ["daily_limited", "daily_limited"]
    assert emulator.statuses == {}
