"""HubSpotHook: writes email subscription statuses to HubSpot, correctly, under rate limits and faults.

The hook owns everything about talking to HubSpot: the connection, auth (static token or OAuth
refresh), one pooled session, pacing from HubSpot's rate-limit headers, retries, batching, and the
per-input outcome of every write. See :meth:`HubSpotHook.write_statuses`.
"""

from __future__ import annotations

import ipaddress
import json
import random
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from functools import cached_property
from typing import Any
from urllib.parse import urlparse
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import requests
import tenacity
from pydantic import BaseModel, Field, ValidationError
from requests.auth import AuthBase

from airflow.providers.http.hooks.http import HttpHook
from hubspot_provider.exceptions import (
    HubSpotAuthError,
    HubSpotConfigError,
    HubSpotDailyLimitError,
    HubSpotError,
    HubSpotRateLimitError,
    HubSpotRequestError,
    HubSpotScopeError,
    HubSpotUnavailableError,
)
from hubspot_provider.models import (
    ActionResponseWithResultsSubscriptionDefinition,
    BatchResponsePublicStatus,
    BatchResponsePublicStatusBulkResponse,
    ErrorBody,
    PublicStatusRequest,
    RateLimitBody,
    StandardError,
    StatusKey,
    SubscriptionDefinition,
    describe_validation_error,
)

DEFAULT_HOST = "api.hubapi.com"
API_VERSIONS = ("v4", "2026-03")
DEFAULT_BATCH_SIZE = 100
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_MAX_RETRIES = 8
DEFAULT_RETRY_BUDGET_S = 300.0
DEFAULT_MAX_WAIT_S = 120.0
DEFAULT_MAX_CONCURRENCY = 4
OAUTH_TOKEN_PATH = "/oauth/v1/token"
WRITE_SCOPE = "communication_preferences.statuses.batch.write"

# Categories the hook assigns itself (HubSpot's own categories pass through unchanged).
INVALID_INPUT = "INVALID_INPUT"
UNMAPPED_ERROR = "UNMAPPED_ERROR"
NO_RESULT = "NO_RESULT"
_RETRYABLE_CATEGORIES = {"RATE_LIMITS", NO_RESULT, UNMAPPED_ERROR}

_SECRET_EXTRAS = {"client_secret", "refresh_token"}
_TRANSIENT_STATUS = {423, 477, 500, 502, 503, 504, 520, 521, 522, 523, 524}


def _loopback(hostname: str | None) -> bool:
    if not hostname:
        return False
    if hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


class FailedInput(BaseModel):
    """One input that did not land, with why.

    :param index: position of the input in the iterable given to ``write_statuses``.
    :param input: the input, camelCase as sent to HubSpot (or as given, when it failed validation).
    :param category: HubSpot's error category (``VALIDATION_ERROR``, ``OBJECT_NOT_FOUND``, …) or the
        hook's own: ``INVALID_INPUT`` (rejected before sending), ``NO_RESULT``, ``UNMAPPED_ERROR``.
    :param retryable: whether re-sending the same input later may succeed.
    """

    index: int | None = None
    input: dict[str, Any]
    category: str
    message: str
    retryable: bool = False
    correlation_id: str | None = None


class WriteReport(BaseModel):
    """What happened to every input of one :meth:`HubSpotHook.write_statuses` call.

    ``succeeded + superseded + failed_count == submitted`` always holds; ``failed`` lists the failed
    inputs (unless the call was made with ``keep_failed=False``). ``reasons`` counts HubSpot's
    ``setStatusSuccessReason`` over the successes (``NO_STATUS_CHANGE`` = already in that state).
    """

    submitted: int = 0
    succeeded: int = 0
    superseded: int = 0
    failed_count: int = 0
    failed: list[FailedInput] = Field(default_factory=list)
    reasons: dict[str, int] = Field(default_factory=dict)
    failed_by_category: dict[str, int] = Field(default_factory=dict)
    batches: int = 0
    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    elapsed_s: float = 0.0

    @property
    def changed(self) -> int:
        """Successes that changed a status in HubSpot (everything but ``NO_STATUS_CHANGE``)."""
        return self.succeeded - self.reasons.get("NO_STATUS_CHANGE", 0)

    def summary(self) -> str:
        """One log line of counts (no personal data)."""
        return (
            f"{self.submitted} submitted: {self.succeeded} succeeded ({self.changed} changed), "
            f"{self.superseded} superseded, {self.failed_count} failed {self.failed_by_category or ''}; "
            f"{self.requests} requests, {self.retries} retries, {self.rate_limited} rate-limited, "
            f"{self.elapsed_s:.2f}s"
        ).replace(" {}", "")


class _Secret:
    """Holds a credential so that no repr, log line or traceback local shows it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<secret>"

    __str__ = __repr__


class _Transient(Exception):
    """A failure worth retrying: 429 TEN_SECONDLY_ROLLING, 5xx, timeout, dropped connection."""

    def __init__(self, reason: str, *, wait_s: float | None = None, correlation_id: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.wait_s = wait_s
        self.correlation_id = correlation_id


class _RateLimitPacer:
    """Keeps request starts under HubSpot's rolling limit, learned from its response headers.

    HubSpot counts requests per app in a rolling window (``X-HubSpot-RateLimit-Max`` requests per
    ``-Interval-Milliseconds``). The pacer remembers when each of its own requests finished (a
    request reaches HubSpot no later than its answer, so a slot counted from the answer is never
    freed early), counts requests still in flight, and subtracts what ``-Remaining`` says others
    used. A start waits until the window has room, so a long run stays just under the limit
    instead of bouncing off 429s. Thread-safe.
    """

    def __init__(self, max_requests: int = 100, interval_s: float = 10.0, reserve: int = 1) -> None:
        self.max_requests = max_requests
        self.interval_s = interval_s
        self.reserve = reserve
        self._done: deque[float] = deque()
        self._in_flight = 0
        self._others = 0
        self._blocked_until = 0.0
        self._consecutive_429 = 0
        self._cond = threading.Condition()

    def _budget(self) -> int:
        return max(1, self.max_requests - self.reserve - self._others)

    def acquire(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                if now < self._blocked_until:
                    self._cond.wait(self._blocked_until - now)
                    continue
                horizon = now - self.interval_s
                while self._done and self._done[0] <= horizon:
                    self._done.popleft()
                if len(self._done) + self._in_flight < self._budget():
                    self._in_flight += 1
                    return
                # Woken early when an in-flight request finishes or the window is re-learned.
                timeout = (self._done[0] - horizon) if self._done else None
                self._cond.wait(timeout)

    def release(self, headers: Mapping[str, str] | None, *, rate_limited: bool = False) -> None:
        with self._cond:
            self._in_flight -= 1
            if not rate_limited:
                self._consecutive_429 = 0
            now = time.monotonic()
            self._done.append(now)
            if headers:
                self._learn(headers, now)
            self._cond.notify_all()

    def _learn(self, headers: Mapping[str, str], now: float) -> None:
        try:
            maximum = int(headers["X-HubSpot-RateLimit-Max"])
            interval_ms = int(headers["X-HubSpot-RateLimit-Interval-Milliseconds"])
            remaining = int(headers["X-HubSpot-RateLimit-Remaining"])
        except (KeyError, ValueError, TypeError):
            return
        if maximum <= 0 or interval_ms <= 0:
            return
        self.max_requests = maximum
        self.interval_s = interval_ms / 1000
        horizon = now - self.interval_s
        ours = sum(1 for t in self._done if t > horizon) + self._in_flight
        self._others = max(0, (maximum - remaining) - ours)

    def block_for(self, seconds: float) -> None:
        """Hold every start for ``seconds`` (after a 429, the window is fuller than we knew)."""
        with self._cond:
            self._blocked_until = max(self._blocked_until, time.monotonic() + seconds)

    def wait_after_429(self) -> float:
        """How long to hold off after a 429 that came without ``Retry-After``.

        A 429 while our own window is far from full means other clients of the app filled it, and
        when their requests leave the window is unknown: start at 1/20 of the window and double on
        each consecutive 429, up to the whole window. Rejected requests do not use up the budget,
        so a short first wait costs little.
        """
        with self._cond:
            self._consecutive_429 += 1
            return min(self.interval_s, self.interval_s / 20 * 2 ** (self._consecutive_429 - 1))


@dataclass
class _ConnectionSettings:
    host: str | None
    schema: str | None
    port: int | None
    password: _Secret | None
    extra: dict[str, Any]


@dataclass
class _Stats:
    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)


@dataclass
class _Item:
    index: int
    key: StatusKey
    wire: dict[str, Any]


@dataclass
class _BatchResult:
    succeeded: list[tuple[int, str | None]] = field(default_factory=list)
    failed: list[FailedInput] = field(default_factory=list)

    def extend(self, other: _BatchResult) -> _BatchResult:
        self.succeeded.extend(other.succeeded)
        self.failed.extend(other.failed)
        return self


class _BearerAuth(AuthBase):
    """Adds the current access token to each request, so plain ``HttpHook.run`` works too."""

    def __init__(self, hook: HubSpotHook) -> None:
        self._hook = hook

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._hook._access_token()}"
        return request

    def __repr__(self) -> str:
        return "<BearerAuth>"


def _no_auth(request: requests.PreparedRequest) -> requests.PreparedRequest:
    return request


def _as_dict(value: Any) -> dict[str, Any]:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", by_alias=True, exclude_none=True)
    if isinstance(value, Mapping):
        # Keep the input as given (nested values included) for the dead letter, JSON-safe.
        return json.loads(json.dumps({str(k): v for k, v in value.items()}, default=str))
    return {"value": repr(value)[:200]}


class HubSpotHook(HttpHook):
    """Interact with HubSpot's Communication Preferences API (subscription statuses).

    The connection (type ``hubspot``) holds the access token of a private app or service key in
    *password*, or OAuth ``client_id``/``client_secret``/``refresh_token`` in *extra*. *host*
    defaults to ``https://api.hubapi.com``; a scheme in the host, the *schema* field and the *port*
    are honoured, so the hook can point at the emulator (``hubspot_provider.testing``). Extras
    ``api_version`` (``v4`` or ``2026-03``), ``batch_size``, ``timeout``, ``max_retries`` and
    ``portal_timezone`` set defaults that arguments override.

    .. code-block:: python

        hook = HubSpotHook(hubspot_conn_id="hubspot_default")
        report = hook.write_statuses(
            [{"subscriberIdString": "ada@example.com", "subscriptionId": 1001, "statusState": "SUBSCRIBED"}]
        )
        print(report.summary())

    :param hubspot_conn_id: Airflow connection id of type ``hubspot``.
    :param api_version: ``v4`` or ``2026-03``; overrides the connection's ``api_version``.
    :param batch_size: default inputs per request for :meth:`write_statuses` (1..1000).
    :param timeout: read timeout per request, seconds.
    :param max_retries: retries per request for transient failures (429 rolling, 5xx, timeouts,
        dropped connections).
    :param retry_budget_s: give up retrying one request after this many seconds.
    :param max_wait_s: longest wait HubSpot may ask for (``Retry-After``) that the hook sleeps
        through; a longer one raises :class:`HubSpotRateLimitError` so an operator can defer.
    :param max_concurrency: batches in flight at once (requests to HubSpot run in parallel threads;
        pacing keeps the total under the rate limit).
    :param require_legal_basis: reject inputs lacking ``legalBasis`` and ``legalBasisExplanation``
        (for GDPR-enabled portals) before sending them.
    """

    conn_name_attr = "hubspot_conn_id"
    default_conn_name = "hubspot_default"
    conn_type = "hubspot"
    hook_name = "HubSpot"
    default_host = DEFAULT_HOST

    def __init__(
        self,
        hubspot_conn_id: str = default_conn_name,
        *,
        api_version: str | None = None,
        batch_size: int | None = None,
        timeout: float | None = None,
        max_retries: int | None = None,
        retry_budget_s: float | None = None,
        max_wait_s: float | None = None,
        max_concurrency: int | None = None,
        require_legal_basis: bool = False,
        **kwargs: Any,
    ) -> None:
        # Accept what Connection.get_hook / HttpOperator pass (method, auth_type, tcp_keep_alive…).
        kwargs.pop("method", None)
        kwargs.pop("http_conn_id", None)
        super().__init__(method="POST", http_conn_id=hubspot_conn_id, **kwargs)
        self.hubspot_conn_id = hubspot_conn_id
        self._api_version_arg = api_version
        self._batch_size_arg = batch_size
        self._timeout_arg = timeout
        self._max_retries_arg = max_retries
        self.retry_budget_s = DEFAULT_RETRY_BUDGET_S if retry_budget_s is None else retry_budget_s
        self.max_wait_s = DEFAULT_MAX_WAIT_S if max_wait_s is None else max_wait_s
        self.max_concurrency = max(1, max_concurrency or DEFAULT_MAX_CONCURRENCY)
        self.require_legal_basis = require_legal_basis
        self._session: requests.Session | None = None
        self._session_lock = threading.Lock()
        self._token_lock = threading.Lock()
        self._oauth_token: _Secret | None = None
        self._oauth_expires_at = 0.0
        self.pacer = _RateLimitPacer()

    def __repr__(self) -> str:
        return f"<HubSpotHook conn_id={self.hubspot_conn_id!r}>"

    # ------------------------------------------------------------------ connection and settings

    @cached_property
    def _conn(self) -> _ConnectionSettings:
        # Keep only what the hook needs: Airflow's Connection repr shows the password.
        conn = self.get_connection(self.hubspot_conn_id)
        return _ConnectionSettings(
            host=conn.host,
            schema=conn.schema,
            port=conn.port,
            password=_Secret(conn.password) if conn.password else None,
            extra={
                key: _Secret(str(value)) if key.removeprefix("extra__hubspot__") in _SECRET_EXTRAS else value
                for key, value in (conn.extra_dejson or {}).items()
            },
        )

    def _extra(self, name: str, default: Any = None) -> Any:
        for key in (name, f"extra__hubspot__{name}"):
            value = self._conn.extra.get(key)
            if value not in (None, ""):
                return value
        return default

    def _number(self, name: str, arg: Any, default: float, cast: type = float) -> Any:
        raw = arg if arg is not None else self._extra(name, default)
        try:
            return cast(raw)
        except (TypeError, ValueError):
            raise HubSpotConfigError(
                f"Connection {self.hubspot_conn_id!r}: extra {name!r} must be a number, got {raw!r}"
            ) from None

    @cached_property
    def api_version(self) -> str:
        """``v4`` or ``2026-03``: selects the base path of every request."""
        version = str(self._api_version_arg or self._extra("api_version", "v4"))
        if version not in API_VERSIONS:
            raise HubSpotConfigError(
                f"Connection {self.hubspot_conn_id!r}: api_version {version!r} is not supported; "
                f"use one of {', '.join(API_VERSIONS)}"
            )
        return version

    @cached_property
    def batch_size(self) -> int:
        size = self._number("batch_size", self._batch_size_arg, DEFAULT_BATCH_SIZE, int)
        if not 1 <= size <= 1000:
            raise HubSpotConfigError(f"batch_size must be between 1 and 1000, got {size}")
        return size

    @cached_property
    def timeout(self) -> tuple[float, float]:
        read = self._number("timeout", self._timeout_arg, DEFAULT_TIMEOUT_S)
        return (min(DEFAULT_CONNECT_TIMEOUT_S, read), read)

    @cached_property
    def max_retries(self) -> int:
        return max(0, self._number("max_retries", self._max_retries_arg, DEFAULT_MAX_RETRIES, int))

    @cached_property
    def portal_timezone(self) -> ZoneInfo:
        name = str(self._extra("portal_timezone", "UTC"))
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            raise HubSpotConfigError(
                f"Connection {self.hubspot_conn_id!r}: portal_timezone {name!r} is not an IANA time zone "
                "(e.g. Europe/Berlin)"
            ) from None

    @cached_property
    def _oauth(self) -> tuple[str, _Secret, _Secret] | None:
        client_id = self._extra("client_id")
        secret = self._extra("client_secret")
        refresh = self._extra("refresh_token")
        if client_id and isinstance(secret, _Secret) and isinstance(refresh, _Secret):
            self._mask(secret.get(), refresh.get())
            return str(client_id), secret, refresh
        return None

    @cached_property
    def _static_token(self) -> _Secret | None:
        if self._conn.password is not None:
            self._mask(self._conn.password.get())
        return self._conn.password

    @staticmethod
    def _mask(*secrets: str) -> None:
        try:
            from airflow.sdk.log import mask_secret
        except ImportError:  # pragma: no cover - older task SDKs
            return
        for secret in secrets:
            mask_secret(secret)

    def _set_base_url(self, connection: Any) -> None:
        host = (connection.host or DEFAULT_HOST).strip().rstrip("/")
        base = host if "://" in host else f"{connection.schema or 'https'}://{host}"
        if connection.port:
            base = f"{base}:{connection.port}"
        parsed = urlparse(base)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise HubSpotConfigError(
                f"Connection {self.hubspot_conn_id!r}: cannot build a base URL from host {connection.host!r}; "
                "use e.g. https://api.hubapi.com"
            )
        if parsed.scheme == "http" and not _loopback(parsed.hostname):
            raise HubSpotConfigError(
                f"Connection {self.hubspot_conn_id!r}: refusing to send the access token over plain http to "
                f"{parsed.hostname}; use https:// (plain http is allowed only to loopback, e.g. an emulator)"
            )
        self.base_url = base
        self._srv_lookup_enabled = False
        self._base_url_initialized = True

    @property
    def api_base_path(self) -> str:
        """``/communication-preferences/<api_version>``."""
        return f"/communication-preferences/{self.api_version}"

    def get_conn(self, headers: dict[Any, Any] | None = None, extra_options: dict[str, Any] | None = None):
        """Return the hook's one pooled :class:`requests.Session`, authenticated with a bearer token.

        Unlike ``HttpHook.get_conn`` the session is created once and reused, and connection extras
        are settings, never turned into HTTP headers (they may hold OAuth secrets).
        """
        with self._session_lock:
            if self._session is None:
                self._set_base_url(self._conn)
                if self._static_token is None and self._oauth is None:
                    raise HubSpotConfigError(
                        f"Connection {self.hubspot_conn_id!r} has no access token: put the private app / "
                        "service key token in the password, or client_id, client_secret and refresh_token "
                        "in extra"
                    )
                session = requests.Session()
                session.auth = _BearerAuth(self)
                session.headers.update({"Accept": "application/json", "User-Agent": "hubspot-provider"})
                adapter = self.adapter or self.keep_alive_adapter
                if adapter is not None:
                    session.mount("http://", adapter)
                    session.mount("https://", adapter)
                self._session = session
        if headers:
            self._session.headers.update(headers)
        return self._session

    def close(self) -> None:
        """Close the pooled session (connections are also released when the hook is garbage-collected)."""
        with self._session_lock:
            if self._session is not None:
                self._session.close()
                self._session = None

    # ------------------------------------------------------------------ auth

    def _access_token(self, *, force_refresh: bool = False) -> str:
        if self._oauth is None:
            if self._static_token is None:
                raise HubSpotConfigError(f"Connection {self.hubspot_conn_id!r} has no access token")
            return self._static_token.get()
        with self._token_lock:
            if force_refresh or self._oauth_token is None or time.monotonic() >= self._oauth_expires_at:
                self._refresh_oauth_token()
            assert self._oauth_token is not None
            return self._oauth_token.get()

    def _refresh_oauth_token(self) -> None:
        assert self._oauth is not None
        client_id, secret, refresh = self._oauth
        path = str(self._extra("oauth_token_path", OAUTH_TOKEN_PATH))
        session = self.get_conn()
        try:
            response = session.post(
                self.base_url + path,
                data={
                    "grant_type": "refresh_token",
                    "client_id": client_id,
                    "client_secret": secret.get(),
                    "refresh_token": refresh.get(),
                },
                auth=_no_auth,
                timeout=self.timeout,
            )
        except requests.RequestException as exc:
            raise HubSpotAuthError(
                f"OAuth token refresh for connection {self.hubspot_conn_id!r} could not reach HubSpot "
                f"({type(exc).__name__}); check the host and network"
            ) from None
        if response.status_code != 200:
            body = self._json(response)
            detail = body.get("error_description") or body.get("message") or response.reason
            raise HubSpotAuthError(
                f"OAuth token refresh for connection {self.hubspot_conn_id!r} failed with HTTP "
                f"{response.status_code} ({body.get('status') or body.get('error') or 'error'}: {detail}); "
                "check client_id, client_secret and refresh_token",
                status_code=response.status_code,
                correlation_id=body.get("correlationId"),
            )
        body = self._json(response)
        token = body.get("access_token")
        if not token:
            raise HubSpotAuthError("OAuth token refresh returned no access_token")
        self._mask(token)
        expires_in = float(body.get("expires_in") or 1800)
        # Renew a little before expiry so no request goes out with a token about to lapse.
        self._oauth_token = _Secret(token)
        self._oauth_expires_at = time.monotonic() + expires_in - min(300.0, expires_in * 0.1)
        if body.get("refresh_token") and body["refresh_token"] != refresh.get():
            self._mask(body["refresh_token"])
            self._oauth = (client_id, secret, _Secret(body["refresh_token"]))
        self.log.info("Refreshed the HubSpot OAuth access token (valid %.0fs)", expires_in)

    # ------------------------------------------------------------------ one request

    @staticmethod
    def _json(response: requests.Response) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            return {}
        return body if isinstance(body, dict) else {}

    @staticmethod
    def _retry_after(response: requests.Response) -> float | None:
        value = response.headers.get("Retry-After")
        if value is None:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            return None

    def _daily_reset_at(self, response: requests.Response) -> datetime:
        now = datetime.now(timezone.utc)
        retry_after = self._retry_after(response)
        if retry_after is not None:
            return now + timedelta(seconds=retry_after)
        local = now.astimezone(self.portal_timezone)
        midnight = datetime.combine(local.date() + timedelta(days=1), datetime.min.time(), self.portal_timezone)
        return midnight.astimezone(timezone.utc)

    def _send(
        self,
        method: str,
        path: str,
        stats: _Stats,
        *,
        json_body: Any = None,
        params: dict[str, Any] | None = None,
        allow_400: bool = False,
    ) -> requests.Response:
        """One HTTP exchange, paced; classifies the answer. Raises ``_Transient`` for retryable failures."""
        session = self.get_conn()
        url = self.base_url + path
        data = json.dumps(json_body, separators=(",", ":")) if json_body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else None
        self.pacer.acquire()
        response: requests.Response | None = None
        try:
            stats.add(requests=1)
            response = session.request(method, url, data=data, params=params, headers=headers, timeout=self.timeout)
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise _Transient(f"{type(exc).__name__} talking to HubSpot") from None
        finally:
            self.pacer.release(
                response.headers if response is not None else None,
                rate_limited=response is not None and response.status_code == 429,
            )

        status = response.status_code
        correlation_id = response.headers.get("X-HubSpot-Correlation-Id")
        if status < 300 or (status == 400 and allow_400):
            return response
        if status == 429:
            body = RateLimitBody.model_validate(self._json(response))
            correlation_id = body.correlation_id or correlation_id
            stats.add(rate_limited=1)
            if (body.policy_name or "").upper() == "DAILY":
                reset_at = self._daily_reset_at(response)
                raise HubSpotDailyLimitError(
                    f"HubSpot's DAILY request limit is used up; it resets at {reset_at.isoformat()}. "
                    "Re-run (or let the operator defer) after that; writes are idempotent",
                    reset_at=reset_at,
                    status_code=429,
                    correlation_id=correlation_id,
                    category="RATE_LIMITS",
                )
            wait_s = self._retry_after(response)
            if wait_s is None:
                wait_s = self.pacer.wait_after_429()
            if wait_s > self.max_wait_s:
                reset_at = datetime.now(timezone.utc) + timedelta(seconds=wait_s)
                raise HubSpotRateLimitError(
                    f"HubSpot asked to wait {wait_s:.0f}s ({body.policy_name or 'rate limit'}), longer than "
                    f"max_wait_s={self.max_wait_s:.0f}; resume after {reset_at.isoformat()}",
                    reset_at=reset_at,
                    status_code=429,
                    correlation_id=correlation_id,
                    category="RATE_LIMITS",
                )
            self.pacer.block_for(wait_s)
            raise _Transient(f"429 {body.policy_name or 'rate limit'}", wait_s=wait_s, correlation_id=correlation_id)
        if status in _TRANSIENT_STATUS or status >= 500:
            raise _Transient(f"HTTP {status}", wait_s=self._retry_after(response), correlation_id=correlation_id)
        body = ErrorBody.model_validate(self._json(response))
        correlation_id = body.correlation_id or correlation_id
        if status == 401:
            if self._oauth is not None:
                # The token may have been revoked early; one forced refresh is cheap and safe.
                self._access_token(force_refresh=True)
                raise _Transient("401 with an OAuth token; refreshed it", wait_s=0.0, correlation_id=correlation_id)
            raise HubSpotAuthError(
                f"HubSpot rejected the access token of connection {self.hubspot_conn_id!r} (401 "
                f"{body.category or ''}). Check the token in the connection's password; private app tokens "
                "start with 'pat-'",
                status_code=401,
                correlation_id=correlation_id,
                category=body.category,
            )
        if status == 403:
            scopes = body.required_scopes()
            needed = ", ".join(scopes) if scopes else f"{WRITE_SCOPE} (and the batch read scope)"
            raise HubSpotScopeError(
                f"HubSpot refused the request (403 {body.category or 'FORBIDDEN'}): the token of connection "
                f"{self.hubspot_conn_id!r} lacks a scope. Grant: {needed}. Batch status scopes need "
                "Marketing Hub Enterprise",
                required_scopes=scopes,
                status_code=403,
                correlation_id=correlation_id,
                category=body.category,
            )
        raise HubSpotRequestError(
            f"HubSpot answered {method} {path} with HTTP {status} ({body.category or response.reason}: "
            f"{(body.message or '')[:300]}). Check the connection's host and api_version",
            status_code=status,
            correlation_id=correlation_id,
            category=body.category,
        )

    def _wait(self, retry_state: tenacity.RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        hint = getattr(exc, "wait_s", None)
        if hint is not None:
            return hint + random.uniform(0, min(1.0, hint * 0.1))
        return tenacity.wait_random_exponential(multiplier=0.5, max=30)(retry_state)

    def _with_retries(self, stats: _Stats, call: Callable[[], requests.Response]) -> requests.Response:
        """Run ``call`` under the retry policy: transient failures retried with backoff and jitter."""

        def before_sleep(retry_state: tenacity.RetryCallState) -> None:
            stats.add(retries=1)
            exc = retry_state.outcome.exception() if retry_state.outcome else None
            self.log.warning(
                "HubSpot request failed (%s); retry %d/%d in %.1fs",
                exc,
                retry_state.attempt_number,
                self.max_retries,
                retry_state.upcoming_sleep,
            )

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(_Transient),
            stop=tenacity.stop_after_attempt(self.max_retries + 1) | tenacity.stop_after_delay(self.retry_budget_s),
            wait=self._wait,
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            return retrying(call)
        except _Transient as exc:
            raise HubSpotUnavailableError(
                f"HubSpot stayed unavailable after {self.max_retries} retries ({exc.reason}); "
                "nothing after the last acknowledged batch was applied for sure. Re-run later; writes are "
                "idempotent",
                correlation_id=exc.correlation_id,
            ) from None

    # ------------------------------------------------------------------ simple endpoints

    def batch_write_statuses(self, inputs: Iterable[Mapping[str, Any] | PublicStatusRequest]) -> BatchResponsePublicStatus:
        """Send one ``statuses/batch/write`` request with ``inputs`` (validated first) and return the response.

        Retries transient failures. Raises :class:`ValueError` naming the bad input when one fails
        validation, :class:`HubSpotRequestError` when HubSpot rejects the whole batch (400). For
        batching, isolation of bad inputs and per-input outcomes use :meth:`write_statuses`.
        """
        wires = []
        for position, value in enumerate(inputs):
            try:
                wires.append(self._validate(value).to_wire())
            except ValidationError as exc:
                raise ValueError(f"input {position} is invalid: {describe_validation_error(exc)}") from None
        stats = _Stats()
        response = self._with_retries(
            stats,
            lambda: self._send("POST", f"{self.api_base_path}/statuses/batch/write", stats, json_body={"inputs": wires}),
        )
        return BatchResponsePublicStatus.model_validate_json(response.content)

    def batch_read_statuses(
        self, emails: Iterable[str], channel: str = "EMAIL", *, business_unit_id: int | None = None
    ) -> BatchResponsePublicStatusBulkResponse:
        """Read the subscription statuses of up to ``batch_size`` contacts (one request, retried).

        .. code-block:: python

            for contact in hook.batch_read_statuses(["ada@example.com"]).results:
                print(contact.subscriber_id_string, [(s.subscription_id, s.status) for s in contact.statuses])
        """
        params: dict[str, Any] = {"channel": channel}
        if business_unit_id is not None:
            params["businessUnitId"] = business_unit_id
        body = {"inputs": list(emails)}
        stats = _Stats()
        response = self._with_retries(
            stats,
            lambda: self._send("POST", f"{self.api_base_path}/statuses/batch/read", stats, json_body=body, params=params),
        )
        return BatchResponsePublicStatusBulkResponse.model_validate_json(response.content)

    def get_subscription_definitions(self, *, business_unit_id: int | None = None) -> list[SubscriptionDefinition]:
        """Return the portal's subscription types (the ids ``subscriptionId`` refers to)."""
        params = {"businessUnitId": business_unit_id} if business_unit_id is not None else None
        stats = _Stats()
        response = self._with_retries(
            stats, lambda: self._send("GET", f"{self.api_base_path}/definitions", stats, params=params)
        )
        return ActionResponseWithResultsSubscriptionDefinition.model_validate_json(response.content).results

    def test_connection(self) -> tuple[bool, str]:
        """Check the connection by listing subscription definitions (Airflow's ``(ok, message)`` convention)."""
        try:
            definitions = self.get_subscription_definitions()
        except Exception as exc:  # noqa: BLE001 - the UI shows the message
            return False, str(exc)
        return True, f"Connected to HubSpot ({self.api_version}): {len(definitions)} subscription definitions"

    # ------------------------------------------------------------------ the workhorse

    def _validate(self, value: Mapping[str, Any] | PublicStatusRequest) -> PublicStatusRequest:
        if isinstance(value, PublicStatusRequest):
            if self.require_legal_basis:
                return PublicStatusRequest.model_validate(
                    value.model_dump(), context={"require_legal_basis": True}
                )
            return value
        return PublicStatusRequest.model_validate(
            value, context={"require_legal_basis": True} if self.require_legal_basis else None
        )

    def write_statuses(
        self,
        inputs: Iterable[Mapping[str, Any] | PublicStatusRequest],
        *,
        batch_size: int | None = None,
        on_failed: Callable[[FailedInput], None] | None = None,
        keep_failed: bool = True,
    ) -> WriteReport:
        """Write subscription statuses, in batches, and account for every input.

        * Each input is validated (:class:`~hubspot_provider.models.PublicStatusRequest`); a bad one
          is reported as ``INVALID_INPUT`` with the field and the fix, never sent, never fatal.
        * Inputs are streamed into batches of ``batch_size``; memory stays flat in the input count.
          Within a batch being filled, a later input for the same (subscriber, subscription,
          channel) supersedes the earlier; batches touching the same key are sent in order, so
          the last input always wins.
        * HubSpot's per-item errors are mapped back to their inputs. A whole-batch 400 is bisected
          until the offending inputs are isolated; the rest still land.
        * Requests are paced under HubSpot's rolling limit; 429 rolling, 5xx, timeouts and dropped
          connections are retried with backoff and jitter.

        Raises :class:`HubSpotAuthError`/:class:`HubSpotScopeError` at once on 401/403,
        :class:`HubSpotDailyLimitError` on the ``DAILY`` limit, :class:`HubSpotRateLimitError` when
        HubSpot asks for a wait over ``max_wait_s``, and :class:`HubSpotUnavailableError` when
        retries run out; these carry ``partial_report`` (the inputs accounted for before the stop;
        the rest were not acknowledged, and re-sending them is safe).

        .. code-block:: python

            report = hook.write_statuses(rows, batch_size=100)
            for failure in report.failed:
                print(failure.index, failure.category, failure.message)

        :param inputs: dicts (camelCase or snake_case keys) or ``PublicStatusRequest`` objects.
        :param batch_size: inputs per request; defaults to the hook's (connection extra, else 100).
        :param on_failed: called with each :class:`FailedInput` as soon as it is known (e.g. to
            stream dead letters to a file).
        :param keep_failed: keep failed inputs in ``report.failed`` (set ``False`` for huge runs
            that stream failures through ``on_failed``).
        """
        size = batch_size or self.batch_size
        if not 1 <= size <= 1000:
            raise HubSpotConfigError(f"batch_size must be between 1 and 1000, got {size}")
        self.get_conn()  # fail fast on a bad connection, before reading any input
        started = time.monotonic()
        report = WriteReport()
        stats = _Stats()

        def fail(failure: FailedInput) -> None:
            report.failed_count += 1
            report.failed_by_category[failure.category] = report.failed_by_category.get(failure.category, 0) + 1
            if keep_failed:
                report.failed.append(failure)
            if on_failed is not None:
                on_failed(failure)

        def absorb(result: _BatchResult) -> None:
            report.batches += 1
            report.submitted += len(result.succeeded) + len(result.failed)
            report.succeeded += len(result.succeeded)
            for _, reason in result.succeeded:
                name = reason or "UNKNOWN"
                report.reasons[name] = report.reasons.get(name, 0) + 1
            for failure in result.failed:
                fail(failure)

        def finish() -> WriteReport:
            report.requests, report.retries, report.rate_limited = stats.requests, stats.retries, stats.rate_limited
            report.elapsed_s = round(time.monotonic() - started, 3)
            return report

        in_flight: dict[Future[_BatchResult], list[_Item]] = {}
        key_owner: dict[StatusKey, Future[_BatchResult]] = {}
        interruption: HubSpotError | None = None

        def collect(done: Iterable[Future[_BatchResult]]) -> None:
            nonlocal interruption
            for future in done:
                items = in_flight.pop(future)
                for item in items:
                    if key_owner.get(item.key) is future:
                        del key_owner[item.key]
                try:
                    absorb(future.result())
                except HubSpotError as exc:
                    interruption = interruption or exc

        def dispatch(pending: OrderedDict[StatusKey, _Item], pool: ThreadPoolExecutor) -> None:
            items = list(pending.values())
            pending.clear()
            # A key still in flight in an earlier batch must land first, or the older value could win.
            blockers = {key_owner[item.key] for item in items if item.key in key_owner}
            if blockers:
                collect(wait(blockers).done)
            while len(in_flight) >= self.max_concurrency:
                collect(wait(list(in_flight), return_when=FIRST_COMPLETED).done)
            if interruption is not None:
                return
            future = pool.submit(self._write_batch, items, stats)
            in_flight[future] = items
            for item in items:
                key_owner[item.key] = future

        pending: OrderedDict[StatusKey, _Item] = OrderedDict()
        with ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="hubspot-write") as pool:
            try:
                for index, value in enumerate(inputs):
                    try:
                        request = self._validate(value)
                    except ValidationError as exc:
                        report.submitted += 1
                        fail(FailedInput(index=index, input=_as_dict(value), category=INVALID_INPUT,
                                         message=describe_validation_error(exc), retryable=False))
                        continue
                    item = _Item(index=index, key=request.key, wire=request.to_wire())
                    previous = pending.pop(item.key, None)
                    if previous is not None:
                        report.submitted += 1
                        report.superseded += 1
                    pending[item.key] = item
                    if len(pending) >= size:
                        dispatch(pending, pool)
                        if interruption is not None:
                            break
                if pending and interruption is None:
                    dispatch(pending, pool)
            finally:
                if in_flight:
                    collect(wait(list(in_flight)).done)

        finish()
        if interruption is not None:
            self.log.warning("HubSpot write interrupted after %s", report.summary())
            if isinstance(interruption, (HubSpotRateLimitError, HubSpotUnavailableError)):
                interruption.partial_report = report
            raise interruption
        self.log.info("HubSpot write: %s", report.summary())
        return report

    def _write_batch(self, items: list[_Item], stats: _Stats) -> _BatchResult:
        """Send one batch; on a whole-batch 400, bisect to isolate the inputs HubSpot rejects."""
        path = f"{self.api_base_path}/statuses/batch/write"
        body = {"inputs": [item.wire for item in items]}
        response = self._with_retries(
            stats, lambda: self._send("POST", path, stats, json_body=body, allow_400=True)
        )
        if response.status_code == 400:
            error = ErrorBody.model_validate(self._json(response))
            correlation_id = error.correlation_id or response.headers.get("X-HubSpot-Correlation-Id")
            if len(items) == 1:
                item = items[0]
                return _BatchResult(failed=[FailedInput(
                    index=item.index, input=item.wire, category=error.category or "VALIDATION_ERROR",
                    message=f"HubSpot rejected this input: {error.message or 'HTTP 400'}", retryable=False,
                    correlation_id=correlation_id)])
            self.log.info("HubSpot rejected a batch of %d (400); splitting it to isolate the bad input(s)", len(items))
            middle = len(items) // 2
            return self._write_batch(items[:middle], stats).extend(self._write_batch(items[middle:], stats))
        parsed = BatchResponsePublicStatus.model_validate_json(response.content)
        return self._map_outcomes(items, parsed, response.headers.get("X-HubSpot-Correlation-Id"))

    @staticmethod
    def _error_keys(error: StandardError, candidates: dict[StatusKey, _Item]) -> list[StatusKey]:
        """Inputs an item error names, via its context (or, failing that, its message)."""
        context = error.context or {}

        def values(*names: str) -> list[str]:
            found: list[str] = []
            for name in names:
                value = context.get(name)
                if isinstance(value, list):
                    found.extend(str(v) for v in value)
                elif value is not None:
                    found.append(str(value))
            return found

        emails = {e.lower() for e in values("subscriberIdString", "email", "emailAddress", "subscriberIdStrings")}
        ids = set(values("subscriptionId", "subscriptionIds"))
        if error.id:
            emails.add(error.id.lower())
        if emails or ids:
            keys = [
                key for key in candidates
                if (not emails or key[0] in emails) and (not ids or str(key[1]) in ids)
            ]
            if keys:
                return keys
        message = (error.message or "").lower()
        if message:
            return [key for key in candidates if key[0] in message and str(key[1]) in message]
        return []

    def _map_outcomes(
        self, items: list[_Item], parsed: BatchResponsePublicStatus, correlation_id: str | None
    ) -> _BatchResult:
        remaining: dict[StatusKey, _Item] = {item.key: item for item in items}
        result = _BatchResult()
        for status in parsed.results:
            key = status.key
            item = remaining.pop(key, None) if key is not None else None
            if item is not None:
                reason = status.set_status_success_reason
                result.succeeded.append((item.index, getattr(reason, "value", reason)))
        unmapped: list[StandardError] = []
        for error in parsed.errors:
            keys = [k for k in self._error_keys(error, remaining) if k in remaining]
            if not keys:
                unmapped.append(error)
            for key in keys:
                item = remaining.pop(key)
                category = error.category or "UNKNOWN"
                result.failed.append(FailedInput(
                    index=item.index, input=item.wire, category=category,
                    message=error.message or f"HubSpot reported {category} for this input",
                    retryable=category in _RETRYABLE_CATEGORIES, correlation_id=correlation_id))
        for item in remaining.values():
            if unmapped:
                categories = sorted({e.category or "UNKNOWN" for e in unmapped})
                messages = "; ".join((e.message or "")[:200] for e in unmapped[:3])
                failure = FailedInput(
                    index=item.index, input=item.wire,
                    category=categories[0] if len(categories) == 1 else UNMAPPED_ERROR,
                    message=f"HubSpot returned no result for this input and {len(unmapped)} error(s) it did not "
                    f"tie to an input: {messages}",
                    retryable=True, correlation_id=correlation_id)
            else:
                failure = FailedInput(
                    index=item.index, input=item.wire, category=NO_RESULT,
                    message=f"HubSpot's response (status {getattr(parsed.status, 'value', parsed.status)}) had no "
                    "result or error for this input; re-sending it is safe",
                    retryable=True, correlation_id=correlation_id)
            result.failed.append(failure)
        return result


__all__ = ["FailedInput", "HubSpotHook", "WriteReport"]
