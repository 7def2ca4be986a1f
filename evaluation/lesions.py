"""Lesion-wise Dice and HD95 of one region, the BraTS 2023 way.

Follows the BraTS 2023 metric code (``rachitsaluja/BraTS-2023-Metrics``,
``get_lesion_wise_score`` / ``get_lesion_wise_results``, challenge "BraTS-GLI"):

1. Reference lesions: the reference mask is dilated (``dilation_iterations`` times with the
   18-connected 3 x 3 x 3 structuring element, in voxels whatever the spacing) and split into
   26-connected components; reference voxels in one dilated component form one lesion, so
   nearby fragments count as one lesion.
2. Predicted components: 26-connected components of the prediction.
3. Matching: each reference lesion is matched to every predicted component that overlaps
   the lesion's own dilation (same element and iterations). Its Dice and HD95 (mm) compare
   the lesion with the union of the whole matched components; one predicted component may
   match several lesions. No match: Dice 0 and HD95 ``HD95_EMPTY_MM`` (a false negative).
4. Small lesions: reference lesions of at most ``min_lesion_ml`` (BraTS: 50 mm^3) are left
   out of the scores and of the TP/FN counts; components matched to them are not false
   positives. BraTS does not filter predicted components by size, so a small stray
   component is a false positive; ``ignore_small_predictions=True`` drops predicted
   components of at most ``min_lesion_ml`` before matching instead.
5. False positives: predicted components matched to no reference lesion. Each adds a Dice 0
   and an HD95 ``HD95_EMPTY_MM`` entry.
6. Scores: lesion-wise Dice = sum of kept lesions' Dice / (kept lesions + FP); HD95 alike,
   with ``HD95_EMPTY_MM`` per FP. Nothing to score (no kept lesion, no FP): Dice 1, HD95 0.

Lesion-wise scores cost a connected-component pass and an HD95 per lesion: opt-in only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from evaluation.metrics import (
    BRATS_GLI_DILATION,
    DEFAULT_MIN_LESION_ML,
    HD95_EMPTY_MM,
    dice_hd95,
)

__all__ = [
    "BRATS_GLI_DILATION",
    "DEFAULT_MIN_LESION_ML",
    "HD95_EMPTY_MM",
    "LesionScores",
    "lesion_scores",
    "reference_lesions",
]

# 26-connectivity for components (BraTS: cc3d connectivity=26).
_COMPONENTS = np.ones((3, 3, 3), dtype=bool)
# BraTS dilates with generate_binary_structure(3, 2): faces and edges, not corners.
_DILATION = ndimage.generate_binary_structure(3, 2)
# Volumes are compared in mm^3 after float products of spacings: allow rounding error.
_VOLUME_RTOL = 1e-9

Box = tuple[slice, ...]


@dataclass(frozen=True, kw_only=True)
class LesionScores:
    """Lesion-wise scores of one region; ``tp``/``fn`` count reference lesions, ``fp``
    predicted components."""

    dice: float
    hd95: float
    tp: int
    fn: int
    fp: int

    def as_dict(self) -> dict[str, float | int]:
        """Plain Python numbers, JSON-ready."""
        return asdict(self)


def lesion_scores(
    prediction: NDArray[np.bool_],
    reference: NDArray[np.bool_],
    *,
    spacing: Sequence[float],
    min_lesion_ml: float = DEFAULT_MIN_LESION_ML,
    dilation_iterations: int = BRATS_GLI_DILATION,
    ignore_small_predictions: bool = False,
) -> LesionScores:
    """Lesion-wise Dice and HD95 (mm) of one binary region, as in BraTS 2023.

    Parameters
    ----------
    prediction, reference
        Binary 3D masks of one region on one grid.
    spacing
        Voxel size in mm per axis (volumes and distances; dilation stays in voxels).
    min_lesion_ml
        Reference lesions of at most this volume are ignored (BraTS-GLI: 50 mm^3).
    dilation_iterations
        Dilation steps for grouping and matching (BraTS-GLI 3; MEN and MET 1; 0 none).
    ignore_small_predictions
        Also drop predicted components of at most ``min_lesion_ml`` (BraTS does not).

    Returns
    -------
    LesionScores
    """
    if prediction.shape != reference.shape or prediction.ndim != 3:
        raise ValueError(f"need two 3D masks of one shape: {prediction.shape}, {reference.shape}")
    if dilation_iterations < 0:
        raise ValueError(f"dilation_iterations must be >= 0, got {dilation_iterations}")
    voxel_mm3 = math.prod(float(s) for s in spacing)
    max_small = int(min_lesion_ml * 1000.0 / voxel_mm3 * (1 + _VOLUME_RTOL))  # voxels
    pred_cc, _ = ndimage.label(prediction, structure=_COMPONENTS)
    if ignore_small_predictions:
        pred_cc = _drop_small(pred_cc, max_voxels=max_small)
    pred_boxes = ndimage.find_objects(pred_cc)
    ref_cc, _ = reference_lesions(reference, dilation_iterations=dilation_iterations)
    matched: set[int] = set()
    kept: list[tuple[float, float]] = []
    n_tp = 0
    for index, box in enumerate(ndimage.find_objects(ref_cc), start=1):
        if box is None:
            continue
        lesion, ids = _match(ref_cc, pred_cc, index, box, dilation_iterations)
        matched.update(ids)
        if int(np.count_nonzero(lesion)) <= max_small:
            continue  # small: neither scored nor counted, yet its matches are not FPs
        n_tp += bool(ids)
        boxes = [box] + [b for i in ids if (b := pred_boxes[i - 1]) is not None]
        kept.append(_lesion_dice_hd95(ref_cc, pred_cc, index, ids, _union(boxes), spacing))
    n_fp = sum(1 for i, b in enumerate(pred_boxes, start=1) if b is not None and i not in matched)
    return _combine(kept, n_tp=n_tp, n_fp=n_fp)


def reference_lesions(
    reference: NDArray[np.bool_], *, dilation_iterations: int = BRATS_GLI_DILATION
) -> tuple[NDArray[np.int32], int]:
    """Label the reference's lesions, fragments within one dilated component grouped.

    Returns the label array (0 outside the reference) and the number of lesions.
    """
    box = _grow(_bounding_box(reference), dilation_iterations + 1, reference.shape)
    if box is None:
        return np.zeros(reference.shape, dtype=np.int32), 0
    ref = reference[box]
    grown = _dilate(ref, dilation_iterations)
    groups, n = ndimage.label(grown, structure=_COMPONENTS)
    labels = np.zeros(reference.shape, dtype=np.int32)
    labels[box] = np.where(ref, groups, 0)
    return labels, int(n)


def _match(
    ref_cc: NDArray[np.int32],
    pred_cc: NDArray[np.int32],
    index: int,
    box: Box,
    iterations: int,
) -> tuple[NDArray[np.bool_], list[int]]:
    """The lesion (cropped) and the ids of predicted components touching its dilation."""
    zone_box = _grow(box, iterations, ref_cc.shape)
    assert zone_box is not None
    lesion = ref_cc[zone_box] == index
    zone = _dilate(lesion, iterations)
    ids = np.unique(pred_cc[zone_box][zone])
    return lesion, [int(i) for i in ids if i != 0]


def _lesion_dice_hd95(
    ref_cc: NDArray[np.int32],
    pred_cc: NDArray[np.int32],
    index: int,
    ids: list[int],
    box: Box,
    spacing: Sequence[float],
) -> tuple[float, float]:
    """Dice and HD95 of one lesion against the union of its matched components.

    ``box`` holds the lesion and those components whole; cropping to it changes no
    distance and saves the distance transforms of the whole grid.
    """
    lesion = ref_cc[box] == index
    matched = np.isin(pred_cc[box], ids) if ids else np.zeros_like(lesion)
    return dice_hd95(matched, lesion, spacing=spacing)


def _combine(kept: list[tuple[float, float]], *, n_tp: int, n_fp: int) -> LesionScores:
    n = len(kept) + n_fp
    if n == 0:  # no lesion to find and nothing predicted: BraTS's NaN -> 1 and 0
        return LesionScores(dice=1.0, hd95=0.0, tp=0, fn=0, fp=0)
    dice = sum(d for d, _ in kept) / n
    hd95 = (sum(h for _, h in kept) + n_fp * HD95_EMPTY_MM) / n
    return LesionScores(dice=dice, hd95=hd95, tp=n_tp, fn=len(kept) - n_tp, fp=n_fp)


def _drop_small(labels: NDArray[np.int32], *, max_voxels: int) -> NDArray[np.int32]:
    """Remove components of at most ``max_voxels`` and renumber the rest 1..n."""
    sizes = np.bincount(labels.ravel())
    keep = sizes > max_voxels
    keep[0] = False
    new_ids = np.zeros(sizes.size, dtype=np.int32)
    new_ids[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return new_ids[labels]


def _dilate(mask: NDArray[np.bool_], iterations: int) -> NDArray[np.bool_]:
    # scipy reads iterations=0 as "until nothing changes": no dilation means no dilation.
    if iterations == 0:
        return mask
    return np.asarray(ndimage.binary_dilation(mask, structure=_DILATION, iterations=iterations))


def _bounding_box(mask: NDArray[np.bool_]) -> Box | None:
    boxes = ndimage.find_objects(mask.astype(np.int8))
    return boxes[0] if boxes else None


def _grow(box: Box | None, margin: int, shape: tuple[int, ...]) -> Box | None:
    """``box`` widened by ``margin`` voxels per side, clipped to the grid."""
    if box is None:
        return None
    return tuple(
        slice(max(s.start - margin, 0), min(s.stop + margin, n))
        for s, n in zip(box, shape, strict=True)
    )


def _union(boxes: Sequence[Box]) -> Box:
    return tuple(
        slice(min(b[d].start for b in boxes), max(b[d].stop for b in boxes))
        for d in range(len(boxes[0]))
    )
