"""Helpers for tests that need real services: their addresses, skipping (or failing on CI) where one is absent,
stopping their process groups, a fresh PostgreSQL database."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

# The database servers the project's machines run on loopback (see the README).
REQUIRED = os.environ.get("HUBSPOT_PROVIDER_REQUIRE_SERVICES") == "1"
PG = {"host": os.environ.get("HUBSPOT_TEST_PG_HOST", "127.0.0.1"), "port": 5432, "user": "postgres",
      "dbname": "test"}
MARIADB = {"host": os.environ.get("HUBSPOT_TEST_MARIADB_HOST", "127.0.0.1"), "port": 3306, "user": "root",
           "password": "", "database": "test"}


def missing(reason: str) -> None:
    """Skip a test whose service or tool is absent, with the reason; fail instead where CI requires them."""
    import pytest

    if REQUIRED:
        pytest.fail(f"{reason}; HUBSPOT_PROVIDER_REQUIRE_SERVICES=1 requires it")
    pytest.skip(reason)


def unavailable(what: str, error: Exception) -> None:
    """:func:`missing`, for a server that did not answer."""
    missing(f"{what} is not reachable ({type(error).__name__}: {str(error).strip()[:120]})")


def stop_process_groups(processes: Iterable[subprocess.Popen], grace_s: float = 30.0) -> None:
    """SIGTERM every process group still running, then SIGKILL those not gone within ``grace_s``."""
    processes = list(processes)
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextmanager
def fresh_postgres_database(prefix: str) -> Iterator[str]:
    """A new database on the local PostgreSQL (a SQLAlchemy URL), dropped afterwards."""
    import psycopg2

    try:
        admin = psycopg2.connect(connect_timeout=3, **PG)
    except psycopg2.OperationalError as exc:
        unavailable(f"PostgreSQL at {PG['host']}:{PG['port']}", exc)
    admin.autocommit = True
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql+psycopg2://{PG['user']}@{PG['host']}:{PG['port']}/{name}"
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()
