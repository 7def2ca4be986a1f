"""A site's own settings decide what it takes part in and what leaves it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from evaluation.metrics import case_scores
from fedseg.client_app import SiteDeclinedError, _open_site, validation_metrics
from fedseg.config import ConfigError, Consent, RunConfig, SiteConfig
from fedseg.records import declined, site_entry
from fedseg.strategies import MetricsBook
from fedseg.task.validate import SiteValidation


@pytest.fixture(autouse=True)
def _server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    for attr in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


# --------------------------------------------------------------------------- site settings


def _sim_site(tmp_path: Path, toml: str | None) -> SiteConfig:
    (tmp_path / "site-a").mkdir(exist_ok=True)
    (tmp_path / "site-a" / "manifest.json").write_text("{}")
    if toml is not None:
        (tmp_path / "site-a" / "site.toml").write_text(toml)
    run = RunConfig(sim_sites_dir=str(tmp_path))
    return SiteConfig.from_node_config({"partition-id": 0, "num-partitions": 1}, run)


def test_defaults_are_a_training_site_that_shares_aggregates_only(tmp_path: Path) -> None:
    site = _sim_site(tmp_path, None)
    assert site.consent == Consent(
        train=True, evaluate=True, share_per_case=False, share_local_model=True
    )
    assert site.data_path == tmp_path / "site-a"


def test_site_toml_sets_consent_in_simulation(tmp_path: Path) -> None:
    site = _sim_site(tmp_path, "[consent]\ntrain = false\nshare-per-case = true\n")
    assert site.consent.train is False and site.consent.share_per_case is True
    assert site.consent.evaluate is True


def test_node_config_sets_consent_when_deployed() -> None:
    node = {"data-path": "/data/site", "train": False, "share-local-model": False}
    site = SiteConfig.from_node_config(node, RunConfig())
    assert site.data_path == Path("/data/site")
    assert (site.consent.train, site.consent.share_local_model) == (False, False)


def test_a_site_floor_for_min_cases_can_only_raise_the_studys(tmp_path: Path) -> None:
    # The server sets min-cases-to-report; a site that does not trust it sets its own floor.
    site = _sim_site(tmp_path, "[site]\nmin-cases-to-report = 5\n")
    assert site.min_cases(RunConfig(min_cases_to_report=1)) == 5
    assert site.min_cases(RunConfig(min_cases_to_report=8)) == 8
    assert SiteConfig(data_path=tmp_path).min_cases(RunConfig(min_cases_to_report=2)) == 2


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[consent]\ntrian = false\n", r"unknown site setting\(s\) \['trian'\]"),
        ("[consent]\ntrain = 'no'\n", "key 'train': expected bool"),
        ("[permissions]\ntrain = false\n", r"unknown table \[permissions\]"),
        ("[consent\n", "not valid TOML"),
    ],
)
def test_a_misspelt_or_mistyped_setting_is_refused_naming_the_file(
    tmp_path: Path, toml: str, message: str
) -> None:
    # A typo must never leave a site doing what it meant to refuse.
    with pytest.raises(ConfigError, match=message) as caught:
        _sim_site(tmp_path, toml)
    assert str(tmp_path / "site-a" / "site.toml") in str(caught.value)


# --------------------------------------------------------------------------- the client side


def _context(tmp_path: Path, toml: str) -> Context:
    _sim_site(tmp_path, toml)
    run = RunConfig(sim_sites_dir=str(tmp_path)).to_flower()
    return Context(
        run_id=1, node_id=5, node_config={"partition-id": 0}, state=RecordDict(), run_config=run
    )


@pytest.mark.parametrize(
    ("toml", "action", "reason"),
    [
        ("[consent]\ntrain = false\n", "train", "train = false"),
        ("[consent]\ntrain = false\n", "local", "train = false"),
        ("[consent]\nshare-local-model = false\n", "local", "share-local-model = false"),
        ("[consent]\nevaluate = false\n", "evaluate", "does not take part in evaluation"),
    ],
)
def test_a_site_abstains_from_what_it_does_not_consent_to(
    tmp_path: Path, toml: str, action: str, reason: str
) -> None:
    # The consent check comes before the data is even read (this site has no data at all).
    with pytest.raises(SiteDeclinedError) as caught:
        _open_site(_context(tmp_path, toml), action)
    assert caught.value.kind == "abstain" and reason in caught.value.reason
    assert caught.value.site == "site-a"


def test_broken_data_is_a_failure_not_an_abstention(tmp_path: Path) -> None:
    with pytest.raises(SiteDeclinedError) as caught:
        _open_site(_context(tmp_path, "[consent]\ntrain = true\n"), "train")
    assert caught.value.kind == "invalid-data"
    assert str(tmp_path) not in caught.value.reason  # no path leaves the site


def _validation(n: int) -> SiteValidation:
    per_case = {}
    for i in range(n):
        reference = np.zeros((12, 12, 12), dtype=np.uint8)
        reference[3:9, 3:9, 3:9] = 2
        reference[5:7, 5:7, 5:7] = 3
        per_case[f"BraTS-{i:05d}"] = case_scores(
            np.roll(reference, i, axis=0), reference, spacing=(1.0, 1.0, 2.0)
        )
    return SiteValidation(n_cases=n, per_case=per_case, seconds=0.0)


def test_per_case_values_leave_only_with_consent_and_without_case_ids() -> None:
    result = _validation(4)
    private = validation_metrics(result, min_cases=3, share_per_case=False)
    shared = validation_metrics(result, min_cases=3, share_per_case=True)
    assert not any(k.endswith("-cases") for k in private)
    expected = [result.per_case[c]["WT"].dice for c in result.per_case]
    assert shared["dice-WT-cases"] == pytest.approx(expected)
    assert len(shared["hd95-ET-cases"]) == 4  # type: ignore[arg-type]
    assert not any("BraTS" in k for k in shared)  # values only, never a case id
    assert set(private) < set(shared)


def test_below_min_cases_nothing_but_the_count_leaves_even_with_consent() -> None:
    assert validation_metrics(_validation(2), min_cases=3, share_per_case=True) == {
        "num-examples": 2
    }


# --------------------------------------------------------------------------- the server side


def _reply(node: int, content: RecordDict, kind: str = MessageType.EVALUATE) -> Message:
    instruction = Message(RecordDict(), dst_node_id=node, message_type=kind)
    return Message(content, reply_to=instruction)


def test_server_keeps_abstentions_apart_from_failures_and_reads_per_case_lists() -> None:
    # Prepare
    values = validation_metrics(_validation(3), min_cases=3, share_per_case=True)
    identity = ConfigRecord({"site": "hospital-a", "fingerprint": "fa"})
    good = _reply(7, RecordDict({"metrics": MetricRecord(values), "site": identity}))
    only = ConfigRecord({"site": "hospital-c", "declined": "evaluation only",
                         "decline-kind": "abstain"})  # fmt: skip
    broken = ConfigRecord({"site": "hospital-d", "declined": "data failed validation"})
    book = MetricsBook()
    # Execute
    book.record_evaluate(1, [good, _reply(8, RecordDict({"site": only})),
                             _reply(9, RecordDict({"site": broken}))])  # fmt: skip
    # Assert
    record = book.rounds[1].to_json()
    assert record["abstained"] == [
        {"site": "hospital-c", "phase": "evaluate", "reason": "evaluation only"}
    ]
    assert record["failures"] == [
        {"site": "hospital-d", "phase": "evaluate", "reason": "data failed validation"}
    ]
    entry = record["sites"]["hospital-a"]
    assert entry["per_case"]["dice"]["WT"] == pytest.approx(values["dice-WT-cases"])
    assert entry["dice"]["WT"] == pytest.approx(np.mean(values["dice-WT-cases"]))


def test_decline_kind_defaults_to_failure_for_older_sites() -> None:
    old = _reply(3, RecordDict({"site": ConfigRecord({"site": "x", "declined": "bad"})}))
    assert declined(old) == ("invalid-data", "bad")


def test_site_entry_without_per_case_lists_has_none() -> None:
    values = validation_metrics(_validation(3), min_cases=3, share_per_case=False)
    entry = site_entry(MetricRecord(values), ConfigRecord({"site": "a", "fingerprint": "f"}))
    assert "per_case" not in entry and entry["n_cases"] == 3


def test_site_device_is_the_sites_choice_and_checked() -> None:
    """``device`` is a site setting; a device torch cannot use is refused, never silently
    replaced (a CUDA site falling back to its CPU would take days per round)."""
    from fedseg.task.device import resolve_device

    site = SiteConfig.from_mapping({"data-path": "/d", "device": "cpu"}, source="site.toml")
    assert site.device == "cpu"
    assert SiteConfig.from_mapping({"data-path": "/d"}, source="x").device == "auto"
    with pytest.raises(ConfigError, match=r"site\.toml: device 'gpu' unknown"):
        SiteConfig.from_mapping({"data-path": "/d", "device": "gpu"}, source="site.toml")
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(ValueError, match="torch sees no CUDA GPU"):
            resolve_device("cuda:0")
