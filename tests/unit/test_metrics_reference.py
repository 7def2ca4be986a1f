"""fedseg's Dice and HD95 against independent implementations, on anisotropic grids.

- Dice: a plain numpy count, 2 |P & R| / (|P| + |R|).
- HD95: DeepMind's ``surface_distance`` (PyPI ``surface-distance`` 0.1, a dev dependency),
  the code BraTS 2023 scores with: surface elements between voxel corners from a lookup
  table, weighted by area for the spacing, scipy ``distance_transform_edt`` in mm, the 95th
  percentile of area per direction, the larger direction. fedseg computes the same
  definition with MONAI's sub-voxel surfaces; MONAI's distances are float32 (relative
  rounding ~6e-8), so the two agree to ``HD95_TOLERANCE_MM`` = 1e-5 mm (measured: up to
  1.5e-6 mm on these distances of up to 34 mm).

surface-distance 0.1 predates numpy 2 and SciPy's namespace clean-up: it uses ``np.Inf``
(removed in numpy 2) only for an empty mask, which these tests never pass it, and the
deprecated ``scipy.ndimage.filters`` / ``.morphology`` namespaces, whose warnings are
silenced here (SciPy 2.0 will remove them; the tests will then fail loudly, not pass).

Shapes are seeded unions of rotated ellipsoids; predictions are the references moved,
eroded, dilated, with boundary noise and false blobs, so the surfaces are irregular and the
95th percentile falls in every kind of place (one test checks that the cases are ones on
which MONAI's boundary-voxel HD95, a different definition, would disagree).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import surface_distance
import torch
from monai.metrics import compute_hausdorff_distance
from numpy.typing import NDArray
from scipy import ndimage

from evaluation.lesions import lesion_scores
from evaluation.metrics import HD95_EMPTY_MM, case_scores, region_scores
from evaluation.regions import REGION_NAMES, region_masks

#: fedseg vs DeepMind, mm: MONAI's float32 distances against surface_distance's float64
#: (enough for distances up to ~100 mm; larger ones would need a relative tolerance).
HD95_TOLERANCE_MM = 1e-5
DICE_TOLERANCE = 1e-6
SPACINGS: tuple[tuple[float, float, float], ...] = ((1.0, 1.2, 3.0), (0.8, 0.8, 2.5))
SHAPE = (44, 40, 22)
SEEDS = range(5)

Mask = NDArray[np.bool_]


def _deepmind_hd95(prediction: Mask, reference: Mask, spacing: tuple[float, ...]) -> float:
    """HD95 in mm from DeepMind's surface_distance (both masks non-empty)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="surface_distance")
        warnings.filterwarnings("ignore", message=".*scipy.ndimage.*namespace is deprecated")
        distances = surface_distance.compute_surface_distances(reference, prediction, spacing)
    return float(surface_distance.compute_robust_hausdorff(distances, 95))


def _plain_dice(prediction: Mask, reference: Mask) -> float:
    both = int(np.count_nonzero(prediction & reference))
    return 2.0 * both / (int(np.count_nonzero(prediction)) + int(np.count_nonzero(reference)))


def _ellipsoid(
    rng: np.random.Generator, shape: tuple[int, ...], centre: NDArray[np.floating], radius: float
) -> Mask:
    """A randomly rotated ellipsoid with semi-axes ``radius`` * (0.6-1.4), in voxels."""
    rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    axes = radius * rng.uniform(0.6, 1.4, 3)
    offsets = np.indices(shape, dtype=float).reshape(3, -1) - centre[:, None]
    local = rotation.T @ offsets
    return np.asarray((((local / axes[:, None]) ** 2).sum(axis=0) <= 1.0).reshape(shape))


def _blobs(rng: np.random.Generator, shape: tuple[int, ...], n: int, radius: float) -> Mask:
    """A union of ``n`` ellipsoids around the grid's centre."""
    mask = np.zeros(shape, dtype=bool)
    middle = np.asarray(shape, dtype=float) / 2
    for _ in range(n):
        mask |= _ellipsoid(rng, shape, middle + rng.uniform(-0.2, 0.2, 3) * shape, radius)
    return mask


@dataclass(frozen=True)
class Case:
    """A reference and a prediction label map (0 bg, 1 NETC, 2 SNFH, 3 ET)."""

    name: str
    reference: NDArray[np.uint8]
    prediction: NDArray[np.uint8]


def _labels(wt: Mask, tc: Mask, et: Mask) -> NDArray[np.uint8]:
    """A canonical label map from region masks, nested by intersection."""
    labels = np.zeros(wt.shape, dtype=np.uint8)
    labels[wt] = 2
    labels[wt & tc] = 1
    labels[wt & tc & et] = 3
    return labels


def _shift(mask: Mask, offset: tuple[int, int, int]) -> Mask:
    """``mask`` moved by whole voxels, filled with background (no wrap-around)."""
    return np.asarray(ndimage.shift(mask.astype(np.uint8), offset, order=0, cval=0), dtype=bool)


def _noisy(rng: np.random.Generator, mask: Mask) -> Mask:
    """Flip a third of the voxels on either side of the boundary."""
    boundary = ndimage.binary_dilation(mask) & ~ndimage.binary_erosion(mask)
    return np.asarray(mask ^ (boundary & (rng.random(mask.shape) < 0.33)), dtype=bool)


Perturbation = Callable[[np.random.Generator, Mask], Mask]
PERTURBATIONS: tuple[tuple[str, Perturbation], ...] = (
    ("shift", lambda rng, m: _shift(m, (1, -2, 1))),
    ("erode", lambda rng, m: np.asarray(ndimage.binary_erosion(m))),
    ("dilate", lambda rng, m: np.asarray(ndimage.binary_dilation(m))),
    ("noise", _noisy),
    ("shift_noise", lambda rng, m: _noisy(rng, _shift(m, (0, 1, -1)))),
)


def _case(seed: int) -> Case:
    """A seeded tumour (WT > TC > ET rim) and a perturbed prediction with a false blob."""
    rng = np.random.default_rng(seed)
    wt = _blobs(rng, SHAPE, 4, radius=7.0)
    tc = wt & ndimage.binary_erosion(wt, iterations=2) & _blobs(rng, SHAPE, 2, radius=5.0)
    et = tc & ~ndimage.binary_erosion(tc)
    name, perturb = PERTURBATIONS[seed % len(PERTURBATIONS)]
    pred_wt, pred_tc = perturb(rng, wt), perturb(rng, tc)
    pred_et = pred_tc & ~ndimage.binary_erosion(pred_tc)  # the predicted core's rim
    # A false blob in a corner; in odd cases it holds ET (so TC and ET) too.
    blob = _ellipsoid(rng, SHAPE, np.array([5.0, 5.0, 4.0]), radius=2.5)
    pred_wt |= blob
    if seed % 2:
        pred_tc |= blob
        pred_et |= blob
    reference, prediction = _labels(wt, tc, et), _labels(pred_wt, pred_tc, pred_et)
    assert region_masks(reference).any(axis=(1, 2, 3)).all(), "every region in the reference"
    assert region_masks(prediction).any(axis=(1, 2, 3)).all(), "every region predicted"
    return Case(f"seed{seed}-{name}", reference, prediction)


@pytest.fixture(scope="module")
def cases() -> list[Case]:
    return [_case(seed) for seed in SEEDS]


def _region_pairs(cases: list[Case]) -> Iterator[tuple[str, str, Mask, Mask]]:
    """(case, region, prediction mask, reference mask) for every case and region."""
    for case in cases:
        pred, ref = region_masks(case.prediction), region_masks(case.reference)
        for i, region in enumerate(REGION_NAMES):
            yield case.name, region, pred[i], ref[i]


@pytest.mark.parametrize("spacing", SPACINGS)
def test_dice_equals_a_plain_voxel_count(cases: list[Case], spacing: tuple[float, ...]) -> None:
    # Prepare
    expected = {(c, r): _plain_dice(p, ref) for c, r, p, ref in _region_pairs(cases)}
    # Execute
    fast = {c.name: region_scores(c.prediction, c.reference, spacing=spacing) for c in cases}
    full = {c.name: case_scores(c.prediction, c.reference, spacing=spacing) for c in cases}
    # Assert
    for (case, region), dice in expected.items():
        assert fast[case][region].dice == pytest.approx(dice, abs=DICE_TOLERANCE), (case, region)
        assert full[case][region].dice == pytest.approx(dice, abs=DICE_TOLERANCE), (case, region)
    assert max(expected.values()) < 0.95 and len(set(expected.values())) >= 10  # imperfect, varied


@pytest.mark.parametrize("spacing", SPACINGS)
def test_hd95_equals_deepmind_surface_distance(
    cases: list[Case], spacing: tuple[float, float, float]
) -> None:
    # Prepare
    expected = {(c, r): _deepmind_hd95(p, ref, spacing) for c, r, p, ref in _region_pairs(cases)}
    # Execute
    got = {c.name: region_scores(c.prediction, c.reference, spacing=spacing) for c in cases}
    # Assert
    worst = max(abs(got[case][region].hd95 - hd95) for (case, region), hd95 in expected.items())
    assert worst <= HD95_TOLERANCE_MM
    assert len(set(np.round(list(expected.values()), 3))) >= 10  # many different distances


def test_hd95_follows_the_spacing_axis_by_axis(cases: list[Case]) -> None:
    """The same arrays at (1.0, 1.2, 3.0) and with the axes' spacings swapped give other
    distances, each still DeepMind's: the spacing is applied to the right axis."""
    # Prepare
    case = cases[1]
    spacings = [(1.0, 1.2, 3.0), (3.0, 1.2, 1.0)]
    pred, ref = region_masks(case.prediction)[0], region_masks(case.reference)[0]
    # Execute
    got = [region_scores(case.prediction, case.reference, spacing=s)["WT"].hd95 for s in spacings]
    # Assert
    expected = [_deepmind_hd95(pred, ref, s) for s in spacings]
    assert got == pytest.approx(expected, abs=HD95_TOLERANCE_MM)
    assert abs(expected[0] - expected[1]) > 0.5


def _separated_lesions(
    rng: np.random.Generator,
) -> tuple[Mask, Mask, list[tuple[Mask, Mask]]]:
    """Three reference lesions far apart, two found imperfectly, one missed, one false blob.

    Returns the two masks and the (prediction, reference) pair of each found lesion, built
    by construction rather than by any matching code.
    """
    shape = (60, 40, 24)
    centres = [np.array(c, dtype=float) for c in ((12, 12, 8), (46, 14, 12), (14, 30, 16))]
    lesions = [_ellipsoid(rng, shape, c, radius=4.0) for c in centres]  # >= 8 voxels apart
    found = [lesions[0] | _shift(lesions[0], (1, 1, 0)), _noisy(rng, lesions[1])]
    false = _ellipsoid(rng, shape, np.array([48.0, 32.0, 12.0]), radius=3.0)
    reference = lesions[0] | lesions[1] | lesions[2]
    prediction = found[0] | found[1] | false
    return prediction, reference, [(found[0], lesions[0]), (found[1], lesions[1])]


@pytest.mark.parametrize("spacing", SPACINGS)
def test_lesion_wise_scores_equal_per_lesion_references(spacing: tuple[float, ...]) -> None:
    """BraTS 2023 lesion-wise means, rebuilt from per-lesion plain Dice and DeepMind HD95 on
    the whole grid: catches any crop or offset error in the per-lesion path."""
    # Prepare
    prediction, reference, pairs = _separated_lesions(np.random.default_rng(11))
    dice = [_plain_dice(p, r) for p, r in pairs]
    hd95 = [_deepmind_hd95(p, r, spacing) for p, r in pairs]
    n = len(pairs) + 2  # a missed lesion and a false positive add a 0 / HD95_EMPTY_MM each
    # Execute
    scores = lesion_scores(prediction, reference, spacing=spacing)
    # Assert
    assert (scores.tp, scores.fn, scores.fp) == (2, 1, 1)
    assert scores.dice == pytest.approx(sum(dice) / n, abs=DICE_TOLERANCE)
    assert scores.hd95 == pytest.approx((sum(hd95) + 2 * HD95_EMPTY_MM) / n, abs=HD95_TOLERANCE_MM)
    assert min(dice) < 0.95 and min(hd95) > 0.0  # the found lesions are imperfect


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")
def test_cases_tell_area_weighting_from_voxel_counting(cases: list[Case]) -> None:
    """MONAI's compute_hausdorff_distance (boundary voxels, equal weights) is another HD95:
    on these cases it must differ from DeepMind's somewhere, or the agreement above would
    not show that fedseg computes the BraTS definition rather than just any HD95."""
    # Prepare
    spacing = SPACINGS[0]
    gaps = []
    for _, _, pred, ref in _region_pairs(cases):
        # Execute
        voxels = compute_hausdorff_distance(
            torch.from_numpy(pred[None, None]), torch.from_numpy(ref[None, None]),
            include_background=True, percentile=95, spacing=list(spacing),
        )  # fmt: skip
        gaps.append(abs(float(voxels.item()) - _deepmind_hd95(pred, ref, spacing)))
    # Assert
    assert max(gaps) > 0.3
