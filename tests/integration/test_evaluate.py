"""`fedseg evaluate`: evaluation-only and cross-site Flower runs through the real CLI.

The federated figures must be exactly what each site gets by scoring its own cases locally:
Flower, the wire format and the server's bookkeeping may move numbers, never change them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from data_adapters.site import harmonise_site
from data_adapters.sources import sha256_file
from data_adapters.validate import check_site
from evaluation.regions import REGION_NAMES
from fedseg.artifacts import load_weights, save_weights, write_json
from fedseg.config import RunConfig
from fedseg.records import harmonisation_contract
from fedseg.server_app import save_model
from fedseg.simulation import (
    FLOWER_ENV,
    app_dir,
    check_status,
    flower_env,
    free_port,
    stop_process_tree,
)
from fedseg.synth import generate_federation
from fedseg.task.artifact import load_artifact
from fedseg.task.data import training_batches
from fedseg.task.model import build_model
from fedseg.task.train import TrainSettings, train_local
from fedseg.task.validate import validate_site
from tests.processes import flower_processes

MIN_CASES = 2
# hospital-c holds every case out and only evaluates; hospital-b shares per-case values.
VALIDATION_FRACTION = {"hospital-a": 0.4, "hospital-b": 0.5, "hospital-c": 1.0}
SITE_TOML = {
    "hospital-b": "[consent]\nshare-per-case = true\n",
    "hospital-c": "[consent]\ntrain = false\n",
}


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Three harmonised sites and a model trained briefly at hospital-a (Dice well above 0)."""
    root = tmp_path_factory.mktemp("federation")
    raws = generate_federation(root / "raw", n_sites=3, cases_per_site=(5, 4, 3), seed=4)
    for raw in raws:
        site = root / "sites" / raw.name
        harmonise_site(raw, site, target_spacing=(3.0, 3.0, 3.0), qc=False,
                       validation_fraction=VALIDATION_FRACTION[raw.name])  # fmt: skip
        if raw.name in SITE_TOML:
            (site / "site.toml").write_text(SITE_TOML[raw.name])
    torch.manual_seed(0)
    model = build_model("tiny", seed=1)
    batches = training_batches(check_site(root / "sites" / "hospital-a"), patch_size=48,
                               batch_size=2, seed=0)  # fmt: skip
    train_local(model, batches, settings=TrainSettings(steps=40, learning_rate=3e-3))
    path = root / "model" / "model.pt"
    run = RunConfig(num_server_rounds=1, local_steps=4, learning_rate=3e-3)
    parameters = check_site(root / "sites" / "hospital-a").parameters
    save_model(path, model.state_dict(), run=run, trained_on="hospital-a", provenance={},
               harmonisation=harmonisation_contract(parameters))  # fmt: skip
    return root / "sites", path


def _fedseg(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedseg", *args],
        env={**os.environ, **FLOWER_ENV},
        capture_output=True,
        text=True,
        timeout=600,
    )


def _local_summary(model_path: Path, site: Path) -> tuple[dict[str, Any], list[float]]:
    """The site's own validation of a model, in this process: summary and per-case WT Dice."""
    model = build_model("tiny", seed=0)
    model.load_state_dict(load_weights(model_path))
    result = validate_site(model, check_site(site), roi_size=48)
    return result.summary(min_cases=MIN_CASES), result.case_values("dice", "WT")


def _assert_same_summary(federated: dict[str, Any], local: dict[str, Any]) -> None:
    for region in REGION_NAMES:
        for metric in ("dice", "hd95"):
            sent, here = federated[region][metric], local[region][metric]
            assert sent["count"] == here["count"]
            for stat in ("mean", "median", "std", "p5", "p95"):
                assert sent[stat] == pytest.approx(here[stat], abs=1e-6), (region, metric, stat)


def test_federated_evaluation_equals_each_site_scoring_its_own_cases(
    federation: tuple[Path, Path], tmp_path: Path
) -> None:
    # Prepare
    sites, model = federation
    before, digest = flower_processes(), sha256_file(model)
    out = tmp_path / "eval"
    # Execute
    proc = _fedseg("evaluate", "--model", str(model), "--sites", str(sites), "--out", str(out),
                   "--min-cases-to-report", str(MIN_CASES))  # fmt: skip
    # Assert
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mode"] == "evaluate"
    assert metrics["initial_model"]["sha256"] == digest == sha256_file(model)
    [record] = metrics["rounds"]
    assert set(record["sites"]) == {"hospital-a", "hospital-b", "hospital-c"}
    assert record["train"] == {} and record["failures"] == []
    for name, entry in record["sites"].items():
        local, wt_dice = _local_summary(model, sites / name)
        _assert_same_summary(entry["summary"], local)
        assert entry["n_cases"] == len(check_site(sites / name).validation_cases)
        if name == "hospital-b":  # the one site that consented to per-case values
            assert entry["per_case"]["dice"]["WT"] == pytest.approx(wt_dice, abs=1e-6)
        else:
            assert "per_case" not in entry
    assert record["sites"]["hospital-c"]["n_cases"] == 3  # every case held out
    assert 0.2 < record["sites"]["hospital-a"]["dice"]["WT"] <= 1.0  # a trained model
    assert not (out / "run" / "model.pt").exists()
    assert not (out / "run" / "checkpoints").exists()
    assert flower_processes() <= before


def test_cross_site_matrix_rows_are_models_columns_are_sites(
    federation: tuple[Path, Path], tmp_path: Path
) -> None:
    # Prepare
    sites, model = federation
    before = flower_processes()
    out = tmp_path / "cross"
    # Execute
    proc = _fedseg("evaluate", "--model", str(model), "--sites", str(sites), "--out", str(out),
                   "--cross-site", "--local-rounds", "1",
                   "--min-cases-to-report", str(MIN_CASES))  # fmt: skip
    # Assert
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    cross = metrics["cross_site"]
    # The evaluation-only site has no row of its own, but validated every model.
    assert cross["models"] == ["global", "hospital-a", "hospital-b"]
    assert cross["sites"] == ["hospital-a", "hospital-b", "hospital-c"]
    assert all(v is not None for row in cross["dice"]["WT"] for v in row)
    assert [r["round"] for r in metrics["rounds"]] == [1]
    assert all(set(r["train"]) == {"hospital-a", "hospital-b"} for r in metrics["rounds"])
    assert metrics["rounds"][0]["abstained"][0]["site"] == "hospital-c"
    # Local models: the budget asked for, from the preset's seeded start, never averaged.
    local_a = out / "run" / "local-models" / "hospital-a.pt"
    description = json.loads(local_a.with_suffix(".json").read_text())
    assert (description["trained_on"], description["rounds"], description["local_steps"]) == (
        "hospital-a", 1, 4,
    )  # fmt: skip
    # ... and usable with `fedseg predict`: it records the harmonisation its site trained on.
    artifact = load_artifact(local_a)
    assert artifact.harmonisation == harmonisation_contract(
        check_site(sites / "hospital-a").parameters
    )
    # Each cell is what that site computes locally for that model.
    at_c, _ = _local_summary(local_a, sites / "hospital-c")
    _assert_same_summary(cross["entries"]["hospital-a"]["hospital-c"]["summary"], at_c)
    global_at_a, _ = _local_summary(model, sites / "hospital-a")
    assert cross["dice"]["WT"][0][0] == pytest.approx(global_at_a["WT"]["dice"]["mean"], abs=1e-6)
    assert metrics["final"]["sites"]["hospital-a"]["dice"]["WT"] == cross["dice"]["WT"][0][0]
    assert "Cross-site evaluation" in (out / "report.html").read_text()
    assert flower_processes() <= before


def test_evaluate_refuses_a_model_without_its_description(tmp_path: Path) -> None:
    model = tmp_path / "model.pt"
    save_weights(model, build_model("tiny", seed=0).state_dict())
    proc = _fedseg("evaluate", "--model", str(model), "--sites", str(tmp_path))
    assert proc.returncode == 1
    assert "model.json" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()  # refused before anything started


def test_evaluate_refuses_local_budget_without_cross_site(tmp_path: Path) -> None:
    model = tmp_path / "model.pt"
    save_weights(model, build_model("tiny", seed=0).state_dict())
    write_json(model.with_suffix(".json"), {"model_preset": "tiny", "patch_size": 48})
    proc = _fedseg("evaluate", "--model", str(model), "--sites", str(tmp_path),
                   "--local-rounds", "2")  # fmt: skip
    assert proc.returncode != 0 and "--cross-site" in proc.stderr


@pytest.mark.deployment
def test_evaluation_against_a_deployed_superlink_with_one_supernode_per_site(
    federation: tuple[Path, Path], tmp_path: Path
) -> None:
    """The same app on Flower's deployment engine: a SuperLink and three real SuperNodes on
    loopback, each naming its own folder and consent in its node config (insecure here; TLS
    and authentication are the deployment issue's)."""
    # Prepare
    sites, model = federation
    home, port = tmp_path / "flwr-home", free_port()
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "pilot"\n[superlink.pilot]\naddress = "127.0.0.1:{port}"\n'
        "insecure = true\n"
    )
    env = flower_env(home)
    run_config = tmp_path / "evaluate.toml"
    run_config.write_text(
        f'mode = "evaluate"\ninitial-model = "{model}"\nmin-train-sites = 3\n'
        f'min-cases-to-report = {MIN_CASES}\nrun-dir = "{tmp_path / "run"}"\n'
    )
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with (tmp_path / "superlink.log").open("wb") as log:
            procs.append(subprocess.Popen(
                ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(port),
                 "--database", str(tmp_path / "superlink.db")],
                env=env, stdout=log, stderr=subprocess.STDOUT,
            ))  # fmt: skip
        for name in ("hospital-a", "hospital-b", "hospital-c"):
            consent = "train=false" if name == "hospital-c" else "train=true"
            node_config = f'data-path="{sites / name}" {consent}'
            with (tmp_path / f"{name}.log").open("wb") as log:
                procs.append(subprocess.Popen(
                    ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}",
                     "--port", str(free_port()), "--node-config", node_config],
                    env=env, stdout=log, stderr=subprocess.STDOUT,
                ))  # fmt: skip
        # Execute
        proc = subprocess.run(
            ["flwr", "run", str(app_dir()), "pilot", "--run-config", str(run_config), "--stream"],
            env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
    finally:
        for p in procs:
            stop_process_tree(p)
    # Assert
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_status(tmp_path / "run")
    [record] = json.loads((tmp_path / "run" / "metrics.json").read_text())["rounds"]
    assert set(record["sites"]) == {"hospital-a", "hospital-b", "hospital-c"}
    for name, entry in record["sites"].items():
        _assert_same_summary(entry["summary"], _local_summary(model, sites / name)[0])
        # Node config, not site.toml, speaks for a deployed site: nobody shares per case.
        assert "per_case" not in entry
    assert all(p.poll() is not None for p in procs)
