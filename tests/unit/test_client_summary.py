"""What a site sends after validation: summaries only, and only the count below the minimum."""

from __future__ import annotations

import numpy as np

from evaluation.metrics import case_scores
from evaluation.summary import summarise_cases
from fedseg.records import summary_metrics


def _per_case(n: int) -> dict[str, dict[str, object]]:
    out = {}
    for i in range(n):
        reference = np.zeros((12, 12, 12), dtype=np.uint8)
        reference[3:9, 3:9, 3:9] = 2
        reference[5:7, 5:7, 5:7] = 3
        prediction = np.roll(reference, i, axis=0)
        out[f"case{i}"] = case_scores(prediction, reference, spacing=(1.0, 1.0, 1.0))
    return out


def test_site_with_enough_cases_sends_statistics_but_no_case_values() -> None:
    per_case = _per_case(4)
    values = summary_metrics(summarise_cases(per_case, min_cases=3), 4)  # type: ignore[arg-type]
    assert values["num-examples"] == 4
    assert {"dice-WT-mean", "dice-WT-median", "dice-WT-p5", "dice-WT-p95", "hd95-ET-std"} <= set(
        values
    )
    # Nothing keyed by a case leaves the site.
    assert not any("case" in key for key in values)


def test_site_below_min_cases_sends_only_its_count() -> None:
    values = summary_metrics(summarise_cases(_per_case(2), min_cases=3), 2)  # type: ignore[arg-type]
    assert values == {"num-examples": 2}
