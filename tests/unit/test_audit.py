"""The audit trail: a hash chain any edit breaks, and files checked against their sha256."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedseg.audit import AUDIT_NAME, GENESIS, AuditTrail, record_hash, verify_run
from fedseg.cli import app

pytestmark = pytest.mark.privacy


def _study(run_dir: Path, rounds: int = 3) -> None:
    trail = AuditTrail(run_dir)
    trail.append("study-start", run_config={"strategy": "fedavg"}, config_hash="c" * 64)
    for r in range(1, rounds + 1):
        checkpoint = run_dir / "checkpoints" / f"round-{r:03d}.pt"
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.write_bytes(f"weights of round {r}".encode())
        digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
        trail.append(
            "round",
            round=r,
            sites={"hospital-a": {"fingerprint": "f" * 64}},
            files=[{"path": f"checkpoints/{checkpoint.name}", "sha256": digest}],
        )


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / AUDIT_NAME).read_text().splitlines()]


def _rewrite(run_dir: Path, records: list[dict]) -> None:
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    (run_dir / AUDIT_NAME).write_text(text)


def test_an_untouched_trail_verifies_and_chains_every_record(tmp_path: Path) -> None:
    _study(tmp_path)
    records = _lines(tmp_path)
    assert records[0]["prev"] == GENESIS
    assert all(b["prev"] == a["hash"] for a, b in itertools.pairwise(records))
    assert all(record_hash(r) == r["hash"] for r in records)
    checked = verify_run(tmp_path)
    assert (checked.records, checked.files) == (4, 3)


def test_an_edited_record_is_named(tmp_path: Path) -> None:
    _study(tmp_path)
    records = _lines(tmp_path)
    records[2]["sites"]["hospital-a"]["fingerprint"] = "0" * 64  # rewrite history
    _rewrite(tmp_path, records)
    with pytest.raises(ValueError, match=r"record 2 \(line 3, round\): its content does not match"):
        verify_run(tmp_path)


def test_an_edit_with_a_recomputed_hash_breaks_the_next_link(tmp_path: Path) -> None:
    _study(tmp_path)
    records = _lines(tmp_path)
    records[1]["round"] = 9
    records[1]["hash"] = record_hash(records[1])
    _rewrite(tmp_path, records)
    with pytest.raises(ValueError, match=r"record 2 .*prev hash is not the previous record's"):
        verify_run(tmp_path)


def test_a_dropped_record_is_named(tmp_path: Path) -> None:
    _study(tmp_path)
    records = _lines(tmp_path)
    _rewrite(tmp_path, records[:1] + records[2:])
    with pytest.raises(ValueError, match="expected seq 1: a record is missing"):
        verify_run(tmp_path)


def test_a_replaced_checkpoint_is_named(tmp_path: Path) -> None:
    _study(tmp_path)
    (tmp_path / "checkpoints" / "round-002.pt").write_bytes(b"other weights")
    with pytest.raises(ValueError, match=r"record 2 \(round\): .*round-002.pt does not match"):
        verify_run(tmp_path)


def test_a_resumed_study_extends_the_chain_and_a_broken_one_is_not_extended(
    tmp_path: Path,
) -> None:
    _study(tmp_path, rounds=1)
    AuditTrail(tmp_path).append("resume", from_round=2)
    assert [r["seq"] for r in _lines(tmp_path)] == [0, 1, 2]
    assert verify_run(tmp_path).records == 3
    with (tmp_path / AUDIT_NAME).open("a") as out:
        out.write('{"seq": 3, "event": "forged"}\n')
    with pytest.raises(ValueError, match="will not extend a broken audit trail"):
        AuditTrail(tmp_path)


def test_cli_verify_passes_and_fails_naming_the_record(tmp_path: Path) -> None:
    _study(tmp_path)
    ok = CliRunner().invoke(app, ["audit", "verify", str(tmp_path)])
    assert ok.exit_code == 0 and "4 records chained, 3 files match" in ok.output
    records = _lines(tmp_path)
    records[3]["round"] = 7
    _rewrite(tmp_path, records)
    bad = CliRunner().invoke(app, ["audit", "verify", str(tmp_path)])
    assert bad.exit_code == 1 and "record 3 (line 4, round)" in bad.output
    missing = CliRunner().invoke(app, ["audit", "verify", str(tmp_path / "nowhere")])
    assert missing.exit_code == 1 and "no audit trail" in missing.output
