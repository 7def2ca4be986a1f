"""The egress guard: planted leaks never leave a site, and everything sent is logged there."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from data_adapters.harmonise import harmonisation_parameters
from fedseg.config import RunConfig, SiteConfig
from fedseg.egress import BLOCKED, content_digest, egress_guard, policy_for
from fedseg.records import WEIGHTS, declined, identity_record, pack_weights
from fedseg.task.model import build_model

pytestmark = pytest.mark.privacy
FINGERPRINT = "ab" * 32


@pytest.fixture(autouse=True)
def _server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    for attr in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


def _context(tmp_path: Path, **site: object) -> Context:
    node = {
        "data-path": str(tmp_path / "hospital-a"),
        "egress-log": str(tmp_path / "egress.jsonl"),
        **site,
    }
    return Context(
        run_id=7,
        node_id=5,
        node_config=node,
        state=RecordDict(),
        run_config=RunConfig().to_flower(),
    )


def _incoming(kind: str = "train") -> Message:
    config = ConfigRecord({"server-round": 3})
    return Message(RecordDict({"config": config}), dst_node_id=5, message_type=kind)


def _identity(**extra: str) -> ConfigRecord:
    return ConfigRecord({"site": "hospital-a", "fingerprint": FINGERPRINT, **extra})


def _good_train_reply() -> RecordDict:
    weights = pack_weights(build_model("tiny", seed=0).state_dict())
    metrics = MetricRecord(
        {
            "num-examples": 8,
            "train-loss": 0.4,
            "train-loss-final": 0.3,
            "local-steps": 2,
            "train-seconds": 1.5,
        }
    )
    return RecordDict({"site": _identity(), "arrays": weights, "metrics": metrics})


def _through_guard(
    tmp_path: Path, content: RecordDict, *, kind: str = "train", **site: object
) -> Message:
    msg = _incoming(kind)
    return egress_guard(msg, _context(tmp_path, **site), lambda m, _: Message(content, reply_to=m))


def _log(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "egress.jsonl").read_text().splitlines()]


def test_a_training_reply_passes_and_is_logged_with_its_digest(tmp_path: Path) -> None:
    content = _good_train_reply()
    reply = _through_guard(tmp_path, content)
    assert declined(reply) is None and "arrays" in reply.content
    [entry] = _log(tmp_path)
    assert entry["verdict"] == "sent" and entry["round"] == 3 and entry["run_id"] == 7
    assert (entry["bytes"], entry["sha256"]) == content_digest(content)
    weights = content["arrays"][WEIGHTS].numpy()  # type: ignore[index]
    assert entry["bytes"] > weights.nbytes  # the weights themselves are counted


def _assert_blocked(reply: Message, tmp_path: Path, needle: str) -> None:
    assert declined(reply) == ("invalid-data", BLOCKED)
    assert set(reply.content) == {"site"}  # nothing but the decline left
    [entry] = _log(tmp_path)
    assert entry["verdict"] == "blocked"
    assert any(needle in p for p in entry["problems"]), entry["problems"]


def test_an_image_shaped_array_is_blocked(tmp_path: Path) -> None:
    content = _good_train_reply()
    scan = np.random.default_rng(0).random((4, 48, 48, 48), dtype=np.float32)
    content["arrays"] = ArrayRecord({WEIGHTS: Array(scan)})
    _assert_blocked(_through_guard(tmp_path, content), tmp_path, "float32 (4, 48, 48, 48)")


def test_an_extra_array_beside_the_weights_is_blocked(tmp_path: Path) -> None:
    content = _good_train_reply()
    content["scan"] = ArrayRecord({"t1c": Array(np.zeros((8, 8, 8), np.float32))})
    _assert_blocked(_through_guard(tmp_path, content), tmp_path, "record 'scan'")


def test_a_file_path_in_a_reason_is_blocked(tmp_path: Path) -> None:
    reason = "could not read /data/hospital-a/BraTS-GLI-00012/t1c.nii.gz"
    content = RecordDict({"site": _identity(declined=reason, **{"decline-kind": "invalid-data"})})
    _assert_blocked(_through_guard(tmp_path, content), tmp_path, "identity 'declined'")
    assert "/data/" not in str(_through_guard(tmp_path / "again", content).content)


def test_a_patient_identifier_in_a_metric_name_is_blocked(tmp_path: Path) -> None:
    metrics = MetricRecord({"num-examples": 3, "dice-WT-mean": 0.8, "dice-BraTS-00012": 0.7})
    content = RecordDict({"site": _identity(), "metrics": metrics})
    reply = _through_guard(tmp_path, content, kind="evaluate")
    _assert_blocked(reply, tmp_path, "metric 'dice-BraTS-00012'")
    assert "00012" not in str(reply.content)


def test_per_case_lists_leave_only_with_the_sites_consent(tmp_path: Path) -> None:
    metrics = MetricRecord(
        {"num-examples": 3, "dice-WT-mean": 0.8, "dice-WT-cases": [0.7, 0.8, 0.9]}
    )
    content = RecordDict({"site": _identity(), "metrics": metrics})
    blocked = _through_guard(tmp_path / "no", content, kind="evaluate")
    assert declined(blocked) == ("invalid-data", BLOCKED)
    allowed = _through_guard(tmp_path / "yes", content, kind="evaluate", **{"share-per-case": True})
    assert declined(allowed) is None


def test_weights_in_a_validation_reply_or_non_finite_weights_are_blocked(tmp_path: Path) -> None:
    content = _good_train_reply()
    assert declined(_through_guard(tmp_path / "eval", content, kind="evaluate")) is not None
    values = content["arrays"][WEIGHTS].numpy().copy()
    values[10] = np.nan
    content["arrays"] = ArrayRecord({WEIGHTS: Array(values)})
    _assert_blocked(_through_guard(tmp_path, content), tmp_path, "NaN")


def test_the_policy_follows_the_strategy_and_the_site(tmp_path: Path) -> None:
    site = SiteConfig(data_path=tmp_path)
    fedbn = policy_for(RunConfig(strategy="fedbn", model_preset="tiny-bn"), site)
    fedavg = policy_for(RunConfig(model_preset="tiny-bn"), site)
    assert fedbn.weights_size < fedavg.weights_size and not fedbn.share_per_case


def test_an_exception_at_the_site_leaves_without_its_text(tmp_path: Path) -> None:
    def crashes(msg: Message, _: Context) -> Message:
        raise OSError(f"{tmp_path}/hospital-a/BraTS-GLI-00012/t1c.nii.gz: truncated")

    reply = egress_guard(_incoming(), _context(tmp_path), crashes)
    assert declined(reply) == (
        "invalid-data",
        "the site could not complete the task; details are in the site's log",
    )
    assert "00012" not in str(reply.content)


def test_an_error_reply_from_inside_is_sent_in_general_terms(tmp_path: Path) -> None:
    from flwr.app import Error

    def errs(msg: Message, _: Context) -> Message:
        return Message(Error(code=1, reason="/data/hospital-a/case-7 unreadable"), reply_to=msg)

    reply = egress_guard(_incoming(), _context(tmp_path), errs)
    assert reply.has_error() and "case-7" not in str(reply.error.reason)


def _harmonisation(**change: object) -> str:
    """The identity's harmonisation field as a site sends it, with ``change`` planted."""
    good = identity_record("a", FINGERPRINT, harmonisation=harmonisation_parameters(
        target_spacing=(3.0, 3.0, 3.0)))["harmonisation"]  # fmt: skip
    return json.dumps({**json.loads(str(good)), **change}, sort_keys=True)


def test_the_harmonisation_parameters_pass_and_nothing_rides_along(tmp_path: Path) -> None:
    content = _good_train_reply()
    content["site"] = _identity(harmonisation=_harmonisation())
    assert declined(_through_guard(tmp_path / "ok", content)) is None
    leaks = {
        "extra": _harmonisation(patient="Doe^John"),
        "text": _harmonisation(mask="Doe^John, born 1950-01-01"),
        "version": _harmonisation(harmonise_version="/data/hospital-a/cases"),
        "spacing": _harmonisation(target_spacing_mm=["1", "2", "3"]),
    }
    for name, value in leaks.items():
        content["site"] = _identity(harmonisation=value)
        reply = _through_guard(tmp_path / name, content)
        assert declined(reply) == ("invalid-data", BLOCKED), name
        assert "Doe" not in str(reply.content) and "/data/" not in str(reply.content)
