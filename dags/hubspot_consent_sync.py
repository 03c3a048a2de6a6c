"""Keep HubSpot email subscription statuses in step with a SQL consent table, one data interval per run.

``extract → validate → shard → submit (one per shard) → branch_on_outcome → report | summarise_dead_letters``

* **extract** reads the events of the run's data interval ``[data_interval_start, data_interval_end)``
  (UTC) from ``source_table`` through any Airflow SQL connection, keeps the latest event per
  (email, subscription, EMAIL) and stages them under ``<storage_uri>/<run id>/staged/``. A key the
  source changed again after the interval is left to that later event (and its own run).
* **validate** checks each staged event; invalid ones become dead letters (``INVALID_INPUT``). A
  ``status`` of ``UNSUBSCRIBE_ALL`` opts the contact out of all email (``subscription_id`` may be NULL).
* **shard** splits a day of more than ``shard_size`` valid statuses into shards, by a stable hash of
  each contact's email, so each contact's statuses (and its opt-out from all email, first) stay in one
  shard and in order. A smaller day is one shard. **submit** is mapped over the shards (dynamic task
  mapping): several workers write a big day, each shard with its own checkpoint, dead-letter and
  ledger parts, so a retry resumes that shard only.
* Before writing, **submit** reads HubSpot's current statuses where a write could (re)subscribe a
  contact: with ``hubspot_changes=respect_opt_outs`` (the default) an opt-out made inside HubSpot
  after the source event wins, and the write is withheld and reported. ``dry_run`` writes nothing and
  leaves the plan under ``<run>/plan/``.
* **submit** writes the valid ones with ``HubSpotWriteStatusesOperator`` through the ``hubspot_api``
  pool, which caps concurrent writers (shards) across runs and workers. The provider's plugin creates the
  pool (2 slots) when the scheduler starts if nobody has; resize it with ``airflow pools set``. It
  defers while a long rate-limit wait passes (a triggerer must be running) and resumes from its
  checkpoint after a failed try.
* **branch_on_outcome**: no failures at all (in any shard) → **report**; some →
  **summarise_dead_letters**, which counts the dead letters by category, alerts (task log, and the ``ALERT_NOTIFIERS`` below), and fails
  the run when more than ``max_failed_ratio`` of the events failed.

Daily runs cover one UTC day: a scheduled or backfill run for logical date D syncs day D, and
``airflow dags test hubspot_consent_sync 2026-03-11`` syncs 2026-03-10 (a manual run covers the last
whole day before its date). Re-running or backfilling an interval is a harmless replay: HubSpot ends
in the same state and the run's files are rewritten, not appended to. Backfilling an old day after
newer days have run does not put back statuses that changed since: those keys are superseded by
their later events.

Source contract: ``consent_events(email, subscription_id, status, legal_basis,
legal_basis_explanation, occurred_at)``: the README's "Source contract" has the table's DDL.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from airflow.sdk import BaseNotifier, CronDataIntervalTimetable, Param, dag, get_current_context, task
from airflow.sdk.configuration import conf

from hubspot_provider import consent
from hubspot_provider.notifications import DeadLetterNotifier
from hubspot_provider.operators.hubspot import HubSpotWriteStatusesOperator
from hubspot_provider.run_summary import RunSummaryNotifier, show_run_summary

# Alerts go through Airflow notifiers: when a run has failures, and when the write step itself fails.
# Add your own (a SlackNotifier, an e-mail notifier); the run's summary (counts and paths, never
# records or emails) is in their template context as ``hubspot_summary``.
ALERT_NOTIFIERS: list[BaseNotifier] = [DeadLetterNotifier(), RunSummaryNotifier()]

# Task retries resume the write from its checkpoint after HubSpot outages longer than the hook's own
# retry budget. `airflow dags test` sits out retry_delay between tries, so demos and local runs set
# AIRFLOW__HUBSPOT__TASK_RETRIES=0 to fail fast instead.
TASK_RETRIES = conf.getint("hubspot", "task_retries", fallback=2)


@dag(
    dag_id="hubspot_consent_sync",
    schedule=CronDataIntervalTimetable("@daily", timezone="UTC"),
    start_date=datetime(2026, 1, 1, tzinfo=timezone.utc),
    catchup=False,
    max_active_runs=2,
    default_args={"retries": TASK_RETRIES, "retry_delay": timedelta(minutes=5)},
    params={
        "source_conn_id": Param(
            "hubspot_consent_source",
            type="string",
            minLength=1,
            title="Source connection",
            description="Airflow SQL connection holding the consent table.",
        ),
        "source_table": Param(
            "consent_events",
            type="string",
            title="Source table",
            description="Table or view with the source contract's columns: letters, digits and _ "
            "(not starting with a digit), optionally schema.table; no quotes, spaces or semicolons. "
            "Anything else is refused when you trigger.",
            **consent.table_name_rule("source_table"),
        ),
        "hubspot_conn_id": Param(
            "hubspot_default", type="string", minLength=1, title="HubSpot connection",
            description="HubSpot connection."
        ),
        "storage_uri": Param(
            None,
            type=["null", "string"],
            title="Storage folder",
            description="Object-storage folder for staged files and dead letters; empty for "
            "file://$AIRFLOW_HOME/hubspot_consent on the worker.",
        ),
        "batch_size": Param(
            100, type="integer", title="Batch size",
            description="Inputs per HubSpot request: 1 to 1000 (HubSpot's batch maximum).",
            **consent.BATCH_SIZE_RULE,
        ),
        "shard_size": Param(
            consent.DEFAULT_SHARD_SIZE,
            type="integer",
            title="Shard size",
            description="Valid statuses per shard: a bigger day is split by contact into shards written by "
            "parallel submit tasks through the hubspot_api pool; a day up to this size is one shard.",
            **consent.param_rule("shard_size must be a whole number of at least 1", minimum=1),
        ),
        "max_failed_ratio": Param(
            0.25,
            type="number",
            title="Largest failed share",
            description="Largest share of the interval's events that may fail before the run fails.",
            **consent.FAILED_RATIO_RULE,
        ),
        "max_unplaceable_rows": Param(
            100,
            type=["null", "integer"],
            **consent.param_rule("max_unplaceable_rows must be a whole number of at least 0, or empty for no limit",
                                 minimum=0),
            title="Most unplaceable rows",
            description="Rows of the source whose occurred_at fits no data interval (NULL, unreadable, "
            "impossible) that may exist before a run fails. They are listed by every run and belong to no "
            "day's failure ratio; null: no limit.",
        ),
        "audit_conn_id": Param(
            None,
            type=["null", "string"],
            title="Ledger connection",
            description="Optional SQL connection the ledger (an audit record of every write) is also "
            "appended to; the files under <run>/audit/ are always written.",
        ),
        "audit_table": Param(
            "hubspot_consent_ledger",
            type="string",
            title="Ledger table",
            description="The ledger table on audit_conn_id (DDL in the README).",
            **consent.table_name_rule("audit_table"),
        ),
        "hubspot_changes": Param(
            "respect_opt_outs",
            type="string",
            enum=["respect_opt_outs", "respect_all", "source_wins"],
            title="Consent changed in HubSpot",
            description="Consent changed inside HubSpot after the source event (footer unsubscribe, "
            "preferences page, HubSpot's UI): respect_opt_outs keeps a newer HubSpot-side opt-out "
            "(the write is withheld and reported); respect_all keeps any newer HubSpot-side change; "
            "source_wins overwrites HubSpot (no reads).",
        ),
        "dry_run": Param(
            False,
            type="boolean",
            title="Dry run",
            description="Write nothing: read HubSpot's current statuses and write the plan (what would "
            "change, what is already so, what would be withheld) under <run>/plan/.",
        ),
        "later_events_win": Param(
            True,
            type="boolean",
            title="Later events win",
            description="Leave out contacts the source changed again after the interval, so a backfill "
            "of an old day never puts back a status that has changed since. Off: sync the interval's "
            "latest events whatever happened later.",
        ),
    },
    tags=["hubspot", "consent"],
    doc_md=__doc__,
)
def hubspot_consent_sync() -> None:
    # Every task returns one small summary: multiple_outputs=False stops Airflow inferring it from the
    # dict annotation and fanning each summary out into one XCom row per key.
    @task(multiple_outputs=False)
    def extract(
        params: dict[str, Any] | None = None,
        run_id: str | None = None,
        data_interval_start: datetime | None = None,
        data_interval_end: datetime | None = None,
    ) -> dict[str, Any]:
        """Stage the latest consent event per contact and subscription of the data interval."""
        return consent.extract_consent_events(
            source_conn_id=params["source_conn_id"],
            source_table=params["source_table"],
            data_interval_start=data_interval_start,
            data_interval_end=data_interval_end,
            run_uri=consent.run_folder(params["storage_uri"], run_id),
            later_events_supersede=params["later_events_win"],
        )

    @task(multiple_outputs=False)
    def validate(extracted: dict[str, Any]) -> dict[str, Any]:
        """Keep what HubSpot would accept; the rest becomes INVALID_INPUT dead letters."""
        return consent.validate_staged_events(extracted["run_uri"])

    @task
    def shard(validated: dict[str, Any], params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Split the validated statuses into shards of about shard_size, each contact's in one shard."""
        return consent.shard_validated(validated, shard_size=params["shard_size"], dry_run=params["dry_run"])

    # ``submitted`` below is every shard's summary (a list, in shard order); the consent functions
    # add them up, so the run's summary is one set of counts however many shards wrote the day.
    @task.branch
    def branch_on_outcome(
        extracted: dict[str, Any], validated: dict[str, Any], submitted: list[dict[str, Any]]
    ) -> str:
        """``report`` when every event landed, ``summarise_dead_letters`` otherwise."""
        if consent.has_failures(extracted, validated, submitted):
            return "summarise_dead_letters"
        return "report"

    @task(multiple_outputs=False)
    def report(
        extracted: dict[str, Any], validated: dict[str, Any], submitted: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """Log the run's counts, write its summary.json and show it in the UI (the run's note)."""
        return show_run_summary(consent.report_run(extracted, validated, submitted))

    @task(multiple_outputs=False)
    def summarise_dead_letters(
        extracted: dict[str, Any],
        validated: dict[str, Any],
        submitted: list[dict[str, Any]],
        params: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Count dead letters by category, alert, and fail the run above max_failed_ratio."""
        return consent.summarise_run(
            extracted,
            validated,
            submitted,
            max_failed_ratio=params["max_failed_ratio"],
            max_unplaceable_rows=params["max_unplaceable_rows"],
            notifiers=ALERT_NOTIFIERS,
            context=get_current_context(),
        )

    extracted = extract()
    validated = validate(extracted)
    shards = shard(validated)
    # One write task per shard; each shard's dict carries its input_uri and input_count (what validate
    # counted), dead_letter_uri and ledger_uri.
    submit = HubSpotWriteStatusesOperator.partial(
        task_id="submit",
        audit_conn_id="{{ params.audit_conn_id or '' }}",
        audit_table="{{ params.audit_table }}",
        hubspot_conn_id="{{ params.hubspot_conn_id }}",
        batch_size="{{ params.batch_size }}",
        max_failed_ratio=None,  # one policy per run, applied by the outcome task over every shard
        inputs_validated=True,  # validate wrote them: they are sent as they are
        hubspot_changes="{{ params.hubspot_changes }}",
        dry_run="{{ params.dry_run }}",
        deferrable=True,
        pool=consent.HUBSPOT_POOL,
        on_failure_callback=ALERT_NOTIFIERS,
        map_index_template="{{ task.input_uri.rstrip('/').rsplit('/', 1)[-1] }}",
    ).expand_kwargs(shards)
    submitted = submit.output
    outcome = branch_on_outcome(extracted, validated, submitted)
    outcome >> [
        report(extracted, validated, submitted),
        summarise_dead_letters(extracted, validated, submitted),
    ]


hubspot_consent_sync()
