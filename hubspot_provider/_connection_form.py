"""What Airflow's connection form sends for a HubSpot connection, put right before the API server uses it.

Airflow 3's React form has three habits that break a ``hubspot`` connection, and a provider can only
change what the API server receives:

* The connection list's *Test* button sends ``port: 0`` for a connection saved without a port. The
  test endpoint then sees a port that differs from the stored one (``None``) and answers 400 "Bad
  Request" unless the request carries the password in clear, which the list never has. Port 0 is no
  TCP destination, so it is read as "no port".
* Saving writes every extra field of the form: the empty OAuth fields as ``null``, and the defaults
  ``v4`` and ``UTC``. Airflow registers every string of a connection's extra with its secret masker,
  which logs "Skipping masking for a secret as it's too short" for each one under five characters, on
  every task that loads the connection. Empty values and the defaults the hook uses anyway are
  dropped; what is left is what the user chose.
* The test endpoint tests a copy of the connection under a random id, which the hook's message would
  name. The id the user is testing is kept in :data:`tested_connection_id` for the hook's
  :meth:`~hubspot_provider.hooks.hubspot.HubSpotHook.test_connection`.

:class:`ConnectionFormMiddleware` does this for ``hubspot`` connections only and leaves every other
request as it came. The provider's plugin installs it in the API server. This module uses the
standard library only: the plugin is imported by every Airflow component.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from contextvars import ContextVar
from typing import Any

CONN_TYPE = "hubspot"
EXTRA_PREFIX = f"extra__{CONN_TYPE}__"
# The form's defaults that are strings. The hook uses the same values when the key is absent, so
# dropping them changes nothing but the extra's size and the masker's warnings.
STRING_DEFAULTS = {"api_version": "v4", "portal_timezone": "UTC", "oauth_token_path": "/oauth/v1/token"}
# A connection body is a few hundred bytes; anything far larger is passed on untouched.
MAX_BODY_BYTES = 1 << 20

tested_connection_id: ContextVar[str | None] = ContextVar("hubspot_tested_connection_id", default=None)
"""The id of the connection Airflow's test endpoint is testing (it tests a copy under a random id)."""

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def clean_extra(extra: str | None) -> str | None:
    """Drop the form's empty values and the string defaults from a connection's extra (a JSON text).

    Anything that is not a JSON object is returned as it came, for Airflow to reject with its own message.

    >>> clean_extra('{"api_version": "v4", "client_id": null, "batch_size": 50, "portal_timezone": "UTC"}')
    '{"batch_size": 50}'
    """
    if not extra:
        return extra
    try:
        values = json.loads(extra)
    except ValueError:
        return extra
    if not isinstance(values, dict):
        return extra
    kept = {
        key: value
        for key, value in values.items()
        if value is not None
        and value != ""
        and STRING_DEFAULTS.get(str(key).removeprefix(EXTRA_PREFIX), object()) != value
    }
    return extra if kept == values else json.dumps(kept)


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


def _route(method: str, path: str) -> str | None:
    """``"test"`` or ``"save"`` for the connection routes whose body is cleaned, else ``None``."""
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
    return None


class ConnectionFormMiddleware:
    """ASGI middleware for Airflow's API server: cleans what the connection form sends for ``hubspot``.

    See the module's docstring for what and why. Requests other than ``POST /api/v2/connections``,
    ``PATCH /api/v2/connections/<id>`` and ``POST /api/v2/connections/test``, and bodies of other
    connection types, pass through unread.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = (
            _route(scope.get("method", ""), scope.get("path", "")) if scope.get("type") == "http" else None
        )
        if route is None:
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                await self.app(scope, _replay([message]), send)
                return
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            more = message.get("more_body", False)
        raw = b"".join(chunks)
        body = _json_object(raw) if size <= MAX_BODY_BYTES else None
        token = None
        if body is not None and body.get("conn_type") == CONN_TYPE:
            cleaned = clean_body(body, is_test=route == "test")
            if cleaned != body:
                raw = json.dumps(cleaned).encode()
                scope = dict(scope)
                scope["headers"] = [
                    (name, value)
                    for name, value in scope.get("headers", [])
                    if name.lower() != b"content-length"
                ] + [(b"content-length", str(len(raw)).encode())]
            if route == "test" and isinstance(body.get("connection_id"), str):
                token = tested_connection_id.set(body["connection_id"])
        try:
            await self.app(
                scope, _replay([{"type": "http.request", "body": raw, "more_body": False}], receive), send
            )
        finally:
            if token is not None:
                tested_connection_id.reset(token)


def _json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


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
