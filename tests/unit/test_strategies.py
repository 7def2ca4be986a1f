"""Server-side aggregation: case-weighted FedAvg, FedProx's mu, per-site bookkeeping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from fedseg.config import RunConfig
from fedseg.strategies import MetricsBook, RecordingFedAvg, RecordingFedProx, build_strategy


@pytest.fixture(autouse=True)
def _server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    # Messages are stamped with the sending task's identity, which a ServerApp process has.
    for attr in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


def _instruction(node: int, kind: str = MessageType.TRAIN) -> Message:
    return Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type=kind)


def _train_reply(node: int, site: str, value: float, n_cases: int) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.full(3, value, dtype=np.float32))}),
            "metrics": MetricRecord(
                {
                    "num-examples": n_cases,
                    "train-loss": 0.5,
                    "local-steps": 10,
                    "train-seconds": 1.0,
                }
            ),
            "site": ConfigRecord({"site": site, "fingerprint": f"fp-{site}"}),
        }
    )
    return Message(content, reply_to=_instruction(node))


def _eval_reply(node: int, site: str, dice: float, n_cases: int) -> Message:
    values: dict[str, float | int] = {"num-examples": n_cases}
    for region in ("WT", "TC", "ET"):
        for stat in ("mean", "median", "p5", "p95"):
            values[f"dice-{region}-{stat}"] = dice
            values[f"hd95-{region}-{stat}"] = 10 * dice
    content = RecordDict(
        {"metrics": MetricRecord(values), "site": ConfigRecord({"site": site, "fingerprint": "f"})}
    )
    return Message(content, reply_to=_instruction(node, MessageType.EVALUATE))


def _strategy(name: str, mu: float = 0.0, *, min_sites: int = 2) -> RecordingFedAvg:
    run = RunConfig(strategy=name, proximal_mu=mu, min_train_sites=min_sites)
    strategy = build_strategy(run, book=MetricsBook())
    assert isinstance(strategy, RecordingFedAvg | RecordingFedProx)
    return strategy


def test_fedavg_weights_by_training_cases() -> None:
    # Prepare: 1, 1 and 2 cases -> weights 1/4, 1/4, 1/2 (a batch count would differ)
    replies = [
        _train_reply(11, "a", 1.0, 1),
        _train_reply(12, "b", 2.0, 1),
        _train_reply(13, "c", 4.0, 2),
    ]
    # Execute
    arrays, _ = _strategy("fedavg").aggregate_train(1, replies)
    # Assert
    assert arrays is not None
    np.testing.assert_allclose(arrays["w"].numpy(), np.full(3, 2.75), rtol=1e-6)


def test_fedprox_mu_zero_aggregates_exactly_like_fedavg() -> None:
    replies = [_train_reply(1, "a", 0.3, 5), _train_reply(2, "b", -1.7, 3)]
    avg, _ = _strategy("fedavg").aggregate_train(1, replies)
    prox, _ = _strategy("fedprox", mu=0.0).aggregate_train(1, replies)
    assert avg is not None and prox is not None
    assert np.array_equal(avg["w"].numpy(), prox["w"].numpy())


def test_fedprox_sends_mu_to_sites() -> None:
    strategy = _strategy("fedprox", mu=0.01)

    class _Grid:
        def get_node_ids(self) -> list[int]:
            return [1, 2]

    from unittest.mock import patch

    with patch("flwr.serverapp.strategy.fedavg.sample_nodes", return_value=([1, 2], [1, 2])):
        messages = list(strategy.configure_train(3, ArrayRecord(), ConfigRecord(), _Grid()))  # type: ignore[arg-type]
    assert len(messages) == 2
    config = messages[0].content["config"]
    assert isinstance(config, ConfigRecord)
    assert config["proximal-mu"] == pytest.approx(0.01)
    assert config["server-round"] == 3


def test_book_records_sites_by_name_and_pools_by_cases() -> None:
    strategy = _strategy("fedavg")
    strategy.aggregate_train(
        1, [_train_reply(7, "hospital-a", 1.0, 4), _train_reply(8, "hospital-b", 1.0, 2)]
    )
    strategy.aggregate_evaluate(
        1, [_eval_reply(7, "hospital-a", 0.9, 3), _eval_reply(8, "hospital-b", 0.6, 1)]
    )
    payload = strategy.book.to_json()
    final = payload["final"]
    assert set(final["sites"]) == {"hospital-a", "hospital-b"}
    assert final["sites"]["hospital-b"]["n_cases"] == 1
    assert final["pooled"]["dice"]["WT"] == pytest.approx((0.9 * 3 + 0.6 * 1) / 4)
    assert final["pooled"]["n_cases"] == 4
    assert final["train"]["hospital-a"]["n_cases"] == 4


def test_failed_site_is_recorded_by_name_not_averaged() -> None:
    strategy = _strategy("fedavg")
    strategy.aggregate_train(
        1, [_train_reply(7, "hospital-a", 1.0, 4), _train_reply(8, "hospital-b", 1.0, 2)]
    )
    failed = Message(
        Error(code=0, reason="bad scan"), reply_to=_instruction(8, MessageType.EVALUATE)
    )
    strategy.aggregate_evaluate(1, [_eval_reply(7, "hospital-a", 0.9, 3), failed])
    record = strategy.book.to_json()["final"]
    assert set(record["sites"]) == {"hospital-a"}
    assert record["failures"] == [{"site": "hospital-b", "phase": "evaluate", "reason": "bad scan"}]


def test_declined_site_is_named_and_left_out_of_the_average() -> None:
    strategy = _strategy("fedavg", min_sites=1)
    reason = "site data failed validation; details are in the site's log"
    declined = Message(
        RecordDict({"site": ConfigRecord({"site": "hospital-c", "declined": reason})}),
        reply_to=_instruction(9),
    )
    arrays, _ = strategy.aggregate_train(1, [_train_reply(7, "hospital-a", 3.0, 4), declined])
    assert arrays is not None
    np.testing.assert_allclose(arrays["w"].numpy(), np.full(3, 3.0))
    record = strategy.book.rounds[1].to_json()
    assert record["failures"] == [{"site": "hospital-c", "phase": "train", "reason": reason}]
    assert set(record["train"]) == {"hospital-a"}


def test_round_with_fewer_trained_sites_than_required_keeps_the_model() -> None:
    """Two of three sites required: one trained, one failed. Averaging one hospital's update
    alone would stand in for the federation, so nothing is aggregated and the round says why."""
    strategy = _strategy("fedavg", min_sites=2)
    failed = Message(Error(code=5, reason="node unavailable"), reply_to=_instruction(8))
    arrays, metrics = strategy.aggregate_train(1, [_train_reply(7, "hospital-a", 3.0, 4), failed])
    assert arrays is None and metrics is None
    record = strategy.book.rounds[1].to_json()
    assert "only 1 of the 2 sites required" in record["not_aggregated"]
    assert record["failures"][0]["reason"] == "node unavailable"


def test_book_survives_a_round_trip_through_metrics_json() -> None:
    """A resumed study's history is the interrupted one's, up to its last completed round."""
    strategy = _strategy("fedavg")
    for r in (1, 2):
        strategy.aggregate_train(
            r, [_train_reply(7, "hospital-a", 1.0, 4), _train_reply(8, "hospital-b", 1.0, 2)]
        )
        strategy.aggregate_evaluate(
            r, [_eval_reply(7, "hospital-a", 0.9, 3), _eval_reply(8, "hospital-b", 0.6, 1)]
        )
    saved = strategy.book.to_json()
    restored = MetricsBook.restore(saved["rounds"], node_sites=strategy.book.node_sites, up_to=1)
    assert sorted(restored.rounds) == [1]
    assert restored.to_json()["rounds"] == saved["rounds"][:1]
    assert restored.node_sites == {7: "hospital-a", 8: "hospital-b"}


def test_evaluation_only_run_sends_no_training_message() -> None:
    strategy = build_strategy(
        RunConfig(mode="evaluate", initial_model="/models/model.pt"), book=MetricsBook()
    )

    class _Grid:
        def get_node_ids(self) -> list[int]:
            return [1, 2]

    assert list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), _Grid())) == []  # type: ignore[arg-type]


def test_site_below_min_cases_is_withheld_and_left_out_of_pooling() -> None:
    strategy = _strategy("fedavg")
    withheld = Message(
        RecordDict(
            {
                "metrics": MetricRecord({"num-examples": 2}),
                "site": ConfigRecord({"site": "hospital-b", "fingerprint": "f"}),
            }
        ),
        reply_to=_instruction(8, MessageType.EVALUATE),
    )
    # Different metric keys per site must not trip Flower's consistency check.
    pooled = strategy.aggregate_evaluate(1, [_eval_reply(7, "hospital-a", 0.8, 5), withheld])
    assert pooled is not None and pooled["dice-WT"] == pytest.approx(0.8)
    record = strategy.book.to_json()["final"]
    assert record["sites"]["hospital-b"]["withheld"] is True
    assert "dice" not in record["sites"]["hospital-b"]
    assert record["sites"]["hospital-b"]["summary"]["ET"]["dice"] == {"count": 2}
    assert record["pooled"]["n_cases"] == 5
    assert record["sites"]["hospital-a"]["summary"]["WT"]["dice"]["median"] == pytest.approx(0.8)


def test_withheld_site_renders_in_the_report(tmp_path: Path) -> None:
    from evaluation.report import write_report

    strategy = _strategy("fedavg")
    strategy.aggregate_train(1, [_train_reply(7, "hospital-a", 1.0, 4)])
    withheld = Message(
        RecordDict(
            {
                "metrics": MetricRecord({"num-examples": 1}),
                "site": ConfigRecord({"site": "hospital-b", "fingerprint": "f"}),
            }
        ),
        reply_to=_instruction(8, MessageType.EVALUATE),
    )
    strategy.aggregate_evaluate(1, [_eval_reply(7, "hospital-a", 0.7, 4), withheld])
    files = write_report(
        {"config": RunConfig().to_flower(), **strategy.book.to_json()}, tmp_path, title="t"
    )
    text = files.html.read_text()
    assert "hospital-b" in text and "n &lt; min cases" in text  # escaped HTML
    assert "0.700" in text


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg", "krum"])
def test_robust_aggregation_resists_a_sign_flipped_site(name: str) -> None:
    """Five sites near w = 1, one sending a sign-flipped, 10x scaled update: FedAvg moves
    far; the robust aggregators stay within a tenth of that."""
    from flwr.app import Array

    from fedseg.records import WEIGHTS

    rng = np.random.default_rng(0)

    def replies() -> list[Message]:
        out = []
        for node in range(10, 16):
            values = -10.0 * np.ones(50) if node == 15 else 1.0 + 0.01 * rng.normal(size=50)
            content = RecordDict({
                "arrays": ArrayRecord({WEIGHTS: Array(values.astype(np.float32))}),
                "metrics": MetricRecord({"num-examples": 4, "train-loss": 0.5,
                                         "local-steps": 2, "train-seconds": 1.0}),
                "site": ConfigRecord({"site": f"hospital-{node}", "fingerprint": "fp"}),
            })  # fmt: skip
            out.append(Message(content, reply_to=_instruction(node)))
        return out

    def error(strategy_name: str) -> float:
        run = RunConfig(strategy=strategy_name, min_train_sites=1, faulty_sites=1)
        arrays, _ = build_strategy(run, book=MetricsBook()).aggregate_train(1, replies())
        assert arrays is not None
        return float(np.abs(arrays[WEIGHTS].numpy() - 1.0).mean())

    assert error("fedavg") > 1.5
    assert error(name) < 0.1 * error("fedavg")


def test_every_registered_strategy_builds_from_the_run_config() -> None:
    from fedseg.config import STRATEGIES
    from fedseg.strategies import REGISTRY

    assert set(REGISTRY) == set(STRATEGIES)
    for name in STRATEGIES:
        strategy = build_strategy(RunConfig(strategy=name), book=MetricsBook())
        assert isinstance(strategy, REGISTRY[name])
