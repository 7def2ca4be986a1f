"""Validation of a model on a site's own held-out cases; only summaries leave this module."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from data_adapters.manifest import SiteManifest
from evaluation.metrics import CaseRegionScores, case_scores
from evaluation.summary import summarise_cases
from fedseg.task.data import case_items, load_case
from fedseg.task.infer import predict_labels


@dataclass(frozen=True, kw_only=True)
class SiteValidation:
    """Per-case scores of a site's validation cases; they stay local, :meth:`summary` may leave."""

    n_cases: int
    per_case: dict[str, dict[str, CaseRegionScores]]
    seconds: float

    def summary(self, *, min_cases: int) -> dict[str, Any]:
        """Count, mean, median, std, p5, p95 per region and metric; only the count below
        ``min_cases`` so that no single patient's result can be read off."""
        return summarise_cases(self.per_case, metrics=("dice", "hd95"), min_cases=min_cases)


def validate_site(
    model: torch.nn.Module,
    manifest: SiteManifest,
    *,
    roi_size: int,
    case_ids: Sequence[str] | None = None,
) -> SiteValidation:
    """Predict every validation case of the site and score it against its reference."""
    start = time.perf_counter()
    ids = list(manifest.validation_cases if case_ids is None else case_ids)
    if not ids:
        raise ValueError(f"{manifest.site_dir}: no validation cases in the manifest")
    per_case: dict[str, dict[str, CaseRegionScores]] = {}
    for item in case_items(manifest, ids):
        image, reference, spacing = load_case(item)
        prediction = predict_labels(model, image, roi_size=roi_size)
        per_case[item["case_id"]] = case_scores(prediction, reference, spacing=spacing)
    return SiteValidation(
        n_cases=len(ids),
        per_case=per_case,
        seconds=time.perf_counter() - start,
    )
