"""Through the real CLI and a real Flower run: `fedseg demo` on a 2-site, 1-round federation,
then `fedseg predict` with its model on the raw scans."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from evaluation.metrics import case_scores
from evaluation.summary import summarise_cases
from fedseg.simulation import FLOWER_ENV
from tests.processes import flower_processes


def test_demo_two_sites_one_round_produces_per_site_metrics(tmp_path: Path) -> None:
    # Prepare
    before = flower_processes()
    out = tmp_path / "demo"
    env = {**os.environ, **FLOWER_ENV}
    # Execute
    command = ["demo", "--out", str(out), "--sites", "2", "--rounds", "1", "--quick"]
    proc = subprocess.run(
        [sys.executable, "-m", "fedseg", *command],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    # Assert
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"] if r["sites"]] == [1]
    final = metrics["final"]
    manifests = {
        p.parent.name: json.loads(p.read_text()) for p in (out / "sites").glob("*/manifest.json")
    }
    assert set(final["sites"]) == set(manifests) and len(manifests) == 2
    for site, record in final["sites"].items():
        assert record["n_cases"] == len(manifests[site]["split"]["validation"])
        assert record["fingerprint"] == manifests[site]["fingerprint"]
        assert set(record["dice"]) == {"WT", "TC", "ET"}
        assert all(0.0 <= v <= 1.0 for v in record["dice"].values())
        # FedAvg's weight is the number of training cases, reported by each site.
        assert final["train"][site]["n_cases"] == len(manifests[site]["split"]["train"])
    assert set(final["pooled"]["dice"]) == {"WT", "TC", "ET"}
    for name in ("model.pt", "report.md", "learning_curves.png"):
        assert (out / name).is_file(), name
    assert (out / "run" / "checkpoints" / "round-001.pt").is_file()
    # The study's audit trail holds, and each site logged what it sent.
    verified = subprocess.run(
        [sys.executable, "-m", "fedseg", "audit", "verify", str(out / "run")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert verified.returncode == 0, verified.stderr
    assert "records chained" in verified.stderr
    assert "audit trail" in (out / "report.md").read_text()
    for site in manifests:
        assert (out / "sites" / site / "egress.jsonl").is_file()
    # Everything Flower started is gone.
    assert flower_processes() <= before
    # The demo's model, through `fedseg predict` on the raw scans, scores each site's
    # validation cases as federated validation did (the same harmonisation and network).
    for site, record in final["sites"].items():
        predicted = tmp_path / "predicted" / site
        proc = subprocess.run(
            [sys.executable, "-m", "fedseg", "predict", "--model", str(out / "model.json"),
             "--input", str(out / "raw" / site), "--out", str(predicted), "--batch",
             "--keep-canonical", "--device", "cpu"],
            env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        dice = _validation_dice(out / "sites" / site, predicted, manifests[site])
        for region, value in record["dice"].items():
            assert dice[region] == pytest.approx(value, abs=1e-3), (site, region)


def _validation_dice(site_dir: Path, predicted: Path, manifest: dict[str, Any]) -> dict[str, float]:
    """Mean Dice per region of the predictions on the site's canonical validation labels."""
    per_case = {}
    for case_id in manifest["split"]["validation"]:
        reference = nib.load(site_dir / "cases" / case_id / "seg.nii.gz")
        prediction = nib.load(predicted / case_id / "canonical" / "seg.nii.gz")
        np.testing.assert_allclose(prediction.affine, reference.affine, atol=1e-5)
        per_case[case_id] = case_scores(np.asarray(prediction.dataobj),
                                        np.asarray(reference.dataobj),
                                        spacing=reference.header.get_zooms()[:3])  # fmt: skip
    summary = summarise_cases(per_case, metrics=("dice",), min_cases=1)
    return {region: float(by["dice"]["mean"]) for region, by in summary.items()}
