"""HubSpotHook: writes email subscription statuses to HubSpot, correctly, under rate limits and faults.

This module is the hook's public face: its settings (read from the Airflow connection and checked
together, before the first request), its pooled session, auth (static token or OAuth refresh) and
its methods. How one exchange is bounded, classified and redacted lives in
:mod:`~hubspot_provider.hooks._transport`; pacing in :mod:`~hubspot_provider.hooks._pacer`;
batching and outcome verification in :mod:`~hubspot_provider.hooks._batching`; the results model
in :mod:`hubspot_provider.results`.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from functools import cached_property
from typing import Any
from urllib.parse import urlparse
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import requests
from airflow.sdk import BaseHook
from pydantic import ValidationError

from hubspot_provider.exceptions import HubSpotAuthError, HubSpotConfigError, HubSpotResponseError
from hubspot_provider.hooks._batching import WRITE_SCOPE, BatchWriter, UnsubscribeAllWriter
from hubspot_provider.hooks._guard import (
    CURRENT_STATUS_UNREAD,
    DEFAULT_POLICY,
    UNKNOWN,
    Current,
    OwnWrites,
    Verdict,
    check_policy,
    decide,
    needs_read,
)
from hubspot_provider.hooks._pacer import RateLimitPacer
from hubspot_provider.ledger import as_text
from hubspot_provider.hooks._transport import (
    DEFAULT_MAX_RESPONSE_BYTES,
    Auth,
    DeadlineAdapter,
    HubSpotResponse,
    Redactor,
    Secret,
    Stats,
    Transport,
)
from hubspot_provider.models import (
    ActionResponseWithResultsSubscriptionDefinition,
    BatchResponsePublicStatus,
    BatchResponsePublicStatusBulkResponse,
    BatchResponsePublicWideStatusBulkResponse,
    UNSUBSCRIBE_ALL,
    PublicStatus,
    PublicStatusRequest,
    PublicWideStatus,
    UnsubscribeAllRequest,
    SubscriptionDefinition,
    describe_validation_error,
)
from hubspot_provider.results import INVALID_INPUT, FailedInput, InputOutcome, WriteReport

__all__ = ["FailedInput", "HubSpotHook", "HubSpotResponse", "WriteReport", "INVALID_INPUT", "SCOPES"]

DEFAULT_HOST = "api.hubapi.com"
API_VERSIONS = ("v4", "2026-03")
DEFAULT_BATCH_SIZE = 100
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_DEADLINE_S = 60.0
DEFAULT_MAX_RETRIES = 8
DEFAULT_RETRY_BUDGET_S = 300.0
DEFAULT_MAX_WAIT_S = 120.0
DEFAULT_MAX_CONCURRENCY = 4  # batches in flight, until HubSpot's limit and the latency are known
MAX_ADAPTIVE_CONCURRENCY = 16  # the most they can raise it to
OAUTH_TOKEN_PATH = "/oauth/v1/token"
READ_SCOPE = "communication_preferences.statuses.batch.read"
DEFINITIONS_SCOPE = "communication_preferences.read or communication_preferences.read_write"
SCOPES = {
    "write_statuses / batch_write_statuses": WRITE_SCOPE,
    "batch_read_statuses / read_statuses / read_unsubscribe_all / check_hubspot_changes": READ_SCOPE,
    "unsubscribe_all": WRITE_SCOPE,
    "get_subscription_definitions / test_connection": DEFINITIONS_SCOPE,
}
"""Which scope each method needs (any one of those joined by "or")."""

_SECRET_EXTRAS = {"client_secret", "refresh_token"}
_WIRE_KEYS = frozenset(field.alias for field in PublicStatusRequest.model_fields.values())


class _Validated:
    """A wire dict a validate step already produced: its key and wire form, without a second check."""

    __slots__ = ("_wire",)

    def __init__(self, wire: dict[str, Any]) -> None:
        self._wire = wire

    @property
    def key(self) -> tuple[str, int, str]:
        return (self._wire["subscriberIdString"].lower(), self._wire["subscriptionId"], "EMAIL")

    def to_wire(self) -> dict[str, Any]:
        return self._wire


def _loopback(hostname: str | None) -> bool:
    if not hostname:
        return False
    if hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class HubSpotSettings:
    """Every setting of a hook, resolved from its arguments and connection and checked together."""

    base_url: str
    api_version: str
    batch_size: int
    connect_timeout: float
    read_timeout: float
    deadline_s: float
    max_retries: int
    max_response_bytes: int
    portal_timezone: ZoneInfo
    oauth_token_path: str
    static_token: Secret | None
    oauth: tuple[str, Secret, Secret] | None


class HubSpotHook(BaseHook):
    """Interact with HubSpot's Communication Preferences API (subscription statuses).

    The connection (type ``hubspot``) holds the access token of a private app or service key in
    *password*, or OAuth ``client_id``/``client_secret``/``refresh_token`` in *extra*. *host*
    defaults to ``https://api.hubapi.com``; a scheme in the host, the *schema* field and the *port*
    are honoured, so the hook can point at the emulator (``hubspot_provider.testing``). Extras
    ``api_version`` (``v4`` or ``2026-03``), ``batch_size``, ``timeout``, ``deadline``,
    ``max_retries``, ``max_response_bytes`` and ``portal_timezone`` set defaults that arguments
    override. Every setting is checked together before the first request (and by
    :meth:`test_connection`); a bad one is a :class:`HubSpotConfigError` naming it and the fix.

    The hook is a ``BaseHook`` with one cached session, not an ``HttpHook``: every request it sends
    obeys rules an ``HttpHook`` caller could bypass (no redirects, a total deadline, a size cap,
    redaction). :meth:`request` is the public way to call any other endpoint under those rules.

    .. code-block:: python

        hook = HubSpotHook(hubspot_conn_id="hubspot_default")
        report = hook.write_statuses(
            [{"subscriberIdString": "ada@example.com", "subscriptionId": 1001, "statusState": "SUBSCRIBED"}]
        )
        print(report.summary())

    :param hubspot_conn_id: Airflow connection id of type ``hubspot``.
    :param api_version: ``v4`` or ``2026-03``; overrides the connection's ``api_version``.
    :param batch_size: default inputs per request for :meth:`write_statuses` (1..1000).
    :param timeout: read timeout per socket read, seconds.
    :param deadline: total seconds one request may take, connect to last byte (default 60).
    :param max_retries: retries per request for transient failures (429 rolling, 5xx, deadlines,
        dropped connections).
    :param retry_budget_s: total seconds one request may take with its retries and their waits.
    :param max_wait_s: longest wait HubSpot may ask for (``Retry-After``) that the hook sleeps
        through; a longer one raises :class:`HubSpotRateLimitError` so an operator can defer.
    :param max_concurrency: batches in flight at once (requests to HubSpot run in parallel threads;
        pacing keeps the total under the rate limit). ``None`` (the default) sizes it from what
        the window needs: the requests per second the writer's share of HubSpot's limit allows,
        times the round trip it measures, plus a margin; 4 until both are known, 16 at most.
    :param require_legal_basis: reject inputs lacking ``legalBasis`` and ``legalBasisExplanation``
        (for GDPR-enabled portals) before sending them.
    """

    conn_name_attr = "hubspot_conn_id"
    default_conn_name = "hubspot_default"
    conn_type = "hubspot"
    hook_name = "HubSpot"

    def __init__(
        self,
        hubspot_conn_id: str = default_conn_name,
        *,
        api_version: str | None = None,
        batch_size: int | None = None,
        timeout: float | None = None,
        deadline: float | None = None,
        max_retries: int | None = None,
        retry_budget_s: float | None = None,
        max_wait_s: float | None = None,
        max_concurrency: int | None = None,
        require_legal_basis: bool = False,
        **kwargs: Any,
    ) -> None:
        self.hubspot_conn_id = hubspot_conn_id
        super().__init__(**kwargs)
        self._args = {"api_version": api_version, "batch_size": batch_size, "timeout": timeout,
                      "deadline": deadline, "max_retries": max_retries}
        self.retry_budget_s = DEFAULT_RETRY_BUDGET_S if retry_budget_s is None else retry_budget_s
        self.max_wait_s = DEFAULT_MAX_WAIT_S if max_wait_s is None else max_wait_s
        # An explicit number is kept; otherwise up to MAX_ADAPTIVE_CONCURRENCY threads, of which the
        # pacer's reading of the limit and the latency says how many to use.
        self._fixed_concurrency = max(1, max_concurrency) if max_concurrency else None
        self.max_concurrency = self._fixed_concurrency or MAX_ADAPTIVE_CONCURRENCY
        self.require_legal_basis = require_legal_basis
        self.redact = Redactor()
        self.pacer = RateLimitPacer()
        self._session: requests.Session | None = None
        self._session_lock = threading.Lock()
        self._token_lock = threading.Lock()
        self._oauth_token: Secret | None = None
        self._oauth_expires_at = 0.0
        self._token_generation = 0
        self._refresh_token: Secret | None = None

    def __repr__(self) -> str:
        return f"<HubSpotHook conn_id={self.hubspot_conn_id!r}>"

    # ------------------------------------------------------------------ settings

    @cached_property
    def settings(self) -> HubSpotSettings:
        """The hook's settings, every one checked; raises :class:`HubSpotConfigError` listing each bad one."""
        conn = self.get_connection(self.hubspot_conn_id)
        # Keep only what the hook needs: Airflow's Connection repr shows the password.
        extra = {str(k).removeprefix("extra__hubspot__"): v for k, v in (conn.extra_dejson or {}).items()}
        problems: list[str] = []

        def setting(name: str, default: Any) -> Any:
            value = self._args.get(name)
            if value is None:
                value = extra.get(name)
            return default if value in (None, "") else value

        def number(name: str, default: float, cast: type, low: float, high: float | None = None) -> Any:
            raw = setting(name, default)
            try:
                value = cast(raw)
                if isinstance(raw, float) and cast is int and raw != int(raw):
                    raise ValueError
            except (TypeError, ValueError):
                problems.append(f"{name} must be a number, got {str(raw)[:40]!r}")
                return cast(default)
            if value < low or (high is not None and value > high):
                problems.append(f"{name} must be between {low:g} and {high:g}, got {value}" if high is not None
                                else f"{name} must be at least {low:g}, got {value}")
                return cast(default)
            return value

        version = str(setting("api_version", "v4"))
        if version not in API_VERSIONS:
            problems.append(f"api_version {version!r} is not supported; use one of {', '.join(API_VERSIONS)}")
        batch_size = number("batch_size", DEFAULT_BATCH_SIZE, int, 1, 1000)
        read_timeout = number("timeout", DEFAULT_TIMEOUT_S, float, 0.001)
        deadline = number("deadline", max(DEFAULT_DEADLINE_S, read_timeout), float, 0.001)
        max_retries = number("max_retries", DEFAULT_MAX_RETRIES, int, 0, 100)
        max_bytes = number("max_response_bytes", DEFAULT_MAX_RESPONSE_BYTES, int, 1024)
        zone_name = str(setting("portal_timezone", "UTC"))
        try:
            zone = ZoneInfo(zone_name)
        except (ZoneInfoNotFoundError, ValueError):
            problems.append(f"portal_timezone {zone_name!r} is not an IANA time zone (e.g. Europe/Berlin)")
            zone = ZoneInfo("UTC")
        token_path = str(setting("oauth_token_path", OAUTH_TOKEN_PATH))
        if not token_path.startswith("/"):
            problems.append(f"oauth_token_path {token_path!r} must be a path starting with '/'")

        base_url = self._base_url(conn.host, conn.schema, conn.port, problems)
        static = Secret(conn.password) if conn.password else None
        client_id, secret, refresh = (extra.get(n) for n in ("client_id", "client_secret", "refresh_token"))
        oauth = None
        if client_id and secret and refresh:
            oauth = (str(client_id), Secret(str(secret)), Secret(str(refresh)))
        elif client_id or secret or refresh:
            problems.append("OAuth needs all of client_id, client_secret and refresh_token in extra")
        if static is None and oauth is None:
            problems.append("it has no access token: put the private app / service key token in the password, "
                            "or client_id, client_secret and refresh_token in extra")
        self.redact.add(*(s.get() for s in (static, *(oauth or ())[1:]) if isinstance(s, Secret)))
        if problems:
            raise HubSpotConfigError(f"Connection {self.hubspot_conn_id!r}: " + "; ".join(problems))
        return HubSpotSettings(
            base_url=base_url, api_version=version, batch_size=batch_size,
            connect_timeout=min(DEFAULT_CONNECT_TIMEOUT_S, read_timeout), read_timeout=read_timeout,
            deadline_s=deadline, max_retries=max_retries, max_response_bytes=max_bytes, portal_timezone=zone,
            oauth_token_path=token_path, static_token=static, oauth=oauth,
        )

    @staticmethod
    def _base_url(host: str | None, schema: str | None, port: int | None, problems: list[str]) -> str:
        host = (host or DEFAULT_HOST).strip().rstrip("/")
        base = host if "://" in host else f"{schema or 'https'}://{host}"
        if port:
            base = f"{base}:{port}"
        parsed = urlparse(base)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            problems.append(f"cannot build a base URL from host {host!r}; use e.g. https://api.hubapi.com")
        elif parsed.scheme == "http" and not _loopback(parsed.hostname):
            problems.append(
                f"refusing to send the access token over plain http to {parsed.hostname}; use https:// "
                "(plain http is allowed only to loopback, e.g. an emulator)"
            )
        return base

    def concurrency(self) -> int:
        """Batches to keep in flight now: ``max_concurrency`` when given, else what the pacer's
        reading of the limit and the round trip calls for (see :meth:`RateLimitPacer.concurrency`)."""
        if self._fixed_concurrency is not None:
            return self._fixed_concurrency
        return self.pacer.concurrency(DEFAULT_MAX_CONCURRENCY, MAX_ADAPTIVE_CONCURRENCY)

    @property
    def base_url(self) -> str:
        """Scheme, host and port every request goes to."""
        return self.settings.base_url

    @property
    def api_version(self) -> str:
        """``v4`` or ``2026-03``: selects the base path of every request."""
        return self.settings.api_version

    @property
    def api_base_path(self) -> str:
        """``/communication-preferences/<api_version>``."""
        return f"/communication-preferences/{self.api_version}"

    @property
    def batch_size(self) -> int:
        """Default inputs per request."""
        return self.settings.batch_size

    @property
    def max_retries(self) -> int:
        """Retries per request for transient failures."""
        return self.settings.max_retries

    @property
    def timeout(self) -> tuple[float, float]:
        """``(connect, read)`` timeouts in seconds; :attr:`settings` ``.deadline_s`` bounds the whole request."""
        return (self.settings.connect_timeout, self.settings.read_timeout)

    @property
    def portal_timezone(self) -> ZoneInfo:
        """Time zone of the HubSpot account; its midnight resets the ``DAILY`` limit."""
        return self.settings.portal_timezone

    # ------------------------------------------------------------------ session and transport

    def get_conn(self) -> requests.Session:
        """Return the hook's one pooled :class:`requests.Session` (settings are checked first).

        The session carries no credentials: the transport adds the bearer token to each request it
        sends. Use :meth:`request` rather than the session, so that redirects, deadlines, caps and
        redaction apply.
        """
        settings = self.settings
        with self._session_lock:
            if self._session is None:
                session = requests.Session()
                session.headers.update({"Accept": "application/json", "User-Agent": "hubspot-provider"})
                adapter = DeadlineAdapter(pool_maxsize=max(10, self.max_concurrency), max_retries=0)
                session.mount("http://", adapter)
                session.mount("https://", adapter)
                session.trust_env = settings.base_url.startswith("https://")
                self._session = session
            return self._session

    def close(self) -> None:
        """Close the pooled session (connections are also released when the hook is garbage-collected)."""
        with self._session_lock:
            if self._session is not None:
                self._session.close()
                self._session = None

    @cached_property
    def _transport(self) -> Transport:
        settings = self.settings
        return Transport(
            conn_id=self.hubspot_conn_id, base_url=settings.base_url, session=self.get_conn,
            auth=Auth(token=self._access_token, refresh=self._refresh_if_current if settings.oauth else None),
            pacer=self.pacer, redact=self.redact, log=self.log, connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout, deadline_s=settings.deadline_s, max_retries=settings.max_retries,
            retry_budget_s=self.retry_budget_s, max_wait_s=self.max_wait_s,
            max_response_bytes=settings.max_response_bytes, portal_timezone=settings.portal_timezone,
        )

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
    ) -> HubSpotResponse:
        """Send one request to HubSpot's API under the hook's rules and return the whole answer.

        Auth, pacing, a total deadline, no redirects, a size cap, retries of transient failures and
        redaction all apply; a 4xx raises the matching :class:`~hubspot_provider.exceptions.HubSpotError`.

        .. code-block:: python

            answer = hook.request("GET", "/communication-preferences/v4/definitions")
            print(answer.json()["results"][0]["name"])

        :param method: HTTP method.
        :param path: path on the API host, starting with ``/``.
        :param json: JSON body, if any.
        :param params: query parameters.
        """
        if not path.startswith("/"):
            raise HubSpotConfigError(f"path {path[:80]!r} must start with '/' (it is joined to the connection's host)")
        return self._transport.call(method.upper(), path, Stats(), json_body=json, params=params)

    # ------------------------------------------------------------------ auth

    def _access_token(self) -> tuple[str, int]:
        settings = self.settings
        if settings.oauth is None:
            assert settings.static_token is not None
            return settings.static_token.get(), 0
        with self._token_lock:
            if self._oauth_token is None or time.monotonic() >= self._oauth_expires_at:
                self._refresh_oauth_token()
            assert self._oauth_token is not None
            return self._oauth_token.get(), self._token_generation

    def _refresh_if_current(self, generation: int) -> None:
        # Threads that saw a 401 with the same token share one refresh.
        with self._token_lock:
            if generation == self._token_generation:
                self._refresh_oauth_token()

    def _refresh_oauth_token(self) -> None:
        settings = self.settings
        assert settings.oauth is not None
        client_id, secret, configured_refresh = settings.oauth
        refresh = self._refresh_token or configured_refresh
        what = f"OAuth token refresh for connection {self.hubspot_conn_id!r}"
        # Redirects, deadlines and caps apply here too: a redirect must never carry the client secret.
        answer = self._transport.call(
            "POST", settings.oauth_token_path, Stats(), authorize=False, raw_4xx=True,
            form={"grant_type": "refresh_token", "client_id": client_id, "client_secret": secret.get(),
                  "refresh_token": refresh.get()},
        )
        try:
            body = answer.json()
        except HubSpotResponseError:
            body = {}
        body = body if isinstance(body, dict) else {}
        if answer.status_code != 200:
            detail = body.get("error_description") or body.get("message") or "no detail"
            raise self.redact.scrub(HubSpotAuthError(
                f"{what} failed with HTTP {answer.status_code} ({body.get('status') or body.get('error') or 'error'}: "
                f"{(self.redact(str(detail)) or '')[:300]}); check client_id, client_secret and refresh_token",
                status_code=answer.status_code,
                correlation_id=body["correlationId"] if isinstance(body.get("correlationId"), str) else None,
            ))
        token = body.get("access_token")
        if not token or not isinstance(token, str):
            raise HubSpotAuthError(f"{what} returned no access_token")
        self.redact.add(token)
        try:
            expires_in = float(body.get("expires_in") or 1800)
        except (TypeError, ValueError):
            expires_in = 1800.0
        # Renew a little before expiry so no request goes out with a token about to lapse.
        self._oauth_token = Secret(token)
        self._token_generation += 1
        self._oauth_expires_at = time.monotonic() + expires_in - min(300.0, expires_in * 0.1)
        new_refresh = body.get("refresh_token")
        if isinstance(new_refresh, str) and new_refresh and new_refresh != refresh.get():
            self.redact.add(new_refresh)
            self._refresh_token = Secret(new_refresh)
        self.log.info("Refreshed the HubSpot OAuth access token (valid %.0fs)", expires_in)

    # ------------------------------------------------------------------ simple endpoints

    def _parse(self, model: Any, answer: HubSpotResponse) -> Any:
        try:
            return model.model_validate_json(answer.content)
        except ValidationError as exc:
            raise self.redact.scrub(HubSpotResponseError(
                f"HubSpot's answer (HTTP {answer.status_code}) is not a {model.__name__}: "
                f"{describe_validation_error(exc)}",
                status_code=answer.status_code, correlation_id=answer.correlation_id,
            )) from None

    def batch_write_statuses(self, inputs: Iterable[Mapping[str, Any] | PublicStatusRequest]) -> BatchResponsePublicStatus:
        """Send one ``statuses/batch/write`` request with ``inputs`` (validated first) and return the response.

        Retries transient failures. Raises :class:`ValueError` naming the bad input when one fails
        validation, :class:`HubSpotRequestError` when HubSpot rejects the whole batch (400),
        :class:`HubSpotResponseError` when the answer cannot be read. The response is returned as
        HubSpot sent it, unverified: for verified per-input outcomes use :meth:`write_statuses`.
        """
        wires = []
        for position, value in enumerate(inputs):
            try:
                wires.append(self.validate(value).to_wire())
            except ValidationError as exc:
                raise ValueError(f"input {position} is invalid: {describe_validation_error(exc)}") from None
        answer = self._transport.call(
            "POST", f"{self.api_base_path}/statuses/batch/write", Stats(), json_body={"inputs": wires},
            scopes=WRITE_SCOPE,
        )
        return self._parse(BatchResponsePublicStatus, answer)

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
        answer = self._transport.call(
            "POST", f"{self.api_base_path}/statuses/batch/read", Stats(), json_body={"inputs": list(emails)},
            params=params, scopes=READ_SCOPE,
        )
        return self._parse(BatchResponsePublicStatusBulkResponse, answer)

    def _read_batches(self, path: str, emails: Iterable[str], model: Any, stats: Stats, channel: str) -> list[Any]:
        """Read ``emails`` in batches of ``batch_size`` (in parallel, paced, retried); parsed answers."""
        unique = list(dict.fromkeys(e.strip().lower() for e in emails if isinstance(e, str) and e.strip()))
        size = self.batch_size
        chunks = [unique[i:i + size] for i in range(0, len(unique), size)]
        if not chunks:
            return []

        def read(chunk: list[str]) -> Any:
            answer = self._transport.call(
                "POST", f"{self.api_base_path}/{path}", stats, json_body={"inputs": chunk},
                params={"channel": channel}, scopes=READ_SCOPE,
            )
            return self._parse(model, answer)

        if len(chunks) == 1:
            return [read(chunks[0])]
        with ThreadPoolExecutor(max_workers=min(self.concurrency(), len(chunks)),
                                thread_name_prefix="hubspot-read") as pool:
            return list(pool.map(read, chunks))

    def read_statuses(
        self, emails: Iterable[str], *, channel: str = "EMAIL", stats: Stats | None = None
    ) -> dict[str, dict[int, PublicStatus]]:
        """HubSpot's current subscription statuses of many contacts: ``{email (lower-case):
        {subscription id: PublicStatus}}``, read with ``statuses/batch/read`` in batches of
        ``batch_size``, paced and retried. A contact HubSpot holds no status for maps to ``{}``; an
        address HubSpot rejects (or a batch HubSpot does not report ``COMPLETE``) is left out, so
        a contact missing from the answer is one whose statuses are unknown.

        .. code-block:: python

            current = hook.read_statuses(["ada@example.com"])
            print(current["ada@example.com"].get(1001))
        """
        found: dict[str, dict[int, PublicStatus]] = {}
        for answer in self._read_batches("statuses/batch/read", emails, BatchResponsePublicStatusBulkResponse,
                                         stats or Stats(), channel):
            if _enum_value(answer.status) != "COMPLETE":
                continue
            for contact in answer.results:
                email = (contact.subscriber_id_string or "").lower()
                statuses = found.setdefault(email, {})
                for status in contact.statuses:
                    if status.subscription_id is not None:
                        statuses[status.subscription_id] = status
        return found

    def read_unsubscribe_all(
        self, emails: Iterable[str], *, channel: str = "EMAIL", stats: Stats | None = None,
        answered: set[str] | None = None,
    ) -> dict[str, PublicWideStatus]:
        """Which of ``emails`` opted out of all email (``statuses/batch/unsubscribe-all/read``, batched,
        paced, retried): ``{email (lower-case): PublicWideStatus}`` for those whose wide status is
        ``UNSUBSCRIBED`` (the newest, when HubSpot holds several, e.g. per business unit); the others
        are left out. ``answered``, when given, receives every contact HubSpot answered for."""
        found: dict[str, PublicWideStatus] = {}
        for answer in self._read_batches("statuses/batch/unsubscribe-all/read", emails,
                                         BatchResponsePublicWideStatusBulkResponse, stats or Stats(), channel):
            if _enum_value(answer.status) != "COMPLETE":
                continue
            for contact in answer.results:
                if answered is not None and contact.subscriber_id_string:
                    answered.add(contact.subscriber_id_string.lower())
                for wide in contact.wide_statuses:
                    if _enum_value(wide.status) != "UNSUBSCRIBED":
                        continue
                    email = (wide.subscriber_id_string or contact.subscriber_id_string or "").lower()
                    known = found.get(email)
                    if known is None or _newer(wide.timestamp, known.timestamp):
                        found[email] = wide
        return found

    def check_hubspot_changes(
        self,
        items: Sequence[tuple[Mapping[str, Any], datetime | None]],
        policy: str = DEFAULT_POLICY,
        *,
        own: OwnWrites | None = None,
        read_all: bool = False,
        stats: Stats | None = None,
    ) -> list[Verdict | None]:
        """The ``hubspot_changes`` policy's verdict for each ``(wire input, occurredAt)``.

        Reads HubSpot's current statuses (and opt-outs from all email) only for inputs that could
        (re)subscribe, or for all of them with ``read_all`` (a dry run's plan). ``None`` for an input
        that needed no read. See :mod:`hubspot_provider.hooks._guard` for how HubSpot-side changes are
        told from this provider's own writes.

        .. code-block:: python

            verdicts = hook.check_hubspot_changes([(wire, occurred_at)], "respect_opt_outs")
            withheld = [v for v in verdicts if v is not None and v.action == "withhold"]
        """
        policy = check_policy(policy)
        own = own or OwnWrites()
        wanted = [read_all or needs_read(wire, policy) for wire, _ in items]
        emails = [str(wire.get("subscriberIdString", "")) for (wire, _), need in zip(items, wanted) if need]
        if not emails:
            return [None] * len(items)
        stats = stats or Stats()
        statuses = self.read_statuses(emails, stats=stats)
        wide_answered: set[str] = set()
        wides = self.read_unsubscribe_all(emails, stats=stats, answered=wide_answered)

        def current_of(wire: Mapping[str, Any]) -> tuple[Any, Any]:
            email = str(wire.get("subscriberIdString", "")).lower()
            return statuses.get(email, {}).get(wire.get("subscriptionId")), wides.get(email)

        # Which current statuses could this provider have written? Only those the ledger must explain.
        candidates = set()
        for (wire, _), need in zip(items, wanted):
            if need:
                sub, wide = current_of(wire)
                if sub is not None and sub.source in own.sources and sub.subscriber_id_string:
                    candidates.add((sub.subscriber_id_string.lower(), sub.subscription_id,
                                    _enum_value(sub.status), as_text(sub.timestamp)))
                if wide is not None:
                    candidates.add((str(wide.subscriber_id_string or "").lower(), None, "UNSUBSCRIBED",
                                    as_text(wide.timestamp)))
        explained = own.explained(sorted(candidates, key=str)) if own.ledger is not None else None

        verdicts: list[Verdict | None] = []
        for (wire, occurred_at), need in zip(items, wanted):
            if not need:
                verdicts.append(None)
                continue
            email = str(wire.get("subscriberIdString", "")).lower()
            if email not in statuses or email not in wide_answered:
                # HubSpot's answer left this contact out (an error, a batch not COMPLETE): what it holds
                # is unknown, and writing blind could undo an opt-out. Not sent; a retry reads again.
                verdicts.append(Verdict(
                    UNKNOWN, None, f"?→{wire.get('statusState')}", CURRENT_STATUS_UNREAD,
                    "HubSpot's read of this contact's current statuses returned no answer for it, so "
                    f"hubspot_changes={policy} could not check for a newer change made in HubSpot; not sent. "
                    "Retryable: replay the dead letters",
                ))
                continue
            sub, wide = current_of(wire)
            current_sub = current_wide = None
            if sub is not None:
                key = ((sub.subscriber_id_string or email).lower(), sub.subscription_id, _enum_value(sub.status),
                       as_text(sub.timestamp))
                own_write = sub.source in own.sources and (explained is None or key in explained)
                current_sub = Current(_enum_value(sub.status), _as_datetime(sub.timestamp), sub.source,
                                      hubspot_side=not own_write)
            if wide is not None:
                email = str(wide.subscriber_id_string or "").lower()
                stamp = as_text(wide.timestamp)
                if email in own.opted_out_of_all:
                    own_wide = True  # this run's own opt-out from all email
                elif explained is not None:
                    own_wide = (email, None, "UNSUBSCRIBED", stamp) in explained
                else:
                    # An opt-out from all email carries no source; HubSpot stamps the contact's
                    # subscriptions with it. Stamped the same instant by this provider's source: its own.
                    own_wide = any(s.source in own.sources and as_text(s.timestamp) == stamp
                                   for s in statuses.get(email, {}).values())
                current_wide = Current("UNSUBSCRIBED", _as_datetime(wide.timestamp), None,
                                       hubspot_side=not own_wide, wide=True)
            verdicts.append(decide(wire, occurred_at, current_sub, current_wide, policy))
        return verdicts

    def get_subscription_definitions(self, *, business_unit_id: int | None = None) -> list[SubscriptionDefinition]:
        """Return the portal's subscription types (the ids ``subscriptionId`` refers to)."""
        params = {"businessUnitId": business_unit_id} if business_unit_id is not None else None
        answer = self._transport.call(
            "GET", f"{self.api_base_path}/definitions", Stats(), params=params, scopes=DEFINITIONS_SCOPE
        )
        return self._parse(ActionResponseWithResultsSubscriptionDefinition, answer).results

    def test_connection(self) -> tuple[bool, str]:
        """Check every setting, then list subscription definitions (Airflow's ``(ok, message)`` convention).

        Needs ``communication_preferences.read`` or ``.read_write``; writing needs
        ``communication_preferences.statuses.batch.write`` besides (see :data:`SCOPES`). The message
        is written for the connection form: it names the connection being tested (Airflow's test
        endpoint tests a copy under a random id) and the form's *Access token* field.
        """
        try:
            definitions = self.get_subscription_definitions()
        except Exception as exc:  # noqa: BLE001 - the UI shows the message
            return False, self._for_the_form(self.redact(str(exc)) or type(exc).__name__)
        settings = self.settings
        return True, (
            f"Connected to HubSpot at {settings.base_url} ({settings.api_version}, portal time zone "
            f"{settings.portal_timezone.key}): {len(definitions)} subscription definitions. "
            f"Writing statuses also needs the scope {WRITE_SCOPE}"
        )

    def _for_the_form(self, message: str) -> str:
        from hubspot_provider._connection_form import tested_connection_id

        tested = tested_connection_id.get()
        if tested and tested != self.hubspot_conn_id:
            message = message.replace(repr(self.hubspot_conn_id), repr(tested))
        # The form labels the password field "Access token"; the CLI and JSON call it password.
        for said in ("in the connection's password", "in the password"):
            message = message.replace(said, "in the Access token field (the connection's password)")
        return message

    # ------------------------------------------------------------------ the workhorse

    def validate(self, value: Mapping[str, Any] | PublicStatusRequest) -> PublicStatusRequest:
        """Check one input as HubSpot would (and as this hook's ``require_legal_basis`` asks).

        Raises pydantic's ``ValidationError``; :func:`~hubspot_provider.models.describe_validation_error`
        turns it into the one-line message dead letters carry.
        """
        context = {"require_legal_basis": True} if self.require_legal_basis else None
        if isinstance(value, PublicStatusRequest):
            return PublicStatusRequest.model_validate(value.model_dump(), context=context) if context else value
        return PublicStatusRequest.model_validate(value, context=context)

    def _already_validated(self, value: Any) -> Any:
        # The validate step wrote exactly PublicStatusRequest.to_wire(); anything else is checked again.
        if (
            type(value) is dict and type(value.get("subscriberIdString")) is str
            and type(value.get("subscriptionId")) is int and value.get("channel") == "EMAIL"
            and type(value.get("statusState")) is str and value.keys() <= _WIRE_KEYS
            and (not self.require_legal_basis or ("legalBasis" in value and "legalBasisExplanation" in value))
        ):
            return _Validated(value)
        return self.validate(value)

    def write_statuses(
        self,
        inputs: Iterable[Mapping[str, Any] | PublicStatusRequest],
        *,
        batch_size: int | None = None,
        on_failed: Callable[[FailedInput], None] | None = None,
        keep_failed: bool = True,
        on_outcome: Callable[[InputOutcome], None] | None = None,
        validated: bool = False,
    ) -> WriteReport:
        """Write subscription statuses, in batches, and account for every input.

        * Each input is validated (:meth:`validate`); a bad one is reported as ``INVALID_INPUT`` with
          the field and the fix, never sent, never fatal.
        * Inputs are streamed into batches of ``batch_size``; memory stays flat in the input count.
          Within a batch being filled, a later input for the same (subscriber, subscription,
          channel) supersedes the earlier; batches touching the same key are sent in order, so
          the last input always wins.
        * An input succeeds only when HubSpot's answer holds a result for its key in the requested
          state; a contradicting or unreadable answer fails it as ``UNCONFIRMED`` (retryable).
        * HubSpot's per-item errors are mapped back to their inputs. A whole-batch 400 carrying
          HubSpot's JSON error is bisected until the offending inputs are isolated; the rest still land.
        * Requests are paced under HubSpot's rolling limit; 429 rolling, 5xx, deadlines and dropped
          connections are retried with backoff and jitter, within the retry budget.

        Raises :class:`HubSpotAuthError`/:class:`HubSpotScopeError` at once on 401/403,
        :class:`HubSpotDailyLimitError` on the ``DAILY`` limit, :class:`HubSpotRateLimitError` when
        HubSpot asks for a wait over ``max_wait_s``, :class:`HubSpotRequestError` on a redirect or an
        answer that is not HubSpot's, and :class:`HubSpotUnavailableError` when retries run out. Each
        carries ``partial_report`` (the inputs accounted for before the stop; the rest were not
        acknowledged, and re-sending them is safe).

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
        :param on_outcome: called with an :class:`~hubspot_provider.results.InputOutcome` for every input
            that was sent, succeeded or failed: when, in how many attempts, and what HubSpot answered
            (the operator's ledger is built from these).
        :param validated: the inputs are wire dicts this hook's :meth:`validate` already produced (a
            validate step ran before): they are sent as they are, not validated again. One that is
            not in wire form is still validated, so nothing unchecked goes out by mistake.
        """
        size = batch_size or self.batch_size  # checks every setting before any input is read
        if not 1 <= size <= 1000:
            raise HubSpotConfigError(f"batch_size must be between 1 and 1000, got {size}")
        writer = BatchWriter(
            transport=self._transport, path=f"{self.api_base_path}/statuses/batch/write",
            validate=self._already_validated if validated else self.validate,
            max_concurrency=self.max_concurrency, concurrency=self.concurrency, redact=self.redact, log=self.log,
        )
        return writer.write(inputs, batch_size=size, on_failed=on_failed, keep_failed=keep_failed,
                            on_outcome=on_outcome)

    def _unsubscribe_all_input(self, value: Any) -> UnsubscribeAllRequest:
        if isinstance(value, str):
            value = {"subscriberIdString": value, "statusState": UNSUBSCRIBE_ALL}
        elif isinstance(value, Mapping) and "statusState" not in value and "status_state" not in value:
            value = {**value, "statusState": UNSUBSCRIBE_ALL}
        if isinstance(value, UnsubscribeAllRequest):
            value = value.model_dump()
        context = {"require_legal_basis": True} if self.require_legal_basis else None
        # A statusState other than UNSUBSCRIBE_ALL fails here, naming the field: never sent as an opt-out.
        return UnsubscribeAllRequest.model_validate(value, context=context)

    def unsubscribe_all(
        self,
        inputs: Iterable[str | Mapping[str, Any] | UnsubscribeAllRequest],
        *,
        batch_size: int | None = None,
        on_failed: Callable[[FailedInput], None] | None = None,
        keep_failed: bool = True,
        on_outcome: Callable[[InputOutcome], None] | None = None,
    ) -> WriteReport:
        """Opt contacts out of all email (``statuses/batch/unsubscribe-all``), batched, paced, retried
        and accounted for exactly like :meth:`write_statuses`.

        Each input is an email, or a dict with ``subscriberIdString`` (and optionally ``legalBasis``
        and ``legalBasisExplanation``, kept for the ledger; HubSpot's request takes only the email).
        An input succeeds when HubSpot's answer (``verbose=true``) lists the contact with every status
        ``UNSUBSCRIBED``. Needs the scope ``communication_preferences.statuses.batch.write``.

        .. code-block:: python

            report = hook.unsubscribe_all(["ada@example.com", "bob@example.com"])
        """
        size = batch_size or self.batch_size
        if not 1 <= size <= 1000:
            raise HubSpotConfigError(f"batch_size must be between 1 and 1000, got {size}")
        writer = UnsubscribeAllWriter(
            transport=self._transport, path=f"{self.api_base_path}/statuses/batch/unsubscribe-all",
            validate=self._unsubscribe_all_input, max_concurrency=self.max_concurrency,
            concurrency=self.concurrency, redact=self.redact,
            log=self.log,
        )
        return writer.write(inputs, batch_size=size, on_failed=on_failed, keep_failed=keep_failed,
                            on_outcome=on_outcome)


def _enum_value(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value


def _as_datetime(value: Any) -> datetime | None:
    if not isinstance(value, datetime):
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)  # naive: UTC


def _newer(a: Any, b: Any) -> bool:
    a, b = _as_datetime(a), _as_datetime(b)
    return b is None or (a is not None and a > b)
