"""Test helpers for the HubSpot provider: an emulated HubSpot API and pytest fixtures.

``from hubspot_provider.testing import HubSpotEmulator`` loads only the standard library; nothing
here imports Airflow, so the helpers are cheap to import in any test session.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hubspot_provider.testing.emulator import HubSpotEmulator, RequestRecord

__all__ = ["HubSpotEmulator", "RequestRecord"]


def __getattr__(name: str) -> Any:
    # Imported on first use so that ``python -m hubspot_provider.testing.emulator`` does not find
    # the module already loaded by its own package (runpy warns about that).
    if name in __all__:
        from hubspot_provider.testing import emulator

        return getattr(emulator, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
