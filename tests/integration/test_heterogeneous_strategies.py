"""FedBN, the cyclic plan and personalisation in real Flower runs (simulation engine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_adapters.site import harmonise_site
from fedseg.artifacts import load_weights
from fedseg.config import RunConfig
from fedseg.simulation import FLOWER_ENV, SimulationSpec, app_dir, run_simulation
from fedseg.synth import generate_federation
from fedseg.task.model import build_model
from fedseg.task.sharing import normalisation_keys
from tests.processes import flower_processes

# Two real Flower runs (about 90 s); the same logic is unit-tested in test_heterogeneity.py and
# runs on the deployment engine in test_deployment.py.
pytestmark = pytest.mark.slow

SITES = ("hospital-a", "hospital-b", "hospital-c")


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hetero")
    for raw in generate_federation(root / "raw", n_sites=3, cases_per_site=(4, 3, 3), seed=2):
        harmonise_site(raw, root / "sites" / raw.name, target_spacing=(3.0, 3.0, 3.0), qc=False)
    return root / "sites"


def _study(sites: Path, run_dir: Path, **overrides: object) -> dict:
    settings: dict[str, object] = {
        "num_server_rounds": 2,
        "local_steps": 2,
        "min_train_sites": 2,
        "min_cases_to_report": 1,
    }
    run = RunConfig(
        **{**settings, **overrides},
        run_dir=str(run_dir),  # type: ignore[arg-type]
        sim_sites_dir=str(sites),
    )
    before = flower_processes()
    spec = SimulationSpec(
        app_dir=app_dir(), run=run, num_supernodes=len(SITES), work_dir=run_dir.parent / "flower"
    )
    run_simulation(spec, on_line=lambda _: None)
    assert flower_processes() <= before
    return json.loads((run_dir / "metrics.json").read_text())


def test_fedbn_study_keeps_normalisation_at_the_sites_and_personalises(
    sites: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    metrics = _study(sites, run_dir, strategy="fedbn", model_preset="tiny-bn", personalise_steps=2)
    assert [sorted(r["train"]) for r in metrics["rounds"]] == [list(SITES)] * 2
    assert all(not r["failures"] for r in metrics["rounds"])
    # The server never saw a site's normalisation: model.pt holds the initial values there,
    # and trained values everywhere else.
    saved, start = load_weights(run_dir / "model.pt"), build_model("tiny-bn", seed=0).state_dict()
    norm = normalisation_keys(build_model("tiny-bn", seed=0))
    assert all(torch.equal(saved[k], start[k]) for k in norm)
    assert not all(torch.equal(saved[k], start[k]) for k in set(start) - norm)
    meta = json.loads((run_dir / "model.json").read_text())
    assert meta["strategy"] == "fedbn" and meta["site_local_layers"] == "normalisation"
    personal = metrics["personalisation"]
    assert set(personal["sites"]) == set(SITES) and personal["failures"] == []
    for entry in personal["sites"].values():
        assert (
            set(entry["global"]["dice"]) == set(entry["personalised"]["dice"]) == {"WT", "TC", "ET"}
        )
    # Such a model cannot be validated as one model elsewhere: said before any Flower run.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedseg",
            "evaluate",
            "--model",
            str(run_dir / "model.pt"),
            "--sites",
            str(sites),
            "--out",
            str(tmp_path / "eval"),
        ],
        env={**os.environ, **FLOWER_ENV},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "normalisation layers stayed at each site" in proc.stdout + proc.stderr


def test_cyclic_study_visits_the_sites_in_site_order(sites: Path, tmp_path: Path) -> None:
    order = ["hospital-c", "hospital-a", "hospital-b"]
    metrics = _study(
        sites, tmp_path / "run", strategy="cyclic", site_order=",".join(order), num_server_rounds=1
    )
    [record] = metrics["rounds"]
    assert list(record["train"]) == order  # recorded as each visit came back
    assert record["failures"] == [] and set(record["sites"]) == set(SITES)
