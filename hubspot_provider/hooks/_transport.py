"""One exchange with HubSpot, and the rules every exchange obeys.

* **Bounded.** Every request has a total deadline covering connect, send and the whole response: a
  watchdog shuts the socket when it passes, so a server that drips its answer a byte a second
  cannot hold a write (each byte would otherwise reset the read timeout). A response over
  ``max_response_bytes`` is refused, not buffered. Retries stop when the retry budget is spent.
* **No redirects.** HubSpot's API never needs one, and following one would carry the batch (email
  addresses) or OAuth credentials to another host. A 3xx is a :class:`HubSpotRequestError`
  naming where it pointed; nothing is sent on.
* **Classified.** 2xx is returned; a 400 is HubSpot's verdict only when it carries HubSpot's JSON
  error body; 401/403/429/5xx and TLS failures become the matching error or a retry.
* **Redacted.** Every secret the hook knows, any ``Bearer`` value and every email address are cut
  from the text of whatever is raised or logged, whatever the server echoed.
"""

from __future__ import annotations

import ipaddress
import json
import math
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlencode, urljoin, urlparse
from zoneinfo import ZoneInfo

import requests
import tenacity
from pydantic import ValidationError
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from hubspot_provider.exceptions import (
    HubSpotAuthError,
    HubSpotConfigError,
    HubSpotDailyLimitError,
    HubSpotError,
    HubSpotRateLimitError,
    HubSpotRequestError,
    HubSpotResponseError,
    HubSpotScopeError,
    HubSpotUnavailableError,
)
from hubspot_provider.hooks._pacer import RateLimitPacer
from hubspot_provider.models import ErrorBody, RateLimitBody

__all__ = ["HubSpotResponse", "Redactor", "Secret", "Stats", "Transport", "DEFAULT_MAX_RESPONSE_BYTES"]

DEFAULT_MAX_RESPONSE_BYTES = 32 * 2**20
_TRANSIENT_STATUS = {423, 477, 500, 502, 503, 504, 520, 521, 522, 523, 524}
_CHUNK = 64 * 1024


# ---------------------------------------------------------------------------------- secrets


class Secret:
    """Holds a credential so that no repr, log line or traceback local shows it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<secret>"

    __str__ = __repr__


_EMAIL_ANYWHERE = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")
_BEARER = re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]+")


class Redactor:
    """Cuts every known secret, any bearer value and every email address out of a text.

    Secrets are registered as the hook learns them (the static token, OAuth client secret, refresh
    and access tokens); each is also handed to Airflow's log masker.
    """

    def __init__(self) -> None:
        self._secrets: tuple[str, ...] = ()
        self._lock = threading.Lock()

    def add(self, *values: str | None) -> None:
        new = [v for v in values if v and len(v) >= 4 and v not in self._secrets]
        if not new:
            return
        with self._lock:
            # Longest first, so a secret containing another is cut whole.
            self._secrets = tuple(sorted({*self._secrets, *new}, key=len, reverse=True))
        try:
            from airflow.sdk.log import mask_secret
        except ImportError:  # pragma: no cover - older task SDKs
            return
        for value in new:
            mask_secret(value)

    def __call__(self, text: Any) -> str | None:
        if text is None or text == "":
            return text
        if not isinstance(text, str):
            text = str(text)
        for secret in self._secrets:
            text = text.replace(secret, "***")
        text = _BEARER.sub(r"\1 ***", text)
        return _EMAIL_ANYWHERE.sub("<email>", text)

    def scrub(self, error: HubSpotError) -> HubSpotError:
        """Redact an error's message, correlation id and category in place; returns it."""
        error.args = tuple(self(a) if isinstance(a, str) else a for a in error.args)
        error.correlation_id = self(error.correlation_id)
        error.category = self(error.category)
        return error


# ---------------------------------------------------------------------------------- the deadline

_current = threading.local()


class _Deadline:
    """A total deadline for one exchange: when it passes, the exchange's socket is shut down.

    The connection classes below attach their socket to the deadline of the thread that uses
    them, so a blocking read of a dripping server returns at once when time is up.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self._sockets: list[Any] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(max(0.0, seconds), self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        _current.deadline = self
        self._timer.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._timer.cancel()
        _current.deadline = None

    def detach(self) -> None:
        """Forget the sockets: the connection is about to go back to the pool for another request."""
        with self._lock:
            self._sockets = []
            self._timer.cancel()

    def attach(self, sock: Any) -> None:
        if sock is None:
            return
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shutdown(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shutdown(sock)


def _shutdown(sock: Any) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _attach(sock: Any) -> None:
    deadline = getattr(_current, "deadline", None)
    if deadline is not None:
        deadline.attach(sock)


class _DeadlineMixin:
    def _new_conn(self) -> Any:  # the raw socket: attached before any TLS handshake
        sock = super()._new_conn()  # type: ignore[misc]
        _attach(sock)
        return sock

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        _attach(self.sock)  # type: ignore[attr-defined]

    def request(self, *args: Any, **kwargs: Any) -> Any:
        _attach(self.sock)  # type: ignore[attr-defined]  # a pooled connection, reused
        return super().request(*args, **kwargs)  # type: ignore[misc]


class _HTTPConnection(_DeadlineMixin, HTTPConnection):
    pass


class _HTTPSConnection(_DeadlineMixin, HTTPSConnection):
    pass


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


class DeadlineAdapter(HTTPAdapter):
    """requests adapter whose connections obey the exchange deadline of the calling thread."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        # Behind an HTTP(S) proxy (HTTPS_PROXY on a worker) requests uses a manager of its own; its
        # connections must obey the deadline too. (SOCKS proxies bring their own connection classes.)
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if not proxy.lower().startswith("socks"):
            manager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
        return manager


# ---------------------------------------------------------------------------------- the answer


@dataclass(frozen=True)
class HubSpotResponse:
    """A whole answer from HubSpot, read within the deadline and the size cap.

    :param status_code: the HTTP status.
    :param headers: the response headers (case-insensitive).
    :param content: the body, at most ``max_response_bytes`` long.
    :param attempts: requests it took to get this answer (1 plus retries).
    :param sent_at: when the first of them was sent (aware UTC).
    """

    status_code: int
    headers: Mapping[str, str]
    content: bytes
    attempts: int = 1
    sent_at: datetime | None = None

    @property
    def correlation_id(self) -> str | None:
        """HubSpot's ``X-HubSpot-Correlation-Id`` header, if sent."""
        return self.headers.get("X-HubSpot-Correlation-Id")

    def json(self) -> Any:
        """The body as JSON; :class:`HubSpotResponseError` (without the body's text) when it is not."""
        try:
            return json.loads(self.content)
        except ValueError as exc:
            raise HubSpotResponseError(
                f"HubSpot answered HTTP {self.status_code} with a body that is not JSON "
                f"({self.headers.get('Content-Type') or 'no Content-Type'}, {len(self.content)} bytes, "
                f"{getattr(exc, 'msg', 'unreadable')}); re-sending is safe",
                status_code=self.status_code,
                correlation_id=self.correlation_id,
            ) from None

    def hubspot_error(self) -> ErrorBody | None:
        """HubSpot's JSON error body, or ``None`` when the body is not one (an HTML page from a proxy)."""
        try:
            doc = json.loads(self.content)
            if not isinstance(doc, dict):
                return None
            body = ErrorBody.model_validate(doc)
        except (ValueError, ValidationError):
            return None
        # HubSpot's error bodies say "status": "error" and carry a category or a correlation id; a
        # gateway's {"message": "Forbidden"} is not HubSpot's verdict on any input.
        if (body.status or "").lower() != "error" or not (body.category or body.correlation_id):
            return None
        return body


@dataclass
class Stats:
    """Traffic counters of one call, shared by its threads."""

    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)


class _Transient(Exception):
    """A failure worth retrying: 429 TEN_SECONDLY_ROLLING, 5xx, deadline, dropped connection."""

    def __init__(self, reason: str, *, wait_s: float | None = None, correlation_id: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.wait_s = wait_s
        self.correlation_id = correlation_id


@dataclass
class _Attempts:
    count: int = 0
    refreshed_after_401: bool = False


# ---------------------------------------------------------------------------------- the transport


@dataclass
class Auth:
    """How the transport authorises a request.

    :param token: returns ``(access token, generation)``; the generation changes on every refresh.
    :param refresh: ``refresh(generation)`` renews the token unless another thread already did;
        ``None`` for a static token (a 401 is then final).
    """

    token: Callable[[], tuple[str, int]]
    refresh: Callable[[int], None] | None = None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Transport:
    """Sends requests to one HubSpot base URL under the rules in this module's docstring."""

    def __init__(
        self,
        *,
        conn_id: str,
        base_url: str,
        session: Callable[[], requests.Session],
        auth: Auth,
        pacer: RateLimitPacer,
        redact: Redactor,
        log: Any,
        connect_timeout: float,
        read_timeout: float,
        deadline_s: float,
        max_retries: int,
        retry_budget_s: float,
        max_wait_s: float,
        max_response_bytes: int,
        portal_timezone: ZoneInfo,
    ) -> None:
        self.conn_id = conn_id
        self.base_url = base_url
        self._session = session
        self._auth = auth
        self.pacer = pacer
        self.redact = redact
        self.log = log
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.deadline_s = deadline_s
        self.max_retries = max_retries
        self.retry_budget_s = retry_budget_s
        self.max_wait_s = max_wait_s
        self.max_response_bytes = max_response_bytes
        self.portal_timezone = portal_timezone

    # ------------------------------------------------------------------ a call, with retries

    def call(
        self,
        method: str,
        path: str,
        stats: Stats,
        *,
        json_body: Any = None,
        form: Mapping[str, str] | None = None,
        params: Mapping[str, Any] | None = None,
        accept_400: bool = False,
        raw_4xx: bool = False,
        authorize: bool = True,
        scopes: str = "",
    ) -> HubSpotResponse:
        """One request, retried while failures are transient, bounded by the retry budget.

        :param accept_400: return a 400 carrying HubSpot's JSON error body (a batch write bisects it).
        :param raw_4xx: return every 4xx but 429 to the caller (the OAuth token endpoint).
        :param scopes: the scope(s) this request needs, named in a 403's message.
        """
        if json_body is not None:
            body: bytes | None = json.dumps(json_body, separators=(",", ":")).encode()
            content_type: str | None = "application/json"
        elif form is not None:
            body, content_type = urlencode(dict(form)).encode(), "application/x-www-form-urlencoded"
        else:
            body, content_type = None, None
        attempts = _Attempts()
        budget_ends = time.monotonic() + self.retry_budget_s
        sent_at = datetime.now(timezone.utc)

        def attempt() -> HubSpotResponse:
            attempts.count += 1
            left = budget_ends - time.monotonic()
            if left <= 0:
                raise _Transient("the retry budget is used up")
            return self._exchange(
                method, path, stats, body=body, content_type=content_type, params=params,
                accept_400=accept_400, raw_4xx=raw_4xx, authorize=authorize, scopes=scopes,
                deadline_s=min(self.deadline_s, left), attempts=attempts,
            )

        def before_sleep(retry_state: tenacity.RetryCallState) -> None:
            stats.add(retries=1)
            exc = retry_state.outcome.exception() if retry_state.outcome else None
            self.log.warning(
                "HubSpot request failed (%s); retry %d/%d in %.1fs",
                self.redact(str(exc)), retry_state.attempt_number, self.max_retries, retry_state.upcoming_sleep,
            )

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(_Transient),
            stop=tenacity.stop_after_attempt(self.max_retries + 1) | tenacity.stop_before_delay(self.retry_budget_s),
            wait=self._wait,
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            return replace(retrying(attempt), attempts=attempts.count, sent_at=sent_at)
        except _Transient as exc:
            raise self.redact.scrub(HubSpotUnavailableError(
                f"HubSpot stayed unavailable after {stats.retries} retries within the {self.retry_budget_s:.0f}s "
                f"retry budget ({exc.reason}); nothing after the last acknowledged batch was applied for sure. "
                "Re-run later; writes are idempotent",
                correlation_id=exc.correlation_id,
            )) from None
        except HubSpotError as exc:
            raise self.redact.scrub(exc) from None

    @staticmethod
    def _wait(retry_state: tenacity.RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        hint = getattr(exc, "wait_s", None)
        if hint is not None:
            return hint + random.uniform(0, min(1.0, hint * 0.1))
        return tenacity.wait_random_exponential(multiplier=0.5, max=30)(retry_state)

    # ------------------------------------------------------------------ one exchange

    def _exchange(
        self,
        method: str,
        path: str,
        stats: Stats,
        *,
        body: bytes | None,
        content_type: str | None,
        params: Mapping[str, Any] | None,
        accept_400: bool,
        raw_4xx: bool,
        authorize: bool,
        scopes: str,
        deadline_s: float,
        attempts: _Attempts,
    ) -> HubSpotResponse:
        session = self._session()
        url = self.base_url + path
        headers = {"Content-Type": content_type} if content_type else {}
        generation = 0
        began = time.monotonic()
        if authorize:
            token, generation = self._auth.token()
            headers["Authorization"] = f"Bearer {token}"
        if not self.pacer.acquire(timeout=max(0.0, deadline_s - (time.monotonic() - began))):
            raise _Transient("no room under HubSpot's rate limit within the retry budget")
        # What a token refresh or the pacer's wait used comes off this attempt's time.
        deadline_s -= time.monotonic() - began
        if deadline_s <= 0:
            self.pacer.release(None)
            raise _Transient("the retry budget ran out while waiting for room under the rate limit")
        status: int | None = None
        response_headers: Mapping[str, str] | None = None
        try:
            stats.add(requests=1)
            with _Deadline(deadline_s) as deadline:
                try:
                    raw = session.request(
                        method, url, data=body, params=params, headers=headers,
                        timeout=(min(self.connect_timeout, deadline_s), min(self.read_timeout, deadline_s)),
                        allow_redirects=False, stream=True,
                    )
                    try:
                        status, response_headers = raw.status_code, raw.headers
                        content = self._read_body(raw, method, path)
                    finally:
                        expired = deadline.expired
                        deadline.detach()
                        raw.close()
                except requests.exceptions.SSLError as exc:
                    raise self._tls_error(exc) from None
                except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                        requests.exceptions.ContentDecodingError) as exc:
                    if deadline.expired:
                        raise _Transient(f"no complete answer within the {deadline_s:.0f}s request deadline") from None
                    raise _Transient(f"{type(exc).__name__} talking to HubSpot") from None
                except requests.RequestException as exc:
                    raise HubSpotRequestError(
                        f"{method} {path} could not be sent ({type(exc).__name__}); check the connection's host"
                    ) from None
                if expired:
                    raise _Transient(f"no complete answer within the {deadline_s:.0f}s request deadline")
        finally:
            self.pacer.release(response_headers, rate_limited=status == 429)
        answer = HubSpotResponse(status, response_headers, content)  # type: ignore[arg-type]
        return self._classify(method, path, answer, accept_400=accept_400, raw_4xx=raw_4xx,
                              authorize=authorize, generation=generation, attempts=attempts, stats=stats,
                              scopes=scopes)

    def _read_body(self, raw: requests.Response, method: str, path: str) -> bytes:
        cap = self.max_response_bytes
        declared = raw.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            raise self._too_large(method, path, raw.status_code, f"declared {int(declared):,} bytes")
        chunks: list[bytes] = []
        size = 0
        for chunk in raw.iter_content(_CHUNK):
            size += len(chunk)
            if size > cap:
                raise self._too_large(method, path, raw.status_code, "more than that")
            chunks.append(chunk)
        return b"".join(chunks)

    def _too_large(self, method: str, path: str, status: int, detail: str) -> HubSpotResponseError:
        return HubSpotResponseError(
            f"HubSpot's answer to {method} {path} (HTTP {status}) is over the {self.max_response_bytes:,}-byte "
            f"cap ({detail}); refused unread. Use smaller batches, or raise max_response_bytes if the answer "
            "is genuine",
            status_code=status,
        )

    def _tls_error(self, exc: requests.exceptions.SSLError) -> HubSpotConfigError:
        """A failed TLS handshake as the setting it is: a wrong scheme or an untrusted certificate.

        It is raised at once, never retried: waiting does not change a scheme, so it must not read as
        HubSpot being unavailable.
        """
        where = urlparse(self.base_url)
        host, port = where.hostname or "", where.port or 443
        text = str(exc)
        found = re.search(r"\[SSL: ([A-Z_]+)\]|(certificate verify failed[^'\")]*)", text)
        reason = (found.group(1) or found.group(2)) if found else type(exc).__name__
        if "certificate" in text.lower():
            advice = (
                "the server's certificate is not trusted here. HubSpot's API (https://api.hubapi.com) has a "
                "valid one: check the host, any proxy or TLS inspection in between, and REQUESTS_CA_BUNDLE"
            )
        elif _is_loopback(host):
            advice = (
                "the server there does not speak TLS (the emulator speaks plain http), but the connection's "
                f"scheme is https, the default when the host names none. Set the host to http://{host}:{port}, "
                f"or end the URI form with /http (hubspot://:<token>@{host}:{port}/http)"
            )
        else:
            advice = (
                "the server there does not speak TLS as HubSpot's API does. Check the host (HubSpot's API is "
                "https://api.hubapi.com) and any proxy in between"
            )
        return HubSpotConfigError(
            f"TLS with {host}:{port} failed ({reason}) for connection {self.conn_id!r}: {advice}. A scheme or "
            "certificate is a setting, not an outage: this is not retried"
        )

    # ------------------------------------------------------------------ what the answer means

    def _classify(
        self,
        method: str,
        path: str,
        answer: HubSpotResponse,
        *,
        accept_400: bool,
        raw_4xx: bool,
        authorize: bool,
        generation: int,
        attempts: _Attempts,
        stats: Stats,
        scopes: str,
    ) -> HubSpotResponse:
        status = answer.status_code
        correlation_id = answer.correlation_id
        if 300 <= status < 400:
            location = answer.headers.get("Location")
            target = urlparse(urljoin(self.base_url + path, location)) if location else None
            where = (
                f"{target.hostname}:{target.port or (443 if target.scheme == 'https' else 80)} ({target.scheme})"
                if target is not None and target.hostname else "no Location"
            )
            raise HubSpotRequestError(
                f"HubSpot answered {method} {path} with a redirect (HTTP {status}) to {where}. The hook never "
                "follows redirects: they would carry the batch or credentials to another host, and that host's "
                "answer is not HubSpot's. Check the connection's host (HubSpot's API is https://api.hubapi.com); "
                "nothing was sent on, and the inputs stay retryable",
                status_code=status,
                correlation_id=correlation_id,
            )
        if status < 300:
            return answer
        if status == 429:
            raise self._rate_limited(answer, stats)
        if status in _TRANSIENT_STATUS or status >= 500:
            raise _Transient(f"HTTP {status}", wait_s=self._retry_after(answer), correlation_id=correlation_id)
        if raw_4xx:
            return answer
        error = answer.hubspot_error()
        if status == 400 and accept_400 and error is not None:
            return answer
        if error is None:
            kind = answer.headers.get("Content-Type") or "no Content-Type"
            raise HubSpotRequestError(
                f"{method} {path} got HTTP {status} that is not HubSpot's JSON error ({kind}, "
                f"{len(answer.content)} bytes): something between here and HubSpot (a proxy, firewall or "
                "wrong host) answered. Nothing was judged invalid; the inputs stay retryable. Check the "
                "connection's host and the network path",
                status_code=status,
                correlation_id=correlation_id,
            )
        correlation_id = error.correlation_id or correlation_id
        if status == 401:
            if authorize and self._auth.refresh is not None:
                if attempts.refreshed_after_401:
                    raise HubSpotAuthError(
                        f"HubSpot rejected a freshly refreshed OAuth access token of connection {self.conn_id!r} "
                        f"(401 {error.category or ''}). Check that the app is installed in the portal and "
                        "the refresh token belongs to it",
                        status_code=401, correlation_id=correlation_id, category=error.category,
                    )
                # The token may have been revoked early; one forced refresh is cheap and safe.
                attempts.refreshed_after_401 = True
                self._auth.refresh(generation)
                raise _Transient("401 with an OAuth token; refreshed it", wait_s=0.0, correlation_id=correlation_id)
            raise HubSpotAuthError(
                f"HubSpot rejected the access token of connection {self.conn_id!r} (401 {error.category or ''}). "
                "Check the token in the connection's password; private app tokens start with 'pat-'",
                status_code=401, correlation_id=correlation_id, category=error.category,
            )
        if status == 403:
            named = error.required_scopes()
            needed = ", ".join(named) if named else scopes or "the scope this request needs (see the README)"
            raise HubSpotScopeError(
                f"HubSpot refused {method} {path} (403 {error.category or 'FORBIDDEN'}): the token of connection "
                f"{self.conn_id!r} lacks a scope. Grant: {needed}. Batch status scopes need Marketing Hub "
                "Enterprise",
                required_scopes=named, status_code=403, correlation_id=correlation_id, category=error.category,
            )
        raise HubSpotRequestError(
            f"HubSpot answered {method} {path} with HTTP {status} ({error.category or 'error'}: "
            f"{(self.redact(error.message) or '')[:300]}). Check the connection's host and api_version",
            status_code=status, correlation_id=correlation_id, category=error.category,
        )

    @staticmethod
    def _retry_after(answer: HubSpotResponse) -> float | None:
        value = answer.headers.get("Retry-After")
        if value is None:
            return None
        try:
            seconds = float(value)
        except ValueError:
            return None
        # A hostile or broken value (inf, nan, 1e12) must not overflow a datetime: a day at most.
        return min(max(0.0, seconds), 86_400.0) if math.isfinite(seconds) else None

    def _rate_limited(self, answer: HubSpotResponse, stats: Stats) -> Exception:
        try:
            doc = json.loads(answer.content)
            body = RateLimitBody.model_validate(doc if isinstance(doc, dict) else {})
        except (ValueError, ValidationError):
            body = RateLimitBody()
        correlation_id = body.correlation_id or answer.correlation_id
        stats.add(rate_limited=1)
        policy = body.policy_name or "rate limit"
        if policy.upper() == "DAILY":
            reset_at = self._daily_reset_at(answer)
            return HubSpotDailyLimitError(
                f"HubSpot's DAILY request limit is used up; it resets at {reset_at.isoformat()}. "
                "Re-run (or let the operator defer) after that; writes are idempotent",
                reset_at=reset_at, status_code=429, correlation_id=correlation_id, category="RATE_LIMITS",
            )
        wait_s = self._retry_after(answer)
        if wait_s is None:
            wait_s = self.pacer.wait_after_429()
        if wait_s > self.max_wait_s:
            reset_at = datetime.now(timezone.utc) + timedelta(seconds=wait_s)
            return HubSpotRateLimitError(
                f"HubSpot asked to wait {wait_s:.0f}s ({policy}), longer than max_wait_s={self.max_wait_s:.0f}; "
                f"resume after {reset_at.isoformat()}",
                reset_at=reset_at, status_code=429, correlation_id=correlation_id, category="RATE_LIMITS",
            )
        self.pacer.block_for(wait_s)
        return _Transient(f"429 {policy}", wait_s=wait_s, correlation_id=correlation_id)

    def _daily_reset_at(self, answer: HubSpotResponse) -> datetime:
        now = datetime.now(timezone.utc)
        retry_after = self._retry_after(answer)
        if retry_after is not None:
            return now + timedelta(seconds=retry_after)
        local = now.astimezone(self.portal_timezone)
        midnight = datetime.combine(local.date() + timedelta(days=1), datetime.min.time(), self.portal_timezone)
        return midnight.astimezone(timezone.utc)
