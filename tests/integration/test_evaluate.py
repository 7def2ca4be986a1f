"""`fedseg evaluate`: an evaluation-only Flower run that trains nothing and scores at every site."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from data_adapters.site import harmonise_site
from data_adapters.sources import sha256_file
from fedseg.artifacts import save_weights, write_json
from fedseg.simulation import FLOWER_ENV
from fedseg.synth import generate_federation
from fedseg.task.model import build_model
from tests.processes import flower_processes


def test_evaluate_scores_a_model_at_every_site_without_training(tmp_path: Path) -> None:
    # Prepare: two harmonised sites and an (untrained) model with its description.
    before = flower_processes()
    for raw in generate_federation(tmp_path / "raw", n_sites=2, cases_per_site=(3, 3), seed=4):
        harmonise_site(raw, tmp_path / "sites" / raw.name, target_spacing=(3.0, 3.0, 3.0), qc=False)
    model = tmp_path / "model" / "model.pt"
    weights = build_model("tiny", seed=1).state_dict()
    save_weights(model, weights)
    write_json(model.with_suffix(".json"), {"model_preset": "tiny", "patch_size": 48})
    out = tmp_path / "eval"
    # Execute
    command = ["evaluate", "--model", str(model), "--sites", str(tmp_path / "sites")]
    proc = subprocess.run(
        [sys.executable, "-m", "fedseg", *command, "--out", str(out)],
        env={**os.environ, **FLOWER_ENV},
        capture_output=True,
        text=True,
        timeout=600,
    )
    # Assert
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mode"] == "evaluate"
    assert metrics["initial_model"]["sha256"] == sha256_file(model)
    [record] = metrics["rounds"]
    assert set(record["sites"]) == {"hospital-a", "hospital-b"}
    assert record["train"] == {} and record["failures"] == []
    assert not (out / "run" / "model.pt").exists()
    assert not (out / "run" / "checkpoints").exists()
    # The model was not changed by the run.
    assert all(torch.equal(weights[k], v) for k, v in torch.load(model, weights_only=True).items())
    assert flower_processes() <= before


def test_evaluate_refuses_a_model_without_its_description(tmp_path: Path) -> None:
    model = tmp_path / "model.pt"
    save_weights(model, build_model("tiny", seed=0).state_dict())
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedseg",
            "evaluate",
            "--model",
            str(model),
            "--sites",
            str(tmp_path),
        ],
        env={**os.environ, **FLOWER_ENV},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "model.json" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()  # refused before anything started
