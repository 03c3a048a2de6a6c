"""Consent events over several days, and the statuses HubSpot must end with once every day has run."""

from __future__ import annotations

from datetime import datetime, timedelta

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
