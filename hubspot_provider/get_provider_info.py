"""Provider metadata read by Airflow through the ``apache_airflow_provider`` entry point."""

from __future__ import annotations

from typing import Any

from hubspot_provider import __version__


# The connection form's extra fields. Defaults are the hook's own (a test checks they agree); the
# form writes them into the extra, and the provider's plugin drops the string ones on save (see
# hubspot_provider._connection_form). No field offers null as a choice: an empty field means "default".
CONN_FIELDS: dict[str, dict[str, Any]] = {
    "api_version": {
        "label": "API version",
        "description": "Base path of the Communication Preferences API: v4 (default) or the dated 2026-03.",
        "schema": {"type": ["string", "null"], "enum": ["v4", "2026-03"], "default": "v4"},
    },
    "batch_size": {
        "label": "Batch size",
        "description": "Inputs per batch write request (HubSpot documents no maximum; 100 is safe).",
        "schema": {"type": ["integer", "null"], "default": 100, "minimum": 1, "maximum": 1000},
    },
    "timeout": {
        "label": "Read timeout (s)",
        "description": "Seconds one socket read may wait; the deadline bounds the whole request.",
        "schema": {"type": ["number", "null"], "default": 30, "minimum": 1},
    },
    "deadline": {
        "label": "Request deadline (s)",
        "description": "Total seconds one request may take, from connect to the last byte.",
        "schema": {"type": ["number", "null"], "default": 60, "minimum": 1},
    },
    "max_response_bytes": {
        "label": "Largest answer (bytes)",
        "description": "A larger answer is refused unread.",
        "schema": {"type": ["integer", "null"], "default": 33554432, "minimum": 1024},
    },
    "max_retries": {
        "label": "Max retries",
        "description": "Retries per request for 429 TEN_SECONDLY_ROLLING, 5xx, timeouts and dropped "
        "connections.",
        "schema": {"type": ["integer", "null"], "default": 8, "minimum": 0, "maximum": 100},
    },
    "portal_timezone": {
        "label": "Portal time zone",
        "description": "IANA zone of the HubSpot account, e.g. Europe/Berlin (default UTC); the DAILY limit "
        "resets at its midnight.",
        "schema": {"type": ["string", "null"], "default": "UTC"},
    },
    "client_id": {
        "label": "OAuth client id",
        "description": "With client secret and refresh token: refresh access tokens via OAuth instead of "
        "the access token above.",
        "schema": {"type": ["string", "null"]},
    },
    "client_secret": {
        "label": "OAuth client secret",
        "schema": {"type": ["string", "null"], "format": "password"},
    },
    "refresh_token": {
        "label": "OAuth refresh token",
        "schema": {"type": ["string", "null"], "format": "password"},
    },
    # No default here: Airflow hides the value of any field whose name holds "token", so the form would
    # show, and save, "***" as the default. Empty means /oauth/v1/token.
    "oauth_token_path": {
        "label": "OAuth token endpoint",
        "description": "Where OAuth access tokens are refreshed: /oauth/v1/token (default when empty) or "
        "the dated /oauth/2026-03/token.",
        "schema": {"type": ["string", "null"], "enum": ["/oauth/v1/token", "/oauth/2026-03/token"]},
    },
}


def get_provider_info() -> dict[str, Any]:
    """Return the provider description Airflow validates and registers (connection type ``hubspot``)."""
    return {
        "package-name": "hubspot-provider",
        "name": "HubSpot",
        "description": "Keeps HubSpot email subscription statuses in step with your consent records "
        "(Communication Preferences v4 / 2026-03 batch writes).",
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": "HubSpot",
                "external-doc-url": "https://developers.hubspot.com/docs/api-reference/"
                "communication-preferences-subscriptions-v4/guide",
                "tags": ["service"],
            }
        ],
        "hooks": [{"integration-name": "HubSpot", "python-modules": ["hubspot_provider.hooks.hubspot"]}],
        "operators": [
            {"integration-name": "HubSpot", "python-modules": ["hubspot_provider.operators.hubspot"]}
        ],
        "connection-types": [
            {
                "connection-type": "hubspot",
                "hook-class-name": "hubspot_provider.hooks.hubspot.HubSpotHook",
                "hook-name": "HubSpot",
                "ui-field-behaviour": {
                    # Scheme and port stay visible: the hook honours them, so a connection saved as
                    # host + scheme + port (older emulator helpers did) must show all three when edited.
                    "hidden-fields": ["login"],
                    "relabeling": {
                        "host": "API base URL",
                        "schema": "URL scheme (only for a host without one)",
                        "port": "Port (only for a host without one)",
                        "password": "Access token (private app or service key)",
                    },
                    "placeholders": {
                        "host": "https://api.hubapi.com",
                        "schema": "https",
                        "port": "443",
                        "password": "pat-na1-…  (leave empty when using OAuth refresh below)",
                    },
                },
                "conn-fields": CONN_FIELDS,
            }
        ],
        "config": {
            "hubspot": {
                "description": "Settings of the HubSpot provider's example DAGs.",
                "options": {
                    "task_retries": {
                        "description": "Retries of each task of hubspot_consent_sync and "
                        "hubspot_dead_letter_replay. A retried write resumes from its checkpoint after a "
                        "HubSpot outage longer than the hook's own retry budget. Set 0 to make local runs "
                        "and `airflow dags test` fail fast instead of waiting out the retry delay.",
                        "version_added": "0.1.0",
                        "type": "integer",
                        "example": "0",
                        "default": "2",
                    },
                },
            },
        },
        "plugins": [{"name": "hubspot_provider", "plugin-class": "hubspot_provider.plugins.HubSpotPlugin"}],
    }
