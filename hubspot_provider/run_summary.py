"""The run's summary where Airflow's grid view shows it: the DAG run's note, and the outcome task's
*Rendered Templates* tab.

:func:`show_run_summary` turns a run's summary into a few lines of counts and paths (never a record
or an email) and puts them in two places:

* the running task's rendered template fields, as ``hubspot_run_summary``: Airflow sends a task's
  fields again after it ends when the operator asks for it (grid view → the run → the ``report`` or
  ``summarise_dead_letters`` task → *Rendered Templates*);
* an XCom (key ``hubspot_run_summary``), which the provider's plugin copies into the DAG run's note
  when the run ends (grid view → the run: the note under its header). An Airflow 3 task cannot set
  the note itself: the execution API has no route for it, while the scheduler, which ends the run,
  has the metadata database. A note someone already wrote is left as it is.

.. code-block:: python

    @task(multiple_outputs=False)
    def report(extracted, validated, submitted):
        return show_run_summary(consent.report_run(extracted, validated, submitted))

A run with failures ends in ``summarise_dead_letters``, which may fail the task once it has alerted
its notifiers; :class:`RunSummaryNotifier` among them shows the summary before that::

    ALERT_NOTIFIERS = [DeadLetterNotifier(), RunSummaryNotifier()]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from airflow.sdk import BaseNotifier

FIELD = "hubspot_run_summary"
XCOM_KEY = FIELD
NOTE_LIMIT = 1000  # Airflow's DagRunNote.content is a VARCHAR(1000)
_LABEL_WIDTH = len("Written to HubSpot")  # the longest label: every run's lines line up the same


def _count(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _categories(counts: Any) -> str:
    if not isinstance(counts, Mapping) or not counts:
        return ""
    return " (" + ", ".join(f"{name} {_count(n)}" for name, n in sorted(counts.items())) + ")"


def _rows(summary: Mapping[str, Any]) -> list[tuple[str, str]]:
    # Only known keys are read, and each as a count, a category name or a path: nothing else in
    # ``summary`` can reach the text.
    rows: list[tuple[str, str]] = []
    if summary.get("data_interval_start") or summary.get("data_interval_end"):
        rows.append(
            ("Data interval", f"[{summary.get('data_interval_start')}, {summary.get('data_interval_end')})")
        )
    events = f"{_count(summary.get('events_in_interval'))} in the interval"
    if _count(summary.get("outside_interval")):
        events += f", {_count(summary.get('outside_interval'))} outside it"
    if _count(summary.get("unplaceable")):
        events += f", {_count(summary.get('unplaceable'))} unplaceable (no interval fits them)"
    rows.append(("Events", events))
    rows.append(
        (
            "Latest per key",
            f"{_count(summary.get('inputs'))} statuses ({_count(summary.get('superseded'))} superseded, "
            f"{_count(summary.get('superseded_later'))} left to later events), "
            f"{_count(summary.get('valid'))} valid",
        )
    )
    if summary.get("dry_run"):
        rows.append(("Dry run", "nothing written; the plan is in " + str(summary.get("plan_uri") or "-")))
    else:
        rows.append(
            (
                "Written to HubSpot",
                f"{_count(summary.get('succeeded'))}: {_count(summary.get('changed'))} changed, "
                f"{_count(summary.get('unchanged'))} already in that state",
            )
        )
    failed = _count(summary.get("failed"))
    rows.append(("Failed", f"{failed}{_categories(summary.get('failed_by_category'))}" if failed else "none"))
    withheld = _count(summary.get("withheld"))
    rows.append(
        (
            "Withheld",
            f"{withheld}: a newer change made in HubSpot wins"
            f"{_categories(summary.get('withheld_by_category'))}"
            if withheld
            else "none",
        )
    )
    dead = _count(summary.get("dead_letters"))
    rows.append(("Dead letters", f"{dead} in {summary.get('dead_letter_uri')}" if dead else "none"))
    if summary.get("ledger_uri"):
        rows.append(
            ("Ledger", f"{_count(summary.get('ledger_records'))} audit records in {summary['ledger_uri']}")
        )
    rows.append(
        (
            "HubSpot traffic",
            f"{_count(summary.get('requests'))} write requests, {_count(summary.get('reads'))} reads, "
            f"{_count(summary.get('retries'))} retried, {_count(summary.get('rate_limited'))} rate-limited",
        )
    )
    if summary.get("run_uri"):
        rows.append(("Run files", str(summary["run_uri"])))
    return rows


def run_summary_text(summary: Mapping[str, Any]) -> str:
    """The lines :func:`show_run_summary` shows on the task, from a run summary (``summary.json``'s keys).

    Counts, category names and paths only: nothing else in ``summary`` reaches the text.
    """
    return "\n".join(f"{name:<{_LABEL_WIDTH}}  {value}" for name, value in _rows(summary))


def run_summary_note(summary: Mapping[str, Any]) -> str:
    """The run's note: the same lines in the Markdown the UI renders, at most :data:`NOTE_LIMIT` characters.

    The run's header shows a note's first line, so that line is the outcome; each line of
    :func:`run_summary_text` follows as a list item. Lines that do not fit are left to the task's tab.
    """
    if summary.get("dry_run"):
        headline = (
            f"**HubSpot sync: dry run**, nothing written; {_count(summary.get('inputs'))} statuses planned"
        )
    else:
        headline = (
            f"**HubSpot sync**: {_count(summary.get('succeeded'))} written "
            f"({_count(summary.get('changed'))} changed), {_count(summary.get('failed'))} failed"
        )
    headline += (
        f", {_count(summary.get('withheld'))} withheld, {_count(summary.get('dead_letters'))} dead letters"
    )
    lines = [headline, ""]
    for label, value in _rows(summary):
        item = f"- {label}: {value}"
        if len("\n".join([*lines, item])) > NOTE_LIMIT - 60:
            lines.append("- (the rest: the outcome task's Rendered Templates tab)")
            break
        lines.append(item)
    return "\n".join(lines)


def show_run_summary(
    summary: Mapping[str, Any], context: Mapping[str, Any] | None = None
) -> Mapping[str, Any]:
    """Show ``summary`` on the running task's *Rendered Templates* tab; return ``summary`` unchanged.

    Call it from the task that ends the run (``report``, ``summarise_dead_letters``), before anything
    that may fail the task: the field is sent when the task ends, whether it succeeded or failed.

    :param summary: the run's summary (:func:`hubspot_provider.consent.report_run`'s return value).
    :param context: the task's context; by default the running task's.
    """
    if context is None:
        from airflow.sdk import get_current_context

        context = get_current_context()
    task = context["task"]
    text = run_summary_text(summary)
    setattr(task, FIELD, text)
    if FIELD not in task.template_fields:
        task.template_fields = (FIELD, *task.template_fields)  # first on the tab
    # Airflow sends the rendered fields once before the task runs; this sends them again at its end.
    task.overwrite_rtif_after_execution = True
    # For the run's note, which the provider's plugin sets when the run ends.
    context["ti"].xcom_push(key=XCOM_KEY, value=run_summary_note(summary))
    return summary


def note_run_summary(dag_run: Any) -> bool:
    """Put the summary a task of ``dag_run`` pushed into the run's note, when it has none yet.

    The provider's plugin calls it when a DAG run ends: in the scheduler, with the scheduler's own
    session, which commits it; where the run comes detached (``airflow dags test``), in a session of
    its own. Runs without a summary are left alone.

    :return: whether the note was set.
    """
    from sqlalchemy.orm import object_session

    session = object_session(dag_run)
    if session is not None:
        return _note(dag_run, session)
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as own:
        attached = own.get(DagRun, dag_run.id)
        return attached is not None and _note(attached, own)


def _note(dag_run: Any, session: Any) -> bool:
    from airflow.models.xcom import XComModel
    from sqlalchemy import select

    if dag_run.note:  # someone wrote one: theirs stays
        return False
    row = session.scalars(
        select(XComModel)
        .where(XComModel.dag_run_id == dag_run.id, XComModel.key == XCOM_KEY)
        .order_by(XComModel.timestamp.desc())
        .limit(1)
    ).first()
    note = XComModel.deserialize_value(row) if row is not None else None
    if not isinstance(note, str) or not note:
        return False
    dag_run.note = note[:NOTE_LIMIT]
    return True


class RunSummaryNotifier(BaseNotifier):
    """A notifier that shows the ``hubspot_summary`` it is handed with :func:`show_run_summary`.

    :func:`hubspot_provider.consent.summarise_run` alerts its notifiers before it applies the failure
    policy, so the summary is on the task even when the policy fails it. Called without a summary
    (as a task's ``on_failure_callback``), it does nothing: Airflow has sent that task's fields already.
    """

    def notify(self, context: Any) -> None:
        """Show ``context["hubspot_summary"]`` on the running task, when there is one."""
        summary = context.get("hubspot_summary")
        if summary is not None and "task" in context:
            show_run_summary(summary, context)
