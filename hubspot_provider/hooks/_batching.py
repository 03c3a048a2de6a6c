"""The batching engine behind :meth:`HubSpotHook.write_statuses`: dedupe, per-key ordering,
bisection of rejected batches, and verification of every outcome against what was sent.

An input counts as succeeded only when HubSpot's answer holds a result *for that key* in the
*requested* state, inside a batch HubSpot reports ``COMPLETE``. Anything else is a failure with a
category and HubSpot's words: a contradicting status, a batch ``CANCELED`` or ``PENDING``, an answer
that cannot be read are ``UNCONFIRMED`` (retryable); results for keys never sent are counted apart
and never credited to anything.
"""

from __future__ import annotations

import json
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from typing import Any

from pydantic import BaseModel, ValidationError

from hubspot_provider.exceptions import HubSpotError, HubSpotResponseError
from hubspot_provider.hooks._transport import HubSpotResponse, Redactor, Stats, Transport
from hubspot_provider.models import (
    BatchResponsePublicBulkOptOutFromAllResponse,
    BatchResponsePublicStatus,
    PublicStatus,
    PublicStatusRequest,
    StandardError,
    StatusKey,
    describe_validation_error,
)
from hubspot_provider.results import (
    INVALID_INPUT,
    NO_RESULT,
    RETRYABLE_CATEGORIES,
    UNCONFIRMED,
    UNMAPPED_ERROR,
    FailedInput,
    InputOutcome,
    WriteReport,
)

__all__ = ["BatchWriter", "UnsubscribeAllWriter", "WRITE_SCOPE"]

WRITE_SCOPE = "communication_preferences.statuses.batch.write"
# A batch answer proves its results only when HubSpot says the batch completed.
_COMPLETE = {"COMPLETE"}


def _cut(redact: Redactor, value: Any, limit: int) -> str:
    """HubSpot's words, redacted first and only then cut: a cut email or secret no longer matches."""
    return (redact(str(value)) or "")[:limit]


def _value(member: Any) -> Any:
    return member.value if isinstance(member, Enum) else member


@dataclass
class _Item:
    index: int
    key: StatusKey
    wire: dict[str, Any]


@dataclass
class _Sent:
    at: Any
    attempts: int | None
    correlation_id: str | None


@dataclass
class _BatchResult:
    # Each outcome with the send that decided it (the ledger's "when, how many attempts, which answer").
    succeeded: list[tuple[_Item, PublicStatus, _Sent]] = field(default_factory=list)
    failed: list[tuple[FailedInput, _Sent | None]] = field(default_factory=list)
    unrequested: int = 0

    def extend(self, other: _BatchResult) -> _BatchResult:
        self.succeeded.extend(other.succeeded)
        self.failed.extend(other.failed)
        self.unrequested += other.unrequested
        return self


def as_dict(value: Any) -> dict[str, Any]:
    """An input as given, JSON-safe, for its dead letter."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", by_alias=True, exclude_none=True)
    if isinstance(value, Mapping):
        return json.loads(json.dumps({str(k): v for k, v in value.items()}, default=str))
    return {"value": repr(value)[:200]}


class BatchWriter:
    """Streams inputs into batches, sends them concurrently through a :class:`Transport`, and
    accounts for every input. See :meth:`HubSpotHook.write_statuses` for the contract."""

    response_model: type[BaseModel] = BatchResponsePublicStatus
    params: dict[str, Any] | None = None

    def __init__(
        self,
        *,
        transport: Transport,
        path: str,
        validate: Callable[[Any], PublicStatusRequest],
        max_concurrency: int,
        redact: Redactor,
        log: Any,
        concurrency: Callable[[], int] | None = None,
    ) -> None:
        self.transport = transport
        self.path = path
        self.validate = validate
        self.max_concurrency = max_concurrency  # threads
        # Batches in flight now (at most the threads): it may grow once the limit and latency are known.
        self.concurrency = concurrency or (lambda: max_concurrency)
        self.redact = redact
        self.log = log

    def write(
        self,
        inputs: Iterable[Any],
        *,
        batch_size: int,
        on_failed: Callable[[FailedInput], None] | None,
        keep_failed: bool,
        on_outcome: Callable[[InputOutcome], None] | None = None,
    ) -> WriteReport:
        started = time.monotonic()
        report = WriteReport()
        stats = Stats()

        def fail(failure: FailedInput) -> None:
            report.add_failure(failure, keep=keep_failed)
            if on_failed is not None:
                on_failed(failure)

        def absorb(result: _BatchResult) -> None:
            report.batches += 1
            report.unrequested_results += result.unrequested
            for item, status, sent in result.succeeded:
                report.add_success(_value(status.set_status_success_reason))
                if on_outcome is not None:
                    on_outcome(InputOutcome(item.index, item.wire, sent.at, sent.attempts, sent.correlation_id,
                                            result=status))
            for failure, sent in result.failed:
                fail(failure)
                if on_outcome is not None and sent is not None:
                    on_outcome(InputOutcome(failure.index or 0, failure.input, sent.at, sent.attempts,
                                            sent.correlation_id, failure=failure))

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
            while len(in_flight) >= min(self.max_concurrency, self.concurrency()):
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
                        request = self.validate(value)
                    except ValidationError as exc:
                        fail(FailedInput(index=index, input=as_dict(value), category=INVALID_INPUT,
                                         message=describe_validation_error(exc), retryable=False))
                        continue
                    item = _Item(index=index, key=request.key, wire=request.to_wire())
                    if pending.pop(item.key, None) is not None:
                        report.add_superseded()
                    pending[item.key] = item
                    if len(pending) >= batch_size:
                        dispatch(pending, pool)
                        if interruption is not None:
                            break
                if pending and interruption is None:
                    dispatch(pending, pool)
            finally:
                if in_flight:
                    collect(wait(list(in_flight)).done)

        report.requests, report.retries, report.rate_limited = stats.requests, stats.retries, stats.rate_limited
        report.elapsed_s = round(time.monotonic() - started, 3)
        if report.unrequested_results:
            self.log.warning(
                "HubSpot returned %d result(s) for statuses no batch sent; none was counted as a success",
                report.unrequested_results,
            )
        if interruption is not None:
            self.log.warning("HubSpot write interrupted after %s", report.summary())
            interruption.partial_report = report
            raise interruption
        self.log.info("HubSpot write: %s", report.summary())
        return report

    # ------------------------------------------------------------------ one batch

    def _write_batch(self, items: list[_Item], stats: Stats, earlier: _Sent | None = None) -> _BatchResult:
        """Send one batch; on HubSpot's whole-batch 400, bisect to isolate the inputs it rejects.

        ``earlier`` is the send of the larger batch this one was split from (its time and attempts count).
        """
        started = datetime.now(timezone.utc)
        try:
            answer = self.transport.call(
                "POST", self.path, stats, json_body=self._body(items), params=self.params,
                accept_400=True, scopes=WRITE_SCOPE,
            )
        except HubSpotResponseError as exc:
            sent = _Sent(earlier.at if earlier else started, None, self.redact(exc.correlation_id))
            return self._unconfirmed(items, str(exc), sent)
        sent = _Sent(
            earlier.at if earlier else answer.sent_at,
            answer.attempts + ((earlier.attempts or 0) if earlier else 0),
            self.redact(answer.correlation_id),
        )
        if answer.status_code == 400:
            return self._rejected(items, answer, stats, sent)
        try:
            parsed = self.response_model.model_validate_json(answer.content)
        except ValidationError as exc:
            return self._unconfirmed(
                items,
                f"HubSpot's answer (HTTP {answer.status_code}) is not a batch response "
                f"({describe_validation_error(exc)}); re-sending is safe",
                sent,
            )
        return self._verify(items, parsed, sent)

    def _body(self, items: list[_Item]) -> dict[str, Any]:
        return {"inputs": [item.wire for item in items]}

    def _rejected(self, items: list[_Item], answer: HubSpotResponse, stats: Stats, sent: _Sent) -> _BatchResult:
        error = answer.hubspot_error()
        assert error is not None  # the transport returns only HubSpot's own 400s
        correlation_id = self.redact(error.correlation_id or answer.correlation_id)
        if len(items) == 1:
            item = items[0]
            return _BatchResult(failed=[(FailedInput(
                index=item.index, input=item.wire, category=self.redact(error.category) or "VALIDATION_ERROR",
                message=self.redact(f"HubSpot rejected this input: {error.message or 'HTTP 400'}"),
                retryable=False, correlation_id=correlation_id), sent)])
        self.log.info("HubSpot rejected a batch of %d (400); splitting it to isolate the bad input(s)", len(items))
        middle = len(items) // 2
        return self._write_batch(items[:middle], stats, sent).extend(self._write_batch(items[middle:], stats, sent))

    def _unconfirmed(self, items: list[_Item], message: str, sent: _Sent) -> _BatchResult:
        return _BatchResult(failed=[
            (FailedInput(index=item.index, input=item.wire, category=UNCONFIRMED, message=self.redact(message),
                         retryable=True, correlation_id=sent.correlation_id), sent)
            for item in items
        ])

    # ------------------------------------------------------------------ verifying the answer

    def _verify(self, items: list[_Item], parsed: Any, sent: _Sent) -> _BatchResult:
        batch_status = _value(parsed.status)
        if batch_status not in _COMPLETE:
            return self._unconfirmed(
                items,
                f"HubSpot reported the batch {_cut(self.redact, batch_status, 40)}, not COMPLETE, so none of its writes is "
                "confirmed; re-sending is safe",
                sent,
            )
        remaining: dict[StatusKey, _Item] = {item.key: item for item in items}
        result = _BatchResult()
        self._check_results(parsed, remaining, result, sent)
        self._map_errors(parsed, remaining, result, sent, batch_status)
        return result

    def _check_results(
        self, parsed: BatchResponsePublicStatus, remaining: dict[StatusKey, _Item], result: _BatchResult, sent: _Sent
    ) -> None:
        for status in parsed.results:
            item = remaining.pop(status.key, None) if status.key is not None else None
            if item is None:
                result.unrequested += 1
                continue
            reason = _value(status.set_status_success_reason)
            got, wanted = _value(status.status), item.wire["statusState"]
            if got == wanted:
                result.succeeded.append((item, status, sent))
                continue
            result.failed.append((self._contradicted(item, got, wanted, reason, status.source, sent), sent))

    def _contradicted(self, item: _Item, got: Any, wanted: Any, reason: Any, source: Any, sent: _Sent) -> FailedInput:
        return FailedInput(
            index=item.index, input=item.wire, category=UNCONFIRMED,
            message=self.redact(
                f"HubSpot answered status {_cut(self.redact, got, 40)} for this subscription, not the requested "
                f"{wanted} (setStatusSuccessReason {_cut(self.redact, reason, 60)}, source "
                f"{_cut(self.redact, source, 60)}); the write is "
                "not confirmed. Check the contact in HubSpot, then replay"
            ),
            retryable=True, correlation_id=sent.correlation_id)

    def _map_errors(
        self, parsed: Any, remaining: dict[StatusKey, _Item], result: _BatchResult, sent: _Sent, batch_status: Any
    ) -> None:
        correlation_id = sent.correlation_id
        unmapped: list[StandardError] = []
        for error in parsed.errors:
            keys = [k for k in _error_keys(error, remaining) if k in remaining]
            if not keys:
                unmapped.append(error)
            for key in keys:
                item = remaining.pop(key)
                category = self.redact(error.category) or "UNKNOWN"
                result.failed.append((FailedInput(
                    index=item.index, input=item.wire, category=category,
                    message=self.redact(error.message or f"HubSpot reported {category} for this input"),
                    retryable=category in RETRYABLE_CATEGORIES, correlation_id=correlation_id), sent))
        for item in remaining.values():
            if unmapped:
                categories = sorted({e.category or "UNKNOWN" for e in unmapped})
                messages = "; ".join(_cut(self.redact, e.message or "", 200) for e in unmapped[:3])
                failure = FailedInput(
                    index=item.index, input=item.wire,
                    category=self.redact(categories[0]) if len(categories) == 1 else UNMAPPED_ERROR,
                    message=self.redact(
                        f"HubSpot returned no result for this input and {len(unmapped)} error(s) it did not "
                        f"tie to an input: {messages}"),
                    retryable=True, correlation_id=correlation_id)
            else:
                failure = FailedInput(
                    index=item.index, input=item.wire, category=NO_RESULT,
                    message=f"HubSpot's response (batch {_cut(self.redact, batch_status, 40)}) had no result or error for this "
                    "input; re-sending it is safe",
                    retryable=True, correlation_id=correlation_id)
            result.failed.append((failure, sent))


class UnsubscribeAllWriter(BatchWriter):
    """``statuses/batch/unsubscribe-all``: each input opts one contact out of all email.

    Sent with ``verbose=true``, so HubSpot's answer lists the contact's statuses after the opt-out. An
    input succeeds when the batch is ``COMPLETE`` and holds a result for its email whose statuses are
    all ``UNSUBSCRIBED``; its outcome's result is one status standing for the contact-wide opt-out
    (no subscription; HubSpot's latest timestamp and source among the statuses).
    """

    response_model = BatchResponsePublicBulkOptOutFromAllResponse
    params = {"channel": "EMAIL", "verbose": "true"}

    def _body(self, items: list[_Item]) -> dict[str, Any]:
        return {"inputs": [item.wire["subscriberIdString"] for item in items]}

    def _check_results(
        self, parsed: Any, remaining: dict[StatusKey, _Item], result: _BatchResult, sent: _Sent
    ) -> None:
        for contact in parsed.results:
            email = (contact.subscriber_id_string or "").lower()
            item = remaining.pop((email, None, "EMAIL"), None)
            if item is None:
                result.unrequested += 1
                continue
            others = [s for s in contact.statuses if _value(s.status) != "UNSUBSCRIBED"]
            if others:
                first = others[0]
                result.failed.append((self._contradicted(
                    item, _value(first.status), "UNSUBSCRIBED", _value(first.set_status_success_reason),
                    first.source, sent), sent))
                continue
            latest = max(
                (s for s in contact.statuses if isinstance(s.timestamp, datetime)),
                key=lambda s: s.timestamp, default=None,
            )
            changed = any(_value(s.set_status_success_reason) not in (None, "NO_STATUS_CHANGE")
                          for s in contact.statuses)
            wide = PublicStatus(
                subscriber_id_string=email, channel="EMAIL", status="UNSUBSCRIBED",
                source=latest.source if latest is not None else None,
                timestamp=latest.timestamp if latest is not None else None,
                set_status_success_reason="REQUESTED_CHANGE_OCCURRED" if changed else "NO_STATUS_CHANGE",
            )
            result.succeeded.append((item, wide, sent))


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
        # Whole tokens only: "bob@x.com" must not match "jimbob@x.com", nor id 10 match 10015.
        return [
            key for key in candidates
            if re.search(rf"(?<![\w.+-]){re.escape(key[0])}(?![\w-])", message)
            and (key[1] is None or re.search(rf"(?<!\d){key[1]}(?!\d)", message))
        ]
    return []
