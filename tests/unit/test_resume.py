"""A study interrupted after a round continues from it: rounds, model and history restored."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedseg.artifacts import load_weights
from fedseg.config import ConfigError, RunConfig
from fedseg.records import WEIGHTS, pack_weights
from fedseg.rounds import SitesMissingError
from fedseg.server_app import run_study
from fedseg.task.model import build_model
from tests.fake_grid import FakeGrid

SITES = {7: "hospital-a", 8: "hospital-b"}


@pytest.fixture(autouse=True)
def _server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    for attr in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


class _Sites(FakeGrid):
    """A fake Grid: every site adds 1 to each weight it trains and reports Dice = round / 10;
    ``crash_in_round`` makes the server's process die when that round's training is sent."""

    def __init__(self, *, crash_in_round: int = 0, nodes: dict[int, str] | None = None) -> None:
        super().__init__(SITES if nodes is None else nodes)
        self.crash_in_round = crash_in_round
        self.rounds_sent: list[int] = []
        self.train_configs: list[ConfigRecord] = []

    def _reply(self, msg: Message) -> Message:
        config = msg.content["config"]
        assert isinstance(config, ConfigRecord)
        server_round = int(config["server-round"])  # type: ignore[call-overload]
        if msg.metadata.message_type == "train":
            if server_round == self.crash_in_round:
                raise KeyboardInterrupt("the coordinator's machine went down")
            self.rounds_sent.append(server_round)
            self.train_configs.append(config)
        return self._answer(msg, server_round)

    def _answer(self, msg: Message, server_round: int) -> Message:
        name = self.nodes[msg.metadata.dst_node_id]
        content = RecordDict({"site": ConfigRecord({"site": name, "fingerprint": f"fp-{name}"})})
        if msg.metadata.message_type == "train":
            arrays = msg.content["arrays"]
            assert isinstance(arrays, ArrayRecord)
            content["arrays"] = ArrayRecord({WEIGHTS: Array(arrays[WEIGHTS].numpy() + 1)})
            content["metrics"] = MetricRecord({"num-examples": 4, "train-loss": 0.5,
                                               "local-steps": 2, "train-seconds": 1.0})  # fmt: skip
        else:
            values: dict[str, float | int] = {"num-examples": 3}
            for region in ("WT", "TC", "ET"):
                for stat in ("mean", "median", "std", "p5", "p95"):
                    values[f"dice-{region}-{stat}"] = server_round / 10
                    values[f"hd95-{region}-{stat}"] = 1.0
            content["metrics"] = MetricRecord(values)
        return Message(content, reply_to=msg)


def _run(tmp_path: Path, **overrides: object) -> RunConfig:
    base = RunConfig(num_server_rounds=3, min_train_sites=2, run_dir=str(tmp_path / "run"),
                     wait_for_sites=0)  # fmt: skip
    return replace(base, **overrides)  # type: ignore[arg-type]


def _interrupted(tmp_path: Path) -> RunConfig:
    run = _run(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run_study(run, Path(run.run_dir), _Sites(crash_in_round=2))  # type: ignore[arg-type]
    return run


def test_resumed_study_continues_the_round_counter_model_and_history(tmp_path: Path) -> None:
    # Prepare
    run = _interrupted(tmp_path)
    run_dir = Path(run.run_dir)
    round_one = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in round_one] == [1]
    # Execute
    sites = _Sites()
    run_study(replace(run, resume=True), run_dir, sites)  # type: ignore[arg-type]
    # Assert
    assert sites.rounds_sent == [2, 2, 3, 3]  # two sites a round, from round 2 on
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3]
    assert metrics["rounds"][0] == round_one[0]
    assert metrics["final"]["sites"]["hospital-a"]["dice"]["WT"] == pytest.approx(0.3)
    # Three rounds of +1 from the seeded start: resuming from scratch would give +2.
    start = build_model("tiny", seed=0).state_dict()
    final = load_weights(run_dir / "model.pt")
    for name, tensor in start.items():
        torch.testing.assert_close(final[name], tensor + 3)
    state = json.loads((run_dir / "state.json").read_text())
    assert state["last_round"] == 3 and state["node_sites"] == {
        "7": "hospital-a",
        "8": "hospital-b",
    }


def test_resume_refuses_a_different_study_and_a_finished_one(tmp_path: Path) -> None:
    run = _interrupted(tmp_path)
    run_dir = Path(run.run_dir)
    with pytest.raises(ConfigError, match=r"state.json: .*differs in \['learning-rate'\]"):
        run_study(replace(run, resume=True, learning_rate=0.1), run_dir, _Sites())  # type: ignore[arg-type]
    run_study(replace(run, resume=True), run_dir, _Sites())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="all 3 rounds are done"):
        run_study(replace(run, resume=True), run_dir, _Sites())  # type: ignore[arg-type]


def test_resume_without_a_completed_round_says_so(tmp_path: Path) -> None:
    run = _run(tmp_path, resume=True)
    with pytest.raises(ConfigError, match=r"state\.json: no such file"):
        run_study(run, Path(run.run_dir), _Sites())  # type: ignore[arg-type]


def test_too_few_sites_fail_after_wait_for_sites(tmp_path: Path) -> None:
    run = _run(tmp_path)
    sites = _Sites(nodes={7: "hospital-a"})
    with pytest.raises(SitesMissingError, match=r"only 1 of the 2 sites .*within 0 s"):
        run_study(run, Path(run.run_dir), sites)  # type: ignore[arg-type]


def test_packed_weights_round_trip_and_refuse_another_preset() -> None:
    from fedseg.records import unpack_weights

    state = build_model("tiny", seed=3).state_dict()
    back = unpack_weights(pack_weights(state), build_model("tiny", seed=0).state_dict())
    for name, tensor in state.items():
        torch.testing.assert_close(back[name], tensor, rtol=0, atol=0)
    with pytest.raises(ValueError, match="the preset needs"):
        unpack_weights(pack_weights(state), build_model("brats", seed=0).state_dict())


def test_a_silent_site_answered_for_by_the_superlink_is_named() -> None:
    """A SuperNode that dies mid-round is answered for by the SuperLink (NODE_UNAVAILABLE,
    sent from the SuperLink's own node id); the failure belongs to the site that went silent."""
    from flwr.app import Error
    from flwr.common.constant import SUPERLINK_NODE_ID

    from fedseg.exchange import exchange
    from fedseg.strategies import MetricsBook

    class _OneDies(_Sites):
        def _answer(self, msg: Message, server_round: int) -> Message:
            if msg.metadata.dst_node_id == 8:
                reply = Message(Error(code=5, reason="Node Unavailable"), reply_to=msg)
                reply.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
                return reply
            return super()._answer(msg, server_round)

    book = MetricsBook(node_sites=dict(SITES))
    train = ConfigRecord({"server-round": 2})
    messages = [Message(RecordDict({"arrays": pack_weights({"w": torch.zeros(2)}),
                                    "config": train}), dst_node_id=n, message_type="train")
                for n in SITES]  # fmt: skip
    book.record_train(2, exchange(_OneDies(), messages, timeout_s=1))  # type: ignore[arg-type]
    assert book.rounds[2].failures == [
        {"site": "hospital-b", "phase": "train", "reason": "Node Unavailable"}
    ]
    assert set(book.rounds[2].train) == {"hospital-a"}


class _Silent(_Sites):
    """From round 2 on, hospital-b's SuperNode is up but never answers training; ``bad``
    makes hospital-a send a vector of the wrong length instead."""

    def __init__(self, *, bad: bool = False) -> None:
        super().__init__()
        self.bad = bad

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        messages = list(messages)
        ids = super().push_messages(messages)
        if self.rounds_sent and self.rounds_sent[-1] >= 2:
            self.replies = [r for r in self.replies if r.metadata.src_node_id != 8
                            or r.metadata.message_type != "train"]  # fmt: skip
        if self.bad:
            for reply in self.replies:
                if "arrays" in reply.content:
                    reply.content["arrays"] = ArrayRecord({WEIGHTS: Array(np.zeros(1))})
        return ids


def test_a_silent_site_times_out_by_name_and_the_round_is_not_averaged(tmp_path: Path) -> None:
    run = _run(tmp_path, num_server_rounds=2, round_timeout=1)
    run_study(run, Path(run.run_dir), _Silent())  # type: ignore[arg-type]
    _, record = json.loads((Path(run.run_dir) / "metrics.json").read_text())["rounds"]
    assert record["failures"] == [
        {"site": "hospital-b", "phase": "train", "reason": "no reply within round-timeout (1 s)"}
    ]
    assert "only 1 of the 2 sites required" in record["not_aggregated"]


def test_an_update_of_the_wrong_size_is_that_sites_failure(tmp_path: Path) -> None:
    run = _run(tmp_path, num_server_rounds=1, min_train_sites=1, round_timeout=1)
    with pytest.raises(RuntimeError, match="no site completed a training round"):
        run_study(run, Path(run.run_dir), _Silent(bad=True))  # type: ignore[arg-type]
    [record] = json.loads((Path(run.run_dir) / "metrics.json").read_text())["rounds"]
    reasons = {f["site"]: f["reason"] for f in record["failures"]}
    assert reasons["hospital-a"].startswith("the update holds 1 values; the model has")
    assert record["train"] == {} and "not_aggregated" in record


def test_a_study_that_died_after_its_last_round_gets_its_model_on_resume(tmp_path: Path) -> None:
    run = _run(tmp_path)
    run_dir = Path(run.run_dir)
    run_study(run, run_dir, _Sites())  # type: ignore[arg-type]
    expected = (run_dir / "model.pt").read_bytes()
    (run_dir / "model.pt").unlink()
    sites = _Sites()
    run_study(replace(run, resume=True), run_dir, sites)  # type: ignore[arg-type]
    assert sites.rounds_sent == []
    assert (
        load_weights(run_dir / "model.pt").keys()
        == load_weights(run_dir / "checkpoints" / "round-003.pt").keys()
    )
    assert len(expected) > 0


def test_a_site_dropping_out_between_waits_does_not_hang_sampling(tmp_path: Path) -> None:
    """Flower's sample_nodes re-counts online nodes and would wait forever for one that just
    left; the round samples the snapshot of its own bounded wait instead."""

    class _Leaving(_Sites):
        calls = 0

        def get_node_ids(self) -> list[int]:
            self.calls += 1
            return [7, 8] if self.calls == 1 else [7]

    run = _run(tmp_path, num_server_rounds=1, min_train_sites=2, wait_for_sites=0)
    sites = _Leaving()
    with pytest.raises(SitesMissingError):  # the evaluation's wait sees one site: an error
        run_study(run, Path(run.run_dir), sites)  # type: ignore[arg-type]
    assert sites.rounds_sent == [1, 1]  # training went to both sites of the snapshot


@pytest.mark.parametrize("strategy", ["fedadam", "fedyogi"])
def test_server_optimiser_state_survives_a_restart(tmp_path: Path, strategy: str) -> None:
    """FedAdam's and FedYogi's moments are part of the study: a study resumed after round 1
    ends with exactly the model of one never interrupted (without the moments it would not)."""
    whole = _run(tmp_path / "whole", strategy=strategy)
    run_study(whole, Path(whole.run_dir), _Sites())  # type: ignore[arg-type]
    broken = _run(tmp_path / "broken", strategy=strategy)
    with pytest.raises(KeyboardInterrupt):
        run_study(broken, Path(broken.run_dir), _Sites(crash_in_round=2))  # type: ignore[arg-type]
    assert (Path(broken.run_dir) / "checkpoints" / "round-001.strategy.npz").is_file()
    run_study(replace(broken, resume=True), Path(broken.run_dir), _Sites())  # type: ignore[arg-type]
    expected = load_weights(Path(whole.run_dir) / "model.pt")
    for name, tensor in load_weights(Path(broken.run_dir) / "model.pt").items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)
