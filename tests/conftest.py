"""Test set-up. Airflow reads its settings at import time, so they are fixed here, before any import."""

from __future__ import annotations

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
