"""Test data for the consent sync: a SQLite source table, events over several days, expected statuses."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta
from pathlib import Path

from hubspot_provider import consent

Key = tuple[str, int, str]


def changes_over_days(days: list[datetime], contacts: int = 30) -> list[tuple]:
    """Source rows: every contact changes on the first day; a third last changes on each later day.

    A contact's status flips from one day to the next, so a stale write is always visible.
    """
    rows = []
    for n, day in enumerate(days):
        for i in range(contacts):
            if n > i % len(days):
                continue
            state = ("SUBSCRIBED", "UNSUBSCRIBED")[(i + n) % 2]
            rows.append((f"user{i}@example.com", 1001 + i % 2, state, None, None,
                         (day + timedelta(hours=i % 20)).strftime("%Y-%m-%d %H:%M:%S")))
    return rows


def latest_of_all_days(rows: list[tuple]) -> dict[Key, str]:
    """The latest event per key over every row (later row on ties)."""
    latest: dict[Key, tuple[datetime, str]] = {}
    for email, subscription_id, status, _lb, _lbe, occurred_at in rows:
        moment = consent.parse_occurred_at(occurred_at)
        key = (email.strip().lower(), subscription_id, "EMAIL")
        if key not in latest or moment >= latest[key][0]:
            latest[key] = (moment, status)
    return {key: status for key, (_moment, status) in latest.items()}


def write_consent_table(path: Path, rows: list[tuple]) -> Path:
    """(Re)create ``consent_events`` in the SQLite file ``path`` in the source contract's shape.

    ``occurred_at`` is text, as SQLite keeps timestamps.
    """
    conn = sqlite3.connect(path)
    try:
        conn.execute("DROP TABLE IF EXISTS consent_events")
        conn.execute(
            "CREATE TABLE consent_events (email TEXT, subscription_id INTEGER, status TEXT, "
            "legal_basis TEXT, legal_basis_explanation TEXT, occurred_at TEXT)"
        )
        conn.executemany("INSERT INTO consent_events VALUES (?, ?, ?, ?, ?, ?)", rows)
        conn.commit()
    finally:
        conn.close()
    return path
