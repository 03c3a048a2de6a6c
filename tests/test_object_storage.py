"""The pipeline on an object store that is not the local disk.

Staged files, checkpoints and dead letters go through ``airflow.sdk.ObjectStoragePath``, so ``s3://``
or ``gs://`` work where their provider is installed. Those need accounts; fsspec's in-memory
filesystem does not. Like a bucket it has no local paths and only pseudo-folders, so any use of
local-only path behaviour in extract, validate, the operator or the replay fails here.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import fsspec
import pytest
from airflow.sdk import ObjectStoragePath
from airflow.sdk.exceptions import TaskDeferred
from airflow.sdk.io import attach
from consent_days import write_consent_table

from hubspot_provider import consent
from hubspot_provider.operators import HubSpotWriteStatusesOperator


@pytest.fixture
def bucket():
    fs = fsspec.filesystem("memory")
    attach("memory", fs=fs)
    root = f"memory://bucket-{uuid.uuid4().hex[:8]}"
    yield ObjectStoragePath(root)
    fs.rm(root.removeprefix("memory://"), recursive=True)


@pytest.fixture
def source(tmp_path, monkeypatch):
    db = tmp_path / "consent.db"
    monkeypatch.setenv(
        "AIRFLOW_CONN_HUBSPOT_CONSENT_SOURCE", json.dumps({"conn_type": "sqlite", "host": str(db)})
    )
    write_consent_table(db, [
        *[(f"user{i}@example.com", 1001, "SUBSCRIBED", None, None, f"2026-03-10 {i % 24:02d}:00:00")
          for i in range(30)],
        ("not-an-email", 1001, "SUBSCRIBED", None, None, "2026-03-10 10:00:00"),
        ("when@example.com", 1001, "SUBSCRIBED", None, None, "tuesday"),
    ])


def lines(path: ObjectStoragePath) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_extract_validate_write_defer_and_replay_on_a_non_local_store(
    bucket, source, hubspot_emulator_factory, hubspot_conn
):
    emulator = hubspot_emulator_factory(daily_limit=2, daily_reset_s=1)
    hubspot_conn(emulator)
    run = bucket / "manual__2026-03-11"

    extracted = consent.extract_consent_events(
        source_conn_id="hubspot_consent_source", source_table="consent_events",
        data_interval_start="2026-03-10T00:00:00Z", data_interval_end="2026-03-11T00:00:00Z", run_uri=run,
    )
    validated = consent.validate_staged_events(extracted["run_uri"])
    assert (extracted["staged"], extracted["unplaceable"], validated["valid"], validated["invalid"]) == (
        31, 1, 30, 1
    )
    assert validated["validated_uri"].startswith("memory://")

    # The daily limit stops the write after two requests; the checkpoint is saved in the bucket.
    params = dict(task_id="submit", input_uri=validated["validated_uri"],
                  dead_letter_uri=validated["dead_letter_uri"], batch_size=5, segment_size=5, deferrable=True,
                  hubspot_changes="source_wins")  # the daily limit of 2 requests counts writes only
    with pytest.raises(TaskDeferred) as caught:
        HubSpotWriteStatusesOperator(**params).execute(context={})
    checkpoint = ObjectStoragePath(validated["validated_uri"]) / "_checkpoint.json"
    assert json.loads(checkpoint.read_text())["progress"]["lines_done"] == 10
    deferred = caught.value
    summary = None
    while summary is None:  # a day of 2 requests: it defers again until every segment is done
        event = asyncio.run(anext(deferred.trigger.run()))
        try:
            summary = HubSpotWriteStatusesOperator(**params).execute_complete(
                context={}, event=event.payload, **(deferred.kwargs or {})
            )
        except TaskDeferred as again:
            deferred = again

    assert (summary["submitted"], summary["succeeded"], summary["failed"]) == (30, 30, 0)
    assert summary["deferrals"] >= 2
    assert len(emulator.statuses) == 30
    assert not checkpoint.exists()
    dead = consent.count_dead_letters(validated["dead_letter_uri"])
    assert (dead["total"], dead["by_category"]) == (1, {"INVALID_INPUT": 1})
    # The row with an unreadable timestamp is listed apart, in the bucket too.
    assert ObjectStoragePath(extracted["unplaceable_uri"]).read_text().count("UNPLACEABLE") == 1

    # The replay reads those dead letters from the bucket and keeps its own files beside them.
    prepared = consent.prepare_replay(validated["dead_letter_uri"], run_id="replay-1",
                                      include_non_retryable=True, source_conn_id="hubspot_consent_source")
    assert prepared["replay_uri"].startswith("memory://") and prepared["selected"] == 1
    replayed = lines(ObjectStoragePath(prepared["input_uri"]) / consent.REPLAY_INPUT_FILE)
    assert [str(line["input"]["subscriberIdString"]) for line in replayed] == ["not-an-email"]
