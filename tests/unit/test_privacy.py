"""User-level differential privacy: clipping at the site, noise at the server, epsilon spent."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from fedseg.config import ConfigError, RunConfig
from fedseg.privacy import (
    CLIPPED_METRIC,
    KEY_REPORT_CLIPPED,
    AdaptiveClipping,
    DpSettings,
    PrivateRelease,
    clipping_mod,
)
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
    noised = release.release(averaged)[0][WEIGHTS].numpy()
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


def _asks_clipped(message: Message) -> Message:
    config = message.content["config"]
    assert isinstance(config, ConfigRecord)
    config[KEY_REPORT_CLIPPED] = True
    return message


def _site_trains_with_metrics(values: np.ndarray) -> object:
    def app(msg: Message, _: Context) -> Message:
        content = RecordDict({"arrays": _weights(values), "metrics": MetricRecord({"x": 1})})
        return Message(content, reply_to=msg)

    return app


def test_the_site_says_whether_it_clipped_only_when_asked() -> None:
    start = np.zeros(100)
    big, small = np.full(100, 3.0), np.full(100, 0.01)  # update norms 30 and 0.1
    ask = _asks_clipped(_train_message(start, clip=2.0))
    clipped = clipping_mod(ask, _context(), _site_trains_with_metrics(big))  # type: ignore[arg-type]
    assert clipped.content["metrics"][CLIPPED_METRIC] == 1  # type: ignore[index]
    ask = _asks_clipped(_train_message(start, clip=2.0))
    kept = clipping_mod(ask, _context(), _site_trains_with_metrics(small))  # type: ignore[arg-type]
    assert kept.content["metrics"][CLIPPED_METRIC] == 0  # type: ignore[index]
    fixed = clipping_mod(
        _train_message(start, clip=2.0), _context(), _site_trains_with_metrics(big)
    )  # type: ignore[arg-type]
    assert CLIPPED_METRIC not in fixed.content["metrics"]  # type: ignore[operator]


def _adaptive(noise: float = 1.0, sites: int = 100) -> PrivateRelease:
    return PrivateRelease(DpSettings(
        noise_multiplier=noise, clipping_norm=1.0, delta=1e-5, min_sites=sites,
        adaptive=AdaptiveClipping(target_quantile=0.5, learning_rate=0.2,
                                  count_stddev=sites / 20)))  # fmt: skip


def test_adaptive_clipping_follows_the_target_quantile_of_the_update_norms() -> None:
    # All clipped: the norm was too small and grows; none clipped: it shrinks (Andrew et al.'s
    # C <- C exp(-lr (unclipped fraction - quantile)); 100 sites keep the count noise small).
    grows, shrinks = _adaptive(), _adaptive()
    for _ in range(3):
        grows.adapt([True] * 100)
        shrinks.adapt([False] * 100)
    assert grows.clipping_norm == pytest.approx(np.exp(0.3), rel=0.1)
    assert shrinks.clipping_norm == pytest.approx(np.exp(-0.3), rel=0.1)
    # The count spends privacy, so the update noise is above the nominal multiplier.
    z_u = (1.0**-2 - (2 * 5.0) ** -2) ** -0.5
    assert grows.update_noise == pytest.approx(z_u) and z_u > 1.0


def test_a_round_is_noised_for_the_norm_the_sites_clipped_at() -> None:
    release = _adaptive(noise=1.0, sites=100)
    arrays, spent = release.release(_weights(np.zeros(200_000)), clipped=[True] * 100)
    noised = arrays[WEIGHTS].numpy()
    assert noised.std() == pytest.approx(release.update_noise * 1.0 / 100, rel=0.02)
    assert spent["clipping_norm"] == 1.0
    assert spent["next_clipping_norm"] == release.clipping_norm > 1.0
    with pytest.raises(ValueError, match="clipped flag"):
        release.release(_weights(np.zeros(4)))


def test_adaptive_clipping_refuses_a_count_noise_too_small_for_the_budget() -> None:
    with pytest.raises(ConfigError, match=r"dp-count-stddev above 0\.5"):
        RunConfig(dp_noise_multiplier=1.0, dp_clipping="adaptive", min_train_sites=3)
    with pytest.raises(ConfigError, match="dp-clipping 'auto' unknown"):
        RunConfig(dp_noise_multiplier=1.0, dp_clipping="auto")
    run = RunConfig(dp_noise_multiplier=1.0, dp_clipping="adaptive", dp_count_stddev=0.6)
    assert run.count_stddev == 0.6


class _ClippingSites(_Sites):
    """Sites whose replies pass the real clipping mod (each update has norm sqrt(size))."""

    def _answer(self, msg: Message, server_round: int) -> Message:
        def site(m: Message, _: Context) -> Message:
            return super(_ClippingSites, self)._answer(m, server_round)

        return clipping_mod(msg, _context(), site)  # type: ignore[arg-type]


def test_an_adaptive_study_moves_the_norm_and_a_resume_continues_it(tmp_path: Path) -> None:
    run = _run(
        tmp_path,
        dp_noise_multiplier=0.1,
        dp_clipping="adaptive",
        dp_clipping_norm=1.0,
        local_steps=2,
    )
    run_dir = Path(run.run_dir)
    with pytest.raises(KeyboardInterrupt):
        run_study(run, run_dir, _ClippingSites(crash_in_round=3))  # type: ignore[arg-type]
    sites = _ClippingSites()
    run_study(replace(run, resume=True), run_dir, sites)  # type: ignore[arg-type]
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    used = [r["privacy"]["clipping_norm"] for r in rounds]
    # Every update (norm in the hundreds) is clipped, so the norm grows each round, and the
    # resumed round 3 clips at the norm round 2 left.
    assert used[0] == 1.0 and used == sorted(used) and len(set(used)) == 3
    assert used[2] == rounds[1]["privacy"]["next_clipping_norm"]
    assert {c[KEY_CLIPPING_NORM] for c in sites.train_configs} == {used[2]}
    assert rounds[-1]["privacy"]["releases"] == 3


def test_an_adaptive_round_refuses_an_update_that_does_not_say_it_was_clipped(
    tmp_path: Path,
) -> None:
    run = _run(
        tmp_path,
        dp_noise_multiplier=0.1,
        dp_clipping="adaptive",
        num_server_rounds=1,
        local_steps=2,
    )
    with pytest.raises(RuntimeError, match=r"did not say whether its update was clipped"):
        run_study(run, Path(run.run_dir), _Sites())  # type: ignore[arg-type]
