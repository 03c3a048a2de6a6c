"""Behaviour of the HubSpot emulator itself, exercised over loopback with plain ``requests``."""

from __future__ import annotations

import copy
import http.client
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import requests

from hubspot_provider.testing import HubSpotEmulator, RequestRecord

V4 = "/communication-preferences/v4"
V2026 = "/communication-preferences/2026-03"
TOKEN = "pat-emulator-token"
SPEC_DIR = Path(__file__).resolve().parents[2] / "shared" / "hubspot-spec"
SPEC_FILES = {
    V4: "communication-preferences-v4.openapi.json",
    V2026: "communication-preferences-2026-03.openapi.json",
}
WRITE_SCOPE = "communication_preferences.statuses.batch.write"
READ_SCOPE = "communication_preferences.statuses.batch.read"
CORRELATION_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def status_input(
    email: str, subscription_id: int = 1001, state: str = "SUBSCRIBED", **extra: Any
) -> dict[str, Any]:
    return {
        "channel": "EMAIL",
        "statusState": state,
        "subscriberIdString": email,
        "subscriptionId": subscription_id,
        **extra,
    }


def client(token: str | None = TOKEN) -> requests.Session:
    session = requests.Session()
    if token is not None:
        session.headers["Authorization"] = f"Bearer {token}"
    return session


def write(
    hs: HubSpotEmulator,
    inputs: list[Any],
    session: requests.Session | None = None,
    base: str = V4,
) -> requests.Response:
    url = f"{hs.url}{base}/statuses/batch/write"
    return (session or client()).post(url, json={"inputs": inputs}, timeout=10)


def read(hs: HubSpotEmulator, emails: list[Any], base: str = V4) -> requests.Response:
    url = f"{hs.url}{base}/statuses/batch/read"
    return client().post(url, params={"channel": "EMAIL"}, json={"inputs": emails}, timeout=10)


def assert_error_body(response: requests.Response, status: int, category: str) -> dict[str, Any]:
    assert response.status_code == status
    body = response.json()
    assert body["status"] == "error"
    assert body["category"] == category
    assert body["correlationId"] == response.headers["X-HubSpot-Correlation-Id"]
    return body


# --------------------------------------------------------------------------- writes and reads


def test_write_applies_and_reads_back(hubspot_emulator: HubSpotEmulator) -> None:
    hs = hubspot_emulator
    response = write(
        hs,
        [
            status_input(
                "Ada@Example.COM", 1001, legalBasis="CONSENT_WITH_NOTICE", legalBasisExplanation="web form"
            ),
            status_input("grace@example.com", 1002, "UNSUBSCRIBED"),
        ],
    )

    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "COMPLETE"
    assert "errors" not in body and "numErrors" not in body
    for field in ("startedAt", "completedAt", "requestedAt"):
        assert body[field].endswith("Z")
        datetime.fromisoformat(body[field].replace("Z", "+00:00"))  # 3.10 lacks "Z"
    first, second = body["results"]
    assert first == {
        "channel": "EMAIL",
        "source": "Public status API",
        "status": "SUBSCRIBED",
        "subscriberIdString": "ada@example.com",
        "subscriptionId": 1001,
        "timestamp": first["timestamp"],
        "businessUnitId": 0,
        "legalBasis": "CONSENT_WITH_NOTICE",
        "legalBasisExplanation": "web form",
        "setStatusSuccessReason": "REQUESTED_CHANGE_OCCURRED",
        "subscriptionName": "Newsletter",
    }
    assert second["legalBasis"] is None and second["legalBasisExplanation"] is None
    assert second["subscriptionName"] == "Product updates"

    assert hs.writes_applied == 2
    assert hs.status_of("ADA@example.com", 1001)["status"] == "SUBSCRIBED"
    assert hs.status_of("grace@example.com", 1002)["status"] == "UNSUBSCRIBED"
    assert hs.status_of("grace@example.com", 1001) is None
    assert set(hs.statuses) == {("ada@example.com", 1001, "EMAIL"), ("grace@example.com", 1002, "EMAIL")}

    read_back = read(hs, ["ada@EXAMPLE.com", "nobody@example.com"])
    assert read_back.status_code == 200
    results = {item["subscriberIdString"]: item["statuses"] for item in read_back.json()["results"]}
    assert [s["status"] for s in results["ada@example.com"]] == ["SUBSCRIBED"]
    assert results["nobody@example.com"] == []

    first_record = hs.requests[0]
    assert first_record == RequestRecord(
        method="POST",
        path=f"{V4}/statuses/batch/write",
        status=200,
        n_inputs=2,
        at=first_record.at,
        kind="ok",
    )


def test_snapshots_are_copies(hubspot_emulator: HubSpotEmulator) -> None:
    hs = hubspot_emulator
    write(hs, [status_input("ada@example.com")])
    hs.statuses[("ada@example.com", 1001, "EMAIL")]["status"] = "UNSUBSCRIBED"
    hs.status_of("ada@example.com", 1001)["status"] = "UNSUBSCRIBED"
    hs.requests.clear()
    assert hs.status_of("ada@example.com", 1001)["status"] == "SUBSCRIBED"
    assert len(hs.requests) == 1


def test_set_status_success_reason_transitions(hubspot_emulator: HubSpotEmulator) -> None:
    hs = hubspot_emulator

    def reason(state: str, email: str = "ada@example.com") -> str:
        response = write(hs, [status_input(email, 1001, state)])
        assert response.status_code == 200
        return response.json()["results"][0]["setStatusSuccessReason"]

    assert reason("SUBSCRIBED") == "REQUESTED_CHANGE_OCCURRED"
    assert reason("SUBSCRIBED") == "NO_STATUS_CHANGE"
    assert reason("UNSUBSCRIBED") == "REQUESTED_CHANGE_OCCURRED"
    assert reason("SUBSCRIBED") == "RESUBSCRIBE_OCCURRED"
    assert reason("NOT_SPECIFIED") == "REQUESTED_CHANGE_OCCURRED"
    assert reason("NOT_SPECIFIED", "new@example.com") == "NO_STATUS_CHANGE"

    # Inputs apply in order, so the later input for the same key wins.
    response = write(
        hs,
        [
            status_input("grace@example.com", 1003, "UNSUBSCRIBED"),
            status_input("GRACE@example.com", 1003, "SUBSCRIBED"),
        ],
    )
    assert [r["setStatusSuccessReason"] for r in response.json()["results"]] == [
        "REQUESTED_CHANGE_OCCURRED",
        "RESUBSCRIBE_OCCURRED",
    ]
    assert hs.status_of("grace@example.com", 1003)["status"] == "SUBSCRIBED"


@pytest.mark.parametrize(("multi_status", "expected_status"), [(False, 200), (True, 207)])
def test_unknown_subscription_is_a_per_input_error(
    hubspot_emulator_factory: Any, multi_status: bool, expected_status: int
) -> None:
    hs = hubspot_emulator_factory(multi_status=multi_status)
    response = write(
        hs,
        [
            status_input("ada@example.com", 1001),
            status_input("bob@example.com", 4242),
            status_input("cy@example.com"),
        ],
    )

    assert response.status_code == expected_status
    body = response.json()
    assert [r["subscriberIdString"] for r in body["results"]] == ["ada@example.com", "cy@example.com"]
    assert body["numErrors"] == 1
    assert body["errors"] == [
        {
            "status": "error",
            "category": "OBJECT_NOT_FOUND",
            "message": "Subscription 4242 does not exist for subscriber bob@example.com",
            "context": {"subscriberIdString": ["bob@example.com"], "subscriptionId": ["4242"]},
            "errors": [],
            "links": {},
        }
    ]
    assert hs.writes_applied == 2
    assert hs.status_of("bob@example.com", 4242) is None

    # Without errors a batch write is a plain 200 either way.
    assert write(hs, [status_input("dee@example.com")]).status_code == 200


def test_custom_subscriptions(hubspot_emulator_factory: Any) -> None:
    hs = hubspot_emulator_factory(subscriptions=[7, {"id": "8", "name": "Billing", "isActive": False}])
    definitions = client().get(f"{hs.url}{V4}/definitions", timeout=10).json()["results"]
    assert [(d["id"], d["name"], d["isActive"]) for d in definitions] == [
        ("7", "Subscription 7", True),
        ("8", "Billing", False),
    ]
    body = write(hs, [status_input("ada@example.com", 8), status_input("ada@example.com", 1001)]).json()
    assert body["results"][0]["subscriptionName"] == "Billing"
    assert body["errors"][0]["context"]["subscriptionId"] == ["1001"]


MALFORMED_INPUTS = {
    "channel": status_input("ada@example.com", channel="SMS"),
    "channel missing": {k: v for k, v in status_input("ada@example.com").items() if k != "channel"},
    "statusState": status_input("ada@example.com", state="OPTED_IN"),
    "email missing": {k: v for k, v in status_input("ada@example.com").items() if k != "subscriberIdString"},
    "email syntax": status_input("ada.example.com"),
    "email domain": status_input("ada@example"),
    "email not a string": status_input(42),  # type: ignore[arg-type]
    "email .invalid": status_input("x@bad.invalid"),
    "email .INVALID": status_input("x@mail.Bad.INVALID"),
    "subscriptionId string": status_input("ada@example.com", "1001"),  # type: ignore[arg-type]
    "subscriptionId bool": status_input("ada@example.com", True),  # type: ignore[arg-type]
    "subscriptionId float": status_input("ada@example.com", 1001.5),  # type: ignore[arg-type]
    "legalBasis": status_input("ada@example.com", legalBasis="BECAUSE"),
    "legalBasisExplanation": status_input("ada@example.com", legalBasisExplanation=["why"]),
    "not an object": ["ada@example.com"],
}


@pytest.mark.parametrize("bad_input", MALFORMED_INPUTS.values(), ids=MALFORMED_INPUTS.keys())
def test_one_malformed_input_rejects_the_whole_batch(
    hubspot_emulator: HubSpotEmulator, bad_input: Any
) -> None:
    hs = hubspot_emulator
    good = [status_input(f"user{i}@example.com") for i in range(3)]
    response = write(hs, [*good[:2], bad_input, good[2]])

    body = assert_error_body(response, 400, "VALIDATION_ERROR")
    assert body["message"].startswith("Invalid input JSON")
    assert "2" not in body["message"] and "[" not in body["message"]
    assert hs.statuses == {}
    assert hs.writes_applied == 0
    assert hs.requests[-1].kind == "bad_request"
    assert hs.requests[-1].n_inputs == 4


@pytest.mark.parametrize(
    "raw_body",
    [b"not json", b"[]", b'{"inputs": {"a": 1}}', b'{"input": []}', b"\xff\xfe\x00"],
    ids=["not json", "array", "inputs not a list", "no inputs", "not utf-8"],
)
def test_malformed_body_is_a_400(hubspot_emulator: HubSpotEmulator, raw_body: bytes) -> None:
    response = client().post(
        f"{hubspot_emulator.url}{V4}/statuses/batch/write",
        data=raw_body,
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    assert assert_error_body(response, 400, "VALIDATION_ERROR")["message"].startswith("Invalid input JSON")


def test_max_batch_inputs(hubspot_emulator_factory: Any) -> None:
    hs = hubspot_emulator_factory(max_batch_inputs=3)
    assert write(hs, [status_input(f"u{i}@example.com") for i in range(3)]).status_code == 200

    response = write(hs, [status_input(f"v{i}@example.com") for i in range(4)])
    body = assert_error_body(response, 400, "VALIDATION_ERROR")
    assert body["message"] == "The maximum number of inputs supported in a batch request is 3"
    assert hs.writes_applied == 3
    assert hs.status_of("v0@example.com", 1001) is None


def test_gdpr_requires_legal_basis_per_input(hubspot_emulator_factory: Any) -> None:
    hs = hubspot_emulator_factory(gdpr=True)
    response = write(
        hs,
        [
            status_input(
                "ok@example.com", legalBasis="LEGITIMATE_INTEREST_CLIENT", legalBasisExplanation="customer"
            ),
            status_input("nobasis@example.com"),
            status_input("noexplanation@example.com", legalBasis="CONSENT_WITH_NOTICE"),
        ],
    )

    assert response.status_code == 200
    body = response.json()
    assert [r["subscriberIdString"] for r in body["results"]] == ["ok@example.com"]
    assert body["numErrors"] == 2
    assert {e["category"] for e in body["errors"]} == {"VALIDATION_ERROR"}
    assert [e["context"]["subscriberIdString"] for e in body["errors"]] == [
        ["nobasis@example.com"],
        ["noexplanation@example.com"],
    ]
    assert all(e["context"]["subscriptionId"] == ["1001"] for e in body["errors"])
    assert hs.status_of("nobasis@example.com", 1001) is None


def test_batch_read_reports_malformed_emails_with_207(hubspot_emulator: HubSpotEmulator) -> None:
    hs = hubspot_emulator
    write(hs, [status_input("ada@example.com", 1001), status_input("ada@example.com", 1003, "UNSUBSCRIBED")])

    response = read(hs, ["ada@example.com", "not-an-email", "x@bad.invalid"])
    assert response.status_code == 207
    body = response.json()
    assert body["numErrors"] == 2
    assert [e["category"] for e in body["errors"]] == ["VALIDATION_ERROR", "VALIDATION_ERROR"]
    (result,) = body["results"]
    assert [(s["subscriptionId"], s["status"]) for s in result["statuses"]] == [
        (1001, "SUBSCRIBED"),
        (1003, "UNSUBSCRIBED"),
    ]


def test_batch_read_requires_email_channel(hubspot_emulator: HubSpotEmulator) -> None:
    url = f"{hubspot_emulator.url}{V4}/statuses/batch/read"
    body = {"inputs": ["ada@example.com"]}
    assert_error_body(client().post(url, json=body, timeout=10), 400, "VALIDATION_ERROR")
    sms = client().post(url, params={"channel": "SMS"}, json=body, timeout=10)
    assert_error_body(sms, 400, "VALIDATION_ERROR")


def test_2026_03_base_path(hubspot_emulator: HubSpotEmulator) -> None:
    hs = hubspot_emulator
    response = write(hs, [status_input("ada@example.com", 1002)], base=V2026)
    assert response.status_code == 200
    (result,) = read(hs, ["ada@example.com"], base=V2026).json()["results"]
    assert result["statuses"][0]["subscriptionId"] == 1002
    definitions = client().get(f"{hs.url}{V2026}/definitions", timeout=10)
    assert [d["id"] for d in definitions.json()["results"]] == ["1001", "1002", "1003"]
    assert hs.requests[0].path == f"{V2026}/statuses/batch/write"


def test_unknown_path_and_wrong_method(hubspot_emulator: HubSpotEmulator) -> None:
    hs = hubspot_emulator
    assert_error_body(client().get(f"{hs.url}{V4}/nope", timeout=10), 404, "OBJECT_NOT_FOUND")
    v3 = client().get(f"{hs.url}/communication-preferences/v3/definitions", timeout=10)
    assert_error_body(v3, 404, "OBJECT_NOT_FOUND")
    assert client().get(f"{hs.url}{V4}/statuses/batch/write", timeout=10).status_code == 405
    assert {r.kind for r in hs.requests} == {"bad_request"}


def test_every_response_carries_correlation_and_rate_limit_headers(hubspot_emulator: HubSpotEmulator) -> None:
    hs = hubspot_emulator
    responses = [
        write(hs, [status_input("ada@example.com")]),
        write(hs, [status_input("x@bad.invalid")]),
        write(hs, [status_input("ada@example.com")], session=client(None)),
        client().get(f"{hs.url}/nope", timeout=10),
        client().get(f"{hs.url}{V4}/definitions", timeout=10),
    ]
    seen = set()
    for response in responses:
        correlation_id = response.headers["X-HubSpot-Correlation-Id"]
        assert CORRELATION_ID.match(correlation_id)
        assert response.json().get("correlationId", correlation_id) == correlation_id
        assert response.headers["X-HubSpot-RateLimit-Max"] == "100"
        assert response.headers["X-HubSpot-RateLimit-Interval-Milliseconds"] == "10000"
        assert int(response.headers["X-HubSpot-RateLimit-Remaining"]) <= 99
        assert "X-HubSpot-RateLimit-Daily" not in response.headers
        seen.add(correlation_id)
    assert len(seen) == len(responses)


def test_connections_are_kept_alive(hubspot_emulator: HubSpotEmulator) -> None:
    # http.client reconnects silently when a server closes the connection, so an unchanged socket
    # object across requests proves the emulator kept it open.
    connection = http.client.HTTPConnection("127.0.0.1", hubspot_emulator.port, timeout=10)
    try:
        sockets = []
        for i in range(3):
            body = json.dumps({"inputs": [status_input(f"u{i}@example.com")]})
            connection.request(
                "POST",
                f"{V4}/statuses/batch/write",
                body=body,
                headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
            )
            response = connection.getresponse()
            assert response.status == 200 and response.version == 11
            assert int(response.headers["Content-Length"]) == len(response.read())
            sockets.append(connection.sock)
        assert sockets[0] is not None and sockets.count(sockets[0]) == 3
    finally:
        connection.close()


# --------------------------------------------------------------------------- authentication


def test_missing_or_unknown_token_is_401(hubspot_emulator: HubSpotEmulator) -> None:
    hs = hubspot_emulator
    cases = [client(None), client("pat-wrong")]
    basic = requests.Session()
    basic.headers["Authorization"] = f"Basic {TOKEN}"
    cases.append(basic)
    for session in cases:
        response = write(hs, [status_input("ada@example.com")], session=session)
        body = assert_error_body(response, 401, "INVALID_AUTHENTICATION")
        assert body["message"].startswith("Authentication credentials not found.")
    assert hs.statuses == {}
    assert [r.kind for r in hs.requests] == ["unauthorized"] * 3


def test_token_without_scope_is_403(hubspot_emulator_factory: Any) -> None:
    hs = hubspot_emulator_factory(extra_tokens={"pat-read-only": [READ_SCOPE]})
    response = write(hs, [status_input("ada@example.com")], session=client("pat-read-only"))

    body = assert_error_body(response, 403, "MISSING_SCOPES")
    assert body["errors"][0]["context"]["requiredScopes"] == [WRITE_SCOPE]
    assert hs.statuses == {}
    assert hs.requests[-1].kind == "forbidden"
    # The same token may still read.
    reader = client("pat-read-only").post(
        f"{hs.url}{V4}/statuses/batch/read", params={"channel": "EMAIL"}, json={"inputs": []}, timeout=10
    )
    assert reader.status_code == 200


@pytest.mark.parametrize("token_path", ["/oauth/v1/token", "/oauth/2026-03/token"])
def test_oauth_refresh_flow_and_expiry(hubspot_emulator_factory: Any, token_path: str) -> None:
    hs = hubspot_emulator_factory(oauth_expires_in=1, daily_limit=100)
    form = {
        "grant_type": "refresh_token",
        "client_id": "emulator-client-id",
        "client_secret": "emulator-client-secret",
        "refresh_token": "emulator-refresh-token",
    }
    response = requests.post(f"{hs.url}{token_path}", data=form, timeout=10)
    assert response.status_code == 200
    grant = response.json()
    assert grant["token_type"] == "bearer"
    assert grant["expires_in"] == 1
    assert grant["refresh_token"] == "emulator-refresh-token"
    assert hs.token_requests == 1

    written = write(hs, [status_input("ada@example.com")], session=client(grant["access_token"]))
    assert written.status_code == 200
    # OAuth calls carry no daily headers, static-token calls do.
    assert "X-HubSpot-RateLimit-Daily" not in written.headers
    assert write(hs, [status_input("ada@example.com")]).headers["X-HubSpot-RateLimit-Daily"] == "100"

    time.sleep(1.1)
    expired = write(hs, [status_input("bob@example.com")], session=client(grant["access_token"]))
    assert_error_body(expired, 401, "INVALID_AUTHENTICATION")
    assert hs.status_of("bob@example.com", 1001) is None

    for field, value in [("refresh_token", "stolen"), ("client_secret", "guess"), ("client_id", "other")]:
        bad = requests.post(f"{hs.url}{token_path}", data={**form, field: value}, timeout=10)
        assert bad.status_code == 400
        assert bad.json()["status"] == "BAD_REFRESH_TOKEN"
        assert bad.json()["error"] == "invalid_grant"
        assert bad.json()["correlationId"] == bad.headers["X-HubSpot-Correlation-Id"]
    wrong_grant = requests.post(f"{hs.url}{token_path}", data={**form, "grant_type": "password"}, timeout=10)
    assert wrong_grant.status_code == 400
    assert hs.token_requests == 1


# --------------------------------------------------------------------------- rate limits


def test_rolling_rate_limit(hubspot_emulator_factory: Any) -> None:
    hs = hubspot_emulator_factory(rate_limit_max=3, rate_limit_interval_ms=1000)
    session = client()
    remaining = []
    for i in range(3):
        response = write(hs, [status_input(f"u{i}@example.com")], session=session)
        assert response.status_code == 200
        assert response.headers["X-HubSpot-RateLimit-Max"] == "3"
        assert response.headers["X-HubSpot-RateLimit-Interval-Milliseconds"] == "1000"
        remaining.append(response.headers["X-HubSpot-RateLimit-Remaining"])
    assert remaining == ["2", "1", "0"]

    for _ in range(2):  # rejected requests do not use up budget, so both are refused alike
        limited = write(hs, [status_input("late@example.com")], session=session)
        assert limited.status_code == 429
        body = limited.json()
        assert body == {
            "status": "error",
            "message": "You have reached your ten_secondly_rolling limit.",
            "errorType": "RATE_LIMIT",
            "correlationId": limited.headers["X-HubSpot-Correlation-Id"],
            "policyName": "TEN_SECONDLY_ROLLING",
            "groupName": body["groupName"],
        }
        assert body["groupName"].startswith("publicapi:private-app-api-calls-ten-secondly:")
        assert limited.headers["X-HubSpot-RateLimit-Remaining"] == "0"
    assert hs.status_of("late@example.com", 1001) is None

    # Reads and definitions share the same budget.
    assert client().get(f"{hs.url}{V4}/definitions", timeout=10).status_code == 429

    time.sleep(1.1)
    after = write(hs, [status_input("late@example.com")], session=session)
    assert after.status_code == 200
    assert after.headers["X-HubSpot-RateLimit-Remaining"] == "2"
    assert [r.kind for r in hs.requests] == ["ok"] * 3 + ["rate_limited"] * 3 + ["ok"]


def test_daily_limit_without_reset(hubspot_emulator_factory: Any) -> None:
    hs = hubspot_emulator_factory(daily_limit=2)
    first = write(hs, [status_input("a@example.com")])
    assert first.headers["X-HubSpot-RateLimit-Daily"] == "2"
    assert first.headers["X-HubSpot-RateLimit-Daily-Remaining"] == "1"
    assert write(hs, [status_input("b@example.com")]).headers["X-HubSpot-RateLimit-Daily-Remaining"] == "0"

    limited = write(hs, [status_input("c@example.com")])
    assert limited.status_code == 429
    body = limited.json()
    assert body["policyName"] == "DAILY"
    assert body["errorType"] == "RATE_LIMIT"
    assert body["message"] == "You have reached your daily limit."
    assert body["correlationId"] == limited.headers["X-HubSpot-Correlation-Id"]
    assert re.match(r"^[0-9a-f-]{36}$", body["requestId"])
    assert "Retry-After" not in limited.headers
    assert hs.status_of("c@example.com", 1001) is None
    assert hs.requests[-1].kind == "daily_limited"

    hs.reset_daily()
    assert write(hs, [status_input("c@example.com")]).status_code == 200


def test_daily_limit_with_reset(hubspot_emulator_factory: Any) -> None:
    hs = hubspot_emulator_factory(daily_limit=1, daily_reset_s=0.5)
    assert write(hs, [status_input("a@example.com")]).status_code == 200
    limited = write(hs, [status_input("b@example.com")])
    assert limited.status_code == 429
    assert limited.json()["policyName"] == "DAILY"
    assert limited.headers["Retry-After"] == "1"

    time.sleep(0.6)
    assert write(hs, [status_input("b@example.com")]).status_code == 200
    assert hs.status_of("b@example.com", 1001)["status"] == "SUBSCRIBED"


# --------------------------------------------------------------------------- faults


def _outcomes(hs: HubSpotEmulator, n: int) -> list[int | str]:
    outcomes: list[int | str] = []
    session = client()
    for i in range(n):
        try:
            outcomes.append(write(hs, [status_input(f"u{i}@example.com")], session=session).status_code)
        except requests.ConnectionError:
            outcomes.append("dropped")
    return outcomes


def test_seeded_faults_are_reproducible(hubspot_emulator_factory: Any) -> None:
    settings = {"fault_rate_5xx": 0.3, "fault_rate_drop_after_write": 0.2, "rate_limit_max": 10_000}
    first = hubspot_emulator_factory(seed=7, **settings)
    second = hubspot_emulator_factory(seed=7, **settings)
    outcomes = _outcomes(first, 40)

    assert outcomes == _outcomes(second, 40)
    assert {500, 502, 503, 504} & set(outcomes)
    assert "dropped" in outcomes and 200 in outcomes
    for i, outcome in enumerate(outcomes):
        applied = first.status_of(f"u{i}@example.com", 1001) is not None
        # A 5xx applies nothing; a dropped connection happened after the write was applied.
        assert applied == (outcome in (200, "dropped"))
        if outcome != "dropped" and outcome != 200:
            assert first.requests[i].kind == "fault"
    assert [r.status for r in first.requests if r.kind == "dropped"] == [None] * outcomes.count("dropped")

    first.reset()
    assert _outcomes(first, 40) == outcomes
    assert _outcomes(hubspot_emulator_factory(seed=8, **settings), 40) != outcomes


@pytest.mark.parametrize(
    ("kind", "status", "record_kind"),
    [
        ("500", 500, "fault"),
        ("502", 502, "fault"),
        ("503", 503, "fault"),
        ("504", 504, "fault"),
        ("429", 429, "rate_limited"),
        ("429_daily", 429, "daily_limited"),
        ("401", 401, "unauthorized"),
        ("403", 403, "forbidden"),
    ],
)
def test_injected_error_responses(
    hubspot_emulator: HubSpotEmulator, kind: str, status: int, record_kind: str
) -> None:
    hs = hubspot_emulator
    hs.inject(kind)
    response = write(hs, [status_input("ada@example.com"), status_input("bob@example.com")])

    assert response.status_code == status
    body = response.json()
    assert body["correlationId"] == response.headers["X-HubSpot-Correlation-Id"]
    if kind == "429":
        assert body["policyName"] == "TEN_SECONDLY_ROLLING"
    elif kind == "429_daily":
        assert body["policyName"] == "DAILY"
        assert "Retry-After" not in response.headers
    elif kind == "401":
        assert body["category"] == "INVALID_AUTHENTICATION"
    elif kind == "403":
        assert body["category"] == "MISSING_SCOPES"
        assert body["errors"][0]["context"]["requiredScopes"] == [WRITE_SCOPE]
    else:
        assert body["status"] == "error" and body["message"]
    assert hs.statuses == {}
    assert hs.requests[-1].kind == record_kind
    assert hs.requests[-1].n_inputs == 2

    assert write(hs, [status_input("ada@example.com")]).status_code == 200


def test_injected_daily_429_carries_retry_after_when_days_reset(hubspot_emulator_factory: Any) -> None:
    hs = hubspot_emulator_factory(daily_limit=1000, daily_reset_s=30)
    hs.inject("429_daily")
    response = write(hs, [status_input("ada@example.com")])
    assert response.status_code == 429
    assert 1 <= int(response.headers["Retry-After"]) <= 30


def test_injected_drop_before_applies_nothing(hubspot_emulator: HubSpotEmulator) -> None:
    hs = hubspot_emulator
    session = client()
    hs.inject("drop_before")
    with pytest.raises(requests.ConnectionError):
        write(hs, [status_input("ada@example.com")], session=session)
    assert hs.status_of("ada@example.com", 1001) is None
    assert hs.requests[-1].status is None and hs.requests[-1].kind == "dropped"
    # The client reconnects transparently on the next request.
    assert write(hs, [status_input("ada@example.com")], session=session).status_code == 200


def test_injected_drop_after_applies_the_write(hubspot_emulator: HubSpotEmulator) -> None:
    hs = hubspot_emulator
    hs.inject("drop_after")
    with pytest.raises(requests.ConnectionError):
        write(hs, [status_input("ada@example.com", state="UNSUBSCRIBED")])
    assert hs.status_of("ada@example.com", 1001)["status"] == "UNSUBSCRIBED"
    assert hs.writes_applied == 1
    assert hs.requests[-1] == RequestRecord(
        method="POST", path=f"{V4}/statuses/batch/write", status=None, n_inputs=1, at=hs.requests[-1].at,
        kind="dropped",
    )
    # A retry of the same write is then a no-op, which is what makes retrying safe.
    retried = write(hs, [status_input("ada@example.com", state="UNSUBSCRIBED")])
    assert retried.json()["results"][0]["setStatusSuccessReason"] == "NO_STATUS_CHANGE"


def test_injected_slow_answer_still_applies(hubspot_emulator: HubSpotEmulator) -> None:
    hs = hubspot_emulator
    hs.inject("slow:0.2")
    response = write(hs, [status_input("ada@example.com")])
    assert response.status_code == 200
    assert hs.status_of("ada@example.com", 1001)["status"] == "SUBSCRIBED"

    hs.inject("slow:5")
    with pytest.raises(requests.ReadTimeout):
        url = f"{hs.url}{V4}/statuses/batch/write"
        client().post(url, json={"inputs": [status_input("bob@example.com")]}, timeout=0.3)
    assert hs.status_of("bob@example.com", 1001) is not None


def test_injected_faults_are_fifo_and_only_hit_writes(hubspot_emulator: HubSpotEmulator) -> None:
    hs = hubspot_emulator
    hs.inject("503", count=2)
    hs.inject("500")
    assert client().get(f"{hs.url}{V4}/definitions", timeout=10).status_code == 200
    assert read(hs, ["ada@example.com"]).status_code == 200
    assert _outcomes(hs, 4) == [503, 503, 500, 200]


def test_inject_rejects_unknown_kinds(hubspot_emulator: HubSpotEmulator) -> None:
    for kind in ("418", "slow", "slow:soon", "drop"):
        with pytest.raises(ValueError, match="unknown fault kind"):
            hubspot_emulator.inject(kind)


def test_reset_forgets_everything(hubspot_emulator_factory: Any) -> None:
    hs = hubspot_emulator_factory(rate_limit_max=2, daily_limit=5)
    write(hs, [status_input("ada@example.com")])
    write(hs, [status_input("bob@example.com")])
    hs.inject("500", count=3)
    assert write(hs, [status_input("cy@example.com")]).status_code == 500

    hs.reset()
    assert hs.statuses == {} and hs.requests == [] and hs.writes_applied == 0
    response = write(hs, [status_input("cy@example.com")])
    assert response.status_code == 200
    assert response.headers["X-HubSpot-RateLimit-Remaining"] == "1"
    assert response.headers["X-HubSpot-RateLimit-Daily-Remaining"] == "4"


def test_latency_does_not_change_answers(hubspot_emulator_factory: Any) -> None:
    hs = hubspot_emulator_factory(latency_s=(0.0, 0.02), seed=3)
    assert _outcomes(hs, 5) == [200] * 5


# --------------------------------------------------------------------------- unsubscribe from all


def unsubscribe_all(
    hs: HubSpotEmulator,
    emails: list[Any],
    *,
    verbose: str | None = None,
    session: requests.Session | None = None,
    base: str = V4,
) -> requests.Response:
    params = {"channel": "EMAIL"}
    if verbose is not None:
        params["verbose"] = verbose
    url = f"{hs.url}{base}/statuses/batch/unsubscribe-all"
    return (session or client()).post(url, params=params, json={"inputs": emails}, timeout=10)


def read_wide(
    hs: HubSpotEmulator, emails: list[Any], session: requests.Session | None = None, base: str = V4
) -> requests.Response:
    url = f"{hs.url}{base}/statuses/batch/unsubscribe-all/read"
    return (session or client()).post(url, params={"channel": "EMAIL"}, json={"inputs": emails}, timeout=10)


def read_statuses(hs: HubSpotEmulator, email: str) -> dict[int, dict[str, Any]]:
    """The email's records as batch/read returns them, by subscription id."""
    response = read(hs, [email])
    assert response.status_code == 200
    (result,) = response.json()["results"]
    return {record["subscriptionId"]: record for record in result["statuses"]}


def wide_status(email: str, timestamp: str) -> dict[str, Any]:
    return {
        "subscriberIdString": email,
        "channel": "EMAIL",
        "status": "UNSUBSCRIBED",
        "timestamp": timestamp,
        "wideStatusType": "PORTAL_WIDE",
        "businessUnitId": 0,
    }


PAST = datetime(2024, 5, 6, 9, 8, 9, 123000, tzinfo=timezone(timedelta(hours=2)))
PAST_ISO = "2024-05-06T07:08:09.123Z"


@pytest.mark.parametrize("base", [V4, V2026], ids=["v4", "2026-03"])
def test_unsubscribe_all_applies_to_every_subscription(hubspot_emulator: HubSpotEmulator, base: str) -> None:
    hs = hubspot_emulator
    assert write(hs, [status_input("ada@example.com", 1001)], base=base).status_code == 200
    before = time.time()

    response = unsubscribe_all(hs, ["Ada@Example.COM"], base=base)

    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "COMPLETE"
    assert "errors" not in body and "numErrors" not in body
    assert body["results"] == [{"subscriberIdString": "ada@example.com", "statuses": []}]
    records = read_statuses(hs, "ada@example.com")
    assert sorted(records) == [1001, 1002, 1003]
    stamps = {record["timestamp"] for record in records.values()}
    assert len(stamps) == 1
    (stamp,) = stamps
    assert before - 0.01 <= datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() <= time.time()
    for sid, name in [(1001, "Newsletter"), (1002, "Product updates"), (1003, "Events")]:
        assert records[sid] == {
            "channel": "EMAIL",
            "source": "Public status API",
            "status": "UNSUBSCRIBED",
            "subscriberIdString": "ada@example.com",
            "subscriptionId": sid,
            "timestamp": stamp,
            "businessUnitId": 0,
            "legalBasis": None,
            "legalBasisExplanation": None,
            "subscriptionName": name,
        }
    assert hs.wide_status_of("ADA@example.com") == wide_status("ada@example.com", stamp)
    assert hs.wide_status_of("bob@example.com") is None
    assert hs.writes_applied == 2
    assert hs.requests[1].path == f"{base}/statuses/batch/unsubscribe-all"
    assert (hs.requests[1].kind, hs.requests[1].n_inputs) == ("ok", 1)


def test_unsubscribe_all_keeps_already_unsubscribed_records(hubspot_emulator: HubSpotEmulator) -> None:
    hs = hubspot_emulator
    hs.footer_unsubscribe("ada@example.com", 1002, at=PAST)
    write(hs, [status_input("ada@example.com", 1003, "UNSUBSCRIBED")])
    earlier = hs.status_of("ada@example.com", 1003)
    time.sleep(0.01)  # later writes get a later millisecond

    response = unsubscribe_all(hs, ["ada@example.com"], verbose="true")

    assert response.status_code == 200
    (result,) = response.json()["results"]
    assert result["subscriberIdString"] == "ada@example.com"
    statuses = {record["subscriptionId"]: record for record in result["statuses"]}
    assert [record["subscriptionId"] for record in result["statuses"]] == [1001, 1002, 1003]
    assert {sid: record["setStatusSuccessReason"] for sid, record in statuses.items()} == {
        1001: "UNSUBSCRIBE_FROM_ALL_OCCURRED",
        1002: "NO_STATUS_CHANGE",
        1003: "NO_STATUS_CHANGE",
    }
    assert (statuses[1002]["source"], statuses[1002]["timestamp"]) == ("Unsubscribe Link", PAST_ISO)
    assert statuses[1003]["timestamp"] == earlier["timestamp"]
    assert statuses[1001]["timestamp"] > earlier["timestamp"]
    # Verbose statuses are the stored records plus the reason.
    stored = read_statuses(hs, "ada@example.com")
    without_reason = {
        sid: {k: v for k, v in record.items() if k != "setStatusSuccessReason"}
        for sid, record in statuses.items()
    }
    assert without_reason == stored
    assert stored[1003] == earlier
    wide = hs.wide_status_of("ada@example.com")
    assert wide == wide_status("ada@example.com", statuses[1001]["timestamp"])

    # Repeating it (say, a retry after a dropped connection) changes nothing at all.
    time.sleep(0.01)
    again = unsubscribe_all(hs, ["ada@example.com"], verbose="TRUE")
    reasons = {r["setStatusSuccessReason"] for r in again.json()["results"][0]["statuses"]}
    assert reasons == {"NO_STATUS_CHANGE"}
    assert read_statuses(hs, "ada@example.com") == stored
    assert hs.wide_status_of("ada@example.com") == wide
    assert unsubscribe_all(hs, ["ada@example.com"], verbose="false").json()["results"][0]["statuses"] == []


@pytest.mark.parametrize(("multi_status", "expected_status"), [(False, 200), (True, 207)])
def test_unsubscribe_all_reports_invalid_emails_and_applies_the_rest(
    hubspot_emulator_factory: Any, multi_status: bool, expected_status: int
) -> None:
    hs = hubspot_emulator_factory(multi_status=multi_status)
    response = unsubscribe_all(
        hs, ["ada@example.com", "not-an-email", "x@bad.invalid", 42, "BOB@example.com", "bob@example.com"]
    )

    assert response.status_code == expected_status
    body = response.json()
    assert [r["subscriberIdString"] for r in body["results"]] == ["ada@example.com", "bob@example.com"]
    assert body["numErrors"] == 3
    assert body["errors"][0] == {
        "status": "error",
        "category": "VALIDATION_ERROR",
        "message": "Invalid email address: not-an-email",
        "context": {"subscriberIdString": ["not-an-email"]},
        "errors": [],
        "links": {},
    }
    assert [e["context"]["subscriberIdString"] for e in body["errors"][1:]] == [["x@bad.invalid"], ["42"]]
    assert {e["category"] for e in body["errors"]} == {"VALIDATION_ERROR"}
    for email in ("ada@example.com", "bob@example.com"):
        assert hs.wide_status_of(email) is not None
        assert {r["status"] for r in read_statuses(hs, email).values()} == {"UNSUBSCRIBED"}
    assert hs.wide_status_of("x@bad.invalid") is None
    assert len(hs.statuses) == 6
    assert hs.writes_applied == 2
    assert (hs.requests[0].status, hs.requests[0].n_inputs) == (expected_status, 6)


def test_unsubscribe_all_needs_the_batch_write_scope(hubspot_emulator_factory: Any) -> None:
    hs = hubspot_emulator_factory(
        extra_tokens={"pat-read-only": [READ_SCOPE], "pat-write-only": [WRITE_SCOPE]}
    )
    refused = unsubscribe_all(hs, ["ada@example.com"], session=client("pat-read-only"))

    body = assert_error_body(refused, 403, "MISSING_SCOPES")
    assert body["errors"][0]["context"]["requiredScopes"] == [WRITE_SCOPE]
    assert hs.statuses == {} and hs.wide_status_of("ada@example.com") is None
    assert hs.requests[-1].kind == "forbidden"

    assert unsubscribe_all(hs, ["ada@example.com"], session=client("pat-write-only")).status_code == 200
    # Reading wide statuses takes the batch-read scope instead.
    refused_read = read_wide(hs, ["ada@example.com"], session=client("pat-write-only"))
    body = assert_error_body(refused_read, 403, "MISSING_SCOPES")
    assert body["errors"][0]["context"]["requiredScopes"] == [READ_SCOPE]
    allowed = read_wide(hs, ["ada@example.com"], session=client("pat-read-only"))
    assert allowed.status_code == 200
    assert len(allowed.json()["results"][0]["wideStatuses"]) == 1


@pytest.mark.parametrize("suffix", ["unsubscribe-all", "unsubscribe-all/read"])
@pytest.mark.parametrize(
    ("params", "raw_body", "message"),
    [
        ({}, b'{"inputs": ["ada@example.com"]}', "Missing required query parameter: channel"),
        ({"channel": "SMS"}, b'{"inputs": ["ada@example.com"]}', "Invalid channel: only EMAIL is supported"),
        ({"channel": "EMAIL"}, b'["ada@example.com"]', "Invalid input JSON"),
        ({"channel": "EMAIL"}, b'{"inputs": "ada@example.com"}', "Invalid input JSON"),
        ({"channel": "EMAIL"}, b"not json", "Invalid input JSON"),
        (
            {"channel": "EMAIL"},
            b'{"inputs": ["a@example.com", "b@example.com", "c@example.com"]}',
            "The maximum number of inputs supported in a batch request is 2",
        ),
    ],
    ids=["no channel", "SMS", "array body", "inputs not a list", "not json", "too many"],
)
def test_unsubscribe_all_endpoints_reject_malformed_requests(
    hubspot_emulator_factory: Any, suffix: str, params: dict[str, str], raw_body: bytes, message: str
) -> None:
    hs = hubspot_emulator_factory(max_batch_inputs=2)
    response = client().post(
        f"{hs.url}{V4}/statuses/batch/{suffix}",
        params=params,
        data=raw_body,
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    assert assert_error_body(response, 400, "VALIDATION_ERROR")["message"].startswith(message)
    assert hs.statuses == {} and hs.wide_status_of("a@example.com") is None
    assert hs.writes_applied == 0
    assert hs.requests[-1].kind == "bad_request"


def test_injected_faults_hit_unsubscribe_all_but_not_its_read(hubspot_emulator: HubSpotEmulator) -> None:
    hs = hubspot_emulator
    hs.inject("503")
    assert read_wide(hs, ["ada@example.com"]).status_code == 200  # reads never take a fault
    assert_error_body(unsubscribe_all(hs, ["ada@example.com"]), 503, "SERVICE_UNAVAILABLE")
    assert hs.wide_status_of("ada@example.com") is None and hs.statuses == {}

    hs.inject("drop_after")
    with pytest.raises(requests.ConnectionError):
        unsubscribe_all(hs, ["ada@example.com"])
    assert hs.wide_status_of("ada@example.com") is not None
    assert hs.status_of("ada@example.com", 1003)["status"] == "UNSUBSCRIBED"
    assert hs.requests[-1].kind == "dropped" and hs.requests[-1].status is None

    # Both write endpoints draw from the same queue, first in, first out.
    hs.inject("500")
    hs.inject("429")
    assert unsubscribe_all(hs, ["bob@example.com"]).status_code == 500
    assert write(hs, [status_input("bob@example.com")]).status_code == 429
    assert unsubscribe_all(hs, ["bob@example.com"]).status_code == 200


@pytest.mark.parametrize("base", [V4, V2026], ids=["v4", "2026-03"])
def test_unsubscribe_all_read(hubspot_emulator: HubSpotEmulator, base: str) -> None:
    hs = hubspot_emulator
    write(hs, [status_input("bob@example.com", 1001, "UNSUBSCRIBED")])  # one subscription is not all
    unsubscribe_all(hs, ["ada@example.com"], base=base)
    wide = hs.wide_status_of("ada@example.com")
    assert wide is not None

    response = read_wide(hs, ["ADA@example.com", "bob@example.com", "cy@example.com"], base=base)
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "COMPLETE" and "errors" not in body
    assert body["results"] == [
        {"subscriberIdString": "ada@example.com", "wideStatuses": [wide]},
        {"subscriberIdString": "bob@example.com", "wideStatuses": []},
        {"subscriberIdString": "cy@example.com", "wideStatuses": []},
    ]

    partial = read_wide(hs, ["ada@example.com", "broken", "x@bad.invalid"], base=base)
    assert partial.status_code == 207
    body = partial.json()
    assert body["numErrors"] == 2
    assert [e["context"]["subscriberIdString"] for e in body["errors"]] == [["broken"], ["x@bad.invalid"]]
    assert body["results"] == [{"subscriberIdString": "ada@example.com", "wideStatuses": [wide]}]
    assert hs.requests[-1].path == f"{base}/statuses/batch/unsubscribe-all/read"


def test_per_subscription_writes_leave_the_wide_status(hubspot_emulator: HubSpotEmulator) -> None:
    hs = hubspot_emulator
    unsubscribe_all(hs, ["ada@example.com"])
    wide = hs.wide_status_of("ada@example.com")
    assert wide is not None

    response = write(hs, [status_input("ada@example.com", 1002, "SUBSCRIBED")])
    assert response.json()["results"][0]["setStatusSuccessReason"] == "RESUBSCRIBE_OCCURRED"
    hs.preferences_page("ada@example.com", 1003, "SUBSCRIBED")

    assert {sid: r["status"] for sid, r in read_statuses(hs, "ada@example.com").items()} == {
        1001: "UNSUBSCRIBED",
        1002: "SUBSCRIBED",
        1003: "SUBSCRIBED",
    }
    assert hs.wide_status_of("ada@example.com") == wide
    assert read_wide(hs, ["ada@example.com"]).json()["results"][0]["wideStatuses"] == [wide]


# --------------------------------------------------------------------------- HubSpot-side changes


def test_hubspot_side_changes_show_up_in_batch_read(hubspot_emulator_factory: Any) -> None:
    hs = hubspot_emulator_factory(rate_limit_max=5, daily_limit=10)
    footer = hs.footer_unsubscribe("Ada@Example.com", 1001, at=PAST)
    page = hs.preferences_page("ada@example.com", 1002, "SUBSCRIBED", at=1_700_000_000.5)
    before = time.time()
    ui = hs.hubspot_side_change("ada@example.com", 1003, "NOT_SPECIFIED")
    after = time.time()
    custom = hs.hubspot_side_change(
        "bob@example.com", 1001, "SUBSCRIBED", source="Self Service Resubscription", at=0
    )

    # Not API requests: nothing logged, counted or charged against the rate limits.
    assert hs.requests == [] and hs.writes_applied == 0
    records = read_statuses(hs, "ada@example.com")
    assert records == {1001: footer, 1002: page, 1003: ui}
    assert footer == {
        "channel": "EMAIL",
        "source": "Unsubscribe Link",
        "status": "UNSUBSCRIBED",
        "subscriberIdString": "ada@example.com",
        "subscriptionId": 1001,
        "timestamp": PAST_ISO,
        "businessUnitId": 0,
        "legalBasis": None,
        "legalBasisExplanation": None,
        "subscriptionName": "Newsletter",
    }
    assert (page["source"], page["status"], page["timestamp"]) == (
        "Subscription Preferences Page",
        "SUBSCRIBED",
        "2023-11-14T22:13:20.500Z",
    )
    assert (ui["source"], ui["status"], ui["subscriptionName"]) == ("HubSpot UI", "NOT_SPECIFIED", "Events")
    ui_at = datetime.fromisoformat(ui["timestamp"].replace("Z", "+00:00")).timestamp()
    assert before - 0.001 <= ui_at <= after + 0.001
    assert read_statuses(hs, "bob@example.com") == {1001: custom}
    assert custom["source"] == "Self Service Resubscription"
    assert custom["timestamp"] == "1970-01-01T00:00:00.000Z"
    assert hs.wide_status_of("ada@example.com") is None  # single-subscription changes set no wide status

    # Only the batch/read above reached the server and used budget.
    assert [r.path for r in hs.requests] == [f"{V4}/statuses/batch/read"] * 2
    response = read(hs, ["ada@example.com"])
    assert response.headers["X-HubSpot-RateLimit-Remaining"] == "2"
    assert response.headers["X-HubSpot-RateLimit-Daily-Remaining"] == "7"

    # A later footer click on the same subscription replaces the record, source and time included.
    again = hs.footer_unsubscribe("ada@example.com", 1002, at=PAST)
    assert read_statuses(hs, "ada@example.com")[1002] == again
    assert (again["source"], again["timestamp"]) == ("Unsubscribe Link", PAST_ISO)
    assert hs.status_of("ada@example.com", 1002) == again


def test_unsubscribe_all_in_hubspot(hubspot_emulator: HubSpotEmulator) -> None:
    hs = hubspot_emulator
    write(hs, [status_input("ada@example.com", 1003, "UNSUBSCRIBED")])
    api_record = hs.status_of("ada@example.com", 1003)
    requests_before = len(hs.requests)

    wide = hs.unsubscribe_all_in_hubspot("ADA@example.com", at=PAST)

    assert wide == wide_status("ada@example.com", PAST_ISO)
    assert hs.wide_status_of("ada@example.com") == wide
    assert len(hs.requests) == requests_before and hs.writes_applied == 1
    records = read_statuses(hs, "ada@example.com")
    for sid in (1001, 1002):
        assert records[sid]["status"] == "UNSUBSCRIBED"
        assert (records[sid]["source"], records[sid]["timestamp"]) == ("Unsubscribe Link", PAST_ISO)
    assert records[1003] == api_record  # already unsubscribed: kept as it was
    (result,) = read_wide(hs, ["ada@example.com"]).json()["results"]
    assert result["wideStatuses"] == [wide]


def test_hubspot_side_change_rejects_bad_arguments(hubspot_emulator: HubSpotEmulator) -> None:
    hs = hubspot_emulator
    cases = [
        ("ada@example.com", 4242, "SUBSCRIBED", {}),
        ("ada@example.com", "1001", "SUBSCRIBED", {}),
        ("ada@example.com", 1001, "OPTED_IN", {}),
        ("not-an-email", 1001, "SUBSCRIBED", {}),
        ("ada@example.com", 1001, "SUBSCRIBED", {"at": datetime(2024, 5, 6, 7, 8, 9)}),
    ]
    for email, sid, status, kwargs in cases:
        with pytest.raises(ValueError):
            hs.hubspot_side_change(email, sid, status, **kwargs)
    with pytest.raises(ValueError, match="unknown subscription id 4242"):
        hs.footer_unsubscribe("ada@example.com", 4242)
    with pytest.raises(ValueError):
        hs.unsubscribe_all_in_hubspot("x@bad.invalid")
    with pytest.raises(TypeError):
        hs.preferences_page("ada@example.com", 1001, "SUBSCRIBED", at="yesterday")  # type: ignore[arg-type]
    assert hs.statuses == {} and hs.wide_status_of("x@bad.invalid") is None


def test_reset_forgets_wide_statuses(hubspot_emulator: HubSpotEmulator) -> None:
    hs = hubspot_emulator
    unsubscribe_all(hs, ["ada@example.com"])
    hs.unsubscribe_all_in_hubspot("bob@example.com")
    assert hs.wide_status_of("ada@example.com") and hs.wide_status_of("bob@example.com")

    hs.reset()

    assert hs.wide_status_of("ada@example.com") is None and hs.wide_status_of("bob@example.com") is None
    assert hs.statuses == {}
    body = read_wide(hs, ["ada@example.com", "bob@example.com"]).json()
    assert [r["wideStatuses"] for r in body["results"]] == [[], []]


# --------------------------------------------------------------------------- lifecycle


def test_airflow_connection(hubspot_emulator: HubSpotEmulator) -> None:
    connection = json.loads(hubspot_emulator.airflow_connection("hubspot_default", base_path="/x", timeout=5))
    # The whole URL in the host: the connection form shows it whole as the API base URL.
    assert connection == {
        "conn_type": "hubspot",
        "host": f"http://127.0.0.1:{hubspot_emulator.port}",
        "password": TOKEN,
        "extra": {"base_path": "/x", "timeout": 5},
    }
    assert hubspot_emulator.url == f"http://127.0.0.1:{hubspot_emulator.port}"
    assert TOKEN not in repr(hubspot_emulator)


def test_stop_leaves_no_threads_or_sockets() -> None:
    before = set(threading.enumerate())
    hs = HubSpotEmulator().start()
    idle = client()  # keeps a keep-alive connection open across stop()
    assert write(hs, [status_input("ada@example.com")], session=idle).status_code == 200
    hs.inject("slow:30")
    slow = threading.Thread(target=_outcomes, args=(hs, 1))
    slow.start()
    deadline = time.monotonic() + 10
    while len(hs.requests) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)

    hs.stop()
    slow.join(10)
    assert not slow.is_alive()
    assert set(threading.enumerate()) <= before
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", hs.port), timeout=1).close()
    hs.stop()  # idempotent


def test_testing_package_does_not_import_airflow() -> None:
    # The pytest plugin loads in every test session of every project with the provider installed.
    code = (
        "import sys\n"
        "from hubspot_provider.testing import HubSpotEmulator\n"
        "import hubspot_provider.testing.pytest_plugin\n"
        "assert HubSpotEmulator.__name__ == 'HubSpotEmulator'\n"
        "print(sorted(m for m in sys.modules if m == 'airflow' or m.startswith('airflow.')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_cli_serves_until_sigterm() -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hubspot_provider.testing.emulator",
            "--port",
            "0",
            "--token",
            "pat-cli-secret",
            "--rate-limit-max",
            "50",
            "--gdpr",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline()
        match = re.fullmatch(r"HubSpot emulator listening on (http://127\.0\.0\.1:\d+)\n", line)
        assert match, line
        url = match.group(1)
        notes = []
        while not notes or notes[-1] != "  Stop it with Ctrl+C.":
            notes.append(process.stdout.readline().rstrip("\n"))
        # The token it accepts, and connections ready to paste (a local stand-in, not a HubSpot secret).
        assert notes[0] == "  accepts the bearer token pat-cli-secret"
        (export,) = [n for n in notes if n.strip().startswith("export ")]
        name, _, value = shlex.split(export.strip())[1].partition("=")
        assert name == "AIRFLOW_CONN_HUBSPOT_DEFAULT"
        assert json.loads(value) == {
            "conn_type": "hubspot", "host": url, "password": "pat-cli-secret", "extra": {}}
        (add,) = [n for n in notes if n.strip().startswith("airflow connections add")]
        assert shlex.split(add.strip())[3:] == ["hubspot_default",
            "--conn-type", "hubspot", "--conn-host", url, "--conn-password", "pat-cli-secret"]
        response = client("pat-cli-secret").post(
            f"{url}{V4}/statuses/batch/write", json={"inputs": [status_input("ada@example.com")]}, timeout=10
        )
        assert response.status_code == 200
        assert response.json()["errors"][0]["category"] == "VALIDATION_ERROR"  # --gdpr
        assert response.headers["X-HubSpot-RateLimit-Max"] == "50"
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0
    assert "pat-cli-secret" not in stdout + stderr  # printed once, at start, and nowhere else
    assert "ada@example.com" not in line + "\n".join(notes) + stdout + stderr


def test_cli_help_names_the_token_and_what_it_prints() -> None:
    # Wide enough that argparse does not wrap a line inside the token.
    result = subprocess.run([sys.executable, "-m", "hubspot_provider.testing.emulator", "--help"],
                            capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "300"})
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert f"the bearer token it accepts (default: {TOKEN})" in text
    assert "prints its URL, the bearer token it accepts and a ready AIRFLOW_CONN_HUBSPOT_DEFAULT" in text


# --------------------------------------------------------------------------- spec conformance


# HubSpot's own response examples show these optional PublicStatus fields as null, and the
# emulator does the same so that clients are tested against it; the spec types them as plain
# strings. Only these fields get the allowance, so any other stray null still fails.
NULLABLE_OPTIONAL = frozenset({"legalBasis", "legalBasisExplanation", "setStatusSuccessReason"})


def _allow_documented_nulls(components: dict[str, Any]) -> dict[str, Any]:
    components = copy.deepcopy(components)
    for schema in components["schemas"].values():
        required = set(schema.get("required", ()))
        for name, prop in schema.get("properties", {}).items():
            if name in NULLABLE_OPTIONAL and name not in required:
                schema["properties"][name] = {"anyOf": [{"type": "null"}, prop]}
    return components


def _rfc3339(value: object) -> bool:
    if not isinstance(value, str):
        return True
    if not re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", value):
        raise ValueError(f"not an RFC 3339 date-time: {value!r}")
    datetime.fromisoformat(value.replace("Z", "+00:00"))  # Python 3.10 does not read "Z"
    return True


@pytest.fixture(params=sorted(SPEC_FILES), ids=lambda base: base.rsplit("/", 1)[-1])
def spec(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    path = SPEC_DIR / SPEC_FILES[request.param]
    if not path.is_file():
        pytest.skip(f"HubSpot's OpenAPI spec {path.name} is not available at {SPEC_DIR}")
    return request.param, json.loads(path.read_text())


@pytest.mark.spec
def test_responses_conform_to_the_official_spec(
    hubspot_emulator_factory: Any, spec: tuple[str, dict[str, Any]]
) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    base, document = spec
    components = _allow_documented_nulls(document["components"])
    format_checker = jsonschema.FormatChecker()
    format_checker.checks("date-time", raises=ValueError)(_rfc3339)

    def check(instance: Any, schema_name: str) -> None:
        schema = {"$ref": f"#/components/schemas/{schema_name}", "components": components}
        validator = jsonschema.Draft202012Validator(schema, format_checker=format_checker)
        errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
        assert not errors, f"{schema_name}: {[f'{list(e.absolute_path)}: {e.message}' for e in errors]}"

    for suffix in (
        "/statuses/batch/write",
        "/statuses/batch/read",
        "/statuses/batch/unsubscribe-all",
        "/statuses/batch/unsubscribe-all/read",
        "/definitions",
    ):
        assert f"{base}{suffix}" in document["paths"]

    hs = hubspot_emulator_factory(multi_status=False, extra_tokens={"pat-no-scopes": []})
    written = write(
        hs,
        [
            status_input("ada@example.com", legalBasis="NON_GDPR", legalBasisExplanation="not in the EU"),
            status_input("bob@example.com", 9999, "UNSUBSCRIBED"),
            status_input("cy@example.com", 1002, "NOT_SPECIFIED"),
        ],
        base=base,
    )
    assert written.status_code == 200 and written.json()["numErrors"] == 1
    check(written.json(), "BatchResponsePublicStatus")

    read_ok = read(hs, ["ada@example.com", "nobody@example.com"], base=base)
    assert read_ok.status_code == 200
    check(read_ok.json(), "BatchResponsePublicStatusBulkResponse")
    read_partial = read(hs, ["ada@example.com", "broken"], base=base)
    assert read_partial.status_code == 207
    check(read_partial.json(), "BatchResponsePublicStatusBulkResponseWithErrors")

    for query in ("", "?includeTranslations=true"):
        definitions = client().get(f"{hs.url}{base}/definitions{query}", timeout=10)
        assert definitions.status_code == 200
        check(definitions.json(), "ActionResponseWithResultsSubscriptionDefinition")

    hs.footer_unsubscribe("dee@example.com", 1002)
    for verbose in ("true", "false"):
        opted_out = unsubscribe_all(hs, ["dee@example.com", "broken"], verbose=verbose, base=base)
        assert opted_out.status_code == 200 and opted_out.json()["numErrors"] == 1
        assert len(opted_out.json()["results"][0]["statuses"]) == (3 if verbose == "true" else 0)
        check(opted_out.json(), "BatchResponsePublicBulkOptOutFromAllResponse")
    wide_ok = read_wide(hs, ["dee@example.com", "nobody@example.com"], base=base)
    assert wide_ok.status_code == 200
    check(wide_ok.json(), "BatchResponsePublicWideStatusBulkResponse")
    wide_partial = read_wide(hs, ["dee@example.com", "broken"], base=base)
    assert wide_partial.status_code == 207
    check(wide_partial.json(), "BatchResponsePublicWideStatusBulkResponseWithErrors")
    check(read(hs, ["dee@example.com"], base=base).json(), "BatchResponsePublicStatusBulkResponse")

    error_responses = [write(hs, [status_input("x@bad.invalid")], base=base)]
    hs.inject("503")
    error_responses += [
        write(hs, [status_input("ada@example.com")], base=base),
        write(hs, [status_input("ada@example.com")], session=client(None), base=base),
        write(hs, [status_input("ada@example.com")], session=client("pat-no-scopes"), base=base),
        client().get(f"{hs.url}{base}/unknown", timeout=10),
    ]
    assert [r.status_code for r in error_responses] == [400, 503, 401, 403, 404]
    for response in error_responses:
        check(response.json(), "Error")

    multi = hubspot_emulator_factory(multi_status=True)
    written = write(multi, [status_input("bob@example.com", 9999)], base=base)
    assert written.status_code == 207
    check(written.json(), "BatchResponsePublicStatus")
