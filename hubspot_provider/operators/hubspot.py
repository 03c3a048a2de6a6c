"""HubSpotWriteStatusesOperator: write subscription statuses from inline rows or staged JSONL files.

The operator owns the Airflow side of a sync: reading staged input from object storage, streaming
it to :meth:`HubSpotHook.write_statuses <hubspot_provider.hooks.hubspot.HubSpotHook.write_statuses>`
segment by segment, dead-letter files, checkpoints, deferral while HubSpot's rate limit resets, the
failure policy and a small summary for XCom. Talking to HubSpot stays in the hook.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.providers.standard.triggers.temporal import DateTimeTrigger
from airflow.sdk import BaseOperator, ObjectStoragePath
from airflow.sdk.configuration import conf
from airflow.sdk.exceptions import AirflowFailException
from pydantic import ValidationError

from hubspot_provider.exceptions import (
    HubSpotAuthError,
    HubSpotError,
    HubSpotConfigError,
    HubSpotRateLimitError,
    HubSpotRequestError,
    HubSpotResponseError,
    HubSpotUnavailableError,
)
from hubspot_provider.hooks.hubspot import HubSpotHook
from hubspot_provider.hooks._batching import as_dict
from hubspot_provider.hooks._guard import (
    CHANGE,
    DEFAULT_POLICY,
    NO_OP,
    SOURCE_WINS,
    UNKNOWN,
    WITHHOLD,
    OwnWrites,
    Verdict,
    check_policy,
    parse_instant,
)
from hubspot_provider.hooks._transport import Stats
from hubspot_provider.ledger import LedgerRecord, SqlLedger, as_text, ledger_record, withheld_record
from hubspot_provider.models import UNSUBSCRIBE_ALL, describe_validation_error, validate_consent_input
from hubspot_provider.results import (
    INVALID_INPUT,
    FailedInput,
    InputOutcome,
    WriteReport,
    categories_in_words,
    failure_ratio_exceeded,
    plan_in_words,
)
from hubspot_provider.staging import (
    camel_keys,
    dead_letter,
    dead_letter_from,
    digest,
    file_marker,
    jsonl_files,
    prefix_hash,
    write_part,
)

if TYPE_CHECKING:
    from airflow.sdk import Context

__all__ = ["HubSpotWriteStatusesOperator"]

CHECKPOINT_VERSION = 2
DEAD_LETTER_FOLDER = "dead-letters"
LEDGER_FOLDER = "audit"
PLAN_FOLDER = "plan"
FOLDER_CHECKPOINT = "_checkpoint.json"
FILE_CHECKPOINT_SUFFIX = ".checkpoint.json"
SEGMENT_BATCHES = 20
# Longer rate-limit waits are better spent deferred (or failed for a task retry) than holding a worker slot.
MAX_INLINE_SLEEP_S = 300.0
# Waiting again and again without finishing a segment means something else eats the whole budget.
MAX_STALLED_WAITS = 10
PROGRESS_XCOM_KEY = "hubspot_write_progress"
_LINE_DIGITS = 10
_RAW_LINE_LIMIT = 2000


@dataclass
class _Progress:
    """Where a run is and what it has done so far; small and JSON-able (checkpoint and defer kwargs)."""

    lines_done: int = 0
    file_index: int = 0
    file_line: int = 0
    segments: int = 0
    # The outcomes so far, in the one results model (without the failed inputs: those are dead letters).
    report: WriteReport = field(default_factory=WriteReport)
    skipped: int = 0
    deferrals: int = 0
    stalled_waits: int = 0
    segment_size: int = 0  # set once a rate-limit stop shrank the segments (0: the configured size)
    dead_letter_files: int = 0
    ledger_records: int = 0
    # A dry run's plan: inputs by action (change, no-op, withhold), changes by transition.
    plan: dict[str, int] = field(default_factory=dict)
    transitions: dict[str, int] = field(default_factory=dict)
    plan_files: int = 0
    interruptions: int = 0  # segments cut short by HubSpot: their landed writes' records kept apart
    elapsed_s: float = 0.0
    prefix_sha256: str = ""  # digest of every staged line up to the last one done

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> _Progress:
        known = set(cls.__dataclass_fields__)
        values = {k: v for k, v in (data or {}).items() if k in known}
        values["report"] = WriteReport.model_validate(values.get("report") or {})
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, for the checkpoint and the deferral's kwargs."""
        return {**{name: getattr(self, name) for name in self.__dataclass_fields__ if name != "report"},
                "report": self.report.model_dump(mode="json")}

    def add_traffic(self, report: WriteReport | None) -> None:
        # Requests of an interrupted segment really happened, but its outcomes are discarded:
        # the whole segment is sent again, so counting them now would count inputs twice.
        if report is not None:
            self.report += WriteReport(requests=report.requests, retries=report.retries,
                                       rate_limited=report.rate_limited)

    def add_outcomes(self, report: WriteReport) -> None:
        self.report += report.model_copy(update={"failed": [], "elapsed_s": 0.0})

    def add_unsendable(self, count: int) -> None:
        if count:
            self.report += WriteReport(submitted=count, failed_count=count, failed_by_category={INVALID_INPUT: count})


@dataclass
class _Record:
    """One input line (or inline item), as much of it as the sync needs."""

    line: int  # 1-based position across the whole input: names dead-letter parts
    file_index: int
    file_line: int  # 1-based line within its file (0 for inline input)
    kind: str  # "input", "invalid" (not JSON) or "skip" (only_retryable)
    value: Any = None
    occurred_at: Any = None
    error: str | None = None


@dataclass
class _Staged:
    root: ObjectStoragePath
    is_folder: bool
    files: list[ObjectStoragePath]
    checkpoint: ObjectStoragePath
    dead_letters: ObjectStoragePath
    fingerprint: list[list[Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Name and size of every file: enough to tell a checkpoint from another input's.
        self.fingerprint = [[f.name, f.stat().st_size] for f in self.files]


class HubSpotWriteStatusesOperator(BaseOperator):
    """Write email subscription statuses to HubSpot and account for every input.

    Inputs come either inline (``inputs``: a small list, often from XCom) or staged as JSONL in
    object storage (``input_uri``: one file, or a folder whose ``*.jsonl`` files are read in name
    order; names starting with ``_`` are skipped). Each line is
    ``{"input": {<PublicStatusRequest, camelCase>}, "occurredAt": "<ISO-8601>"}``, or just the
    input object. Staged input is streamed in segments of ``segment_size`` lines, each one
    :meth:`~hubspot_provider.hooks.hubspot.HubSpotHook.write_statuses` call, so memory stays flat
    in the number of records.

    * **Dead letters.** Every input that did not land (invalid, rejected by HubSpot, or a line
      that is not JSON) is written to ``dead_letter_uri`` as a JSONL line
      ``{"input", "category", "message", "retryable", "occurredAt"}``, one part file per segment
      with failures. A dead-letter line is itself a valid staged line: to replay, point
      ``input_uri`` at the dead-letter file or folder (with ``only_retryable=True`` to skip what
      will fail again).
    * **Checkpoints.** After each segment of staged input, progress is saved beside the input
      (``<file>.checkpoint.json`` or ``<folder>/_checkpoint.json``). A task retry, or a resume after
      deferral, continues from there; on completion the checkpoint is removed, so clearing the
      task later replays everything. Writes are idempotent and part files are overwritten, so a
      replay never duplicates a status or a dead letter.
    * **Rate limits.** When HubSpot's limit (including the ``DAILY`` one) needs a wait longer than
      ``max_wait_s``, a deferrable operator defers until the reset; otherwise it sleeps through
      waits of a few minutes and fails longer ones (the task retry resumes from the checkpoint).
    * **Failure policy.** Bad data never stops the sync. Once everything is sent, the task fails
      (without retries) only if ``failed / submitted`` exceeds ``max_failed_ratio``.
    * HubSpot staying unavailable fails the task (a task retry resumes from the checkpoint);
      authentication, scope and connection errors fail it without retries.
    * **Shards.** A big input can be written by several tasks at once: split it with
      :func:`~hubspot_provider.staging.shard_staged_input` (each contact's lines in one shard, in
      order) and map the operator over the shards. Each task keeps its checkpoint in its shard's
      folder and names its dead-letter and ledger parts after it, so shards share
      ``dead_letter_uri`` and ``ledger_uri`` and a retry resumes its own shard only.

    Returns (XCom) a summary of counts, never records: ``submitted, succeeded, changed,
    unchanged, superseded, failed, skipped, failed_by_category, reasons, dead_letter_uri,
    dead_letter_files, requests, retries, rate_limited, deferrals, elapsed_s, records_per_s``.
    ``elapsed_s`` is time spent sending, summed over tries, excluding rate-limit waits.

    .. code-block:: python

        from airflow.sdk import task

        from hubspot_provider.operators.hubspot import HubSpotWriteStatusesOperator
        from hubspot_provider.staging import shard_staged_input

        sync = HubSpotWriteStatusesOperator(
            task_id="write_statuses",
            input_uri="s3://aws_default@consent-bucket/staged/{{ ds }}/",
            max_failed_ratio=0.05,
            deferrable=True,
        )
        replay = HubSpotWriteStatusesOperator(
            task_id="replay_dead_letters",
            input_uri="s3://aws_default@consent-bucket/staged/{{ ds }}/dead-letters/",
            only_retryable=True,
        )

        # A big day written by several workers, one task per shard, through the pool.
        @task
        def shards(ds=None):
            return shard_staged_input(f"s3://aws_default@consent-bucket/staged/{ds}/", shard_size=100_000)

        HubSpotWriteStatusesOperator.partial(
            task_id="write_shards", pool="hubspot_api", deferrable=True,
        ).expand_kwargs(shards())

    :param inputs: inline inputs (dicts, camelCase or snake_case, optionally wrapped as
        ``{"input": ..., "occurredAt": ...}``). Templated; exactly one of ``inputs`` and
        ``input_uri`` must be given.
    :param input_uri: Airflow object-storage URI (``file://``, ``s3://conn_id@bucket/...``, …) of a
        staged JSONL file or folder. Templated.
    :param dead_letter_uri: folder for dead-letter part files. Default for staged input: a
        ``dead-letters/`` folder beside the file (or beside the folder, i.e. in its parent); for
        inline input, none (failures are only counted). Templated.
    :param hubspot_conn_id: Airflow connection of type ``hubspot``. Templated.
    :param batch_size: inputs per request; defaults to the connection's (else 100). Templated.
    :param max_failed_ratio: largest share of failed inputs that still counts as success (0..1);
        ``None`` leaves the judgement to the DAG, which applies one policy over the whole run (the
        example DAGs do, so invalid rows and HubSpot's rejections count alike).
    :param require_legal_basis: reject inputs lacking ``legalBasis``/``legalBasisExplanation``
        before sending (GDPR-enabled portals).
    :param max_concurrency: batches in flight at once; ``None`` lets the hook size it from HubSpot's
        limit and the round trip it measures (4 to 16).
    :param only_retryable: skip lines whose ``retryable`` is ``false``, i.e. dead letters that
        would fail again; use when replaying dead letters.
    :param deferrable: defer (free the worker slot) while a rate limit resets.
    :param max_wait_s: longest rate-limit wait the hook sleeps through before raising for deferral.
    :param segment_size: lines per checkpointed segment (default ``batch_size * 20``).
    :param ledger_uri: folder for the ledger's part files: one audit record per status sent (see
        :mod:`hubspot_provider.ledger`). Default for staged input: an ``audit/`` folder beside the
        dead-letter folder; for inline input, none unless given. Templated.
    :param audit_conn_id: optional SQL connection (common-sql) the ledger is also appended to; empty
        or ``None`` for files only. Templated.
    :param audit_table: that connection's ledger table (see :data:`hubspot_provider.ledger.LEDGER_DDL`).
    :param inputs_validated: the staged inputs were written by a validate step (the consent sync's
        ``validate`` task): they are sent as they are, not validated a second time. A line that is not
        in wire form is still validated.
    :param input_count: how many lines the staged input holds, when an earlier step already counted
        them (the consent sync's ``validate``); the "of N" of the progress log. Without it the operator
        counts the lines itself before the first segment. Templated.
    :param hubspot_changes: what to do when consent changed inside HubSpot after the source event
        (footer unsubscribe, preferences page, a user in HubSpot's UI): ``respect_opt_outs`` (default;
        a newer HubSpot-side opt-out wins, the write is withheld as ``NEWER_OPT_OUT_IN_HUBSPOT``),
        ``respect_all`` (any newer HubSpot-side change wins) or ``source_wins`` (no reads). See
        :mod:`hubspot_provider.hooks._guard`. Templated.
    :param dry_run: write nothing; read HubSpot's current statuses and write the plan (per input: the
        current and proposed status, and whether it would change, be a no-op or be withheld) to
        ``plan_uri``, with counts by transition in the summary. Templated.
    :param own_sources: ``source`` values HubSpot gives this provider's writes (default
        ``"Public status API"``, plus whatever write answers show).
    :param plan_uri: folder for a dry run's plan part files (default: ``plan/`` beside the dead letters).
    :param ledger: ``False`` writes no ledger at all (not recommended: nothing would prove what was
        written; it exists to measure the ledger's cost).
    """

    template_fields: Sequence[str] = (
        "inputs",
        "input_uri",
        "dead_letter_uri",
        "hubspot_conn_id",
        "batch_size",
        "ledger_uri",
        "audit_conn_id",
        "audit_table",
        "input_count",
        "hubspot_changes",
        "dry_run",
    )
    ui_color = "#ff7a59"

    def __init__(
        self,
        *,
        inputs: list[dict[str, Any]] | str | None = None,
        input_uri: str | None = None,
        dead_letter_uri: str | None = None,
        hubspot_conn_id: str = HubSpotHook.default_conn_name,
        batch_size: int | None = None,
        max_failed_ratio: float | None = 0.25,
        require_legal_basis: bool = False,
        max_concurrency: int | None = None,
        only_retryable: bool = False,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        max_wait_s: float = 120,
        segment_size: int | None = None,
        ledger_uri: str | None = None,
        audit_conn_id: str | None = None,
        audit_table: str = "hubspot_consent_ledger",
        ledger: bool = True,
        inputs_validated: bool = False,
        input_count: int | str | None = None,
        hubspot_changes: str = DEFAULT_POLICY,
        dry_run: bool | str = False,
        own_sources: Sequence[str] | None = None,
        plan_uri: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if (inputs is None) == (input_uri is None):
            raise ValueError(
                "Give exactly one of inputs (inline rows) and input_uri (staged JSONL file or folder)"
            )
        if max_failed_ratio is not None and not 0 <= max_failed_ratio <= 1:
            raise ValueError(f"max_failed_ratio must be between 0 and 1, got {max_failed_ratio}")
        if segment_size is not None and segment_size < 1:
            raise ValueError(f"segment_size must be a positive number of lines, got {segment_size}")
        self.inputs = inputs
        self.input_uri = input_uri
        self.dead_letter_uri = dead_letter_uri
        self.hubspot_conn_id = hubspot_conn_id
        self.batch_size = batch_size
        self.max_failed_ratio = max_failed_ratio
        self.require_legal_basis = require_legal_basis
        self.max_concurrency = max_concurrency
        self.only_retryable = only_retryable
        self.deferrable = deferrable
        self.max_wait_s = max_wait_s
        self.segment_size = segment_size
        self.ledger_uri = ledger_uri
        self.audit_conn_id = audit_conn_id
        self.audit_table = audit_table
        self.ledger = ledger
        self.inputs_validated = inputs_validated
        self.input_count = input_count
        if "{{" not in str(hubspot_changes):
            check_policy(hubspot_changes)
        self.hubspot_changes = hubspot_changes
        self.dry_run = dry_run
        self.own_sources = own_sources
        self.plan_uri = plan_uri
        self._own = OwnWrites(own_sources)
        self._plan: ObjectStoragePath | None = None
        self._audit: list[LedgerRecord | None] = []
        self._rendered_inputs: list[Any] | None = None
        self._ledger: ObjectStoragePath | None = None
        self._sql_ledger: SqlLedger | None = None
        self._ledger_context: dict[str, Any] = {}

    def render_template_fields(self, context: Any, jinja_env: Any = None) -> None:
        """Render the templates, then keep inline inputs out of Airflow's rendered-template view.

        Airflow stores every rendered template field and shows it in the UI. Inline inputs hold email
        addresses, so after rendering they are kept on the task only, and the field shows a count.
        """
        super().render_template_fields(context, jinja_env)
        if self.inputs is None:
            return
        try:
            self._rendered_inputs = _inline_list(self.inputs)
        except TypeError:
            return  # left as rendered: execute() reports the error with the fix
        self.inputs = f"<{len(self._rendered_inputs)} inline inputs, not shown: they hold email addresses>"

    @cached_property
    def hook(self) -> HubSpotHook:
        """The :class:`~hubspot_provider.hooks.hubspot.HubSpotHook` this task writes through."""
        return HubSpotHook(
            self.hubspot_conn_id,
            batch_size=self._batch_size,
            max_wait_s=self.max_wait_s,
            max_concurrency=self.max_concurrency,
            require_legal_basis=self.require_legal_basis,
        )

    @property
    def _policy(self) -> str:
        return check_policy(self.hubspot_changes)

    @property
    def _dry_run(self) -> bool:
        # Rendered templates are strings ("True", "false", ...).
        return str(self.dry_run).strip().lower() in ("true", "1", "yes")

    @property
    def _batch_size(self) -> int | None:
        # Rendered templates are strings.
        return int(self.batch_size) if self.batch_size not in (None, "") else None

    # ------------------------------------------------------------------ entry points

    def execute(self, context: Context) -> dict[str, Any]:
        """Write every input (resuming from a checkpoint when one exists) and return the summary."""
        return self._run_with_ledger_writer(context, None, resuming=False)

    def execute_complete(
        self, context: Context, event: Any = None, progress: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Resume after a rate-limit deferral: staged input from its checkpoint, inline from ``progress``.

        :param event: the trigger's payload (the moment the wait ended); not needed.
        :param progress: where inline input stopped, passed through the deferral.
        """
        if progress is None and self.input_uri is None:
            # ``airflow dags test`` (3.3) resumes with the event only, dropping the defer kwargs; the
            # copy in XCom (kept while a task is deferred) stops it restarting from the first input.
            ti = context.get("ti") if context else None
            if ti is not None:
                progress = ti.xcom_pull(task_ids=ti.task_id, key=PROGRESS_XCOM_KEY, map_indexes=ti.map_index)
        return self._run_with_ledger_writer(context, progress, resuming=True)

    def _run_with_ledger_writer(
        self, context: Context, resumed: dict[str, Any] | None, *, resuming: bool
    ) -> dict[str, Any]:
        self._ledger_writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hubspot-ledger")
        try:
            return self._run(context, resumed, resuming=resuming)
        finally:
            self._ledger_writer.shutdown(wait=True)

    # ------------------------------------------------------------------ the run

    def _run(self, context: Context, resumed: dict[str, Any] | None, *, resuming: bool) -> dict[str, Any]:
        staged = self._staged() if self.input_uri is not None else None
        segment_size = self.segment_size or (self._batch_size or self.hook.batch_size) * SEGMENT_BATCHES
        if staged is not None:
            progress, segment_size = self._load_checkpoint(staged, segment_size)
            dead_letters: ObjectStoragePath | None = staged.dead_letters
        else:
            progress = _Progress.from_dict(resumed) if resumed else None
            dead_letters = None
            if self.dead_letter_uri:
                dead_letters = ObjectStoragePath(str(self.dead_letter_uri).strip())
        prefix = self._part_prefix(staged)
        self._open_ledger(context, dead_letters)
        if progress is None:
            progress = _Progress()
            # A dry run rewrites its plan and leaves the dead letters and the ledger of real runs alone.
            folders = (self._plan,) if self._dry_run else (dead_letters, self._ledger)
            for folder in folders:
                if folder is not None:
                    self._remove_stale_parts(folder, prefix)
        else:
            if progress.segment_size:
                segment_size = progress.segment_size
            if not resuming:
                progress.stalled_waits = 0  # a new try deserves a full allowance of waits
            self.log.info("Resuming after %d lines (%d segments) already written", progress.lines_done,
                          progress.segments)

        if self.input_count not in (None, ""):
            total = int(self.input_count)  # rendered templates are text
        elif staged is not None:
            total = self._count_lines(staged)
        else:
            total = len(self._inline_items())
        mark = time.monotonic()

        # A segment's ledger is built and written by a background writer while the next segment is
        # sent. Its checkpoint is saved only once that ledger is written, so the checkpoint on disk
        # lags one segment: a resume may send a segment again (harmless), never skip its ledger.
        pending: tuple[Future[None] | None, dict[str, Any]] | None = None

        def tick() -> None:
            nonlocal mark
            now = time.monotonic()
            progress.elapsed_s = round(progress.elapsed_s + now - mark, 3)
            mark = now

        def settle() -> None:
            nonlocal pending
            if pending is not None:
                job, snapshot = pending
                pending = None
                if job is not None:
                    job.result()
                if staged is not None:
                    self._save_checkpoint(staged, snapshot, segment_size)

        def save() -> None:
            settle()
            tick()
            if staged is not None:
                self._save_checkpoint(staged, progress.to_dict(), segment_size)

        while True:
            try:
                for segment in self._segments(staged, progress, segment_size):
                    job = self._write_segment(segment, progress, dead_letters, prefix)
                    if staged is not None:
                        # The reader is suspended right after the segment's last line: that is what is done.
                        self._done_hash = self._reading_hash.copy()
                        progress.prefix_sha256 = self._done_hash.hexdigest()
                    tick()
                    snapshot = progress.to_dict()
                    settle()
                    pending = (job, snapshot)
                    self.log.info("%s", _progress_line(progress, total))
                settle()
                break
            except HubSpotRateLimitError as exc:
                progress.add_traffic(exc.partial_report)
                progress.stalled_waits += 1
                # An interrupted segment is sent again whole. If a segment needs more requests than
                # the limit allows between resets, it would never finish; from here on, one batch
                # per segment, so every acknowledged request is checkpointed.
                one_batch = self._batch_size or self.hook.batch_size
                if segment_size > one_batch:
                    segment_size = progress.segment_size = one_batch
                save()
                wait_s = (exc.reset_at - datetime.now(timezone.utc)).total_seconds()
                if progress.stalled_waits > MAX_STALLED_WAITS:
                    self.log.error(
                        "HubSpot rate limit: %d waits in a row without finishing a segment; something else "
                        "uses up the budget. Failing; a task retry resumes from the checkpoint",
                        progress.stalled_waits - 1,
                    )
                    raise
                if self.deferrable:
                    self._defer_until(exc, progress, staged, context, save)
                if wait_s > MAX_INLINE_SLEEP_S:
                    self.log.error(
                        "HubSpot rate limit resets at %s, too far off to wait in a worker slot. Failing; a "
                        "task retry resumes from the checkpoint (deferrable=True waits without a slot)",
                        exc.reset_at.isoformat(),
                    )
                    raise
                self.log.info("HubSpot rate limit: waiting %.0fs until %s, then resuming", wait_s,
                              exc.reset_at.isoformat())
                # Retry-After has one-second resolution; a little slack avoids hitting the limit again.
                time.sleep(max(0.0, wait_s) + 0.5)
                mark = time.monotonic()
            except (HubSpotUnavailableError, HubSpotRequestError, HubSpotResponseError) as exc:
                # Nothing after the last checkpoint was confirmed; a task retry resumes from it.
                progress.add_traffic(exc.partial_report)
                save()
                raise
            except (HubSpotAuthError, HubSpotConfigError) as exc:
                # A wrong token, a missing scope or a bad connection will not fix itself on a retry.
                save()
                raise AirflowFailException(str(exc)) from exc

        if staged is not None and not self._dry_run:
            staged.checkpoint.unlink(missing_ok=True)
        summary = self._summary(progress, dead_letters)
        if not progress.report.submitted and not progress.skipped and not progress.plan:
            self.log.warning("No input to write: %s holds no lines", self.input_uri or "inputs")
        if self._dry_run:
            # A plan judges nothing: the real run applies the failure policy.
            self.log.info("HubSpot dry run done (nothing written):\n%s", _summary_lines(summary))
            return summary
        self.log.info("HubSpot status sync done:\n%s", _summary_lines(summary))
        self._apply_failure_policy(summary, context)
        return summary

    def _defer_until(
        self,
        exc: HubSpotRateLimitError,
        progress: _Progress,
        staged: _Staged | None,
        context: Context,
        save: Callable[[], None],
    ) -> None:
        progress.deferrals += 1
        save()
        self.log.info(
            "HubSpot rate limit (%s): deferring until %s; %d segments done, the interrupted one is sent "
            "again on resume", exc.category or "429", exc.reset_at.isoformat(), progress.segments,
        )
        kwargs = None
        if staged is None:
            kwargs = {"progress": progress.to_dict()}
            ti = context.get("ti") if context else None
            if ti is not None:
                ti.xcom_push(key=PROGRESS_XCOM_KEY, value=kwargs["progress"])
        self.defer(
            trigger=DateTimeTrigger(moment=exc.reset_at), method_name="execute_complete", kwargs=kwargs
        )

    def _write_segment(
        self,
        segment: list[_Record],
        progress: _Progress,
        dead_letters: ObjectStoragePath | None,
        prefix: str,
    ) -> Future[None] | None:
        """Send one segment; returns the background job writing its ledger (``None`` when there is none).

        Each input is validated once (or taken as the validate step wrote it); the ``hubspot_changes``
        policy then reads HubSpot's current statuses where a write could (re)subscribe, and withholds
        what a newer HubSpot-side change wins. Opt-outs from all email go first, then statuses. A dry
        run reads and plans, and writes nothing to HubSpot.
        """
        letters: list[tuple[int, dict[str, Any]]] = [
            (r.line, dead_letter(r.value, INVALID_INPUT, r.error or "not valid JSON", False, None))
            for r in segment if r.kind == "invalid"
        ]
        unsendable = len(letters)
        entries: list[tuple[_Record, dict[str, Any]]] = []
        for r in segment:
            if r.kind != "input":
                continue
            wire, problem = self._wire(r.value)
            if wire is None:
                letters.append((r.line, dead_letter(camel_keys(as_dict(r.value)), INVALID_INPUT, problem, False,
                                                    r.occurred_at)))
                unsendable += 1
            else:
                entries.append((r, wire))
        verdicts: list[Verdict | None] = [None] * len(entries)
        if entries and (self._dry_run or self._policy != SOURCE_WINS):
            stats = Stats()
            try:
                verdicts = self.hook.check_hubspot_changes(
                    [(wire, parse_instant(r.occurred_at)) for r, wire in entries], self._policy,
                    own=self._own, read_all=self._dry_run, stats=stats,
                )
            finally:
                progress.report += WriteReport(reads=stats.requests, retries=stats.retries,
                                               rate_limited=stats.rate_limited)
        if self._dry_run:
            # Invalid lines are listed in the plan; the dead letters of a real run are left alone.
            self._plan_segment(entries, verdicts, progress, prefix + f"{segment[0].line:0{_LINE_DIGITS}d}.jsonl",
                               letters)
            letters = []
            report = WriteReport()
        else:
            try:
                report = self._send_segment(entries, verdicts, letters)
            except HubSpotError:
                # The segment is sent again whole, and its re-sends find HubSpot already in that
                # state. The writes that did land now must keep their own audit records.
                self._keep_interrupted_ledger(prefix, segment[0].line, progress)
                raise
        progress.add_outcomes(report)
        progress.add_unsendable(unsendable)
        progress.skipped += sum(1 for r in segment if r.kind == "skip")
        last = segment[-1]
        part = f"{prefix}{segment[0].line:0{_LINE_DIGITS}d}.jsonl"
        if letters and dead_letters is not None:
            self._write_part(dead_letters, part, letters)
            progress.dead_letter_files += 1
        job = None
        records, self._audit = [r for r in self._audit if r is not None], []
        if records:
            job = self._ledger_writer.submit(self._write_ledger, part, records)
            progress.ledger_records += len(records)
        progress.lines_done = last.line
        progress.file_index, progress.file_line = last.file_index, last.file_line
        progress.segments += 1
        progress.stalled_waits = 0
        return job

    def _wire(self, value: Any) -> tuple[dict[str, Any] | None, str]:
        """The input in wire form, or ``None`` and why it is invalid (the one validation)."""
        if self.inputs_validated and type(value) is dict and value.get("statusState") != UNSUBSCRIBE_ALL:
            return value, ""  # as the validate step wrote it; the hook still checks its shape
        try:
            return validate_consent_input(value, require_legal_basis=self.require_legal_basis).to_wire(), ""
        except ValidationError as exc:
            return None, describe_validation_error(exc)

    def _send_segment(
        self,
        entries: list[tuple[_Record, dict[str, Any]]],
        verdicts: list[Verdict | None],
        letters: list[tuple[int, dict[str, Any]]],
    ) -> WriteReport:
        """Write what the policy lets through (opt-outs from all email first); account for the rest."""
        report = WriteReport()
        context = self._ledger_context
        keep_ledger = self._ledger is not None or self._sql_ledger is not None
        # Each outcome becomes its audit record at once (a struct the garbage collector need not
        # track, so HubSpot's parsed answer is freed now); encoding and writing them is the ledger
        # writer's work. By input position, so the part file follows the staged order.
        audit: list[LedgerRecord | None] = [None] * len(entries)
        self._audit = audit
        everything, statuses = [], []
        for position, ((record, wire), verdict) in enumerate(zip(entries, verdicts)):
            if verdict is not None and verdict.action == UNKNOWN:
                report.add_failure(FailedInput(index=position, input=wire, category=verdict.category,
                                               message=verdict.message, retryable=True), keep=False)
                letters.append((record.line, dead_letter(wire, verdict.category, verdict.message, True,
                                                         record.occurred_at)))
            elif verdict is not None and verdict.action == WITHHOLD:
                report.add_withheld(verdict.category or WITHHOLD)
                letters.append((record.line, dead_letter(wire, verdict.category, verdict.message, False,
                                                         record.occurred_at)))
                if keep_ledger:
                    audit[position] = withheld_record(wire, verdict, occurred_at=record.occurred_at, **context)
            elif wire.get("statusState") == UNSUBSCRIBE_ALL:
                everything.append(position)
            else:
                statuses.append(position)

        def outcomes(positions: list[int]) -> Callable[[InputOutcome], None]:
            def record_outcome(outcome: InputOutcome) -> None:
                position = positions[outcome.index]
                if outcome.result is not None:
                    self._own.learn(outcome.result, outcome.input)
                if keep_ledger:
                    audit[position] = ledger_record(
                        outcome, occurred_at=entries[position][0].occurred_at, **context
                    )
            return record_outcome

        for positions, write in ((everything, self.hook.unsubscribe_all), (statuses, self._write_statuses)):
            if not positions:
                continue
            sent = write([entries[p][1] for p in positions], batch_size=self._batch_size,
                         on_outcome=outcomes(positions))
            for failure in sent.failed:
                record = entries[positions[failure.index or 0]][0]
                letters.append((record.line, dead_letter_from(failure, record.occurred_at)))
            report += sent
        return report

    def _write_statuses(self, wires: list[dict[str, Any]], **kwargs: Any) -> WriteReport:
        return self.hook.write_statuses(wires, validated=True, **kwargs)

    def _plan_segment(
        self,
        entries: list[tuple[_Record, dict[str, Any]]],
        verdicts: list[Verdict | None],
        progress: _Progress,
        part: str,
        invalid: list[tuple[int, dict[str, Any]]],
    ) -> None:
        """A dry run's plan for one segment: per input, HubSpot's current status, the proposed one,
        and whether it would change, be a no-op, or be withheld by the policy (or its status could not
        be read: ``unknown``); invalid lines as ``invalid``, with the reason."""
        rows = [(line, {**letter, "action": "invalid"}) for line, letter in invalid]
        for (record, wire), verdict in zip(entries, verdicts):
            if verdict is None:  # a dry run reads every key; this cannot happen, but never guess
                continue
            progress.plan[verdict.action] = progress.plan.get(verdict.action, 0) + 1
            if verdict.action == CHANGE:
                progress.transitions[verdict.label] = progress.transitions.get(verdict.label, 0) + 1
            rows.append((record.line, {
                "input": wire, "occurredAt": record.occurred_at, "action": verdict.action,
                "transition": verdict.label, "current": verdict.current.to_dict() if verdict.current else None,
                "category": verdict.category, "message": verdict.message,
            }))
        if rows and self._plan is not None:
            self._write_part(self._plan, part, rows)
            progress.plan_files += 1

    def _keep_interrupted_ledger(self, prefix: str, first_line: int, progress: _Progress) -> None:
        records, self._audit = [r for r in self._audit if r is not None], []
        if not records:
            return
        progress.interruptions += 1
        self._write_ledger(f"{prefix}{first_line:0{_LINE_DIGITS}d}.interrupted-{progress.interruptions}.jsonl",
                           records)
        progress.ledger_records += len(records)

    def _write_ledger(self, part: str, records: list[LedgerRecord]) -> None:
        if self._ledger is not None:
            write_part(self._ledger, part, records)
        if self._sql_ledger is not None:
            self._sql_ledger.append(records)

    def _apply_failure_policy(self, summary: dict[str, Any], context: Context) -> None:
        problem = failure_ratio_exceeded(
            summary["failed"], summary["submitted"], self.max_failed_ratio, what="inputs",
            by_category=summary["failed_by_category"], where=summary["dead_letter_uri"],
            fix="Fix the data at the source, or replay the dead letters with only_retryable=True",
        )
        if problem is not None:
            # A failed task pushes no return value; an alerting task downstream still needs the counts.
            ti = context.get("ti") if context else None
            if ti is not None and self.do_xcom_push:
                ti.xcom_push(key="return_value", value=summary)
            raise AirflowFailException(problem)

    def _summary(self, progress: _Progress, dead_letters: ObjectStoragePath | None) -> dict[str, Any]:
        report = progress.report
        unchanged = report.reasons.get("NO_STATUS_CHANGE", 0)
        elapsed = progress.elapsed_s
        written = dead_letters is not None and progress.dead_letter_files > 0
        return {
            "submitted": report.submitted,
            "succeeded": report.succeeded,
            "changed": report.changed,
            "unchanged": unchanged,
            "superseded": report.superseded,
            "failed": report.failed_count,
            "retryable_failed": report.retryable_failed,
            "withheld": report.withheld,
            "withheld_by_category": dict(sorted(report.withheld_by_category.items())),
            "hubspot_changes": self._policy,
            "reads": report.reads,
            "dry_run": self._dry_run,
            "plan": {**{action: progress.plan.get(action, 0) for action in (CHANGE, NO_OP, WITHHOLD, UNKNOWN)},
                     "transitions": dict(sorted(progress.transitions.items(), key=lambda kv: (-kv[1], kv[0])))}
            if self._dry_run else None,
            "plan_uri": str(self._plan) if self._dry_run and self._plan is not None and progress.plan_files else None,
            "skipped": progress.skipped,
            "failed_by_category": dict(sorted(report.failed_by_category.items())),
            "reasons": dict(sorted(report.reasons.items())),
            "dead_letter_uri": str(dead_letters) if written else None,
            "dead_letter_files": progress.dead_letter_files,
            "ledger_uri": str(self._ledger) if self._ledger is not None and progress.ledger_records else None,
            "ledger_records": progress.ledger_records,
            "requests": report.requests,
            "retries": report.retries,
            "rate_limited": report.rate_limited,
            "deferrals": progress.deferrals,
            "elapsed_s": round(elapsed, 3),
            "records_per_s": round(report.submitted / elapsed, 1) if elapsed > 0 else 0.0,
            # The one results model itself (counts only), for the run's totals downstream.
            "report": report.model_dump(mode="json", exclude={"failed"}),
        }

    def _open_ledger(self, context: Context | None, dead_letters: ObjectStoragePath | None) -> None:
        if self.plan_uri:
            self._plan = ObjectStoragePath(str(self.plan_uri).strip())
        elif dead_letters is not None:
            self._plan = dead_letters.parent / PLAN_FOLDER
        if not self.ledger:
            return
        if self.ledger_uri:
            self._ledger = ObjectStoragePath(str(self.ledger_uri).strip())
        elif self.input_uri is not None and dead_letters is not None:
            self._ledger = dead_letters.parent / LEDGER_FOLDER
        conn_id = str(self.audit_conn_id or "").strip()
        if conn_id and conn_id != "None":
            self._sql_ledger = SqlLedger(conn_id, str(self.audit_table))
        self._own = OwnWrites(self.own_sources, ledger=self._sql_ledger)
        context = context or {}
        self._ledger_context = {
            "run_id": context.get("run_id"),
            # As text once, not once per record.
            "data_interval_start": as_text(context.get("data_interval_start")),
            "data_interval_end": as_text(context.get("data_interval_end")),
        }

    # ------------------------------------------------------------------ reading input

    def _segments(self, staged: _Staged | None, progress: _Progress, size: int) -> Iterator[list[_Record]]:
        if staged is not None:
            records = self._staged_records(staged, progress)
        else:
            records = self._inline_records(progress)
        segment: list[_Record] = []
        for record in records:
            segment.append(record)
            if len(segment) >= size:
                yield segment
                segment = []
        if segment:
            yield segment

    def _inline_items(self) -> list[Any]:
        return self._rendered_inputs if self._rendered_inputs is not None else _inline_list(self.inputs)

    @staticmethod
    def _count_lines(staged: _Staged) -> int:
        """Non-blank lines of the staged input: the "of N" of the progress log (one streamed read)."""
        count = 0
        for path in staged.files:
            with path.open("rb") as handle:
                for raw in handle:
                    count += bool(raw.strip())
        return count

    def _inline_records(self, progress: _Progress) -> Iterator[_Record]:
        items = self._inline_items()
        for position in range(progress.lines_done, len(items)):
            yield self._record(items[position], line=position + 1, file_index=0, file_line=0)

    def _staged_records(self, staged: _Staged, progress: _Progress) -> Iterator[_Record]:
        # Every line read is hashed, so a checkpoint is bound to the content it covers. Blank lines and
        # file boundaries are hashed with the next record: the hash always ends at a record's line.
        hasher = self._reading_hash = self._done_hash.copy()
        pending: list[bytes] = []
        line = progress.lines_done
        for file_index in range(progress.file_index, len(staged.files)):
            skip = progress.file_line if file_index == progress.file_index else 0
            if not skip:
                pending.append(file_marker(staged.files[file_index]))
            with staged.files[file_index].open("r", encoding="utf-8", errors="replace") as handle:
                for file_line, raw in enumerate(handle, start=1):
                    if file_line <= skip:
                        continue
                    line += 1
                    text = raw.strip()
                    if not text:
                        pending.append(raw.encode("utf-8"))
                        continue
                    for chunk in pending:
                        hasher.update(chunk)
                    pending.clear()
                    hasher.update(raw.encode("utf-8"))
                    try:
                        value = json.loads(text)
                    except ValueError as exc:
                        yield _Record(line, file_index, file_line, "invalid", {"raw": text[:_RAW_LINE_LIMIT]},
                                      error=f"{staged.files[file_index]} line {file_line}: not valid JSON "
                                      f"({getattr(exc, 'msg', exc)} at column {getattr(exc, 'colno', '?')}); "
                                      "fix or drop this line at the source")
                        continue
                    yield self._record(value, line=line, file_index=file_index, file_line=file_line)


    def _record(self, value: Any, *, line: int, file_index: int, file_line: int) -> _Record:
        if self.only_retryable and isinstance(value, dict) and value.get("retryable") is False:
            return _Record(line, file_index, file_line, "skip")
        if isinstance(value, dict) and "input" in value:
            return _Record(line, file_index, file_line, "input", value["input"], value.get("occurredAt"))
        return _Record(line, file_index, file_line, "input", value)

    # ------------------------------------------------------------------ staging, checkpoints, dead letters

    def _staged(self) -> _Staged:
        root = ObjectStoragePath(str(self.input_uri).strip())
        if root.is_dir():
            files = jsonl_files(root)
            checkpoint = root / FOLDER_CHECKPOINT
            default_dead_letters = root.parent / DEAD_LETTER_FOLDER
            # Replaying a dead-letter folder: its own dead letters must not overwrite the parts being read.
            if _same(default_dead_letters, root) or _same(root.parent, root):
                default_dead_letters = root / DEAD_LETTER_FOLDER
            staged = _Staged(root, True, files, checkpoint, default_dead_letters)
        elif root.is_file():
            staged = _Staged(root, False, [root], root.with_name(root.name + FILE_CHECKPOINT_SUFFIX),
                             root.parent / DEAD_LETTER_FOLDER)
        else:
            raise FileNotFoundError(
                f"input_uri {self.input_uri} is neither a file nor a folder; check the URI and that the "
                "staging task wrote it"
            )
        if self.dead_letter_uri:
            staged.dead_letters = ObjectStoragePath(str(self.dead_letter_uri).strip())
            if staged.is_folder and _same(staged.dead_letters, root):
                raise ValueError(
                    f"dead_letter_uri {self.dead_letter_uri} is the input folder; part files would overwrite "
                    "the input being read. Choose another folder"
                )
        return staged

    @staticmethod
    def _part_prefix(staged: _Staged | None) -> str:
        # Sibling inputs share the default dead-letters/ folder; the input's name keeps their parts apart.
        if staged is None:
            return "part-"
        name = staged.root.name if staged.is_folder else staged.root.stem
        return f"part-{name}-"

    def _load_checkpoint(self, staged: _Staged, segment_size: int) -> tuple[_Progress | None, int]:
        """The progress a checkpoint holds, if it is intact and still matches the input it covers.

        A checkpoint carries its own digest and the digest of the staged lines it says are done; a
        resume re-reads those lines and compares. On any mismatch the run starts over (writes are
        idempotent, dead-letter parts are rewritten) with a warning, never skipping a line. A dry run
        neither reads nor writes checkpoints: the real run after it must start from the first line.
        """
        self._done_hash = hashlib.sha256()
        if self._dry_run:
            return None, segment_size
        if not staged.checkpoint.exists():
            return None, segment_size
        problem = None
        try:
            doc = json.loads(staged.checkpoint.read_text())
            claimed = doc.pop("sha256", None)
            progress = _Progress.from_dict(doc.get("progress"))
            if doc.get("version") != CHECKPOINT_VERSION:
                problem = "it was written by another version"
            elif claimed != digest(doc):
                problem = "it is not intact (its own digest does not match)"
            elif doc.get("files") != staged.fingerprint:
                problem = "the input's files changed (names or sizes)"
            elif (progress.lines_done, progress.file_index, progress.file_line, progress.prefix_sha256) == (0, 0, 0, ""):
                pass  # saved before any segment was done: it holds only counts of traffic and waits
            elif not 0 <= progress.file_index < len(staged.files) or progress.file_line < 1:
                problem = "its position is outside the input"
            else:
                done = prefix_hash(staged.files, progress.file_index, progress.file_line)
                if done.hexdigest() != progress.prefix_sha256:
                    problem = "the lines it covers changed since it was written"
                else:
                    self._done_hash = done
        except (ValueError, AttributeError, TypeError):
            problem = "it is unreadable"
        if problem is not None:
            self.log.warning(
                "Ignoring checkpoint %s: %s. Starting from the first line; writes are idempotent and "
                "dead-letter parts are rewritten, so nothing is duplicated", staged.checkpoint, problem,
            )
            return None, segment_size
        # Segment boundaries name the dead-letter parts; keep them where the first try put them.
        return progress, int(doc.get("segment_size") or segment_size)

    def _save_checkpoint(self, staged: _Staged, progress: dict[str, Any], segment_size: int) -> None:
        if self._dry_run:
            return
        doc = {
            "version": CHECKPOINT_VERSION,
            "input_uri": str(staged.root),
            "files": staged.fingerprint,
            "segment_size": segment_size,
            "progress": progress,
        }
        doc["sha256"] = digest(doc)
        staged.checkpoint.write_text(json.dumps(doc, separators=(",", ":")))

    def _remove_stale_parts(self, folder: ObjectStoragePath, prefix: str) -> None:
        # A fresh run rewrites every part; parts left from a run with other segment boundaries would
        # otherwise duplicate dead letters, or list inputs that no longer fail.
        if not folder.is_dir():
            return
        pattern = re.compile(re.escape(prefix) + r"\d+(\.interrupted-\d+)?\.jsonl")
        for part in folder.iterdir():
            if pattern.fullmatch(part.name):
                part.unlink(missing_ok=True)

    @staticmethod
    def _write_part(folder: ObjectStoragePath, name: str, letters: list[tuple[int, dict[str, Any]]]) -> None:
        letters.sort(key=lambda item: item[0])
        write_part(folder, name, (letter for _, letter in letters))


# ---------------------------------------------------------------------- helpers


def _progress_line(progress: _Progress, total: int) -> str:
    """``12,400 of 48,210 statuses (26%), 1,930/s, about 19 s left; 12 failed: OBJECT_NOT_FOUND 12``."""
    report = progress.report
    done = report.submitted + progress.skipped
    rate = report.submitted / progress.elapsed_s if progress.elapsed_s > 0 else 0.0
    text = f"{done:,} of {total:,} statuses ({100 * done / total if total else 100:.0f}%)"
    if rate > 0:
        text += f", {rate:,.0f}/s"
        if total > done:
            left = (total - done) / rate
            text += f", about {left:,.0f} s left" if left >= 1 else ", under 1 s left"
    if report.failed_count:
        text += f"; {report.failed_count:,} failed: {categories_in_words(report.failed_by_category)}"
    return text


def _summary_lines(summary: dict[str, Any]) -> str:
    """The final summary as a few readable lines (counts and paths only)."""
    lines = [
        f"  {summary['submitted']:,} statuses: {summary['succeeded']:,} confirmed by HubSpot "
        f"({summary['changed']:,} changed, {summary['unchanged']:,} already so), "
        f"{summary['superseded']:,} superseded, {summary['failed']:,} failed, {summary['skipped']:,} skipped",
    ]
    if summary.get("plan"):
        lines.append("  plan: " + plan_in_words(summary["plan"]) +
                     (f"; rows in {summary['plan_uri']}" if summary.get("plan_uri") else ""))
    if summary.get("withheld"):
        lines.append(f"  withheld ({summary['hubspot_changes']}: a newer change made in HubSpot wins): "
                     f"{categories_in_words(summary['withheld_by_category'])}; listed with the dead letters")
    if summary["failed"]:
        lines.append(f"  failed: {categories_in_words(summary['failed_by_category'])}; dead letters in "
                     f"{summary['dead_letter_uri'] or 'not written (no dead_letter_uri)'}")
    if summary["ledger_uri"]:
        lines.append(f"  ledger: {summary['ledger_records']:,} audit records in {summary['ledger_uri']}")
    lines.append(
        f"  HubSpot: {summary['requests']:,} requests ({summary.get('reads', 0):,} more to read current statuses), "
        f"{summary['retries']:,} retried, "
        f"{summary['rate_limited']:,} rate-limited, {summary['deferrals']:,} deferrals; "
        f"{summary['records_per_s']:,.0f} statuses/s over {summary['elapsed_s']:.1f} s"
    )
    return "\n".join(lines)


def _same(a: ObjectStoragePath, b: ObjectStoragePath) -> bool:
    return str(a).rstrip("/") == str(b).rstrip("/")


def _inline_list(inputs: Any) -> list[Any]:
    # A Jinja-rendered XCom arrives as text: JSON, or a Python literal when not rendered natively.
    if isinstance(inputs, str):
        try:
            inputs = json.loads(inputs)
        except ValueError:
            try:
                inputs = ast.literal_eval(inputs)
            except (ValueError, SyntaxError):
                raise TypeError("inputs is text that is neither JSON nor a Python list literal") from None
    if isinstance(inputs, dict):
        inputs = [inputs]
    if not isinstance(inputs, (list, tuple)):
        raise TypeError(f"inputs must be a list of dicts, got {type(inputs).__name__}")
    return list(inputs)
