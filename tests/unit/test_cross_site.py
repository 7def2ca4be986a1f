"""Cross-site validation on the server: local models never averaged, every model everywhere."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedseg.config import RunConfig
from fedseg.cross_site import GLOBAL, run_cross_site
from fedseg.rounds import wait_for_sites
from fedseg.strategies import MetricsBook
from tests.fake_grid import FakeGrid


@pytest.fixture(autouse=True)
def _server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    for attr in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


def _weights(value: float) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.full(2, value, dtype=np.float32))})


class _Federation(FakeGrid):
    """A fake Grid: site ``i`` adds ``i`` to the weights it trains; a model's Dice at a site
    is ``weight / 100 + site / 1000``, so every cell of the matrix says where it came from."""

    def __init__(self, sites: dict[int, str], *, abstains: str = "", n_cases: int = 3) -> None:
        super().__init__(sites)
        self.sites, self.abstains, self.n_cases = sites, abstains, n_cases
        self.types: list[str] = []

    def _reply(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        name = self.sites[node]
        self.types.append(msg.metadata.message_type)
        identity = ConfigRecord({"site": name, "fingerprint": f"fp-{name}"})
        if msg.metadata.message_type == "train.local":
            if name == self.abstains:
                identity["declined"], identity["decline-kind"] = "evaluation only", "abstain"
                return Message(RecordDict({"site": identity}), reply_to=msg)
            arrays = msg.content["arrays"]
            assert isinstance(arrays, ArrayRecord)
            trained = _weights(float(arrays["w"].numpy()[0]) + node)
            metrics = MetricRecord({"num-examples": 4, "train-loss": 0.5, "local-steps": 2,
                                    "train-seconds": 1.0})  # fmt: skip
            content = RecordDict({"arrays": trained, "metrics": metrics, "site": identity})
            return Message(content, reply_to=msg)
        assert msg.metadata.message_type == "evaluate.models"
        config = msg.content["config"]
        assert isinstance(config, ConfigRecord)
        reply = RecordDict({"site": identity})
        for i in range(int(config["num-models"])):  # type: ignore[call-overload]
            arrays = msg.content[f"model-{i}"]
            assert isinstance(arrays, ArrayRecord)
            dice = float(arrays["w"].numpy()[0]) / 100 + node / 1000
            values: dict[str, float | int] = {"num-examples": self.n_cases}
            for region in ("WT", "TC", "ET"):
                for stat in ("mean", "median", "std", "p5", "p95"):
                    values[f"dice-{region}-{stat}"] = dice
                    values[f"hd95-{region}-{stat}"] = 1.0
            reply[f"metrics-{i}"] = MetricRecord(values)
        return Message(reply, reply_to=msg)


def _run(grid: _Federation, rounds: int = 3) -> tuple[dict[str, object], MetricsBook]:
    run = RunConfig(mode="cross-site", initial_model="/m.pt", num_server_rounds=rounds,
                    min_train_sites=2)  # fmt: skip
    book = MetricsBook()
    result = run_cross_site(
        grid,  # type: ignore[arg-type]
        run=run,
        start=_weights(0.0),
        global_model=_weights(50.0),
        book=book,
    )
    assert set(result.local_models) == {n for n in grid.sites.values() if n != grid.abstains}
    return result.matrix(), book


def test_each_site_trains_its_own_model_and_every_model_is_validated_everywhere() -> None:
    # Prepare: sites 1 and 2; three rounds of local training give weights 3 and 6.
    grid = _Federation({1: "hospital-a", 2: "hospital-b"})
    # Execute
    matrix, book = _run(grid)
    # Assert: never averaged (an average would give 4.5 at both), row order global first.
    assert matrix["models"] == [GLOBAL, "hospital-a", "hospital-b"]
    assert matrix["sites"] == ["hospital-a", "hospital-b"]
    dice = matrix["dice"]["WT"]  # type: ignore[index]
    assert dice == [
        [pytest.approx(0.501), pytest.approx(0.502)],
        [pytest.approx(0.031), pytest.approx(0.032)],
        [pytest.approx(0.061), pytest.approx(0.062)],
    ]
    assert grid.types == ["train.local"] * 6 + ["evaluate.models"] * 2
    assert set(book.rounds) == {1, 2, 3}
    assert set(book.rounds[3].train) == {"hospital-a", "hospital-b"}


def test_an_evaluation_only_site_has_no_row_but_validates_every_model() -> None:
    grid = _Federation({1: "hospital-a", 2: "hospital-b", 3: "hospital-c"}, abstains="hospital-c")
    matrix, book = _run(grid, rounds=1)
    assert matrix["models"] == [GLOBAL, "hospital-a", "hospital-b"]
    assert matrix["sites"] == ["hospital-a", "hospital-b", "hospital-c"]
    assert matrix["dice"]["WT"][1][2] == pytest.approx(0.013)  # type: ignore[index]
    assert book.rounds[1].abstained == [
        {"site": "hospital-c", "phase": "train", "reason": "evaluation only"}
    ]
    assert matrix["failures"] == []


def test_a_site_below_min_cases_leaves_empty_cells() -> None:
    grid = _Federation({1: "hospital-a", 2: "hospital-b"}, n_cases=2)

    def count_only(msg: Message, original=grid._reply) -> Message:  # type: ignore[no-untyped-def]
        reply = original(msg)
        if msg.metadata.message_type == "evaluate.models" and msg.metadata.dst_node_id == 2:
            for key in [k for k in reply.content if k.startswith("metrics-")]:
                reply.content[key] = MetricRecord({"num-examples": 2})
        return reply

    grid._reply = count_only  # type: ignore[method-assign]
    matrix, _ = _run(grid, rounds=1)
    assert [row[1] for row in matrix["dice"]["ET"]] == [None, None, None]  # type: ignore[index]
    assert matrix["entries"]["hospital-a"]["hospital-b"]["withheld"] is True  # type: ignore[index]


def test_waiting_for_sites_ends_with_an_error_naming_the_setting() -> None:
    with pytest.raises(RuntimeError, match=r"only 1 of the 2 sites .*\(wait-for-sites\)"):
        wait_for_sites(_Federation({1: "a"}), minimum=2, timeout_s=0)  # type: ignore[arg-type]
