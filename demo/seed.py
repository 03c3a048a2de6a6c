"""Seed a SQLite consent table with a realistic, reproducible day of consent events.

The table follows the consent sync's source contract (see ``hubspot_provider.consent``)::

    consent_events(email, subscription_id, status, legal_basis, legal_basis_explanation, occurred_at)

Most events are good; a few are the kind of thing a real preference-centre export contains:
mistyped emails, statuses in the wrong spelling, subscriptions HubSpot does not know, timestamps
that are not timestamps, events of the neighbouring days, and several events per contact and
subscription (only the latest counts). ``occurred_at`` is text in four styles, as SQLite keeps it.

Run ``python demo/seed.py --help``.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
from collections import Counter
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

SUBSCRIPTIONS = (1001, 1002, 1003)  # what the emulator's portal defines
UNKNOWN_SUBSCRIPTIONS = (1004, 2001)
LEGAL_BASES = ("CONSENT_WITH_NOTICE", "LEGITIMATE_INTEREST_CLIENT", "PERFORMANCE_OF_CONTRACT", "NON_GDPR")
EXPLANATIONS = {
    "CONSENT_WITH_NOTICE": "Ticked the newsletter box on the sign-up form",
    "LEGITIMATE_INTEREST_CLIENT": "Existing customer, product communication",
    "PERFORMANCE_OF_CONTRACT": "Service messages required by the contract",
    "NON_GDPR": "Contact outside the EEA",
}
FIRST = (
    "ada", "alan", "grace", "linus", "margaret", "dennis", "barbara", "ken", "frances", "edsger",
    "radia", "tim", "hedy", "john", "katherine", "donald", "sophie", "niklaus", "anita", "guido",
)
LAST = (
    "lovelace", "turing", "hopper", "torvalds", "hamilton", "ritchie", "liskov", "thompson", "allen",
    "dijkstra", "perlman", "berners-lee", "lamarr", "backus", "johnson", "knuth", "wilson", "wirth", "borg",
    "van-rossum",
)
DOMAINS = ("example.com", "example.org", "mail.example.net", "corp.example.co.uk")
BAD_EMAILS = ("{first}.{last}.example.com", "{first}@", "{first}@@example.com", "{first} {last}@example.com",
              "@example.com", "{first}@example")
BAD_STATUSES = ("subscribed", "OPTED_OUT", "", "UNSUBSCRIBE", "yes")
BAD_TIMESTAMPS = ("yesterday", "31/02/2026 10:00", "2026-02-30 10:00:00", "n/a", "")


def _timestamp_text(moment: datetime, style: int) -> str:
    if style == 0:
        return moment.strftime("%Y-%m-%d %H:%M:%S")  # no offset: UTC by contract
    if style == 1:
        return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
    offset = timezone(timedelta(hours=1)) if style == 2 else timezone(timedelta(hours=-5))
    return moment.astimezone(offset).isoformat(timespec="seconds")


def generate(day: date, contacts: int = 1500, seed: int = 42) -> list[tuple]:
    """Rows for ``day`` (UTC): about 2.7 events per contact, a few percent of them bad or off-day."""
    rng = random.Random(seed)
    start = datetime(day.year, day.month, day.day, tzinfo=timezone.utc)
    rows: list[tuple] = []
    for n in range(contacts):
        first, last = rng.choice(FIRST), rng.choice(LAST)
        email = f"{first}.{last}{n}@{rng.choice(DOMAINS)}"
        if rng.random() < 0.03:
            email = rng.choice(BAD_EMAILS).format(first=first, last=f"{last}{n}")
        subscriptions = rng.sample(SUBSCRIPTIONS, k=rng.choice((1, 1, 2, 3)))
        if rng.random() < 0.02:
            subscriptions.append(rng.choice(UNKNOWN_SUBSCRIPTIONS))
        for subscription_id in subscriptions:
            for _ in range(rng.choice((1, 1, 2, 2, 3))):
                moment = start + timedelta(seconds=rng.randrange(86_400))
                if rng.random() < 0.08:  # late or early arrivals from the neighbouring days
                    moment += timedelta(days=rng.choice((-1, 1)))
                status = rng.choice(("SUBSCRIBED", "SUBSCRIBED", "UNSUBSCRIBED", "NOT_SPECIFIED"))
                if rng.random() < 0.02:
                    status = rng.choice(BAD_STATUSES)
                occurred_at = _timestamp_text(moment, rng.randrange(4))
                if rng.random() < 0.005:
                    occurred_at = rng.choice(BAD_TIMESTAMPS)
                basis = rng.choice(LEGAL_BASES) if rng.random() < 0.5 else None
                # Exports differ in the case of the email; the key is case-insensitive.
                shown = email.upper() if rng.random() < 0.05 else email
                rows.append((shown, subscription_id, status, basis, EXPLANATIONS.get(basis), occurred_at))
        if rng.random() < 0.01:  # a contact who asks for no email at all: no subscription named
            moment = start + timedelta(seconds=rng.randrange(86_400))
            rows.append((email, None, "UNSUBSCRIBE_ALL", None, None, _timestamp_text(moment, 0)))
    rng.shuffle(rows)
    return rows


def seed(path: Path, day: date, contacts: int = 1500, seed: int = 42) -> dict[str, int]:
    """(Re)create ``consent_events`` in the SQLite file ``path``; returns a few counts of what was written."""
    rows = generate(day, contacts=contacts, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    try:
        db.execute("DROP TABLE IF EXISTS consent_events")
        db.execute(
            "CREATE TABLE consent_events (email TEXT NOT NULL, subscription_id INTEGER, status TEXT, "
            "legal_basis TEXT, legal_basis_explanation TEXT, occurred_at TEXT)"
        )
        db.executemany("INSERT INTO consent_events VALUES (?, ?, ?, ?, ?, ?)", rows)
        db.commit()
    finally:
        db.close()
    keys = Counter((r[0].lower(), r[1]) for r in rows)
    return {"events": len(rows), "keys": len(keys), "contacts": contacts}


def main() -> None:
    """Command line: ``python demo/seed.py PATH [--day YYYY-MM-DD] [--contacts N] [--seed N]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, help="SQLite file to (re)create")
    parser.add_argument(
        "--day", type=date.fromisoformat, default=date(2026, 3, 10), help="UTC day of the events"
    )
    parser.add_argument("--contacts", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    counts = seed(args.path, args.day, contacts=args.contacts, seed=args.seed)
    print(f"Seeded {counts['events']} consent events for {args.day} into {args.path}")


if __name__ == "__main__":
    main()
