"""Site summaries: statistics by hand, the minimum-cases rule, NaN, JSON."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from evaluation.metrics import CaseRegionScores, case_scores
from evaluation.summary import summarise, summarise_cases


def _scores(dice: float, hd95: float = 2.0) -> CaseRegionScores:
    return CaseRegionScores(
        dice=dice, hd95=hd95, sensitivity=1.0, specificity=1.0, reference_ml=1.0,
        prediction_ml=1.0,
    )  # fmt: skip


def test_summarise_by_hand() -> None:
    summary = summarise([4.0, 1.0, 3.0, 2.0])
    assert summary == {
        "count": 4,
        "mean": 2.5,
        "median": 2.5,
        "std": pytest.approx(math.sqrt(5 / 3)),  # ddof=1: squares 6.25+.25+.25+2.25 over 3
        "p5": pytest.approx(1.15),  # linear: 1 + 0.05 * (4 - 1)
        "p95": pytest.approx(3.85),
    }
    assert all(type(v) in (int, float) for v in summary.values())


def test_too_few_cases_give_only_the_count() -> None:
    assert summarise([0.9, 0.8]) == {"count": 2}
    assert summarise([]) == {"count": 0}
    assert summarise([0.9, 0.8], min_cases=2)["mean"] == pytest.approx(0.85)
    single = summarise([0.7], min_cases=1)
    assert single["mean"] == 0.7 and single["std"] is None
    with pytest.raises(ValueError, match="min_cases"):
        summarise([0.7], min_cases=0)


def test_nan_is_left_out_and_counted_before_the_minimum_applies() -> None:
    assert summarise([0.5, math.nan, math.nan]) == {"count": 1, "missing": 2}
    summary = summarise([1.0, math.nan, 2.0, 3.0])
    assert (summary["count"], summary["missing"], summary["mean"]) == (3, 1, 2.0)
    with pytest.raises(ValueError, match="infinite"):
        summarise([1.0, math.inf, 2.0])


def test_summarise_cases_per_region_and_metric_is_json() -> None:
    per_case = {
        f"case-{i}": {"WT": _scores(d), "ET": _scores(d / 2, hd95=3.0)}
        for i, d in enumerate([0.9, 0.8, 0.7])
    }
    out = summarise_cases(per_case)
    assert list(out) == ["WT", "ET"]
    assert out["WT"]["dice"]["mean"] == pytest.approx(0.8)
    assert out["ET"]["dice"]["median"] == pytest.approx(0.4)
    assert out["ET"]["hd95"] == {
        "count": 3, "mean": 3.0, "median": 3.0, "std": 0.0, "p5": 3.0, "p95": 3.0,
    }  # fmt: skip
    assert "per_case" not in out and "case-0" not in json.dumps(out)
    json.dumps(out, allow_nan=False)
    few = summarise_cases(dict(list(per_case.items())[:2]))
    assert few["WT"]["dice"] == {"count": 2}


def test_summarise_cases_with_per_case_values_and_lesion_metrics() -> None:
    reference = np.zeros((12, 12, 12), dtype=np.uint8)
    reference[2:8, 2:8, 2:8] = 3
    prediction = np.roll(reference, 1, axis=0)
    per_case = {
        c: case_scores(prediction, reference, spacing=(1, 1, 1), lesion_wise=True)
        for c in ("a", "b", "c")
    }
    out = summarise_cases(
        per_case, metrics=("dice", "lesion_dice", "lesion_fp", "sensitivity"),
        include_per_case=True,
    )  # fmt: skip
    assert out["ET"]["lesion_fp"]["mean"] == 0.0
    assert out["ET"]["sensitivity"]["mean"] == pytest.approx(5 / 6)
    assert out["per_case"]["b"]["TC"]["dice"] == pytest.approx(5 / 6)
    assert set(out["per_case"]["a"]["WT"]) == {"dice", "lesion_dice", "lesion_fp", "sensitivity"}
    text = json.dumps(out, allow_nan=False)
    assert "numpy" not in text
    no_lesions = {"a": case_scores(prediction, reference, spacing=(1, 1, 1))}
    with pytest.raises(ValueError, match="lesion_wise=True"):
        summarise_cases(no_lesions, metrics=("lesion_dice",))


def test_summarise_cases_refuses_unknown_metrics_and_mixed_regions() -> None:
    with pytest.raises(ValueError, match="no volume"):
        summarise_cases({"a": {"WT": _scores(0.9)}}, metrics=("volume",))
    with pytest.raises(ValueError, match="regions"):
        summarise_cases({"a": {"WT": _scores(0.9)}, "b": {"ET": _scores(0.9)}})
