"""Shards: a big day's validated statuses split by contact, and the shards' write summaries added up.

The whole path (mapped write tasks, their checkpoints and parts, the run's summary) is run with
``dag.test()`` in ``tests/test_dags.py`` and by real Celery workers in ``tests/test_distributed.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import fsspec
import pytest
from airflow.sdk import ObjectStoragePath
from airflow.sdk.io import attach

from hubspot_provider import consent
from hubspot_provider.results import WriteReport
from hubspot_provider.staging import contact_of, shard_name, shard_of, shard_staged_input, split_into_shards

CONTACTS = [f"user{i}@example.com" for i in range(200)]


def staged(email: str, subscription_id: int | None, state: str = "SUBSCRIBED") -> str:
    value = {"subscriberIdString": email, "statusState": state, "channel": "EMAIL"}
    if subscription_id is not None:
        value["subscriptionId"] = subscription_id
    return json.dumps({"input": value, "occurredAt": "2026-03-10T10:00:00Z"})


def read_lines(path: ObjectStoragePath) -> list[str]:
    return path.read_text().splitlines()


def test_a_contact_has_one_shard_in_every_process():
    # Python salts str hashes per process; a shard must not depend on which worker computes it.
    code = ("import json, sys; from hubspot_provider.staging import shard_of; "
            "print(json.dumps([shard_of(c, 7) for c in json.loads(sys.argv[1])]))")
    seen = set()
    for seed in ("1", "2"):
        done = subprocess.run([sys.executable, "-c", code, json.dumps(CONTACTS)], capture_output=True, text=True,
                              timeout=120, env={**os.environ, "PYTHONHASHSEED": seed})
        assert done.returncode == 0, done.stderr[-2000:]
        seen.add(tuple(json.loads(done.stdout.strip().splitlines()[-1])))
    assert seen == {tuple(shard_of(c, 7) for c in CONTACTS)}
    assert set(next(iter(seen))) == set(range(7))  # every shard gets contacts
    # The contact is the email as the status key normalises it: any case, surrounding whitespace.
    assert contact_of({"input": {"subscriberIdString": " Ada@Example.COM\t"}}) == "ada@example.com"
    assert shard_of(contact_of({"subscriberIdString": "ADA@example.com "}), 7) == shard_of("ada@example.com", 7)
    assert shard_of(None, 7) == 0 and shard_of("ada@example.com", 1) == 0


def test_shard_count_keeps_small_days_whole_and_bounds_the_number_of_shards():
    assert consent.shard_count(0) == consent.shard_count(consent.DEFAULT_SHARD_SIZE) == 1
    assert consent.shard_count(consent.DEFAULT_SHARD_SIZE + 1) == 2
    assert consent.shard_count(95, 10) == 10
    assert consent.shard_count(10**9, 1) == consent.MAX_SHARDS
    with pytest.raises(ValueError, match="shard_size"):
        consent.shard_count(10, 0)


def test_split_keeps_each_contact_in_one_shard_in_its_order(tmp_path):
    source = ObjectStoragePath((tmp_path / "in").as_uri())
    source.mkdir(parents=True)
    lines = []
    for i, email in enumerate(CONTACTS[:60]):
        # Mixed case for the same contact, and its opt-out from all email ahead of its statuses.
        lines.append(staged(email.upper() if i % 2 else email, None, "UNSUBSCRIBE_ALL"))
    for email in CONTACTS[:60]:
        lines += [staged(email, 1001), staged(email, 1002, "UNSUBSCRIBED")]
    lines += ["", "this is not JSON"]
    (source / "a.jsonl").write_text("\n".join(lines[:70]) + "\n")
    (source / "b.jsonl").write_text("\n".join(lines[70:]))  # no final newline

    shards = split_into_shards([source / "a.jsonl", source / "b.jsonl"], source, 4, "statuses.jsonl")

    assert [folder.name for folder, _count in shards] == [shard_name(i) for i in range(4)]
    assert sum(count for _folder, count in shards) == 60 * 3 + 1  # the blank line is dropped
    where: dict[str, set[int]] = {}
    for index, (folder, count) in enumerate(shards):
        written = read_lines(folder / "statuses.jsonl")
        assert len(written) == count > 0
        order: dict[str, list[str]] = {}
        for text in written:
            if text == "this is not JSON":
                assert index == 0  # no contact: shard 0, whose write task dead-letters it
                continue
            value = json.loads(text)["input"]
            contact = value["subscriberIdString"].lower()
            where.setdefault(contact, set()).add(index)
            order.setdefault(contact, []).append(value.get("subscriptionId", "*"))
        assert all(seen == ["*", 1001, 1002] for seen in order.values())
    assert len(where) == 60 and all(len(indexes) == 1 for indexes in where.values())


def test_split_gives_every_shard_a_file_even_an_empty_one(tmp_path):
    source = ObjectStoragePath((tmp_path / "in").as_uri())
    source.mkdir(parents=True)
    (source / "s.jsonl").write_text(staged("ada@example.com", 1001) + "\n")
    shards = split_into_shards([source / "s.jsonl"], source, 3, "statuses.jsonl")
    assert sorted(count for _folder, count in shards) == [0, 0, 1]
    assert all((folder / "statuses.jsonl").is_file() for folder, _count in shards)


def test_shard_staged_input_for_a_file_or_a_folder_of_the_operator(tmp_path):
    # What a DAG that stages its own input maps HubSpotWriteStatusesOperator over.
    folder = ObjectStoragePath((tmp_path / "staged").as_uri())
    folder.mkdir(parents=True)
    (folder / "a.jsonl").write_text("".join(staged(e, 1001) + "\n" for e in CONTACTS[:30]) + "\n\n")
    (folder / "b.jsonl").write_text("".join(staged(e, 1002) + "\n" for e in CONTACTS[:30]))

    assert shard_staged_input(folder, shard_size=60) == [{"input_uri": str(folder), "input_count": 60}]
    shards = shard_staged_input(folder, shard_size=20)
    assert len(shards) == 3 and sum(s["input_count"] for s in shards) == 60
    assert [ObjectStoragePath(s["input_uri"]).parent for s in shards] == [folder] * 3
    assert names(folder) == {"a.jsonl", "b.jsonl", *(shard_name(i) for i in range(3))}
    # The folder's own files are what the operator reads there: the shard sub-folders are skipped.
    from hubspot_provider.staging import jsonl_files
    assert [p.name for p in jsonl_files(folder)] == ["a.jsonl", "b.jsonl"]

    single = folder / "a.jsonl"
    shards = shard_staged_input(single, shard_size=10)
    assert len(shards) == 3 and sum(s["input_count"] for s in shards) == 30
    assert {ObjectStoragePath(s["input_uri"]).parent.name for s in shards} == {"a.jsonl.shards"}
    assert {p.name for p in (ObjectStoragePath(shards[0]["input_uri"])).iterdir()} == {"a.jsonl"}
    with pytest.raises(FileNotFoundError):
        shard_staged_input(folder / "missing.jsonl")


def validated_run(run: ObjectStoragePath, emails: list[str]) -> dict:
    folder = run / "validated"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "statuses.jsonl").write_text("".join(staged(e, 1001) + "\n" for e in emails))
    return {"valid": len(emails), "invalid": 0, "validated_uri": str(folder),
            "dead_letter_uri": str(run / "dead-letters"), "ledger_uri": str(run / "audit")}


def touch(folder: ObjectStoragePath, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text("{}\n")


def names(folder: ObjectStoragePath) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def test_shard_validated_small_day_is_the_validated_folder_itself(tmp_path):
    run = ObjectStoragePath((tmp_path / "run").as_uri())
    validated = validated_run(run, CONTACTS[:20])
    shards = consent.shard_validated(validated, shard_size=20)
    assert shards == [{"input_uri": validated["validated_uri"], "input_count": 20,
                       "dead_letter_uri": validated["dead_letter_uri"], "ledger_uri": validated["ledger_uri"]}]
    assert names(run / "validated") == {"statuses.jsonl"}  # nothing copied


@pytest.fixture
def bucket():
    fs = fsspec.filesystem("memory")
    attach("memory", fs=fs)
    root = f"memory://bucket-{uuid.uuid4().hex[:8]}"
    yield ObjectStoragePath(root)
    if fs.exists(root.removeprefix("memory://")):
        fs.rm(root.removeprefix("memory://"), recursive=True)


@pytest.mark.parametrize("store", ["local", "bucket"])
def test_reshard_replaces_an_earlier_attempts_shards_and_parts(store, tmp_path, bucket):
    run = (ObjectStoragePath((tmp_path / "run").as_uri()) if store == "local" else bucket / "run")
    validated = validated_run(run, CONTACTS[:100])

    first = consent.shard_validated(validated, shard_size=20)
    assert [s["input_count"] for s in first] and sum(s["input_count"] for s in first) == 100
    assert len(first) == 5 and {ObjectStoragePath(s["input_uri"]).name for s in first} == {
        shard_name(i) for i in range(5)}
    # What the five write tasks of that attempt left: a checkpoint, dead-letter and ledger parts, a plan.
    touch(ObjectStoragePath(first[3]["input_uri"]), "_checkpoint.json")
    touch(run / "dead-letters", "part-extract.jsonl", "part-validate.jsonl", "part-shard-00004-0000000001.jsonl")
    touch(run / "audit", "part-shard-00004-0000000001.jsonl", "part-shard-00001-0000000001.interrupted-1.jsonl")
    touch(run / "plan", "part-shard-00002-0000000001.jsonl")

    # A dry run of the same run split in two tidies only the plan; the real run's parts stay.
    second = consent.shard_validated(validated, shard_size=50, dry_run=True)
    assert len(second) == 2 and sum(s["input_count"] for s in second) == 100
    assert names(run / "plan") == set()
    assert "part-shard-00004-0000000001.jsonl" in names(run / "dead-letters")

    # A re-run in three shards: the shard folders of before are gone (the checkpoint with them), and so
    # are the parts of shards that no longer exist; extract's and validate's dead letters stay.
    third = consent.shard_validated(validated, shard_size=34)
    assert len(third) == 3
    assert names(run / "validated") == {"statuses.jsonl", *(shard_name(i) for i in range(3))}
    assert not (ObjectStoragePath(first[3]["input_uri"]) / "_checkpoint.json").exists()
    assert names(run / "dead-letters") == {"part-extract.jsonl", "part-validate.jsonl"}
    assert names(run / "audit") == {"part-shard-00001-0000000001.interrupted-1.jsonl"}  # shard 1 still exists
    contacts = [json.loads(line)["input"]["subscriberIdString"]
                for s in third for line in read_lines(ObjectStoragePath(s["input_uri"]) / "statuses.jsonl")]
    assert sorted(contacts) == sorted(CONTACTS[:100])

    # And back to one shard: the validated folder itself, every shard part gone.
    assert consent.shard_validated(validated, shard_size=1000)[0]["input_uri"] == validated["validated_uri"]
    assert names(run / "validated") == {"statuses.jsonl"} and names(run / "audit") == set()


def summary(**counts) -> dict:
    report = WriteReport(
        submitted=counts.get("submitted", 0), succeeded=counts.get("succeeded", 0),
        failed_count=counts.get("failed", 0), failed_by_category=counts.get("failed_by_category", {}),
        reasons=counts.get("reasons", {}), requests=counts.get("requests", 0), withheld=counts.get("withheld", 0),
        withheld_by_category=counts.get("withheld_by_category", {}),
    )
    return {
        "submitted": report.submitted, "succeeded": report.succeeded, "failed": report.failed_count,
        "failed_by_category": report.failed_by_category, "withheld": report.withheld,
        "withheld_by_category": report.withheld_by_category, "requests": report.requests,
        "dead_letter_uri": "file:///run/dead-letters", "ledger_uri": "file:///run/audit", "dry_run": False,
        "hubspot_changes": "respect_opt_outs", "plan": None, "elapsed_s": counts.get("elapsed_s", 1.0),
        "deferrals": counts.get("deferrals", 0), "report": report.model_dump(mode="json", exclude={"failed"}),
    }


def test_shard_summaries_add_up_to_one_summary_of_the_run():
    a = summary(submitted=10, succeeded=9, failed=1, failed_by_category={"OBJECT_NOT_FOUND": 1},
                reasons={"NO_STATUS_CHANGE": 4}, requests=2, elapsed_s=2.0, deferrals=1)
    b = summary(submitted=6, succeeded=5, withheld=1, withheld_by_category={"NEWER_OPT_OUT_IN_HUBSPOT": 1},
                requests=1, elapsed_s=2.0)
    c = summary(submitted=4, succeeded=2, failed=2, failed_by_category={"OBJECT_NOT_FOUND": 1, "UNCONFIRMED": 1},
                requests=1, elapsed_s=1.0)

    combined = consent.combine_write_summaries([a, None, b, c])  # a shard with no summary adds nothing

    assert combined["shards"] == 3
    assert (combined["submitted"], combined["succeeded"], combined["failed"], combined["withheld"]) == (20, 16, 3, 1)
    assert combined["failed_by_category"] == {"OBJECT_NOT_FOUND": 2, "UNCONFIRMED": 1}
    assert combined["withheld_by_category"] == {"NEWER_OPT_OUT_IN_HUBSPOT": 1}
    assert (combined["requests"], combined["deferrals"], combined["elapsed_s"], combined["records_per_s"]) == (
        4, 1, 5.0, 4.0)
    assert combined["dead_letter_uri"] == "file:///run/dead-letters" and combined["dry_run"] is False
    report = WriteReport.model_validate(combined["report"])
    assert (report.submitted, report.succeeded, report.failed_count, report.withheld) == (20, 16, 3, 1)
    assert report.succeeded + report.superseded + report.failed_count + report.withheld == report.submitted

    # The run's totals are the same whether one task wrote everything or three shards did.
    extracted = {"staged": 20, "in_interval": 20, "run_uri": None}
    validated = {"valid": 20, "invalid": 0}
    whole = consent.run_totals(extracted, validated, combined)
    assert whole == {**consent.run_totals(extracted, validated, [a, b, c]), "shards": 3}
    assert (whole["succeeded"], whole["unchanged"], whole["changed"], whole["failed"]) == (16, 4, 12, 3)
    assert consent.has_failures(extracted, validated, [a, b, c]) and not consent.has_failures(
        extracted, validated, [b | {"failed": 0}])
    # One summary (an unsharded write task) is taken as it is.
    assert consent.combine_write_summaries(a) == {"shards": 1, **a}
    assert consent.combine_write_summaries([]) == {} and consent.combine_write_summaries(None) == {}
