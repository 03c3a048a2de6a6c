"""Errors raised by the HubSpot provider.

One root, :class:`HubSpotError`, so a DAG can catch everything the provider raises. Each message
says what was wrong and what to do; HubSpot's ``correlationId`` travels with the error (quote it to
HubSpot support). No error ever carries a secret or an email address, whatever a server echoed:
the hook redacts every message it raises.

A write interrupted part-way raises with ``partial_report``: the
:class:`~hubspot_provider.results.WriteReport` of every input accounted for before the stop. Inputs
not in it were never acknowledged by HubSpot; writes are idempotent, so re-sending them is safe.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from airflow.sdk.exceptions import AirflowException

if TYPE_CHECKING:
    from hubspot_provider.results import WriteReport


class HubSpotError(AirflowException):
    """Base of every error the provider raises.

    :param message: what went wrong and what to do about it.
    :param status_code: HTTP status HubSpot answered with, when there was a response.
    :param correlation_id: HubSpot's ``correlationId`` for the failing request, when known.
    :param category: HubSpot's error ``category`` (e.g. ``MISSING_SCOPES``), when known.
    :param partial_report: for an interrupted write, the inputs accounted for before the stop.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        correlation_id: str | None = None,
        category: str | None = None,
        partial_report: WriteReport | None = None,
    ) -> None:
        if correlation_id:
            message = f"{message} (HubSpot correlationId {correlation_id})"
        super().__init__(message)
        self.status_code = status_code
        self.correlation_id = correlation_id
        self.category = category
        self.partial_report = partial_report


class HubSpotConfigError(HubSpotError):
    """The connection or a hook argument is unusable (bad host, plain http to a remote host, …)."""


class HubSpotAuthError(HubSpotError):
    """HubSpot refused the credentials (401) or the OAuth refresh failed."""


class HubSpotScopeError(HubSpotAuthError):
    """HubSpot answered 403: the token lacks a scope. ``required_scopes`` lists what it asked for."""

    def __init__(self, message: str, *, required_scopes: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.required_scopes = required_scopes or []


class HubSpotRequestError(HubSpotError):
    """The request could not be answered by HubSpot as sent: a 404 (wrong base path), a redirect (the
    hook never follows one), a 400 that is not HubSpot's JSON error (a proxy or firewall answered).
    Inputs of an interrupted write stay retryable."""


class HubSpotResponseError(HubSpotError):
    """HubSpot's answer could not be trusted: not JSON, not the documented shape, or over the size cap.

    The message names what was wrong, never the answer's text (it may hold personal data). In a
    write, the inputs of such an answer fail as ``UNCONFIRMED`` (retryable) instead.
    """


class HubSpotRateLimitError(HubSpotError):
    """HubSpot asked for a wait longer than the hook may sleep in-process (``max_wait_s``).

    :param reset_at: when requests may resume (aware UTC datetime). An operator can defer until then.
    """

    def __init__(self, message: str, *, reset_at: datetime, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.reset_at = reset_at


class HubSpotDailyLimitError(HubSpotRateLimitError):
    """HubSpot's ``DAILY`` request limit is used up; it is never retried in-process.

    ``reset_at`` is midnight in the portal's time zone, or sooner when HubSpot sent ``Retry-After``.
    """


class HubSpotUnavailableError(HubSpotError):
    """HubSpot stayed unavailable (5xx, rate limits, timeouts, dropped connections) past the retry budget."""
