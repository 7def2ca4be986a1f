"""Per-region segmentation metrics for one case, on MONAI's metric code.

Two entry points share one definition of Dice and HD95:

- :func:`region_scores`: Dice and HD95 only, cheap enough for validation every round;
- :func:`case_scores`: adds sensitivity, specificity, volumes and, when asked, the
  BraTS 2023 lesion-wise scores (:mod:`evaluation.lesions`).

Conventions (the BraTS 2023 metric code's, ``rachitsaluja/BraTS-2023-Metrics``):

- Empty masks: reference and prediction both empty -> Dice 1, HD95 0; exactly one empty
  -> Dice 0, HD95 = ``HD95_EMPTY_MM``.
- Dice 2|P & R| / (|P| + |R|) from exact voxel counts.
- HD95 in millimetres, defined as BraTS 2023 computes it (DeepMind's ``surface_distance``):
  surface elements between voxel corners weighted by their area for the real, possibly
  anisotropic spacing; per direction the distance at 95 % of the surface area; the larger
  direction wins. Computed with MONAI's sub-voxel surfaces
  (``get_edge_surface_distance(use_subvoxels=True)``). MONAI's own
  ``compute_hausdorff_distance`` counts boundary voxels instead, which gives other numbers
  (on test shapes 0.2-0.8 mm larger at 1 mm spacing, and far off when a small false blob
  holds more than 5 % of the boundary voxels but not of the surface area).
  Why this definition: weighting by surface area makes the percentile a property of the
  surface rather than of the grid, so it stays right on anisotropic, thick-slice data (a
  voxel count over-weights the faces of long voxels), and it is what the BraTS 2021-2023
  leaderboards report. BraTS 2025's package (``brats-evaluation``, on panoptica) pools
  border-voxel distances instead and, in its global HD95, ignores the spacing; the optional
  ``tests/unit/test_brats_reference.py`` pins the differences.
- Sensitivity TP / (TP + FN); with an empty reference it is 1 when the prediction is empty
  too and 0 otherwise (BraTS divides by ``TP + FN + eps``, which gives exactly that).
- Specificity TN / (TN + FP) over every voxel of the grid, background included (as BraTS:
  it is therefore close to 1 for any plausible prediction). A reference with no negative
  voxel has nothing to get wrong: 1 (BraTS's eps would give 0; it never happens in a scan).

This module is a leaf (numpy, torch, MONAI; :mod:`evaluation.lesions` is imported only when
lesion-wise scores are asked for) so that every stage that scores a prediction uses the same
code.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
from monai.metrics.utils import get_edge_surface_distance
from numpy.typing import NDArray

from evaluation.regions import REGION_NAMES, region_masks

if TYPE_CHECKING:  # lesions imports this module's primitives: no import cycle at run time
    from evaluation.lesions import LesionScores

# BraTS 2023 parameters (BraTS-2023-Metrics, challenge "BraTS-GLI").
# HD95 of a missed or false lesion: the code replaces the infinite distance with 374 mm, just
# above the 373.13 mm diagonal of the 240 x 240 x 155 BraTS grid at 1 mm.
HD95_EMPTY_MM = 374.0
# Lesions of at most 50 mm^3 (50 voxels at 1 mm^3) are left out of lesion-wise scores.
DEFAULT_MIN_LESION_ML = 0.05
# Iterations of an 18-connected (3 x 3 x 3 less corners) dilation: 3 for GLI, SSA and PED,
# 1 for MEN and MET.
BRATS_GLI_DILATION = 3


@dataclass(frozen=True)
class RegionScore:
    """Dice and 95th-percentile Hausdorff distance (mm) of one region."""

    dice: float
    hd95: float


@dataclass(frozen=True, kw_only=True)
class CaseRegionScores:
    """Everything scored for one region of one case.

    ``reference_ml`` and ``prediction_ml`` are region volumes in millilitres;
    ``lesions`` is ``None`` unless lesion-wise scoring was asked for.
    """

    dice: float
    hd95: float
    sensitivity: float
    specificity: float
    reference_ml: float
    prediction_ml: float
    lesions: LesionScores | None = None

    def as_dict(self) -> dict[str, float | int]:
        """Flat, JSON-ready numbers; lesion-wise ones are prefixed ``lesion_``."""
        out: dict[str, float | int] = {
            f.name: float(getattr(self, f.name)) for f in fields(self) if f.name != "lesions"
        }
        if self.lesions is not None:
            out |= {f"lesion_{k}": v for k, v in self.lesions.as_dict().items()}
        return out


def region_scores(
    prediction: NDArray[np.integer],
    reference: NDArray[np.integer],
    *,
    spacing: Sequence[float],
) -> dict[str, RegionScore]:
    """Dice and HD95 (mm) per region of a canonical label map against a reference.

    The fast path used by validation every round; see :func:`case_scores` for more.
    """
    pred, ref = _region_pairs(prediction, reference)
    return {
        name: RegionScore(*dice_hd95(pred[i], ref[i], spacing=spacing))
        for i, name in enumerate(REGION_NAMES)
    }


def case_scores(
    prediction: NDArray[np.integer],
    reference: NDArray[np.integer],
    *,
    spacing: Sequence[float],
    lesion_wise: bool = False,
    min_lesion_ml: float = DEFAULT_MIN_LESION_ML,
    dilation_iterations: int = BRATS_GLI_DILATION,
) -> dict[str, CaseRegionScores]:
    """All per-region scores of one case (canonical label maps on one grid).

    Parameters
    ----------
    prediction, reference
        Canonical label maps (0 bg, 1 NETC, 2 SNFH, 3 ET) of one shape.
    spacing
        Voxel size in mm along each array axis.
    lesion_wise
        Also compute the BraTS 2023 lesion-wise scores (opt-in: seconds per case).
    min_lesion_ml, dilation_iterations
        Lesion-wise parameters, see :func:`evaluation.lesions.lesion_scores`.

    Returns
    -------
    dict
        ``{"WT": CaseRegionScores, "TC": ..., "ET": ...}``.
    """
    pred, ref = _region_pairs(prediction, reference)
    voxel_ml = math.prod(float(s) for s in spacing) / 1000.0
    out: dict[str, CaseRegionScores] = {}
    for i, name in enumerate(REGION_NAMES):
        dice, hd95 = dice_hd95(pred[i], ref[i], spacing=spacing)
        sensitivity, specificity = sensitivity_specificity(pred[i], ref[i])
        lesions = None
        if lesion_wise:
            from evaluation.lesions import lesion_scores

            lesions = lesion_scores(
                pred[i], ref[i], spacing=spacing,
                min_lesion_ml=min_lesion_ml, dilation_iterations=dilation_iterations,
            )  # fmt: skip
        out[name] = CaseRegionScores(
            dice=dice,
            hd95=hd95,
            sensitivity=sensitivity,
            specificity=specificity,
            reference_ml=int(np.count_nonzero(ref[i])) * voxel_ml,
            prediction_ml=int(np.count_nonzero(pred[i])) * voxel_ml,
            lesions=lesions,
        )
    return out


def dice_hd95(
    pred: NDArray[np.bool_], ref: NDArray[np.bool_], *, spacing: Sequence[float]
) -> tuple[float, float]:
    """Dice and HD95 (mm) of two binary masks, with the BraTS empty-mask policy."""
    n_pred, n_ref = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    if n_pred == 0 and n_ref == 0:
        return 1.0, 0.0
    if n_pred == 0 or n_ref == 0:
        return 0.0, HD95_EMPTY_MM
    # Dice from exact counts (float64), BraTS's formula; MONAI's compute_dice is float32.
    dice = 2.0 * int(np.count_nonzero(pred & ref)) / (n_pred + n_ref)
    return dice, hd95_mm(pred, ref, spacing=spacing)


def hd95_mm(pred: NDArray[np.bool_], ref: NDArray[np.bool_], *, spacing: Sequence[float]) -> float:
    """95th-percentile Hausdorff distance in mm of two non-empty masks, as BraTS 2023.

    Surfaces are MONAI's sub-voxel surface elements (between voxel corners, each with its
    area in mm^2 for this spacing); each directed set of distances is cut at the 95th
    percentile of surface *area*, and the larger of the two is the HD95.
    """
    box = _bounding_box(pred | ref, margin=1)  # MONAI would crop too, but in float16 torch
    pred, ref = pred[box], ref[box]
    with warnings.catch_warnings():
        # MONAI warns about its own internal use of a deprecated argument (MONAI 1.5-1.6).
        warnings.filterwarnings(
            "ignore", message=".*always_return_as_numpy", category=FutureWarning
        )
        edges, distances, areas = get_edge_surface_distance(
            torch.from_numpy(np.ascontiguousarray(pred, dtype=bool)),
            torch.from_numpy(np.ascontiguousarray(ref, dtype=bool)),
            spacing=[float(s) for s in spacing],
            use_subvoxels=True,
            symmetric=True,
        )
    # symmetric=True and use_subvoxels=True: two distance sets and two area maps.
    pred_to_ref, ref_to_pred = cast(tuple[torch.Tensor, torch.Tensor], distances)
    pred_areas, ref_areas = cast(tuple[torch.Tensor, torch.Tensor], areas)
    pred_area, ref_area = pred_areas[edges[0]], ref_areas[edges[1]]
    return max(_area_percentile(pred_to_ref, pred_area), _area_percentile(ref_to_pred, ref_area))


def _bounding_box(mask: NDArray[np.bool_], *, margin: int) -> tuple[slice, ...]:
    """The smallest box holding ``mask``, widened by ``margin`` voxels where the grid allows."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(int(hits[0]) - margin, 0), int(hits[-1]) + 1 + margin))
    return tuple(box)


def _area_percentile(distances: torch.Tensor, areas: torch.Tensor, percent: float = 95.0) -> float:
    """The distance below which ``percent``% of the surface area lies (BraTS's rule)."""
    d = distances.double().cpu().numpy()
    a = areas.double().cpu().numpy()
    order = np.argsort(d, kind="stable")  # order within ties does not change the result
    index = int(np.searchsorted(np.cumsum(a[order]) / np.sum(a), percent / 100.0))
    return float(d[order][min(index, d.size - 1)])


def sensitivity_specificity(pred: NDArray[np.bool_], ref: NDArray[np.bool_]) -> tuple[float, float]:
    """Voxel sensitivity and whole-grid specificity, with the module's empty conventions."""
    tp = int(np.count_nonzero(pred & ref))
    positives = int(np.count_nonzero(ref))
    fp = int(np.count_nonzero(pred)) - tp
    negatives = ref.size - positives
    # Nothing to find: right only if nothing was predicted (BraTS: 0 / (0 + eps) = 0).
    empty_reference_sensitivity = 1.0 if fp == 0 else 0.0
    sensitivity = tp / positives if positives else empty_reference_sensitivity
    specificity = (negatives - fp) / negatives if negatives else 1.0
    return sensitivity, specificity


def _region_pairs(
    prediction: NDArray[np.integer], reference: NDArray[np.integer]
) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    if prediction.shape != reference.shape:
        raise ValueError(
            f"shape mismatch: prediction {prediction.shape}, reference {reference.shape}"
        )
    return region_masks(prediction), region_masks(reference)
