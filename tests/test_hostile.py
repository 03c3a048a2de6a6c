"""The hook against servers that misbehave on purpose, over real loopback sockets.

Each test is an attack on the promise that every input ends succeeded (HubSpot proved it),
superseded or failed with a reason, and that no secret or email address escapes.
"""

from __future__ import annotations

import json
import threading

import pytest
from hostile import HostileServer, Reply, Seen, batch_answer, self_signed_cert

from hubspot_provider.exceptions import (
    HubSpotAuthError,
    HubSpotConfigError,
    HubSpotRequestError,
    HubSpotResponseError,
    HubSpotScopeError,
    HubSpotUnavailableError,
)
from hubspot_provider.hooks.hubspot import HubSpotHook
from hubspot_provider.results import UNCONFIRMED, WriteReport

TOKEN = "pat-hostile-token"
WRITE_PATH = "/communication-preferences/v4/statuses/batch/write"


def rows(n: int, state: str = "SUBSCRIBED") -> list[dict]:
    return [{"subscriberIdString": f"user{i}@example.com", "subscriptionId": 1001, "statusState": state}
            for i in range(n)]


def consistent(report: WriteReport) -> WriteReport:
    assert report.succeeded + report.superseded + report.failed_count == report.submitted
    assert sum(report.failed_by_category.values()) == report.failed_count
    return report


@pytest.fixture
def connect(monkeypatch):
    def point(server: HostileServer, conn_id: str = "hostile", **extra) -> str:
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", server.connection(**extra))
        return conn_id

    return point


@pytest.fixture
def ok_server():
    """A server that confirms every write: what a request redirected to another host would reach."""
    with HostileServer(lambda seen: Reply(200, batch_answer(seen) if seen.body.startswith(b'{"inputs"') else {})) as s:
        yield s


def finishes(call, seconds: float = 60.0):
    """Run ``call`` in a thread; a hang is a failure of the hook's deadline, not of the test run."""
    outcome: dict = {}

    def run():
        try:
            outcome["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the call was still running after {seconds}s: no deadline bounded it"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


# --------------------------------------------------------------------------- 1. redirects


@pytest.mark.parametrize("code", [301, 302, 307, 308])
def test_a_redirect_is_never_followed_and_confirms_nothing(connect, ok_server, code):
    with HostileServer(lambda seen: Reply(code, "", headers={"Location": f"{ok_server.url}{seen.path}"})) as api:
        hook = HubSpotHook(connect(api), max_retries=2)
        with pytest.raises(HubSpotRequestError, match=rf"redirect \(HTTP {code}\) to 127\.0\.0\.1:{ok_server.port}") as caught:
            hook.write_statuses(rows(5))
    assert ok_server.seen == []  # nothing, least of all the emails, was sent on
    assert len(api.seen) == 1  # not retried either: a redirect is configuration, not an outage
    report = consistent(caught.value.partial_report)
    assert report.succeeded == 0 and report.failed_count == 0  # every input stays unacknowledged: retryable


def test_a_redirect_from_https_to_http_is_refused(connect, ok_server, tmp_path, monkeypatch):
    cert, key = self_signed_cert(tmp_path)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
    with HostileServer(lambda seen: Reply(308, "", headers={"Location": f"{ok_server.url}{seen.path}"}),
                       tls=(cert, key)) as api:
        hook = HubSpotHook(connect(api))
        with pytest.raises(HubSpotRequestError, match=r"to 127\.0\.0\.1:\d+ \(http\)"):
            hook.write_statuses(rows(3))
    assert ok_server.seen == []


def test_an_oauth_refresh_is_never_redirected(connect, monkeypatch):
    captured = []
    with HostileServer(lambda seen: captured.append(seen) or Reply(200, {"access_token": "x"})) as elsewhere, \
            HostileServer(lambda seen: Reply(307, "", headers={"Location": f"{elsewhere.url}/oauth/v1/token"})) as api:
        conn = connect(api, token=None, client_id="cid", client_secret="the-client-secret",
                       refresh_token="the-refresh-token")
        with pytest.raises(HubSpotRequestError, match="redirect") as caught:
            HubSpotHook(conn).write_statuses(rows(2))
    assert captured == []  # the client secret and refresh token went nowhere else
    assert "the-client-secret" not in str(caught.value) and "the-refresh-token" not in str(caught.value)
    assert [s.path for s in api.seen] == ["/oauth/v1/token"]


# --------------------------------------------------------------------------- 2. deadlines and caps


def test_a_dripping_server_cannot_hold_a_write(connect):
    def drip(seen: Seen) -> Reply:
        return Reply(200, batch_answer(seen), drip_s=0.05)  # a byte every 50 ms: each resets a read timeout

    with HostileServer(drip) as api:
        hook = HubSpotHook(connect(api), timeout=1, deadline=1, max_retries=1, retry_budget_s=5)
        with pytest.raises(HubSpotUnavailableError, match="request deadline"):
            finishes(lambda: hook.write_statuses(rows(2)))
    assert len(api.seen) == 2  # the first try and one retry, each cut at its deadline


def test_the_retry_budget_bounds_the_whole_call(connect):
    with HostileServer(lambda seen: Reply(503, {"message": "down"})) as api:
        hook = HubSpotHook(connect(api), max_retries=100, retry_budget_s=2)
        with pytest.raises(HubSpotUnavailableError, match="retry budget"):
            finishes(lambda: hook.write_statuses(rows(2)))


@pytest.mark.parametrize("chunked", [False, True])
def test_an_answer_over_the_size_cap_is_refused_unread(connect, chunked):
    def huge(seen: Seen) -> Reply:
        answer = batch_answer(seen) if seen.body else {"results": []}
        answer["padding"] = "x" * 20_000
        return Reply(200, answer, chunked=chunked)

    with HostileServer(huge) as api:
        hook = HubSpotHook(connect(api, max_response_bytes=8192))
        report = consistent(hook.write_statuses(rows(3)))
        assert (report.succeeded, report.failed_by_category) == (0, {UNCONFIRMED: 3})
        assert all(f.retryable and "over the 8,192-byte cap" in f.message for f in report.failed)
        with pytest.raises(HubSpotResponseError, match="cap"):
            hook.get_subscription_definitions()


# --------------------------------------------------------------------------- 3. answers checked against the request


def test_a_result_contradicting_the_requested_state_is_not_a_success(connect):
    with HostileServer(lambda seen: Reply(200, batch_answer(seen, state="UNSUBSCRIBED"))) as api:
        report = consistent(HubSpotHook(connect(api)).write_statuses(rows(2) + rows(1, state="UNSUBSCRIBED")[:0]))
    assert report.succeeded == 0 and report.failed_by_category == {UNCONFIRMED: 2}
    failure = report.failed[0]
    assert failure.retryable and "answered status UNSUBSCRIBED" in failure.message and "SUBSCRIBED" in failure.message


def test_results_for_keys_never_sent_confirm_nothing(connect):
    def wrong_keys(seen: Seen) -> Reply:
        stranger = {"subscriberIdString": "stranger@example.com", "subscriptionId": 1001, "channel": "EMAIL",
                    "status": "SUBSCRIBED", "setStatusSuccessReason": "REQUESTED_CHANGE_OCCURRED"}
        first = batch_answer(seen)["results"][:1]
        return Reply(200, batch_answer(seen, results=first, extra_results=[stranger, stranger]))

    with HostileServer(wrong_keys) as api:
        report = consistent(HubSpotHook(connect(api)).write_statuses(rows(3)))
    assert report.succeeded == 1 and report.unrequested_results == 2
    assert report.failed_by_category == {"NO_RESULT": 2}


@pytest.mark.parametrize("batch_status", ["CANCELED", "PENDING", "PROCESSING", None])
def test_a_batch_that_is_not_complete_confirms_nothing(connect, batch_status):
    def answer(seen: Seen) -> Reply:
        body = batch_answer(seen, status=batch_status)
        if batch_status is None:
            del body["status"]  # a cache or a replayed answer without HubSpot's batch status
        return Reply(200, body)

    with HostileServer(answer) as api:
        report = consistent(HubSpotHook(connect(api)).write_statuses(rows(4)))
    assert report.succeeded == 0 and report.failed_by_category == {UNCONFIRMED: 4}
    assert all(str(batch_status) in f.message and f.retryable for f in report.failed)


# --------------------------------------------------------------------------- 4. malformed answers


@pytest.mark.parametrize(
    "body",
    [
        b'{"status": "COMPLETE", "results": [',
        b"<html>ok</html>",
        {"status": "COMPLETE", "results": None},
        {"status": "COMPLETE", "results": [{"subscriberIdString": "leak@example.com", "subscriptionId": "abc"}]},
        {"status": "COMPLETE", "results": "leak@example.com"},
        ["leak@example.com"],
    ],
    ids=["broken-json", "html", "results-null", "mistyped-field", "results-a-string", "not-an-object"],
)
def test_a_malformed_200_fails_its_inputs_retryably_without_personal_data(connect, body):
    with HostileServer(lambda seen: Reply(200, body)) as api:
        hook = HubSpotHook(connect(api))
        report = consistent(hook.write_statuses(rows(2)))
        assert report.succeeded == 0
        assert set(report.failed_by_category) <= {UNCONFIRMED, "NO_RESULT"}
        assert all(f.retryable and "leak@" not in f.message for f in report.failed)
        if not isinstance(body, dict) or isinstance(body.get("results"), str):
            with pytest.raises(HubSpotResponseError) as caught:
                hook.batch_read_statuses(["user0@example.com"])
            assert "leak@" not in str(caught.value) and "@" not in str(caught.value)


# --------------------------------------------------------------------------- 5. string contexts (HubSpot's own example)


def test_string_context_in_a_403_names_the_missing_scopes(connect):
    body = {"status": "error", "message": "This app hasn't been granted all required scopes", "category": "MISSING_SCOPES",
            "correlationId": "c-403", "context": "{missingScopes=[scope1, scope2]}"}
    with HostileServer(lambda seen: Reply(403, body)) as api:
        with pytest.raises(HubSpotScopeError) as caught:
            HubSpotHook(connect(api)).write_statuses(rows(1))
    assert caught.value.required_scopes == ["scope1", "scope2"]


def test_string_context_in_a_401_is_an_auth_error(connect):
    body = {"status": "error", "message": "Authentication credentials not found", "category": "INVALID_AUTHENTICATION",
            "context": "{reason=[expired]}"}
    with HostileServer(lambda seen: Reply(401, body)) as api:
        with pytest.raises(HubSpotAuthError, match="INVALID_AUTHENTICATION"):
            HubSpotHook(connect(api)).write_statuses(rows(1))


def test_string_context_in_a_400_still_bisects(connect):
    def reject_user1(seen: Seen) -> Reply:
        emails = [i["subscriberIdString"] for i in seen.json()["inputs"]]
        if "user1@example.com" in emails:
            return Reply(400, {"status": "error", "message": "Invalid input JSON", "category": "VALIDATION_ERROR",
                               "context": "{inputs=[1]}"})
        return Reply(200, batch_answer(seen))

    with HostileServer(reject_user1) as api:
        report = consistent(HubSpotHook(connect(api)).write_statuses(rows(4)))
    assert report.succeeded == 3 and report.failed_by_category == {"VALIDATION_ERROR": 1}
    assert report.failed[0].input["subscriberIdString"] == "user1@example.com"


def test_string_context_in_an_item_error_maps_to_its_input(connect):
    def one_missing(seen: Seen) -> Reply:
        answer = batch_answer(seen)
        answer["results"] = [r for r in answer["results"] if r["subscriberIdString"] != "user2@example.com"]
        answer["errors"] = [{"status": "error", "category": "OBJECT_NOT_FOUND", "message": "not found",
                             "context": "{subscriberIdString=[user2@example.com], subscriptionId=[1001]}"}]
        return Reply(207, answer)

    with HostileServer(one_missing) as api:
        report = consistent(HubSpotHook(connect(api)).write_statuses(rows(3)))
    assert report.succeeded == 2 and report.failed_by_category == {"OBJECT_NOT_FOUND": 1}
    assert report.failed[0].input["subscriberIdString"] == "user2@example.com"
    assert not report.failed[0].retryable  # mapped through the context, not left unmapped (retryable)


# --------------------------------------------------------------------------- 6. a 400 that is not HubSpot's


def test_an_html_400_from_a_proxy_is_not_a_verdict_on_any_input(connect):
    page = "<html><body><h1>400 Bad Request</h1>Request blocked by the firewall</body></html>"
    with HostileServer(lambda seen: Reply(400, page, content_type="text/html")) as api:
        with pytest.raises(HubSpotRequestError, match="not HubSpot's JSON error") as caught:
            HubSpotHook(connect(api)).write_statuses(rows(8))
    assert len(api.seen) == 1  # no bisection down to single inputs
    report = caught.value.partial_report
    assert report.failed_count == 0  # nothing dead-lettered as a non-retryable VALIDATION_ERROR


def test_a_gateways_json_400_is_not_hubspots_verdict_either(connect):
    with HostileServer(lambda seen: Reply(400, {"message": "Forbidden"})) as api:
        with pytest.raises(HubSpotRequestError, match="not HubSpot's JSON error"):
            HubSpotHook(connect(api)).write_statuses(rows(8))
    assert len(api.seen) == 1


def test_an_item_error_is_tied_to_whole_tokens_only(connect):
    def answer(seen: Seen) -> Reply:
        body = batch_answer(seen, results=[])
        body["errors"] = [{"status": "error", "category": "OBJECT_NOT_FOUND",
                           "message": "Subscription 1001 does not exist for subscriber jimbob@example.com"}]
        return Reply(207, body)

    inputs = [{"subscriberIdString": e, "subscriptionId": 1001, "statusState": "SUBSCRIBED"}
              for e in ("bob@example.com", "jimbob@example.com")]
    with HostileServer(answer) as api:
        report = consistent(HubSpotHook(connect(api)).write_statuses(inputs))
    by_email = {f.input["subscriberIdString"]: f for f in report.failed}
    assert by_email["jimbob@example.com"].category == "OBJECT_NOT_FOUND"
    assert by_email["bob@example.com"].category == "NO_RESULT" and by_email["bob@example.com"].retryable


# --------------------------------------------------------------------------- 7. secrets in error text


def _echo(status: int):
    def handler(seen: Seen) -> Reply:
        echoed = f"you sent Authorization: {seen.headers.get('authorization')} for user0@example.com"
        return Reply(status, {"status": "error", "message": echoed, "category": "ECHO",
                              "correlationId": seen.headers.get("authorization")})
    return handler


@pytest.mark.parametrize("status", [404, 409, 401, 403])
def test_an_echoed_authorization_header_never_reaches_errors_or_logs(connect, task_log, status):
    with HostileServer(_echo(status)) as api:
        with pytest.raises(Exception) as caught:
            HubSpotHook(connect(api)).write_statuses(rows(2))
    logged = task_log()
    assert "HubSpot write interrupted" in logged
    texts = [str(caught.value), repr(caught.value), caught.value.correlation_id or "", logged]
    for text in texts:
        assert TOKEN not in text
        assert "user0@example.com" not in text
    assert "***" in str(caught.value)


def test_text_is_redacted_before_it_is_cut(connect):
    # An email and the token right where a 300-character cut would fall: cut first, they would no
    # longer look like an email or the token, and would leak in part.
    def handler(seen: Seen) -> Reply:
        message = "x" * 290 + " user0@example.com " + seen.headers["authorization"]
        return Reply(404, {"status": "error", "category": "NOT_FOUND", "message": message})

    with HostileServer(handler) as api:
        with pytest.raises(HubSpotRequestError) as caught:
            HubSpotHook(connect(api)).write_statuses(rows(1))
    text = str(caught.value)
    assert "user0@" not in text and "@example" not in text and "pat-hos" not in text


@pytest.mark.parametrize("retry_after", ["inf", "1e12", "nan"])
def test_an_absurd_retry_after_is_an_error_of_the_hook_not_a_crash(connect, retry_after):
    from hubspot_provider.exceptions import HubSpotError

    body = {"status": "error", "message": "slow down", "policyName": "TEN_SECONDLY_ROLLING"}
    with HostileServer(lambda seen: Reply(429, body, headers={"Retry-After": retry_after})) as api:
        with pytest.raises(HubSpotError) as caught:
            HubSpotHook(connect(api), max_wait_s=5, max_retries=1, retry_budget_s=3).write_statuses(rows(1))
    assert caught.value.partial_report is not None


def test_an_oauth_error_with_a_numeric_correlation_id_is_an_auth_error(connect):
    with HostileServer(lambda seen: Reply(400, {"status": "BAD_REFRESH_TOKEN", "message": "no",
                                                "correlationId": 12345})) as api:
        conn = connect(api, token=None, client_id="cid", client_secret="sec-ret", refresh_token="ref-resh")
        with pytest.raises(HubSpotAuthError, match="OAuth token refresh"):
            HubSpotHook(conn).write_statuses(rows(1))


def test_the_deadline_also_guards_connections_through_a_proxy():
    import requests

    from hubspot_provider.hooks._transport import DeadlineAdapter, _Deadline

    # A proxy (as HTTPS_PROXY would name on a worker) that drips its answer a byte at a time.
    with HostileServer(lambda seen: Reply(200, "x" * 200, drip_s=0.05)) as proxy:
        session = requests.Session()
        session.mount("http://", DeadlineAdapter(max_retries=0))
        session.trust_env = False

        def call():
            with _Deadline(1.0) as deadline:
                try:
                    session.get("http://hubspot.invalid/x", proxies={"http": proxy.url}, timeout=(5, 5))
                except requests.RequestException:
                    pass  # or a truncated answer: the transport judges by the deadline, not by this
            return deadline.expired

        # The dripped answer would take 15 s; the watchdog cut the proxy's socket at 1 s.
        assert finishes(call, seconds=10) is True
    assert proxy.seen and proxy.seen[0].path == "/x"


def test_an_echoed_token_in_an_item_error_never_reaches_the_dead_letter(connect):
    def handler(seen: Seen) -> Reply:
        answer = batch_answer(seen, results=[])
        answer["errors"] = [{"status": "error", "category": "VALIDATION_ERROR", "id": "user0@example.com",
                             "message": f"bad token {seen.headers['authorization']}"}]
        return Reply(207, answer)

    with HostileServer(handler) as api:
        report = HubSpotHook(connect(api)).write_statuses(rows(1))
    assert TOKEN not in report.model_dump_json()


def test_an_oauth_api_that_always_answers_401_is_an_auth_error_after_one_refresh(connect):
    tokens = iter(f"oauth-access-{n}" for n in range(100))

    def handler(seen: Seen) -> Reply:
        if seen.path == "/oauth/v1/token":
            return Reply(200, {"access_token": next(tokens), "expires_in": 1800})
        return Reply(401, {"status": "error", "message": f"no: {seen.headers['authorization']}",
                           "category": "INVALID_AUTHENTICATION"})

    with HostileServer(handler) as api:
        conn = connect(api, token=None, client_id="cid", client_secret="sec-ret", refresh_token="ref-resh")
        with pytest.raises(HubSpotAuthError, match="freshly refreshed") as caught:
            HubSpotHook(conn, max_concurrency=1).write_statuses(rows(3))
    assert [s.path for s in api.seen].count("/oauth/v1/token") == 2  # the first token and one refresh
    assert "oauth-access-" not in str(caught.value)


# --------------------------------------------------------------------------- 8. TLS


def test_https_to_a_plain_http_server_is_a_configuration_error_at_once(connect, monkeypatch):
    with HostileServer(lambda seen: Reply(200, {})) as plain:
        monkeypatch.setenv("AIRFLOW_CONN_TLS", json.dumps(
            {"conn_type": "hubspot", "host": f"https://127.0.0.1:{plain.port}", "password": TOKEN}))
        with pytest.raises(HubSpotConfigError, match=r"TLS with 127\.0\.0\.1:\d+ failed .*http://"):
            finishes(lambda: HubSpotHook("tls", max_retries=5).write_statuses(rows(1)))
    assert plain.connections == 1  # not retried as an outage


def test_an_untrusted_certificate_is_a_configuration_error(connect, tmp_path, monkeypatch):
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    with HostileServer(lambda seen: Reply(200, {}), tls=self_signed_cert(tmp_path)) as api:
        with pytest.raises(HubSpotConfigError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            HubSpotHook(connect(api), max_retries=5).write_statuses(rows(1))
    assert api.connections == 1


# --------------------------------------------------------------------------- 9. settings checked up front


def test_every_setting_is_checked_before_the_first_request(connect):
    with HostileServer(lambda seen: Reply(200, {})) as api:
        conn = connect(api, portal_timezone="Europe/Berlinn", timeout="soon", api_version="v3")
        hook = HubSpotHook(conn)
        ok, message = hook.test_connection()
        assert not ok
        for name in ("portal_timezone 'Europe/Berlinn'", "timeout must be a number", "api_version 'v3'"):
            assert name in message
        with pytest.raises(HubSpotConfigError, match="portal_timezone"):
            hook.write_statuses(rows(1))
    assert api.seen == []


# --------------------------------------------------------------------------- 11. scopes named per request


def test_a_403_without_scopes_names_the_scope_of_that_request(connect):
    body = {"status": "error", "message": "forbidden", "category": "MISSING_SCOPES"}
    with HostileServer(lambda seen: Reply(403, body)) as api:
        hook = HubSpotHook(connect(api))
        with pytest.raises(HubSpotScopeError, match=r"Grant: communication_preferences\.read or "
                                                    r"communication_preferences\.read_write\."):
            hook.get_subscription_definitions()
        with pytest.raises(HubSpotScopeError, match=r"Grant: communication_preferences\.statuses\.batch\.write\."):
            hook.write_statuses(rows(1))
