"""The results model: what happened to every input of a status write.

One home for the accounting: :class:`FailedInput` (one input that did not land, with why) and
:class:`WriteReport` (every input of a write: succeeded, superseded or failed). Reports are
additive, so the reports of several calls (segments, tries) add up to the report of the whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

__all__ = ["FailedInput", "InputOutcome", "WriteReport", "INVALID_INPUT", "NO_RESULT", "UNCONFIRMED", "UNMAPPED_ERROR"]

# Categories the hook assigns itself (HubSpot's own categories pass through unchanged).
INVALID_INPUT = "INVALID_INPUT"
"""Rejected before sending: the input is not a valid status (the message names the field)."""
NO_RESULT = "NO_RESULT"
"""HubSpot's answer held neither a result nor an error for the input."""
UNMAPPED_ERROR = "UNMAPPED_ERROR"
"""HubSpot reported errors it did not tie to an input, and none to this one."""
UNCONFIRMED = "UNCONFIRMED"
"""HubSpot's answer did not prove the write: a contradicting status, a batch not ``COMPLETE``, an
answer that could not be read. Re-sending is safe."""

RETRYABLE_CATEGORIES = frozenset({"RATE_LIMITS", NO_RESULT, UNMAPPED_ERROR, UNCONFIRMED})


class FailedInput(BaseModel):
    """One input that did not land, with why.

    :param index: position of the input in the iterable given to ``write_statuses``.
    :param input: the input, camelCase as sent to HubSpot (or as given, when it failed validation).
    :param category: HubSpot's error category (``VALIDATION_ERROR``, ``OBJECT_NOT_FOUND``, …) or the
        hook's own: ``INVALID_INPUT`` (rejected before sending), ``UNCONFIRMED``, ``NO_RESULT``,
        ``UNMAPPED_ERROR``.
    :param retryable: whether re-sending the same input later may succeed.
    """

    index: int | None = None
    input: dict[str, Any]
    category: str
    message: str
    retryable: bool = False
    correlation_id: str | None = None


@dataclass(slots=True)
class InputOutcome:
    """What happened to one input that was sent to HubSpot: the stuff of an audit record.

    :param index: position of the input in the iterable given to ``write_statuses``.
    :param input: the input as sent (camelCase wire form).
    :param sent_at: when the request that carried it was first sent (aware UTC).
    :param attempts: requests that carried it (retries and bisection included).
    :param correlation_id: HubSpot's ``X-HubSpot-Correlation-Id`` of the answer.
    :param result: HubSpot's confirmed status (a :class:`~hubspot_provider.models.PublicStatus`) when
        it succeeded, else ``None``.
    :param failure: why it failed, when it did.
    """

    index: int
    input: dict[str, Any]
    sent_at: datetime | None
    attempts: int | None
    correlation_id: str | None
    result: Any = None
    failure: FailedInput | None = None

    @property
    def succeeded(self) -> bool:
        return self.failure is None


class WriteReport(BaseModel):
    """What happened to every input of one :meth:`HubSpotHook.write_statuses` call.

    ``succeeded + superseded + failed_count + withheld == submitted`` always holds; ``failed`` lists the
    failed inputs (unless the call was made with ``keep_failed=False``). ``withheld`` counts inputs the
    ``hubspot_changes`` policy kept from HubSpot because a newer change made in HubSpot wins (by
    category in ``withheld_by_category``; they are decisions, not failures, and count against no
    failure ratio); ``reads`` counts the requests made to read HubSpot's current statuses for it. ``reasons`` counts HubSpot's
    ``setStatusSuccessReason`` over the successes (``NO_STATUS_CHANGE`` = already in that state).
    ``unrequested_results`` counts results HubSpot returned for keys the batch never sent (never
    counted as a success of anything).
    """

    submitted: int = 0
    succeeded: int = 0
    superseded: int = 0
    failed_count: int = 0
    failed: list[FailedInput] = Field(default_factory=list)
    reasons: dict[str, int] = Field(default_factory=dict)
    failed_by_category: dict[str, int] = Field(default_factory=dict)
    retryable_failed: int = 0
    withheld: int = 0
    withheld_by_category: dict[str, int] = Field(default_factory=dict)
    reads: int = 0
    unrequested_results: int = 0
    batches: int = 0
    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    elapsed_s: float = 0.0

    @property
    def changed(self) -> int:
        """Successes that changed a status in HubSpot (everything but ``NO_STATUS_CHANGE``)."""
        return self.succeeded - self.reasons.get("NO_STATUS_CHANGE", 0)

    def add_failure(self, failure: FailedInput, *, keep: bool = True) -> None:
        """Count one failed input (and keep it in ``failed`` when ``keep``)."""
        self.submitted += 1
        self.failed_count += 1
        self.failed_by_category[failure.category] = self.failed_by_category.get(failure.category, 0) + 1
        self.retryable_failed += failure.retryable
        if keep:
            self.failed.append(failure)

    def add_success(self, reason: str | None) -> None:
        """Count one input HubSpot confirmed, by its ``setStatusSuccessReason``."""
        self.submitted += 1
        self.succeeded += 1
        name = reason or "UNKNOWN"
        self.reasons[name] = self.reasons.get(name, 0) + 1

    def add_withheld(self, category: str) -> None:
        """Count one input the ``hubspot_changes`` policy withheld (a newer change in HubSpot wins)."""
        self.submitted += 1
        self.withheld += 1
        self.withheld_by_category[category] = self.withheld_by_category.get(category, 0) + 1

    def add_superseded(self) -> None:
        """Count one input replaced by a later input for the same status key."""
        self.submitted += 1
        self.superseded += 1

    def __iadd__(self, other: WriteReport) -> WriteReport:
        for name in ("submitted", "succeeded", "superseded", "failed_count", "retryable_failed", "withheld", "reads",
                     "unrequested_results", "batches", "requests", "retries", "rate_limited"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.elapsed_s = round(self.elapsed_s + other.elapsed_s, 3)
        self.failed.extend(other.failed)
        for mine, theirs in ((self.reasons, other.reasons), (self.failed_by_category, other.failed_by_category),
                             (self.withheld_by_category, other.withheld_by_category)):
            for name, count in theirs.items():
                mine[name] = mine.get(name, 0) + count
        return self

    def summary(self) -> str:
        """One log line of counts (no personal data)."""
        categories = ", ".join(f"{name} {count}" for name, count in sorted(self.failed_by_category.items()))
        return (
            f"{self.submitted} submitted: {self.succeeded} succeeded ({self.changed} changed), "
            f"{self.superseded} superseded, {self.failed_count} failed{f' ({categories})' if categories else ''}"
            f"{f', {self.withheld} withheld by hubspot_changes' if self.withheld else ''}; "
            f"{self.requests} requests, {self.retries} retries, {self.rate_limited} rate-limited, "
            f"{self.elapsed_s:.2f}s"
        )


def categories_in_words(by_category: dict[str, int] | None) -> str:
    """``{"OBJECT_NOT_FOUND": 12, "INVALID_INPUT": 3}`` as ``INVALID_INPUT 3, OBJECT_NOT_FOUND 12``."""
    return ", ".join(f"{name} {count:,}" for name, count in sorted((by_category or {}).items()))


def plan_in_words(plan: dict[str, Any]) -> str:
    """``1,204 would change: 880 SUBSCRIBED→UNSUBSCRIBED, …; 9,310 already so; 12 withheld``."""
    transitions = ", ".join(f"{count:,} {label}" for label, count in (plan.get("transitions") or {}).items())
    return (f"{plan.get('change', 0):,} would change{f': {transitions}' if transitions else ''}; "
            f"{plan.get('no-op', 0):,} already so; {plan.get('withhold', 0):,} withheld"
            + (f"; {plan['unknown']:,} unknown (HubSpot's read left them out)" if plan.get("unknown") else ""))


def failure_ratio_exceeded(
    failed: int, total: int, max_failed_ratio: float | None, *, what: str, by_category: dict[str, int] | None,
    where: str | None, fix: str,
) -> str | None:
    """The one failure policy: a message when more than ``max_failed_ratio`` of ``total`` failed, else ``None``.

    Invalid rows and HubSpot's rejections count alike. ``None`` as the ratio means "not judged here"
    (a DAG that applies the policy once, over the whole run). The caller raises the message as it
    must (the operator and the run's outcome task raise ``AirflowFailException``).
    """
    if max_failed_ratio is None or not total or failed / total <= float(max_failed_ratio):
        return None
    return (
        f"{failed:,} of {total:,} {what} failed ({failed / total:.1%}, above max_failed_ratio "
        f"{float(max_failed_ratio):.1%}): {categories_in_words(by_category)}. Dead letters: "
        f"{where or 'not written (set dead_letter_uri to keep them)'}. {fix}"
    )
