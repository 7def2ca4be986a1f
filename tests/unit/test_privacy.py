"""User-level differential privacy: clipping at the site, noise at the server, epsilon spent."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from fedseg.config import ConfigError, RunConfig
from fedseg.privacy import DpSettings, PrivateRelease, clipping_mod
from fedseg.records import WEIGHTS
from fedseg.server_app import run_study
from tests.unit.test_resume import _run, _server_identity, _Sites

pytestmark = pytest.mark.privacy
__all__ = ["_server_identity"]


def _weights(values: np.ndarray) -> ArrayRecord:
    return ArrayRecord({WEIGHTS: Array(values.astype(np.float32))})


def _train_message(start: np.ndarray, *, clip: float | None) -> Message:
    config = ConfigRecord({"server-round": 1})
    if clip is not None:
        config[KEY_CLIPPING_NORM] = clip
    return Message(
        RecordDict({"arrays": _weights(start), "config": config}),
        dst_node_id=5,
        message_type="train",
    )


def _site_trains_to(values: np.ndarray) -> object:
    def app(msg: Message, _: Context) -> Message:
        return Message(RecordDict({"arrays": _weights(values)}), reply_to=msg)

    return app


def _context() -> Context:
    return Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})


def test_the_site_clips_its_update_to_the_norm_the_server_asks() -> None:
    start, trained = np.ones(100), np.ones(100) + 3.0  # update norm 30
    reply = clipping_mod(_train_message(start, clip=2.0), _context(), _site_trains_to(trained))  # type: ignore[arg-type]
    sent = reply.content["arrays"][WEIGHTS].numpy()  # type: ignore[index]
    assert np.linalg.norm(sent - start) == pytest.approx(2.0, rel=1e-5)
    np.testing.assert_allclose((sent - start) / np.linalg.norm(sent - start), 0.1, rtol=1e-5)
    # A small update, or no clipping asked for, passes unchanged.
    small = np.ones(100) + 0.01
    same = clipping_mod(_train_message(start, clip=2.0), _context(), _site_trains_to(small))  # type: ignore[arg-type]
    np.testing.assert_allclose(same.content["arrays"][WEIGHTS].numpy(), small, rtol=1e-6)  # type: ignore[index]
    plain = clipping_mod(_train_message(start, clip=None), _context(), _site_trains_to(trained))  # type: ignore[arg-type]
    np.testing.assert_allclose(plain.content["arrays"][WEIGHTS].numpy(), trained)  # type: ignore[index]


def test_a_decline_passes_the_clipping_untouched() -> None:
    def declines(msg: Message, _: Context) -> Message:
        return Message(
            RecordDict({"site": ConfigRecord({"site": "a", "declined": "no"})}), reply_to=msg
        )

    reply = clipping_mod(_train_message(np.ones(4), clip=1.0), _context(), declines)
    assert not reply.has_error() and "arrays" not in reply.content


def test_the_server_adds_noise_of_the_calibrated_size_and_accounts_it() -> None:
    settings = DpSettings(noise_multiplier=1.5, clipping_norm=0.5, delta=1e-5, min_sites=3)
    release = PrivateRelease(settings)
    averaged = _weights(np.zeros(200_000))
    noised = release.release(averaged)[WEIGHTS].numpy()
    assert noised.std() == pytest.approx(1.5 * 0.5 / 3, rel=0.02)  # sigma C / m
    assert abs(noised.mean()) < 0.01
    reference = RdpAccountant(
        PrivacyConfig(
            target_delta=1e-5,
            population_size=3,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        )
    )
    reference.compose(GaussianPrivacyEvent(noise_multiplier=1.5, sample_size=3, population_size=3))
    assert release.spent()["epsilon"] == pytest.approx(reference.get_epsilon(1e-5))
    assert release.spent()["releases"] == 1


def test_a_dp_study_reports_epsilon_every_round_and_weighs_sites_equally(tmp_path: Path) -> None:
    run = _run(tmp_path, dp_noise_multiplier=1.0, dp_clipping_norm=10.0, local_steps=2)
    run_dir = Path(run.run_dir)
    sites = _Sites()
    run_study(run, run_dir, sites)  # type: ignore[arg-type]
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    epsilons = [r["privacy"]["epsilon"] for r in rounds]
    assert epsilons == sorted(epsilons) and epsilons[0] > 0 and len(set(epsilons)) == 3
    assert rounds[-1]["privacy"]["releases"] == 3 and rounds[-1]["privacy"]["delta"] == 1e-5
    audit = [json.loads(x) for x in (run_dir / "audit.jsonl").read_text().splitlines()]
    assert [r["privacy"]["epsilon"] for r in audit if r["event"] == "round"] == epsilons
    # The sites were asked to clip.
    assert all(KEY_CLIPPING_NORM in m for m in sites.train_configs)


def test_dp_refuses_strategies_whose_aggregate_is_not_a_mean() -> None:
    with pytest.raises(ConfigError, match="strategy krum is not one"):
        RunConfig(strategy="krum", dp_noise_multiplier=1.0)
    with pytest.raises(ConfigError, match="dp-delta must be in"):
        RunConfig(dp_noise_multiplier=1.0, dp_delta=1.0)
    assert not RunConfig().private and RunConfig(dp_noise_multiplier=0.5).private


def test_a_dp_round_refuses_an_update_claiming_more_work(tmp_path: Path) -> None:
    from fedseg.strategies import MetricsBook, build_strategy
    from tests.unit.test_audit_study import _Nodes, _reply

    run = RunConfig(dp_noise_multiplier=1.0, min_train_sites=2, local_steps=2)
    book = MetricsBook(weights_size=20)
    strategy = build_strategy(run, book=book)
    start = _weights(np.zeros(20))
    list(strategy.configure_train(1, start, ConfigRecord(), _Nodes([1, 2, 3])))  # type: ignore[arg-type]
    replies = [_reply(n, np.full(20, 0.1)) for n in (1, 2, 3)]
    greedy = replies[2].content["metrics"]
    assert isinstance(greedy, MetricRecord)
    greedy["local-steps"] = 200
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    assert [f["site"] for f in book.rounds[1].failures] == ["hospital-3"]
    assert "reported 200 local steps" in book.rounds[1].failures[0]["reason"]
