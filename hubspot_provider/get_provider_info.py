"""Provider metadata read by Airflow through the ``apache_airflow_provider`` entry point."""

from __future__ import annotations

from typing import Any

from hubspot_provider import __version__


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
                    "hidden-fields": ["login", "schema", "port"],
                    "relabeling": {
                        "host": "API base URL",
                        "password": "Access token (private app or service key)",
                    },
                    "placeholders": {
                        "host": "https://api.hubapi.com",
                        "password": "pat-na1-…  (leave empty when using OAuth refresh below)",
                    },
                },
                "conn-fields": {
                    "api_version": {
                        "label": "API version",
                        "description": "Base path of the Communication Preferences API: v4 or the dated 2026-03.",
                        "schema": {"type": ["string", "null"], "enum": ["v4", "2026-03", None], "default": "v4"},
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
                        "description": "Retries per request for 429 TEN_SECONDLY_ROLLING, 5xx, timeouts "
                        "and dropped connections.",
                        "schema": {"type": ["integer", "null"], "default": 8, "minimum": 0},
                    },
                    "portal_timezone": {
                        "label": "Portal time zone",
                        "description": "IANA zone of the HubSpot account; the DAILY limit resets at its midnight.",
                        "schema": {"type": ["string", "null"], "default": "UTC"},
                    },
                    "client_id": {
                        "label": "OAuth client id",
                        "description": "With client secret and refresh token: refresh access tokens via OAuth.",
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
                },
            }
        ],
    }
