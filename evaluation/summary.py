"""What leaves a site: summaries of per-case scores, never one patient's number.

:func:`summarise` turns one metric's per-case values into ``count``, ``mean``, ``median``,
``std``, ``p5`` and ``p95``; with fewer than ``min_cases`` usable values it gives only the
count, so no statistic can be read back to a single case (the mean of one value *is* that
value; the mean and std of two give both).

Conventions:

- ``std`` is the sample standard deviation (``ddof=1``): a site's cases are a sample of its
  patients, and it is what ``mean ± SD`` in papers and ``pandas.Series.std`` report. With one
  value (``min_cases=1``) it is undefined: ``None``.
- ``p5`` and ``p95`` use numpy's default ``"linear"`` percentile method.
- NaN means "not available" (a metric that could not be computed) and is left out; the
  summary then says ``"missing": k``, and ``min_cases`` applies to the values left. The
  scores of :mod:`evaluation.metrics` are never NaN. An infinite value is a bug upstream
  (HD95 of an empty mask is ``HD95_EMPTY_MM``, never inf) and is refused.
- Everything returned is plain ``int``/``float``/``None``: ``json.dumps(...,
  allow_nan=False)`` accepts it.

The output of :func:`summarise_cases` is what ``evaluation.report`` reads as a site's
``summary[region][metric]``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from evaluation.metrics import CaseRegionScores

__all__ = ["DEFAULT_MIN_CASES", "summarise", "summarise_cases"]

DEFAULT_MIN_CASES = 3
#: The statistics a summary holds besides its count (what a site may send).
STATISTICS: tuple[str, ...] = ("mean", "median", "std", "p5", "p95")
Summary = dict[str, float | int | None]


def summarise(values: Sequence[float], *, min_cases: int = DEFAULT_MIN_CASES) -> Summary:
    """Count, mean, median, std (ddof=1), p5 and p95 of one metric over cases.

    Parameters
    ----------
    values
        One value per case; NaN marks a value that is not available.
    min_cases
        Fewer usable values than this give ``{"count": n}`` only (at least 1).

    Returns
    -------
    dict
        ``count`` always; ``missing`` when NaNs were left out; the statistics only when
        ``count >= min_cases``.

    Raises
    ------
    ValueError
        If a value is infinite or ``min_cases < 1``.
    """
    if min_cases < 1:
        raise ValueError(f"min_cases must be at least 1, got {min_cases}")
    array = np.asarray(values, dtype=np.float64).ravel()
    if np.isinf(array).any():
        raise ValueError("infinite value among the per-case values: refusing to summarise")
    nan = np.isnan(array)
    array = array[~nan]
    out: Summary = {"count": int(array.size)}
    if nan.any():
        out["missing"] = int(nan.sum())
    if array.size < min_cases:
        return out
    p5, p95 = np.percentile(array, [5.0, 95.0], method="linear")
    out |= {
        "mean": float(array.mean()),
        "median": float(np.median(array)),
        "std": float(array.std(ddof=1)) if array.size > 1 else None,
        "p5": float(p5),
        "p95": float(p95),
    }
    return out


def summarise_cases(
    per_case: Mapping[str, Mapping[str, CaseRegionScores]],
    *,
    metrics: Sequence[str] = ("dice", "hd95"),
    min_cases: int = DEFAULT_MIN_CASES,
    include_per_case: bool = False,
) -> dict[str, Any]:
    """Summaries per region and metric over a site's cases.

    Parameters
    ----------
    per_case
        ``{case_id: {region: CaseRegionScores}}``, every case with the same regions.
    metrics
        Names from :meth:`CaseRegionScores.as_dict` (``dice``, ``hd95``, ``sensitivity``,
        ``specificity``, ``reference_ml``, ``prediction_ml``, and ``lesion_dice``,
        ``lesion_hd95``, ``lesion_tp``, ``lesion_fn``, ``lesion_fp`` when scored lesion-wise).
    min_cases
        See :func:`summarise`.
    include_per_case
        Also return every case's values under ``"per_case"`` (for local use: these are
        individual patients' results, not for leaving the site).

    Returns
    -------
    dict
        ``{region: {metric: summary}}``, plus ``"per_case": {case: {region: {metric: v}}}``
        when asked (NaN written as ``None``).

    Raises
    ------
    ValueError
        If cases differ in regions, or a metric is unknown or missing for a case.
    """
    table = _values(per_case, metrics)
    regions = _regions(per_case)
    out: dict[str, Any] = {
        region: {
            m: summarise([table[c][region][m] for c in table], min_cases=min_cases) for m in metrics
        }
        for region in regions
    }
    if include_per_case:
        out["per_case"] = {
            case: {r: {m: _json_number(v) for m, v in by.items()} for r, by in by_region.items()}
            for case, by_region in table.items()
        }
    return out


def _regions(per_case: Mapping[str, Mapping[str, CaseRegionScores]]) -> list[str]:
    """The regions every case shares, in the first case's order."""
    first = next(iter(per_case.values()), {})
    regions = list(first)
    for case, scores in per_case.items():
        if set(scores) != set(regions):
            raise ValueError(f"case {case}: regions {sorted(scores)} differ from {regions}")
    return regions


def _values(
    per_case: Mapping[str, Mapping[str, CaseRegionScores]], metrics: Sequence[str]
) -> dict[str, dict[str, dict[str, float]]]:
    """``{case: {region: {metric: value}}}`` for the requested metrics, checked."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for case, scores in per_case.items():
        table[case] = {}
        for region, score in scores.items():
            flat = score.as_dict()
            absent = [m for m in metrics if m not in flat]
            if absent:
                lesion = any(m.startswith("lesion_") for m in absent)
                hint = " (score with lesion_wise=True)" if lesion else ""
                raise ValueError(
                    f"case {case}, {region}: no {', '.join(absent)}{hint}; known: {sorted(flat)}"
                )
            table[case][region] = {m: float(flat[m]) for m in metrics}
    return table


def _json_number(value: float) -> float | None:
    return value if math.isfinite(value) else None
