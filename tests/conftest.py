"""Test set-up. Airflow reads its settings at import time, so they are fixed here, before any import."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_home = Path(tempfile.mkdtemp(prefix="hubspot-provider-airflow-"))
os.environ["AIRFLOW_HOME"] = str(_home)
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "True"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "dags")
os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "INFO")

import pytest  # noqa: E402

SPEC_DIR = REPO.parent / "shared" / "hubspot-spec"


@pytest.fixture
def hubspot_conn(monkeypatch):
    """Point an Airflow connection (default ``hubspot_default``) at an emulator via an env var."""

    def connect(emulator, conn_id: str = "hubspot_default", **extra) -> str:
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", emulator.airflow_connection(conn_id, **extra))
        return conn_id

    return connect


@pytest.fixture
def task_log(capfd):
    """Everything Airflow's loggers wrote so far (its structlog handlers print; caplog sees nothing).

    Call it to get the text; tests that check what a log holds assert first that it holds the
    expected lines, so a capture that missed everything cannot pass.
    """
    seen: list[str] = []

    def text() -> str:
        out, err = capfd.readouterr()
        seen.append(out + err)
        return "".join(seen)

    return text


# ----------------------------------------------------------------------- the real database servers


@pytest.fixture
def postgres(monkeypatch):
    """A DB-API connection to PostgreSQL, and Airflow connection ``pg_source`` to the same database."""
    import psycopg2
    from services import PG, unavailable

    try:
        conn = psycopg2.connect(connect_timeout=3, **PG)
    except psycopg2.OperationalError as exc:
        unavailable(f"PostgreSQL at {PG['host']}:{PG['port']}", exc)
    conn.autocommit = True
    monkeypatch.setenv("AIRFLOW_CONN_PG_SOURCE", json.dumps({
        "conn_type": "postgres", "host": PG["host"], "port": PG["port"], "login": PG["user"], "schema": PG["dbname"],
    }))
    yield conn
    conn.close()


@pytest.fixture
def mariadb(monkeypatch):
    """A DB-API connection to MariaDB, and Airflow connection ``mariadb_source`` to the same database."""
    import mysql.connector
    from services import MARIADB, unavailable

    try:
        conn = mysql.connector.connect(connection_timeout=3, autocommit=True, **MARIADB)
    except mysql.connector.Error as exc:
        unavailable(f"MariaDB at {MARIADB['host']}:{MARIADB['port']}", exc)
    monkeypatch.setenv("AIRFLOW_CONN_MARIADB_SOURCE", json.dumps({
        "conn_type": "mysql", "host": MARIADB["host"], "port": MARIADB["port"], "login": MARIADB["user"],
        "password": MARIADB["password"], "schema": MARIADB["database"],
        "extra": {"client": "mysql-connector-python"},
    }))
    yield conn
    conn.close()
