"""pytest fixtures that serve an emulated HubSpot API over loopback.

Registered through the ``pytest11`` entry point, so any project that installs the provider gets
them without a conftest. Example::

    def test_sync(hubspot_emulator, monkeypatch):
        monkeypatch.setenv("AIRFLOW_CONN_HUBSPOT_DEFAULT", hubspot_emulator.airflow_connection())
        ...
        assert hubspot_emulator.status_of("ada@example.com", 1001)["status"] == "SUBSCRIBED"

    def test_rate_limited(hubspot_emulator_factory):
        hs = hubspot_emulator_factory(rate_limit_max=3, rate_limit_interval_ms=500)
        ...
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from hubspot_provider.testing.emulator import HubSpotEmulator


@pytest.fixture
def hubspot_emulator() -> Iterator[HubSpotEmulator]:
    """A started :class:`~hubspot_provider.testing.HubSpotEmulator` with default settings."""
    # Imported here so that merely loading the plugin costs nothing in unrelated test sessions.
    from hubspot_provider.testing.emulator import HubSpotEmulator

    with HubSpotEmulator() as emulator:
        yield emulator


@pytest.fixture
def hubspot_emulator_factory() -> Iterator[Callable[..., HubSpotEmulator]]:
    """A function ``(**kwargs) -> started HubSpotEmulator``; every emulator it made is stopped afterwards."""
    from hubspot_provider.testing.emulator import HubSpotEmulator

    started: list[HubSpotEmulator] = []

    def factory(**kwargs: Any) -> HubSpotEmulator:
        emulator = HubSpotEmulator(**kwargs)
        emulator.start()
        started.append(emulator)
        return emulator

    try:
        yield factory
    finally:
        for emulator in reversed(started):
            emulator.stop()
