"""HubSpotHook against the emulator over real loopback sockets (no mocked HTTP)."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone

import pytest

from hubspot_provider.exceptions import (
    HubSpotAuthError,
    HubSpotConfigError,
    HubSpotDailyLimitError,
    HubSpotScopeError,
    HubSpotUnavailableError,
)
from hubspot_provider.hooks.hubspot import HubSpotHook, WriteReport
from hubspot_provider.models import PublicStatusRequest

TOKEN = "pat-emulator-token"


def rows(n: int, *, state: str = "SUBSCRIBED", subscription_id: int = 1001, start: int = 0) -> list[dict]:
    return [
        {"subscriberIdString": f"user{i}@example.com", "subscriptionId": subscription_id, "statusState": state}
        for i in range(start, start + n)
    ]


def assert_consistent(report: WriteReport) -> None:
    assert report.succeeded + report.superseded + report.failed_count == report.submitted
    assert len(report.failed) == report.failed_count
    assert sum(report.failed_by_category.values()) == report.failed_count
    assert sum(report.reasons.values()) == report.succeeded
    json.loads(report.model_dump_json())  # JSON-serialisable, as XCom needs


@pytest.fixture
def emulator(hubspot_emulator_factory):
    return hubspot_emulator_factory()


@pytest.fixture
def hook(emulator, hubspot_conn):
    return HubSpotHook(hubspot_conn(emulator), max_retries=4)


# --------------------------------------------------------------------------- happy path and batching


def test_write_lands_in_batches_and_reports_each_input(emulator, hook):
    report = hook.write_statuses(rows(250), batch_size=100)
    assert_consistent(report)
    assert (report.submitted, report.succeeded, report.failed_count) == (250, 250, 0)
    assert report.batches == 3 and report.requests == 3
    assert report.reasons == {"REQUESTED_CHANGE_OCCURRED": 250}
    assert emulator.status_of("user7@example.com", 1001)["status"] == "SUBSCRIBED"
    assert [r.n_inputs for r in emulator.requests] == [100, 100, 50] or sorted(
        r.n_inputs for r in emulator.requests
    ) == [50, 100, 100]

    again = hook.write_statuses(rows(250))
    assert again.reasons == {"NO_STATUS_CHANGE": 250}
    assert again.changed == 0


def test_snake_case_dicts_and_models_are_accepted(emulator, hook):
    report = hook.write_statuses(
        [
            {"subscriber_id_string": "snake@example.com", "subscription_id": 1002, "status_state": "UNSUBSCRIBED"},
            PublicStatusRequest(
                subscriber_id_string="model@example.com",
                subscription_id=1003,
                status_state="SUBSCRIBED",
                legal_basis="CONSENT_WITH_NOTICE",
                legal_basis_explanation="Ticked the box on the sign-up form",
            ),
        ]
    )
    assert report.succeeded == 2
    stored = emulator.status_of("model@example.com", 1003)
    assert stored["legalBasis"] == "CONSENT_WITH_NOTICE"
    assert emulator.status_of("snake@example.com", 1002)["status"] == "UNSUBSCRIBED"


def test_batch_write_statuses_is_one_request(emulator, hook):
    response = hook.batch_write_statuses(rows(3))
    assert len(response.results) == 3
    assert response.results[0].set_status_success_reason.value == "REQUESTED_CHANGE_OCCURRED"
    assert len(emulator.requests) == 1
    with pytest.raises(ValueError, match="input 1 is invalid: subscriberIdString"):
        hook.batch_write_statuses([rows(1)[0], {"subscriberIdString": "nope", "subscriptionId": 1, "statusState": "SUBSCRIBED"}])


def test_dated_api_version_uses_its_base_path(emulator, hubspot_conn):
    hook = HubSpotHook(hubspot_conn(emulator, api_version="2026-03"))
    assert hook.write_statuses(rows(2)).succeeded == 2
    assert all(r.path.startswith("/communication-preferences/2026-03/") for r in emulator.requests)


def test_multi_status_207_is_parsed(hubspot_emulator_factory, hubspot_conn):
    emulator = hubspot_emulator_factory(multi_status=True)
    hook = HubSpotHook(hubspot_conn(emulator))
    report = hook.write_statuses(rows(3) + rows(1, subscription_id=999_999))
    assert report.succeeded == 3
    assert report.failed_by_category == {"OBJECT_NOT_FOUND": 1}
    assert 207 in {r.status for r in emulator.requests}


# --------------------------------------------------------------------------- bad input


BAD_INPUTS = [
    ({"subscriberIdString": "not-an-email", "subscriptionId": 1001, "statusState": "SUBSCRIBED"}, "subscriberIdString"),
    ({"subscriberIdString": "a@b", "subscriptionId": 1001, "statusState": "SUBSCRIBED"}, "subscriberIdString"),
    ({"subscriberIdString": "x@example.com", "subscriptionId": "1001", "statusState": "SUBSCRIBED"}, "subscriptionId"),
    ({"subscriberIdString": "x@example.com", "subscriptionId": -5, "statusState": "SUBSCRIBED"}, "subscriptionId"),
    ({"subscriberIdString": "x@example.com", "subscriptionId": 2**63, "statusState": "SUBSCRIBED"}, "subscriptionId"),
    ({"subscriberIdString": "x@example.com", "subscriptionId": True, "statusState": "SUBSCRIBED"}, "subscriptionId"),
    ({"subscriberIdString": "x@example.com", "subscriptionId": 1.5, "statusState": "SUBSCRIBED"}, "subscriptionId"),
    ({"subscriberIdString": "x@example.com", "subscriptionId": 1001, "statusState": "subscribed"}, "statusState"),
    ({"subscriberIdString": "x@example.com", "subscriptionId": 1001, "statusState": "OPTED_IN"}, "statusState"),
    ({"subscriberIdString": "x@example.com", "subscriptionId": 1001, "statusState": "SUBSCRIBED", "channel": "SMS"}, "channel"),
    ({"subscriberIdString": "x@example.com", "subscriptionId": 1001, "statusState": "SUBSCRIBED", "legalBasis": "BECAUSE"}, "legalBasis"),
    ({"subscriberIdString": "x@example.com", "subscriptionId": 1001, "statusState": "SUBSCRIBED", "legalBasisExplanation": "  "}, "legalBasisExplanation"),
    ({"subscriberIdString": "x@example.com", "subscriptionId": 1001, "statusState": "SUBSCRIBED", "colour": "red"}, "colour"),
    ({"subscriberIdString": "x@example.com", "statusState": "SUBSCRIBED"}, "subscriptionId"),
    ("x@example.com,1001,SUBSCRIBED", "input"),
    (None, "input"),
]


def test_every_kind_of_bad_input_is_reported_and_never_sent(emulator, hook):
    good = rows(5)
    mixed = [good[0], *[bad for bad, _ in BAD_INPUTS], *good[1:]]
    report = hook.write_statuses(mixed)
    assert_consistent(report)
    assert report.succeeded == 5
    assert report.failed_count == len(BAD_INPUTS)
    by_index = {f.index: f for f in report.failed}
    for position, (_, field_name) in enumerate(BAD_INPUTS, start=1):
        failure = by_index[position]
        assert failure.category == "INVALID_INPUT" and failure.retryable is False
        assert field_name in failure.message, failure.message
    sent = sum(r.n_inputs for r in emulator.requests)
    assert sent == 5


def test_gdpr_portal_option_requires_legal_basis_pair(emulator, hubspot_conn):
    hook = HubSpotHook(hubspot_conn(emulator), require_legal_basis=True)
    report = hook.write_statuses(
        [
            {**rows(1)[0], "legalBasis": "CONSENT_WITH_NOTICE", "legalBasisExplanation": "Signed up at the fair"},
            {**rows(1, start=1)[0], "legalBasis": "CONSENT_WITH_NOTICE"},
            rows(1, start=2)[0],
        ]
    )
    assert report.succeeded == 1
    assert [f.index for f in report.failed] == [1, 2]
    assert all("legalBasisExplanation" in f.message for f in report.failed)


def test_hubspot_side_gdpr_errors_map_to_their_inputs(hubspot_emulator_factory, hubspot_conn):
    emulator = hubspot_emulator_factory(gdpr=True)
    hook = HubSpotHook(hubspot_conn(emulator))
    good = {**rows(1)[0], "legalBasis": "NON_GDPR", "legalBasisExplanation": "US contact"}
    report = hook.write_statuses([good, rows(1, start=1)[0]])
    assert report.succeeded == 1
    assert [(f.index, f.category) for f in report.failed] == [(1, "VALIDATION_ERROR")]


# --------------------------------------------------------------------------- dedupe and ordering


def test_last_input_for_the_same_key_wins_and_earlier_are_superseded(emulator, hook):
    report = hook.write_statuses(
        [
            {"subscriberIdString": "Dup@Example.com", "subscriptionId": 1001, "statusState": "SUBSCRIBED"},
            {"subscriberIdString": "other@example.com", "subscriptionId": 1001, "statusState": "SUBSCRIBED"},
            {"subscriberIdString": "dup@example.com", "subscriptionId": 1001, "statusState": "NOT_SPECIFIED"},
            {"subscriberIdString": "dup@example.com", "subscriptionId": 1002, "statusState": "SUBSCRIBED"},
            {"subscriberIdString": "DUP@example.com", "subscriptionId": 1001, "statusState": "UNSUBSCRIBED"},
        ]
    )
    assert_consistent(report)
    assert (report.submitted, report.succeeded, report.superseded) == (5, 3, 2)
    assert emulator.status_of("dup@example.com", 1001)["status"] == "UNSUBSCRIBED"
    assert emulator.status_of("dup@example.com", 1002)["status"] == "SUBSCRIBED"
    assert sum(r.n_inputs for r in emulator.requests) == 3


def test_same_key_across_concurrent_batches_keeps_input_order(hubspot_emulator_factory, hubspot_conn):
    emulator = hubspot_emulator_factory(latency_s=(0.0, 0.03), seed=7)
    hook = HubSpotHook(hubspot_conn(emulator), max_concurrency=4)
    states = ["SUBSCRIBED", "UNSUBSCRIBED", "NOT_SPECIFIED"]
    inputs = []
    for i in range(40):
        inputs.append({"subscriberIdString": "flip@example.com", "subscriptionId": 1001, "statusState": states[i % 3]})
        inputs.append({"subscriberIdString": f"filler{i}@example.com", "subscriptionId": 1001, "statusState": "SUBSCRIBED"})
    report = hook.write_statuses(inputs, batch_size=2)
    assert_consistent(report)
    assert report.failed_count == 0
    assert emulator.status_of("flip@example.com", 1001)["status"] == states[39 % 3]


# --------------------------------------------------------------------------- HubSpot-side failures


def test_unknown_subscription_ids_fail_per_item_and_the_rest_land(emulator, hook):
    inputs = rows(10)
    inputs[3] = {**inputs[3], "subscriptionId": 424242}
    inputs[8] = {**inputs[8], "subscriptionId": 515151}
    report = hook.write_statuses(inputs)
    assert_consistent(report)
    assert report.succeeded == 8
    assert sorted((f.index, f.category) for f in report.failed) == [(3, "OBJECT_NOT_FOUND"), (8, "OBJECT_NOT_FOUND")]
    assert report.failed[0].input["subscriptionId"] in (424242, 515151)
    assert report.requests == 1


def test_whole_batch_400_is_bisected_to_isolate_the_bad_inputs(emulator, hook):
    inputs = rows(64)
    inputs[10] = {**inputs[10], "subscriberIdString": "ghost@mail.invalid"}
    inputs[41] = {**inputs[41], "subscriberIdString": "phantom@host.invalid"}
    report = hook.write_statuses(inputs, batch_size=64)
    assert_consistent(report)
    assert report.succeeded == 62
    assert sorted(f.index for f in report.failed) == [10, 41]
    assert {f.category for f in report.failed} == {"VALIDATION_ERROR"}
    assert all(f.correlation_id for f in report.failed)
    assert report.requests > 2  # the bisection itself
    assert emulator.status_of("user11@example.com", 1001) is not None
    assert emulator.status_of("ghost@mail.invalid", 1001) is None


def test_batches_over_hubspots_maximum_still_land(hubspot_emulator_factory, hubspot_conn):
    emulator = hubspot_emulator_factory(max_batch_inputs=10)
    hook = HubSpotHook(hubspot_conn(emulator))
    report = hook.write_statuses(rows(40), batch_size=40)
    assert report.succeeded == 40 and report.failed_count == 0


@pytest.mark.parametrize("kind", ["500", "502", "503", "504", "429", "drop_before", "drop_after"])
def test_transient_failures_are_retried_and_nothing_is_lost(emulator, hook, kind):
    emulator.inject(kind, count=2)
    report = hook.write_statuses(rows(30), batch_size=10)
    assert_consistent(report)
    assert report.succeeded == 30 and report.failed_count == 0
    assert report.retries == 2
    assert report.requests == 5
    if kind == "429":
        assert report.rate_limited == 2
    assert len(emulator.statuses) == 30


def test_read_timeout_is_retried(emulator, hubspot_conn):
    hook = HubSpotHook(hubspot_conn(emulator), timeout=1, max_retries=3)
    emulator.inject("slow:2.5")
    report = hook.write_statuses(rows(5))
    assert report.succeeded == 5 and report.retries == 1


def test_seeded_random_faults_are_survived(hubspot_emulator_factory, hubspot_conn):
    emulator = hubspot_emulator_factory(fault_rate_5xx=0.2, fault_rate_drop_after_write=0.1, seed=3)
    hook = HubSpotHook(hubspot_conn(emulator), max_retries=10)
    report = hook.write_statuses(rows(300), batch_size=10)
    assert_consistent(report)
    assert report.succeeded == 300 and report.retries > 0
    assert len(emulator.statuses) == 300


def test_retry_budget_exhausted_raises_with_a_partial_report(emulator, hubspot_conn):
    hook = HubSpotHook(hubspot_conn(emulator), max_retries=2, max_concurrency=1)
    report_first = hook.write_statuses(rows(10), batch_size=10)
    assert report_first.succeeded == 10
    emulator.inject("503", count=100)
    with pytest.raises(HubSpotUnavailableError, match="unavailable after 2 retries") as caught:
        hook.write_statuses(rows(30, start=100), batch_size=10)
    partial = caught.value.partial_report
    assert partial is not None and partial.succeeded == 0
    assert partial.requests == 3
    assert TOKEN not in str(caught.value)


def test_daily_limit_is_not_retried_and_says_when_it_resets(emulator, hubspot_conn):
    hook = HubSpotHook(hubspot_conn(emulator, portal_timezone="America/New_York"), max_concurrency=1)
    hook.write_statuses(rows(10), batch_size=10)
    emulator.inject("429_daily")
    with pytest.raises(HubSpotDailyLimitError) as caught:
        hook.write_statuses(rows(30, start=50), batch_size=10)
    error = caught.value
    assert len(emulator.requests) == 2  # not retried
    local_reset = error.reset_at.astimezone(hook.portal_timezone)
    assert (local_reset.hour, local_reset.minute) == (0, 0)
    assert timedelta(0) < error.reset_at - datetime.now(timezone.utc) <= timedelta(days=1)
    assert error.partial_report is not None and error.partial_report.submitted == 0


def test_daily_limit_with_retry_after(hubspot_emulator_factory, hubspot_conn):
    emulator = hubspot_emulator_factory(daily_limit=2, daily_reset_s=30)
    hook = HubSpotHook(hubspot_conn(emulator), max_concurrency=1)
    with pytest.raises(HubSpotDailyLimitError) as caught:
        hook.write_statuses(rows(50), batch_size=10)
    assert caught.value.partial_report.succeeded == 20
    assert timedelta(seconds=1) < caught.value.reset_at - datetime.now(timezone.utc) <= timedelta(seconds=31)


# --------------------------------------------------------------------------- pacing


def test_pacing_learns_the_window_and_stays_under_the_limit(hubspot_emulator_factory, hubspot_conn):
    emulator = hubspot_emulator_factory(rate_limit_max=5, rate_limit_interval_ms=400)
    hook = HubSpotHook(hubspot_conn(emulator), max_concurrency=2)
    report = hook.write_statuses(rows(60), batch_size=2)
    assert report.succeeded == 60
    assert report.rate_limited == 0
    assert (hook.pacer.max_requests, hook.pacer.interval_s) == (5, 0.4)
    assert all(r.kind == "ok" for r in emulator.requests)


def test_pacing_accounts_for_other_clients_of_the_same_app(hubspot_emulator_factory, hubspot_conn):
    import requests

    emulator = hubspot_emulator_factory(rate_limit_max=6, rate_limit_interval_ms=500)
    hook = HubSpotHook(hubspot_conn(emulator), max_concurrency=1)
    hook.write_statuses(rows(1))
    # Another client of the same app uses half the window right before our run.
    url = f"{emulator.url}/communication-preferences/v4/definitions"
    for _ in range(3):
        requests.get(url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
    report = hook.write_statuses(rows(12, start=10), batch_size=1)
    assert report.succeeded == 12
    assert report.rate_limited <= 1


# --------------------------------------------------------------------------- auth


def test_401_raises_at_once_with_a_clear_message(emulator, hubspot_conn, monkeypatch):
    conn_json = json.loads(emulator.airflow_connection("hubspot_default"))
    conn_json["password"] = "pat-na1-wrong-token-value"
    monkeypatch.setenv("AIRFLOW_CONN_HUBSPOT_DEFAULT", json.dumps(conn_json))
    hook = HubSpotHook()
    with pytest.raises(HubSpotAuthError, match="rejected the access token") as caught:
        hook.write_statuses(rows(3))
    assert len(emulator.requests) == 1
    assert "pat-na1-wrong-token-value" not in str(caught.value)


def test_403_names_the_missing_scopes(hubspot_emulator_factory, hubspot_conn, monkeypatch):
    emulator = hubspot_emulator_factory(extra_tokens={"pat-read-only": ["communication_preferences.read"]})
    conn_json = json.loads(emulator.airflow_connection("hubspot_default"))
    conn_json["password"] = "pat-read-only"
    monkeypatch.setenv("AIRFLOW_CONN_HUBSPOT_DEFAULT", json.dumps(conn_json))
    with pytest.raises(HubSpotScopeError) as caught:
        HubSpotHook().write_statuses(rows(3))
    assert "communication_preferences.statuses.batch.write" in caught.value.required_scopes
    assert "communication_preferences.statuses.batch.write" in str(caught.value)
    assert len(emulator.requests) == 1


def _oauth_conn(emulator, monkeypatch, **overrides):
    conn_json = json.loads(emulator.airflow_connection("hubspot_oauth"))
    conn_json.pop("password", None)
    conn_json["extra"] = {
        "client_id": "emulator-client-id",
        "client_secret": "emulator-client-secret",
        "refresh_token": "emulator-refresh-token",
        **overrides,
    }
    monkeypatch.setenv("AIRFLOW_CONN_HUBSPOT_OAUTH", json.dumps(conn_json))
    return "hubspot_oauth"


def test_oauth_refresh_token_flow_caches_and_renews(hubspot_emulator_factory, monkeypatch):
    emulator = hubspot_emulator_factory(oauth_expires_in=2)
    hook = HubSpotHook(_oauth_conn(emulator, monkeypatch))
    assert hook.write_statuses(rows(20), batch_size=5).succeeded == 20
    assert emulator.token_requests == 1  # one token for four requests
    time.sleep(2.1)  # past the token's lifetime
    assert hook.write_statuses(rows(5, start=100)).succeeded == 5
    assert emulator.token_requests == 2


def test_oauth_bad_credentials_fail_clearly_without_leaking(hubspot_emulator_factory, monkeypatch, task_log):
    emulator = hubspot_emulator_factory()
    hook = HubSpotHook(_oauth_conn(emulator, monkeypatch, client_secret="wrong-secret-value"))
    with pytest.raises(HubSpotAuthError, match="OAuth token refresh") as caught:
        hook.write_statuses(rows(1))
    assert "wrong-secret-value" not in str(caught.value) and "emulator-refresh-token" not in str(caught.value)
    logged = task_log()
    assert "HubSpot write interrupted" in logged and "wrong-secret-value" not in logged


# --------------------------------------------------------------------------- connection handling and hygiene


def test_base_url_from_host_schema_and_port(monkeypatch):
    def hook_for(conn: dict) -> HubSpotHook:
        monkeypatch.setenv("AIRFLOW_CONN_HUBSPOT_X", json.dumps({"conn_type": "hubspot", "password": "t", **conn}))
        hook = HubSpotHook("hubspot_x")
        hook.get_conn()
        return hook

    assert hook_for({}).base_url == "https://api.hubapi.com"
    assert hook_for({"host": "api.hubapi.com"}).base_url == "https://api.hubapi.com"
    assert hook_for({"host": "https://api.hubapi.com/"}).base_url == "https://api.hubapi.com"
    assert hook_for({"host": "127.0.0.1", "schema": "http", "port": 8080}).base_url == "http://127.0.0.1:8080"
    assert hook_for({"host": "http://localhost", "port": 9}).base_url == "http://localhost:9"
    with pytest.raises(HubSpotConfigError, match="plain http"):
        hook_for({"host": "http://api.hubapi.com"})
    with pytest.raises(HubSpotConfigError, match="plain http"):
        hook_for({"host": "api.hubapi.com", "schema": "http"})


def test_connection_extras_as_strings_and_prefixed_keys(monkeypatch):
    monkeypatch.setenv(
        "AIRFLOW_CONN_HUBSPOT_URI", "hubspot://:pat-x@api.hubapi.com?batch_size=50&max_retries=3&timeout=12.5"
    )
    hook = HubSpotHook("hubspot_uri")
    assert (hook.batch_size, hook.max_retries, hook.timeout[1], hook.api_version) == (50, 3, 12.5, "v4")
    monkeypatch.setenv(
        "AIRFLOW_CONN_HUBSPOT_UI",
        json.dumps({"conn_type": "hubspot", "password": "t", "extra": {"extra__hubspot__api_version": "2026-03"}}),
    )
    assert HubSpotHook("hubspot_ui").api_base_path == "/communication-preferences/2026-03"
    monkeypatch.setenv(
        "AIRFLOW_CONN_HUBSPOT_BAD", json.dumps({"conn_type": "hubspot", "password": "t", "extra": {"api_version": "v3"}})
    )
    with pytest.raises(HubSpotConfigError, match="api_version 'v3' is not supported"):
        _ = HubSpotHook("hubspot_bad").api_base_path


def test_missing_token_is_a_clear_config_error(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_HUBSPOT_EMPTY", json.dumps({"conn_type": "hubspot"}))
    with pytest.raises(HubSpotConfigError, match="has no access token"):
        HubSpotHook("hubspot_empty").write_statuses(rows(1))


def test_token_never_reaches_repr_logs_or_errors(emulator, hook, task_log):
    emulator.inject("503")
    emulator.inject("429")
    report = hook.write_statuses(rows(12) + [{"subscriberIdString": "bad", "subscriptionId": 1, "statusState": "X"}])
    session = hook.get_conn()
    logged = task_log()
    assert "retry 1/" in logged and "HubSpot write:" in logged
    for text in (repr(hook), str(hook.__dict__), repr(session.auth), repr(session.headers), logged,
                 report.model_dump_json()):
        assert TOKEN not in text
    assert "@example.com" not in logged


def test_reads_definitions_and_test_connection(emulator, hook):
    hook.write_statuses(rows(2, state="UNSUBSCRIBED"))
    read = hook.batch_read_statuses(["user0@example.com", "user1@example.com"])
    statuses = {c.subscriber_id_string.lower(): c.statuses for c in read.results}
    assert any(s.subscription_id == 1001 and s.status.value == "UNSUBSCRIBED" for s in statuses["user0@example.com"])
    definitions = hook.get_subscription_definitions()
    assert {d.id for d in definitions} >= {"1001", "1002", "1003"}
    ok, message = hook.test_connection()
    assert ok and "subscription definitions" in message


def test_test_connection_reports_failure(emulator, hubspot_conn, monkeypatch):
    conn_json = json.loads(emulator.airflow_connection("hubspot_default"))
    conn_json["password"] = "pat-nope"
    monkeypatch.setenv("AIRFLOW_CONN_HUBSPOT_DEFAULT", json.dumps(conn_json))
    ok, message = HubSpotHook().test_connection()
    assert not ok and "401" in message


def test_a_rate_limit_wait_over_max_wait_s_raises_for_deferral(emulator, hubspot_conn):
    from hubspot_provider.exceptions import HubSpotRateLimitError

    hook = HubSpotHook(hubspot_conn(emulator), max_wait_s=0.01, max_concurrency=1)
    emulator.inject("429")
    with pytest.raises(HubSpotRateLimitError, match="longer than max_wait_s") as caught:
        hook.write_statuses(rows(5))
    assert caught.value.reset_at > datetime.now(timezone.utc) - timedelta(seconds=1)
    assert caught.value.partial_report.submitted == 0
