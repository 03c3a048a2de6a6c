"""Re-submit dead letters of a consent sync run (manual trigger).

``prepare → submit → report``

Trigger with the dead-letter folder (or one part file) of a ``hubspot_consent_sync`` run, e.g.::

    RUN=file:///opt/airflow/hubspot_consent/scheduled__2026-03-10T00_00_00_00_00
    airflow dags trigger hubspot_dead_letter_replay --conf "{\\"dead_letter_uri\\": \\"$RUN/dead-letters\\"}"

**prepare** selects the retryable dead letters (rate limits, outages, answers HubSpot never gave), or
all of them with ``include_non_retryable``, into ``<dead_letter_uri>/../replay-<run id>/input/``. It
leaves out dead letters whose contact the consent source (``source_conn_id``) has changed since:
a replay never puts back a status the contact has changed after it was dead-lettered;
**submit** writes them through the ``hubspot_api`` pool; what still fails lands in
``replay-<run id>/dead-letters/``, and **report** counts it, alerts, and fails the run above
``max_failed_ratio``. The original dead letters are left untouched, so a replay can be repeated.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from airflow.sdk import BaseNotifier, Param, dag, get_current_context, task
from airflow.sdk.configuration import conf

from hubspot_provider import consent
from hubspot_provider.notifications import DeadLetterNotifier
from hubspot_provider.operators.hubspot import HubSpotWriteStatusesOperator

# Alerts go through Airflow notifiers: when a run has failures, and when the write step itself fails.
# Add your own (a SlackNotifier, an e-mail notifier); the run's summary (counts and paths, never
# records or emails) is in their template context as ``hubspot_summary``.
ALERT_NOTIFIERS: list[BaseNotifier] = [DeadLetterNotifier(replay=True)]

# As in hubspot_consent_sync: AIRFLOW__HUBSPOT__TASK_RETRIES=0 makes local runs fail fast.
TASK_RETRIES = conf.getint("hubspot", "task_retries", fallback=2)


@dag(
    dag_id="hubspot_dead_letter_replay",
    schedule=None,
    start_date=datetime(2026, 1, 1, tzinfo=timezone.utc),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": TASK_RETRIES, "retry_delay": timedelta(minutes=5)},
    params={
        "dead_letter_uri": Param(
            type="string",
            minLength=1,
            title="Dead letters to replay",
            description="Dead-letter folder or part file of a consent sync run (an object-storage URI).",
        ),
        "include_non_retryable": Param(
            False,
            type="boolean",
            title="Include non-retryable",
            description="Also re-submit dead letters that failed for good (invalid input, unknown "
            "subscription), e.g. after fixing the cause in HubSpot.",
        ),
        "source_conn_id": Param(
            "hubspot_consent_source",
            type=["null", "string"],
            title="Source connection",
            description="SQL connection of the consent source, read for events after each dead letter: "
            "a dead letter the source has overtaken is not replayed. Null replays without the check.",
        ),
        "source_table": Param(
            "consent_events",
            type="string",
            title="Source table",
            description="The consent source's table or view: letters, digits and _ (not starting with a "
            "digit), optionally schema.table; no quotes, spaces or semicolons. Anything else is refused "
            "when you trigger.",
            **consent.table_name_rule("source_table"),
        ),
        "hubspot_conn_id": Param(
            "hubspot_default", type="string", minLength=1, title="HubSpot connection",
            description="HubSpot connection."
        ),
        "batch_size": Param(
            100, type="integer", title="Batch size",
            description="Inputs per HubSpot request: 1 to 1000 (HubSpot's batch maximum).",
            **consent.BATCH_SIZE_RULE,
        ),
        "max_failed_ratio": Param(
            0.25,
            type="number",
            title="Largest failed share",
            description="Largest share of the replayed inputs that may fail again before the run fails.",
            **consent.FAILED_RATIO_RULE,
        ),
    },
    tags=["hubspot", "consent"],
    doc_md=__doc__,
)
def hubspot_dead_letter_replay() -> None:
    @task(multiple_outputs=False)
    def prepare(params: dict[str, Any] | None = None, run_id: str | None = None) -> dict[str, Any]:
        """Select the dead letters to re-submit into this replay's own input folder."""
        return consent.prepare_replay(
            params["dead_letter_uri"],
            run_id=run_id,
            include_non_retryable=params["include_non_retryable"],
            source_conn_id=params["source_conn_id"],
            source_table=params["source_table"],
        )

    @task(multiple_outputs=False)
    def report(
        prepared: dict[str, Any], submitted: dict[str, Any], params: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Log the replay's counts, alert on what failed again, fail above max_failed_ratio."""
        return consent.report_replay(
            prepared, submitted, max_failed_ratio=params["max_failed_ratio"], notifiers=ALERT_NOTIFIERS,
            context=get_current_context(),
        )

    prepared = prepare()
    submit = HubSpotWriteStatusesOperator(
        task_id="submit",
        input_uri="{{ ti.xcom_pull(task_ids='prepare')['input_uri'] }}",
        dead_letter_uri="{{ ti.xcom_pull(task_ids='prepare')['dead_letter_uri'] }}",
        hubspot_conn_id="{{ params.hubspot_conn_id }}",
        batch_size="{{ params.batch_size }}",
        # The operator's flag is fixed when the DAG is parsed, so include_non_retryable is applied by
        # prepare, which passes on only the selected inputs (without their retryable flag).
        only_retryable=True,
        max_failed_ratio=None,  # one policy per run, applied by the outcome task over everything
        deferrable=True,
        pool=consent.HUBSPOT_POOL,
        on_failure_callback=ALERT_NOTIFIERS,
    )
    prepared >> submit
    report(prepared, submit.output)


hubspot_dead_letter_replay()
