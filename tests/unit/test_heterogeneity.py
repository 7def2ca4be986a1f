"""Strategies for heterogeneous sites: FedBN's partial sharing, the cyclic plan and
personalisation, through the real ClientApp handlers and the server's round code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedseg import client_app
from fedseg.config import ConfigError, RunConfig
from fedseg.records import WEIGHTS, declined, pack_weights
from fedseg.rounds import RoundPlan, cyclic_round
from fedseg.strategies import MetricsBook, RecordingCyclic, build_strategy
from fedseg.task.model import build_model
from fedseg.task.sharing import normalisation_keys, travelling_state
from tests.fake_grid import FakeGrid


@pytest.fixture(autouse=True)
def _server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    for attr in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


@pytest.fixture(scope="module")
def tiny_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small harmonised site (the adapters' test site, 3 mm)."""
    from data_adapters.site import harmonise_site
    from tests.unit.test_adapters_site import SPACING, raw_site

    base = tmp_path_factory.mktemp("hetero")
    out = base / "hospital-a"
    harmonise_site(raw_site(base / "raw" / "hospital-a", 4), out, target_spacing=SPACING,
                   qc=False, validation_fraction=0.5)  # fmt: skip
    return out


def _context(site: Path, run: RunConfig) -> Context:
    return Context(run_id=1, node_id=5, node_config={"data-path": str(site)},
                   state=RecordDict(), run_config=run.to_flower())  # fmt: skip


def _message(run: RunConfig, kind: str = "train", **config: int) -> Message:
    model = build_model(run.model_preset, seed=run.seed)
    arrays = pack_weights(travelling_state(model, keep_norm_local=run.keeps_norm_local))
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1, **config})})
    return Message(content, dst_node_id=5, message_type=kind)


# --------------------------------------------------------------------------- FedBN


def test_fedbn_never_sends_normalisation_parameters(tiny_site: Path) -> None:
    # Prepare
    run = RunConfig(strategy="fedbn", model_preset="tiny-bn", local_steps=2, seed=3)
    model = build_model("tiny-bn", seed=3)
    norm = normalisation_keys(model)
    float_state = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    shared = {k: v for k, v in float_state.items() if k not in norm}
    context = _context(tiny_site, run)
    # Execute
    reply = client_app.train(_message(run), context)
    # Assert: the outgoing vector holds exactly the non-normalisation weights ...
    assert declined(reply) is None, declined(reply)
    outgoing = reply.content["arrays"]
    assert isinstance(outgoing, ArrayRecord) and list(outgoing) == [WEIGHTS]
    sent = outgoing[WEIGHTS].numpy()
    assert sent.size == sum(v.numel() for v in shared.values())
    assert sent.size < sum(v.numel() for v in float_state.values())
    # ... while the site's normalisation was trained and kept in the run's site state.
    kept = context.state[client_app._LOCAL_NORM]
    assert isinstance(kept, ArrayRecord)
    local = kept.to_torch_state_dict()
    assert set(local) == norm
    running = next(k for k in norm if k.endswith("running_mean"))
    assert not torch.equal(local[running], model.state_dict()[running])
    for value in local.values():  # no norm tensor's values hide in the vector either
        if value.is_floating_point() and value.numel() > 4:
            assert not np.isin(value.numpy().ravel(), sent).all()


def test_fedbn_site_validates_with_its_own_normalisation(tiny_site: Path) -> None:
    run = RunConfig(strategy="fedbn", model_preset="tiny-bn", local_steps=2, seed=3)
    context = _context(tiny_site, run)
    client_app.train(_message(run), context)
    kept = context.state[client_app._LOCAL_NORM]
    assert isinstance(kept, ArrayRecord)
    _, site, manifest = client_app._open_site(context, "evaluate")
    task = client_app.SiteTask(_message(run, "evaluate"), run, site, manifest, context.state)
    model = task.model()
    for key, value in kept.to_torch_state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_fedbn_site_that_never_trained_sits_validation_out(tiny_site: Path) -> None:
    run = RunConfig(strategy="fedbn", model_preset="tiny-bn")
    reply = client_app.evaluate(_message(run, "evaluate"), _context(tiny_site, run))
    kind, reason = declined(reply) or ("", "")
    assert kind == "abstain" and "no normalisation of its own" in reason


def test_site_order_is_only_for_the_cyclic_plan() -> None:
    with pytest.raises(ConfigError, match="site-order is for strategy cyclic"):
        RunConfig(site_order="hospital-a,hospital-b")
    assert RunConfig(strategy="cyclic", site_order=" a, b,").site_sequence == ["a", "b"]
    with pytest.raises(ConfigError, match="names a site twice"):
        RunConfig(strategy="cyclic", site_order="a,b,a")


def test_fedavg_on_a_bn_preset_sends_norm_weights_but_no_counters(tiny_site: Path) -> None:
    run = RunConfig(model_preset="tiny-bn", local_steps=1)
    reply = client_app.train(_message(run), _context(tiny_site, run))
    outgoing = reply.content["arrays"]
    assert isinstance(outgoing, ArrayRecord)
    model = build_model("tiny-bn", seed=0)
    floats = sum(v.numel() for v in model.state_dict().values() if v.is_floating_point())
    assert outgoing[WEIGHTS].numpy().size == floats


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"initial_model": "/x/model.pt"}, "initial-model's cannot reach them"),
        ({"resume": True, "run_dir": "/x"}, "cannot resume"),
        ({"mode": "evaluate", "initial_model": "/x/model.pt"}, "mode 'evaluate'"),
    ],
)
def test_fedbn_refuses_what_it_cannot_honour(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig(strategy="fedbn", model_preset="tiny-bn", **overrides)  # type: ignore[arg-type]


def test_fedbn_on_a_preset_without_norm_parameters_is_refused(tmp_path: Path) -> None:
    from fedseg.server_app import run_study

    run = RunConfig(strategy="fedbn", model_preset="tiny", run_dir=str(tmp_path))
    with pytest.raises(ValueError, match="use 'tiny-bn'"):
        run_study(run, tmp_path, grid=None)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- cyclic plan


class _ChainGrid(FakeGrid):
    """Fake sites: a site trains by ``w -> 2 w + id`` (so the result depends on the order),
    answers the identity roll-call, and ``failing`` sites decline to train."""

    def __init__(self, names: dict[int, str], *, failing: tuple[str, ...] = ()) -> None:
        super().__init__(names)
        self.names, self.failing = names, failing
        self.visits: list[str] = []
        self.received: list[np.ndarray] = []

    def _reply(self, msg: Message) -> Message:
        name = self.names[msg.metadata.dst_node_id]
        if msg.metadata.message_type == "query.identity":
            return Message(RecordDict({"site": ConfigRecord({"site": name})}), reply_to=msg)
        self.visits.append(name)
        identity = ConfigRecord({"site": name, "fingerprint": f"fp-{name}"})
        if name in self.failing:
            identity["declined"] = "the site could not complete train"
            return Message(RecordDict({"site": identity}), reply_to=msg)
        arrays = msg.content["arrays"]
        assert isinstance(arrays, ArrayRecord)
        weights = arrays[WEIGHTS].numpy()
        self.received.append(weights.copy())
        trained = (2 * weights + msg.metadata.dst_node_id).astype(np.float32)
        metrics = MetricRecord({"num-examples": 4, "train-loss": 0.5, "local-steps": 2,
                                "train-seconds": 1.0})  # fmt: skip
        arrays = ArrayRecord({WEIGHTS: Array(trained)})
        content = RecordDict({"site": identity, "arrays": arrays, "metrics": metrics})
        return Message(content, reply_to=msg)


PLAN = RoundPlan(first_round=1, last_round=1, min_sites=2, wait_for_sites_s=1, round_timeout_s=5)
NAMES = {11: "hospital-a", 12: "hospital-b", 13: "hospital-c"}


def _cyclic(order: str, *, min_sites: int = 2) -> RecordingCyclic:
    run = RunConfig(strategy="cyclic", site_order=order, min_train_sites=min_sites)
    strategy = build_strategy(run, book=MetricsBook(weights_size=3))
    assert isinstance(strategy, RecordingCyclic)
    return strategy


def _weights(value: float) -> ArrayRecord:
    return ArrayRecord({WEIGHTS: Array(np.full(3, value, dtype=np.float32))})


def test_cyclic_plan_visits_sites_in_the_configured_order_and_chains_the_model() -> None:
    grid = _ChainGrid(NAMES)
    strategy = _cyclic("hospital-c, hospital-a,hospital-b")
    out = cyclic_round(strategy, grid, server_round=1, arrays=_weights(1.0), plan=PLAN)  # type: ignore[arg-type]
    assert grid.visits == ["hospital-c", "hospital-a", "hospital-b"]
    # Each site starts from the previous one's model: 1 -> 2+13 -> 2*15+11 -> 2*41+12.
    assert [float(r[0]) for r in grid.received] == [1.0, 15.0, 41.0]
    assert float(out[WEIGHTS].numpy()[0]) == 94.0
    assert set(strategy.book.rounds[1].train) == set(NAMES.values())


def test_cyclic_default_order_is_by_site_name_and_a_failing_site_is_skipped() -> None:
    grid = _ChainGrid({21: "hospital-b", 22: "hospital-a", 23: "hospital-c"},
                      failing=("hospital-b",))  # fmt: skip
    strategy = _cyclic("")
    out = cyclic_round(strategy, grid, server_round=1, arrays=_weights(0.0), plan=PLAN)  # type: ignore[arg-type]
    assert grid.visits == ["hospital-a", "hospital-b", "hospital-c"]
    assert float(out[WEIGHTS].numpy()[0]) == 2 * 22 + 23  # b's failure left a's model going on
    failures = strategy.book.rounds[1].failures
    assert [f["site"] for f in failures] == ["hospital-b"]


def test_cyclic_site_not_connected_is_a_failure_and_too_few_visits_keep_the_model() -> None:
    grid = _ChainGrid({31: "hospital-a"})
    strategy = _cyclic("hospital-a,hospital-z")
    start = _weights(5.0)
    plan = RoundPlan(first_round=1, last_round=1, min_sites=1, wait_for_sites_s=1,
                     round_timeout_s=5)  # fmt: skip
    out = cyclic_round(strategy, grid, server_round=1, arrays=start, plan=plan)  # type: ignore[arg-type]
    record = strategy.book.rounds[1]
    assert record.failures[0]["site"] == "hospital-z"
    assert "not connected" in record.failures[0]["reason"]
    assert out is start and "min-train-sites" in record.not_aggregated


# --------------------------------------------------------------------------- personalisation


def test_personalisation_fine_tunes_at_the_site_and_sends_only_scores(tiny_site: Path) -> None:
    run = RunConfig(personalise_steps=3, min_cases_to_report=1, learning_rate=5e-3)
    context = _context(tiny_site, run)
    reply = client_app.evaluate_personalised(_message(run, "evaluate.personalised"), context)
    assert declined(reply) is None, declined(reply)
    keys = set(reply.content.keys())
    assert keys == {"metrics-global", "metrics-personalised", "metrics-training", "site"}
    assert not any(isinstance(reply.content[k], ArrayRecord) for k in keys)  # no weights leave
    trained = reply.content["metrics-training"]
    assert isinstance(trained, MetricRecord) and trained["local-steps"] == 3
    scores = {v: reply.content[f"metrics-{v}"] for v in ("global", "personalised")}
    # Three Adam steps from an untrained network change its predictions.
    assert scores["global"]["dice-WT-mean"] != scores["personalised"]["dice-WT-mean"]


def test_personalisation_needs_the_sites_consent_to_train(tiny_site: Path, tmp_path: Path) -> None:
    import shutil

    site = tmp_path / "hospital-a"
    shutil.copytree(tiny_site, site)
    (site / "site.toml").write_text("[consent]\ntrain = false\n")
    run = RunConfig(personalise_steps=3, sim_sites_dir=str(tmp_path))
    context = Context(run_id=1, node_id=5, node_config={"partition-id": 0, "num-partitions": 1},
                      state=RecordDict(), run_config=run.to_flower())  # fmt: skip
    reply = client_app.evaluate_personalised(_message(run, "evaluate.personalised"), context)
    assert declined(reply) == ("abstain", "the site does not take part in training (train = false)")
