"""Airflow plugin of the provider: creates the ``hubspot_api`` pool when an Airflow component starts.

The scheduler never queues a task whose pool does not exist, and Airflow 3 workers may not touch the
metadata database, so a task cannot create the pool itself on a real deployment. Components that
run as jobs (scheduler, DAG processor, triggerer) do have database access: when one starts, this
listener creates the pool with its default size if nobody has created it yet. An existing pool is
never changed, so an admin's ``airflow pools set hubspot_api <slots> …`` always wins.
"""

from __future__ import annotations

import logging
from typing import Any

from airflow.listeners import hookimpl
from airflow.plugins_manager import AirflowPlugin

log = logging.getLogger(__name__)


class _PoolListener:
    @hookimpl
    def on_starting(self, component: Any) -> None:
        # Only jobs run with metadata-DB access; a task runner (also announced here) must not try.
        from airflow.jobs.job import Job

        if not isinstance(component, Job):
            return
        from hubspot_provider.consent import ensure_pool

        try:
            ensure_pool()
        except Exception:  # noqa: BLE001 - a listener must never stop the component starting
            log.exception("Could not ensure the hubspot_api pool")


class HubSpotPlugin(AirflowPlugin):
    """Registers the pool listener (an ``airflow.plugins`` entry point: installing the provider enables it)."""

    name = "hubspot_provider"
    listeners = [_PoolListener()]
