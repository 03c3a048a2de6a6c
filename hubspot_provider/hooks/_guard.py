"""Consent decided inside HubSpot: tell HubSpot-side changes from this provider's own writes, and
decide, per input, whether a write goes ahead under the ``hubspot_changes`` policy.

The source of consent events is not the only place consent changes. A contact can click the email
footer's unsubscribe link, use HubSpot's preferences page, or be changed by a user in HubSpot's UI.
A later sync must not silently undo that (GDPR Art. 7(3): withdrawing consent must stick). HubSpot
stamps *every* status with the time it was written, this provider's own writes included, so
comparing timestamps alone would let this provider's own 02:00 write hide an opt-in that happened at
01:00. A current status therefore counts as **HubSpot-side** only when it was not written by this
provider:

* its ``source`` is not one HubSpot gives this provider's writes (:class:`OwnWrites` learns them
  from write answers; ``"Public status API"`` is what HubSpot reports for writes through this API), or
* a SQL ledger is configured and holds no write of this provider that explains it (same key, same
  status, same HubSpot ``timestamp``, and the write changed the status).

An opt-out from all email carries no ``source``. It is this provider's own when this run wrote it,
when the SQL ledger explains it, or (without a SQL ledger) when HubSpot stamped one of the contact's
subscriptions at the same instant with this provider's source.

Without a SQL ledger, other integrations writing through the same public API share this
provider's source and count as its own.

Policies:

``respect_opt_outs`` (default)
    a HubSpot-side opt-out (of the subscription, or of all email) newer than the source event wins:
    the write that would (re)subscribe is withheld as ``NEWER_OPT_OUT_IN_HUBSPOT``.
``respect_all``
    any HubSpot-side change newer than the source event wins (``NEWER_CHANGE_IN_HUBSPOT`` when it is
    not an opt-out).
``source_wins``
    the source always wins; nothing is read.

Opt-outs from the source are never withheld: unsubscribing is always safe.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any

__all__ = [
    "API_SOURCE", "DEFAULT_POLICY", "HUBSPOT_CHANGES_POLICIES", "NEWER_CHANGE_IN_HUBSPOT",
    "NEWER_OPT_OUT_IN_HUBSPOT", "Current", "OwnWrites", "Verdict", "check_policy", "decide", "needs_read",
    "parse_instant",
]

RESPECT_OPT_OUTS = "respect_opt_outs"
RESPECT_ALL = "respect_all"
SOURCE_WINS = "source_wins"
HUBSPOT_CHANGES_POLICIES = (RESPECT_OPT_OUTS, RESPECT_ALL, SOURCE_WINS)
DEFAULT_POLICY = RESPECT_OPT_OUTS
NEWER_OPT_OUT_IN_HUBSPOT = "NEWER_OPT_OUT_IN_HUBSPOT"
NEWER_CHANGE_IN_HUBSPOT = "NEWER_CHANGE_IN_HUBSPOT"
API_SOURCE = "Public status API"
"""The ``source`` HubSpot reports for statuses written through its public status API."""

UNSUBSCRIBED = "UNSUBSCRIBED"
UNSUBSCRIBE_ALL = "UNSUBSCRIBE_ALL"
NOT_SPECIFIED = "NOT_SPECIFIED"
OPTED_OUT_OF_ALL = "OPTED_OUT_OF_ALL"
CHANGE, NO_OP, WITHHOLD, UNKNOWN = "change", "no-op", "withhold", "unknown"
CURRENT_STATUS_UNREAD = "CURRENT_STATUS_UNREAD"
"""Category of an input not sent because HubSpot's read left its contact out (retryable)."""


def check_policy(value: Any) -> str:
    """``value`` as a policy name, or a ``ValueError`` naming the choices."""
    text = str(value or "").strip()
    if text not in HUBSPOT_CHANGES_POLICIES:
        raise ValueError(
            f"hubspot_changes must be one of {', '.join(HUBSPOT_CHANGES_POLICIES)}, got {value!r}"
        )
    return text


def _wire(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value


def parse_instant(value: Any) -> datetime | None:
    """A staged ``occurredAt`` (ISO-8601 text, ``Z`` or an offset) as an aware datetime; ``None``
    when absent or unreadable (then the event counts as older than any HubSpot-side change)."""
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else None
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


def iso(moment: Any) -> str | None:
    if isinstance(moment, datetime):
        return moment.isoformat().replace("+00:00", "Z")
    return None if moment is None else str(moment)


@dataclass(slots=True)
class Current:
    """What HubSpot holds now for a key: a subscription's status, or a contact's opt-out from all
    email (``wide``). ``hubspot_side``: not written by this provider (see the module's rules)."""

    status: str | None
    timestamp: datetime | None
    source: str | None
    hubspot_side: bool
    wide: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"status": OPTED_OUT_OF_ALL if self.wide else self.status, "timestamp": iso(self.timestamp),
                "source": self.source, "hubspotSide": self.hubspot_side}


@dataclass(slots=True)
class Verdict:
    """What the policy decides for one input: ``change``, ``no-op`` (HubSpot already holds it) or
    ``withhold`` (a newer HubSpot-side change wins; ``category`` and ``message`` say which)."""

    action: str
    current: Current | None
    label: str
    category: str | None = None
    message: str | None = None


class OwnWrites:
    """Recognises this provider's own writes among HubSpot's current statuses.

    :param sources: ``source`` values HubSpot gives this provider's writes (learned from write answers
        as the run goes; :data:`API_SOURCE` by default).
    :param ledger: a :class:`~hubspot_provider.ledger.SqlLedger`; when given, a status counts as this
        provider's only if the ledger holds the write that set it.
    """

    def __init__(self, sources: Iterable[str] | None = None, ledger: Any = None) -> None:
        self.sources = set(sources) if sources is not None else {API_SOURCE}
        self.ledger = ledger
        self.opted_out_of_all: set[str] = set()

    def learn(self, status: Any, wire: Mapping[str, Any] | None = None) -> None:
        """Remember the ``source`` of a confirmed write that changed a status, and the contacts this
        provider opted out of all email."""
        reason = _wire(getattr(status, "set_status_success_reason", None))
        source = getattr(status, "source", None)
        if reason in (None, "NO_STATUS_CHANGE"):
            return  # HubSpot already held it: whoever set it, it was not this write
        if source:
            self.sources.add(source)
        if wire is not None and wire.get("statusState") == UNSUBSCRIBE_ALL:
            self.opted_out_of_all.add(str(wire.get("subscriberIdString", "")).lower())

    def explained(self, candidates: list[tuple[str, int | None, str, str]]) -> set[tuple[str, int | None, str, str]]:
        """Of ``(email, subscription id or None, status, timestamp)``, those a ledger write explains."""
        if self.ledger is None or not candidates:
            return set()
        return self.ledger.explains(candidates)


def needs_read(wire: Mapping[str, Any], policy: str) -> bool:
    """Whether the policy must look at HubSpot before this input is written: only writes that could
    (re)subscribe (``SUBSCRIBED`` or ``NOT_SPECIFIED``); opt-outs are always safe."""
    return policy != SOURCE_WINS and wire.get("statusState") not in (UNSUBSCRIBED, UNSUBSCRIBE_ALL)


def decide(
    wire: Mapping[str, Any], occurred_at: datetime | None, sub: Current | None, wide: Current | None, policy: str
) -> Verdict:
    """The policy's verdict for one input, given HubSpot's current status of its subscription
    (``sub``, ``None`` = never set) and the contact's opt-out from all email (``wide``, ``None`` =
    not opted out). An event of unknown time counts as older than any HubSpot-side change."""
    wanted = wire.get("statusState")
    if wanted == UNSUBSCRIBE_ALL:
        now = OPTED_OUT_OF_ALL if wide is not None else "NOT_" + OPTED_OUT_OF_ALL
        return Verdict(NO_OP if wide is not None else CHANGE, wide, f"{now}→{UNSUBSCRIBE_ALL}")
    now = sub.status if sub is not None and sub.status else NOT_SPECIFIED
    label = f"{now}→{wanted}"
    if policy != SOURCE_WINS and wanted != UNSUBSCRIBED:
        for current in (wide, sub):
            if current is None or not current.hubspot_side:
                continue
            # An opt-out wins ties, and one of unknown time counts as newer: a withdrawal must stick.
            opt_out = current.wide or current.status == UNSUBSCRIBED
            if occurred_at is None or current.timestamp is None:
                newer = opt_out or occurred_at is None
            else:
                newer = current.timestamp >= occurred_at if opt_out else current.timestamp > occurred_at
            if not newer:
                continue
            if opt_out or (policy == RESPECT_ALL and current.status != wanted):
                what = "an opt-out from all email" if current.wide else f"status {current.status}"
                category = NEWER_OPT_OUT_IN_HUBSPOT if opt_out else NEWER_CHANGE_IN_HUBSPOT
                return Verdict(WITHHOLD, current, label, category, (
                    f"HubSpot holds {what} made there (source {current.source or 'unknown'}) at "
                    f"{iso(current.timestamp) or 'an unknown time'}, after this event "
                    f"({iso(occurred_at) or 'time unknown'}); hubspot_changes={policy} keeps HubSpot's. "
                    "Not retryable: run with hubspot_changes='source_wins' to overwrite it on purpose"
                ))
    return Verdict(NO_OP if now == wanted else CHANGE, sub, label)
