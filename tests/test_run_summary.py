"""The run's summary on the outcome task's Rendered Templates tab (what the grid view shows)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

from hubspot_provider.run_summary import FIELD, NOTE_LIMIT, run_summary_note, run_summary_text

SUMMARY = {
    "data_interval_start": "2026-03-10T00:00:00+00:00",
    "data_interval_end": "2026-03-11T00:00:00+00:00",
    "rows_read": 4881,
    "events_in_interval": 4482,
    "outside_interval": 372,
    "unplaceable": 27,
    "inputs": 2464,
    "superseded": 1874,
    "superseded_later": 144,
    "valid": 2350,
    "succeeded": 2318,
    "changed": 1721,
    "unchanged": 597,
    "failed": 146,
    "failed_by_category": {"OBJECT_NOT_FOUND": 32, "INVALID_INPUT": 114},
    "withheld": 0,
    "withheld_by_category": {},
    "dead_letters": 146,
    "dead_letter_uri": "file:///opt/airflow/hubspot_consent/manual__1/dead-letters",
    "ledger_uri": "file:///opt/airflow/hubspot_consent/manual__1/audit",
    "ledger_records": 2350,
    "requests": 25,
    "reads": 30,
    "retries": 2,
    "rate_limited": 0,
    "run_uri": "file:///opt/airflow/hubspot_consent/manual__1",
    "dry_run": False,
}


def test_the_summary_reads_like_the_demos_report():
    assert run_summary_text(SUMMARY).splitlines() == [
        "Data interval       [2026-03-10T00:00:00+00:00, 2026-03-11T00:00:00+00:00)",
        "Events              4482 in the interval, 372 outside it, 27 unplaceable (no interval fits them)",
        "Latest per key      2464 statuses (1874 superseded, 144 left to later events), 2350 valid",
        "Written to HubSpot  2318: 1721 changed, 597 already in that state",
        "Failed              146 (INVALID_INPUT 114, OBJECT_NOT_FOUND 32)",
        "Withheld            none",
        "Dead letters        146 in file:///opt/airflow/hubspot_consent/manual__1/dead-letters",
        "Ledger              2350 audit records in file:///opt/airflow/hubspot_consent/manual__1/audit",
        "HubSpot traffic     25 write requests, 30 reads, 2 retried, 0 rate-limited",
        "Run files           file:///opt/airflow/hubspot_consent/manual__1",
    ]


def test_a_clean_run_and_a_dry_run():
    clean = run_summary_text({**SUMMARY, "failed": 0, "failed_by_category": {}, "dead_letters": 0})
    assert "Failed              none" in clean and "Dead letters        none" in clean
    dry = run_summary_text({**SUMMARY, "dry_run": True, "plan_uri": "file:///x/plan"})
    assert "Dry run             nothing written; the plan is in file:///x/plan" in dry
    assert "Written to HubSpot" not in dry


def test_only_counts_categories_and_paths_reach_the_text():
    noisy = {
        **SUMMARY,
        "failed": "146",
        "sample": "ada@example.com",
        "error": "bob@example.com failed",
        "changed": "ada@example.com",
    }
    text = run_summary_text(noisy)
    assert "@" not in text
    assert "Failed              146 (" in text and "Written to HubSpot  2318: 0 changed" in text


def test_the_note_leads_with_the_outcome_and_fits_airflows_note_column():
    note = run_summary_note(SUMMARY)
    assert note.splitlines()[:3] == [
        "**HubSpot sync**: 2318 written (1721 changed), 146 failed, 0 withheld, 146 dead letters",
        "",
        "- Data interval: [2026-03-10T00:00:00+00:00, 2026-03-11T00:00:00+00:00)",
    ]
    assert "- Dead letters: 146 in file:///opt/airflow/hubspot_consent/manual__1/dead-letters" in note
    dry = run_summary_note({**SUMMARY, "dry_run": True})
    assert dry.startswith("**HubSpot sync: dry run**, nothing written; 2464 statuses planned, 0 withheld")
    long = run_summary_note({**SUMMARY, "dead_letter_uri": "s3://bucket/" + "x" * 900})
    assert len(long) <= NOTE_LIMIT
    assert long.endswith("- (the rest: the outcome task's Rendered Templates tab)")


def test_a_note_someone_wrote_is_kept():
    from hubspot_provider.run_summary import _note

    class Run:
        note = "paused for the migration; do not re-run"

    run = Run()
    assert _note(run, session=None) is False  # returns before it reads anything
    assert run.note == "paused for the migration; do not re-run"


# --------------------------------------------------------------------------- in a real task run

PROBE_DAG = """
from datetime import datetime, timezone

from airflow.sdk import dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

from hubspot_provider.run_summary import RunSummaryNotifier, show_run_summary

SUMMARY = {summary!r}


@dag(dag_id="hubspot_run_summary_probe", schedule=None, start_date=datetime(2026, 1, 1, tzinfo=timezone.utc))
def probe():
    @task(multiple_outputs=False)
    def report(summary: dict) -> dict:
        return show_run_summary(summary)

    @task
    def summarise_dead_letters(summary: dict) -> None:
        # As hubspot_provider.consent.summarise_run does: alert the notifiers, then apply the policy.
        notifiers = [RunSummaryNotifier()]
        for notifier in notifiers:
            notifier(dict(get_current_context(), hubspot_summary=summary))
        raise AirflowFailException("more than max_failed_ratio of the events failed")

    report(SUMMARY)
    summarise_dead_letters(SUMMARY)


probe()
"""


def test_a_task_shows_the_summary_on_its_rendered_templates_whether_it_succeeds_or_fails(tmp_path):
    home = tmp_path / "airflow"
    (home / "dags").mkdir(parents=True)
    (home / "dags" / "probe.py").write_text(PROBE_DAG.format(summary=SUMMARY))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(home / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        }
    )
    for args in (["db", "migrate"], ["dags", "test", "hubspot_run_summary_probe", "2026-03-11"]):
        done = subprocess.run(
            [sys.executable, "-m", "airflow", *args], env=env, capture_output=True, text=True, timeout=300
        )
        # The failing task fails the run, and `dags test` says so in its exit code.
        assert done.returncode == (0 if args[0] == "db" else 1), done.stdout[-3000:] + done.stderr[-3000:]

    db = sqlite3.connect(home / "airflow.db")
    try:
        states = dict(db.execute("SELECT task_id, state FROM task_instance"))
        notes = [
            row[0]
            for row in db.execute(
                "SELECT n.content FROM dag_run_note n JOIN dag_run r ON r.id = n.dag_run_id "
                "WHERE r.dag_id = 'hubspot_run_summary_probe'"
            )
        ]
        fields = {
            task_id: json.loads(rendered)
            for task_id, rendered in db.execute(
                "SELECT task_id, rendered_fields FROM rendered_task_instance_fields"
            )
        }
    finally:
        db.close()
    assert states == {"report": "success", "summarise_dead_letters": "failed"}
    for task_id in states:  # the report task, and the notifier on the task that failed
        assert fields[task_id][FIELD] == run_summary_text(SUMMARY)
        assert "op_args" in fields[task_id]  # the task's own fields are still there
    # The run failed; the plugin put the summary into its note when it ended (from the task that ended it).
    assert notes == [run_summary_note(SUMMARY)]
