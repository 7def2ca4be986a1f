"""Pooled and local-only baselines: the federation's budget, through the sites' own code."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data_adapters.site import harmonise_site
from data_adapters.validate import check_site
from fedseg.task.baselines import Budget, train_centrally
from fedseg.task.data import training_items
from fedseg.task.model import build_model
from tests.unit.test_adapters_site import SPACING, raw_site

BUDGET = Budget(model_preset="tiny", rounds=2, local_steps=2, batch_size=2,
                learning_rate=2e-3, patch_size=32, seed=0)  # fmt: skip


@pytest.fixture(scope="module")
def two_sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    base = tmp_path_factory.mktemp("baselines")
    out = []
    for name, n in (("hospital-a", 4), ("hospital-b", 3)):
        harmonise_site(raw_site(base / "raw" / name, n), base / name, target_spacing=SPACING,
                       qc=False, validation_fraction=0.34)  # fmt: skip
        out.append(base / name)
    return out


def test_pooling_takes_every_sites_training_cases(two_sites: list[Path]) -> None:
    manifests = [check_site(p) for p in two_sites]
    items = training_items(manifests)
    assert len(items) == sum(len(m.train_cases) for m in manifests)
    assert {Path(i["label"]).parts[-4] for i in items} == {"hospital-a", "hospital-b"}


def test_pooled_and_local_training_are_seeded_and_train(two_sites: list[Path]) -> None:
    manifests = [check_site(p) for p in two_sites]
    start = build_model("tiny", seed=0).state_dict()
    pooled = train_centrally(manifests, BUDGET).state_dict()
    again = train_centrally(manifests, BUDGET).state_dict()
    local = train_centrally(manifests[:1], BUDGET).state_dict()
    name = next(iter(start))
    assert not torch.equal(pooled[name], start[name])
    assert all(torch.equal(pooled[k], again[k]) for k in pooled)
    assert not torch.equal(pooled[name], local[name])


def test_a_site_without_training_cases_is_named() -> None:
    from types import SimpleNamespace

    empty = SimpleNamespace(site_dir=Path("/data/hospital-z"), train_cases=[])
    with pytest.raises(ValueError, match="/data/hospital-z: no training cases"):
        training_items([empty])  # type: ignore[list-item]
