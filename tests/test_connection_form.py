"""The connection form: its fields, what the API server receives from it, and what *Test* answers.

The form is declared in the provider info (``conn-fields``); Airflow's React UI renders it. What the UI
sends is cleaned by :class:`hubspot_provider._connection_form.ConnectionFormMiddleware` in the API
server; it is driven here as the ASGI app it is, with the bodies Airflow 3.3's form really sends
(recorded from the browser). ``tests/test_browser.py`` runs the same flow through a real API server
and Chromium.
"""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from hubspot_provider import _connection_form as form
from hubspot_provider.get_provider_info import CONN_FIELDS, get_provider_info
from hubspot_provider.hooks import hubspot as hook_module
from hubspot_provider.hooks._transport import DEFAULT_MAX_RESPONSE_BYTES
from hubspot_provider.hooks.hubspot import HubSpotHook

# What Airflow 3.3's form posted on Save for a new connection (the host and token typed in, nothing else).
SAVED_BY_THE_FORM = {
    "conn_type": "hubspot",
    "connection_id": "hubspot_ui",
    "extra": json.dumps(
        {
            "api_version": "v4",
            "batch_size": 100,
            "timeout": 30,
            "deadline": 60,
            "max_response_bytes": 33554432,
            "max_retries": 8,
            "portal_timezone": "UTC",
            "client_id": None,
            "client_secret": None,
            "refresh_token": None,
        },
        indent=2,
    ),
    "host": "http://127.0.0.1:8080",
    "password": "pat-emulator-token",
}
# What the connection list's Test button posted for that connection once saved.
TESTED_FROM_THE_LIST = {
    "conn_type": "hubspot",
    "connection_id": "hubspot_ui",
    "description": "",
    "extra": "{}",
    "host": "http://127.0.0.1:8080",
    "login": "",
    "password": "***",
    "port": 0,
    "schema": "",
}


def conn_type_info() -> dict:
    (conn_type,) = get_provider_info()["connection-types"]
    return conn_type


# --------------------------------------------------------------------------- the fields


def test_the_form_defaults_are_the_hooks_own():
    defaults = {name: field["schema"].get("default") for name, field in CONN_FIELDS.items()}
    assert defaults == {
        "api_version": hook_module.API_VERSIONS[0],
        "batch_size": hook_module.DEFAULT_BATCH_SIZE,
        "timeout": hook_module.DEFAULT_TIMEOUT_S,
        "deadline": hook_module.DEFAULT_DEADLINE_S,
        "max_response_bytes": DEFAULT_MAX_RESPONSE_BYTES,
        "max_retries": hook_module.DEFAULT_MAX_RETRIES,
        "portal_timezone": "UTC",
        "client_id": None,
        "client_secret": None,
        "refresh_token": None,
        # Airflow hides the value of a field named like a secret ("token"): a default would show, and be
        # saved, as "***". Empty means the hook's default.
        "oauth_token_path": None,
    }
    assert CONN_FIELDS["oauth_token_path"]["schema"]["enum"][0] == hook_module.OAUTH_TOKEN_PATH
    # The string defaults the middleware drops on save are the hook's.
    assert form.STRING_DEFAULTS == {
        **{name: value for name, value in defaults.items() if isinstance(value, str)},
        "oauth_token_path": hook_module.OAUTH_TOKEN_PATH,
    }


def test_the_form_offers_every_setting_the_readme_documents_and_no_null_choice():
    # oauth_token_path was documented but missing from the form.
    assert set(CONN_FIELDS) == {
        "api_version",
        "batch_size",
        "timeout",
        "deadline",
        "max_response_bytes",
        "max_retries",
        "portal_timezone",
        "client_id",
        "client_secret",
        "refresh_token",
        "oauth_token_path",
    }
    assert CONN_FIELDS["api_version"]["schema"]["enum"] == list(hook_module.API_VERSIONS)
    for name, field in CONN_FIELDS.items():
        assert None not in field["schema"].get("enum", []), f"{name} offers a literal null"
    assert {name for name, field in CONN_FIELDS.items() if field["schema"].get("format") == "password"} == {
        "client_secret",
        "refresh_token",
    }


def test_scheme_and_port_are_shown_because_the_hook_honours_them():
    behaviour = conn_type_info()["ui-field-behaviour"]
    assert behaviour["hidden-fields"] == ["login"]
    assert behaviour["relabeling"]["password"].startswith("Access token")
    assert {"host", "schema", "port"} <= set(behaviour["relabeling"])


def test_the_provider_declares_its_config_and_plugin():
    info = get_provider_info()
    option = info["config"]["hubspot"]["options"]["task_retries"]
    assert (option["type"], option["default"]) == ("integer", "2")
    assert info["plugins"] == [
        {"name": "hubspot_provider", "plugin-class": "hubspot_provider.plugins.HubSpotPlugin"}
    ]
    from hubspot_provider.plugins import HubSpotPlugin

    assert HubSpotPlugin.name == "hubspot_provider"
    assert [m["middleware"] for m in HubSpotPlugin.fastapi_root_middlewares] == [
        form.ConnectionFormMiddleware
    ]


# --------------------------------------------------------------------------- cleaning what the form sends


def test_saving_drops_the_forms_nulls_and_string_defaults_and_keeps_the_rest():
    cleaned = form.clean_body(SAVED_BY_THE_FORM, is_test=False)
    assert json.loads(cleaned["extra"]) == {
        "batch_size": 100,
        "timeout": 30,
        "deadline": 60,
        "max_response_bytes": 33554432,
        "max_retries": 8,
    }
    assert {k: v for k, v in cleaned.items() if k != "extra"} == {
        k: v for k, v in SAVED_BY_THE_FORM.items() if k != "extra"
    }


def test_what_the_user_chose_is_kept():
    extra = json.dumps(
        {
            "api_version": "2026-03",
            "portal_timezone": "Europe/Berlin",
            "client_id": "abc",
            "extra__hubspot__portal_timezone": "UTC",
            "extra__hubspot__client_secret": "",
            "batch_size": 0,
        }
    )
    assert json.loads(form.clean_extra(extra)) == {
        "api_version": "2026-03",
        "portal_timezone": "Europe/Berlin",
        "client_id": "abc",
        "batch_size": 0,
    }


@pytest.mark.parametrize("extra", [None, "", "{}", "not json", "[1, 2]", '{"batch_size": 5}'])
def test_an_extra_with_nothing_to_drop_comes_back_unchanged(extra):
    assert form.clean_extra(extra) == extra


def test_testing_from_the_list_reads_port_0_as_no_port():
    assert form.clean_body(TESTED_FROM_THE_LIST, is_test=True)["port"] is None
    # On save a port of 0 is what the user typed: it is left for the hook to refuse.
    assert form.clean_body({**TESTED_FROM_THE_LIST, "password": "x"}, is_test=False)["port"] == 0


def test_other_connection_types_are_left_alone():
    http = {**TESTED_FROM_THE_LIST, "conn_type": "http", "extra": SAVED_BY_THE_FORM["extra"]}
    assert form.clean_body(http, is_test=True) is http


# --------------------------------------------------------------------------- the middleware, as ASGI


class Downstream:
    """The API server behind the middleware: records the request it was handed, answers ``answer``."""

    def __init__(self, answer: object = None, status: int = 200) -> None:
        self.body: bytes | None = None
        self.headers: dict[bytes, bytes] = {}
        self.tested_as: str | None = None
        self.answer = b"{}" if answer is None else json.dumps(answer).encode()
        self.status = status

    async def __call__(self, scope, receive, send) -> None:
        self.headers = dict(scope.get("headers", []))
        self.tested_as = form.tested_connection_id.get()
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        self.body = b"".join(chunks)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(self.answer)).encode()),
        ]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        # In two pieces, as a streamed answer would come.
        await send({"type": "http.response.body", "body": self.answer[:5], "more_body": True})
        await send({"type": "http.response.body", "body": self.answer[5:]})


def call(
    method: str,
    path: str,
    body: bytes = b"",
    *,
    chunk: int | None = None,
    downstream: Downstream | None = None,
) -> tuple[Downstream, list]:
    downstream = downstream or Downstream()
    pieces = [body[i : i + chunk] for i in range(0, len(body), chunk)] if chunk else [body]
    messages = [
        {"type": "http.request", "body": piece, "more_body": n < len(pieces) - 1}
        for n, piece in enumerate(pieces)
    ]
    sent: list = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"accept-encoding", b"gzip, deflate"),
        ],
    }
    asyncio.run(form.ConnectionFormMiddleware(downstream)(scope, receive, send))
    return downstream, sent


def test_the_list_test_reaches_the_api_with_no_port_and_the_users_connection_id():
    downstream, sent = call(
        "POST", "/api/v2/connections/test", json.dumps(TESTED_FROM_THE_LIST).encode(), chunk=7
    )
    received = json.loads(downstream.body)
    assert received["port"] is None
    assert {k: v for k, v in received.items() if k != "port"} == {
        k: v for k, v in TESTED_FROM_THE_LIST.items() if k != "port"
    }
    assert downstream.headers[b"content-length"] == str(len(downstream.body)).encode()
    assert downstream.tested_as == "hubspot_ui"
    assert form.tested_connection_id.get() is None  # reset after the request
    assert sent[0]["status"] == 200


def test_save_and_edit_reach_the_api_without_nulls_or_string_defaults():
    for method, path in [
        ("POST", "/api/v2/connections"),
        ("PATCH", "/airflow/api/v2/connections/hubspot_ui"),
    ]:
        downstream, _ = call(method, path, json.dumps(SAVED_BY_THE_FORM).encode())
        extra = json.loads(json.loads(downstream.body)["extra"])
        assert None not in extra.values() and "api_version" not in extra and "portal_timezone" not in extra
        assert downstream.tested_as is None


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("PUT", "/api/v2/connections/hubspot_ui", json.dumps(TESTED_FROM_THE_LIST)),  # no such route
        ("POST", "/api/v2/variables", json.dumps(TESTED_FROM_THE_LIST)),
        ("PATCH", "/api/v2/connections", json.dumps(TESTED_FROM_THE_LIST)),  # the bulk endpoint
        ("POST", "/api/v2/connections/test", json.dumps({**TESTED_FROM_THE_LIST, "conn_type": "http"})),
        ("POST", "/api/v2/connections/test", "{not json"),
    ],
)
def test_other_requests_pass_through_byte_for_byte(method, path, body):
    downstream, _ = call(method, path, body.encode())
    assert downstream.body == body.encode()
    assert downstream.headers[b"content-length"] == str(len(body.encode())).encode()


def answer_of(sent: list) -> tuple[dict, bytes]:
    start, *bodies = sent
    return dict(start["headers"]), b"".join(b.get("body", b"") for b in bodies)


def test_the_edit_form_gets_every_field_with_its_default_where_the_extra_has_none():
    stored = {
        **TESTED_FROM_THE_LIST,
        "extra": json.dumps({"batch_size": 50, "client_secret": "***"}),
        "port": None,
    }
    other = {**stored, "connection_id": "web", "conn_type": "http"}
    page = {"connections": [stored, other], "total_entries": 2}
    downstream, sent = call("GET", "/api/v2/connections", downstream=Downstream(page))
    headers, raw = answer_of(sent)
    hubspot, http = json.loads(raw)["connections"]
    assert json.loads(hubspot["extra"]) == {
        **form.FORM_DEFAULTS,
        "batch_size": 50,
        "client_secret": "***",  # the stored values win
    }
    assert json.loads(hubspot["extra"])["api_version"] == "v4"
    assert http == other
    assert headers[b"content-length"] == str(len(raw)).encode()
    # The answer is read uncompressed: Airflow would gzip it for a browser.
    assert b"accept-encoding" not in downstream.headers

    # One connection, as GET /api/v2/connections/<id> answers; saving it drops the defaults again.
    _, sent = call("GET", "/api/v2/connections/hubspot_ui", downstream=Downstream({**stored, "extra": None}))
    filled = json.loads(answer_of(sent)[1])
    assert json.loads(filled["extra"]) == form.FORM_DEFAULTS
    assert json.loads(form.clean_body(filled, is_test=False)["extra"]) == {
        name: value for name, value in form.FORM_DEFAULTS.items() if isinstance(value, int)
    }


def test_answers_that_are_not_a_hubspot_connection_pass_through_byte_for_byte():
    for answer, status in [({"detail": "not found"}, 404), ({"connections": [], "total_entries": 0}, 200)]:
        downstream = Downstream(answer, status)
        _, sent = call("GET", "/api/v2/connections/x", downstream=downstream)
        assert answer_of(sent)[1] == downstream.answer


def test_a_body_over_the_cap_passes_through_unread(monkeypatch):
    monkeypatch.setattr(form, "MAX_BODY_BYTES", 10)
    body = json.dumps(TESTED_FROM_THE_LIST).encode()
    downstream, _ = call("POST", "/api/v2/connections/test", body)
    assert downstream.body == body


# --------------------------------------------------------------------------- what Test answers


def as_the_test_endpoint_does(extra: dict, *, host: str, password: str | None, user_id: str = "hubspot_ui"):
    """Airflow's test endpoint: the form's body as a Connection under a random id, exported as a URI."""
    from airflow.models.connection import Connection

    body = form.clean_body(
        {
            "conn_type": "hubspot",
            "connection_id": user_id,
            "host": host,
            "password": password,
            "port": 0,
            "extra": json.dumps(extra),
        },
        is_test=True,
    )
    conn = Connection(
        conn_id="w7mcw2il",
        conn_type="hubspot",
        host=body["host"],
        password=body["password"],
        port=body["port"],
        extra=body["extra"],
    )
    os.environ["AIRFLOW_CONN_W7MCW2IL"] = conn.get_uri()
    token = form.tested_connection_id.set(user_id)
    try:
        return conn.test_connection()
    finally:
        form.tested_connection_id.reset(token)
        del os.environ["AIRFLOW_CONN_W7MCW2IL"]


def test_a_green_test_says_where_it_connected(hubspot_emulator):
    ok, message = as_the_test_endpoint_does(
        {"portal_timezone": "Europe/Berlin"}, host=hubspot_emulator.url, password=hubspot_emulator.token
    )
    assert ok, message
    assert message.startswith(
        f"Connected to HubSpot at {hubspot_emulator.url} (v4, portal time zone Europe/Berlin)"
    )
    assert "3 subscription definitions" in message


@pytest.mark.parametrize("key", ["portal_timezone", "extra__hubspot__portal_timezone"])
def test_an_unknown_time_zone_fails_the_test(hubspot_emulator, key):
    ok, message = as_the_test_endpoint_does(
        {key: "Mars/Olympus"}, host=hubspot_emulator.url, password=hubspot_emulator.token
    )
    assert not ok
    assert "portal_timezone 'Mars/Olympus' is not an IANA time zone" in message
    assert hubspot_emulator.requests == []  # refused before anything is sent


def test_a_failed_test_names_the_users_connection_and_the_forms_field(hubspot_emulator):
    ok, message = as_the_test_endpoint_does({}, host=hubspot_emulator.url, password=None)
    assert not ok
    assert message.startswith("Connection 'hubspot_ui': it has no access token")
    assert "w7mcw2il" not in message
    assert "in the Access token field (the connection's password)" in message

    ok, message = as_the_test_endpoint_does({}, host=hubspot_emulator.url, password="pat-na1-not-the-token")
    assert not ok
    assert "connection 'hubspot_ui'" in message and "w7mcw2il" not in message
    assert "Check the token in the Access token field (the connection's password)" in message
    assert "pat-na1-not-the-token" not in message


def test_outside_the_test_endpoint_the_connection_keeps_its_own_id(
    hubspot_emulator, hubspot_conn, monkeypatch
):
    conn_json = json.loads(hubspot_emulator.airflow_connection())
    conn_json["password"] = "pat-na1-not-the-token"
    monkeypatch.setenv("AIRFLOW_CONN_HUBSPOT_CLI", json.dumps(conn_json))
    ok, message = HubSpotHook("hubspot_cli").test_connection()
    assert not ok and "connection 'hubspot_cli'" in message
