"""The ledger: an audit record of every status the provider sends to HubSpot.

For each input that went out, one record says which run and data interval sent it, the status key
(``subscriberIdString``, ``subscriptionId``, ``channel``), the requested ``statusState``, the legal
basis and its explanation, when the consent was given (``occurredAt``), when it was sent and in how
many attempts, and what HubSpot answered: the confirmed status, ``setStatusSuccessReason``, HubSpot's
``timestamp`` and ``source`` and the ``correlationId``, or the failure category and message.

Records are JSONL part files (camelCase keys, as on the wire), and optionally also rows appended to
a SQL table through any common-sql connection (:class:`SqlLedger`). They answer the question a
regulator or a contact asks (GDPR Art. 5(2), 7(1)): "when did you set my status, on what basis, and
what did HubSpot answer?". The ledger holds personal data: it never goes to XCom or logs.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any

import msgspec

from hubspot_provider.results import InputOutcome

__all__ = ["LEDGER_FIELDS", "LEDGER_DDL", "LedgerRecord", "SqlLedger", "as_text", "ledger_record", "withheld_record"]


class LedgerRecord(msgspec.Struct, rename="camel", gc=False):
    """One audit record. Attribute names are the SQL columns; the JSONL keys are their camelCase
    forms (:data:`LEDGER_FIELDS`), as on the wire. Timestamps are ISO-8601 UTC text."""

    run_id: str | None
    data_interval_start: str | None
    data_interval_end: str | None
    subscriber_id_string: str | None
    subscription_id: int | None
    channel: str | None
    status_state: str | None
    legal_basis: str | None
    legal_basis_explanation: str | None
    occurred_at: str | None
    sent_at: str | None
    attempts: int | None
    outcome: str
    confirmed_status: str | None = None
    set_status_success_reason: str | None = None
    hubspot_timestamp: str | None = None
    hubspot_source: str | None = None
    correlation_id: str | None = None
    failure_category: str | None = None
    failure_message: str | None = None
    retryable: bool | None = None


LEDGER_COLUMNS: tuple[str, ...] = tuple(f.name for f in msgspec.structs.fields(LedgerRecord))
"""The SQL columns of :data:`LEDGER_DDL`, in order."""

LEDGER_FIELDS: tuple[str, ...] = tuple(f.encode_name for f in msgspec.structs.fields(LedgerRecord))
"""Keys of a ledger record's JSON line, in order."""

LEDGER_DDL = """\
CREATE TABLE hubspot_consent_ledger (
    run_id                     VARCHAR(250),
    data_interval_start        VARCHAR(40),
    data_interval_end          VARCHAR(40),
    subscriber_id_string       VARCHAR(254) NOT NULL,
    subscription_id            BIGINT,
    channel                    VARCHAR(16) NOT NULL,
    status_state               VARCHAR(16) NOT NULL,
    legal_basis                VARCHAR(40),
    legal_basis_explanation    TEXT,
    occurred_at                VARCHAR(40),
    sent_at                    VARCHAR(40),
    attempts                   INTEGER,
    outcome                    VARCHAR(16) NOT NULL,
    confirmed_status           VARCHAR(16),
    set_status_success_reason  VARCHAR(40),
    hubspot_timestamp          VARCHAR(40),
    hubspot_source             VARCHAR(100),
    correlation_id             VARCHAR(100),
    failure_category           VARCHAR(40),
    failure_message            TEXT,
    retryable                  BOOLEAN
)"""
"""Portable DDL for :class:`SqlLedger`'s table (SQLite, PostgreSQL, MySQL/MariaDB). Timestamps are
ISO-8601 UTC text, so they sort and compare as text on every database."""

SUCCEEDED = "SUCCEEDED"
FAILED = "FAILED"
WITHHELD = "WITHHELD"
"""Outcome of an input the ``hubspot_changes`` policy kept from HubSpot: ``confirmedStatus``,
``hubspotTimestamp`` and ``hubspotSource`` are then HubSpot's current status that won."""


@lru_cache(maxsize=256)
def _iso(moment: datetime) -> str:
    # A batch's records share their sentAt; HubSpot's timestamps repeat too. Cached, it costs a lookup.
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc)
    return moment.isoformat().replace("+00:00", "Z")


def as_text(value: Any) -> Any:
    """A value as the ledger stores it: datetimes as ISO-8601 UTC text, enum members as their wire value."""
    if value is None or type(value) is str:
        return value
    if isinstance(value, datetime):
        return _iso(value)
    return getattr(value, "_value_", value)  # an enum member, as its wire value


def _wire(value: Any) -> Any:
    # as_text for what HubSpot's parsed answer holds: text, or an enum member (``_value_`` is the
    # member's plain attribute; ``.value`` goes through a slower descriptor).
    return value if value is None or type(value) is str else value._value_


def ledger_record(
    outcome: InputOutcome,
    *,
    run_id: str | None,
    data_interval_start: Any = None,
    data_interval_end: Any = None,
    occurred_at: Any = None,
) -> LedgerRecord:
    """The audit record of one sent input. Built for every status sent, in the write loop: keep it lean."""
    wire, result, failure = outcome.input, outcome.result, outcome.failure
    get = wire.get
    sent_at = outcome.sent_at
    record = LedgerRecord(
        run_id, as_text(data_interval_start), as_text(data_interval_end),
        get("subscriberIdString"), get("subscriptionId"), get("channel", "EMAIL"), get("statusState"),
        get("legalBasis"), get("legalBasisExplanation"),
        as_text(occurred_at),
        None if sent_at is None else _iso(sent_at), outcome.attempts, SUCCEEDED if failure is None else FAILED,
        correlation_id=outcome.correlation_id,
    )
    if result is not None:
        record.confirmed_status = _wire(result.status)
        record.set_status_success_reason = _wire(result.set_status_success_reason)
        record.hubspot_timestamp = as_text(result.timestamp)  # text when HubSpot sent an odd format
        record.hubspot_source = result.source
    if failure is not None:
        record.failure_category = failure.category
        record.failure_message = failure.message
        record.retryable = failure.retryable
    return record


def withheld_record(
    wire: dict[str, Any],
    verdict: Any,
    *,
    run_id: str | None,
    data_interval_start: Any = None,
    data_interval_end: Any = None,
    occurred_at: Any = None,
) -> LedgerRecord:
    """The audit record of an input the ``hubspot_changes`` policy withheld: never sent; HubSpot's
    current status that won stands in ``confirmedStatus``, ``hubspotTimestamp`` and ``hubspotSource``."""
    current = verdict.current
    get = wire.get
    return LedgerRecord(
        run_id, as_text(data_interval_start), as_text(data_interval_end),
        get("subscriberIdString"), get("subscriptionId"), get("channel", "EMAIL"), get("statusState"),
        get("legalBasis"), get("legalBasisExplanation"), as_text(occurred_at), None, 0, WITHHELD,
        confirmed_status=None if current is None else ("OPTED_OUT_OF_ALL" if current.wide else current.status),
        hubspot_timestamp=None if current is None else as_text(current.timestamp),
        hubspot_source=None if current is None else current.source,
        failure_category=verdict.category, failure_message=verdict.message, retryable=False,
    )


class SqlLedger:
    """Appends ledger records to a SQL table through any common-sql (``DbApiHook``) connection.

    Create the table once with :data:`LEDGER_DDL` (any name; pass it as ``table``).

    .. code-block:: python

        SqlLedger("audit_db", "hubspot_consent_ledger").append(records)

    :param conn_id: an Airflow connection whose hook is a ``DbApiHook`` (sqlite, postgres, mysql, …).
    :param table: the table, a plain (optionally schema-qualified) identifier.
    """

    def __init__(self, conn_id: str, table: str) -> None:
        from airflow.providers.common.sql.hooks.sql import DbApiHook
        from airflow.sdk import BaseHook

        from hubspot_provider.consent import check_identifier

        self.table = check_identifier(table, "audit_table")
        hook = BaseHook.get_connection(conn_id).get_hook()
        if not isinstance(hook, DbApiHook):
            raise TypeError(
                f"audit_conn_id {conn_id!r} does not give a SQL hook; point it at a database connection "
                "(sqlite, postgres, mysql, ...)"
            )
        self.hook = hook

    def append(self, records: Iterable[LedgerRecord]) -> int:
        """Insert ``records`` (one transaction per call); returns how many."""
        rows = [msgspec.structs.astuple(record) for record in records]
        if rows:
            # One transaction for the part. (commit_every=0 inserts nothing at all on hooks that use
            # executemany, PostgreSQL's among them: they insert in chunks of commit_every rows.)
            self.hook.insert_rows(self.table, rows, target_fields=list(LEDGER_COLUMNS), commit_every=len(rows))
        return len(rows)

    def explains(
        self, candidates: list[tuple[str, int | None, str, str | None]], chunk: int = 500
    ) -> set[tuple[str, int | None, str, str | None]]:
        """Of ``(email, subscription id or None, status, HubSpot timestamp)``, those a write of this
        provider explains: a succeeded record that changed that key to that status and got that
        timestamp from HubSpot."""
        wanted = set(candidates)
        emails = sorted({c[0] for c in wanted})
        placeholder = getattr(self.hook, "placeholder", "%s") or "%s"
        found: set[tuple[str, int | None, str, str | None]] = set()
        for start in range(0, len(emails), chunk):
            part = emails[start:start + chunk]
            sql = (
                f"SELECT lower(subscriber_id_string), subscription_id, confirmed_status, hubspot_timestamp "
                f"FROM {self.table} WHERE outcome = 'SUCCEEDED' AND (set_status_success_reason IS NULL OR "
                f"set_status_success_reason <> 'NO_STATUS_CHANGE') AND lower(subscriber_id_string) IN "
                f"({', '.join([placeholder] * len(part))})"
            )
            for email, subscription_id, status, timestamp in self.hook.get_records(sql, parameters=part):
                key = (email, None if subscription_id is None else int(subscription_id), status, timestamp)
                if key in wanted:
                    found.add(key)
        return found
