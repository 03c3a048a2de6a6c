"""A HubSpot Communication Preferences API emulator: a real HTTP server on 127.0.0.1.

It speaks the same wire format as ``https://api.hubapi.com`` for the endpoints the provider
uses, so tests, demos and benchmarks exercise real sockets, real retries and real dropped
connections without a HubSpot account:

* ``POST /communication-preferences/{v4,2026-03}/statuses/batch/write``
* ``POST /communication-preferences/{v4,2026-03}/statuses/batch/read?channel=EMAIL``
* ``POST /communication-preferences/{v4,2026-03}/statuses/batch/unsubscribe-all?channel=EMAIL[&verbose=true]``
* ``POST /communication-preferences/{v4,2026-03}/statuses/batch/unsubscribe-all/read?channel=EMAIL``
* ``GET  /communication-preferences/{v4,2026-03}/definitions``
* ``POST /oauth/v1/token`` and ``POST /oauth/2026-03/token`` (refresh-token grant)

Rate limits (rolling and daily), missing scopes, expired OAuth tokens, server errors and
dropped connections can be switched on by configuration or scripted per request with
:meth:`HubSpotEmulator.inject`.

Changes a contact makes on HubSpot's side, outside the API, are simulated with
:meth:`HubSpotEmulator.footer_unsubscribe`, :meth:`~HubSpotEmulator.preferences_page`,
:meth:`~HubSpotEmulator.unsubscribe_all_in_hubspot` and :meth:`~HubSpotEmulator.hubspot_side_change`.
They are not API requests. The ``source`` strings they record (:data:`SOURCE_UNSUBSCRIBE_LINK`,
:data:`SOURCE_PREFERENCES_PAGE`, :data:`SOURCE_HUBSPOT_UI`) are the emulator's own choice: HubSpot
documents ``PublicStatus.source`` as free text and shows only examples such as
``"Public status API"`` (:data:`SOURCE_PUBLIC_API`, what API writes record here too) and
``"Self Service Resubscription"``.

Example::

    from hubspot_provider.testing import HubSpotEmulator

    with HubSpotEmulator(rate_limit_max=3, rate_limit_interval_ms=500) as hs:
        os.environ["AIRFLOW_CONN_HUBSPOT_DEFAULT"] = hs.airflow_connection()
        ...
        assert hs.status_of("ada@example.com", 1001)["status"] == "SUBSCRIBED"

Run stand-alone with ``python -m hubspot_provider.testing.emulator --help``.

This module uses the standard library only and must never import Airflow: the pytest plugin
imports it in every test session of every project that installs the provider.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import shlex
import signal
import socket
import socketserver
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

__all__ = [
    "DEFAULT_SCOPES",
    "DEFAULT_SUBSCRIPTIONS",
    "DEFAULT_TOKEN",
    "INJECT_KINDS",
    "HubSpotEmulator",
    "RequestRecord",
    "SOURCE_HUBSPOT_UI",
    "SOURCE_PREFERENCES_PAGE",
    "SOURCE_PUBLIC_API",
    "SOURCE_UNSUBSCRIBE_LINK",
    "main",
]

DEFAULT_TOKEN = "pat-emulator-token"

SCOPE_BATCH_WRITE = "communication_preferences.statuses.batch.write"
SCOPE_BATCH_READ = "communication_preferences.statuses.batch.read"
SCOPE_READ_WRITE = "communication_preferences.read_write"
SCOPE_READ = "communication_preferences.read"

DEFAULT_SCOPES: tuple[str, ...] = (SCOPE_BATCH_WRITE, SCOPE_BATCH_READ, SCOPE_READ_WRITE)

DEFAULT_SUBSCRIPTIONS: tuple[dict[str, Any], ...] = (
    {"id": 1001, "name": "Newsletter", "description": "The monthly newsletter."},
    {"id": 1002, "name": "Product updates", "description": "News about product changes."},
    {"id": 1003, "name": "Events", "description": "Invitations to webinars and events."},
)

API_BASE_PATHS = ("/communication-preferences/v4/", "/communication-preferences/2026-03/")
OAUTH_TOKEN_PATHS = ("/oauth/v1/token", "/oauth/2026-03/token")

# Fixed so that groupName in 429 bodies looks like HubSpot's and stays stable across runs.
PORTAL_ID = 62515

# PublicStatus.source values. HubSpot documents the field as free text; only the API's value is
# taken from HubSpot's examples, the others are the emulator's choice (see the module docstring).
SOURCE_PUBLIC_API = "Public status API"
SOURCE_HUBSPOT_UI = "HubSpot UI"
SOURCE_UNSUBSCRIBE_LINK = "Unsubscribe Link"
SOURCE_PREFERENCES_PAGE = "Subscription Preferences Page"

_SOURCE = SOURCE_PUBLIC_API
_DEFINITION_TIMESTAMP = "2024-01-15T09:30:00.000Z"

_CHANNELS = frozenset({"EMAIL"})
_STATUS_STATES = frozenset({"SUBSCRIBED", "UNSUBSCRIBED", "NOT_SPECIFIED"})
_LEGAL_BASES = frozenset(
    {
        "CONSENT_WITH_NOTICE",
        "LEGITIMATE_INTEREST_CLIENT",
        "LEGITIMATE_INTEREST_OTHER",
        "LEGITIMATE_INTEREST_PQL",
        "NON_GDPR",
        "PERFORMANCE_OF_CONTRACT",
        "PROCESS_AND_STORE",
    }
)
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

_FAULT_CODES = (500, 502, 503, 504)
_FAULT_MESSAGES = {
    500: ("internal error", "INTERNAL_ERROR"),
    502: ("Bad Gateway: the upstream service did not answer", "INTERNAL_ERROR"),
    503: ("Service Unavailable: please retry later", "SERVICE_UNAVAILABLE"),
    504: ("Gateway Timeout: the upstream service timed out", "INTERNAL_ERROR"),
}

INJECT_KINDS = (
    "500",
    "502",
    "503",
    "504",
    "429",
    "429_daily",
    "drop_before",
    "drop_after",
    "slow:<seconds>",
    "401",
    "403",
)
_SHORT_CIRCUIT_KINDS = frozenset(
    {"500", "502", "503", "504", "429", "429_daily", "drop_before", "401", "403"}
)

# ASCII addr-spec with a dotted domain whose last label starts with a letter; strict enough to
# catch the typos and junk a consent export contains, loose enough for every real address seen.
_EMAIL_RE = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
    r"[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
)

_MSG_UNAUTHORIZED = (
    "Authentication credentials not found. This API supports OAuth 2.0 authentication and you can find more "
    "details at https://developers.hubspot.com/docs/methods/auth/oauth-overview"
)
_MSG_MISSING_SCOPES = (
    "This app hasn't been granted all required scopes to make this call. "
    "Read more about required scopes here: https://developers.hubspot.com/scopes."
)
_MSG_INVALID_JSON = (
    "Invalid input JSON : the request body does not match BatchInputPublicStatusRequest; check that every "
    "input has channel EMAIL, a valid statusState, a valid subscriberIdString email address and an "
    "integer subscriptionId"
)


def is_valid_email(value: object) -> bool:
    """Whether the emulator (like HubSpot) accepts ``value`` as a subscriber email address.

    Domains under the reserved ``.invalid`` top-level domain (RFC 2606) are rejected on purpose:
    tests use them to make the server refuse input that a client-side validator accepted.
    """
    if type(value) is not str or len(value) > 254 or not _EMAIL_RE.fullmatch(value):
        return False
    if value.index("@") > 64:
        return False
    return value.rpartition(".")[2].lower() != "invalid"


def _iso(ts: float) -> str:
    # Whole milliseconds first, so that 1714979289.123 (stored as ...289.12299999) reads ".123".
    ms = round(ts * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + ".%03dZ" % (ms % 1000)


def _epoch(at: datetime | float | None) -> float:
    """Seconds since the epoch for ``at``: an aware datetime, a number, or ``None`` for now."""
    if at is None:
        return time.time()
    if isinstance(at, datetime):
        if at.tzinfo is None or at.utcoffset() is None:
            raise ValueError("at must be a timezone-aware datetime")
        return at.timestamp()
    if isinstance(at, bool) or not isinstance(at, (int, float)) or not math.isfinite(at):
        raise TypeError("at must be an aware datetime, seconds since the epoch, or None")
    return float(at)


def _status_record(
    email: str,
    subscription_id: int,
    definition: Mapping[str, Any],
    status: str,
    source: str,
    stamp: str,
    legal_basis: str | None = None,
    explanation: str | None = None,
) -> dict[str, Any]:
    """A stored PublicStatus, in the shape batch/read returns; ``email`` is already lower-cased."""
    return {
        "channel": "EMAIL",
        "source": source,
        "status": status,
        "subscriberIdString": email,
        "subscriptionId": subscription_id,
        "timestamp": stamp,
        "businessUnitId": 0,
        "legalBasis": legal_basis,
        "legalBasisExplanation": explanation,
        "subscriptionName": definition["name"],
    }


def _wide_status_record(email: str, stamp: str) -> dict[str, Any]:
    """A stored PublicWideStatus (portal-wide opt-out of all email); ``email`` is lower-cased."""
    return {
        "subscriberIdString": email,
        "channel": "EMAIL",
        "status": "UNSUBSCRIBED",
        "timestamp": stamp,
        "wideStatusType": "PORTAL_WIDE",
        "businessUnitId": 0,
    }


def _email_error(value: Any) -> dict[str, Any]:
    """The per-input error for a malformed subscriber email in a BatchInputString."""
    shown = value if isinstance(value, str) else json.dumps(value)
    return {
        "status": "error",
        "category": "VALIDATION_ERROR",
        "message": f"Invalid email address: {shown}",
        "context": {"subscriberIdString": [shown]},
        "errors": [],
        "links": {},
    }


def _contacts(inputs: list[Any], errors: list[dict[str, Any]]) -> Iterator[str]:
    """Each valid email of a batch's inputs once, lower-cased; an error for each invalid one."""
    seen: set[str] = set()
    for email in inputs:
        if not is_valid_email(email):
            errors.append(_email_error(email))
            continue
        lowered = email.lower()
        if lowered not in seen:
            seen.add(lowered)
            yield lowered


def _envelope(
    started: float, results: list[dict[str, Any]], errors: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """A completed batch/action response; ``errors``/``numErrors`` only when there are errors."""
    payload: dict[str, Any] = {
        "status": "COMPLETE",
        "results": results,
        "requestedAt": _iso(started),
        "startedAt": _iso(started),
        "completedAt": _iso(time.time()),
    }
    if errors:
        payload["errors"] = errors
        payload["numErrors"] = len(errors)
    return payload


def _error_body(correlation_id: str, message: str, category: str, **extra: Any) -> dict[str, Any]:
    return {
        "status": "error",
        "message": message,
        "correlationId": correlation_id,
        "category": category,
        **extra,
    }


@dataclass(frozen=True)
class RequestRecord:
    """One request the emulator answered (or dropped), as seen by the server.

    :param method: HTTP method.
    :param path: request path without the query string.
    :param status: HTTP status sent, or ``None`` when the connection was closed without a response.
    :param n_inputs: number of ``inputs`` in a batch body (0 for other requests).
    :param at: ``time.monotonic()`` when the request arrived.
    :param kind: ``"ok"``, ``"rate_limited"``, ``"daily_limited"``, ``"fault"``, ``"dropped"``,
        ``"bad_request"``, ``"unauthorized"`` or ``"forbidden"``.
    """

    method: str
    path: str
    status: int | None
    n_inputs: int
    at: float
    kind: str


class _Reply:
    __slots__ = ("status", "body", "headers", "kind", "drop", "delay", "n_inputs")

    def __init__(
        self,
        status: int | None,
        body: bytes = b"",
        headers: _Headers | None = None,
        kind: str = "ok",
        drop: bool = False,
        delay: float = 0.0,
    ) -> None:
        self.status = status
        self.body = body
        self.headers = headers if headers is not None else []
        self.kind = kind
        self.drop = drop
        self.delay = delay
        self.n_inputs = 0


class _Route:
    """One endpoint; ``writes`` routes change statuses and are the ones faults are injected into."""

    __slots__ = ("name", "method", "scopes", "writes")

    def __init__(self, name: str, method: str, scopes: tuple[str, ...], writes: bool = False) -> None:
        self.name = name
        self.method = method
        self.scopes = scopes
        self.writes = writes


_ROUTES: dict[str, _Route] = {}
for _base in API_BASE_PATHS:
    _ROUTES[_base + "statuses/batch/write"] = _Route("write", "POST", (SCOPE_BATCH_WRITE,), writes=True)
    _ROUTES[_base + "statuses/batch/read"] = _Route("read", "POST", (SCOPE_BATCH_READ,))
    _ROUTES[_base + "statuses/batch/unsubscribe-all"] = _Route(
        "unsubscribe_all", "POST", (SCOPE_BATCH_WRITE,), writes=True
    )
    _ROUTES[_base + "statuses/batch/unsubscribe-all/read"] = _Route(
        "unsubscribe_all_read", "POST", (SCOPE_BATCH_READ,)
    )
    _ROUTES[_base + "definitions"] = _Route("definitions", "GET", (SCOPE_READ_WRITE, SCOPE_READ))
for _path in OAUTH_TOKEN_PATHS:
    _ROUTES[_path] = _Route("oauth_token", "POST", ())
del _base, _path

_UNPARSED = object()

_Headers = list[tuple[str, str]]


class HubSpotEmulator:
    """An in-process HubSpot Communication Preferences API on ``127.0.0.1``.

    Start it with :meth:`start` or as a context manager; point clients at :attr:`url`.
    All state is kept in memory and guarded by one lock; inspection properties return copies.

    Unsubscribe from all: ``statuses/batch/unsubscribe-all`` (and :meth:`unsubscribe_all_in_hubspot`)
    record a portal-wide status (``wideStatusType`` ``PORTAL_WIDE``, ``status`` ``UNSUBSCRIBED``) and
    set every defined subscription of the contact to ``UNSUBSCRIBED``. The wide status is modelled
    as sticky: later per-subscription changes, through ``batch/write`` or the HubSpot-side helpers,
    change only that subscription and never clear the wide status. HubSpot does not document how a
    contact's opt-out of all email is lifted, and a sticky flag is the conservative reading; only
    :meth:`reset` forgets wide statuses.

    HubSpot-side changes (the email footer's unsubscribe link, the subscription preferences page,
    edits in HubSpot's UI) are made with :meth:`hubspot_side_change` and its shortcuts. They take
    effect immediately, are not API requests (not logged, not rate limited, not counted in
    :attr:`writes_applied`) and record the emulator's own ``source`` strings
    (:data:`SOURCE_UNSUBSCRIBE_LINK`, :data:`SOURCE_PREFERENCES_PAGE`, :data:`SOURCE_HUBSPOT_UI`);
    HubSpot documents ``source`` as free text, e.g. ``"Public status API"`` or
    ``"Self Service Resubscription"``.

    :param token: static bearer token (private app / service key) that is accepted.
    :param scopes: scopes granted to ``token`` and to OAuth access tokens issued by the emulator.
    :param extra_tokens: more static tokens, ``{token: scopes}``, e.g. one without the write scope.
    :param subscriptions: subscription definitions; ``None`` for ids 1001, 1002 and 1003, or a list
        of integer ids, or a list of dicts with at least ``id`` (other SubscriptionDefinition fields
        are filled in).
    :param rate_limit_max: requests allowed per rolling interval, across all tokens; ``None`` disables
        the rolling limit (and its headers).
    :param rate_limit_interval_ms: length of the rolling interval in milliseconds.
    :param daily_limit: requests allowed per "day"; ``None`` for no daily limit.
    :param daily_reset_s: the daily counter resets this many seconds after the day's first request,
        and DAILY 429s carry ``Retry-After``; ``None`` never resets (and sends no ``Retry-After``,
        like HubSpot).
    :param fault_rate_5xx: probability that an API request fails with a random 500/502/503/504,
        with nothing applied.
    :param fault_rate_drop_after_write: probability that a batch write or batch unsubscribe-all is
        applied and then the connection is closed without a response.
    :param latency_s: delay added to every request: seconds, or a ``(low, high)`` range drawn
        uniformly.
    :param seed: seed for the random faults and latency, so runs are reproducible.
    :param gdpr: require ``legalBasis`` and ``legalBasisExplanation`` on every input, as an
        account with data-privacy settings does; inputs without them fail individually.
    :param max_batch_inputs: a batch with more inputs than this is rejected whole (400).
    :param multi_status: answer 207 instead of 200 when a batch write or batch unsubscribe-all has
        per-input errors (HubSpot's spec declares only 200 for both).
    :param oauth_client_id: client id accepted by the token endpoint.
    :param oauth_client_secret: client secret accepted by the token endpoint.
    :param oauth_refresh_token: refresh token accepted by the token endpoint.
    :param oauth_expires_in: lifetime in seconds of issued access tokens.
    :param port: TCP port; 0 picks a free one.

    Example::

        with HubSpotEmulator(gdpr=True, max_batch_inputs=100) as hs:
            requests.post(
                f"{hs.url}/communication-preferences/v4/statuses/batch/write",
                headers={"Authorization": f"Bearer {hs.token}"},
                json={"inputs": [...]},
            )
    """

    def __init__(
        self,
        token: str = DEFAULT_TOKEN,
        scopes: Iterable[str] = DEFAULT_SCOPES,
        extra_tokens: Mapping[str, Iterable[str]] | None = None,
        subscriptions: Sequence[int | Mapping[str, Any]] | None = None,
        rate_limit_max: int | None = 100,
        rate_limit_interval_ms: int = 10_000,
        daily_limit: int | None = None,
        daily_reset_s: float | None = None,
        fault_rate_5xx: float = 0.0,
        fault_rate_drop_after_write: float = 0.0,
        latency_s: float | tuple[float, float] = 0.0,
        seed: int = 0,
        gdpr: bool = False,
        max_batch_inputs: int | None = None,
        multi_status: bool = False,
        oauth_client_id: str = "emulator-client-id",
        oauth_client_secret: str = "emulator-client-secret",
        oauth_refresh_token: str = "emulator-refresh-token",
        oauth_expires_in: float = 1800,
        port: int = 0,
    ) -> None:
        if rate_limit_max is not None and rate_limit_max < 1:
            raise ValueError("rate_limit_max must be a positive integer or None")
        if rate_limit_interval_ms <= 0:
            raise ValueError("rate_limit_interval_ms must be positive")
        if not 0.0 <= fault_rate_5xx <= 1.0:
            raise ValueError("fault_rate_5xx must be between 0 and 1")
        if not 0.0 <= fault_rate_drop_after_write <= 1.0:
            raise ValueError("fault_rate_drop_after_write must be between 0 and 1")
        if isinstance(latency_s, (tuple, list)):
            low, high = (float(v) for v in latency_s)
            if not 0.0 <= low <= high:
                raise ValueError("latency_s range must satisfy 0 <= low <= high")
            self._latency: tuple[float, float] = (low, high)
        else:
            if latency_s < 0:
                raise ValueError("latency_s must not be negative")
            self._latency = (float(latency_s), float(latency_s))

        self.token = token
        self.scopes = tuple(scopes)
        self.rate_limit_max = rate_limit_max
        self.rate_limit_interval_ms = int(rate_limit_interval_ms)
        self.daily_limit = daily_limit
        self.daily_reset_s = daily_reset_s
        self.fault_rate_5xx = float(fault_rate_5xx)
        self.fault_rate_drop_after_write = float(fault_rate_drop_after_write)
        self.seed = seed
        self.gdpr = gdpr
        self.max_batch_inputs = max_batch_inputs
        self.multi_status = multi_status
        self.oauth_client_id = oauth_client_id
        self.oauth_client_secret = oauth_client_secret
        self.oauth_refresh_token = oauth_refresh_token
        self.oauth_expires_in = oauth_expires_in

        self._static_tokens: dict[str, frozenset[str]] = {token: frozenset(self.scopes)}
        for extra_token, extra_scopes in (extra_tokens or {}).items():
            self._static_tokens[extra_token] = frozenset(extra_scopes)
        self._definitions = self._build_definitions(subscriptions)
        self._interval_s = self.rate_limit_interval_ms / 1000.0

        self._lock = threading.Lock()
        self._oauth_tokens: dict[str, tuple[frozenset[str], float]] = {}
        self._reset_state()

        self._requested_port = port
        self._port: int | None = port or None
        self._server: _Server | None = None
        self._serve_thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> HubSpotEmulator:
        """Bind the socket and serve in a background thread; returns ``self``."""
        if self._server is not None:
            return self
        self._stopping.clear()
        server = _Server(("127.0.0.1", self._requested_port), _Handler, self)
        self._server = server
        self._port = server.server_address[1]
        self._serve_thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="hubspot-emulator", daemon=True
        )
        self._serve_thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket and every open connection.

        Requests still being slowed down are cut short; no thread or socket is left behind.
        """
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        if self._serve_thread is not None:
            self._serve_thread.join()
            self._serve_thread = None
        server.server_close()
        server.close_connections(timeout=5.0)

    def __enter__(self) -> HubSpotEmulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        # The token stays out of reprs: they end up in test failure output and logs.
        return f"HubSpotEmulator(url={self.url!r})" if self._port else "HubSpotEmulator(not started)"

    # ------------------------------------------------------------------ public inspection

    @property
    def port(self) -> int:
        """The TCP port the emulator listens on."""
        if self._port is None:
            raise RuntimeError("the emulator has not been started")
        return self._port

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:54321`` (no trailing slash)."""
        return f"http://127.0.0.1:{self.port}"

    def inject(self, kind: str, count: int = 1) -> None:
        """Script faults for the next ``count`` write requests (first in, first out).

        Write requests are ``statuses/batch/write`` and ``statuses/batch/unsubscribe-all``; reads,
        definitions and token requests never consume an injected fault.

        Kinds: ``"500"``, ``"502"``, ``"503"``, ``"504"`` (error body, nothing applied); ``"429"``
        (TEN_SECONDLY_ROLLING body); ``"429_daily"`` (DAILY body); ``"drop_before"`` (connection
        closed, nothing applied); ``"drop_after"`` (applied, then connection closed);
        ``"slow:<seconds>"`` (applied, then the answer is delayed); ``"401"``; ``"403"``.

        Example::

            hs.inject("503", count=2)   # the next two writes fail, the third goes through
            hs.inject("slow:2.5")       # the write after those answers 2.5 s late
        """
        if kind not in _SHORT_CIRCUIT_KINDS and kind != "drop_after":
            prefix, _, seconds = kind.partition(":")
            try:
                ok = prefix == "slow" and float(seconds) >= 0
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"unknown fault kind {kind!r}; expected one of {', '.join(INJECT_KINDS)}")
        if count < 0:
            raise ValueError("count must not be negative")
        with self._lock:
            self._injected.extend([kind] * count)

    def status_of(self, email: str, subscription_id: int, channel: str = "EMAIL") -> dict[str, Any] | None:
        """The current subscription status (a PublicStatus-like dict), or ``None`` if never written."""
        with self._lock:
            record = self._statuses.get((email.lower(), int(subscription_id), channel))
            return dict(record) if record is not None else None

    @property
    def statuses(self) -> dict[tuple[str, int, str], dict[str, Any]]:
        """A copy of all statuses, keyed by ``(lower-cased email, subscription id, channel)``."""
        with self._lock:
            return {key: dict(value) for key, value in self._statuses.items()}

    def wide_status_of(self, email: str) -> dict[str, Any] | None:
        """The contact's portal-wide EMAIL status (a PublicWideStatus dict), or ``None`` if none.

        Set by ``statuses/batch/unsubscribe-all`` and :meth:`unsubscribe_all_in_hubspot`; it stays
        set until :meth:`reset`, whatever is later written to single subscriptions.
        """
        with self._lock:
            record = self._wide_statuses.get((email.lower(), "EMAIL"))
            return dict(record) if record is not None else None

    @property
    def requests(self) -> list[RequestRecord]:
        """A copy of the request log, oldest first."""
        with self._lock:
            return list(self._records)

    @property
    def writes_applied(self) -> int:
        """How many write inputs were applied (including ones that changed nothing).

        A ``batch/write`` input counts once, and so does each distinct valid email of a
        ``batch/unsubscribe-all`` request. HubSpot-side changes made with :meth:`hubspot_side_change`
        and its shortcuts are not counted.
        """
        with self._lock:
            return self._writes_applied

    @property
    def token_requests(self) -> int:
        """How many OAuth refresh-token requests were answered with a new access token."""
        with self._lock:
            return self._token_requests

    @property
    def subscription_ids(self) -> list[int]:
        """Ids of the configured subscription definitions."""
        return list(self._definitions)

    def reset_daily(self) -> None:
        """Start a new "day": the daily request counter goes back to zero."""
        with self._lock:
            self._daily_used = 0
            self._day_started_at = None

    def reset(self) -> None:
        """Forget statuses, wide statuses, the request log, counters, rate-limit usage and injected faults.

        The random generators are reseeded, so a reset emulator behaves like a fresh one.
        Issued OAuth access tokens stay valid.
        """
        with self._lock:
            self._reset_state()

    # ------------------------------------------------------------------ HubSpot-side changes

    def hubspot_side_change(
        self,
        email: str,
        subscription_id: int,
        status: str,
        *,
        source: str = SOURCE_HUBSPOT_UI,
        at: datetime | float | None = None,
    ) -> dict[str, Any]:
        """Change one subscription status the way HubSpot itself would, outside the API.

        The record is stored exactly as ``batch/read`` returns it: ``timestamp`` from ``at``,
        ``source`` as given, ``legalBasis`` and ``legalBasisExplanation`` ``None``, ``subscriptionName``
        from the definition. The change is not an API request: it is not logged, uses no rate-limit
        budget and is not counted in :attr:`writes_applied`. A wide status is left as it is.

        :param email: the contact's email address (stored lower-cased).
        :param subscription_id: id of a configured subscription definition.
        :param status: ``"SUBSCRIBED"``, ``"UNSUBSCRIBED"`` or ``"NOT_SPECIFIED"``.
        :param source: the ``source`` to record; HubSpot documents it as free text.
        :param at: when the change happened: an aware datetime, seconds since the epoch, or
            ``None`` for now; stored with millisecond precision.
        :return: a copy of the stored record.
        :raises ValueError: for an invalid email, an unknown subscription id, an invalid status or
            a naive datetime.
        :raises TypeError: if ``at`` is none of the accepted types.

        Example::

            hs.hubspot_side_change("ada@example.com", 1002, "SUBSCRIBED", at=time.time() - 3600)
        """
        if not is_valid_email(email):
            raise ValueError(f"invalid email address: {email!r}")
        definition = self._definitions.get(subscription_id) if type(subscription_id) is int else None
        if definition is None:
            configured = ", ".join(map(str, self._definitions))
            raise ValueError(f"unknown subscription id {subscription_id!r}; configured: {configured}")
        if status not in _STATUS_STATES:
            raise ValueError(
                f"invalid status {status!r}; expected one of {', '.join(sorted(_STATUS_STATES))}"
            )
        if type(source) is not str or not source:
            raise ValueError("source must be a non-empty string")
        stamp = _iso(_epoch(at))
        lowered = email.lower()
        record = _status_record(lowered, subscription_id, definition, status, source, stamp)
        with self._lock:
            self._statuses[(lowered, subscription_id, "EMAIL")] = record
            return dict(record)

    def footer_unsubscribe(
        self, email: str, subscription_id: int, *, at: datetime | float | None = None
    ) -> dict[str, Any]:
        """The contact clicks the one-click unsubscribe link in an email's footer.

        Sets the subscription to ``UNSUBSCRIBED`` with source :data:`SOURCE_UNSUBSCRIBE_LINK`; see
        :meth:`hubspot_side_change`.
        """
        return self.hubspot_side_change(
            email, subscription_id, "UNSUBSCRIBED", source=SOURCE_UNSUBSCRIBE_LINK, at=at
        )

    def preferences_page(
        self, email: str, subscription_id: int, status: str, *, at: datetime | float | None = None
    ) -> dict[str, Any]:
        """The contact changes one subscription on HubSpot's subscription preferences page.

        Records source :data:`SOURCE_PREFERENCES_PAGE`; see :meth:`hubspot_side_change`.
        """
        return self.hubspot_side_change(email, subscription_id, status, source=SOURCE_PREFERENCES_PAGE, at=at)

    def unsubscribe_all_in_hubspot(self, email: str, *, at: datetime | float | None = None) -> dict[str, Any]:
        """The contact chooses "unsubscribe from all" on HubSpot's subscription preferences page.

        Records the portal-wide status and sets every defined subscription to ``UNSUBSCRIBED`` with
        source :data:`SOURCE_UNSUBSCRIBE_LINK`, exactly as ``statuses/batch/unsubscribe-all`` does
        apart from the source: subscriptions already ``UNSUBSCRIBED`` keep their record, and an
        existing wide status keeps its timestamp. Not an API request (see :meth:`hubspot_side_change`).

        :return: a copy of the contact's wide status.
        :raises ValueError: for an invalid email address or a naive datetime.
        """
        if not is_valid_email(email):
            raise ValueError(f"invalid email address: {email!r}")
        stamp = _iso(_epoch(at))
        lowered = email.lower()
        with self._lock:
            self._unsubscribe_all_locked(lowered, SOURCE_UNSUBSCRIBE_LINK, stamp)
            return dict(self._wide_statuses[(lowered, "EMAIL")])

    def airflow_connection(self, conn_id: str = "hubspot_default", **extra: Any) -> str:
        """JSON for an ``AIRFLOW_CONN_<CONN_ID>`` environment variable pointing at this emulator.

        ``conn_id`` only documents which variable the value is meant for; ``extra`` becomes the
        connection's extra field. The host is the whole URL (``http://127.0.0.1:<port>``), so the
        connection form shows it whole as the API base URL.

        Example::

            monkeypatch.setenv("AIRFLOW_CONN_HUBSPOT_DEFAULT", hs.airflow_connection())
        """
        del conn_id
        return json.dumps(
            {"conn_type": "hubspot", "host": self.url, "password": self.token, "extra": dict(extra)}
        )

    # ------------------------------------------------------------------ state

    def _reset_state(self) -> None:
        self._statuses: dict[tuple[str, int, str], dict[str, Any]] = {}
        self._wide_statuses: dict[tuple[str, str], dict[str, Any]] = {}
        self._records: list[RequestRecord] = []
        self._window: deque[float] = deque()
        self._daily_used = 0
        self._day_started_at: float | None = None
        self._injected: deque[str] = deque()
        self._writes_applied = 0
        self._token_requests = 0
        self._fault_rng = random.Random(self.seed)
        self._latency_rng = random.Random(f"{self.seed}:latency")

    @staticmethod
    def _build_definitions(
        subscriptions: Sequence[int | Mapping[str, Any]] | None,
    ) -> dict[int, dict[str, Any]]:
        items = DEFAULT_SUBSCRIPTIONS if subscriptions is None else subscriptions
        definitions: dict[int, dict[str, Any]] = {}
        for item in items:
            spec: dict[str, Any] = {"id": item} if isinstance(item, int) else dict(item)
            sid = int(spec["id"])
            definition = {
                "id": str(sid),
                "name": f"Subscription {sid}",
                "description": f"Emulated subscription {sid}.",
                "purpose": "Marketing",
                "communicationMethod": "Email",
                "isActive": True,
                "isDefault": False,
                "isInternal": False,
                "businessUnitId": 0,
                "createdAt": _DEFINITION_TIMESTAMP,
                "updatedAt": _DEFINITION_TIMESTAMP,
            }
            definition.update(spec)
            definition["id"] = str(sid)
            definitions[sid] = definition
        return definitions

    # ------------------------------------------------------------------ request processing

    def _serve(self, method: str, raw_path: str, headers: Any, body: bytes) -> _Reply:
        """Turn one parsed HTTP request into a reply; runs on a connection thread."""
        path, _, query = raw_path.partition("?")
        correlation_id = str(uuid.uuid4())
        low, high = self._latency
        if high > 0:
            if low == high:
                delay = low
            else:
                with self._lock:
                    delay = self._latency_rng.uniform(low, high)
            self._stopping.wait(delay)

        route = _ROUTES.get(path)
        if route is None:
            payload = _error_body(correlation_id, f"Unable to route {method} {path}", "OBJECT_NOT_FOUND")
            return self._reply(404, payload, correlation_id, "bad_request", self._current_limit_headers())
        if method != route.method:
            message = f"HTTP 405 Method Not Allowed: {path} supports {route.method} only"
            payload = _error_body(correlation_id, message, "VALIDATION_ERROR")
            return self._reply(405, payload, correlation_id, "bad_request", self._current_limit_headers())
        if route.name == "oauth_token":
            return self._serve_token(body, correlation_id)

        doc: Any = _UNPARSED
        if route.name != "definitions":
            try:
                doc = json.loads(body)
            except (ValueError, UnicodeDecodeError):
                doc = _UNPARSED
        inputs = doc.get("inputs") if isinstance(doc, dict) else None
        n_inputs = len(inputs) if isinstance(inputs, list) else 0

        reply: _Reply | None = None
        injected: str | None = None
        if route.writes:
            with self._lock:
                injected = self._injected.popleft() if self._injected else None
            if injected in _SHORT_CIRCUIT_KINDS:
                reply = self._injected_reply(injected, route, correlation_id)
                reply.n_inputs = n_inputs
                return reply

        now = time.monotonic()
        limit_headers: _Headers = []
        with self._lock:
            granted = self._authenticate(headers.get("Authorization"), now)
            if granted is None:
                reply = self._unauthorized_reply(correlation_id, self._limit_headers(static=False))
            elif granted[0].isdisjoint(route.scopes):
                reply = self._missing_scopes_reply(route, correlation_id, self._limit_headers(granted[1]))
            else:
                static = granted[1]
                reply = self._check_limits(now, correlation_id, static)
                if reply is None:
                    limit_headers = self._limit_headers(static)
                    if self.fault_rate_5xx > 0 and self._fault_rng.random() < self.fault_rate_5xx:
                        code = self._fault_rng.choice(_FAULT_CODES)
                        reply = self._fault_reply(code, correlation_id, limit_headers)
        if reply is None:
            if route.name == "write":
                reply = self._batch_write(doc, correlation_id, limit_headers)
            elif route.name == "read":
                reply = self._batch_read(doc, query, correlation_id, limit_headers)
            elif route.name == "unsubscribe_all":
                reply = self._batch_unsubscribe_all(doc, query, correlation_id, limit_headers)
            elif route.name == "unsubscribe_all_read":
                reply = self._batch_unsubscribe_all_read(doc, query, correlation_id, limit_headers)
            else:
                reply = self._definitions_reply(query, correlation_id, limit_headers)
            if route.writes and reply.kind == "ok" and self.fault_rate_drop_after_write > 0:
                with self._lock:
                    reply.drop = self._fault_rng.random() < self.fault_rate_drop_after_write
        reply.n_inputs = n_inputs

        # Scripted modifiers act on whatever the request produced, so a test that injects one
        # always observes it, even if the request itself was refused.
        if injected == "drop_after":
            reply.drop = True
        elif injected is not None and injected.startswith("slow:"):
            reply.delay = float(injected.partition(":")[2])
        if reply.drop:
            reply.status, reply.kind = None, "dropped"
        return reply

    def _record(self, method: str, raw_path: str, reply: _Reply, at: float) -> None:
        record = RequestRecord(
            method=method,
            path=raw_path.partition("?")[0],
            status=reply.status,
            n_inputs=reply.n_inputs,
            at=at,
            kind=reply.kind,
        )
        with self._lock:
            self._records.append(record)

    def _authenticate(self, authorization: str | None, now: float) -> tuple[frozenset[str], bool] | None:
        if not authorization:
            return None
        scheme, _, credential = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            return None
        credential = credential.strip()
        scopes = self._static_tokens.get(credential)
        if scopes is not None:
            return scopes, True
        issued = self._oauth_tokens.get(credential)
        if issued is not None and now < issued[1]:
            return issued[0], False
        return None

    def _check_limits(self, now: float, correlation_id: str, static: bool) -> _Reply | None:
        """Consume one request of budget, or return the 429 that rejects it (budget untouched)."""
        if self.daily_limit is not None:
            if (
                self.daily_reset_s is not None
                and self._day_started_at is not None
                and now - self._day_started_at >= self.daily_reset_s
            ):
                self._daily_used = 0
                self._day_started_at = None
            if self._daily_used >= self.daily_limit:
                return self._daily_limited_reply(now, correlation_id, self._limit_headers(static))
        if self.rate_limit_max is not None:
            self._purge_window(now)
            if len(self._window) >= self.rate_limit_max:
                return self._rolling_limited_reply(correlation_id, self._limit_headers(static))
            self._window.append(now)
        if self.daily_limit is not None:
            if self._day_started_at is None:
                self._day_started_at = now
            self._daily_used += 1
        return None

    def _purge_window(self, now: float) -> None:
        horizon = now - self._interval_s
        window = self._window
        while window and window[0] <= horizon:
            window.popleft()

    def _current_limit_headers(self, static: bool = False) -> _Headers:
        with self._lock:
            return self._limit_headers(static)

    def _limit_headers(self, static: bool) -> _Headers:
        """Rate-limit headers describing the budget left; the caller holds the lock."""
        headers: _Headers = []
        if self.rate_limit_max is not None:
            self._purge_window(time.monotonic())
            used = len(self._window)
            headers += [
                ("X-HubSpot-RateLimit-Interval-Milliseconds", str(self.rate_limit_interval_ms)),
                ("X-HubSpot-RateLimit-Max", str(self.rate_limit_max)),
                ("X-HubSpot-RateLimit-Remaining", str(max(0, self.rate_limit_max - used))),
            ]
        if self.daily_limit is not None and static:
            headers += [
                ("X-HubSpot-RateLimit-Daily", str(self.daily_limit)),
                ("X-HubSpot-RateLimit-Daily-Remaining", str(max(0, self.daily_limit - self._daily_used))),
            ]
        return headers

    @staticmethod
    def _reply(
        status: int, payload: Mapping[str, Any], correlation_id: str, kind: str, headers: _Headers
    ) -> _Reply:
        body = json.dumps(payload, separators=(",", ":")).encode()
        return _Reply(status, body, [("X-HubSpot-Correlation-Id", correlation_id), *headers], kind)

    def _unauthorized_reply(self, correlation_id: str, headers: _Headers) -> _Reply:
        payload = _error_body(correlation_id, _MSG_UNAUTHORIZED, "INVALID_AUTHENTICATION")
        return self._reply(401, payload, correlation_id, "unauthorized", headers)

    def _rolling_limited_reply(self, correlation_id: str, headers: _Headers) -> _Reply:
        payload = {
            "status": "error",
            "message": "You have reached your ten_secondly_rolling limit.",
            "errorType": "RATE_LIMIT",
            "correlationId": correlation_id,
            "policyName": "TEN_SECONDLY_ROLLING",
            "groupName": f"publicapi:private-app-api-calls-ten-secondly:{PORTAL_ID}",
        }
        return self._reply(429, payload, correlation_id, "rate_limited", headers)

    def _daily_limited_reply(self, now: float, correlation_id: str, headers: _Headers) -> _Reply:
        payload = {
            "status": "error",
            "message": "You have reached your daily limit.",
            "errorType": "RATE_LIMIT",
            "correlationId": correlation_id,
            "policyName": "DAILY",
            "requestId": str(uuid.uuid4()),
        }
        if self.daily_reset_s is not None:
            started = self._day_started_at if self._day_started_at is not None else now
            retry_after = max(1, math.ceil(started + self.daily_reset_s - now))
            headers = [*headers, ("Retry-After", str(retry_after))]
        return self._reply(429, payload, correlation_id, "daily_limited", headers)

    def _missing_scopes_reply(self, route: _Route, correlation_id: str, headers: _Headers) -> _Reply:
        payload = _error_body(
            correlation_id,
            _MSG_MISSING_SCOPES,
            "MISSING_SCOPES",
            errors=[
                {
                    "message": "One or more of the following scopes are required.",
                    "context": {"requiredScopes": list(route.scopes)},
                }
            ],
            links={"scopes": "https://developers.hubspot.com/scopes"},
        )
        return self._reply(403, payload, correlation_id, "forbidden", headers)

    def _fault_reply(self, code: int, correlation_id: str, headers: _Headers) -> _Reply:
        message, category = _FAULT_MESSAGES[code]
        payload = _error_body(correlation_id, message, category)
        return self._reply(code, payload, correlation_id, "fault", headers)

    def _injected_reply(self, kind: str, route: _Route, correlation_id: str) -> _Reply:
        if kind == "drop_before":
            return _Reply(None, kind="dropped", drop=True)
        with self._lock:
            headers = self._limit_headers(static=kind != "401")
            if kind == "401":
                return self._unauthorized_reply(correlation_id, headers)
            if kind == "403":
                return self._missing_scopes_reply(route, correlation_id, headers)
            if kind == "429":
                return self._rolling_limited_reply(correlation_id, headers)
            if kind == "429_daily":
                return self._daily_limited_reply(time.monotonic(), correlation_id, headers)
        return self._fault_reply(int(kind), correlation_id, headers)

    def _bad_request(self, message: str, correlation_id: str, headers: _Headers) -> _Reply:
        payload = _error_body(correlation_id, message, "VALIDATION_ERROR")
        return self._reply(400, payload, correlation_id, "bad_request", headers)

    def _batch_write(self, doc: Any, correlation_id: str, headers: _Headers) -> _Reply:
        started = time.time()
        inputs = doc.get("inputs") if isinstance(doc, dict) else None
        if not isinstance(inputs, list):
            return self._bad_request(_MSG_INVALID_JSON, correlation_id, headers)
        if self.max_batch_inputs is not None and len(inputs) > self.max_batch_inputs:
            return self._bad_request(
                f"The maximum number of inputs supported in a batch request is {self.max_batch_inputs}",
                correlation_id,
                headers,
            )
        # HubSpot deserialises the whole body before applying anything, so one bad input fails all.
        for item in inputs:
            if not _input_is_valid(item):
                return self._bad_request(_MSG_INVALID_JSON, correlation_id, headers)

        results: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        definitions = self._definitions
        gdpr = self.gdpr
        with self._lock:
            stamp = _iso(time.time())
            statuses = self._statuses
            for item in inputs:
                email = item["subscriberIdString"]
                sid = item["subscriptionId"]
                definition = definitions.get(sid)
                if definition is None:
                    message = f"Subscription {sid} does not exist for subscriber {email}"
                    errors.append(_item_error("OBJECT_NOT_FOUND", message, email, sid))
                    continue
                legal_basis = item.get("legalBasis")
                explanation = item.get("legalBasisExplanation")
                if gdpr and (not legal_basis or not explanation):
                    message = (
                        f"Legal basis and legal basis explanation are required for subscriber {email} and "
                        f"subscription {sid} because data privacy settings are turned on for this account"
                    )
                    errors.append(_item_error("VALIDATION_ERROR", message, email, sid))
                    continue
                key = (email.lower(), sid, "EMAIL")
                previous = statuses.get(key)
                old = previous["status"] if previous is not None else "NOT_SPECIFIED"
                new = item["statusState"]
                if old == new:
                    reason = "NO_STATUS_CHANGE"
                elif old == "UNSUBSCRIBED" and new == "SUBSCRIBED":
                    reason = "RESUBSCRIBE_OCCURRED"
                else:
                    reason = "REQUESTED_CHANGE_OCCURRED"
                record = _status_record(
                    key[0],
                    sid,
                    definition,
                    new,
                    _SOURCE,
                    # An unchanged status keeps the time it was last really set.
                    previous["timestamp"] if previous is not None and old == new else stamp,
                    legal_basis,
                    explanation,
                )
                statuses[key] = record
                result = dict(record)
                result["setStatusSuccessReason"] = reason
                results.append(result)
            self._writes_applied += len(results)

        payload = _envelope(started, results, errors)
        status = 207 if errors and self.multi_status else 200
        return self._reply(status, payload, correlation_id, "ok", headers)

    def _email_batch(
        self, doc: Any, query: str, correlation_id: str, headers: _Headers
    ) -> tuple[list[Any], dict[str, list[str]]] | _Reply:
        """Check the ``channel`` query parameter and a BatchInputString body.

        Returns ``(inputs, query parameters)``, or the 400 that rejects the whole request.
        """
        params = parse_qs(query) if query else {}
        channel = params.get("channel")
        if channel is None:
            return self._bad_request("Missing required query parameter: channel", correlation_id, headers)
        if channel[-1] not in _CHANNELS:
            return self._bad_request("Invalid channel: only EMAIL is supported", correlation_id, headers)
        inputs = doc.get("inputs") if isinstance(doc, dict) else None
        if not isinstance(inputs, list):
            return self._bad_request(
                "Invalid input JSON : the request body does not match BatchInputString",
                correlation_id,
                headers,
            )
        if self.max_batch_inputs is not None and len(inputs) > self.max_batch_inputs:
            return self._bad_request(
                f"The maximum number of inputs supported in a batch request is {self.max_batch_inputs}",
                correlation_id,
                headers,
            )
        return inputs, params

    def _batch_read(self, doc: Any, query: str, correlation_id: str, headers: _Headers) -> _Reply:
        started = time.time()
        checked = self._email_batch(doc, query, correlation_id, headers)
        if isinstance(checked, _Reply):
            return checked
        inputs, _params = checked
        results: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        with self._lock:
            for lowered in _contacts(inputs, errors):
                statuses = [
                    dict(record)
                    for sid in self._definitions
                    if (record := self._statuses.get((lowered, sid, "EMAIL"))) is not None
                ]
                results.append({"subscriberIdString": lowered, "statuses": statuses})
        payload = _envelope(started, results, errors)
        return self._reply(207 if errors else 200, payload, correlation_id, "ok", headers)

    def _unsubscribe_all_locked(self, email: str, source: str, stamp: str) -> list[dict[str, Any]]:
        """Opt ``email`` (lower-cased) out of all email; the caller holds the lock.

        Records the portal-wide status (an existing one keeps its timestamp) and sets every defined
        subscription to ``UNSUBSCRIBED`` with ``source`` and ``stamp``; a subscription already
        ``UNSUBSCRIBED`` keeps its record, timestamp and source included. Returns the email's
        PublicStatus records, in definition order, each with ``setStatusSuccessReason``.
        """
        self._wide_statuses.setdefault((email, "EMAIL"), _wide_status_record(email, stamp))
        statuses = self._statuses
        results: list[dict[str, Any]] = []
        for sid, definition in self._definitions.items():
            key = (email, sid, "EMAIL")
            previous = statuses.get(key)
            if previous is not None and previous["status"] == "UNSUBSCRIBED":
                result = dict(previous)
                result["setStatusSuccessReason"] = "NO_STATUS_CHANGE"
            else:
                record = _status_record(email, sid, definition, "UNSUBSCRIBED", source, stamp)
                statuses[key] = record
                result = dict(record)
                result["setStatusSuccessReason"] = "UNSUBSCRIBE_FROM_ALL_OCCURRED"
            results.append(result)
        return results

    def _batch_unsubscribe_all(self, doc: Any, query: str, correlation_id: str, headers: _Headers) -> _Reply:
        """``statuses/batch/unsubscribe-all``: opt every valid email out of all email.

        Malformed emails become per-input errors and the others are applied. Each result carries the
        email's PublicStatus records only with ``verbose=true``, as HubSpot documents for the
        single-contact endpoint; otherwise ``statuses`` is empty.
        """
        started = time.time()
        checked = self._email_batch(doc, query, correlation_id, headers)
        if isinstance(checked, _Reply):
            return checked
        inputs, params = checked
        verbose = (params.get("verbose") or ["false"])[-1].lower() == "true"
        results: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        with self._lock:
            stamp = _iso(time.time())
            for lowered in _contacts(inputs, errors):
                statuses = self._unsubscribe_all_locked(lowered, _SOURCE, stamp)
                results.append({"subscriberIdString": lowered, "statuses": statuses if verbose else []})
            self._writes_applied += len(results)
        payload = _envelope(started, results, errors)
        status = 207 if errors and self.multi_status else 200
        return self._reply(status, payload, correlation_id, "ok", headers)

    def _batch_unsubscribe_all_read(
        self, doc: Any, query: str, correlation_id: str, headers: _Headers
    ) -> _Reply:
        """``statuses/batch/unsubscribe-all/read``: each valid email's wide statuses (maybe none)."""
        started = time.time()
        checked = self._email_batch(doc, query, correlation_id, headers)
        if isinstance(checked, _Reply):
            return checked
        inputs, _params = checked
        results: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        with self._lock:
            for lowered in _contacts(inputs, errors):
                wide = self._wide_statuses.get((lowered, "EMAIL"))
                results.append({"subscriberIdString": lowered, "wideStatuses": [dict(wide)] if wide else []})
        payload = _envelope(started, results, errors)
        return self._reply(207 if errors else 200, payload, correlation_id, "ok", headers)

    def _definitions_reply(self, query: str, correlation_id: str, headers: _Headers) -> _Reply:
        started = time.time()
        params = parse_qs(query) if query else {}
        translations = (params.get("includeTranslations") or ["false"])[-1].lower() == "true"
        results = []
        for definition in self._definitions.values():
            item = dict(definition)
            if translations:
                item.setdefault("subscriptionTranslations", [])
            results.append(item)
        payload = _envelope(started, results)
        return self._reply(200, payload, correlation_id, "ok", headers)

    def _serve_token(self, body: bytes, correlation_id: str) -> _Reply:
        form = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)

        def field(name: str) -> str:
            return (form.get(name) or [""])[-1]

        if field("grant_type") != "refresh_token":
            payload = {
                "status": "BAD_GRANT_TYPE",
                "message": "grant_type must be refresh_token",
                "error": "unsupported_grant_type",
                "error_description": "grant_type must be refresh_token",
                "correlationId": correlation_id,
            }
            return self._reply(400, payload, correlation_id, "bad_request", self._current_limit_headers())
        if (
            field("client_id") != self.oauth_client_id
            or field("client_secret") != self.oauth_client_secret
            or field("refresh_token") != self.oauth_refresh_token
        ):
            payload = {
                "status": "BAD_REFRESH_TOKEN",
                "message": "missing or unknown refresh token",
                "error": "invalid_grant",
                "error_description": "missing or unknown refresh token",
                "correlationId": correlation_id,
            }
            return self._reply(400, payload, correlation_id, "bad_request", self._current_limit_headers())
        access_token = "emu-oauth-" + uuid.uuid4().hex
        expires_in = self.oauth_expires_in
        with self._lock:
            self._oauth_tokens[access_token] = (frozenset(self.scopes), time.monotonic() + expires_in)
            self._token_requests += 1
            headers = self._limit_headers(static=False)
        payload = {
            "access_token": access_token,
            "refresh_token": self.oauth_refresh_token,
            "expires_in": int(expires_in) if float(expires_in).is_integer() else expires_in,
            "token_type": "bearer",
        }
        return self._reply(200, payload, correlation_id, "ok", headers)


def _input_is_valid(item: Any) -> bool:
    if type(item) is not dict:
        return False
    value = item.get("channel")
    if type(value) is not str or value not in _CHANNELS:
        return False
    value = item.get("statusState")
    if type(value) is not str or value not in _STATUS_STATES:
        return False
    value = item.get("subscriptionId")
    if type(value) is not int or not _INT64_MIN <= value <= _INT64_MAX:
        return False
    if not is_valid_email(item.get("subscriberIdString")):
        return False
    value = item.get("legalBasis")
    if value is not None and (type(value) is not str or value not in _LEGAL_BASES):
        return False
    value = item.get("legalBasisExplanation")
    return value is None or type(value) is str


def _item_error(category: str, message: str, email: str, subscription_id: int) -> dict[str, Any]:
    return {
        "status": "error",
        "category": category,
        "message": message,
        "context": {"subscriberIdString": [email], "subscriptionId": [str(subscription_id)]},
        "errors": [],
        "links": {},
    }


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer that remembers its connections so that stop() can close them all."""

    daemon_threads = True
    # Benchmarks open many keep-alive connections at once; the default backlog of 5 makes the
    # kernel drop SYNs, which clients see as one-second stalls.
    request_queue_size = 128

    def __init__(
        self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], emulator: HubSpotEmulator
    ) -> None:
        self.emulator = emulator
        self._connections: dict[threading.Thread, socket.socket] = {}
        self._connections_lock = threading.Lock()
        super().__init__(address, handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name with getfqdn(), a reverse DNS lookup that
        # can stall for seconds on machines without working DNS; loopback needs no name.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self._serve_connection,
            args=(request, client_address),
            name="hubspot-emulator-conn",
            daemon=True,
        )
        with self._connections_lock:
            self._connections[thread] = request
        thread.start()

    def _serve_connection(self, request: Any, client_address: Any) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            with self._connections_lock:
                self._connections.pop(threading.current_thread(), None)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that hang up mid-response are routine under fault injection; stay quiet.
        pass

    def close_connections(self, timeout: float) -> None:
        with self._connections_lock:
            connections = list(self._connections.items())
        for _thread, sock in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for thread, _sock in connections:
            thread.join(max(0.0, deadline - time.monotonic()))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "HubSpotEmulator/1.0"
    # Idle keep-alive connections are closed after this long, like a real load balancer does.
    timeout = 120
    server: _Server

    def setup(self) -> None:
        super().setup()
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature is inherited
        # Request lines may carry subscriber emails; the emulator never logs them.
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._handle("PUT")

    def do_PATCH(self) -> None:  # noqa: N802
        self._handle("PATCH")

    def do_DELETE(self) -> None:  # noqa: N802
        self._handle("DELETE")

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size_line = self.rfile.readline(1024)
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline(1024)
        length = int(self.headers.get("Content-Length") or 0)
        if length < 0:
            raise ValueError("negative Content-Length")
        return self.rfile.read(length) if length else b""

    def _handle(self, method: str) -> None:
        emulator = self.server.emulator
        at = time.monotonic()
        try:
            body = self._read_body()
        except ValueError:
            self.close_connection = True
            correlation_id = str(uuid.uuid4())
            payload = _error_body(correlation_id, "Malformed request body framing", "VALIDATION_ERROR")
            reply = emulator._reply(400, payload, correlation_id, "bad_request", [])
        else:
            try:
                reply = emulator._serve(method, self.path, self.headers, body)
            except Exception:  # noqa: BLE001 - an emulator bug must surface as a 500, not a hang
                correlation_id = str(uuid.uuid4())
                payload = _error_body(correlation_id, "internal error", "INTERNAL_ERROR")
                reply = emulator._reply(500, payload, correlation_id, "fault", [])
        emulator._record(method, self.path, reply, at)
        if reply.delay:
            emulator._stopping.wait(reply.delay)
        if reply.drop:
            self.close_connection = True
            return
        lines = [
            f"HTTP/1.1 {reply.status} {HTTPStatus(reply.status).phrase}",
            "Content-Type: application/json;charset=utf-8",
            f"Content-Length: {len(reply.body)}",
        ]
        lines.extend(f"{name}: {value}" for name, value in reply.headers)
        if self.close_connection:
            lines.append("Connection: close")
        try:
            self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + reply.body)
        except OSError:
            self.close_connection = True


# ---------------------------------------------------------------------- command line


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m hubspot_provider.testing.emulator",
        description="Serve an emulated HubSpot Communication Preferences API on 127.0.0.1 until interrupted. "
        "At start it prints its URL, the bearer token it accepts and a ready AIRFLOW_CONN_HUBSPOT_DEFAULT "
        "line for Airflow.",
    )
    parser.add_argument("--port", type=int, default=0, help="TCP port (default: any free port)")
    # A local stand-in, not a HubSpot credential: shown here and printed at start so that clients can use it.
    parser.add_argument(
        "--token", default=DEFAULT_TOKEN, help=f"the bearer token it accepts (default: {DEFAULT_TOKEN})"
    )
    parser.add_argument("--rate-limit-max", type=int, default=100, help="requests per rolling interval")
    parser.add_argument("--rate-limit-interval-ms", type=int, default=10_000, help="rolling interval length")
    parser.add_argument("--daily-limit", type=int, default=None, help="requests per day (default: unlimited)")
    parser.add_argument("--daily-reset-s", type=float, default=None, help="seconds after which a 'day' ends")
    parser.add_argument("--fault-rate-5xx", type=float, default=0.0, help="probability of a random 5xx")
    parser.add_argument(
        "--fault-rate-drop-after-write",
        type=float,
        default=0.0,
        help="probability of applying a write and then dropping the connection",
    )
    parser.add_argument("--latency-s", type=float, default=0.0, help="seconds added to every request")
    parser.add_argument("--seed", type=int, default=0, help="seed for random faults")
    parser.add_argument("--gdpr", action="store_true", help="require legal basis and explanation")
    parser.add_argument("--max-batch-inputs", type=int, default=None, help="reject larger batches with a 400")
    parser.add_argument(
        "--multi-status",
        action="store_true",
        help="answer 207 to batch writes and unsubscribe-alls with errors",
    )
    return parser.parse_args(argv)


def startup_notes(emulator: HubSpotEmulator) -> str:
    """What the CLI prints after its first line: the token it accepts and ready Airflow connections."""
    return "\n".join([
        f"  accepts the bearer token {emulator.token}",
        "  Airflow connection, as an environment variable:",
        f"    export AIRFLOW_CONN_HUBSPOT_DEFAULT={shlex.quote(emulator.airflow_connection())}",
        "  or stored in Airflow's metadata database:",
        "    airflow connections add hubspot_default --conn-type hubspot "
        f"--conn-host {shlex.quote(emulator.url)} --conn-password {shlex.quote(emulator.token)}",
        "  Stop it with Ctrl+C.",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    """Run the emulator until SIGINT or SIGTERM; returns the process exit code."""
    args = _parse_args(argv)
    stop = threading.Event()

    def _on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    emulator = HubSpotEmulator(
        token=args.token,
        rate_limit_max=args.rate_limit_max,
        rate_limit_interval_ms=args.rate_limit_interval_ms,
        daily_limit=args.daily_limit,
        daily_reset_s=args.daily_reset_s,
        fault_rate_5xx=args.fault_rate_5xx,
        fault_rate_drop_after_write=args.fault_rate_drop_after_write,
        latency_s=args.latency_s,
        seed=args.seed,
        gdpr=args.gdpr,
        max_batch_inputs=args.max_batch_inputs,
        multi_status=args.multi_status,
        port=args.port,
    )
    emulator.start()
    try:
        print(f"HubSpot emulator listening on {emulator.url}", flush=True)
        print(startup_notes(emulator), flush=True)
        # A timed wait keeps the main thread responsive to signals on every platform.
        while not stop.wait(0.5):
            pass
    finally:
        emulator.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
