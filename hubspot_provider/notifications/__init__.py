"""Alerts as Airflow notifiers (``BaseNotifier``): what a run reports when something did not land.

:class:`DeadLetterNotifier` works in both places a consent sync alerts from:

* as a task's ``on_failure_callback`` (the write failed: HubSpot down past the retry budget, bad
  credentials), it counts the run's dead letters so far;
* called by the outcome task with ``hubspot_summary`` in the context, it passes that summary on.

Either way it logs the alert (counts and paths, never records or emails) and hands the summary to
:meth:`~DeadLetterNotifier.deliver`, which a subclass overrides to page someone. Any other Airflow
notifier works beside it; the summary is in its template context as ``hubspot_summary``::

    from airflow.providers.slack.notifications.slack import SlackNotifier

    ALERT_NOTIFIERS = [
        DeadLetterNotifier(),
        SlackNotifier(text="HubSpot sync {{ run_id }}: {{ hubspot_summary.dead_letters }} dead letters"),
    ]
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseNotifier

__all__ = ["DeadLetterNotifier"]


class DeadLetterNotifier(BaseNotifier):
    """Alert with a run's dead-letter counts.

    :param replay: the DAG is ``hubspot_dead_letter_replay`` (its folder comes from the
        ``dead_letter_uri`` param) rather than ``hubspot_consent_sync``.
    """

    def __init__(self, *, replay: bool = False) -> None:
        super().__init__()
        self.replay = replay

    def notify(self, context: Any) -> None:
        """Log the alert and deliver the summary (computed from the run's files for a failed task)."""
        from hubspot_provider import consent

        summary = context.get("hubspot_summary")
        if summary is None:
            summary = consent.failed_task_summary(context, replay=self.replay)
            consent.log_alert(summary)
        self.deliver(dict(summary))

    def deliver(self, summary: dict[str, Any]) -> None:
        """Send ``summary`` (counts and paths only) somewhere; override to page or mail.

        By default the task-log warning is the whole alert.
        """
