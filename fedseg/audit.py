"""A study's tamper-evident audit trail: ``audit.jsonl`` in the run folder.

One JSON object per line, appended and flushed to disk as the study goes. Each record carries
``seq`` (0, 1, 2, ...), the ``prev`` hash (the previous record's ``hash``; 64 zeros for the
first) and its own ``hash``: the sha256 of the record's canonical JSON without ``hash``. So
editing, dropping, reordering or inserting any record breaks the chain from there on, and
:func:`verify_run` names the first record that does not fit. Records that name a file
(checkpoints, ``model.pt``) carry its sha256, which :func:`verify_run` recomputes.

Written by the ServerApp (:mod:`fedseg.server_app`): ``study-start`` (who submitted, the app
bundle's hash, fedseg's version, the run config and its hash), one ``round`` per round (the
sites by name with their dataset fingerprints and what each sent, aggregation weights, the
global model's sha256 before and after, failures, pooled validation), ``personalisation``
and ``study-end`` (the final model's sha256). A resumed study appends to the same chain.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

AUDIT_NAME = "audit.jsonl"
GENESIS = "0" * 64


def canonical(value: Any) -> bytes:
    """The bytes a record's hash is taken over: sorted keys, no spaces, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def record_hash(record: dict[str, Any]) -> str:
    """sha256 of ``record`` without its own ``hash`` field."""
    return hashlib.sha256(canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data`` (e.g. a packed model's weights)."""
    return hashlib.sha256(data).hexdigest()


class AuditTrail:
    """Appends records to ``run_dir/audit.jsonl``, continuing an existing chain."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / AUDIT_NAME
        self.seq, self.last = 0, GENESIS
        if self.path.is_file():
            problem = verify_chain(self.path)
            if problem:
                raise ValueError(f"{self.path}: will not extend a broken audit trail: {problem}")
            lines = self.path.read_text(encoding="utf-8").splitlines()
            if lines:
                last = json.loads(lines[-1])
                self.seq, self.last = int(last["seq"]) + 1, str(last["hash"])

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Write one record (``event`` plus ``fields``) and return it, hash included."""
        record = {
            "seq": self.seq,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "event": event,
            **fields,
            "prev": self.last,
        }
        record["hash"] = record_hash(record)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as out:
            out.write(canonical(record).decode() + "\n")
            out.flush()
            os.fsync(out.fileno())
        self.seq, self.last = self.seq + 1, record["hash"]
        return record


def verify_chain(path: Path) -> str | None:
    """The first problem in ``path``'s chain (``"record N: ..."``), or ``None``."""
    previous, expected_seq = GENESIS, 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            return f"line {number}: not JSON"
        if not isinstance(record, dict) or "hash" not in record:
            return f"line {number}: not an audit record"
        label = f"record {record.get('seq', '?')} (line {number}, {record.get('event', '?')})"
        if record.get("seq") != expected_seq:
            return f"{label}: expected seq {expected_seq}: a record is missing or out of order"
        if record.get("prev") != previous:
            return f"{label}: its prev hash is not the previous record's hash"
        if record_hash(record) != record["hash"]:
            return f"{label}: its content does not match its hash (edited after it was written)"
        previous, expected_seq = record["hash"], expected_seq + 1
    return None


@dataclass(frozen=True)
class Verified:
    """What :func:`verify_run` checked."""

    records: int
    files: int


def verify_run(run_dir: Path) -> Verified:
    """Check ``run_dir/audit.jsonl``'s chain and every file it names by sha256.

    Raises ``ValueError`` naming the audit file and the first bad record or file.
    """
    path = run_dir / AUDIT_NAME
    if not path.is_file():
        raise ValueError(f"{path}: no audit trail in this run folder")
    problem = verify_chain(path)
    if problem:
        raise ValueError(f"{path}: {problem}")
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    # A resumed study redoes the round it was interrupted in and rewrites that checkpoint: a
    # file is checked against the last record that names it.
    latest: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    for record in records:
        for entry in record.get("files", []):
            latest[entry["path"]] = (record, entry)
    files = 0
    for record, entry in latest.values():
        target = run_dir / entry["path"]
        label = f"record {record['seq']} ({record['event']})"
        if not target.is_file():
            raise ValueError(f"{path}: {label} names {target}, which is missing")
        if hashlib.sha256(target.read_bytes()).hexdigest() != entry["sha256"]:
            raise ValueError(
                f"{path}: {label}: {target} does not match its recorded sha256 "
                "(changed after it was recorded)"
            )
        files += 1
    return Verified(records=len(records), files=files)


def audit_summary(run_dir: Path) -> str | None:
    """What :func:`verify_run` says of a run folder, in a line for its report (``None``: the
    folder has no trail)."""
    if not (run_dir / AUDIT_NAME).is_file():
        return None
    try:
        checked = verify_run(run_dir)
    except ValueError as err:
        return f"FAILS verification: {err}"
    return f"{checked.records} records chained, {checked.files} files match their sha256"
