"""Validation of models on a site's own held-out cases; only summaries leave this module
unless the site agrees to share per-case values."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from data_adapters.manifest import SiteManifest
from evaluation.metrics import CaseRegionScores, case_scores
from evaluation.summary import summarise_cases
from fedseg.task.data import case_items, load_case
from fedseg.task.infer import predict_labels

#: What a validation scores per case and region (what a summary or a per-case list holds).
VALIDATION_METRICS: tuple[str, ...] = ("dice", "hd95")


@dataclass(frozen=True, kw_only=True)
class SiteValidation:
    """Per-case scores of a site's validation cases; they stay local, :meth:`summary` may leave.

    ``per_case`` keeps the order of the case ids validated (the manifest's order by default),
    so per-case lists line up with that order at the site, and only there.
    """

    n_cases: int
    per_case: dict[str, dict[str, CaseRegionScores]]
    seconds: float

    def summary(self, *, min_cases: int) -> dict[str, Any]:
        """Count, mean, median, std, p5, p95 per region and metric; only the count below
        ``min_cases`` so that no single patient's result can be read off."""
        return summarise_cases(self.per_case, metrics=VALIDATION_METRICS, min_cases=min_cases)

    def case_values(self, metric: str, region: str) -> list[float]:
        """One metric of one region for every case, in validation order (no case ids)."""
        return [float(scores[region].as_dict()[metric]) for scores in self.per_case.values()]


def validate_site(
    model: torch.nn.Module,
    manifest: SiteManifest,
    *,
    roi_size: int,
    case_ids: Sequence[str] | None = None,
) -> SiteValidation:
    """Predict every validation case of the site and score it against its reference."""
    return validate_models({"model": model}, manifest, roi_size=roi_size, case_ids=case_ids)[
        "model"
    ]


def validate_models(
    models: Mapping[str, torch.nn.Module],
    manifest: SiteManifest,
    *,
    roi_size: int,
    case_ids: Sequence[str] | None = None,
) -> dict[str, SiteValidation]:
    """Score several models on the same cases, reading each case once (cross-site validation
    sends every model to every site)."""
    ids = list(manifest.validation_cases if case_ids is None else case_ids)
    if not ids:
        raise ValueError(f"{manifest.site_dir}: no validation cases in the manifest")
    per_case: dict[str, dict[str, dict[str, CaseRegionScores]]] = {name: {} for name in models}
    seconds = dict.fromkeys(models, 0.0)
    for item in case_items(manifest, ids):
        image, reference, spacing = load_case(item)
        for name, model in models.items():
            start = time.perf_counter()
            prediction = predict_labels(model, image, roi_size=roi_size)
            per_case[name][item["case_id"]] = case_scores(prediction, reference, spacing=spacing)
            seconds[name] += time.perf_counter() - start
    return {
        name: SiteValidation(n_cases=len(ids), per_case=per_case[name], seconds=seconds[name])
        for name in models
    }
