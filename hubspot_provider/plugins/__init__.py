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

**The run's note.** When a DAG run ends, the scheduler copies the summary its outcome task showed
(:func:`hubspot_provider.run_summary.show_run_summary`) into the run's note, which the grid view shows.
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


class _RunNoteListener:
    """Copies the summary a run's task showed (``run_summary.show_run_summary``) into the run's note."""

    @hookimpl
    def on_dag_run_success(self, dag_run: Any, msg: str) -> None:
        self._note(dag_run)

    @hookimpl
    def on_dag_run_failed(self, dag_run: Any, msg: str) -> None:
        self._note(dag_run)

    @staticmethod
    def _note(dag_run: Any) -> None:
        from hubspot_provider.run_summary import note_run_summary

        try:
            note_run_summary(dag_run)
        except Exception:  # noqa: BLE001 - a listener must never stop the scheduler
            log.exception(
                "Could not put the run's summary into the note of %s", getattr(dag_run, "run_id", "?")
            )


class HubSpotPlugin(AirflowPlugin):
    """The pool and run-note listeners, and the connection-form middleware (the provider enables them)."""

    name = "hubspot_provider"
    listeners = [_PoolListener(), _RunNoteListener()]
    fastapi_root_middlewares = [
        {"name": "hubspot_connection_form", "middleware": ConnectionFormMiddleware},
    ]
