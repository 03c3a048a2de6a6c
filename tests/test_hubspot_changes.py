"""Consent decided inside HubSpot: the ``hubspot_changes`` guard, opt-outs from all email, dry runs.

Everything runs against the emulator over loopback; HubSpot-side changes are made with its UI helpers
(footer unsubscribe, preferences page, unsubscribe from all), as HubSpot's own UI would make them.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timedelta, timezone

import pytest

from hubspot_provider.hooks._guard import (
    API_SOURCE,
    Current,
    check_policy,
    decide,
    parse_instant,
)
from hubspot_provider.hooks.hubspot import HubSpotHook
from hubspot_provider.ledger import LEDGER_DDL
from hubspot_provider.operators.hubspot import HubSpotWriteStatusesOperator
from hubspot_provider.testing.emulator import SOURCE_PUBLIC_API

DAY = datetime(2026, 3, 10, tzinfo=timezone.utc)


def at(hour: int) -> datetime:
    return DAY + timedelta(hours=hour)


def z(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def event(email: str, state: str, hour: int, subscription_id: int | None = 1001) -> dict:
    wire = {"subscriberIdString": email, "statusState": state}
    if subscription_id is not None:
        wire["subscriptionId"] = subscription_id
    return {"input": wire, "occurredAt": z(at(hour))}


@pytest.fixture
def emulator(hubspot_emulator_factory):
    return hubspot_emulator_factory()


@pytest.fixture
def conn(emulator, hubspot_conn):
    return hubspot_conn(emulator, "hubspot_changes")


def run(inputs: list[dict], tmp_path, **kwargs) -> dict:
    op = HubSpotWriteStatusesOperator(
        task_id="submit", inputs=inputs, hubspot_conn_id="hubspot_changes", max_concurrency=1,
        dead_letter_uri=(tmp_path / "dl").as_uri(), ledger_uri=(tmp_path / "audit").as_uri(),
        max_failed_ratio=None, **kwargs,
    )
    return op.execute(context={"run_id": "manual__test"})


def lines(folder) -> list[dict]:
    return [json.loads(line) for part in sorted(folder.glob("*.jsonl")) for line in part.read_text().splitlines()]


def reads(emulator) -> int:
    return sum(1 for r in emulator.requests if r.path.endswith("/read"))


# --------------------------------------------------------------------------- the rules, one by one


def test_policy_names_are_checked_with_the_choices():
    assert check_policy(" respect_all ") == "respect_all"
    with pytest.raises(ValueError, match="respect_opt_outs, respect_all, source_wins"):
        check_policy("hubspot_wins")


def test_occurred_at_is_read_as_an_aware_instant_or_not_at_all():
    assert parse_instant("2026-03-10T10:00:00Z") == at(10)
    assert parse_instant("2026-03-10T12:00:00+02:00") == at(10)
    assert parse_instant("2026-03-10 10:00:00") is None  # no offset: not guessed
    assert parse_instant(None) is None and parse_instant("soon") is None


@pytest.mark.parametrize(
    ("policy", "wanted", "current", "action"),
    [
        # A newer opt-out made in HubSpot wins over a resubscribe, under both respecting policies.
        ("respect_opt_outs", "SUBSCRIBED", ("UNSUBSCRIBED", 20, True), "withhold"),
        ("respect_all", "SUBSCRIBED", ("UNSUBSCRIBED", 20, True), "withhold"),
        ("source_wins", "SUBSCRIBED", ("UNSUBSCRIBED", 20, True), "change"),
        # NOT_SPECIFIED over a newer opt-out is a resubscribe too.
        ("respect_opt_outs", "NOT_SPECIFIED", ("UNSUBSCRIBED", 20, True), "withhold"),
        # An older opt-out does not block a newer opt-in.
        ("respect_opt_outs", "SUBSCRIBED", ("UNSUBSCRIBED", 8, True), "change"),
        # This provider's own write never blocks, however new.
        ("respect_opt_outs", "SUBSCRIBED", ("UNSUBSCRIBED", 20, False), "change"),
        ("respect_all", "NOT_SPECIFIED", ("SUBSCRIBED", 20, False), "change"),
        # A newer HubSpot-side change that is not an opt-out: only respect_all keeps it.
        ("respect_opt_outs", "NOT_SPECIFIED", ("SUBSCRIBED", 20, True), "change"),
        ("respect_all", "NOT_SPECIFIED", ("SUBSCRIBED", 20, True), "withhold"),
        # Opt-outs from the source are never withheld.
        ("respect_all", "UNSUBSCRIBED", ("SUBSCRIBED", 20, True), "change"),
        ("respect_all", "UNSUBSCRIBED", ("UNSUBSCRIBED", 20, True), "no-op"),
        ("respect_opt_outs", "SUBSCRIBED", ("SUBSCRIBED", 20, True), "no-op"),
    ],
)
def test_the_policy_decides_by_who_changed_what_and_when(policy, wanted, current, action):
    status, hour, hubspot_side = current
    verdict = decide({"statusState": wanted}, at(10), Current(status, at(hour), "x", hubspot_side), None, policy)
    assert verdict.action == action
    if action == "withhold":
        assert verdict.category == ("NEWER_OPT_OUT_IN_HUBSPOT" if status == "UNSUBSCRIBED" else "NEWER_CHANGE_IN_HUBSPOT")
        assert policy in verdict.message and "source_wins" in verdict.message


def test_an_opt_out_from_all_email_in_hubspot_blocks_a_resubscribe_and_an_unknown_time_counts_as_older():
    wide = Current("UNSUBSCRIBED", at(20), None, True, wide=True)
    verdict = decide({"statusState": "SUBSCRIBED"}, at(10), None, wide, "respect_opt_outs")
    assert (verdict.action, verdict.category) == ("withhold", "NEWER_OPT_OUT_IN_HUBSPOT")
    assert "opt-out from all email" in verdict.message
    older = Current("UNSUBSCRIBED", at(8), "Unsubscribe Link", True)
    assert decide({"statusState": "SUBSCRIBED"}, None, older, None, "respect_opt_outs").action == "withhold"


def test_an_opt_out_made_in_hubspot_wins_a_tie_and_one_of_unknown_time_counts_as_newer():
    for timestamp in (at(10), None):
        current = Current("UNSUBSCRIBED", timestamp, "Unsubscribe Link", True)
        assert decide({"statusState": "SUBSCRIBED"}, at(10), current, None, "respect_opt_outs").action == "withhold"
    # Not an opt-out, same instant: the source's event stands.
    current = Current("SUBSCRIBED", at(10), "HubSpot UI", True)
    assert decide({"statusState": "NOT_SPECIFIED"}, at(10), current, None, "respect_all").action == "change"


def test_a_write_that_changed_nothing_teaches_nothing_about_own_writes():
    from hubspot_provider.hooks._guard import OwnWrites
    from hubspot_provider.models import PublicStatus

    own = OwnWrites()
    unchanged = PublicStatus(source="Unsubscribe Link", set_status_success_reason="NO_STATUS_CHANGE")
    own.learn(unchanged, {"subscriberIdString": "a@example.com", "statusState": "UNSUBSCRIBE_ALL"})
    assert own.sources == {API_SOURCE} and own.opted_out_of_all == set()
    changed = PublicStatus(source="Some App", set_status_success_reason="REQUESTED_CHANGE_OCCURRED")
    own.learn(changed, {"subscriberIdString": "A@example.com", "statusState": "UNSUBSCRIBE_ALL"})
    assert own.sources == {API_SOURCE, "Some App"} and own.opted_out_of_all == {"a@example.com"}


def test_a_ledger_record_keeps_a_timestamp_hubspot_sent_as_odd_text_and_writes_utc():
    from hubspot_provider.ledger import ledger_record
    from hubspot_provider.models import PublicStatus
    from hubspot_provider.results import InputOutcome

    wire = {"subscriberIdString": "a@example.com", "subscriptionId": 1001, "statusState": "SUBSCRIBED"}
    odd = PublicStatus(status="SUBSCRIBED", timestamp="yesterday-ish")
    record = ledger_record(InputOutcome(0, wire, at(1), 1, "c", result=odd), run_id="r")
    assert record.hubspot_timestamp == "yesterday-ish" and record.sent_at == "2026-03-10T01:00:00Z"
    offset = PublicStatus(status="SUBSCRIBED", timestamp="2026-03-10T12:00:00+02:00")
    record = ledger_record(InputOutcome(0, wire, at(1), 1, "c", result=offset), run_id="r")
    assert record.hubspot_timestamp == "2026-03-10T10:00:00Z"


def test_an_opt_out_from_all_email_never_needs_a_legal_basis():
    from hubspot_provider.models import UnsubscribeAllRequest, validate_consent_input

    row = {"subscriberIdString": "a@example.com", "statusState": "UNSUBSCRIBE_ALL", "subscriptionId": None}
    assert isinstance(validate_consent_input(row, require_legal_basis=True), UnsubscribeAllRequest)
    with pytest.raises(ValueError, match="legalBasis"):
        validate_consent_input({"subscriberIdString": "a@example.com", "statusState": "SUBSCRIBED",
                                "subscriptionId": 1001}, require_legal_basis=True)


# --------------------------------------------------------------------------- against the emulator


def test_a_contact_hubspots_read_leaves_out_is_not_written_blind(emulator, conn, tmp_path):
    # The emulator's reads reject an address under the reserved .invalid domain (as HubSpot may reject
    # one it cannot read): the answer has an error for it and no result.
    summary = run([event("ghost@example.invalid", "SUBSCRIBED", 10), event("ok@example.com", "SUBSCRIBED", 10)],
                  tmp_path)
    assert summary["failed_by_category"] == {"CURRENT_STATUS_UNREAD": 1} and summary["retryable_failed"] == 1
    assert summary["succeeded"] == 1 and emulator.status_of("ghost@example.invalid", 1001) is None
    [letter] = lines(tmp_path / "dl")
    assert letter["retryable"] is True and "not sent" in letter["message"]


def test_a_footer_opt_out_after_the_source_opt_in_stays_and_is_reported(emulator, conn, tmp_path, task_log):
    emulator.footer_unsubscribe("late@example.com", 1001, at=at(20))  # 20:00, in HubSpot
    emulator.footer_unsubscribe("early@example.com", 1001, at=at(8))  # 08:00, before the opt-in
    summary = run([event("late@example.com", "SUBSCRIBED", 10), event("early@example.com", "SUBSCRIBED", 10)],
                  tmp_path)

    assert emulator.status_of("late@example.com", 1001)["status"] == "UNSUBSCRIBED"
    assert emulator.status_of("late@example.com", 1001)["source"] == "Unsubscribe Link"
    assert emulator.status_of("early@example.com", 1001)["status"] == "SUBSCRIBED"
    assert (summary["submitted"], summary["succeeded"], summary["withheld"], summary["failed"]) == (2, 1, 1, 0)
    assert summary["withheld_by_category"] == {"NEWER_OPT_OUT_IN_HUBSPOT": 1}
    assert summary["hubspot_changes"] == "respect_opt_outs" and summary["reads"] == 2  # statuses + opt-outs from all
    [letter] = lines(tmp_path / "dl")
    assert letter["input"]["subscriberIdString"] == "late@example.com"
    assert (letter["category"], letter["retryable"]) == ("NEWER_OPT_OUT_IN_HUBSPOT", False)
    assert "2026-03-10T20:00:00" in letter["message"] and "Unsubscribe Link" in letter["message"]
    withheld = [r for r in lines(tmp_path / "audit") if r["outcome"] == "WITHHELD"]
    assert len(withheld) == 1 and withheld[0]["confirmedStatus"] == "UNSUBSCRIBED"
    assert withheld[0]["hubspotSource"] == "Unsubscribe Link" and withheld[0]["sentAt"] is None
    log = task_log()
    assert "withheld (respect_opt_outs" in log and "late@example.com" not in log


def test_source_wins_overwrites_and_reads_nothing(emulator, conn, tmp_path):
    emulator.footer_unsubscribe("late@example.com", 1001, at=at(20))
    summary = run([event("late@example.com", "SUBSCRIBED", 10)], tmp_path, hubspot_changes="source_wins")
    assert emulator.status_of("late@example.com", 1001)["status"] == "SUBSCRIBED"
    assert summary["withheld"] == 0 and summary["reads"] == 0 and reads(emulator) == 0


def test_respect_all_keeps_any_newer_change_made_in_hubspot(emulator, conn, tmp_path):
    emulator.preferences_page("pref@example.com", 1001, "SUBSCRIBED", at=at(20))
    inputs = [event("pref@example.com", "NOT_SPECIFIED", 10)]
    summary = run(inputs, tmp_path / "all", hubspot_changes="respect_all")
    assert summary["withheld_by_category"] == {"NEWER_CHANGE_IN_HUBSPOT": 1}
    assert emulator.status_of("pref@example.com", 1001)["status"] == "SUBSCRIBED"
    # respect_opt_outs lets it through: a subscribe made in HubSpot is not an opt-out.
    summary = run(inputs, tmp_path / "opt-outs")
    assert summary["withheld"] == 0 and emulator.status_of("pref@example.com", 1001)["status"] == "NOT_SPECIFIED"


def test_reads_only_for_writes_that_could_resubscribe(emulator, conn, tmp_path):
    emulator.preferences_page("u0@example.com", 1001, "SUBSCRIBED", at=at(20))
    summary = run([event(f"u{i}@example.com", "UNSUBSCRIBED", 10) for i in range(5)], tmp_path,
                  hubspot_changes="respect_all")
    assert summary["reads"] == 0 and reads(emulator) == 0 and summary["succeeded"] == 5
    assert emulator.status_of("u0@example.com", 1001)["status"] == "UNSUBSCRIBED"  # opting out is always safe


def test_this_providers_own_later_write_never_blocks_an_earlier_event(emulator, conn, tmp_path):
    # 02:00 (today, in HubSpot's clock): this provider wrote an opt-out; an opt-in that happened at 01:00
    # arrives late. HubSpot's timestamp is newer than the event, but the write was this provider's own.
    run([event("own@example.com", "UNSUBSCRIBED", 0)], tmp_path / "first")
    assert emulator.status_of("own@example.com", 1001)["source"] == SOURCE_PUBLIC_API == API_SOURCE
    summary = run([event("own@example.com", "SUBSCRIBED", 1)], tmp_path / "second")
    assert summary["withheld"] == 0 and emulator.status_of("own@example.com", 1001)["status"] == "SUBSCRIBED"


def test_with_a_sql_ledger_only_writes_the_ledger_explains_count_as_own(
    emulator, conn, tmp_path, monkeypatch
):
    audit_db = tmp_path / "audit.db"
    with sqlite3.connect(audit_db) as db:
        db.execute(LEDGER_DDL)
    monkeypatch.setenv("AIRFLOW_CONN_AUDIT_DB", json.dumps({"conn_type": "sqlite", "host": str(audit_db)}))
    # This provider's own opt-out, recorded in the SQL ledger.
    run([event("own@example.com", "UNSUBSCRIBED", 0)], tmp_path / "first", audit_conn_id="audit_db")
    # Another integration writes an opt-out through the same public API (same source, no ledger record).
    emulator.hubspot_side_change("other@example.com", 1001, "UNSUBSCRIBED", source=SOURCE_PUBLIC_API)
    inputs = [event("own@example.com", "SUBSCRIBED", 1), event("other@example.com", "SUBSCRIBED", 1)]

    summary = run(inputs, tmp_path / "second", audit_conn_id="audit_db")
    assert emulator.status_of("own@example.com", 1001)["status"] == "SUBSCRIBED"
    assert emulator.status_of("other@example.com", 1001)["status"] == "UNSUBSCRIBED"
    assert summary["withheld_by_category"] == {"NEWER_OPT_OUT_IN_HUBSPOT": 1}
    with sqlite3.connect(audit_db) as db:
        outcomes = dict(db.execute(
            "SELECT subscriber_id_string || ' ' || outcome, count(*) FROM hubspot_consent_ledger "
            "WHERE run_id = 'manual__test' GROUP BY 1").fetchall())
    assert outcomes == {"own@example.com SUCCEEDED": 2, "other@example.com WITHHELD": 1}


def test_an_opt_out_from_all_email_lands_on_the_unsubscribe_all_endpoint(emulator, conn, tmp_path):
    inputs = [
        event("all@example.com", "UNSUBSCRIBE_ALL", 12, subscription_id=None),
        event("all@example.com", "SUBSCRIBED", 15, subscription_id=1002),  # later: lands after the opt-out
        event("bad-address", "UNSUBSCRIBE_ALL", 12, subscription_id=None),
    ]
    summary = run(inputs, tmp_path)
    paths = [r.path.rsplit("/", 1)[-1] for r in emulator.requests if not r.path.endswith("/read")]
    assert paths == ["unsubscribe-all", "write"]
    assert emulator.wide_status_of("all@example.com")["status"] == "UNSUBSCRIBED"
    assert emulator.status_of("all@example.com", 1001)["status"] == "UNSUBSCRIBED"
    assert emulator.status_of("all@example.com", 1002)["status"] == "SUBSCRIBED"
    assert (summary["submitted"], summary["succeeded"], summary["failed"]) == (3, 2, 1)
    [letter] = lines(tmp_path / "dl")
    assert letter["category"] == "INVALID_INPUT" and "subscriberIdString" in letter["message"]
    ledger = {r["statusState"]: r for r in lines(tmp_path / "audit")}
    wide = ledger["UNSUBSCRIBE_ALL"]
    assert wide["subscriptionId"] is None and wide["outcome"] == "SUCCEEDED" and wide["correlationId"]
    assert wide["confirmedStatus"] == "UNSUBSCRIBED" and wide["hubspotTimestamp"]
    assert ledger["SUBSCRIBED"]["outcome"] == "SUCCEEDED"


@pytest.mark.parametrize("how", ["later segment of the same run", "later run, no SQL ledger"])
def test_this_providers_own_opt_out_from_all_never_blocks_the_contacts_later_opt_in(emulator, conn, tmp_path, how):
    opt_out = event("all@example.com", "UNSUBSCRIBE_ALL", 12, subscription_id=None)
    opt_in = event("all@example.com", "SUBSCRIBED", 15, subscription_id=1002)  # after the opt-out, before "now"
    if how == "later segment of the same run":
        summary = run([opt_out, opt_in], tmp_path, segment_size=1)
    else:
        run([opt_out], tmp_path / "first")
        summary = run([opt_in], tmp_path)
    assert summary["withheld"] == 0 and summary["reads"] > 0
    assert emulator.status_of("all@example.com", 1002)["status"] == "SUBSCRIBED"


def test_a_resubscribe_over_an_opt_out_from_all_made_in_hubspot_is_withheld(emulator, conn, tmp_path):
    emulator.unsubscribe_all_in_hubspot("wide@example.com", at=at(20))
    summary = run([event("wide@example.com", "SUBSCRIBED", 10, subscription_id=1002)], tmp_path)
    assert summary["withheld_by_category"] == {"NEWER_OPT_OUT_IN_HUBSPOT": 1}
    assert emulator.status_of("wide@example.com", 1002)["status"] == "UNSUBSCRIBED"


def test_the_hook_reads_and_writes_opt_outs_from_all_email(emulator, conn):
    hook = HubSpotHook("hubspot_changes")
    report = hook.unsubscribe_all(["a@example.com", {"subscriberIdString": "b@example.com"}, "nope"])
    assert (report.submitted, report.succeeded, report.failed_count) == (3, 2, 1)
    assert report.failed[0].category == "INVALID_INPUT"
    wide = hook.read_unsubscribe_all(["A@example.com", "b@example.com", "c@example.com"])
    assert set(wide) == {"a@example.com", "b@example.com"}
    statuses = hook.read_statuses(["a@example.com", "c@example.com"])
    assert {s.status.value for s in statuses["a@example.com"].values()} == {"UNSUBSCRIBED"}
    assert statuses.get("c@example.com", {}) == {}
    # A subscription status is never sent as an opt-out from all email: it fails, naming the field.
    report = hook.unsubscribe_all([{"subscriberIdString": "d@example.com", "statusState": "SUBSCRIBED"}])
    assert report.failed[0].category == "INVALID_INPUT" and "statusState" in report.failed[0].message
    assert emulator.wide_status_of("d@example.com") is None


def test_a_dry_run_writes_nothing_and_its_plan_is_what_the_run_then_does(emulator, conn, tmp_path, task_log):
    emulator.footer_unsubscribe("late@example.com", 1001, at=at(20))
    emulator.footer_unsubscribe("early@example.com", 1001, at=at(8))
    emulator.preferences_page("same@example.com", 1001, "SUBSCRIBED", at=at(2))
    inputs = [
        event("late@example.com", "SUBSCRIBED", 10),
        event("early@example.com", "SUBSCRIBED", 10),
        event("same@example.com", "SUBSCRIBED", 10),
        event("new@example.com", "UNSUBSCRIBED", 10),
        event("all@example.com", "UNSUBSCRIBE_ALL", 10, subscription_id=None),
    ]
    before = {key: dict(value) for key, value in emulator.statuses.items()}
    writes_before = emulator.writes_applied
    plan_folder = tmp_path / "plan"

    planned = run(inputs, tmp_path / "dry", dry_run="True", plan_uri=plan_folder.as_uri())

    assert emulator.statuses == before and emulator.writes_applied == writes_before
    assert emulator.wide_status_of("all@example.com") is None
    assert all(r.path.endswith("/read") for r in emulator.requests)
    assert planned["dry_run"] is True and planned["succeeded"] == 0 and planned["ledger_records"] == 0
    assert planned["plan"] == {"change": 3, "no-op": 1, "withhold": 1, "unknown": 0, "transitions": {
        "NOT_OPTED_OUT_OF_ALL→UNSUBSCRIBE_ALL": 1, "NOT_SPECIFIED→UNSUBSCRIBED": 1, "UNSUBSCRIBED→SUBSCRIBED": 1}}
    rows = {r["input"]["subscriberIdString"]: r for r in lines(plan_folder)}
    assert rows["late@example.com"]["action"] == "withhold"
    assert rows["late@example.com"]["current"] == {
        "status": "UNSUBSCRIBED", "timestamp": "2026-03-10T20:00:00Z", "source": "Unsubscribe Link",
        "hubspotSide": True}
    assert "1 already so; 1 withheld" in task_log()

    done = run(inputs, tmp_path / "real")
    ledger = {r["subscriberIdString"]: r for r in lines(tmp_path / "real" / "audit")}
    for email, row in rows.items():
        record = ledger[email]
        expected = {"withhold": "WITHHELD", "change": "SUCCEEDED", "no-op": "SUCCEEDED"}[row["action"]]
        assert record["outcome"] == expected, email
        if row["action"] != "withhold":
            assert (record["setStatusSuccessReason"] == "NO_STATUS_CHANGE") == (row["action"] == "no-op"), email
    assert (done["changed"], done["unchanged"], done["withheld"]) == (3, 1, 1)
