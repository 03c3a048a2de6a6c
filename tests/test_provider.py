"""Provider registration, checked through Airflow's own CLI and connection machinery."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from hubspot_provider.get_provider_info import get_provider_info
from hubspot_provider.hooks.hubspot import HubSpotHook


@pytest.fixture(scope="module")
def airflow_cli(tmp_path_factory):
    home = tmp_path_factory.mktemp("airflow-home")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")},
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__DAGS_FOLDER": str(home / "dags"),
    }
    airflow = str(Path(sys.executable).with_name("airflow"))

    def run(*args: str, **more_env: str) -> str:
        done = subprocess.run([airflow, *args], env={**env, **more_env}, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    return run


def test_provider_info_matches_the_distribution():
    from importlib.metadata import version

    info = get_provider_info()
    assert info["package-name"] == "hubspot-provider"
    assert info["versions"] == [version("hubspot-provider")]
    (conn_type,) = info["connection-types"]
    assert conn_type["hook-class-name"] == "hubspot_provider.hooks.hubspot.HubSpotHook"
    assert conn_type["connection-type"] == HubSpotHook.conn_type
    assert {"api_version", "batch_size", "timeout", "deadline", "max_response_bytes", "max_retries"} <= set(
        conn_type["conn-fields"])
    assert conn_type["ui-field-behaviour"]["placeholders"]["host"] == "https://api.hubapi.com"


def test_airflow_lists_the_provider_and_hook(airflow_cli):
    providers = json.loads(airflow_cli("providers", "list", "-o", "json"))
    assert any(p["package_name"] == "hubspot-provider" for p in providers)
    hooks = json.loads(airflow_cli("providers", "hooks", "-o", "json"))
    ours = [h for h in hooks if h["connection_type"] == "hubspot"]
    assert ours and ours[0]["class"] == "hubspot_provider.hooks.hubspot.HubSpotHook"
    assert ours[0]["conn_id_attribute_name"] == "hubspot_conn_id"


def test_airflow_shows_the_providers_config_and_plugin(airflow_cli):
    # Declared in the provider info, the option has a default and a description in Airflow's listing.
    assert airflow_cli("config", "get-value", "hubspot", "task_retries").strip() == "2"
    configs = airflow_cli("providers", "configs", "-o", "json")
    assert "task_retries" in configs and "hubspot_consent_sync" in configs
    (info,) = json.loads(airflow_cli("providers", "get", "hubspot-provider", "--full", "-o", "json"))
    assert info["plugins"] == [
        {"name": "hubspot_provider", "plugin-class": "hubspot_provider.plugins.HubSpotPlugin"}
    ]
    # Loaded once (through its entry point), with its listeners and the connection-form middleware.
    plugins = [p for p in json.loads(airflow_cli("plugins", "-o", "json")) if p["name"] == "hubspot_provider"]
    assert len(plugins) == 1
    assert plugins[0]["listeners"] == [
        "hubspot_provider.plugins._PoolListener", "hubspot_provider.plugins._RunNoteListener"]
    assert [m["name"] for m in plugins[0]["fastapi_root_middlewares"]] == ["hubspot_connection_form"]


def test_the_connection_form_fields_are_registered(airflow_cli):
    widgets = airflow_cli("providers", "widgets", "-o", "json")
    for field in ("api_version", "portal_timezone", "oauth_token_path", "client_secret"):
        assert f"extra__hubspot__{field}" in widgets


def test_connections_add_keeps_the_hubspot_type(airflow_cli):
    airflow_cli("db", "migrate")
    airflow_cli(
        "connections", "add", "hubspot_cli", "--conn-type", "hubspot", "--conn-host", "https://api.hubapi.com",
        "--conn-password", "pat-cli-secret", "--conn-extra", json.dumps({"batch_size": 50}),
    )
    stored = json.loads(airflow_cli("connections", "get", "hubspot_cli", "-o", "json"))
    assert stored[0]["conn_type"] == "hubspot"


def test_the_emulator_clis_connection_lines_work_in_airflow(airflow_cli, hubspot_emulator):
    from hubspot_provider.testing.emulator import startup_notes

    notes = [line.strip() for line in startup_notes(hubspot_emulator).splitlines()]
    (add,) = [line for line in notes if line.startswith("airflow connections add")]
    (export,) = [line for line in notes if line.startswith("export AIRFLOW_CONN_HUBSPOT_DEFAULT=")]
    airflow_cli("db", "migrate")
    airflow_cli(*shlex.split(add)[1:])
    enabled = {"AIRFLOW__CORE__TEST_CONNECTION": "Enabled"}
    assert "Connection success!" in airflow_cli("connections", "test", "hubspot_default", **enabled)
    # The environment variable wins over the stored connection; it works on its own as well.
    name, _, value = shlex.split(export)[1].partition("=")
    hubspot_emulator.reset()
    as_emulator = {name.replace("DEFAULT", "EMULATOR"): value}
    out = airflow_cli("connections", "test", "hubspot_emulator", **enabled, **as_emulator)
    assert "Connection success!" in out
    assert [r.path for r in hubspot_emulator.requests] == ["/communication-preferences/v4/definitions"]


def test_connection_get_hook_builds_a_hubspot_hook(monkeypatch):
    from airflow.sdk import Connection

    conn = Connection(conn_id="hubspot_x", conn_type="hubspot", password="pat-x")
    monkeypatch.setenv("AIRFLOW_CONN_HUBSPOT_X", conn.as_json())
    hook = conn.get_hook(hook_params={"max_retries": 3, "batch_size": 50})
    assert isinstance(hook, HubSpotHook) and hook.hubspot_conn_id == "hubspot_x"
    assert (hook.max_retries, hook.batch_size) == (3, 50)
    # Not an HttpHook: it does not take an HTTP method it would not honour.
    with pytest.raises(TypeError, match="method"):
        conn.get_hook(hook_params={"method": "GET"})


def test_scheduler_start_creates_the_hubspot_api_pool(airflow_cli):
    airflow_cli("db", "migrate")
    assert "hubspot_provider.plugins._PoolListener" in airflow_cli("plugins")
    airflow_cli("scheduler", "--num-runs", "1")
    (pool,) = json.loads(airflow_cli("pools", "get", "hubspot_api", "-o", "json"))
    assert pool["pool"] == "hubspot_api" and int(pool["slots"]) >= 1
    # An admin's own size is kept on later starts.
    airflow_cli("pools", "set", "hubspot_api", "5", "sized by an admin")
    airflow_cli("scheduler", "--num-runs", "1")
    (pool,) = json.loads(airflow_cli("pools", "get", "hubspot_api", "-o", "json"))
    assert int(pool["slots"]) == 5
