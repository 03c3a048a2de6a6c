"""Airflow plugin of the provider: the ``hubspot_api`` pool, and a connection form that works.

**The pool.** The scheduler never queues a task whose pool does not exist, and Airflow 3 workers may
not touch the metadata database, so a task cannot create the pool itself on a real deployment.
Components that run as jobs (scheduler, DAG processor, triggerer) do have database access: when one
starts, this listener creates the pool with its default size if nobody has created it yet. An
existing pool is never changed, so an admin's ``airflow pools set hubspot_api <slots> …`` always wins.

**The connection form.** In the API server,
:class:`~hubspot_provider._connection_form.ConnectionFormMiddleware` puts right what Airflow's
connection form sends for a ``hubspot`` connection (port 0 on *Test*, empty and default extras on
*Save*), so that a connection made in the UI saves clean and tests green.
"""

from __future__ import annotations

import logging
from typing import Any

from airflow.listeners import hookimpl
from airflow.plugins_manager import AirflowPlugin

from hubspot_provider._connection_form import ConnectionFormMiddleware

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
    """The pool listener and the connection-form middleware (installing the provider enables both)."""

    name = "hubspot_provider"
    listeners = [_PoolListener()]
    fastapi_root_middlewares = [
        {"name": "hubspot_connection_form", "middleware": ConnectionFormMiddleware},
    ]
