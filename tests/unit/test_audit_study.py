"""The audit trail a study writes, and the server's update checks, through ``run_study``."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedseg.audit import AUDIT_NAME, verify_run
from fedseg.config import RunConfig
from fedseg.records import WEIGHTS, content_digest
from fedseg.server_app import run_study
from fedseg.strategies import MetricsBook, build_strategy
from tests.unit.test_resume import _interrupted, _run, _server_identity, _Sites

pytestmark = pytest.mark.privacy
__all__ = ["_server_identity"]  # the autouse fixture, imported to apply here


def _audit(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / AUDIT_NAME).read_text().splitlines()]


def test_a_study_audits_who_trained_what_on_which_data(tmp_path: Path) -> None:
    run = _run(tmp_path)
    run_dir = Path(run.run_dir)
    sites = _Sites()
    run_study(run, run_dir, sites)  # type: ignore[arg-type]
    records = _audit(run_dir)
    assert [r["event"] for r in records] == ["study-start", "round", "round", "round", "study-end"]
    start = records[0]
    assert start["run_config"] == run.to_flower() and len(start["config_hash"]) == 64
    rounds = records[1:4]
    for r in rounds:
        assert r["trained"]["hospital-a"]["fingerprint"] == "fp-hospital-a"
        assert r["trained"]["hospital-a"]["weight"] == pytest.approx(0.5)
        assert r["validated"]["hospital-b"]["fingerprint"] == "fp-hospital-b"
        assert [f["path"] for f in r["files"]] == [f"checkpoints/round-{r['round']:03d}.pt"]
    # Each round starts from the model the previous one ended with.
    assert all(
        b["global_model_before"] == a["global_model_after"] for a, b in itertools.pairwise(rounds)
    )
    assert records[-1]["global_model"] == rounds[-1]["global_model_after"]
    assert verify_run(run_dir).files == 3 + 2  # checkpoints, model.pt and model.json


def test_the_audit_holds_the_digest_of_what_each_site_sent(tmp_path: Path) -> None:
    run = _run(tmp_path, num_server_rounds=1)
    sites = _Sites()
    run_study(run, Path(run.run_dir), sites)  # type: ignore[arg-type]
    [round_one] = [r for r in _audit(Path(run.run_dir)) if r["event"] == "round"]
    sent = {content_digest(m.content) for m in sites.all_replies}
    got = {(e["bytes"], e["sha256"]) for es in round_one["received"].values() for e in es}
    assert got == sent and len(got) == 4  # two sites, a training and a validation reply each


def test_a_tampered_checkpoint_or_record_fails_verification(tmp_path: Path) -> None:
    run = _run(tmp_path)
    run_dir = Path(run.run_dir)
    run_study(run, run_dir, _Sites())  # type: ignore[arg-type]
    original = (run_dir / "checkpoints" / "round-002.pt").read_bytes()
    (run_dir / "checkpoints" / "round-002.pt").write_bytes(original[:-8] + b"\0" * 8)
    with pytest.raises(ValueError, match=r"record 2 \(round\): .*round-002.pt does not match"):
        verify_run(run_dir)
    (run_dir / "checkpoints" / "round-002.pt").write_bytes(original)
    lines = (run_dir / AUDIT_NAME).read_text().splitlines()
    lines[1] = lines[1].replace('"fp-hospital-a"', '"fp-elsewhere"')
    (run_dir / AUDIT_NAME).write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"record 1 \(line 2, round\)"):
        verify_run(run_dir)


def test_a_resumed_study_continues_one_chain(tmp_path: Path) -> None:
    # The interruption is a crash (KeyboardInterrupt, like a power cut): nothing is written
    # for it, and the resumed study's own record follows round 1.
    run = _interrupted(tmp_path)
    run_dir = Path(run.run_dir)
    run_study(replace(run, resume=True), run_dir, _Sites())  # type: ignore[arg-type]
    events = [(r["event"], r.get("round")) for r in _audit(run_dir)]
    assert events == [
        ("study-start", None),
        ("round", 1),
        ("study-resumed", None),
        ("round", 2),
        ("round", 3),
        ("study-end", None),
    ]
    assert verify_run(run_dir).records == len(events)


# --------------------------------------------------------------------------- update checks


def _reply(node: int, values: np.ndarray) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({WEIGHTS: Array(values.astype(np.float32))}),
            "metrics": MetricRecord(
                {"num-examples": 4, "train-loss": 0.5, "local-steps": 2, "train-seconds": 1.0}
            ),
            "site": ConfigRecord({"site": f"hospital-{node}", "fingerprint": "fp"}),
        }
    )
    instruction = Message(RecordDict(), dst_node_id=node, message_type="train")
    instruction.metadata.__dict__["_message_id"] = f"m{node}"
    return Message(content, reply_to=instruction)


class _Nodes:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


def _round(run: RunConfig, updates: dict[int, np.ndarray]) -> tuple[np.ndarray | None, MetricsBook]:
    book = MetricsBook(weights_size=20)
    strategy = build_strategy(run, book=book)
    start = ArrayRecord({WEIGHTS: Array(np.zeros(20, np.float32))})
    list(strategy.configure_train(1, start, ConfigRecord(), _Nodes(list(updates))))  # type: ignore[arg-type]
    arrays, _ = strategy.aggregate_train(1, [_reply(n, v) for n, v in updates.items()])
    return (None if arrays is None else arrays[WEIGHTS].numpy()), book


def test_an_exploded_update_is_refused_and_the_others_averaged(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    updates = {n: 0.1 + 0.01 * rng.normal(size=20) for n in (1, 2, 3)}
    updates[4] = 50.0 * np.ones(20)
    run = RunConfig(min_train_sites=2)
    aggregated, book = _round(run, updates)
    assert aggregated is not None
    np.testing.assert_allclose(
        aggregated, np.mean([updates[n] for n in (1, 2, 3)], axis=0), rtol=1e-5
    )
    [failure] = book.rounds[1].failures
    assert failure["site"] == "hospital-4" and "max-update-ratio 10" in failure["reason"]
    assert set(book.rounds[1].train) == {"hospital-1", "hospital-2", "hospital-3"}
    off, _ = _round(replace(run, max_update_ratio=0.0), updates)
    assert off is not None and off.mean() > 10  # without the check FedAvg takes it in


def test_a_nan_update_is_refused_and_the_round_completes(tmp_path: Path) -> None:
    bad = np.full(20, 0.1)
    bad[3] = np.nan
    aggregated, book = _round(
        RunConfig(min_train_sites=2), {1: np.full(20, 0.1), 2: np.full(20, 0.3), 3: bad}
    )
    assert aggregated is not None and np.isfinite(aggregated).all()
    np.testing.assert_allclose(aggregated, 0.2, rtol=1e-6)
    [failure] = book.rounds[1].failures
    assert failure["site"] == "hospital-3" and "NaN" in failure["reason"]


def test_the_audited_weights_are_the_ones_the_mean_uses() -> None:
    from fedseg.strategies import aggregation_weights

    train = {"hospital-a": {"n_cases": 10, "steps": 2}, "hospital-b": {"n_cases": 30, "steps": 2}}
    assert aggregation_weights(RunConfig(), train) == {"hospital-a": 0.25, "hospital-b": 0.75}
    # Under DP every site weighs the same, whatever its number of cases.
    private = RunConfig(dp_noise_multiplier=1.0)
    assert aggregation_weights(private, train) == {"hospital-a": 0.5, "hospital-b": 0.5}
    assert aggregation_weights(RunConfig(strategy="krum"), train) == {}
