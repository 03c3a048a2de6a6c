"""Airflow's own web UI in headless Chromium: the HubSpot connection form, its Test button, a run from the
trigger form, and the run's summary where the grid view shows it.

A real Airflow runs on loopback: API server (simple auth manager, one admin with a known password),
scheduler (LocalExecutor), DAG processor and triggerer, on a fresh SQLite home, with the emulator as
HubSpot. Chromium is Debian's (``/usr/bin/chromium``), driven by Playwright for Python. Where it is
missing the browser test skips with the reason; with ``HUBSPOT_PROVIDER_REQUIRE_SERVICES=1`` (set by
``.ci/run``, which installs it) it fails instead. Screenshots land in the test's tmp folder
(``screenshots/``). The services cost about a minute to start, so one module-wide Airflow serves
every test here.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import requests
from consent_days import changes_over_days, write_consent_table
from services import missing, stop_process_groups

from hubspot_provider.run_summary import FIELD, run_summary_note, run_summary_text
from hubspot_provider.testing import HubSpotEmulator

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
ADMIN, PASSWORD = "admin", "browser-test-password"
DAG_ID = "hubspot_consent_sync"
DAY = datetime(2026, 3, 10, tzinfo=timezone.utc)
WAIT_S = 240

pytestmark = pytest.mark.timeout(900)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(what: str, check: Callable[[], Any], logs: Path, timeout_s: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = check()
        except (requests.RequestException, sqlite3.OperationalError):
            value = None
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}; see the logs in {logs}")


class Airflow:
    """A real Airflow on loopback: its services, its REST API (as the admin) and its metadata DB."""

    def __init__(self, home: Path, env: dict[str, str], port: int) -> None:
        self.home = home
        self.env = env
        self.url = f"http://127.0.0.1:{port}"
        self.services: list[subprocess.Popen] = []
        self.api = requests.Session()

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "airflow", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, f"airflow {' '.join(args)}:\n{done.stderr[-3000:]}"
        return done.stdout

    def start(self, *args: str) -> None:
        log = (self.home / f"{args[0]}.log").open("w")
        # A session of its own, so that stopping it also stops the workers it forked.
        self.services.append(
            subprocess.Popen(
                [sys.executable, "-m", "airflow", *args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )

    def stop(self) -> None:
        stop_process_groups(self.services)

    def login(self) -> None:
        answer = requests.post(
            f"{self.url}/auth/token", json={"username": ADMIN, "password": PASSWORD}, timeout=30
        )
        answer.raise_for_status()
        self.api.headers["Authorization"] = f"Bearer {answer.json()['access_token']}"

    def get(self, path: str) -> Any:
        answer = self.api.get(f"{self.url}/api/v2/{path}", timeout=30)
        answer.raise_for_status()
        return answer.json()

    def stored_connection(self, conn_id: str) -> dict[str, Any] | None:
        """The connection's row as stored (the API's answers are redacted, and filled for the form)."""
        from configparser import ConfigParser

        from cryptography.fernet import Fernet

        db = sqlite3.connect(self.home / "airflow.db", timeout=60)
        try:
            row = db.execute(
                "SELECT host, port, extra, is_extra_encrypted FROM connection WHERE conn_id = ?", (conn_id,)
            ).fetchone()
        finally:
            db.close()
        if row is None:
            return None
        host, port, extra, encrypted = row
        if encrypted:
            config = ConfigParser(interpolation=None)
            config.read(self.home / "airflow.cfg")
            extra = Fernet(config["core"]["fernet_key"].encode()).decrypt(extra.encode()).decode()
        return {"host": host, "port": port, "extra": extra}


@pytest.fixture(scope="module")
def airflow(tmp_path_factory) -> Iterator[Airflow]:
    home = tmp_path_factory.mktemp("airflow")
    source = home / "consent.db"
    write_consent_table(source, changes_over_days([DAY]))
    (home / "passwords.json").write_text(json.dumps({ADMIN: PASSWORD}))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}?timeout=60",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
            "AIRFLOW__CORE__TEST_CONNECTION": "Enabled",
            # Only the run triggered from the form; a failed run fails now, not after 5-minute retries.
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
            "AIRFLOW__HUBSPOT__TASK_RETRIES": "0",
            # The HubSpot connection is made in the form; the consent source comes from the environment.
            "AIRFLOW_CONN_HUBSPOT_CONSENT_SOURCE": json.dumps({"conn_type": "sqlite", "host": str(source)}),
        }
    )
    af = Airflow(home, env, port)
    af.emulator = HubSpotEmulator().start()
    af.cli("db", "migrate")
    try:
        af.start("api-server", "--host", "127.0.0.1", "--port", str(port))
        af.start("scheduler", "--skip-serve-logs")
        af.start("dag-processor")
        af.start("triggerer", "--skip-serve-logs")
        health = wait_for(
            "the API server and the other services",
            lambda: (
                all(
                    part.get("status") == "healthy"
                    for name, part in requests.get(f"{af.url}/api/v2/monitor/health", timeout=5)
                    .json()
                    .items()
                    if name in ("metadatabase", "scheduler", "dag_processor", "triggerer")
                )
                and "healthy"
            ),
            home,
        )
        assert health
        af.login()
        wait_for("the DAG processor to store the DAG", lambda: af.get(f"dags/{DAG_ID}"), home)
        yield af
    finally:
        af.stop()
        af.emulator.stop()


# What a connection made in the form keeps in its extra: no empty fields' nulls, no short defaults.
SAVED_EXTRA = {"batch_size": 100, "timeout": 30, "deadline": 60, "max_response_bytes": 33554432, "max_retries": 8}

# --------------------------------------------------------------------------- the API, as the form calls it


def test_what_the_form_sends_is_saved_clean_and_tests_green(airflow):
    """The exact bodies Airflow 3.3's form sends (recorded from the browser), through the real API server."""
    extra = {
        "api_version": "v4",
        "batch_size": 100,
        "timeout": 30,
        "deadline": 60,
        "max_response_bytes": 33554432,
        "max_retries": 8,
        "portal_timezone": "UTC",
        "client_id": None,
        "client_secret": None,
        "refresh_token": None,
        "oauth_token_path": None,
    }
    saved = airflow.api.post(
        f"{airflow.url}/api/v2/connections",
        json={
            "conn_type": "hubspot",
            "connection_id": "hubspot_api_form",
            "extra": json.dumps(extra, indent=2),
            "host": airflow.emulator.url,
            "password": airflow.emulator.token,
        },
        timeout=30,
    )
    assert saved.status_code == 201, saved.text
    stored = airflow.stored_connection("hubspot_api_form")
    assert json.loads(stored["extra"]) == SAVED_EXTRA

    # What the list answers (and the edit form shows): every field, the defaults filled in, secrets hidden.
    listed = airflow.get("connections/hubspot_api_form")
    assert json.loads(listed["extra"])["portal_timezone"] == "UTC" and listed["password"] == "***"

    # The list's Test button: the stored connection, port 0, the password hidden.
    tested = airflow.api.post(
        f"{airflow.url}/api/v2/connections/test",
        json={
            "conn_type": "hubspot",
            "connection_id": "hubspot_api_form",
            "description": "",
            "extra": listed["extra"],
            "host": airflow.emulator.url,
            "login": "",
            "password": "***",
            "port": 0,
            "schema": "",
        },
        timeout=60,
    )
    assert tested.status_code == 200, tested.text
    assert tested.json() == {
        "status": True,
        "message": (
            f"Connected to HubSpot at {airflow.emulator.url} (v4, portal time zone UTC): 3 subscription definitions. "
            "Writing statuses also needs the scope communication_preferences.statuses.batch.write"
        ),
    }

    # A new connection tested before it is saved, with a wrong token: the message names the user's id.
    tested = airflow.api.post(
        f"{airflow.url}/api/v2/connections/test",
        json={
            "conn_type": "hubspot",
            "connection_id": "not_saved_yet",
            "host": airflow.emulator.url,
            "password": "pat-na1-wrong",
            "port": 0,
            "extra": "{}",
        },
        timeout=60,
    ).json()
    assert tested["status"] is False
    assert "connection 'not_saved_yet'" in tested["message"]
    assert "in the Access token field (the connection's password)" in tested["message"]
    assert "pat-na1-wrong" not in tested["message"]


# --------------------------------------------------------------------------- in the browser


@pytest.fixture(scope="module")
def browser():
    reason = None
    if not CHROMIUM.exists():
        reason = f"Debian's chromium is not installed at {CHROMIUM} (apt-get install chromium)"
    else:
        try:
            from playwright.sync_api import sync_playwright
        except ImportError as exc:  # the test extra installs it
            reason = f"Playwright for Python is not installed ({exc})"
    if reason:
        missing(reason)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Callable[[Any, str], None]:
    folder = tmp_path_factory.mktemp("screenshots")

    def shot(page, name: str) -> None:
        page.screenshot(path=str(folder / f"{name}.png"), full_page=True)

    shot.folder = folder
    return shot


@pytest.fixture(scope="module")
def page(browser, airflow):
    context = browser.new_context(viewport={"width": 1400, "height": 1100})
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(f"{airflow.url}/")
    page.get_by_label("Username").fill(ADMIN)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{airflow.url}/")
    yield page
    context.close()


def row_of(page, airflow, conn_id: str):
    page.goto(f"{airflow.url}/connections")
    return page.locator("tr", has_text=conn_id)


def click_test(page, airflow, expected: str) -> dict[str, Any]:
    """Click the Test button of ``hubspot_default`` in the list; the API's answer, once the UI shows it."""
    with page.expect_response(lambda r: r.url.endswith("/api/v2/connections/test")) as answer:
        row_of(page, airflow, "hubspot_default").get_by_role("button", name="Test Connection").click()
    result = answer.value.json()
    page.get_by_text(expected).first.wait_for()
    return result


def edit_time_zone(page, airflow, zone: str) -> None:
    row_of(page, airflow, "hubspot_default").get_by_role("button", name="Edit Connection").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_text("Extra Fields", exact=True).click()
    # Every field is there, though the stored extra holds only what differs from the defaults.
    for label in ("API version", "Portal time zone", "OAuth client id", "OAuth token endpoint"):
        dialog.get_by_text(label, exact=True).wait_for()
    dialog.locator("#element_portal_timezone").fill(zone)
    with page.expect_response(
        lambda r: r.request.method == "PATCH" and "/api/v2/connections/" in r.url
    ) as saved:
        dialog.get_by_role("button", name="Save").click()
    assert saved.value.status == 200, saved.value.text()


def test_a_connection_made_in_the_form_tests_green_and_syncs_a_day_from_the_trigger_form(
    page, airflow, shots
):
    url, token = airflow.emulator.url, airflow.emulator.token

    # The form: type, API base URL and access token; everything else left as the form shows it.
    page.goto(f"{airflow.url}/connections")
    page.get_by_role("button", name="Add Connection").first.click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_label("Connection ID").fill("hubspot_default")
    dialog.locator("input[role=combobox]").first.fill("HubSpot")
    page.keyboard.press("Enter")
    dialog.get_by_label("API base URL").fill(url)
    dialog.get_by_label("Access token (private app or service key)").fill(token)
    dialog.get_by_text("Extra Fields", exact=True).click()
    # No literal "null" to choose, and the documented OAuth token endpoint is offered.
    dialog.get_by_text("OAuth token endpoint", exact=True).wait_for()
    shots(page, "1-connection-form")
    with page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("/api/v2/connections")):
        dialog.get_by_role("button", name="Save").click()
    stored = airflow.stored_connection("hubspot_default")
    assert stored["host"] == url and stored["port"] is None
    # Saved without the empty fields' nulls and without the short defaults Airflow's masker warns about.
    assert json.loads(stored["extra"]) == SAVED_EXTRA

    # Test from the list: green, although the list sends port 0 for the empty port.
    result = click_test(page, airflow, "Test Connection Successful")
    assert result["status"] is True, result
    assert result["message"].startswith(f"Connected to HubSpot at {url} (v4, portal time zone UTC)")
    shots(page, "2-connection-tested")

    # A time zone from elsewhere fails the test, naming the user's connection.
    edit_time_zone(page, airflow, "Mars/Olympus")
    result = click_test(page, airflow, "Test Connection Failed")
    assert result == {
        "status": False,
        "message": "Connection 'hubspot_default': portal_timezone 'Mars/Olympus' "
        "is not an IANA time zone (e.g. Europe/Berlin)",
    }
    shots(page, "3-connection-test-failed")
    edit_time_zone(page, airflow, "Europe/Berlin")
    result = click_test(page, airflow, "Test Connection Successful")
    assert "portal time zone Europe/Berlin" in result["message"]
    assert (
        json.loads(airflow.stored_connection("hubspot_default")["extra"])["portal_timezone"]
        == "Europe/Berlin"
    )

    # The trigger form: the run for logical date 2026-03-11 syncs 2026-03-10, as `airflow dags test` would.
    page.goto(f"{airflow.url}/dags/{DAG_ID}")
    page.get_by_role("button", name="Trigger").first.click()
    page.get_by_test_id("datetime-input").click()
    picker = page.locator("[data-scope=popover][data-part=content][data-state=open]")
    picker.get_by_placeholder("YYYY/MM/DD").fill("2026/03/11")
    picker.get_by_placeholder("HH:mm").fill("00:00")
    picker.get_by_placeholder("HH:mm").press("Tab")
    page.keyboard.press("Escape")
    assert page.get_by_test_id("datetime-input").inner_text() == "Mar 11, 2026 00:00"
    shots(page, "4-trigger-form")
    with page.expect_response(
        lambda r: r.request.method == "POST" and r.url.endswith(f"/{DAG_ID}/dagRuns")
    ) as made:
        page.get_by_role("button", name="Trigger", exact=True).last.click()
    run = made.value.json()
    assert (run["data_interval_start"], run["data_interval_end"]) == (
        "2026-03-10T00:00:00Z",
        "2026-03-11T00:00:00Z",
    )
    state = wait_for(
        "the run to finish",
        lambda: (
            (s := airflow.get(f"dags/{DAG_ID}/dagRuns/{run['dag_run_id']}")["state"]) in ("success", "failed")
            and s
        ),
        airflow.home,
    )
    assert state == "success"
    airflow.run_id = run["dag_run_id"]

    # The connection made in the form is the one the run wrote through.
    assert len(airflow.emulator.statuses) == 30
    assert all(r.path.startswith("/communication-preferences/v4/") for r in airflow.emulator.requests)
    page.goto(f"{airflow.url}/dags/{DAG_ID}/runs/{run['dag_run_id']}")
    page.get_by_text("Success").first.wait_for()
    shots(page, "5-run")


def test_the_runs_summary_is_shown_in_the_grid_view(page, airflow, shots):
    run_id = getattr(airflow, "run_id", None)
    assert run_id, "the run from the trigger form did not finish"
    (summary_file,) = airflow.home.glob("hubspot_consent/*/summary.json")
    summary = json.loads(summary_file.read_text())
    expected = run_summary_text(summary)

    # The run's note, under the run's header in the grid view: its first line is the outcome.
    assert airflow.get(f"dags/{DAG_ID}/dagRuns/{run_id}")["note"] == run_summary_note(summary)
    page.goto(f"{airflow.url}/dags/{DAG_ID}/runs/{run_id}")
    page.get_by_text("HubSpot sync").first.wait_for(timeout=15_000)
    page.get_by_text("30 written (30 changed), 0 failed, 0 withheld, 0 dead letters").first.wait_for()
    shots(page, "6-run-note")

    # The report task's Rendered Templates tab.
    page.goto(f"{airflow.url}/dags/{DAG_ID}/runs/{run_id}/tasks/report/rendered_templates")
    row = page.locator("tr", has_text=FIELD)
    row.wait_for(timeout=15_000)
    shots(page, "7-run-summary-on-the-report-task")
    shown = " ".join(row.inner_text().split())
    for line in expected.splitlines():
        assert " ".join(line.split()) in shown
    assert "Written to HubSpot 30: 30 changed, 0 already in that state" in shown
    assert not re.search(r"[\w.+-]+@[\w-]+\.[\w.]+", shown)  # no email address


def test_the_trigger_form_keeps_a_bad_param_and_refuses_it_with_our_sentence(page, airflow, shots):
    runs_before = airflow.get(f"dags/{DAG_ID}/dagRuns")["total_entries"]
    page.goto(f"{airflow.url}/dags/{DAG_ID}")
    page.get_by_role("button", name="Trigger").first.click()
    batch_size = page.get_by_label("Batch size")
    batch_size.fill("0")
    batch_size.press("Tab")
    # A number input given the schema's bounds would clamp 0 to 1 on leaving the field, and trigger
    # a run of batches of one; the bounds are where it does not look, so 0 stays 0.
    assert batch_size.input_value() == "0"
    with page.expect_response(
        lambda r: r.request.method == "POST" and r.url.endswith(f"/{DAG_ID}/dagRuns")
    ) as refused:
        page.get_by_role("button", name="Trigger", exact=True).last.click()
    assert refused.value.status == 400
    page.get_by_text("batch_size must be a whole number from 1 to 1000", exact=False).first.wait_for()
    shots(page, "7-trigger-refused")
    batch_size.fill("100")
    table = page.locator("#element_source_table")
    table.fill("consent_events; DROP TABLE consent_events")
    with page.expect_response(
        lambda r: r.request.method == "POST" and r.url.endswith(f"/{DAG_ID}/dagRuns")
    ) as refused:
        # The first refusal's notice still covers the button for a few seconds.
        page.get_by_test_id("trigger-dag-submit").dispatch_event("click")
    assert refused.value.status == 400
    page.get_by_text("source_table must be a plain table name like", exact=False).first.wait_for()
    assert airflow.get(f"dags/{DAG_ID}/dagRuns")["total_entries"] == runs_before  # neither made a run
