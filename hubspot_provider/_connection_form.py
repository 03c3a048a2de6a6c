"""Airflow's connection form and a HubSpot connection: what the form sends and gets, put right in the API server.

Airflow 3's React form has four habits that break a ``hubspot`` connection, and a provider can only
change what passes through the API server:

* The connection list's *Test* button sends ``port: 0`` for a connection saved without a port. The
  test endpoint then sees a port that differs from the stored one (``None``) and answers 400 "Bad
  Request" unless the request carries the password in clear, which the list never has. Port 0 is no
  TCP destination, so it is read as "no port".
* Saving writes every extra field of the form: the empty OAuth fields as ``null``, and the defaults
  ``v4`` and ``UTC``. Airflow registers every string of a connection's extra with its secret masker,
  which logs "Skipping masking for a secret as it's too short" for each one under five characters, on
  every task that loads the connection. Empty values and the defaults the hook uses anyway are
  dropped; what is left is what the user chose.
* The edit form (Airflow 3.3) shows only the fields the stored extra holds, so a field left empty
  when the connection was made would vanish from it. The connection routes' answers carry every
  field of the form, with the form's default where the stored extra has none; saving drops them again.
* The test endpoint tests a copy of the connection under a random id, which the hook's message would
  name. The id the user is testing is kept in :data:`tested_connection_id` for the hook's
  :meth:`~hubspot_provider.hooks.hubspot.HubSpotHook.test_connection`.

:class:`ConnectionFormMiddleware` does this for ``hubspot`` connections only and leaves every other
request and answer as it came. The provider's plugin installs it in the API server. This module
uses the standard library only: the plugin is imported by every Airflow component.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from contextvars import ContextVar
from typing import Any

from hubspot_provider.get_provider_info import CONN_FIELDS

CONN_TYPE = "hubspot"
EXTRA_PREFIX = f"extra__{CONN_TYPE}__"
# The string settings' defaults. The hook uses the same values when the key is absent, so
# dropping them changes nothing but the extra's size and the masker's warnings.
STRING_DEFAULTS = {"api_version": "v4", "portal_timezone": "UTC", "oauth_token_path": "/oauth/v1/token"}
# What the form shows for a new connection: each field's default, or empty.
FORM_DEFAULTS: dict[str, Any] = {name: field["schema"].get("default") for name, field in CONN_FIELDS.items()}
# A connection body is a few hundred bytes; anything far larger is passed on untouched.
MAX_BODY_BYTES = 1 << 20
# A page of the connection list (100 connections by default) is far smaller than this.
MAX_ANSWER_BYTES = 16 << 20

tested_connection_id: ContextVar[str | None] = ContextVar("hubspot_tested_connection_id", default=None)
"""The id of the connection Airflow's test endpoint is testing (it tests a copy under a random id)."""

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def _json_dict(text: str | bytes | None) -> dict[str, Any] | None:
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def clean_extra(extra: str | None) -> str | None:
    """Drop the form's empty values and the string defaults from a connection's extra (a JSON text).

    Anything that is not a JSON object is returned as it came, for Airflow to reject with its own message.

    >>> clean_extra('{"api_version": "v4", "client_id": null, "batch_size": 50, "portal_timezone": "UTC"}')
    '{"batch_size": 50}'
    """
    values = _json_dict(extra)
    if not extra or values is None:
        return extra
    kept = {
        key: value
        for key, value in values.items()
        if value is not None
        and value != ""
        and STRING_DEFAULTS.get(str(key).removeprefix(EXTRA_PREFIX), object()) != value
    }
    return extra if kept == values else json.dumps(kept)


def fill_extra(extra: str | None) -> str | None:
    """Add every form field the extra lacks, with the form's default (or ``null``), for the edit form.

    >>> json.loads(fill_extra('{"batch_size": 50}'))["portal_timezone"]
    'UTC'
    """
    values = _json_dict(extra)
    if values is None:
        return extra
    present = {str(key).removeprefix(EXTRA_PREFIX) for key in values}
    missing = {name: default for name, default in FORM_DEFAULTS.items() if name not in present}
    return json.dumps({**values, **missing}) if missing else extra


def clean_body(body: dict[str, Any], *, is_test: bool) -> dict[str, Any]:
    """The connection body the API server should see; only a ``hubspot`` connection's body is changed."""
    if body.get("conn_type") != CONN_TYPE:
        return body
    cleaned = dict(body)
    if isinstance(cleaned.get("extra"), str):
        cleaned["extra"] = clean_extra(cleaned["extra"])
    if is_test and cleaned.get("port") == 0 and not isinstance(cleaned.get("port"), bool):
        cleaned["port"] = None
    return cleaned


def fill_answer(answer: Any) -> Any:
    """A connection, or a page of them, as the API answers: ``hubspot`` ones with :func:`fill_extra`."""

    def fill(connection: Any) -> Any:
        if isinstance(connection, dict) and connection.get("conn_type") == CONN_TYPE:
            extra = connection.get("extra")
            if extra is None or isinstance(extra, str):
                return {**connection, "extra": fill_extra(extra)}
        return connection

    if isinstance(answer, dict) and isinstance(answer.get("connections"), list):
        return {**answer, "connections": [fill(c) for c in answer["connections"]]}
    return fill(answer)


def _route(method: str, path: str) -> str | None:
    """``"test"``, ``"save"`` or ``"read"`` for the connection routes handled here, else ``None``."""
    parts = path.rstrip("/").split("/")
    try:
        at = len(parts) - 1 - parts[::-1].index("connections")
    except ValueError:
        return None
    if parts[at - 2 : at] != ["api", "v2"]:
        return None
    rest = parts[at + 1 :]
    if method == "POST" and rest == ["test"]:
        return "test"
    if (method == "POST" and rest == []) or (method == "PATCH" and len(rest) == 1):
        return "save"
    if method == "GET" and len(rest) <= 1:
        return "read"
    return None


def _with_header(headers: Any, name: bytes, value: bytes | None) -> list[tuple[bytes, bytes]]:
    kept = [(n, v) for n, v in headers or [] if n.lower() != name]
    return kept if value is None else [*kept, (name, value)]


class ConnectionFormMiddleware:
    """ASGI middleware for Airflow's API server: what the connection form sends and gets for ``hubspot``.

    See the module's docstring for what and why. It reads the bodies of ``POST /api/v2/connections``,
    ``PATCH /api/v2/connections/<id>`` and ``POST /api/v2/connections/test``, and the answers of
    ``GET /api/v2/connections[/<id>]``; everything else passes through untouched, and so do other
    connection types.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = (
            _route(scope.get("method", ""), scope.get("path", "")) if scope.get("type") == "http" else None
        )
        if route is None:
            await self.app(scope, receive, send)
        elif route == "read":
            await self._read(scope, receive, send)
        else:
            await self._write(scope, receive, send, is_test=route == "test")

    async def _write(self, scope: Scope, receive: Receive, send: Send, *, is_test: bool) -> None:
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                await self.app(scope, _replay([message]), send)
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        raw = b"".join(chunks)
        body = _json_dict(raw) if raw and len(raw) <= MAX_BODY_BYTES else None
        token = None
        if body is not None and body.get("conn_type") == CONN_TYPE:
            cleaned = clean_body(body, is_test=is_test)
            if cleaned != body:
                raw = json.dumps(cleaned).encode()
                scope = {
                    **scope,
                    "headers": _with_header(scope.get("headers"), b"content-length", str(len(raw)).encode()),
                }
            if is_test and isinstance(body.get("connection_id"), str):
                token = tested_connection_id.set(body["connection_id"])
        try:
            await self.app(
                scope, _replay([{"type": "http.request", "body": raw, "more_body": False}], receive), send
            )
        finally:
            if token is not None:
                tested_connection_id.reset(token)

    async def _read(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Ask for an uncompressed answer, so that it can be read: Airflow gzips for clients that accept it.
        scope = {**scope, "headers": _with_header(scope.get("headers"), b"accept-encoding", None)}
        start: Message | None = None
        chunks: list[bytes] = []
        passing = False

        async def hold(message: Message) -> None:
            nonlocal start, passing
            if passing or message["type"] not in ("http.response.start", "http.response.body"):
                await send(message)
            elif message["type"] == "http.response.start":
                headers = {n.lower(): v for n, v in message.get("headers", [])}
                json_answer = headers.get(b"content-type", b"").startswith(b"application/json")
                if message.get("status") != 200 or not json_answer or b"content-encoding" in headers:
                    passing = True
                    await send(message)
                else:
                    start = message
            else:
                chunks.append(message.get("body", b""))
                if sum(len(c) for c in chunks) > MAX_ANSWER_BYTES:
                    passing = True
                    await send(start)
                    await send({**message, "body": b"".join(chunks)})
                elif not message.get("more_body", False):
                    await _send_filled(start, b"".join(chunks), send)

        await self.app(scope, receive, hold)


async def _send_filled(start: Message, raw: bytes, send: Send) -> None:
    try:
        answer = json.loads(raw)
    except ValueError:
        answer = None
    filled = fill_answer(answer)
    if answer is not None and filled != answer:
        raw = json.dumps(filled).encode()
        start = {
            **start,
            "headers": _with_header(start.get("headers"), b"content-length", str(len(raw)).encode()),
        }
    await send(start)
    await send({"type": "http.response.body", "body": raw, "more_body": False})


def _replay(messages: list[Message], then: Receive | None = None) -> Receive:
    """A ``receive`` that hands out ``messages`` first, then waits on the original (for a disconnect)."""
    pending = list(messages)

    async def receive() -> Message:
        if pending:
            return pending.pop(0)
        if then is not None:
            return await then()
        return {"type": "http.disconnect"}

    return receive
