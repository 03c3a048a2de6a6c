"""Staging: the shapes and files every step of a sync shares, in one place.

* **Staged line**: ``{"input": {<PublicStatusRequest, camelCase>}, "occurredAt": "<ISO-8601>"}``
  (:func:`staged_line`).
* **Dead letter**: a staged line plus ``category``, ``message`` and ``retryable``
  (:func:`dead_letter`); a dead-letter line is itself valid staged input, so replaying is reading it.
* **JSONL I/O**: :class:`JsonlWriter` (created on the first line, a stale copy removed when nothing
  is written), :func:`write_part` (a whole part file in one write), :func:`jsonl_files` and
  :func:`read_objects`.
* **The status key** of a staged record (:func:`status_key`), and its contact (:func:`contact_of`).
* **Shards**: :func:`shard_of` (a contact's shard, the same in every process) and
  :func:`split_into_shards` (staged input split so that several write tasks share a day, each
  contact's lines in one shard and in their original order).
* **Checkpoint integrity**: :func:`digest` (a document's own digest), :func:`file_marker` and
  :func:`prefix_hash` (the SHA-256 of the lines a checkpoint says are done).

Extract, validate, the write operator and the replay all use these; none has its own copy.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from typing import IO, Any

import msgspec
from airflow.sdk import ObjectStoragePath
from pydantic.alias_generators import to_camel

from hubspot_provider.models import PublicStatusRequest
from hubspot_provider.results import FailedInput

__all__ = [
    "JsonlWriter",
    "DEFAULT_SHARD_SIZE",
    "MAX_SHARDS",
    "SHARD_FOLDER_PREFIX",
    "camel_keys",
    "contact_of",
    "dead_letter",
    "dead_letter_from",
    "digest",
    "dumps",
    "file_marker",
    "jsonl_files",
    "prefix_hash",
    "read_objects",
    "remove_tree",
    "shard_count",
    "shard_name",
    "shard_of",
    "shard_staged_input",
    "split_into_shards",
    "staged_line",
    "status_key",
    "write_part",
]

SHARD_FOLDER_PREFIX = "shard-"
_SHARD_DIGITS = 5
# Statuses per shard (one write task each). An input up to this size is written by one task; a
# bigger one by several, through the hubspot_api pool. At HubSpot's slowest tier (1,000 statuses/s
# for the whole app) a full shard is a couple of minutes of a writer's time.
DEFAULT_SHARD_SIZE = 100_000
# Every shard is a mapped task instance and a scratch file held open while splitting; past this many,
# shards grow instead (Airflow's own limit, core.max_map_length, is 1,024 by default).
MAX_SHARDS = 256

# msgspec ships with Airflow's task SDK; it encodes a line about five times faster than the standard
# library (0.9 against 4.2 µs for a ledger record), which the ledger needs. Compact, UTF-8 kept,
# anything unusual as text.
_encoder = msgspec.json.Encoder(enc_hook=str)


def _encode(record: Mapping[str, Any]) -> str:
    return _encoder.encode(record).decode("utf-8")
_WIRE_NAMES = {name: to_camel(name) for name in PublicStatusRequest.model_fields}


def dumps(record: Mapping[str, Any]) -> str:
    """One JSONL line's text (compact, UTF-8 kept, anything unusual as text)."""
    return _encode(record)


# ---------------------------------------------------------------------------------------------- shapes


def staged_line(value: Any, occurred_at: Any) -> dict[str, Any]:
    """One staged line: ``{"input", "occurredAt"}``."""
    return {"input": value, "occurredAt": occurred_at}


def dead_letter(value: Any, category: str, message: str, retryable: bool, occurred_at: Any) -> dict[str, Any]:
    """One dead-letter line: ``{"input", "category", "message", "retryable", "occurredAt"}``.

    The shape every dead-letter file of the provider uses; a dead-letter line is also valid staged input.
    """
    return {"input": value, "category": category, "message": message, "retryable": retryable,
            "occurredAt": occurred_at}


def camel_keys(value: Mapping[str, Any]) -> dict[str, Any]:
    """An input's keys in wire (camelCase) form, so a dead letter replays as is."""
    return {_WIRE_NAMES.get(key, key): item for key, item in value.items()}


def dead_letter_from(failure: FailedInput, occurred_at: Any) -> dict[str, Any]:
    """The dead letter of a :class:`~hubspot_provider.results.FailedInput`."""
    return dead_letter(camel_keys(failure.input), failure.category, failure.message, failure.retryable,
                       occurred_at)


def status_key(record: Mapping[str, Any]) -> str | None:
    """The status key of a staged record, or ``None`` when its email or subscription id cannot form one.

    Rows without a key (a NULL or non-text email, a subscription id that is not a whole number) are
    invalid and never share a key: each becomes its own dead letter.
    """
    email, subscription_id = record.get("subscriberIdString"), record.get("subscriptionId")
    if not isinstance(email, str) or not email.strip() or "\ufffd" in email:
        return None
    if record.get("statusState") == "UNSUBSCRIBE_ALL":  # the contact's opt-out from all email
        return f"{email.strip().lower()}\x1f*\x1fEMAIL"
    if not isinstance(subscription_id, int) or isinstance(subscription_id, bool):
        return None
    return f"{email.strip().lower()}\x1f{subscription_id}\x1fEMAIL"


def contact_of(record: Any) -> str | None:
    """The contact of a staged input (bare, or wrapped as ``{"input": ...}``): its email trimmed and
    lower-cased, as in :func:`status_key`; ``None`` when it has no usable email."""
    if isinstance(record, Mapping) and isinstance(record.get("input"), Mapping):
        record = record["input"]
    email = record.get("subscriberIdString") if isinstance(record, Mapping) else None
    if not isinstance(email, str) or not email.strip():
        return None
    return email.strip().lower()


# ---------------------------------------------------------------------------------------------- shards


def shard_count(lines: int, shard_size: int = DEFAULT_SHARD_SIZE) -> int:
    """How many shards ``lines`` are split into: ``ceil(lines / shard_size)``, at least 1, at most
    ``MAX_SHARDS`` (beyond that the shards grow instead).

    >>> shard_count(0), shard_count(100_000), shard_count(100_001), shard_count(10**9)
    (1, 1, 2, 256)
    """
    if int(shard_size) < 1:
        raise ValueError(f"shard_size must be a positive number of lines, got {shard_size}")
    return max(1, min(MAX_SHARDS, math.ceil(int(lines) / int(shard_size))))


def shard_name(index: int) -> str:
    """The folder name of shard ``index``: ``shard-00003``."""
    return f"{SHARD_FOLDER_PREFIX}{index:0{_SHARD_DIGITS}d}"


def shard_of(contact: str | None, shards: int) -> int:
    """The shard (``0 .. shards-1``) that every input of ``contact`` goes to.

    A stable hash (BLAKE2b) of the normalised contact, the same on every worker and in every Python
    process (Python's own ``hash`` of a string is salted per process). Keeping a contact in one shard
    keeps each of its keys in one shard, so per-key ordering holds, and keeps its opt-out from all
    email ahead of its later statuses. An input without a contact shares no key: shard 0.
    """
    if shards <= 1 or contact is None:
        return 0
    digest = hashlib.blake2b(contact.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


def split_into_shards(
    files: Iterable[ObjectStoragePath], target: ObjectStoragePath, shards: int, file_name: str
) -> list[tuple[ObjectStoragePath, int]]:
    """Split staged lines into ``shards`` folders ``<target>/shard-NNNNN/<file_name>``.

    Each line goes to the shard of its contact (:func:`shard_of`), and each shard keeps the lines in
    the order they were read, so whatever order the input had per contact (opt-outs from all email
    first, then each key's latest event) holds within its shard. Blank lines are dropped; a line that
    is not JSON goes to shard 0, whose write task dead-letters it. Every shard gets a file, even an
    empty one, so each write task finds its input.

    The lines are first written to local scratch files, then copied to ``target`` one shard at a
    time: an object store then holds one upload open at a time, whatever the number of shards, and
    memory stays flat in the number of lines.

    :return: each shard's folder and line count, by shard index.
    """
    counts = [0] * shards
    with tempfile.TemporaryDirectory(prefix="hubspot-shards-") as scratch:
        locals_ = [os.path.join(scratch, f"{index}.jsonl") for index in range(shards)]
        handles = [open(path, "w", encoding="utf-8") for path in locals_]
        try:
            for path in files:
                with path.open("r", encoding="utf-8", errors="replace") as source:
                    for raw in source:
                        if not raw.strip():
                            continue
                        try:
                            value = json.loads(raw)
                        except ValueError:
                            value = None
                        index = shard_of(contact_of(value), shards)
                        handles[index].write(raw if raw.endswith("\n") else raw + "\n")
                        counts[index] += 1
        finally:
            for handle in handles:
                handle.close()
        folders = []
        for index, local in enumerate(locals_):
            folder = target / shard_name(index)
            folder.mkdir(parents=True, exist_ok=True)
            with open(local, "rb") as source, (folder / file_name).open("wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
            os.unlink(local)
            folders.append(folder)
    return list(zip(folders, counts))


def shard_staged_input(
    input_uri: str | ObjectStoragePath, *, shard_size: int = DEFAULT_SHARD_SIZE, lines: int | None = None
) -> list[dict[str, Any]]:
    """Split staged input into shards for ``HubSpotWriteStatusesOperator.partial(...).expand_kwargs(...)``.

    ``input_uri`` is what the operator's ``input_uri`` takes: a JSONL file, or a folder whose
    ``*.jsonl`` files are read in name order. Input of up to ``shard_size`` lines is one shard, the
    input itself (nothing is copied). Bigger input is split into :func:`shard_count` folders by
    :func:`split_into_shards`: a folder's shards go inside it (``<folder>/shard-NNNNN/``, which the
    folder's own readers skip), a file's beside it (``<file>.shards/shard-NNNNN/``). Shard folders of
    an earlier call are removed first, with any checkpoint a write task left in them, so each new
    shard is written from its first line.

    Each shard's write task keeps its own checkpoint in its folder and names its dead-letter and
    ledger parts after it (``part-shard-00003-…``), so shards sharing a dead-letter folder never
    overwrite each other's parts, and a retry resumes its own shard only.

    :param shard_size: lines per shard (about: a hash spreads contacts, it does not count them).
    :param lines: how many non-blank lines the input holds, when already counted; else it is counted.
    :return: one dict per shard: ``{"input_uri", "input_count"}`` (small, XCom-safe).
    """
    root = ObjectStoragePath(str(input_uri))
    if root.is_dir():
        files, target = jsonl_files(root), root
    elif root.is_file():
        files, target = [root], root.with_name(root.name + ".shards")
    else:
        raise FileNotFoundError(f"input_uri {input_uri} is neither a file nor a folder")
    if lines is None:
        lines = sum(1 for path in files for _raw in _non_blank(path))
    shards = shard_count(lines, shard_size)
    if target.is_dir():
        for child in target.iterdir():
            if child.name.startswith(SHARD_FOLDER_PREFIX) and child.is_dir():
                remove_tree(child)
    if shards == 1:
        return [{"input_uri": str(root), "input_count": int(lines)}]
    name = root.name if root.is_file() else "statuses.jsonl"
    return [{"input_uri": str(folder), "input_count": count}
            for folder, count in split_into_shards(files, target, shards, name)]


def _non_blank(path: ObjectStoragePath) -> Iterator[bytes]:
    with path.open("rb") as handle:
        for raw in handle:
            if raw.strip():
                yield raw


def remove_tree(folder: ObjectStoragePath) -> None:
    """Remove a folder and everything in it, through the object-storage API (buckets have no real
    folders, so this works on them as on disk)."""
    for child in folder.iterdir():
        if child.is_dir():
            remove_tree(child)
        else:
            child.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except (OSError, NotImplementedError):
        pass


# ---------------------------------------------------------------------------------------------- files


class JsonlWriter:
    """A JSONL file that is created on the first line; when nothing is written a stale copy is removed."""

    def __init__(self, path: ObjectStoragePath) -> None:
        self.path = path
        self.count = 0
        self._handle: IO[str] | None = None

    def write(self, record: Mapping[str, Any]) -> None:
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = self.path.open("w", encoding="utf-8")
        self._handle.write(_encode(record) + "\n")
        self.count += 1

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._handle is not None:
            self._handle.close()
        elif self.path.exists():
            self.path.unlink()


def write_part(folder: ObjectStoragePath, name: str, records: Iterable[Any]) -> None:
    """Write a whole part file in one call (object-store handles are slow per write); ``records``
    are mappings or msgspec structs, one JSON line each."""
    folder.mkdir(parents=True, exist_ok=True)
    data = _encoder.encode_lines(records if isinstance(records, (list, tuple)) else list(records))
    with (folder / name).open("wb") as handle:
        handle.write(data)


def jsonl_files(folder: ObjectStoragePath) -> list[ObjectStoragePath]:
    """A folder's ``*.jsonl`` files in name order (names starting with ``_`` or ``.`` left out)."""
    return sorted(
        (p for p in folder.iterdir()
         if p.name.endswith(".jsonl") and not p.name.startswith(("_", ".")) and p.is_file()),
        key=lambda p: p.name,
    )


def read_objects(parts: Iterable[ObjectStoragePath]) -> Iterator[dict[str, Any] | None]:
    """Each non-blank line of ``parts`` parsed; ``None`` for a line that is not a JSON object."""
    for part in parts:
        with part.open("r", encoding="utf-8", errors="replace") as handle:
            for text in handle:
                if not text.strip():
                    continue
                try:
                    value = json.loads(text)
                except ValueError:
                    value = None
                yield value if isinstance(value, dict) else None


# ---------------------------------------------------------------------------------------------- checkpoints


def digest(doc: Mapping[str, Any]) -> str:
    """SHA-256 of a document's canonical JSON: a checkpoint's digest of itself."""
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def file_marker(path: ObjectStoragePath) -> bytes:
    """What a file boundary adds to a checkpoint's line hash (so lines cannot move between files)."""
    return b"\x00file " + path.name.encode("utf-8", "replace") + b"\n"


def prefix_hash(files: list[ObjectStoragePath], file_index: int, file_line: int) -> Any:
    """SHA-256 (a hashlib object) of every staged line up to ``file_line`` of ``files[file_index]``.

    The write operator hashes its input the same way as it reads it, so a checkpoint can be checked
    against the content it covers.
    """
    hasher = hashlib.sha256()
    for index in range(file_index + 1):
        hasher.update(file_marker(files[index]))
        with files[index].open("r", encoding="utf-8", errors="replace") as handle:
            for number, raw in enumerate(handle, start=1):
                if index == file_index and number > file_line:
                    break
                hasher.update(raw.encode("utf-8"))
    return hasher
