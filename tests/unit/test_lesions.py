"""Lesion-wise Dice and HD95 (BraTS 2023): matching, penalties, small lesions, millimetres."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import NDArray

from evaluation.lesions import HD95_EMPTY_MM, lesion_scores, reference_lesions
from evaluation.metrics import case_scores

MAX = HD95_EMPTY_MM


def _grid(shape: tuple[int, int, int] = (40, 40, 40)) -> NDArray[np.bool_]:
    return np.zeros(shape, dtype=bool)


def _found_missed_false() -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """Reference: lesions A and B (4^3 = 64 voxels each). Prediction: A shifted one voxel
    along axis 2 (overlap 48: Dice 2*48/128 = 0.75), B missed, one false blob."""
    ref, pred = _grid(), _grid()
    ref[2:6, 2:6, 2:6] = True  # A
    ref[30:34, 30:34, 30:34] = True  # B, missed
    pred[2:6, 2:6, 3:7] = True  # A, shifted
    pred[30:34, 2:6, 2:6] = True  # false positive, far from both
    return pred, ref


def test_one_found_one_missed_one_false_positive_by_hand() -> None:
    pred, ref = _found_missed_false()
    scores = lesion_scores(pred, ref, spacing=(1.0, 1.0, 1.0))
    # Found A: Dice 0.75, HD95 1 mm (a one-voxel shift); missed B: 0 and MAX; the false
    # positive adds 0 and MAX. Means over the three entries.
    assert scores.dice == pytest.approx(0.75 / 3)
    assert scores.hd95 == pytest.approx((1.0 + MAX + MAX) / 3)
    assert (scores.tp, scores.fn, scores.fp) == (1, 1, 1)


def test_lesion_hd95_is_in_millimetres_with_anisotropic_spacing() -> None:
    pred, ref = _found_missed_false()
    # The shift is along the 2.5 mm axis; lesions are 64 x 2.5 = 160 mm^3, all still kept.
    scores = lesion_scores(pred, ref, spacing=(1.0, 1.0, 2.5))
    assert scores.hd95 == pytest.approx((2.5 + MAX + MAX) / 3)
    assert scores.dice == pytest.approx(0.75 / 3)
    only_a = lesion_scores(pred[:10, :10, :10], ref[:10, :10, :10], spacing=(0.7, 0.7, 3.0))
    assert only_a.dice == pytest.approx(0.75) and only_a.hd95 == pytest.approx(3.0)


def test_tiny_reference_lesions_are_ignored_and_threshold_scales_with_spacing() -> None:
    ref, pred = _grid(), _grid()
    ref[2:6, 2:6, 2:6] = True  # 64 voxels, found exactly
    pred[2:6, 2:6, 2:6] = True
    ref[30:32, 30:32, 30:32] = True  # 8 voxels, missed
    ref[30:32, 2:4, 30:32] = True  # 8 voxels, found: its match is not a false positive
    pred[30:32, 2:4, 30:32] = True
    at_1mm = lesion_scores(pred, ref, spacing=(1.0, 1.0, 1.0))  # 8 mm^3 <= 50 mm^3
    assert (at_1mm.dice, at_1mm.hd95) == (1.0, 0.0)
    assert (at_1mm.tp, at_1mm.fn, at_1mm.fp) == (1, 0, 0)
    at_2mm = lesion_scores(pred, ref, spacing=(2.0, 2.0, 2.0))  # 8 voxels = 64 mm^3 > 50
    assert (at_2mm.tp, at_2mm.fn, at_2mm.fp) == (2, 1, 0)
    assert at_2mm.dice == pytest.approx(2 / 3)
    custom = lesion_scores(pred, ref, spacing=(1.0, 1.0, 1.0), min_lesion_ml=0.001)
    assert (custom.tp, custom.fn) == (2, 1)


def test_threshold_is_at_or_below_fifty_cubic_millimetres() -> None:
    ref = _grid()
    ref[2:7, 2:12, 2:3] = True  # 50 voxels at 1 mm: ignored (BraTS drops volume <= 50)
    ref[20:23, 20:37, 20:21] = True  # 51 voxels: kept
    scores = lesion_scores(_grid(), ref, spacing=(1.0, 1.0, 1.0))
    assert (scores.tp, scores.fn, scores.fp) == (0, 1, 0)


def test_small_predicted_components_are_false_positives_unless_ignored() -> None:
    ref, pred = _grid(), _grid()
    ref[2:6, 2:6, 2:6] = True
    pred[2:6, 2:6, 2:6] = True
    pred[30:32, 30:32, 30:32] = True  # 8 voxels, far from any lesion
    brats = lesion_scores(pred, ref, spacing=(1.0, 1.0, 1.0))
    assert (brats.fp, brats.dice) == (1, 0.5) and brats.hd95 == pytest.approx(MAX / 2)
    lenient = lesion_scores(pred, ref, spacing=(1.0, 1.0, 1.0), ignore_small_predictions=True)
    assert (lenient.fp, lenient.dice, lenient.hd95) == (0, 1.0, 0.0)


def test_fragments_within_the_dilation_are_one_lesion() -> None:
    ref = _grid()
    ref[10:14, 10:14, 10:14] = True
    ref[10:14, 10:14, 17:21] = True  # 3 voxels apart: one lesion after 3 dilations
    ref[10:14, 30:34, 10:14] = True  # far away: a lesion of its own
    _, n = reference_lesions(ref)
    assert n == 2
    assert reference_lesions(ref, dilation_iterations=0)[1] == 3
    pred = _grid()
    pred[10:14, 10:14, 17:21] = True  # only the second fragment of the grouped lesion
    scores = lesion_scores(pred, ref, spacing=(1.0, 1.0, 1.0))
    # The grouped lesion (128 voxels) against the 64 found: Dice 128 / 192.
    assert (scores.tp, scores.fn, scores.fp) == (1, 1, 0)
    assert scores.dice == pytest.approx((128 / 192) / 2)


def test_a_component_touching_only_the_dilated_lesion_matches_it() -> None:
    ref, pred = _grid(), _grid()
    ref[10:14, 10:14, 10:14] = True
    pred[10:14, 10:14, 16:20] = True  # 2 voxels beyond the lesion: within 3 dilations
    scores = lesion_scores(pred, ref, spacing=(1.0, 1.0, 1.0))
    assert (scores.tp, scores.fn, scores.fp) == (1, 0, 0)
    assert scores.dice == 0.0
    far = lesion_scores(pred, ref, spacing=(1.0, 1.0, 1.0), dilation_iterations=1)
    assert (far.tp, far.fn, far.fp) == (0, 1, 1)


def test_no_lesion_and_no_prediction_scores_perfectly() -> None:
    scores = lesion_scores(_grid(), _grid(), spacing=(1.0, 1.0, 1.0))
    assert (scores.dice, scores.hd95, scores.tp, scores.fn, scores.fp) == (1.0, 0.0, 0, 0, 0)


def _ellipsoid(
    shape: tuple[int, int, int], centre: tuple[float, ...], radii: tuple[float, ...]
) -> NDArray[np.bool_]:
    grid = np.indices(shape, dtype=float)
    terms = (((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True))
    return np.asarray(sum(terms) <= 1.0)


def test_agrees_with_the_brats_2023_metric_code_on_an_anisotropic_case() -> None:
    """Numbers computed offline by BraTS-2023-Metrics (challenge BraTS-GLI) on these arrays
    saved as NIfTI with spacing 0.9 x 0.9 x 2.5 mm: a regression anchor for every field."""
    shape = (40, 40, 24)
    ref = np.zeros(shape, np.uint8)
    ref[_ellipsoid(shape, (20, 18, 12), (9, 7, 4))] = 2
    ref[_ellipsoid(shape, (20, 18, 12), (5, 4, 2.5))] = 1
    ref[_ellipsoid(shape, (20, 18, 12), (3, 3, 1.5))] = 3
    pred = np.zeros(shape, np.uint8)
    pred[_ellipsoid(shape, (21, 19, 12), (8, 8, 4))] = 2
    pred[_ellipsoid(shape, (21, 18, 13), (5, 4, 2))] = 1
    pred[_ellipsoid(shape, (21, 18, 13), (2.5, 3, 1.5))] = 3
    pred[_ellipsoid(shape, (6, 32, 5), (2, 2, 1.5))] = 2  # a stray blob: a WT false positive
    spacing = (0.8999999761581421, 0.8999999761581421, 2.5)  # float32 header values
    brats = {  # dice, hd95, sensitivity, specificity, lesion dice, lesion hd95, TP, FN, FP
        "WT": (0.8516928946113496, 15.259095417549615, 0.8678328474246841, 0.9953172245859089,
               0.43223620522749273, 187.89999997615814, 1, 0, 1),
        "TC": (0.6455026455026455, 3.080584332288052, 0.5781990521327014, 0.9988216502134123,
               0.6455026455026455, 3.080584332288052, 1, 0, 0),
        "ET": (0.46551724137931033, 2.657066043041583, 0.38028169014084506, 0.999530381695322,
               0.46551724137931033, 2.657066043041583, 1, 0, 0),
    }  # fmt: skip
    scores = case_scores(pred, ref, spacing=spacing, lesion_wise=True)
    for region, expected in brats.items():
        s = scores[region]
        assert s.lesions is not None
        got = (s.dice, s.hd95, s.sensitivity, s.specificity, s.lesions.dice, s.lesions.hd95)
        assert got == pytest.approx(expected[:6], rel=1e-6), region
        assert (s.lesions.tp, s.lesions.fn, s.lesions.fp) == expected[6:], region
    assert scores["WT"].reference_ml == pytest.approx(2083.7248896002784 / 1000, rel=1e-9)
