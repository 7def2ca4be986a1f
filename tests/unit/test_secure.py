"""Secure aggregation (SecAgg+): the server gets the case-weighted mean and nothing else.

The sites here run Flower's real ``secaggplus_mod`` through fedseg's
``secure_aggregation_mod``, each with its own state across the protocol's four messages;
only their training is a stand-in (a fixed, site-specific change to every weight).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from fedseg.artifacts import load_weights
from fedseg.config import ConfigError, RunConfig
from fedseg.egress import EgressPolicy, reply_problems
from fedseg.records import WEIGHTS, decline_reply
from fedseg.secure import secure_aggregation_mod
from fedseg.server_app import run_study
from tests.fake_grid import FakeGrid
from tests.unit.test_resume import _server_identity

pytestmark = pytest.mark.privacy
__all__ = ["_server_identity"]
SITES = {11: "hospital-a", 12: "hospital-b", 13: "hospital-c", 14: "hospital-d"}
CASES = {11: 9, 12: 4, 13: 2, 14: 7}


class _SecureSites(FakeGrid):
    """Sites that train by adding ``0.01 x (node - 10) x sin(index)`` to every weight and
    report their cases; ``dropout`` fails at its training step (after the key exchange)."""

    def __init__(self, run: RunConfig, *, dropout: int | None = None) -> None:
        super().__init__(dict(SITES))
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(),
                       run_config=run.to_flower())
            for n in SITES
        }  # fmt: skip
        self.dropout = dropout

    def _reply(self, msg: Message) -> Message:
        # Each site gets its own copy, as over the wire (the workflow shares one content
        # between messages and the site's mod pops from it).
        msg.content = RecordDict({
            k: ConfigRecord(dict(v)) if isinstance(v, ConfigRecord) else v
            for k, v in msg.content.items()
        })  # fmt: skip
        node = msg.metadata.dst_node_id
        if msg.metadata.message_type != "train":
            return self._validate(msg)
        try:
            return secure_aggregation_mod(msg, self.contexts[node], self._train)
        except RuntimeError:  # what the egress guard makes of a failure at the site
            return decline_reply(msg, site=SITES[node], reason="failed", kind="invalid-data")

    def _train(self, msg: Message, _: Context) -> Message:
        node = msg.metadata.dst_node_id
        if node == self.dropout:
            raise RuntimeError("the site's GPU fell over")
        start = msg.content["arrays"][WEIGHTS].numpy()  # type: ignore[index, union-attr]
        change = 0.01 * (node - 10) * np.sin(np.arange(start.size, dtype=np.float32))
        content = RecordDict({
            "site": ConfigRecord({"site": SITES[node], "fingerprint": "f" * 64}),
            "arrays": ArrayRecord({WEIGHTS: Array((start + change).astype(np.float32))}),
            "metrics": MetricRecord({"num-examples": CASES[node], "train-loss": 0.5,
                                     "local-steps": 2, "train-seconds": 1.0}),
        })  # fmt: skip
        return Message(content, reply_to=msg)

    def _validate(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        values: dict[str, float | int] = {"num-examples": 3}
        for region in ("WT", "TC", "ET"):
            for stat in ("mean", "median", "std", "p5", "p95"):
                values[f"dice-{region}-{stat}"] = 0.5
                values[f"hd95-{region}-{stat}"] = 1.0
        content = RecordDict({
            "site": ConfigRecord({"site": SITES[node], "fingerprint": "f" * 64}),
            "metrics": MetricRecord(values),
        })  # fmt: skip
        return Message(content, reply_to=msg)


def _run(tmp_path: Path, name: str, **overrides: object) -> RunConfig:
    base = RunConfig(num_server_rounds=2, min_train_sites=3, local_steps=2, wait_for_sites=0,
                     run_dir=str(tmp_path / name))  # fmt: skip
    return replace(base, **overrides)  # type: ignore[arg-type]


def _final(run: RunConfig) -> np.ndarray:
    state = load_weights(Path(run.run_dir) / "model.pt")
    return np.concatenate([t.numpy().ravel() for t in state.values()])


def _bound(*, rounds: int, sites: int, cases: int) -> float:
    step = 2 * 8.0 / 2**22  # secagg-clipping-range 8, Flower's 2^22 levels
    return rounds * sites * step / (cases / 1000.0)  # secagg-max-weight 1000


def test_a_secure_study_gives_the_plain_fedavg_model_up_to_quantisation(tmp_path: Path) -> None:
    plain = _run(tmp_path, "plain")
    secure = _run(tmp_path, "secure", secure_aggregation=True)
    run_study(plain, Path(plain.run_dir), _SecureSites(plain))  # type: ignore[arg-type]
    sites = _SecureSites(secure)
    run_study(secure, Path(secure.run_dir), sites)  # type: ignore[arg-type]
    # Each site's case-weighted weights are rounded (stochastically) to steps of 2 x 8 / 2^22
    # in units of cases / max-weight: a round's mean is off by under sites x step / (cases /
    # max-weight), and 2 rounds add up.
    error = np.abs(_final(secure) - _final(plain)).max()
    assert 0 < error < _bound(rounds=2, sites=4, cases=sum(CASES.values()))
    assert np.abs(_final(plain)).max() > 0.1  # the sites did move the model
    # The server never saw one site's weights: every training reply's arrays were empty.
    train = [r for r in sites.all_replies if RECORD_KEY_CONFIGS in r.content]
    assert len(train) == 2 * 4 * 4  # rounds x sites x protocol stages
    assert all(len(rec) == 0 for r in train for rec in r.content.array_records.values())
    rounds = json.loads((Path(secure.run_dir) / "metrics.json").read_text())["rounds"]
    assert all(set(r["train"]) == set(SITES.values()) for r in rounds)
    assert {s: e["n_cases"] for s, e in rounds[0]["train"].items()} == {
        SITES[n]: c for n, c in CASES.items()
    }


def test_a_site_dropping_out_mid_protocol_leaves_the_mean_of_the_others(tmp_path: Path) -> None:
    secure = _run(tmp_path, "secure", secure_aggregation=True, num_server_rounds=1)
    run_study(secure, Path(secure.run_dir), _SecureSites(secure, dropout=12))  # type: ignore[arg-type]
    (record,) = json.loads((Path(secure.run_dir) / "metrics.json").read_text())["rounds"]
    assert set(record["train"]) == {"hospital-a", "hospital-c", "hospital-d"}
    assert [f["site"] for f in record["failures"]] == ["hospital-b"]
    # The others' masks still cancel: the case-weighted mean of the three that trained, as
    # plain FedAvg gets it without the site.
    plain = _run(tmp_path, "plain", num_server_rounds=1)
    run_study(plain, Path(plain.run_dir), _SecureSites(plain, dropout=12))  # type: ignore[arg-type]
    cases = CASES[11] + CASES[13] + CASES[14]
    assert np.abs(_final(secure) - _final(plain)).max() < _bound(rounds=1, sites=3, cases=cases)


def test_secure_aggregation_refuses_what_needs_one_sites_update() -> None:
    with pytest.raises(ConfigError, match="strategy krum needs more"):
        RunConfig(secure_aggregation=True, strategy="krum")
    with pytest.raises(ConfigError, match="with differential privacy is not supported"):
        RunConfig(secure_aggregation=True, dp_noise_multiplier=1.0)
    with pytest.raises(ConfigError, match="min-train-sites >= 2"):
        RunConfig(secure_aggregation=True, min_train_sites=1)
    assert RunConfig(secure_aggregation=True, strategy="fedprox").secure_aggregation


def test_the_egress_guard_checks_the_secagg_records() -> None:
    policy = EgressPolicy(weights_size=5, share_per_case=False, secure_aggregation=True)
    from flwr.common import ndarray_to_bytes

    masked = [ndarray_to_bytes(np.array([7])), ndarray_to_bytes(np.arange(5))]
    fine = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.MASKED_PARAMETERS: masked}),
                       "arrays": ArrayRecord()})  # fmt: skip
    assert reply_problems(fine, kind="train", policy=policy) == []
    # A volume smuggled as a "masked vector", an extra key, weights left beside the mask.
    volume = [ndarray_to_bytes(np.zeros((4, 4, 4)))]
    leaks = RecordDict({
        RECORD_KEY_CONFIGS: ConfigRecord({Key.MASKED_PARAMETERS: volume, "path": b"/data"}),
        "arrays": ArrayRecord({WEIGHTS: Array(np.zeros(5, dtype=np.float32))}),
    })  # fmt: skip
    problems = reply_problems(leaks, kind="train", policy=policy)
    assert any("masked vector of 64 values" in p for p in problems)
    assert any("key 'path' is not allowed" in p for p in problems)
    assert any("holds arrays beside the masked vector" in p for p in problems)
    # Without secure aggregation in the study, none of it may leave.
    plain = EgressPolicy(weights_size=5, share_per_case=False)
    assert reply_problems(fine, kind="train", policy=plain)
