"""Consent sync building blocks: extract a data interval from SQL, validate, count dead letters.

The example DAGs (``dags/hubspot_consent_sync.py``, ``dags/hubspot_dead_letter_replay.py``) only
wire tasks; everything they do lives here, so it can be tested without a scheduler.

A run keeps its files under ``<storage_uri>/<run id>/`` (any Airflow object-storage URI)::

    staged/events.jsonl          latest event per (email, subscription, EMAIL) in the data interval
    validated/statuses.jsonl     the staged events that pass validation (a subscription status, or an
                                 opt-out from all email), opt-outs from all email first
    validated/shard-NNNNN/statuses.jsonl   a big day's statuses split into shards (each contact's in one
                                 shard, in the same order), one write task each; a day within
                                 ``shard_size`` is one shard, the ``validated/`` folder itself
    dead-letters/*.jsonl         every event of the interval that did not land, with category and reason
    superseded/part-extract.jsonl   every event of the interval a later event of its key superseded,
                                 named with when that event happened
    unplaceable/part-extract.jsonl  rows whose occurred_at fits no data interval (NULL, unreadable,
                                 impossible): listed by every run until fixed, in no day's failure ratio
    audit/*.jsonl                the ledger: one audit record per status sent (personal data)
    summary.json                 the run's counts (no records, no emails)

Every file is rewritten, never appended to, so re-running an interval replaces what the previous
attempt wrote. Staged and dead-letter lines share one shape, so a dead-letter file can be fed back
to :class:`~hubspot_provider.operators.hubspot.HubSpotWriteStatusesOperator`::

    {"input": {<PublicStatusRequest, camelCase>}, "occurredAt": "2026-03-10T08:15:00Z"}
    {"input": {...}, "category": "INVALID_INPUT", "message": "...", "retryable": false, "occurredAt": ...}

The source contract is a table (or view) with the columns ``email, subscription_id, status,
legal_basis, legal_basis_explanation, occurred_at``; ``status`` is HubSpot's ``statusState`` and
``occurred_at`` a timestamp, or in SQLite ISO-8601 text (with an offset, or
``YYYY-MM-DD HH:MM:SS`` meaning UTC).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import IO, Any, Optional, Union

from airflow.sdk import BaseHook, ObjectStoragePath
from airflow.sdk.exceptions import AirflowFailException
from pydantic import ValidationError

from hubspot_provider.models import UNSUBSCRIBE_ALL, describe_validation_error, validate_consent_input
from hubspot_provider.results import INVALID_INPUT, WriteReport, categories_in_words, failure_ratio_exceeded, plan_in_words
from hubspot_provider.staging import (
    DEFAULT_SHARD_SIZE,
    MAX_SHARDS,
    SHARD_FOLDER_PREFIX,
    JsonlWriter,
    dead_letter,
    dumps,
    jsonl_files,
    read_objects,
    shard_count,
    shard_staged_input,
    status_key,
)

__all__ = [
    "DEAD_LETTER_FOLDER",
    "DEFAULT_SHARD_SIZE",
    "MAX_SHARDS",
    "HUBSPOT_POOL",
    "HUBSPOT_POOL_SLOTS",
    "IDENTIFIER_PATTERN",
    "SOURCE_COLUMNS",
    "apply_failure_policy",
    "check_identifier",
    "combine_write_summaries",
    "count_dead_letters",
    "failed_task_summary",
    "log_alert",
    "default_storage_uri",
    "ensure_pool",
    "extract_consent_events",
    "has_failures",
    "parse_occurred_at",
    "prepare_replay",
    "report_replay",
    "replay_folder",
    "report_run",
    "run_folder",
    "run_totals",
    "safe_run_id",
    "shard_count",
    "shard_validated",
    "summarise_run",
    "validate_staged_events",
]

log = logging.getLogger(__name__)

SOURCE_COLUMNS = (
    "email", "subscription_id", "status", "legal_basis", "legal_basis_explanation", "occurred_at",
)
# A plain, optionally qualified SQL name (schema.table): it is pasted into the query, so nothing else.
IDENTIFIER_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"
_IDENTIFIER_RE = re.compile(IDENTIFIER_PATTERN)

HUBSPOT_POOL = "hubspot_api"
# HubSpot's rate limit is per app, shared by every task writing to it; two writers at a time keep the
# pacing effective while one of them waits out a reset.
HUBSPOT_POOL_SLOTS = 2
HUBSPOT_POOL_DESCRIPTION = "Caps concurrent writes to HubSpot (one rate limit per app, shared by all runs)"

STAGED_FOLDER = "staged"
STAGED_FILE = "events.jsonl"
VALIDATED_FOLDER = "validated"
VALIDATED_FILE = "statuses.jsonl"
DEAD_LETTER_FOLDER = "dead-letters"
# The operator names its own parts part-<input name>-<line>.jsonl; these names never collide with them.
EXTRACT_DEAD_LETTERS = "part-extract.jsonl"
UNPLACEABLE_FOLDER = "unplaceable"
UNPLACEABLE_FILE = "part-extract.jsonl"
UNPLACEABLE = "UNPLACEABLE"
SUPERSEDED = "SUPERSEDED"
SUPERSEDED_FOLDER = "superseded"
"""Category of a row whose ``occurred_at`` cannot be placed in any data interval."""
VALIDATE_DEAD_LETTERS = "part-validate.jsonl"
SUMMARY_FILE = "summary.json"
LEDGER_FOLDER = "audit"
REPLAY_INPUT_FOLDER = "input"
REPLAY_INPUT_FILE = "dead-letters.jsonl"

PLAN_FOLDER = "plan"

DEFAULT_FETCH_SIZE = 1000
_RAW_REPR_LIMIT = 100


# ---------------------------------------------------------------------------------------------- paths


def check_identifier(name: str, what: str = "source_table") -> str:
    """Return ``name`` if it is a plain SQL identifier (``table`` or ``schema.table``), else raise.

    The table name is part of the query text, so anything that is not a bare identifier is refused
    rather than quoted.

    :raises ValueError: naming the value and the accepted form.
    """
    if not isinstance(name, str) or not _IDENTIFIER_RE.fullmatch(name):
        raise ValueError(
            f"{what} {name!r} is not a plain SQL identifier (letters, digits, underscores, optionally "
            "schema-qualified like analytics.consent_events); create a view with a plain name if needed"
        )
    return name


def param_rule(message: str, **schema: Any) -> dict[str, Any]:
    """A DAG param's bounds or pattern, with the sentence the user sees when a trigger breaks it.

    Spread it into a ``Param``: ``Param(100, type="integer", **param_rule("...", minimum=1))``.
    Airflow refuses a trigger whose params break their schema, and its error prints the failing
    part of the schema: nested in ``allOf``, that part carries ``message`` as its ``$comment``.
    Nested, the bounds are also not handed to the trigger form's number input, which would
    otherwise clamp a typed 0 to a minimum of 1 without a word.
    """
    return {"allOf": [{"$comment": message, **schema}]}


def table_name_rule(param: str) -> dict[str, Any]:
    """The rule of a param holding a table name (see :func:`check_identifier`)."""
    return param_rule(
        f"{param} must be a plain table name like consent_events or analytics.consent_events (letters, digits "
        "and _, not starting with a digit); create a view with such a name for anything else",
        pattern=IDENTIFIER_PATTERN,
    )


BATCH_SIZE_RULE = param_rule("batch_size must be a whole number from 1 to 1000 (HubSpot's batch maximum)",
                             minimum=1, maximum=1000)
FAILED_RATIO_RULE = param_rule("max_failed_ratio must be a share from 0 to 1, such as 0.25", minimum=0, maximum=1)


def default_storage_uri() -> str:
    """``file://<AIRFLOW_HOME>/hubspot_consent``, resolved when called (on the worker)."""
    home = os.environ.get("AIRFLOW_HOME") or os.path.join(os.path.expanduser("~"), "airflow")
    return "file://" + os.path.join(os.path.abspath(home), "hubspot_consent")


def safe_run_id(run_id: str) -> str:
    """``run_id`` made safe as one path segment.

    >>> safe_run_id("manual__2026-03-11T00:00:00+00:00")
    'manual__2026-03-11T00_00_00_00_00'
    """
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", run_id).strip("._")
    if not safe:
        raise ValueError(f"run id {run_id!r} has no characters usable in a path")
    return safe


def run_folder(storage_uri: str | None, run_id: str) -> ObjectStoragePath:
    """The folder of one DAG run: ``<storage_uri>/<sanitised run id>``.

    :param storage_uri: any Airflow object-storage URI; ``None`` or empty for :func:`default_storage_uri`.
    """
    return ObjectStoragePath(storage_uri or default_storage_uri()) / safe_run_id(run_id)


# ---------------------------------------------------------------------------------------------- timestamps


def parse_occurred_at(value: Any) -> datetime | None:
    """``value`` as an aware UTC datetime, or ``None`` when it is not a timestamp.

    Accepts datetimes (naive ones are UTC), dates (midnight UTC), ISO-8601 text with an offset or
    ``Z``, and ``YYYY-MM-DD HH:MM:SS`` text without one (UTC).

    >>> parse_occurred_at("2026-03-10T01:30:00+02:00")
    datetime.datetime(2026, 3, 9, 23, 30, tzinfo=datetime.timezone.utc)
    """
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, date):
        moment = datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        text = value.strip()
        if len(text) < 10:
            return None
        # Python 3.10's fromisoformat does not know the "Z" suffix.
        if text[-1] in "Zz":
            text = text[:-1] + "+00:00"
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            return None
    else:
        return None
    if moment.tzinfo is None or moment.utcoffset() is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _epoch_us(moment: datetime) -> int:
    return int((moment - _EPOCH) / timedelta(microseconds=1))


def _iso_z(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def _aware_utc(value: Any, name: str) -> datetime:
    moment = parse_occurred_at(value) if not isinstance(value, datetime) else value
    if moment is None:
        raise ValueError(
            f"{name} is missing: this run has no data interval. Trigger it with a logical date "
            "(e.g. `airflow dags test hubspot_consent_sync 2026-03-11`) so it knows which day to sync"
        )
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


# ---------------------------------------------------------------------------------------------- file helpers


def _clear_folder(folder: ObjectStoragePath) -> None:
    # Files only: a sub-folder was not written by this step, so it is not this step's to remove.
    if folder.is_dir():
        for child in folder.iterdir():
            if child.is_file():
                child.unlink()
    folder.mkdir(parents=True, exist_ok=True)


def _dead_letter(value: Any, message: str, occurred_at: str | None) -> dict[str, Any]:
    return dead_letter(value, INVALID_INPUT, message, False, occurred_at)


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _RAW_REPR_LIMIT else text[: _RAW_REPR_LIMIT - 3] + "..."


# ---------------------------------------------------------------------------------------------- extract


def _json_scalar(value: Any) -> Any:
    if isinstance(value, str):
        # Text the database could not decode arrives with surrogate escapes (see _lenient_text).
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace") if _undecodable(value) else value
    if value is None or isinstance(value, (int, float, bool)):
        return value
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def _lenient_text(raw: bytes) -> str:
    """SQLite text factory: bytes that are not UTF-8 survive as surrogate escapes, so one bad value
    becomes that row's dead letter instead of an error that stops the whole extract."""
    return raw.decode("utf-8", "surrogateescape")


def _undecodable(value: Any) -> bool:
    return isinstance(value, str) and any("\udc80" <= ch <= "\udcff" for ch in value)


def _subscription_id(value: Any) -> Any:
    # Databases hand ids back as int, Decimal, float or text depending on the column type; the wire model
    # is strict (int only), so integral values are normalised here and anything else is left for
    # validation to report.
    value = _json_scalar(value)
    if isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*\d{1,19}\s*", value):
        return int(value)
    return value


def _contact(record: Mapping[str, Any]) -> str | None:
    email = record.get("subscriberIdString")
    return email.strip().lower() if isinstance(email, str) and email.strip() else None


def _staged_input(
    email: Any, subscription_id: Any, status: Any, legal_basis: Any, explanation: Any
) -> dict[str, Any]:
    status = _json_scalar(status)
    record = {
        "subscriberIdString": _json_scalar(email),
        "subscriptionId": _subscription_id(subscription_id),
        "statusState": status,
        "channel": "EMAIL",
    }
    if status == UNSUBSCRIBE_ALL:
        del record["subscriptionId"]  # an opt-out from all email names no subscription
    if legal_basis is not None:
        record["legalBasis"] = _json_scalar(legal_basis)
    if explanation is not None:
        record["legalBasisExplanation"] = _json_scalar(explanation)
    return record


# occurred_at text a data interval can be found for by comparing text: a real calendar date first.
_SQLITE_PLACEABLE = (
    "(typeof(occurred_at) = 'text' AND occurred_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]*' "
    "AND substr(occurred_at, 1, 4) != '0000' "
    "AND ifnull(date(substr(occurred_at, 1, 10), '+0 days'), '') = substr(occurred_at, 1, 10))"
)


def _source_query(
    table: str, conn_type: str, placeholder: str, start: datetime, end: datetime
) -> tuple[str, list[Any]]:
    columns = ", ".join(SOURCE_COLUMNS)
    if conn_type == "sqlite":
        # SQLite keeps timestamps as text whose offsets vary, so text comparison cannot find the exact
        # interval. The window below is wide enough for any offset (local date within a day of the UTC
        # date); the exact [start, end) filter is applied in Python.
        low = (start - timedelta(days=1)).date().isoformat()
        high = ((end + timedelta(days=1)).date() + timedelta(days=1)).isoformat()
        # Rows no interval's window can hold (NULL, text that is not a real date first) are read by
        # every run, in the same scan, so they are reported until fixed at the source.
        where = (
            f"occurred_at IS NULL OR NOT {_SQLITE_PLACEABLE} "
            f"OR (occurred_at >= {placeholder} AND occurred_at < {placeholder})"
        )
        return f"SELECT {columns} FROM {table} WHERE {where}", [low, high]
    # Typed timestamp columns: a day of slack either side absorbs naive TIMESTAMP columns compared with
    # an aware bound in the session's time zone; NULLs fit no interval and are read by every run.
    where = f"occurred_at IS NULL OR (occurred_at >= {placeholder} AND occurred_at < {placeholder})"
    return f"SELECT {columns} FROM {table} WHERE {where}", [
        start - timedelta(days=1), end + timedelta(days=1),
    ]


# The characters of an email that SQL keeps in the later-events check's coarse key: ASCII letters but
# I and K (Turkish locales and Unicode lower-casing turn other characters into them), digits and
# @._+-. Every other character is dropped. No character outside the set lower-cases (in Python) to
# one inside it, so two emails that Python's key (strip, lower) joins always get the same coarse
# key, whatever their case, whitespace or non-ASCII letters. The key is only a filter: the exact
# test is made in Python on each row it brings back.
_COARSE_KEEP = "A-HJLM-Za-hjlm-z0-9@._+-"
_COARSE_CHARS = frozenset(c for c in map(chr, range(128)) if re.fullmatch(f"[{_COARSE_KEEP}]", c))
# The SQL of the coarse key, as the README's indexes spell it (an expression index is used only
# where a query repeats its expression exactly).
COARSE_EMAIL_KEY_SQL = {
    "postgres": f"lower(regexp_replace(email, '[^{_COARSE_KEEP}]', '', 'g'))",
    # MariaDB/MySQL match case-insensitively under a _ci collation unless told not to, and neither
    # lower-case nor match characters in a binary string (a VARBINARY column, a decrypting view).
    "mysql": f"lower(regexp_replace(convert(email using utf8mb4), '(?-i)[^{_COARSE_KEEP}]', ''))",
}
_PROBE_DIALECTS = {"postgres": "postgres", "postgresql": "postgres", "mysql": "mysql", "mariadb": "mysql"}
# MariaDB/MySQL use an index on an expression only through a generated column that the query names:
# a source table with this column, generated as ``COARSE_EMAIL_KEY_SQL["mysql"]`` and indexed with
# occurred_at (see the README), is probed through it.
COARSE_KEY_COLUMN = "email_coarse_key"
# Contacts per query where the database probes the index on the coarse key: small enough that the
# planner picks the index for each query (with a large list it would scan the table instead).
PROBE_CHUNK = 1_000
# Contacts per query where it cannot (no such index, or MariaDB, which uses an index on an
# expression only through a generated column the query names): the key list filters one scan of the
# later rows, so few scans, and SQL text of a few MB at most.
FILTER_CHUNK = 100_000
# ... and at most this much key text per query (MariaDB's default max_allowed_packet is 16 MiB).
FILTER_CHUNK_BYTES = 4 * 1024 * 1024
# Later rows per contact of the interval above which probing the index beats one scan.
PROBE_ROWS_PER_CONTACT = 10


def coarse_email_key(email: str) -> str:
    """The later-events check's coarse key of ``email`` (see ``COARSE_EMAIL_KEY_SQL``)."""
    return "".join(c for c in email if c in _COARSE_CHARS).lower()


def _later_query(
    table: str, conn_type: str, placeholder: str, since: datetime, contacts: Sequence[str] | None = None,
    key_sql: str | None = None,
) -> tuple[str, list[Any]]:
    """The source's events from a day before ``since`` onwards (the exact test is made in Python).

    Typed timestamp columns (every database but SQLite) push the reduction down: the database returns
    the latest event per (email as stored, subscription) and kind (an opt-out from all email, or any
    other) instead of every later event. On PostgreSQL and MariaDB/MySQL, given ``contacts`` (the
    coarse keys of the interval's contacts, see :func:`coarse_email_key`), it returns them only for
    those contacts: with the README's index on (coarse key, occurred_at) the database probes the index
    once per contact, so a backfill of an old day reads about as many rows as its interval has keys,
    however many days came after it (on MariaDB/MySQL, ``key_sql`` names the generated column that
    holds the key). Elsewhere it returns them for every key since the interval.
    SQLite keeps timestamps as text whose offsets vary, so its latest text is not its latest
    instant: its later events are streamed and compared in Python.
    """
    where = f"occurred_at >= {placeholder}"
    bound: Any = since - timedelta(days=1)
    if conn_type == "sqlite":
        bound = bound.date().isoformat()
        return f"SELECT email, subscription_id, status, occurred_at FROM {table} WHERE {where}", [bound]
    parameters: list[Any] = [bound]
    dialect = _PROBE_DIALECTS.get(conn_type)
    if contacts is not None and dialect is not None:
        key_sql = key_sql or COARSE_EMAIL_KEY_SQL[dialect]
        if dialect == "postgres":
            where = f"{key_sql} = ANY({placeholder}) AND {where}"
            parameters.insert(0, list(contacts))
        else:
            where = f"{key_sql} IN ({', '.join([placeholder] * len(contacts))}) AND {where}"
            parameters[:0] = contacts
    # Grouped by the email as stored: Python then normalises each variant (case, any whitespace)
    # the same way as the interval's rows, which SQL's trim() would not. MariaDB/MySQL's usual
    # collations hold 'ada@' and 'äda@' equal, so there the group is the email's bytes, or one
    # contact's later event would be credited to another.
    kind = f"CASE WHEN status = '{UNSUBSCRIBE_ALL}' THEN '{UNSUBSCRIBE_ALL}' ELSE 'LATER' END"
    email, group = ("max(email)", "CAST(email AS BINARY)") if dialect == "mysql" else ("email", "email")
    return (
        f"SELECT {email}, subscription_id, {kind}, max(occurred_at) FROM {table} WHERE {where} "
        f"GROUP BY {group}, subscription_id, {kind}",
        parameters,
    )


def _chunks(keys: Sequence[str], most: int, most_bytes: int) -> Iterator[list[str]]:
    """``keys`` in order, at most ``most`` of them and about ``most_bytes`` of UTF-8 text a chunk."""
    chunk: list[str] = []
    size = 0
    for key in keys:
        length = len(key.encode("utf-8")) + 4  # quotes and a comma in the SQL text
        if chunk and (len(chunk) >= most or size + length > most_bytes):
            yield chunk
            chunk, size = [], 0
        chunk.append(key)
        size += length
    if chunk:
        yield chunk


def _probes_contacts(conn_type: str) -> bool:
    return conn_type in _PROBE_DIALECTS


def _fetch(hook: Any, sql: str, parameters: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """The rows of a small query, each as a dict by lower-cased column name."""
    conn = hook.get_conn()
    try:
        cursor = conn.cursor()
        try:
            cursor.execute(sql, list(parameters))
            names = [str(column[0]).lower() for column in cursor.description]
            return [dict(zip(names, row)) for row in cursor.fetchall()]
        finally:
            cursor.close()
    finally:
        conn.close()


def _postgres_plan(hook: Any, sql: str, parameters: list[Any]) -> dict[str, Any]:
    """PostgreSQL's plan for a query (``EXPLAIN``, nothing run), as its top node."""
    (row,) = _fetch(hook, f"EXPLAIN (FORMAT JSON) {sql}", parameters)
    (plan,) = row.values()
    plan = json.loads(plan) if isinstance(plan, (str, bytes)) else plan
    return plan[0]["Plan"]


def _sql_words(expression: str) -> str:
    """An SQL expression as MariaDB prints it back, in one spelling: no quotes, spaces or case."""
    text = re.sub(r"[`\s]", "", expression).lower()
    return re.sub(r"\blcase\(", "lower(", text)


def _mysql_key_column(hook: Any, table: str) -> tuple[str, set[str]] | None:
    """``COARSE_KEY_COLUMN`` where ``table`` has it, generated exactly as the coarse key and long
    enough for any email the table holds, with the indexes that start with it; else ``None``.

    A column of that name computed any other way (or cut short) could leave out a contact's later
    event, so it is used only when the server's own text of its expression is the coarse key's.
    """
    schema, _, name = table.rpartition(".")
    where = ("table_schema = %s" if schema else "table_schema = DATABASE()") + " AND table_name = %s"
    bound = [*([schema] if schema else []), name]
    columns = {
        _json_scalar(row["column_name"]).lower(): row for row in _fetch(
            hook, "SELECT column_name, generation_expression, character_maximum_length FROM "
            f"information_schema.columns WHERE {where} AND column_name IN (%s, %s)", [*bound, "email", COARSE_KEY_COLUMN])
    }
    key = columns.get(COARSE_KEY_COLUMN)
    expression = _json_scalar(key["generation_expression"]) if key else None
    if not expression:
        return None
    email_length = columns.get("email", {}).get("character_maximum_length")
    key_length = key["character_maximum_length"]
    if _sql_words(expression) != _sql_words(COARSE_EMAIL_KEY_SQL["mysql"]) or not (
            email_length and key_length and int(key_length) >= int(email_length)):
        log.warning("Later-events check: %s.%s is not generated as the coarse email key, as long as the email "
                    "column (see the README), so it is not used", table, COARSE_KEY_COLUMN)
        return None
    indexes = {_json_scalar(row["index_name"]) for row in _fetch(
        hook, f"SELECT index_name FROM information_schema.statistics WHERE {where} AND column_name = %s "
        "AND seq_in_index = 1", [*bound, COARSE_KEY_COLUMN])}
    return COARSE_KEY_COLUMN, indexes


def _log_one_scan(contacts: int, later_rows: float) -> None:
    log.info("Later-events check: %d contacts of the interval, about %s later rows, read in one scan (fewer than "
             "probing the index would cost)", contacts, f"{later_rows:,.0f}")


def _mysql_plan(hook: Any, sql: str, parameters: Sequence[Any]) -> dict[str, Any]:
    """MariaDB/MySQL's plan for a single-table query (``EXPLAIN``, nothing run): its one row."""
    return _fetch(hook, f"EXPLAIN {sql}", parameters)[0]


def _postgres_probes_index(hook: Any, sql: str, parameters: list[Any]) -> bool:
    """Whether PostgreSQL's plan for a probe query looks the coarse email key up in an index."""

    def conditions(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for name, value in node.items():
                if name == "Index Cond" and isinstance(value, str):
                    yield value
                else:
                    yield from conditions(value)
        elif isinstance(node, list):
            for item in node:
                yield from conditions(item)

    return any("regexp_replace" in condition for condition in conditions(_postgres_plan(hook, sql, parameters)))


def _open_cursor(conn: Any, conn_type: str) -> Any:
    if conn_type in ("postgres", "postgresql", "redshift"):
        # psycopg buffers a whole result client-side unless the cursor is named (server-side).
        try:
            return conn.cursor(name="hubspot_consent_extract")
        except TypeError:
            pass
    return conn.cursor()


def _iter_source_rows(
    hook: Any, conn_type: str, sql: str, parameters: list[Any], fetch_size: int
) -> Iterator[tuple]:
    conn = hook.get_conn()
    if isinstance(conn, sqlite3.Connection):
        conn.text_factory = _lenient_text
    try:
        cursor = _open_cursor(conn, conn_type)
        try:
            try:
                cursor.arraysize = fetch_size
            except AttributeError:
                pass
            cursor.execute(sql, parameters)
            while True:
                rows = cursor.fetchmany(fetch_size)
                if not rows:
                    return
                yield from rows
        finally:
            cursor.close()
    finally:
        conn.close()


def _source_hook(source_conn_id: str) -> tuple[Any, str]:
    from airflow.providers.common.sql.hooks.sql import DbApiHook

    connection = BaseHook.get_connection(source_conn_id)
    hook = connection.get_hook()
    if not isinstance(hook, DbApiHook):
        raise TypeError(
            f"Connection {source_conn_id!r} (type {connection.conn_type!r}) does not give a SQL hook; point "
            "source_conn_id at a database connection (sqlite, postgres, mysql, snowflake, ...)"
        )
    return hook, (connection.conn_type or "").lower()


# A subscription event of a contact who opted out of all email at or after it (in this interval).
_OPTED_OUT_SINCE = (
    "(l.wide = 0 AND l.email IS NOT NULL AND EXISTS (SELECT 1 FROM latest a WHERE a.email = l.email "
    "AND a.wide = 1 AND a.at_us >= l.at_us))"
)


class _LatestPerKey:
    """Keeps the latest event per status key in an on-disk SQLite scratch file.

    A day of consent events can hold millions of keys; a dict would grow with them, the scratch file
    keeps memory flat. Among events with the same timestamp the one read later wins. A key whose
    event the source has overtaken since is marked, so the stale event is not passed on.
    """

    def __init__(self, directory: str) -> None:
        self._db = sqlite3.connect(os.path.join(directory, "latest.sqlite"))
        self._db.executescript(
            "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; "
            "CREATE TABLE latest (key TEXT PRIMARY KEY, at_us INTEGER NOT NULL, seq INTEGER NOT NULL, "
            "line TEXT NOT NULL, later INTEGER NOT NULL DEFAULT 0, later_us INTEGER, "
            # The contact, and whether the event is an opt-out from all email (which supersedes every
            # subscription event of the contact at or before it).
            "email TEXT, wide INTEGER NOT NULL DEFAULT 0);"
            "CREATE INDEX latest_email ON latest (email, wide);"
            # Every event, so that each one superseded can be named with the event that superseded it.
            "CREATE TABLE events (key TEXT NOT NULL, seq INTEGER NOT NULL, line TEXT NOT NULL);"
        )
        self._pending: list[tuple[str, int, int, str, str | None, int]] = []
        self._later: list[tuple[str, int]] = []
        self._later_wide: list[tuple[str, int]] = []
        self.added = 0

    def add(self, key: str | None, moment: datetime, line: str, email: str | None = None, wide: bool = False) -> None:
        # A row without a key is never superseded, nor supersedes: it keeps a key of its own.
        key = key if key is not None else f"\x00row {self.added}"
        self._pending.append((key, _epoch_us(moment), self.added, line, email if key[0] != "\x00" else None,
                              int(wide)))
        self.added += 1
        if len(self._pending) >= DEFAULT_FETCH_SIZE:
            self._flush()

    def mark_later(self, key: str, moment: datetime) -> None:
        """The source has an event for ``key`` at ``moment``: if that is later, it decides, not ours."""
        self._later.append((key, _epoch_us(moment)))
        if len(self._later) >= DEFAULT_FETCH_SIZE:
            self._flush()

    def mark_later_opt_out_from_all(self, email: str, moment: datetime) -> None:
        """The source has an opt-out from all email for ``email`` at ``moment``: it decides every
        earlier event of that contact."""
        self._later_wide.append((email, _epoch_us(moment)))
        if len(self._later_wide) >= DEFAULT_FETCH_SIZE:
            self._flush()

    def _flush(self) -> None:
        self._db.executemany(
            "INSERT INTO latest (key, at_us, seq, line, email, wide) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(key) DO UPDATE SET at_us = excluded.at_us, seq = excluded.seq, line = excluded.line "
            "WHERE excluded.at_us >= latest.at_us",
            self._pending,
        )
        self._db.executemany("INSERT INTO events (key, seq, line) VALUES (?, ?, ?)",
                             [(key, seq, line) for key, _, seq, line, _, _ in self._pending])
        self._pending.clear()
        self._db.executemany(
            "UPDATE latest SET later = 1, later_us = max(ifnull(later_us, 0), ?2) WHERE key = ?1 AND at_us < ?2",
            self._later,
        )
        self._later.clear()
        self._db.executemany(
            "UPDATE latest SET later = 1, later_us = max(ifnull(later_us, 0), ?2) WHERE email = ?1 AND at_us < ?2",
            self._later_wide,
        )
        self._later_wide.clear()

    def write_lines(self, handle: IO[str]) -> int:
        """Write the kept events, one line each, in the order they were read; return how many."""
        self._flush()
        written = 0
        # Opt-outs from all email first: a subscription event kept for the same contact is later than
        # the opt-out, so it must land after it.
        rows = self._db.execute(
            f"SELECT line FROM latest l WHERE later = 0 AND NOT {_OPTED_OUT_SINCE} ORDER BY wide DESC, seq"
        )
        for (line,) in rows:
            handle.write(line + "\n")
            written += 1
        return written

    def write_superseded(self, writer: JsonlWriter) -> int:
        """Name every event that did not reach HubSpot because a later one of the same key decides.

        Each is written in the dead-letter shape with category ``SUPERSEDED`` and, in the message,
        when the event that superseded it happened. Returns how many.
        """
        self._flush()
        rows = self._db.execute(
            "SELECT e.line, l.at_us, l.later_us, "
            f"(SELECT max(a.at_us) FROM latest a WHERE a.email = l.email AND a.wide = 1 AND a.at_us >= l.at_us "
            "AND l.wide = 0) "
            "FROM events e JOIN latest l ON l.key = e.key "
            f"WHERE e.seq != l.seq OR l.later = 1 OR {_OPTED_OUT_SINCE} ORDER BY e.seq"
        )
        for line, winner_us, later_us, opted_out_us in rows:
            staged = json.loads(line)
            if opted_out_us is not None and later_us is None:
                at = _iso_z(_EPOCH + timedelta(microseconds=opted_out_us))
                why = f"superseded by the contact's opt-out from all email at {at} in this interval"
            elif later_us is not None:
                at = _iso_z(_EPOCH + timedelta(microseconds=later_us))
                why = f"superseded by an event of the same key at {at}, after this run's interval; that event's run writes it"
            else:
                at = _iso_z(_EPOCH + timedelta(microseconds=winner_us))
                why = f"superseded by a later event of the same key at {at} in this interval"
            writer.write(dead_letter(staged["input"], SUPERSEDED, why, False, staged["occurredAt"]))
        return writer.count

    def earliest(self) -> datetime | None:
        self._flush()
        (at_us,) = self._db.execute("SELECT min(at_us) FROM latest").fetchone()
        return None if at_us is None else _EPOCH + timedelta(microseconds=at_us)

    def mark_changed_since(
        self, hook: Any, conn_type: str, table: str, placeholder: str, since: datetime, fetch_size: int
    ) -> int:
        """Read the source's events from ``since`` on (see :func:`_later_query`) and mark every key
        they overtake; returns how many rows the source sent."""
        read = 0
        for sql, parameters in self._later_queries(hook, conn_type, table, placeholder, since):
            read += self._mark_rows(_iter_source_rows(hook, conn_type, sql, parameters, fetch_size), since)
        return read

    def _later_queries(
        self, hook: Any, conn_type: str, table: str, placeholder: str, since: datetime
    ) -> Iterator[tuple[str, list[Any]]]:
        if not _probes_contacts(conn_type):
            yield _later_query(table, conn_type, placeholder, since)
            return
        self._flush()
        keys = sorted({coarse_email_key(email) for (email,) in
                       self._db.execute("SELECT DISTINCT email FROM latest WHERE email IS NOT NULL")})
        if not keys:
            return
        how = "matched during one scan of the source's later rows"
        indexed = False
        key_column = None
        if _PROBE_DIALECTS[conn_type] == "postgres":
            # Probing costs about what ten later rows cost to scan and match (measured: about 33 µs a
            # contact, 3.8 µs a row), so a scheduled run, whose later rows are about a day, scans them.
            try:
                later_rows = float(_postgres_plan(hook, f"SELECT 1 FROM {table} WHERE occurred_at >= {placeholder}",
                                                  [since - timedelta(days=1)])["Plan Rows"])
                many = later_rows > PROBE_ROWS_PER_CONTACT * len(keys)
                indexed = many and _postgres_probes_index(
                    hook, *_later_query(table, conn_type, placeholder, since, keys[:PROBE_CHUNK]))
            except Exception as exc:  # a server that speaks PostgreSQL's protocol but not its EXPLAIN
                log.warning("Later-events check: could not read PostgreSQL's plan (%s); the later rows are scanned",
                            type(exc).__name__)
            else:
                if indexed:
                    how = f"probed through the index on the coarse email key (about {later_rows:,.0f} later rows)"
                elif not many:
                    # Few later rows: one grouped scan of them all costs less than matching the contacts in it.
                    _log_one_scan(len(keys), later_rows)
                    yield _later_query(table, conn_type, placeholder, since)
                    return
                else:
                    how += (f" (about {later_rows:,.0f}; PostgreSQL can probe per contact only with the README's "
                            "index on the coarse email key)")
        else:
            decided = self._mysql_probe(hook, conn_type, table, placeholder, since, keys)
            if decided is None:  # few later rows: one grouped scan of them all
                yield _later_query(table, conn_type, placeholder, since)
                return
            key_column, how = decided
            indexed = key_column is not None
        chunk = PROBE_CHUNK if indexed else FILTER_CHUNK
        log.info("Later-events check: %d contacts of the interval, %s", len(keys), how)
        for contacts in _chunks(keys, chunk, FILTER_CHUNK_BYTES):
            yield _later_query(table, conn_type, placeholder, since, contacts, key_column)

    @staticmethod
    def _mysql_probe(
        hook: Any, conn_type: str, table: str, placeholder: str, since: datetime, keys: Sequence[str]
    ) -> tuple[str | None, str] | None:
        """How MariaDB/MySQL checks the later events: ``None`` for one grouped scan of them all (few),
        else the generated key column to probe (``None``: match during a scan) and the words to log."""
        how = "matched during one scan of the source's later rows"
        try:
            found = _mysql_key_column(hook, table)
            if found is None:
                return None, how + f" (MariaDB/MySQL can probe per contact only through the README's {COARSE_KEY_COLUMN} column)"
            key_column, indexes = found
            later_rows = float(_mysql_plan(hook, f"SELECT 1 FROM {table} WHERE occurred_at >= {placeholder}",
                                           [since - timedelta(days=1)])["rows"] or 0)
            if later_rows <= PROBE_ROWS_PER_CONTACT * len(keys):
                _log_one_scan(len(keys), later_rows)
                return None
            plan = _mysql_plan(hook, *_later_query(table, conn_type, placeholder, since, keys[:PROBE_CHUNK], key_column))
        except Exception as exc:  # a server without information_schema or this EXPLAIN
            log.warning("Later-events check: could not read the server's plan (%s); the later rows are scanned",
                        type(exc).__name__)
            return None, how
        if plan.get("type") not in ("range", "ref", "eq_ref", "ref_or_null") or _json_scalar(plan.get("key")) not in indexes:
            return None, how + f" (about {later_rows:,.0f}; no index starting with {COARSE_KEY_COLUMN} is used)"
        return key_column, (f"probed through the index on {COARSE_KEY_COLUMN} ({plan['key']}, about "
                            f"{later_rows:,.0f} later rows)")

    def _mark_rows(self, rows: Iterable[tuple], since: datetime) -> int:
        read = 0
        for email, subscription_id, status, occurred_at in rows:
            read += 1
            moment = parse_occurred_at(occurred_at)
            if moment is None or moment < since:
                continue
            record = _staged_input(email, subscription_id, status, None, None)
            key = status_key(record)
            if key is None:
                continue
            self.mark_later(key, moment)
            if record["statusState"] == UNSUBSCRIBE_ALL:
                self.mark_later_opt_out_from_all(_contact(record), moment)
        return read

    def superseded_later(self) -> int:
        self._flush()
        return self._db.execute("SELECT count(*) FROM latest WHERE later = 1").fetchone()[0]

    def close(self) -> None:
        self._db.close()


def extract_consent_events(
    *,
    source_conn_id: str,
    source_table: str,
    data_interval_start: Any,
    data_interval_end: Any,
    run_uri: str | ObjectStoragePath,
    fetch_size: int = DEFAULT_FETCH_SIZE,
    later_events_supersede: bool = True,
) -> dict[str, Any]:
    """Stage the latest consent event per status key of ``[data_interval_start, data_interval_end)``.

    Rows are streamed from the source (``fetchmany``, a server-side cursor on Postgres), filtered
    exactly on ``occurred_at`` in UTC, and reduced to the latest event per (lower-cased email,
    subscription id, ``EMAIL``); a tie goes to the row read later. Rows whose email or subscription id
    cannot form a key never share one: each stays its own event (and its own dead letter). The result
    is written to ``<run_uri>/staged/events.jsonl``.

    Every row is accounted for. A row whose ``occurred_at`` fits no data interval (NULL, unreadable,
    an impossible date like ``2026-02-30``) is *unplaceable*: every run reads such rows and lists them
    in ``<run_uri>/unplaceable/part-extract.jsonl`` (category ``UNPLACEABLE``) until they are fixed
    at the source; they count against no day's failure ratio. A row of the interval with a value that
    is not valid UTF-8 becomes a dead letter in ``<run_uri>/dead-letters/part-extract.jsonl``; the
    rest of the interval lands.

    A key the source changed again at or after ``data_interval_end`` is not staged: its later event
    decides HubSpot's status and is written by the run of its own interval. This is what makes a
    backfill or re-run of an old interval safe after newer intervals have run: it cannot put back a
    status the contact has since changed (a stale opt-in over a newer opt-out). Such keys are counted
    as ``superseded_later``. The check streams the source's events after the interval (for a backfill
    of an old interval, every event since).

    .. code-block:: python

        counts = extract_consent_events(
            source_conn_id="hubspot_consent_source",
            source_table="consent_events",
            data_interval_start=datetime(2026, 3, 10, tzinfo=timezone.utc),
            data_interval_end=datetime(2026, 3, 11, tzinfo=timezone.utc),
            run_uri="file:///data/hubspot_consent/manual__2026-03-11",
        )

    :param source_conn_id: Airflow connection of any SQL type (a common-sql ``DbApiHook``).
    :param source_table: table or view holding the source contract's columns; a plain identifier.
    :param data_interval_start: first instant of the interval (inclusive); naive means UTC.
    :param data_interval_end: end of the interval (exclusive).
    :param run_uri: the run's folder (see :func:`run_folder`).
    :param fetch_size: rows fetched per round trip.
    :param later_events_supersede: leave out keys with a later event in the source (default). ``False``
        stages the interval's latest events whatever happened since.
    :return: counts and paths (XCom-safe): ``rows_read, in_interval, outside_interval, unplaceable,
        undecodable, superseded, superseded_later, later_rows_read`` (rows the later-events check
        read), ``staged, staged_uri, run_uri, dead_letter_uri,
        unplaceable_uri, data_interval_start, data_interval_end``.
    """
    table = check_identifier(source_table)
    start = _aware_utc(data_interval_start, "data_interval_start")
    end = _aware_utc(data_interval_end, "data_interval_end")
    if end <= start:
        raise ValueError(
            f"data interval [{start.isoformat()}, {end.isoformat()}) is empty; use a data-interval timetable"
        )
    run = ObjectStoragePath(str(run_uri))
    staged_file = run / STAGED_FOLDER / STAGED_FILE
    dead_letters = run / DEAD_LETTER_FOLDER

    hook, conn_type = _source_hook(source_conn_id)
    placeholder = getattr(hook, "placeholder", "%s") or "%s"
    sql, parameters = _source_query(table, conn_type, placeholder, start, end)

    unplaceable_file = run / UNPLACEABLE_FOLDER / UNPLACEABLE_FILE
    superseded_file = run / SUPERSEDED_FOLDER / EXTRACT_DEAD_LETTERS
    counts = {"rows_read": 0, "in_interval": 0, "outside_interval": 0, "unplaceable": 0, "undecodable": 0}
    with tempfile.TemporaryDirectory(prefix="hubspot-consent-") as scratch_dir:
        latest = _LatestPerKey(scratch_dir)
        try:
            with (
                JsonlWriter(dead_letters / EXTRACT_DEAD_LETTERS) as undecodable,
                JsonlWriter(unplaceable_file) as unplaceable,
            ):
                def take(row: tuple) -> None:
                    counts["rows_read"] += 1
                    email, subscription_id, status, legal_basis, explanation, occurred_at = row
                    record = _staged_input(email, subscription_id, status, legal_basis, explanation)
                    moment = parse_occurred_at(occurred_at)
                    if moment is None:
                        unplaceable.write(dead_letter(
                            record, UNPLACEABLE,
                            f"occurred_at {_short_repr(_json_scalar(occurred_at))} is not a real point in time "
                            "(ISO-8601 with an offset, or 'YYYY-MM-DD HH:MM:SS' in UTC), so the event belongs to "
                            "no data interval and was not synced. Every run lists it until it is fixed at the "
                            "source",
                            False, None,
                        ))
                        return
                    if not start <= moment < end:
                        counts["outside_interval"] += 1
                        return
                    counts["in_interval"] += 1
                    bad = [name for name, value in zip(SOURCE_COLUMNS, row) if _undecodable(value)]
                    if bad:
                        undecodable.write(dead_letter(
                            record, INVALID_INPUT,
                            f"{', '.join(bad)}: not valid UTF-8 in the source (shown with U+FFFD where bytes "
                            "could not be read); fix the row at the source",
                            False, _iso_z(moment),
                        ))
                        return
                    line = dumps({"input": record, "occurredAt": _iso_z(moment)})
                    latest.add(status_key(record), moment, line, _contact(record),
                               record["statusState"] == UNSUBSCRIBE_ALL)

                for row in _iter_source_rows(hook, conn_type, sql, parameters, fetch_size):
                    take(row)
            counts["unplaceable"], counts["undecodable"] = unplaceable.count, undecodable.count
            later_rows_read = 0
            if later_events_supersede and latest.added:
                later_rows_read = latest.mark_changed_since(hook, conn_type, table, placeholder, end, fetch_size)
            superseded_later = latest.superseded_later()
            staged_file.parent.mkdir(parents=True, exist_ok=True)
            with staged_file.open("w", encoding="utf-8") as handle:
                staged = latest.write_lines(handle)
            with JsonlWriter(superseded_file) as superseded_writer:
                superseded_rows = latest.write_superseded(superseded_writer)
        finally:
            latest.close()

    result = {
        **counts,
        "superseded": counts["in_interval"] - counts["undecodable"] - staged - superseded_later,
        "superseded_later": superseded_later,
        "later_rows_read": later_rows_read,
        "staged": staged,
        "staged_uri": str(staged_file),
        "run_uri": str(run),
        "dead_letter_uri": str(dead_letters),
        "unplaceable_uri": str(unplaceable_file) if counts["unplaceable"] else None,
        "superseded_uri": str(superseded_file) if superseded_rows else None,
        "data_interval_start": start.isoformat(),
        "data_interval_end": end.isoformat(),
    }
    if counts["unplaceable"]:
        log.warning(
            "%d rows of %s have an occurred_at that fits no data interval (NULL, unreadable or impossible); "
            "they were not synced and are listed in %s. Fix them at the source",
            counts["unplaceable"], table, unplaceable_file,
        )
    log.info(
        "Extracted [%s, %s) from %s: %d rows read, %d in the interval, %d outside, %d unplaceable, %d not "
        "valid UTF-8, %d superseded by a later event of the interval, %d keys left to the later event the "
        "source has for them after the interval, %d staged",
        start.isoformat(), end.isoformat(), table, result["rows_read"], result["in_interval"],
        result["outside_interval"], result["unplaceable"], result["undecodable"], result["superseded"],
        result["superseded_later"], result["staged"],
    )
    return result


# ---------------------------------------------------------------------------------------------- validate


def validate_staged_events(
    run_uri: str | ObjectStoragePath, *, require_legal_basis: bool = False
) -> dict[str, Any]:
    """Check each staged event with :func:`~hubspot_provider.models.validate_consent_input` (the one
    validation: a subscription status, or ``UNSUBSCRIBE_ALL``, an opt-out from all email).

    Valid events go to ``<run_uri>/validated/statuses.jsonl`` in wire form; invalid ones to
    ``<run_uri>/dead-letters/part-validate.jsonl`` with category ``INVALID_INPUT`` and the reason.
    The ``validated/`` folder is emptied first, which also drops a checkpoint an earlier attempt of
    the write step left there: the new input is written from its first line.

    :param run_uri: the run's folder, as returned in :func:`extract_consent_events`'s ``run_uri``.
    :param require_legal_basis: reject events without ``legal_basis`` and its explanation (GDPR portals).
    :return: counts and paths: ``valid, invalid, validated_uri, dead_letter_uri, ledger_uri`` (where
        the write step keeps the ledger).
    """
    run = ObjectStoragePath(str(run_uri))
    staged_file = run / STAGED_FOLDER / STAGED_FILE
    validated = run / VALIDATED_FOLDER
    dead_letters = run / DEAD_LETTER_FOLDER
    _clear_folder(validated)
    valid = 0
    with (
        staged_file.open("r", encoding="utf-8") as source,
        (validated / VALIDATED_FILE).open("w", encoding="utf-8") as good,
        JsonlWriter(dead_letters / VALIDATE_DEAD_LETTERS) as bad,
    ):
        for number, text in enumerate(source, start=1):
            text = text.strip()
            if not text:
                continue
            try:
                staged = json.loads(text)
            except ValueError:
                bad.write(
                    _dead_letter({"raw": text[:2000]}, f"{staged_file} line {number} is not JSON", None)
                )
                continue
            value = staged.get("input") if isinstance(staged, dict) else None
            occurred_at = staged.get("occurredAt") if isinstance(staged, dict) else None
            try:
                request = validate_consent_input(value, require_legal_basis=require_legal_basis)
            except ValidationError as exc:
                bad.write(_dead_letter(value, describe_validation_error(exc), occurred_at))
                continue
            good.write(dumps({"input": request.to_wire(), "occurredAt": occurred_at}) + "\n")
            valid += 1
    result = {
        "valid": valid,
        "invalid": bad.count,
        "validated_uri": str(validated),
        "dead_letter_uri": str(dead_letters),
        "ledger_uri": str(run / LEDGER_FOLDER),
    }
    log.info(
        "Validated %d staged events: %d valid, %d invalid (dead letters in %s)",
        valid + bad.count, valid, bad.count, dead_letters,
    )
    return result


# ---------------------------------------------------------------------------------------------- shards


# Part files a write task names after its input folder: part-<folder>-<first line>[.interrupted-<n>].jsonl.
_WRITE_PART = re.compile(
    rf"part-({re.escape(VALIDATED_FOLDER)}|{re.escape(SHARD_FOLDER_PREFIX)}\d+)-\d+(\.interrupted-\d+)?\.jsonl"
)


def _remove_other_layouts_parts(folder: ObjectStoragePath, keep: set[str]) -> int:
    """Remove write-step part files named after input folders not in ``keep`` (an earlier attempt of
    the run split into other shards); each write task removes its own stale parts itself."""
    removed = 0
    if folder.is_dir():
        for part in folder.iterdir():
            match = _WRITE_PART.fullmatch(part.name)
            if match and match.group(1) not in keep:
                part.unlink(missing_ok=True)
                removed += 1
    return removed


def shard_validated(
    validated: Mapping[str, Any], *, shard_size: int = DEFAULT_SHARD_SIZE, dry_run: bool = False
) -> list[dict[str, Any]]:
    """Split a run's validated statuses into shards, one mapped write task each.

    A day of up to ``shard_size`` statuses is one shard: the ``validated/`` folder itself, not copied.
    A bigger day is split into :func:`~hubspot_provider.staging.shard_count` folders
    ``validated/shard-NNNNN/``, by a stable hash of each contact's email
    (:func:`~hubspot_provider.staging.shard_of`): every key of a contact, and its opt-out from all
    email, stay in one shard in their validated order, so the last event per key wins and an opt-out
    from all email lands before the contact's later statuses, however many workers write the day.
    Shards hold about ``shard_size`` each (a hash spreads contacts, it does not count them).

    Each shard's write task keeps its own checkpoint (in its folder) and names its dead-letter and
    ledger parts after it, so a retry of one shard resumes that shard only, and a re-run rewrites
    each shard's parts. Shard folders of an earlier attempt are removed first (with their
    checkpoints: new shards are written from their first line), and so are the parts of an earlier
    attempt split another way (a dry run tidies only the plan's, leaving a real run's alone).

    :param validated: what :func:`validate_staged_events` returned.
    :param shard_size: statuses per shard.
    :param dry_run: the run writes nothing; only its plan parts are the write step's to tidy.
    :return: one dict of write-operator keyword arguments per shard (XCom-safe, small):
        ``input_uri, input_count, dead_letter_uri, ledger_uri``; for
        ``HubSpotWriteStatusesOperator.partial(...).expand_kwargs(...)``.
    """
    folder = ObjectStoragePath(str(validated["validated_uri"]))
    shards = shard_staged_input(folder, shard_size=shard_size, lines=int(validated.get("valid") or 0))
    run = folder.parent
    dead_letters = str(validated.get("dead_letter_uri") or run / DEAD_LETTER_FOLDER)
    ledger = str(validated.get("ledger_uri") or run / LEDGER_FOLDER)
    keep = {ObjectStoragePath(shard["input_uri"]).name for shard in shards}
    tidy = [run / PLAN_FOLDER] if dry_run else [ObjectStoragePath(dead_letters), ObjectStoragePath(ledger)]
    for parts in tidy:
        _remove_other_layouts_parts(parts, keep)
    if len(shards) > 1:
        sizes = [shard["input_count"] for shard in shards]
        log.info("Split %d validated statuses into %d shards of about %d (%d to %d each)", sum(sizes),
                 len(shards), shard_size, min(sizes), max(sizes))
    return [{**shard, "dead_letter_uri": dead_letters, "ledger_uri": ledger} for shard in shards]


# ---------------------------------------------------------------------------------------------- outcome

# The write step's XCom: one summary, or one per shard (a mapped task's values, in map-index order).
WriteSummaries = Union[Mapping[str, Any], Iterable[Optional[Mapping[str, Any]]]]



def combine_write_summaries(submitted: WriteSummaries | None) -> dict[str, Any]:
    """One write summary for a run, from the summaries of its shards' write tasks.

    Counts and counts by category add up (and so does the results model, ``report``); the folders
    (``dead_letter_uri``, ``ledger_uri``, ``plan_uri``) are shared by every shard; ``elapsed_s`` is the
    sending time summed over shards, so ``records_per_s`` is per writer. ``shards`` says how many
    summaries there were. A single summary (an unsharded write task) is returned as it is, with
    ``shards`` 1. Nothing per shard is kept: the run's summary stays the same size however many
    shards wrote it.
    """
    if submitted is None:
        return {}
    if isinstance(submitted, Mapping):
        return {"shards": 1, **submitted}
    parts = [part for part in submitted if part]
    if not parts:
        return {}
    combined: dict[str, Any] = {}
    for part in parts:
        combined = _add_summaries(combined, part)
    report = WriteReport()
    for part in parts:
        report += run_report(part)
    combined["report"] = report.model_dump(mode="json", exclude={"failed"})
    elapsed = float(combined.get("elapsed_s") or 0.0)
    combined["elapsed_s"] = round(elapsed, 3)
    combined["records_per_s"] = round(int(combined.get("submitted") or 0) / elapsed, 1) if elapsed > 0 else 0.0
    combined["shards"] = len(parts)
    return combined


def _add_summaries(total: Mapping[str, Any], part: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(total)
    for key, value in part.items():
        if key == "report":
            continue
        have = merged.get(key)
        if isinstance(value, bool) or isinstance(have, bool):
            merged[key] = bool(have) or bool(value)
        elif isinstance(value, (int, float)) and isinstance(have, (int, float)):
            merged[key] = have + value
        elif isinstance(value, Mapping) and isinstance(have, Mapping):
            merged[key] = _add_summaries(have, value)
        elif have is None:
            merged[key] = dict(value) if isinstance(value, Mapping) else value
    return merged




def has_failures(
    extracted: Mapping[str, Any], validated: Mapping[str, Any], submitted: WriteSummaries
) -> bool:
    """Whether the run has anything to report: an event that failed (undecodable, invalid, rejected by
    HubSpot) or rows of the source that fit no interval.

    :param submitted: the write task's summary, or its shards' summaries (see :func:`combine_write_summaries`).
    """
    submitted = combine_write_summaries(submitted)
    return bool(
        extracted.get("undecodable") or extracted.get("unplaceable") or validated.get("invalid")
        or submitted.get("failed")
    )


def count_dead_letters(folder: str | ObjectStoragePath) -> dict[str, Any]:
    """Count the dead letters in a folder (every ``*.jsonl`` file, read line by line).

    :return: ``{"dead_letter_uri", "files", "total", "retryable", "by_category"}``; counts only.
    """
    root = ObjectStoragePath(str(folder))
    by_category: dict[str, int] = {}
    total = retryable = files = 0
    if root.is_dir():
        parts = jsonl_files(root)
        files = len(parts)
        for letter in read_objects(parts):
            letter = letter or {}
            category = str(letter.get("category") or "UNKNOWN")
            by_category[category] = by_category.get(category, 0) + 1
            total += 1
            retryable += bool(letter.get("retryable"))
    return {
        "dead_letter_uri": str(root),
        "files": files,
        "total": total,
        "retryable": retryable,
        "by_category": dict(sorted(by_category.items())),
    }


def run_report(submitted: Mapping[str, Any]) -> WriteReport:
    """The write step's :class:`~hubspot_provider.results.WriteReport`, from its XCom summary.

    The operator puts its report in the summary (``report``); a summary without one (an older
    operator) is read from its flat counts.
    """
    if submitted.get("report"):
        return WriteReport.model_validate(submitted["report"])
    unchanged = int(submitted.get("unchanged", 0))
    changed = int(submitted.get("succeeded", 0)) - unchanged
    return WriteReport(
        submitted=int(submitted.get("submitted", 0)), succeeded=int(submitted.get("succeeded", 0)),
        superseded=int(submitted.get("superseded", 0)), failed_count=int(submitted.get("failed", 0)),
        failed_by_category=dict(submitted.get("failed_by_category") or {}),
        reasons={name: count for name, count in (("NO_STATUS_CHANGE", unchanged), ("CHANGED", changed)) if count},
        requests=int(submitted.get("requests", 0)), retries=int(submitted.get("retries", 0)),
        rate_limited=int(submitted.get("rate_limited", 0)),
    )


def run_totals(
    extracted: Mapping[str, Any],
    validated: Mapping[str, Any],
    submitted: WriteSummaries | None,
    dead_letters: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The run's counts in one flat dict (what ``summary.json`` and the demo show).

    ``failed`` counts every event of the interval that did not land: undecodable rows, invalid input and
    HubSpot's rejections; ``failed_by_category`` merges the three. ``unplaceable`` rows belong to no
    interval and are counted apart. ``submitted`` is the write task's summary, or its shards' summaries
    (added up by :func:`combine_write_summaries`; ``shards`` says how many wrote the run).
    """
    submitted = combine_write_summaries(submitted)
    # One results model: the write step's report, plus the events that failed before it (undecodable
    # rows, invalid input) as failures of the same kind. Every count below derives from it.
    report = run_report(submitted)
    local_invalid = int(extracted.get("undecodable", 0)) + int(validated.get("invalid", 0))
    if local_invalid:
        report += WriteReport(submitted=local_invalid, failed_count=local_invalid,
                              failed_by_category={INVALID_INPUT: local_invalid})
    failed = report.failed_count
    totals = {
        "data_interval_start": extracted.get("data_interval_start"),
        "data_interval_end": extracted.get("data_interval_end"),
        "rows_read": extracted.get("rows_read", 0),
        "events_in_interval": extracted.get("in_interval", 0),
        "outside_interval": extracted.get("outside_interval", 0),
        "superseded": int(extracted.get("superseded", 0)) + report.superseded,
        "superseded_later": extracted.get("superseded_later", 0),
        "superseded_uri": extracted.get("superseded_uri"),
        "unplaceable": extracted.get("unplaceable", 0),
        "unplaceable_uri": extracted.get("unplaceable_uri"),
        "staged": extracted.get("staged", 0),
        "invalid": validated.get("invalid", 0),
        "valid": validated.get("valid", 0),
        "inputs": int(extracted.get("staged", 0)) + int(extracted.get("undecodable", 0)),
        "submitted": submitted.get("submitted", 0),
        "succeeded": report.succeeded,
        "changed": report.changed,
        "unchanged": report.reasons.get("NO_STATUS_CHANGE", 0),
        "failed": failed,
        "failed_by_category": dict(sorted(report.failed_by_category.items())),
        "withheld": report.withheld,
        "withheld_by_category": dict(sorted(report.withheld_by_category.items())),
        "hubspot_changes": submitted.get("hubspot_changes"),
        "reads": report.reads,
        "dry_run": bool(submitted.get("dry_run")),
        "plan": submitted.get("plan"),
        "plan_uri": submitted.get("plan_uri"),
        "shards": submitted.get("shards", 1),
        "dead_letters": (dead_letters or {}).get("total", failed),
        "dead_letter_uri": (dead_letters or {}).get("dead_letter_uri") or validated.get("dead_letter_uri"),
        "run_uri": extracted.get("run_uri"),
        "ledger_uri": submitted.get("ledger_uri"),
        "ledger_records": submitted.get("ledger_records", 0),
        "requests": report.requests,
        "retries": report.retries,
        "rate_limited": report.rate_limited,
        "deferrals": submitted.get("deferrals", 0),
        "elapsed_s": submitted.get("elapsed_s", 0.0),
        "records_per_s": submitted.get("records_per_s", 0.0),
    }
    return totals


def _write_summary(totals: Mapping[str, Any]) -> None:
    if totals.get("run_uri"):
        path = ObjectStoragePath(str(totals["run_uri"])) / SUMMARY_FILE
        path.write_text(json.dumps(dict(totals), indent=2, sort_keys=True) + "\n")


def _describe(totals: Mapping[str, Any]) -> str:
    failed = f"{totals['failed']} failed"
    if totals.get("failed_by_category"):
        failed += f": {categories_in_words(totals['failed_by_category'])}"
    text = (
        f"{totals['events_in_interval']} events in "
        f"[{totals['data_interval_start']}, {totals['data_interval_end']}) "
        f"-> {totals['inputs']} statuses ({totals['superseded']} superseded, "
        f"{totals['superseded_later']} left to later events): {totals['succeeded']} written "
        f"({totals['changed']} changed, {totals['unchanged']} unchanged), {failed}"
    )
    if int(totals.get("shards") or 1) > 1:
        text += f"; written by {totals['shards']} shards"
    if totals.get("withheld"):
        text += (f", {totals['withheld']} withheld because a newer change made in HubSpot wins "
                 f"({categories_in_words(totals.get('withheld_by_category'))})")
    if totals.get("dry_run"):
        text = (f"DRY RUN, nothing written: {totals['events_in_interval']} events in "
                f"[{totals['data_interval_start']}, {totals['data_interval_end']}) -> {totals['inputs']} statuses; "
                f"plan: {plan_in_words(totals.get('plan') or {})}, {failed}")
    if totals.get("unplaceable"):
        text += f"; {totals['unplaceable']} unplaceable rows of the source (no interval) in {totals['unplaceable_uri']}"
    return text


def report_run(
    extracted: Mapping[str, Any], validated: Mapping[str, Any], submitted: WriteSummaries
) -> dict[str, Any]:
    """The clean outcome: log the counts, write ``summary.json`` beside the run's files, return the totals.

    :param submitted: the write task's summary, or its shards' summaries, added up.
    """
    totals = run_totals(extracted, validated, submitted, {"total": 0, "dead_letter_uri": None})
    _write_summary(totals)
    log.info("HubSpot consent sync: %s", _describe(totals))
    return totals


def apply_failure_policy(
    totals: Mapping[str, Any], max_failed_ratio: float, max_unplaceable_rows: int | None = None
) -> None:
    """Fail (without retries) when more than ``max_failed_ratio`` of the run's inputs failed, or the
    source holds more than ``max_unplaceable_rows`` rows that fit no interval (``None``: no limit).

    :raises AirflowFailException: naming the counts, the categories and where the dead letters are.
    """
    unplaceable = int(totals.get("unplaceable") or 0)
    if max_unplaceable_rows is not None and unplaceable > int(max_unplaceable_rows):
        raise AirflowFailException(
            f"The source holds {unplaceable} rows whose occurred_at fits no data interval, more than "
            f"max_unplaceable_rows={int(max_unplaceable_rows)}. They are listed in {totals.get('unplaceable_uri')}; "
            "fix their occurred_at at the source (or raise the limit)"
        )
    problem = failure_ratio_exceeded(
        int(totals.get("failed") or 0), int(totals.get("inputs") or 0), max_failed_ratio, what="consent events",
        by_category=totals.get("failed_by_category"), where=totals.get("dead_letter_uri"),
        fix="Fix the data at the source and re-run the interval, or replay the dead letters with "
        "hubspot_dead_letter_replay",
    )
    if problem is not None:
        raise AirflowFailException(problem)


def log_alert(summary: Mapping[str, Any]) -> None:
    """Write a run's alert (counts and paths, never records) to the task log at WARNING."""
    failed_task = ""
    if summary.get("failed_task"):
        failed_task = f"task {summary['failed_task']} failed ({summary.get('error')}); "
    by_category = categories_in_words(summary.get("failed_by_category"))
    log.warning(
        "HubSpot consent sync: %s%d dead letters%s in %s%s",
        failed_task,
        summary.get("dead_letters", 0),
        f" ({by_category})" if by_category else "",
        summary.get("dead_letter_uri"),
        f"; {summary['unplaceable']} unplaceable rows in {summary.get('unplaceable_uri')}"
        if summary.get("unplaceable") else "",
    )


def _alert(summary: Mapping[str, Any], notifiers: Sequence[Any], context: Mapping[str, Any] | None) -> None:
    log_alert(summary)
    for notifier in notifiers:
        # Airflow notifiers take the task context; the summary rides along for their templates.
        notifier({**(context or {}), "hubspot_summary": dict(summary)})


def summarise_run(
    extracted: Mapping[str, Any],
    validated: Mapping[str, Any],
    submitted: WriteSummaries,
    *,
    max_failed_ratio: float,
    max_unplaceable_rows: int | None = None,
    notifiers: Sequence[Any] = (),
    context: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The outcome with failures: count the dead letters by category, alert, then apply the failure policy.

    The alert goes to the task log (WARNING) and to each of ``notifiers`` (Airflow ``BaseNotifier``
    objects, e.g. :class:`~hubspot_provider.notifications.DeadLetterNotifier` or a Slack notifier),
    called with the task ``context`` plus ``hubspot_summary``. The summary holds counts and paths
    only, never records or emails.

    :param max_failed_ratio: share of the run's inputs allowed to fail before the task fails.
    :param max_unplaceable_rows: rows fitting no interval the source may hold before the task fails.
    :param notifiers: Airflow notifiers to alert through.
    :param context: the task's context, handed to the notifiers.
    :raises AirflowFailException: after alerting, when the failure ratio is above ``max_failed_ratio``.
    """
    # Every dead letter is a failure the steps already counted: nothing is read again to count it.
    submitted = combine_write_summaries(submitted)
    totals = run_totals(extracted, validated, submitted)
    totals["dead_letters_by_category"] = dict(totals["failed_by_category"])
    totals["dead_letters_retryable"] = int(submitted.get("retryable_failed", 0))
    _write_summary(totals)
    log.info("HubSpot consent sync: %s", _describe(totals))
    _alert(totals, notifiers, context)
    apply_failure_policy(totals, max_failed_ratio, max_unplaceable_rows)
    return totals


def failed_task_summary(context: Mapping[str, Any], *, replay: bool = False) -> dict[str, Any]:
    """The alert of a task that failed: which task, why, and the run's dead letters so far (counts only).

    :param replay: the run is a dead-letter replay (its folder comes from the ``dead_letter_uri``
        param) rather than a consent sync (``storage_uri`` param and run id).
    """
    params = context.get("params") or {}
    try:
        if replay:
            folder = replay_folder(params["dead_letter_uri"], str(context["run_id"])) / DEAD_LETTER_FOLDER
        else:
            folder = run_folder(params.get("storage_uri"), str(context["run_id"])) / DEAD_LETTER_FOLDER
        counts = count_dead_letters(folder)
    except Exception:  # noqa: BLE001 - an alert must not hide the task's own failure
        log.exception("Could not count the dead letters of the failed run")
        counts = {"total": 0, "by_category": {}, "dead_letter_uri": None}
    ti = context.get("ti") or context.get("task_instance")
    return {
        "failed_task": getattr(ti, "task_id", None),
        "run_id": context.get("run_id"),
        "error": type(context.get("exception")).__name__ if context.get("exception") else None,
        "dead_letters": counts["total"],
        "failed_by_category": counts["by_category"],
        "dead_letter_uri": counts["dead_letter_uri"],
    }


# ---------------------------------------------------------------------------------------------- replay


def replay_folder(dead_letter_uri: str, run_id: str) -> ObjectStoragePath:
    """Where a replay of ``dead_letter_uri`` keeps its files: ``<dead_letter_uri>/../replay-<run id>``."""
    return ObjectStoragePath(str(dead_letter_uri)).parent / f"replay-{safe_run_id(run_id)}"


def prepare_replay(
    dead_letter_uri: str,
    *,
    run_id: str,
    include_non_retryable: bool = False,
    source_conn_id: str | None = None,
    source_table: str = "consent_events",
    fetch_size: int = DEFAULT_FETCH_SIZE,
) -> dict[str, Any]:
    """Select the dead letters to re-submit into ``<dead_letter_uri>/../replay-<run id>/input/``.

    Reads one dead-letter file, or every ``*.jsonl`` of a folder, line by line; keeps the retryable
    ones (or all, with ``include_non_retryable``) as staged lines ``{"input", "occurredAt"}``.
    Whatever still fails is meant to go to ``replay-<run id>/dead-letters/``.

    A dead letter can be days old when it is replayed, and the contact may have changed their
    consent since. With ``source_conn_id``, the consent source is read from the oldest dead letter's
    ``occurredAt`` on, and a dead letter whose key has a later event there is not replayed
    (``superseded_later``): that event decides, through its own interval's run. Among several dead
    letters for one key only the latest is replayed (``superseded``). Dead letters without an
    ``occurredAt`` cannot be compared and are replayed as they are.

    :param source_conn_id: SQL connection of the consent source, or ``None`` to skip the check.
    :param source_table: its table (a plain identifier).
    :return: ``input_uri, dead_letter_uri, replay_uri, files, selected, skipped, skipped_by_category,
        superseded, superseded_later``.
    :raises FileNotFoundError: when ``dead_letter_uri`` is neither a file nor a folder.
    :raises ValueError: when ``source_conn_id`` names no usable SQL connection.
    """
    source = ObjectStoragePath(str(dead_letter_uri))
    if source.is_dir():
        files = jsonl_files(source)
    elif source.is_file():
        files = [source]
    else:
        raise FileNotFoundError(
            f"dead_letter_uri {dead_letter_uri} is neither a file nor a folder; pass the dead-letters/ "
            "folder of a hubspot_consent_sync run (see its summary.json) or one of its part files"
        )
    source_check = None
    if source_conn_id:
        table = check_identifier(source_table)
        try:
            hook, conn_type = _source_hook(source_conn_id)
        except Exception as error:
            raise ValueError(
                f"source_conn_id {source_conn_id!r} cannot be used to check for later consent events "
                f"({error}); set it to the consent source's SQL connection, or to null to replay without "
                "the check"
            ) from error
        source_check = (hook, conn_type, table, getattr(hook, "placeholder", "%s") or "%s")
    replay = replay_folder(dead_letter_uri, run_id)
    input_folder = replay / REPLAY_INPUT_FOLDER
    _clear_folder(input_folder)
    selected = candidates = superseded_later = 0
    skipped: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="hubspot-replay-") as scratch_dir:
        latest = _LatestPerKey(scratch_dir)
        try:
            with (input_folder / REPLAY_INPUT_FILE).open("w", encoding="utf-8") as out:
                for letter in read_objects(files):
                    if letter is None or not isinstance(letter.get("input"), dict):
                        skipped["NOT_A_DEAD_LETTER"] = skipped.get("NOT_A_DEAD_LETTER", 0) + 1
                        continue
                    if not include_non_retryable and letter.get("retryable") is not True:
                        category = str(letter.get("category") or "UNKNOWN")
                        skipped[category] = skipped.get(category, 0) + 1
                        continue
                    candidates += 1
                    line = dumps({"input": letter["input"], "occurredAt": letter.get("occurredAt")})
                    moment = parse_occurred_at(letter.get("occurredAt"))
                    if source_check is None or moment is None:
                        out.write(line + "\n")
                        selected += 1
                    else:
                        latest.add(status_key(letter["input"]), moment, line, _contact(letter["input"]),
                                   letter["input"].get("statusState") == UNSUBSCRIBE_ALL)
                since = latest.earliest()
                if source_check is not None and since is not None:
                    hook, conn_type, table, placeholder = source_check
                    latest.mark_changed_since(hook, conn_type, table, placeholder, since, fetch_size)
                    superseded_later = latest.superseded_later()
                selected += latest.write_lines(out)
        finally:
            latest.close()
    result = {
        "input_uri": str(input_folder),
        "dead_letter_uri": str(replay / DEAD_LETTER_FOLDER),
        "replay_uri": str(replay),
        "files": len(files),
        "selected": selected,
        "skipped": sum(skipped.values()),
        "skipped_by_category": dict(sorted(skipped.items())),
        "superseded": candidates - selected - superseded_later,
        "superseded_later": superseded_later,
    }
    log.info(
        "Replay: %d dead letters selected from %d file(s); %d skipped %s; %d superseded by a later dead "
        "letter for the same key, %d by a later event in the source",
        selected, len(files), result["skipped"], result["skipped_by_category"] or "", result["superseded"],
        superseded_later,
    )
    return result


# ---------------------------------------------------------------------------------------------- pool


def ensure_pool(
    name: str = HUBSPOT_POOL, slots: int = HUBSPOT_POOL_SLOTS, description: str = HUBSPOT_POOL_DESCRIPTION
) -> dict[str, Any]:
    """Create the Airflow pool ``name`` when it does not exist yet; an existing pool is left as configured.

    Airflow's scheduler never queues a task whose pool is missing (it stays *scheduled*, with a
    "non-existent pool" warning). The provider's plugin (:mod:`hubspot_provider.plugins`) calls this
    when the scheduler, DAG processor or triggerer starts, so a fresh Airflow needs no manual step.
    Where the metadata database is out of reach, the check is skipped with a warning naming the
    one-time fix::

        airflow pools set hubspot_api 2 "HubSpot API writes" --include-deferred

    :return: ``{"pool", "slots", "created", "checked"}``.
    """
    try:
        from airflow.models.pool import Pool

        existing = Pool.get_pool(name)
        if existing is not None:
            return {"pool": name, "slots": existing.slots, "created": False, "checked": True}
        Pool.create_or_update_pool(name=name, slots=slots, description=description, include_deferred=True)
    except Exception as exc:  # noqa: BLE001 - a worker without metadata-DB access raises various errors
        log.warning(
            "Cannot check Airflow pool %r from this worker (%s: %s). If the next task stays 'scheduled', "
            "create the pool once: airflow pools set %s %d %r --include-deferred",
            name, type(exc).__name__, exc, name, slots, description,
        )
        return {"pool": name, "slots": None, "created": False, "checked": False}
    log.info("Created Airflow pool %r with %d slots", name, slots)
    return {"pool": name, "slots": slots, "created": True, "checked": True}


def report_replay(
    prepared: Mapping[str, Any],
    submitted: Mapping[str, Any],
    *,
    max_failed_ratio: float,
    notifiers: Sequence[Any] = (),
    context: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Log and store (``<replay>/summary.json``) a replay's counts; alert and apply the policy on failures.

    :param prepared: what :func:`prepare_replay` returned.
    :param submitted: the write operator's XCom summary.
    :raises AirflowFailException: when more than ``max_failed_ratio`` of the replayed inputs failed again.
    """
    # What failed again is what the write step counted: its dead letters are not read again to count them.
    totals = {
        "replay_uri": prepared["replay_uri"],
        "selected": prepared["selected"],
        "skipped": prepared["skipped"],
        "skipped_by_category": prepared.get("skipped_by_category", {}),
        "superseded": prepared.get("superseded", 0),
        "superseded_later": prepared.get("superseded_later", 0),
        "inputs": prepared["selected"],
        "submitted": submitted.get("submitted", 0),
        "succeeded": submitted.get("succeeded", 0),
        "changed": submitted.get("changed", 0),
        "unchanged": submitted.get("unchanged", 0),
        "failed": submitted.get("failed", 0),
        "failed_by_category": submitted.get("failed_by_category", {}),
        "dead_letters": submitted.get("failed", 0),
        "dead_letter_uri": prepared["dead_letter_uri"],
        "requests": submitted.get("requests", 0),
        "records_per_s": submitted.get("records_per_s", 0.0),
    }
    (ObjectStoragePath(str(prepared["replay_uri"])) / SUMMARY_FILE).write_text(
        json.dumps(totals, indent=2, sort_keys=True) + "\n"
    )
    log.info(
        "HubSpot dead-letter replay: %d selected (%d skipped): %d written (%d changed, %d unchanged), "
        "%d failed again",
        totals["selected"], totals["skipped"], totals["succeeded"], totals["changed"], totals["unchanged"],
        totals["failed"],
    )
    if totals["failed"]:
        _alert(totals, notifiers, context)
    apply_failure_policy(totals, max_failed_ratio)
    return totals
