"""The metrics benchmark runs and reports what it promises (no timings are asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evaluation.benchmark_metrics import main, run_benchmark, synthetic_case
from evaluation.regions import REGION_NAMES, region_masks

TINY = (40, 40, 30)


def test_synthetic_case_has_every_region_and_an_imperfect_prediction() -> None:
    # Prepare / Execute
    reference, prediction = synthetic_case(TINY, seed=0)
    # Assert
    ref, pred = region_masks(reference), region_masks(prediction)
    assert ref.any(axis=(1, 2, 3)).all() and pred.any(axis=(1, 2, 3)).all()
    assert (ref != pred).any(axis=(1, 2, 3)).all()  # every region is wrong somewhere
    assert (ref[2] <= ref[1]).all() and (ref[1] <= ref[0]).all()  # ET in TC in WT


def test_run_benchmark_reports_every_method_and_the_same_masks() -> None:
    # Prepare / Execute
    result = run_benchmark(shape=TINY, repeats=1)
    # Assert
    methods = {"fedseg", "fedseg_lesion_wise", "monai", "deepmind"}
    assert set(result["median_seconds"]) == methods and set(result["scores"]) == methods
    headline = {"ratio", "ratio_lesion_wise", "ratio_deepmind", "meets_goal", "volumes_ml"}
    assert headline <= set(result)
    assert all(len(v) == 1 for v in result["seconds"].values())
    for region in REGION_NAMES:  # one set of masks: the same Dice from every method
        dice = {m: result["scores"][m][region]["dice"] for m in methods}
        assert max(dice.values()) - min(dice.values()) < 1e-6, dice
    assert result["max_hd95_difference_vs_deepmind_mm"] < 1e-5


def test_main_writes_results_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    argv = ["--repeats", "1", "--shape", *map(str, TINY), "--out", str(tmp_path)]
    # Execute
    code = main(argv)
    # Assert
    assert code == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["shape"] == list(TINY) and result["goal_seconds"] == 2.0
    assert "fedseg / monai" in capsys.readouterr().out
