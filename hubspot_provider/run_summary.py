"""The run's summary where Airflow's grid view shows it: the outcome task's *Rendered Templates* tab.

An Airflow 3 task cannot set its DAG run's note (the execution API has no route for it), but the
task's rendered template fields are sent to the API server again after the task ends when the
operator asks for it. :func:`show_run_summary` adds one such field, ``hubspot_run_summary``, to the
running task: a few lines of counts and paths, the same for every run, never a record or an email.
In the UI: grid view → the run → the ``report`` (or ``summarise_dead_letters``) task → *Rendered
Templates*.

.. code-block:: python

    @task(multiple_outputs=False)
    def report(extracted, validated, submitted):
        return show_run_summary(consent.report_run(extracted, validated, submitted))
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

FIELD = "hubspot_run_summary"
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


def run_summary_text(summary: Mapping[str, Any]) -> str:
    """The lines :func:`show_run_summary` shows, from a run summary (``summary.json``'s keys).

    Only known keys are read, and each as a count, a category name or a path: nothing else in
    ``summary`` can reach the text.
    """
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
            f"{_count(summary.get('superseded_later'))} left to later events), {_count(summary.get('valid'))} valid",
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
            f"{withheld}: a newer change made in HubSpot wins{_categories(summary.get('withheld_by_category'))}"
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
    return "\n".join(f"{name:<{_LABEL_WIDTH}}  {value}" for name, value in rows)


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
    setattr(task, FIELD, run_summary_text(summary))
    if FIELD not in task.template_fields:
        task.template_fields = (*task.template_fields, FIELD)
    # Airflow sends the rendered fields once before the task runs; this sends them again at its end.
    task.overwrite_rtif_after_execution = True
    return summary
