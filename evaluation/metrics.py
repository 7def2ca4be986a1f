"""Per-region segmentation metrics for one case, on MONAI's metric code.

Empty-mask policy (the BraTS one): reference and prediction both empty -> Dice 1, HD95 0;
exactly one empty -> Dice 0, HD95 = ``HD95_EMPTY_MM``. This module is a leaf (numpy, torch,
MONAI only) so that every stage that scores a prediction uses the same code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from numpy.typing import NDArray

from evaluation.regions import REGION_NAMES, region_masks

# The BraTS 2023 lesion-wise evaluation assigns 374 mm, the diagonal of the 240x240x155 grid.
HD95_EMPTY_MM = 373.13


@dataclass(frozen=True)
class RegionScore:
    """Dice and 95th-percentile Hausdorff distance (mm) of one region."""

    dice: float
    hd95: float


def region_scores(
    prediction: NDArray[np.integer],
    reference: NDArray[np.integer],
    *,
    spacing: Sequence[float],
) -> dict[str, RegionScore]:
    """Score a canonical label map against a reference on the same grid."""
    if prediction.shape != reference.shape:
        raise ValueError(
            f"shape mismatch: prediction {prediction.shape}, reference {reference.shape}"
        )
    pred = region_masks(prediction)
    ref = region_masks(reference)
    return {name: _score(pred[i], ref[i], spacing=spacing) for i, name in enumerate(REGION_NAMES)}


def _score(
    pred: NDArray[np.bool_], ref: NDArray[np.bool_], *, spacing: Sequence[float]
) -> RegionScore:
    pred_empty, ref_empty = not pred.any(), not ref.any()
    if pred_empty and ref_empty:
        return RegionScore(dice=1.0, hd95=0.0)
    if pred_empty or ref_empty:
        return RegionScore(dice=0.0, hd95=HD95_EMPTY_MM)
    p = torch.from_numpy(pred[None, None].astype(np.float32))
    r = torch.from_numpy(ref[None, None].astype(np.float32))
    dice = float(compute_dice(p, r, include_background=True, ignore_empty=False).item())
    hd95 = float(
        compute_hausdorff_distance(
            p, r, include_background=True, percentile=95, spacing=[float(s) for s in spacing]
        ).item()
    )
    return RegionScore(dice=dice, hd95=hd95)
